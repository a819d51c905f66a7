"""The ``relax-masked-attn`` command line (also ``python -m relax_masked_attn``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _target(name: str):
    import tvm

    from .legalize import host_cpu_target

    if name == "llvm":
        return host_cpu_target(), tvm.cpu()
    if name == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise SystemExit("relax-masked-attn: --target cuda, but no CUDA device is visible")
        return tvm.target.Target.from_device(dev), dev
    raise SystemExit(f"relax-masked-attn: unknown --target {name!r} (llvm or cuda)")


def demo(args: argparse.Namespace) -> int:
    """Compile one attention block with the op, run a mixed-length batch, check, time."""
    import tvm
    from tvm import relax

    from . import reference
    from .op import standalone_module

    target, dev = _target(args.target)
    dtype = "float32" if args.target == "llvm" else "float16"
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


def main(argv: list[str] | None = None) -> int:
    # TVM's CPU thread pool defaults to half the logical cores (it assumes SMT); use them all.
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))
    from . import MODES

    parser = argparse.ArgumentParser(prog="relax-masked-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="compile and check one masked attention block")
    p_demo.add_argument("--target", default="llvm", help="llvm (default) or cuda")
    p_demo.add_argument("--mode", default="padded", choices=MODES)
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
