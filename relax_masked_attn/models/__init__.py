"""Embedding models loaded from Hugging Face checkpoints: what is supported, and how it loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tvm.relax.frontend import nn

from .bert import BertConfig, BertEmbedder
from .qwen3 import Qwen3Config, Qwen3Embedder

_MODULES = {"bert": BertEmbedder, "qwen3": Qwen3Embedder}
SUPPORTED = {"bert": "BERT family (BERT, MiniLM, bge, e5)", "qwen3": "Qwen3 family (Qwen3, Qwen3-Embedding)"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: missing, malformed or unsupported."""


@dataclasses.dataclass
class ModelSpec:
    """What a checkpoint folder holds, read from its config files."""

    path: Path
    model_type: str  # "bert" or "qwen3"
    config: BertConfig | Qwen3Config
    pooling: str  # "mean", "cls" or "last"
    normalize: bool
    max_length: int  # tokens per text; longer texts are truncated

    @property
    def padding_side(self) -> str:
        return _MODULES[self.model_type].padding_side

    def create(self) -> nn.Module:
        if self.model_type == "bert":
            return BertEmbedder(self.config, self.pooling, self.normalize)
        return Qwen3Embedder(self.config, self.normalize)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _dataclass_from(cls, cfg: dict, path: Path):
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in cfg]
    if missing:
        raise CheckpointError(f"{path}: config.json lacks {', '.join(missing)}")
    try:
        return cls(**{k: v for k, v in cfg.items() if k in fields})
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_spec(path: str | Path) -> ModelSpec:
    """Read a checkpoint folder's ``config.json`` (and sentence-transformers files if any)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint")
    cfg = _read_json(path / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        names = "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
        raise CheckpointError(
            f"{path}: unsupported architecture {model_type!r} "
            f"({', '.join(cfg.get('architectures') or [])}); supported model_type values: {names}"
        )
    if model_type == "bert":
        config = _dataclass_from(BertConfig, cfg, path)
        pooling, normalize = _sentence_transformers_pooling(path)
        max_length = config.max_position_embeddings
        st_cfg = path / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_length = min(max_length, int(_read_json(st_cfg).get("max_seq_length", max_length)))
    else:
        config = _dataclass_from(Qwen3Config, _qwen3_rope(cfg, path), path)
        pooling, normalize, max_length = "last", True, config.max_position_embeddings
    return ModelSpec(path, model_type, config, pooling, normalize, max_length)


def _qwen3_rope(cfg: dict, path: Path) -> dict:
    """Fold transformers 5's ``rope_parameters`` into ``rope_theta``; refuse what we lack."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{path}: rope_type {rope_type!r} is not supported (default only)")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{path}: sliding-window attention is not supported")
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg = {**cfg, "rope_theta": rope["rope_theta"]}
    return cfg


def _sentence_transformers_pooling(path: Path) -> tuple[str, bool]:
    """(pooling, normalize) from modules.json / 1_Pooling/config.json; mean + no norm if absent."""
    pooling, normalize = "mean", False
    modules = path / "modules.json"
    if not modules.is_file():
        return pooling, normalize
    for module in _read_json(modules):
        kind = module.get("type", "")
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            pcfg = _read_json(path / module.get("path", "") / "config.json")
            if pcfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pcfg.get("pooling_mode_mean_tokens", True):
                raise CheckpointError(f"{path}: only mean or CLS pooling is supported ({pcfg})")
    return pooling, normalize


__all__ = ["SUPPORTED", "BertConfig", "CheckpointError", "ModelSpec", "Qwen3Config", "read_spec"]
