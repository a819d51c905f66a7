"""Reading ``model.safetensors`` (single or sharded) into NumPy without torch or safetensors.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to its
``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), then the data.
Every way a file can break that (too short, a header that is not JSON, offsets outside the file
or not matching the shape) is a :class:`~relax_masked_attn.checkpoint.CheckpointError` naming the
file and the tensor.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, read_json
from .targets import usable_cores

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
           "I64": "int64", "I32": "int32"}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, "u1")
    if raw.size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({raw.size} bytes, no header)")
    header_len = int(raw[:8].view("<u8")[0])
    if header_len > raw.size - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header of "
                              f"{header_len} bytes in a file of {raw.size})")
    try:
        header = json.loads(bytes(raw[8:8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object")
    data = raw[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor(path, name, info, data)
    return out


def _tensor(path: Path, name: str, info, data: np.ndarray) -> np.ndarray:
    """Tensor ``name`` of ``data`` as its header entry ``info`` describes it, checked."""
    try:
        kind, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        shape = [int(d) for d in shape]
        start, end = int(start), int(end)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}"
                              ) from None
    if kind not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {kind}")
    dtype = _np_dtype(_DTYPES[kind])
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != size:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {[start, end]} that do "
                              f"not fit its shape {shape} of {kind}")
    if end > data.size:
        raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the "
                              f"data, which has {data.size}")
    return data[start:end].view(dtype).reshape(shape)


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` or of the shards its index names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_file(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index} names the shard {shard}, which is not in {folder}")
            tensors.update(_read_file(folder / shard))
        return tensors
    raise CheckpointError(
        f"{folder} has neither model.safetensors nor model.safetensors.index.json")


PREFIXES = ("", "model.", "bert.")


def match_parameters(
    names_shapes: list[tuple[str, tuple[int, ...]]], tensors: dict[str, np.ndarray], dtype: str,
    workers: int | None = None,
) -> list[np.ndarray]:
    """The checkpoint tensor for every parameter, in order, cast to ``dtype``.

    A parameter ``p`` is found as ``p``, ``model.p`` or ``bert.p``; tensors the model does not use
    (a pooler, an LM head) are ignored; a missing or misshapen one is an error. The copies (and
    casts) run on ``workers`` threads (default: every usable core) in slices of about 4M elements:
    NumPy releases the GIL while it casts, and reading a memory-mapped checkpoint of a few GB on
    one thread was most of a warm start (Qwen3-0.6B: 600M parameters).
    """
    sources = []
    for name, shape in names_shapes:
        key = next((p + name for p in PREFIXES if p + name in tensors), None)
        if key is None:
            raise CheckpointError(f"checkpoint lacks the weight {name!r}")
        value = tensors[key]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(shape)}"
            )
        sources.append(value)
    target = _np_dtype(dtype)
    out = [np.empty(value.shape, target) for value in sources]
    jobs = []  # (source, destination) slices of the flattened tensors
    for src, dst in zip(sources, out):
        src, dst = src.reshape(-1), dst.reshape(-1)  # views (the reader's tensors are contiguous)
        jobs += [(src[i:i + _SLICE_ELEMENTS], dst[i:i + _SLICE_ELEMENTS])
                 for i in range(0, src.size, _SLICE_ELEMENTS)]
    with concurrent.futures.ThreadPoolExecutor(workers or usable_cores()) as pool:
        list(pool.map(lambda job: np.copyto(job[1], job[0], casting="unsafe"), jobs))
    return out


_SLICE_ELEMENTS = 1 << 22
