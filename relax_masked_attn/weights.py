"""Reading ``model.safetensors`` (single or sharded) into NumPy without torch or safetensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .models import CheckpointError

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
           "I64": "int64", "I32": "int32"}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _read_file(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = _np_dtype(_DTYPES[info["dtype"]])
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` or of the shards its index names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(_read_file(folder / shard))
        return tensors
    raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


PREFIXES = ("", "model.", "bert.")


def match_parameters(
    names_shapes: list[tuple[str, tuple[int, ...]]], tensors: dict[str, np.ndarray], dtype: str
) -> list[np.ndarray]:
    """The checkpoint tensor for every parameter, in order, cast to ``dtype``.

    A parameter ``p`` is found as ``p``, ``model.p`` or ``bert.p``; tensors the model does not use
    (a pooler, an LM head) are ignored; a missing or misshapen one is an error.
    """
    out = []
    for name, shape in names_shapes:
        key = next((p + name for p in PREFIXES if p + name in tensors), None)
        if key is None:
            raise CheckpointError(f"checkpoint lacks the weight {name!r}")
        value = tensors[key]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}"
            )
        out.append(np.ascontiguousarray(value.astype(_np_dtype(dtype))))
    return out
