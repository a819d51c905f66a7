"""Reading a Hugging Face checkpoint folder: ``config.json`` (and the sentence-transformers
files beside it) into a :class:`ModelSpec`.

Every problem with the folder, its JSON files or their values is a :class:`CheckpointError`
naming the file and what is wrong with it; the weights are read by :mod:`relax_masked_attn.weights`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from tvm.relax.frontend import nn

from .models import MODULES, SUPPORTED, BertConfig, Qwen3Config


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
    # sentence-transformers' prompts (config_sentence_transformers.json): name -> text
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def padding_side(self) -> str:
        return MODULES[self.model_type].padding_side

    def create(self) -> nn.Module:
        if self.model_type == "bert":
            return MODULES["bert"](self.config, self.pooling, self.normalize)
        return MODULES[self.model_type](self.config, self.normalize)


def read_json(path: Path, kind: type = dict):
    """The JSON value of ``path``, which must be a ``kind`` (an object unless told)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, kind):
        what = "an object" if kind is dict else "a list"
        raise CheckpointError(f"{path} must hold {what}, but holds {type(value).__name__}")
    return value


def _accepts(hint, value) -> bool:
    """Whether a JSON value fits a config field's annotation (int, float, str, bool, X | None)."""
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arm, value) for arm in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _dataclass_from(cls, cfg: dict, path: Path):
    """``cls`` built from the fields of ``cfg`` it declares, each checked against its type."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in cfg]
    if missing:
        raise CheckpointError(f"{path}: config.json lacks {', '.join(missing)}")
    for f in fields:
        if f.name in cfg and not _accepts(hints[f.name], cfg[f.name]):
            raise CheckpointError(
                f"{path}: config.json field {f.name} must be {_type_name(hints[f.name])}, "
                f"but is {cfg[f.name]!r}"
            )
    try:
        return cls(**{f.name: cfg[f.name] for f in fields if f.name in cfg})
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if hint is type(None) else hint.__name__


def resolve_checkpoint(name: str | Path) -> Path:
    """A checkpoint folder: ``name`` itself where it is one, else a Hugging Face Hub id
    (``"BAAI/bge-small-en-v1.5"``) fetched through ``huggingface_hub`` into its cache (offline,
    ``HF_HUB_OFFLINE=1``, only what the cache holds)."""
    path = Path(name)
    if path.is_dir() or isinstance(name, Path) or str(name).count("/") != 1 or str(
            name).startswith((".", "/", "~")):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(name)))
    except ImportError:
        raise CheckpointError(f"no checkpoint folder at {name}, and huggingface_hub is not "
                              "installed to fetch it as a Hub id") from None
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, no network: one error
        raise CheckpointError(f"no checkpoint folder at {name}, and the Hugging Face Hub could "
                              f"not provide it: {type(err).__name__}: {err}") from None


def read_spec(path: str | Path) -> ModelSpec:
    """Read a checkpoint folder's ``config.json`` (and sentence-transformers files if any);
    ``path`` may be a Hugging Face Hub id (:func:`resolve_checkpoint`)."""
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint")
    cfg = read_json(path / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        names = "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
        archs = cfg.get("architectures")
        archs = ", ".join(map(str, archs)) if isinstance(archs, list) else ""
        raise CheckpointError(
            f"{path}: unsupported architecture {model_type!r} ({archs}); "
            f"supported model_type values: {names}"
        )
    if model_type == "bert":
        config = _dataclass_from(BertConfig, cfg, path)
        pooling, normalize = _sentence_transformers_pooling(path)
        max_length = config.max_position_embeddings
        st_cfg = path / "sentence_bert_config.json"
        if st_cfg.is_file():
            limit = read_json(st_cfg).get("max_seq_length", max_length)
            if not _accepts(int, limit) or limit < 1:
                raise CheckpointError(f"{st_cfg}: max_seq_length must be a positive integer, "
                                      f"but is {limit!r}")
            max_length = min(max_length, limit)
    else:
        config = _dataclass_from(Qwen3Config, _qwen3_rope(cfg, path), path)
        pooling, normalize, max_length = "last", True, config.max_position_embeddings
    prompts, default_prompt_name = _sentence_transformers_prompts(path)
    return ModelSpec(path, model_type, config, pooling, normalize, max_length, prompts,
                     default_prompt_name)


def _sentence_transformers_prompts(path: Path) -> tuple[dict[str, str], str | None]:
    """``prompts`` and ``default_prompt_name`` of ``config_sentence_transformers.json``, if any
    (Qwen3-Embedding: ``{"query": "Instruct: ...\\nQuery:", "document": ""}``)."""
    file = path / "config_sentence_transformers.json"
    if not file.is_file():
        return {}, None
    cfg = read_json(file)
    prompts = cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise CheckpointError(f"{file}: prompts must map names to strings, but is {prompts!r}")
    default = cfg.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{file}: default_prompt_name {default!r} is not among the prompts "
                              f"{sorted(prompts)}")
    return dict(prompts), default


def _qwen3_rope(cfg: dict, path: Path) -> dict:
    """Fold transformers 5's ``rope_parameters`` into ``rope_theta``; refuse what we lack."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: config.json rope_parameters must be an object, "
                              f"but is {rope!r}")
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
    for module in read_json(modules, list):
        if not isinstance(module, dict):
            raise CheckpointError(f"{modules}: every entry must be an object, but got {module!r}")
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            pcfg = read_json(path / str(module.get("path", "")) / "config.json")
            if pcfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pcfg.get("pooling_mode_mean_tokens", True):
                raise CheckpointError(f"{path}: only mean or CLS pooling is supported ({pcfg})")
    return pooling, normalize


__all__ = ["CheckpointError", "ModelSpec", "read_json", "read_spec", "resolve_checkpoint"]
