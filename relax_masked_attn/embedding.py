"""``EmbeddingModel``: texts in, embeddings out, through a model compiled with TVM."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from . import __version__
from .legalize import device_cuda_target, host_cpu_target
from .models import CheckpointError, ModelSpec, read_spec
from .weights import match_parameters, read_safetensors

DEFAULT_BATCH_TOKENS = 8192


def cache_dir() -> Path:
    """Where compiled models are kept: ``$RELAX_MASKED_ATTN_CACHE``, else
    ``~/.cache/relax_masked_attn``. Delete the folder to clear it."""
    env = os.environ.get("RELAX_MASKED_ATTN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relax_masked_attn"


def resolve_target(target: str | tvm.target.Target) -> tuple[tvm.target.Target, tvm.runtime.Device]:
    """``"llvm"`` (this CPU), ``"cuda"`` (the visible GPU) or a Target; and its device."""
    if isinstance(target, tvm.target.Target):
        tgt = target
    elif target == "llvm":
        tgt = host_cpu_target()
    elif target == "cuda":
        if not tvm.cuda(0).exist:
            raise RuntimeError("target 'cuda' was asked for, but no CUDA device is visible")
        tgt = device_cuda_target()
    else:
        tgt = tvm.target.Target(target)
    dev = tvm.cpu() if tgt.kind.name == "llvm" else tvm.device(tgt.kind.name, 0)
    return tgt, dev


def export(spec: ModelSpec, dtype: str) -> tuple[tvm.IRModule, list[tuple[str, nn.Parameter]]]:
    """The model as a Relax module with ``forward`` and ``hidden_states`` on symbolic shapes."""
    model = spec.create()
    model.to(dtype)
    ids = {"input_ids": nn.spec.Tensor(["batch", "seq"], "int32"),
           "attention_mask": nn.spec.Tensor(["batch", "seq"], "int32"),
           "token_index": nn.spec.Tensor(["tokens"], "int32")}
    return model.export_tvm({"forward": dict(ids), "hidden_states": dict(ids)})


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def compile_model(spec: ModelSpec, target: tvm.target.Target, dtype: str,
                  use_cache: bool = True, log=None) -> tuple[tvm.runtime.Module, list]:
    """Compile (or load from the cache) the model; returns the library and its parameters."""
    mod, params = export(spec, dtype)
    key = hashlib.sha256(json.dumps({
        "config": (spec.path / "config.json").read_text(),
        "pooling": [spec.pooling, spec.normalize],
        "target": str(target), "dtype": dtype, "version": __version__,
        "tvm": tvm.__version__, "source": _source_digest(),
    }, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"{spec.model_type}-{key}.so"
    if use_cache and path.is_file():
        if log:
            log(f"loading compiled model from {path}")
        return tvm.runtime.load_module(str(path)), params
    if log:
        log(f"compiling {spec.model_type} for {target.kind.name} ({dtype}); "
            "the compiled library is cached for the next start")
    start = time.perf_counter()
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    if log:
        log(f"compiled in {time.perf_counter() - start:.1f} s")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.so")
        ex.export_library(str(tmp))
        tmp.replace(path)
        return tvm.runtime.load_module(str(path)), params
    return ex, params


class EmbeddingModel:
    """A compiled embedding model with its tokenizer.

    ``embed(texts)`` returns ``[len(texts), hidden]`` float32 embeddings in input order.
    """

    def __init__(self, spec: ModelSpec, lib, params, target, device, dtype: str, tokenizer=None):
        self.spec, self.target, self.device, self.dtype = spec, target, device, dtype
        self.tokenizer = tokenizer
        self._lib = lib
        self._vm = relax.VirtualMachine(lib, device)
        self._params = [tvm.runtime.tensor(p, device=device) for p in params]

    @classmethod
    def from_pretrained(cls, path: str | Path, target: str | tvm.target.Target = "llvm",
                        dtype: str | None = None, use_cache: bool = True,
                        progress: bool = False) -> EmbeddingModel:
        """Load a checkpoint folder (``config.json``, ``model.safetensors``, ``tokenizer.json``).

        ``dtype`` defaults to float32 on CPU and float16 on GPUs.
        """
        log = (lambda msg: print(f"[relax-masked-attn] {msg}", file=sys.stderr)) if progress else None
        spec = read_spec(path)
        tgt, dev = resolve_target(target)
        dtype = dtype or ("float32" if tgt.kind.name == "llvm" else "float16")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, but got {dtype!r}")
        if log:
            log(f"reading weights from {spec.path}")
        tensors = read_safetensors(spec.path)
        lib, named = compile_model(spec, tgt, dtype, use_cache, log)
        params = match_parameters([(n, tuple(int(d) for d in p.shape)) for n, p in named],
                                  tensors, dtype)
        tokenizer = None
        if (spec.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
            tokenizer.no_padding()
            tokenizer.enable_truncation(spec.max_length)
        return cls(spec, lib, params, tgt, dev, dtype, tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.spec.config.hidden_size

    def _run(self, fn: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        args = [tvm.runtime.tensor(x, device=self.device)
                for x in self._check_ids(input_ids, attention_mask)]
        out = self._vm[fn](*args, *self._params).numpy()
        return out.astype("float32")

    def _check_ids(self, input_ids, attention_mask):
        input_ids = np.asarray(input_ids)
        attention_mask = np.asarray(attention_mask)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be [batch, seq], but got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must not be empty, but got shape {input_ids.shape}")
        if input_ids.shape[1] > self.spec.max_length:
            raise ValueError(
                f"sequences of {input_ids.shape[1]} tokens exceed the model limit of "
                f"{self.spec.max_length}"
            )
        vocab = self.spec.config.vocab_size
        if input_ids.min() < 0 or input_ids.max() >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}), the model's vocabulary")
        return model_inputs(input_ids, attention_mask, self.spec.padding_side)

    def profile(self, input_ids, attention_mask, by: str = "kind") -> dict[str, float]:
        """Seconds of one ``forward`` call per kind of kernel (``by="kind"``: attention, matmul,
        rest) or per function the VM calls (``by="function"``, slowest first).

        Each VM call is timed between device synchronizations (so the sum exceeds a plain run).
        """
        if by not in ("kind", "function"):
            raise ValueError(f"by must be 'kind' or 'function', but got {by!r}")
        inputs = self._check_ids(input_ids, attention_mask)
        vm = relax.VirtualMachine(self._lib, self.device)
        seconds: dict[str, float] = {}
        started: list[float] = []

        def instrument(func, name, before_run, ret_value, *args):
            self.device.sync()
            if before_run:
                started.append(time.perf_counter())
                return 0
            seconds[str(name)] = seconds.get(str(name), 0.0) + time.perf_counter() - started.pop()
            return 0

        vm.set_instrument(instrument)
        args = [tvm.runtime.tensor(x, device=self.device) for x in inputs]
        vm["forward"](*args, *self._params)
        if by == "function":
            return dict(sorted(seconds.items(), key=lambda item: -item[1]))
        buckets = {"attention": 0.0, "matmul": 0.0, "rest": 0.0}
        for name, sec in seconds.items():
            buckets[kernel_kind(name)] += sec
        return buckets

    def embed_ids(self, input_ids, attention_mask) -> np.ndarray:
        """Embeddings ``[batch, hidden]`` of token ids padded on ``spec.padding_side``."""
        return self._run("forward", input_ids, attention_mask)

    def hidden_states(self, input_ids, attention_mask) -> np.ndarray:
        """Last hidden states ``[batch, seq, hidden]`` (rows of padding tokens are not meaningful)."""
        return self._run("hidden_states", input_ids, attention_mask)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated to the model limit (with a warning)."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.spec.path} has no tokenizer.json; use embed_ids")
        encodings = self.tokenizer.encode_batch(list(texts))
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            warnings.warn(
                f"{len(cut)} text(s) longer than the model limit of {self.spec.max_length} tokens "
                f"were truncated (indices {cut[:10]}{'...' if len(cut) > 10 else ''})",
                stacklevel=3,
            )
        return [e.ids for e in encodings]

    def embed(self, texts: list[str], batch_tokens: int = DEFAULT_BATCH_TOKENS,
              progress: bool = False) -> np.ndarray:
        """Embeddings ``[len(texts), hidden]`` float32, in input order.

        Texts are sorted by length and batched so that a batch holds at most ``batch_tokens``
        padded tokens; each batch is padded on the side the model needs.
        """
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not one string")
        texts = list(texts)
        if not texts:
            raise ValueError("embed needs at least one text")
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.zeros((len(ids), self.hidden_size), dtype="float32")
        start, done = 0, 0
        while start < len(order):
            longest = len(ids[order[start]])
            size = max(1, min(len(order) - start, batch_tokens // max(longest, 1)))
            batch = order[start:start + size]
            input_ids, mask = pad_batch([ids[i] for i in batch], self.spec.padding_side,
                                        self.pad_id)
            out[batch] = self.embed_ids(input_ids, mask)
            start += size
            done += size
            if progress:
                print(f"\r[relax-masked-attn] embedded {done}/{len(ids)} texts", end="",
                      file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return out

    @property
    def pad_id(self) -> int:
        if self.tokenizer is not None:
            for token in ("[PAD]", "<|endoftext|>", "<pad>"):
                tid = self.tokenizer.token_to_id(token)
                if tid is not None:
                    return tid
        return 0


def kernel_kind(name: str) -> str:
    """``"attention"``, ``"matmul"`` or ``"rest"``: the kind of a compiled model's function (or
    CUDA kernel) by its name."""
    if "_prefill_" in name:
        return "attention"
    return "matmul" if "matmul" in name or "dense" in name else "rest"


def pad_batch(ids: list[list[int]], side: str, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[batch, longest]`` int32 ids and attention mask, padded on ``side`` ("left"/"right")."""
    longest = max(len(x) for x in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype="int32")
    mask = np.zeros((len(ids), longest), dtype="int32")
    for row, x in enumerate(ids):
        cols = slice(longest - len(x), longest) if side == "left" else slice(0, len(x))
        input_ids[row, cols] = x
        mask[row, cols] = 1
    return input_ids, mask


def model_inputs(input_ids, attention_mask, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three int32 arguments of a compiled model's ``forward`` / ``hidden_states``:
    ``input_ids`` and ``attention_mask`` ``[batch, seq]`` and ``token_index`` ``[t]``, the flat
    indices of the mask's ones (the real tokens, which the model's layers run on).

    Every mask row must be one block of ones on the side opposite the padding (``side`` is the
    padding side: "right" means ones first); anything else is a ValueError.
    """
    mask = (np.asarray(attention_mask) != 0).astype("int32")
    steps = np.diff(mask, axis=1)
    if (steps > 0 if side == "right" else steps < 0).any():
        where = "at the start" if side == "right" else "at the end"
        raise ValueError(
            f"attention_mask rows must be one block of ones {where} ({side} padding); "
            "got a row with a gap or on the wrong side"
        )
    token_index = np.flatnonzero(mask).astype("int32")
    if token_index.size == 0:
        token_index = np.zeros(1, dtype="int32")  # no real token at all: every row embeds to padding
    return np.asarray(input_ids).astype("int32"), mask, token_index
