"""``EmbeddingModel``: texts in, embeddings out, through a model compiled with TVM."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from . import __version__
from .checkpoint import CheckpointError, ModelSpec, read_spec
from .kernels.geometry import GRID_BATCH_LIMIT
from .quantization import PRECISIONS, quantize_embeddings
from .targets import default_cpu_threads, device_cuda_target, host_cpu_target
from .weights import match_parameters, read_safetensors

DEFAULT_BATCH_TOKENS = 8192
DEFAULT_CACHED_SHAPES = 8  # shape buckets whose buffers the pool keeps (EmbeddingModel)
DTYPES = ("float32", "float16", "bfloat16")


def cache_dir() -> Path:
    """Where compiled models are kept: ``$RELAX_MASKED_ATTN_CACHE``, else
    ``~/.cache/relax_masked_attn``. Delete the folder to clear it."""
    env = os.environ.get("RELAX_MASKED_ATTN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relax_masked_attn"


def _stderr_log(msg: str) -> None:
    print(f"[relax-masked-attn] {msg}", file=sys.stderr)


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
    """Compile (or load from the cache) the model; returns the library and its parameters.

    A cached library ``<model_type>-<key>.so`` has its SHA-256 beside it (``.so.sha256``); an
    entry whose library does not match (truncated, bytes changed) or lacks it is compiled again,
    with a warning, instead of being loaded: loading a damaged shared object can crash the
    process.
    """
    mod, params = export(spec, dtype)
    path = cached_library_path(spec, target, dtype)
    if use_cache and path.is_file():
        lib = _load_cached(path, log)
        if lib is not None:
            return lib, params
    if log:
        log(f"compiling {spec.model_type} for {target.kind.name} ({dtype}); "
            "the compiled library is cached for the next start")
    start = time.perf_counter()
    pipeline = relax.get_pipeline("relax_masked_attn", prepack_weights=True)
    config = {}
    if target.kind.name == "cuda":
        mod = with_graph_forward(mod, spec.max_length)
        config["relax.backend.use_cuda_graph"] = True
    with tvm.transform.PassContext(config=config):
        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
    if log:
        log(f"compiled in {time.perf_counter() - start:.1f} s")
    if use_cache:
        _store_cached(ex, path)
        return tvm.runtime.load_module(str(path)), params
    return ex, params


def graph_bounds(max_seq: int) -> dict[str, int]:
    """The largest ``batch``, ``seq`` and ``tokens`` :func:`with_graph_forward`'s function runs
    at (its buffers are planned once at these sizes)."""
    return {"batch": GRAPH_BATCH, "seq": min(max_seq, GRAPH_SEQ), "tokens": GRAPH_TOKENS}


def with_graph_forward(mod: tvm.IRModule, max_seq: int) -> tvm.IRModule:
    """``mod`` plus ``forward_graph``: ``forward`` with its intermediate buffers planned at the
    fixed sizes of :func:`graph_bounds`, so that TVM's ``RewriteCUDAGraph`` (enabled by the pass
    config ``relax.backend.use_cuda_graph``) lifts its kernel launches into functions that the
    runtime records as one CUDA graph per ``(batch, seq, tokens)`` and replays afterwards. Only
    kernels that read the call's own inputs (the token gathers, the mask's sum and the pooling)
    stay outside; the encoder layers are one graph launch. See :meth:`EmbeddingModel._run` for
    when it is called."""
    bounds = graph_bounds(max_seq)
    func = relax.utils.copy_with_new_vars(mod["forward"]).with_attrs({
        "global_symbol": GRAPH_FORWARD,
        "tir_var_upper_bound": bounds,
        "relax.rewrite_cuda_graph.capture_symbolic_vars": list(bounds),
    })
    mod = mod.clone()
    mod[GRAPH_FORWARD] = func
    return mod


def cached_library_path(spec: ModelSpec, target: tvm.target.Target, dtype: str) -> Path:
    """Where the compile cache keeps the library of ``spec`` for ``target`` and ``dtype``: keyed by
    the checkpoint's config, pooling, target, dtype, this package's version and source, and TVM's
    version."""
    key = hashlib.sha256(json.dumps({
        "config": (spec.path / "config.json").read_text(),
        "pooling": [spec.pooling, spec.normalize],
        "target": str(target), "dtype": dtype, "version": __version__,
        "tvm": tvm.__version__, "source": _source_digest(),
    }, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"{spec.model_type}-{key}.so"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _store_cached(ex, path: Path) -> None:
    """Write the library and then its checksum, each atomically (a reader sees both or a
    library without a checksum, which it recompiles)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.so")
    ex.export_library(str(tmp))
    digest = _file_digest(tmp)
    tmp.replace(path)
    tmp_sum = tmp.with_suffix(".sha256")
    tmp_sum.write_text(digest + "\n")
    tmp_sum.replace(_checksum_path(path))


def _load_cached(path: Path, log=None):
    """The cached library at ``path`` if its checksum matches, else None (after a warning)."""
    expected = _checksum_path(path)
    problem = None
    if not expected.is_file():
        problem = "has no checksum beside it"
    elif expected.read_text().strip() != _file_digest(path):
        problem = "does not match its checksum (truncated or changed)"
    if problem is None:
        if log:
            log(f"loading compiled model from {path}")
        try:
            return tvm.runtime.load_module(str(path))
        except Exception as err:  # noqa: BLE001 - any failure to load means: build it again
            problem = f"could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]})"
    warnings.warn(f"the cached compiled model {path} {problem}; compiling it again",
                  stacklevel=3)
    return None


class _InputBuffer:
    """A bucket's device buffer for one int32 model input, and the values it holds: a call
    whose input equals the last one's copies nothing (a server's buckets often repeat their
    masks and token indices; each copy to a GPU costs a short text about 17 us on an H200)."""

    def __init__(self, shape: tuple[int, ...], device):
        self.tensor = tvm.runtime.empty(shape, "int32", device)
        self.values = None  # host copy of what the tensor holds

    def holding(self, x: np.ndarray):
        """The tensor, holding ``x``."""
        x = np.ascontiguousarray(x, dtype="int32")
        if self.values is None or not np.array_equal(self.values, x):
            self.tensor.copyfrom(x)
            self.values = x.copy()
        return self.tensor


class EmbeddingModel:
    """A compiled embedding model with its tokenizer.

    ``embed(texts)`` returns ``[len(texts), hidden]`` float32 embeddings in input order.

    One object may be shared by several threads: the compiled model runs one call at a time
    (a lock around the virtual machine, which keeps per-call state), tokenization runs outside
    it. Memory stays bounded over any number of input shapes: every call's shape is rounded up
    to a bucket (:func:`bucket_shape`), and the runtime's pooled allocator, which keeps the
    buffers of every shape it has seen, is emptied whenever a call brings a bucket beyond the
    ``max_cached_shapes`` most recent ones.

    On CUDA, ``embed`` of a bucket that one of those recent calls had runs as a CUDA graph
    (:func:`with_graph_forward`): recorded on that call, replayed after; the graphs go with the
    pool.
    """

    def __init__(self, spec: ModelSpec, lib, params, target, device, dtype: str, tokenizer=None,
                 max_cached_shapes: int = DEFAULT_CACHED_SHAPES):
        if max_cached_shapes < 0:
            raise ValueError(f"max_cached_shapes must be >= 0, but got {max_cached_shapes}")
        on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        if on_cpu:
            default_cpu_threads()
        # packed tokens of a call rounded up to a multiple of this (bucket_shape)
        self.token_step = CPU_TOKEN_STEP if on_cpu else TOKEN_STEP
        # rows a forward takes: the CUDA attention kernels' grid has at most this many sequences
        self.max_rows = None if on_cpu else GRID_BATCH_LIMIT
        self.spec, self.target, self.device, self.dtype = spec, target, device, dtype
        self.tokenizer = tokenizer
        self.max_cached_shapes = max_cached_shapes
        self._lib = lib
        self._vm = relax.VirtualMachine(lib, device)
        self._params = [tvm.runtime.tensor(p, device=device) for p in params]
        if self._vm.module.implements_function("transform_params"):
            # weight layouts the kernels read (prepack_weights), computed once here
            self._params = list(self._vm["transform_params"](self._params))
        self._lock = threading.Lock()
        # buckets the pool holds, oldest first, with their input buffers (None until made)
        self._shapes: dict[tuple[int, int, int], list | None] = {}
        self._graphs = self._vm.module.implements_function(GRAPH_FORWARD)

    @classmethod
    def from_pretrained(cls, path: str | Path, target: str | tvm.target.Target = "llvm",
                        dtype: str | None = None, use_cache: bool = True,
                        progress: bool = False,
                        max_cached_shapes: int = DEFAULT_CACHED_SHAPES,
                        library: str | Path | None = None) -> EmbeddingModel:
        """Load a checkpoint folder (``config.json``, ``model.safetensors``, ``tokenizer.json``)
        or a Hugging Face Hub id (``"BAAI/bge-small-en-v1.5"``, through ``huggingface_hub`` and
        its cache).

        ``dtype`` defaults to float32 on CPU and float16 on GPUs. ``library``: a library this
        package compiled for the same checkpoint, target and dtype (``relax-masked-attn compile``,
        or :func:`cached_library_path`), loaded instead of compiling (how Ray actors share the
        driver's build).
        """
        log = _stderr_log if progress else None
        spec = read_spec(path)
        tgt, dev = resolve_target(target)
        dtype = dtype or default_dtype(tgt)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, but got {dtype!r}")
        tokenizer = load_tokenizer(spec)
        if log:
            log(f"reading weights from {spec.path}")
        tensors = read_safetensors(spec.path)
        if library is not None:
            lib, named = tvm.runtime.load_module(str(library)), export(spec, dtype)[1]
        else:
            lib, named = compile_model(spec, tgt, dtype, use_cache, log)
        params = match_parameters([(n, tuple(int(d) for d in p.shape)) for n, p in named],
                                  tensors, dtype)
        return cls(spec, lib, params, tgt, dev, dtype, tokenizer, max_cached_shapes)

    @property
    def hidden_size(self) -> int:
        return self.spec.config.hidden_size

    def _run(self, fn: str, input_ids, attention_mask) -> np.ndarray:
        """``fn`` on a checked batch, run at its bucket's shape; the result cut back to it."""
        ids, mask, token_index = self._check_ids(input_ids, attention_mask)
        batch, seq = ids.shape
        if self.max_rows is not None and batch > self.max_rows:  # rows are independent
            step = self.max_rows
            input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
            return np.concatenate([self._run(fn, input_ids[i:i + step], attention_mask[i:i + step])
                                   for i in range(0, batch, step)])
        ids, mask, token_index = bucket_inputs(ids, mask, token_index, self.spec.padding_side,
                                               self.pad_id, self.spec.max_length,
                                               self.token_step)
        shape = (*ids.shape, token_index.size)
        with self._lock:
            if self._bound_pool(shape) and fn == "forward" and self._graph_fits(shape):
                fn = GRAPH_FORWARD
            if self._shapes[shape] is None:  # the bucket's input buffers, kept with it
                self._shapes[shape] = [_InputBuffer(x.shape, self.device)
                                       for x in (ids, mask, token_index)]
            args = [buf.holding(x) for buf, x in zip(self._shapes[shape],
                                                      (ids, mask, token_index))]
            out = self._vm[fn](*args, *self._params).numpy()
        out = out[:batch]
        if fn == "hidden_states":  # the bucket's extra columns sit on the padding side
            out = out[:, -seq:] if self.spec.padding_side == "left" else out[:, :seq]
        return out.astype("float32")

    def _bound_pool(self, shape: tuple[int, int, int]) -> bool:
        """Called under the lock: remember ``shape`` and say whether it was among the
        ``max_cached_shapes`` most recent ones. Past that many shapes, first drop the CUDA graphs
        (a new virtual machine: graphs live in it, one per shape), the buckets' input buffers
        and the runtime's pool of free buffers (every buffer of ours is free between calls).

        A bucket keeps its three input buffers on the device (``_shapes[shape]``,
        :class:`_InputBuffer`): allocating and freeing them in every call cost a short text on
        an H200 a third of its time (each ``cudaFree`` waits for the device)."""
        if shape in self._shapes:
            self._shapes[shape] = self._shapes.pop(shape)  # most recent last
            return True
        if len(self._shapes) >= self.max_cached_shapes:
            if self._graphs:
                self._vm = relax.VirtualMachine(self._lib, self.device)
            clear_memory_pool()
            self._shapes.clear()
        self._shapes[shape] = None
        return False

    def _graph_fits(self, shape: tuple[int, int, int]) -> bool:
        """Whether ``forward_graph`` (:func:`with_graph_forward`) can run a call of bucket
        ``shape``. It is called for a bucket seen in a recent call only: recording a graph costs
        about two plain calls, and replaying one saves the host time of every kernel launch
        (half of a short text's time on an H200)."""
        bounds = graph_bounds(self.spec.max_length)
        return self._graphs and all(n <= bounds[k] for n, k in zip(shape, ("batch", "seq",
                                                                           "tokens")))

    def _check_ids(self, input_ids, attention_mask):
        """The three model inputs of a ``[batch, seq]`` batch, after checking every value."""
        input_ids = _integer_array(input_ids, "input_ids")
        attention_mask = _integer_array(attention_mask, "attention_mask")
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
        if attention_mask.min() < 0 or attention_mask.max() > 1:  # whole numbers: 0 or 1
            bad = tuple(int(i) for i in np.argwhere((attention_mask < 0) | (attention_mask > 1))[0])
            raise ValueError(f"attention_mask values must be 0 or 1, but got "
                             f"{attention_mask[bad]} at {bad}")
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
        seconds: dict[str, float] = {}
        started: list[float] = []

        def instrument(func, name, before_run, ret_value, *args):
            self.device.sync()
            if before_run:
                started.append(time.perf_counter())
                return 0
            seconds[str(name)] = seconds.get(str(name), 0.0) + time.perf_counter() - started.pop()
            return 0

        args = [tvm.runtime.tensor(x, device=self.device) for x in inputs]
        with self._lock:
            vm = relax.VirtualMachine(self._lib, self.device)
            vm.set_instrument(instrument)
            vm["forward"](*args, *self._params)
        if by == "function":
            return dict(sorted(seconds.items(), key=lambda item: -item[1]))
        buckets = {"attention": 0.0, "matmul": 0.0, "rest": 0.0}
        for name, sec in seconds.items():
            buckets[kernel_kind(name)] += sec
        return buckets

    def embed_ids(self, input_ids, attention_mask) -> np.ndarray:
        """Embeddings ``[batch, hidden]`` of token ids padded on ``spec.padding_side``.

        ``input_ids`` integers in ``[0, vocab_size)``, ``attention_mask`` 0/1, both
        ``[batch, seq]``; a row whose mask is all 0 (no real token) embeds to a zero vector.
        On CUDA a batch of more than ``max_rows`` rows (65535: the sequences the attention
        kernels' grid takes) runs in parts of that many.
        """
        return self._run("forward", input_ids, attention_mask)

    def hidden_states(self, input_ids, attention_mask) -> np.ndarray:
        """Last hidden states ``[batch, seq, hidden]``; the rows of padding tokens are 0."""
        return self._run("hidden_states", input_ids, attention_mask)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated to the model limit (with a warning)."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.spec.path} has no tokenizer.json; use embed_ids")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a str: {text!r:.60}")
        encodings = self.tokenizer.encode_batch(texts)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            warnings.warn(
                f"{len(cut)} text(s) longer than the model limit of {self.spec.max_length} tokens "
                f"were truncated (indices {cut[:10]}{'...' if len(cut) > 10 else ''})",
                stacklevel=3,
            )
        return [e.ids for e in encodings]

    def embed(self, texts: list[str], batch_tokens: int = DEFAULT_BATCH_TOKENS,
              progress: bool = False, batch_size: int | None = None) -> np.ndarray:
        """Embeddings ``[len(texts), hidden]`` float32, in input order.

        Texts are sorted by length and batched so that a batch holds at most ``batch_tokens``
        padded tokens (and at most ``batch_size`` texts, where given); each batch is padded on
        the side the model needs. A text that tokenizes to no token at all (an empty text, with
        a tokenizer that adds no special tokens) is a ValueError naming its index.
        ``progress``: a counter on stderr, or a callable given the number of texts each batch
        finished.
        """
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts, not one string")
        texts = list(texts)
        if not texts:
            raise ValueError("embed needs at least one text")
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, but got {batch_size!r}")
        ids = self.tokenize(texts)
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"text {empty[0]} ({texts[empty[0]]!r}) has no tokens: the "
                             "tokenizer turns it into nothing, which has no embedding")
        return self.embed_tokens(ids, batch_tokens, progress, batch_size)

    def embed_tokens(self, ids: list[list[int]], batch_tokens: int = DEFAULT_BATCH_TOKENS,
                     progress=False, batch_size: int | None = None) -> np.ndarray:
        """:meth:`embed` of texts already tokenized (non-empty lists of token ids)."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.zeros((len(ids), self.hidden_size), dtype="float32")
        start, done = 0, 0
        while start < len(order):
            longest = len(ids[order[start]])
            size = max(1, min(len(order) - start, batch_tokens // max(longest, 1),
                              batch_size or len(order)))
            batch = order[start:start + size]
            input_ids, mask = pad_batch([ids[i] for i in batch], self.spec.padding_side,
                                        self.pad_id)
            out[batch] = self.embed_ids(input_ids, mask)
            start += size
            done += size
            if callable(progress):
                progress(size)
            elif progress:
                print(f"\r[relax-masked-attn] embedded {done}/{len(ids)} texts", end="",
                      file=sys.stderr, flush=True)
        if progress is True:
            print(file=sys.stderr)
        return out

    def encode(self, sentences: str | list[str], batch_size: int | None = None,
               prompt_name: str | None = None, prompt: str | None = None,
               normalize_embeddings: bool | None = None, truncate_dim: int | None = None,
               precision: str = "float32", convert_to_numpy: bool = True,
               show_progress_bar: bool | None = None):
        """Embeddings the way ``SentenceTransformer.encode`` returns them.

        One string in gives one vector ``[dim]``; a list gives ``[n, dim]`` (a list of 1-D
        arrays with ``convert_to_numpy=False``). ``prompt`` (a text put before every sentence)
        or ``prompt_name`` (one of :attr:`prompts`, from the checkpoint's
        ``config_sentence_transformers.json``); with neither, its ``default_prompt_name``.
        ``truncate_dim`` keeps the first dims (Matryoshka); ``normalize_embeddings`` then
        L2-normalizes (the model's own ``Normalize`` module, if any, always runs first).
        ``precision``: ``float32``, ``int8``, ``uint8``, ``binary`` or ``ubinary``
        (:func:`relax_masked_attn.quantization.quantize_embeddings`; int8/uint8 ranges come
        from the embeddings of this call). ``batch_size``: at most that many texts a batch
        (batches also hold at most ``DEFAULT_BATCH_TOKENS`` padded tokens).
        ``show_progress_bar``: a tqdm bar (default: for more than 256 texts on a terminal).
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"but got {precision!r}")
        if truncate_dim is not None and not (isinstance(truncate_dim, int)
                                             and 0 < truncate_dim <= self.hidden_size):
            raise ValueError(f"truncate_dim must be an int in [1, {self.hidden_size}], "
                             f"but got {truncate_dim!r}")
        text = self.resolve_prompt(prompt, prompt_name)
        if text:
            texts = [t if not isinstance(t, str) else text + t for t in texts]
        if show_progress_bar is None:
            show_progress_bar = len(texts) > 256 and sys.stderr.isatty()
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="Embedding", unit="text")
        try:
            emb = self.embed(texts, batch_size=batch_size,
                             progress=bar.update if bar is not None else False)
        finally:
            if bar is not None:
                bar.close()
        emb = quantize_embeddings(truncate_and_normalize(emb, truncate_dim,
                                                         bool(normalize_embeddings)), precision)
        if single:
            return emb[0]
        return emb if convert_to_numpy else list(emb)

    def encode_query(self, sentences, prompt_name: str | None = None, prompt: str | None = None,
                     **kwargs):
        """:meth:`encode` with the checkpoint's ``"query"`` prompt unless told otherwise (as
        ``SentenceTransformer.encode_query``)."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences, prompt_name: str | None = None,
                        prompt: str | None = None, **kwargs):
        """:meth:`encode` with the first of the ``"document"``, ``"passage"``, ``"corpus"``
        prompts the checkpoint has (as ``SentenceTransformer.encode_document``)."""
        if prompt_name is None and prompt is None:
            prompt_name = next((n for n in ("document", "passage", "corpus")
                                if n in self.prompts), None)
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    @property
    def prompts(self) -> dict[str, str]:
        """The checkpoint's named prompts (``config_sentence_transformers.json``)."""
        return self.spec.prompts

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The text put before each sentence: ``prompt``, else ``prompts[prompt_name]``, else
        the default prompt's, else None."""
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not among this model's "
                                 f"prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        if self.spec.default_prompt_name is not None:
            return self.prompts[self.spec.default_prompt_name]
        return None

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity ``[len(a), len(b)]`` of two sets of embeddings (1-D inputs count as
        one row each), as ``SentenceTransformer.similarity`` computes by default."""
        a, b = (truncate_and_normalize(np.atleast_2d(np.asarray(x, dtype=np.float32)))
                for x in (a, b))
        return a @ b.T

    @property
    def pad_id(self) -> int:
        if self.tokenizer is not None:
            for token in ("[PAD]", "<|endoftext|>", "<pad>"):
                tid = self.tokenizer.token_to_id(token)
                if tid is not None:
                    return tid
        return 0


def truncate_and_normalize(emb: np.ndarray, dims: int | None = None,
                           normalize: bool = True) -> np.ndarray:
    """``[n, d]`` embeddings cut to their first ``dims`` (Matryoshka), then L2-normalized per row
    when ``normalize`` (``x / max(||x||, 1e-12)``, torch's ``normalize``)."""
    if dims is not None:
        emb = emb[:, :dims]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def default_dtype(target: tvm.target.Target) -> str:
    """float32 on CPU (``llvm``), float16 on GPUs."""
    return "float32" if target.kind.name == "llvm" else "float16"


def load_tokenizer(spec: ModelSpec):
    """The checkpoint's ``tokenizer.json`` (no padding, truncation at the model limit), or None
    where the folder has none; a file that does not load is a CheckpointError."""
    path = spec.path / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises its own Exception
        raise CheckpointError(f"{path} is not a tokenizer the tokenizers library can load: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                              ) from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(spec.max_length)
    return tokenizer


def clear_memory_pool() -> None:
    """Free the buffers the TVM runtime keeps pooled for reuse (on every device); buffers in
    use are untouched."""
    tvm.get_global_func("vm.builtin.memory_manager.clear")()


# Shape buckets: every call runs at (batch, seq, tokens) rounded up to these, so a long-running
# process meets a bounded number of shapes and the pool reuses its buffers across calls.
SEQ_STEP = 16  # padded columns: one bucket every 16 tokens
# Packed tokens (what the layers run on), per device. On CUDA at most 63 extra rows a call, so
# that few shapes (each its own CUDA graph) cover a server's short requests. On CPU the layers'
# time follows the rows: one MiniLM text of 20 tokens ran its forward in 7.7 ms at 32 rows and
# 6.1 ms at 24 (2-core Zen 3, one run), so a CPU call rounds its tokens up to 8 only.
TOKEN_STEP = 64
CPU_TOKEN_STEP = 8

# CUDA graphs (:func:`with_graph_forward`): the bounds its buffers are planned at. BERT-base's
# take 192 MiB of GPU memory, Qwen3-0.6B's 560 MiB, allocated on the first graph call.
GRAPH_FORWARD = "forward_graph"
GRAPH_BATCH = 128
GRAPH_SEQ = 1024
GRAPH_TOKENS = 16384


def bucket_shape(batch: int, seq: int, tokens: int, max_seq: int,
                 token_step: int = TOKEN_STEP) -> tuple[int, int, int]:
    """The bucket ``(batch, seq, tokens)`` a call runs at: ``batch`` up to a power of two,
    ``seq`` up to a multiple of :data:`SEQ_STEP` (never past ``max(seq, max_seq)``), ``tokens``
    up to a multiple of ``token_step`` (:data:`TOKEN_STEP`, on CPU :data:`CPU_TOKEN_STEP`) but
    never past ``batch * seq`` of the bucket (which holds them all, and which the other two
    already fix, so no new shape comes of it: one text of 29 tokens runs 32 rows, not 64).
    Extra rows have no real token, extra columns are padding and extra packed tokens belong to
    no sequence, so none changes the result."""
    batch_b = 1 << (batch - 1).bit_length()
    seq_b = min(-(-seq // SEQ_STEP) * SEQ_STEP, max(seq, max_seq))
    return batch_b, seq_b, min(-(-max(tokens, 1) // token_step) * token_step, batch_b * seq_b)


def bucket_inputs(input_ids, mask, token_index, side: str, pad_id: int, max_seq: int,
                  token_step: int = TOKEN_STEP):
    """The model inputs of :func:`model_inputs` grown to their :func:`bucket_shape`: new rows
    empty, new columns padding on ``side``, new packed tokens pointing at token 0 (after the last
    sequence, so attention gives them no sequence)."""
    batch, seq = input_ids.shape
    batch_b, seq_b, tokens_b = bucket_shape(batch, seq, token_index.size, max_seq, token_step)
    if (batch_b, seq_b, tokens_b) == (batch, seq, token_index.size):
        return input_ids, mask, token_index
    ids = np.full((batch_b, seq_b), pad_id, dtype="int32")
    grown = np.zeros((batch_b, seq_b), dtype="int32")
    cols = slice(seq_b - seq, seq_b) if side == "left" else slice(0, seq)
    ids[:batch, cols], grown[:batch, cols] = input_ids, mask
    real = np.flatnonzero(grown)  # the same tokens, at their places in the grown batch
    index = np.zeros(tokens_b, dtype="int32")
    index[:real.size] = real
    return ids, grown, index


def _integer_array(x, name: str) -> np.ndarray:
    """``x`` as an int64 array; float values must be finite whole numbers, anything else (NaN,
    1.5, strings, objects) is a ValueError naming ``name``."""
    arr = np.asarray(x)
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype("int64")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (np.floor(arr) != arr) if arr.size else np.zeros(0, bool)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name} must hold whole numbers, but got {arr[where]} at {where}")
        return arr.astype("int64")
    raise ValueError(f"{name} must be an integer array, but got dtype {arr.dtype}")


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
        token_index = np.zeros(1, dtype="int32")  # no real token at all: every row embeds to 0
    return np.asarray(input_ids).astype("int32"), mask, token_index
