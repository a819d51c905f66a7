"""Dense benchmark: our nn.Linear kernels next to torch (cuBLAS; on CPU oneDNN/MKL), in one run.

    python benchmarks/bench_dense.py [--rows 8192]
    python benchmarks/bench_dense.py --device cpu --mcpu native,haswell

CPU: float32, the MiniLM and BERT-base linears, our register-blocked kernel (one build per
``--mcpu``) against ``torch.nn.functional.linear``, GFLOP/s.

Shapes are the linears of BERT-base and Qwen3-0.6B; all sides compute ``x @ w.T (+ b)`` in fp16
on the same device arrays. On an sm_90 GPU four of our kernels are timed: ``mma.sync`` (what a
plain ``sm_90`` target gets, through the pipeline and a Relax VM), and as raw kernels ``wgmma``
(``cuda_dense.wgmma_dense_kernel``, every thread copying by ``cp.async``), ``tma`` (the
warp-specialized kernel of ``kernels/cuda_tma_dense.py``, what ``sm_90a`` models get) and
``persistent`` (its persistent form: one block an SM walking the output tiles, the next tile's
first k-steps loaded during this one's epilogue). Prints TFLOP/s of each and the ratio
ours / torch.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
import tvm
from bench_kernel import median_time
from tvm import relax

from relax_masked_attn.kernels import cuda_dense, cuda_tma_dense
from relax_masked_attn.kernels.epilogue import Epilogue
from relax_masked_attn.passes.dispatch_dense import (
    HOPPER_DENSE_KERNELS,
    standalone_linear_module,
)
from relax_masked_attn.targets import device_cuda_target, usable_cores

SHAPES = [  # (n, k, bias, what)
    (768, 768, True, "BERT-base attention projections"),
    (3072, 768, True, "BERT-base intermediate"),
    (768, 3072, True, "BERT-base output"),
    (2048, 1024, False, "Qwen3-0.6B q_proj"),
    (1024, 2048, False, "Qwen3-0.6B o_proj"),
    (3072, 1024, False, "Qwen3-0.6B gate/up_proj"),
    (1024, 3072, False, "Qwen3-0.6B down_proj"),
]


SWEEP = [  # (tile_m, tile_n, tile_k, warps_m, warps_n, stages)
    (128, 128, 64, 2, 2, 3),
    (128, 128, 64, 2, 2, 4),
    (128, 128, 32, 2, 2, 4),
    (128, 128, 32, 2, 4, 4),
    (128, 256, 64, 2, 4, 3),
    (256, 128, 64, 4, 2, 3),
]


# (tile_n, stages), sm_90a only
WGMMA_SWEEP = [(128, 4), (128, 3), (128, 5), (128, 6), (256, 3), (256, 4)]
TMA_SWEEP = [(128, 4), (128, 6), (256, 3), (256, 4)]


def raw_kernel(func, target, inputs, out):
    """``func`` (a dense PrimFunc) built for ``target``, as a call on torch tensors ``inputs``
    writing ``out``."""
    kernel = tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]
    args = [tvm.runtime.from_dlpack(t) for t in (*inputs, out)]
    return lambda: kernel(*args)


def sweep(args, dev, target, tdtype) -> None:
    """Time the raw kernels under each tile configuration of SWEEP (``mma.sync``) and
    WGMMA_SWEEP (no bias), as ``--sweep`` names them."""
    configs = [(cuda_dense.dense_kernel, tiles, target) for tiles in SWEEP
               if args.sweep in ("mma", "both")]
    hopper = device_cuda_target()
    if cuda_dense.has_wgmma(hopper) and args.sweep in ("wgmma", "both"):
        configs += [(cuda_dense.wgmma_dense_kernel, tiles, hopper) for tiles in WGMMA_SWEEP]
    if cuda_dense.has_wgmma(hopper) and args.sweep in ("tma", "both"):
        configs += [(cuda_tma_dense.tma_dense_kernel, tiles, hopper) for tiles in TMA_SWEEP]
        configs += [(HOPPER_DENSE_KERNELS["persistent"], tiles, hopper)
                    for tiles in ((128, 3), (128, 4), (256, 2), (256, 3))]
        configs += [(HOPPER_DENSE_KERNELS["pingpong"], tiles, hopper)
                    for tiles in ((128, 3), (128, 4))]
    print("tile sweep (ms, raw kernel; p: persistent, pp: ping-pong):", "  ".join(
        ("p" if isinstance(c[0], functools.partial) else
         "pp" if c[0] is HOPPER_DENSE_KERNELS["pingpong"] else "") + str(c[1]) for c in configs))
    for n, k, _, what in SHAPES:
        x = torch.randn(args.rows, k, device="cuda", dtype=tdtype)
        w = torch.randn(n, k, device="cuda", dtype=tdtype) / k**0.5
        out = torch.empty(args.rows, n, device="cuda", dtype=tdtype)
        ref = torch.nn.functional.linear(x, w)
        times = []
        for make, tiles, tgt in configs:
            tile_n = tiles[1] if make is cuda_dense.dense_kernel else tiles[0]
            if n % tile_n:
                times.append("-")
                continue
            run = raw_kernel(make(n, k, args.dtype, tiles=tiles), tgt, [x, w], out)
            out.zero_()
            run()
            assert torch.allclose(out.float(), ref.float(), atol=5e-2, rtol=5e-2), tiles
            times.append(f"{median_time(run, torch.cuda.synchronize) * 1e3:.3f}")
        print(f"{n:5} {k:5} ", "  ".join(f"{t:>8}" for t in times), f" {what}", flush=True)


EPILOGUE_SHAPES = [  # (n, k, Epilogue fields, what): BERT-base's and Qwen3-0.6B's fused products
    (2304, 768, (True, None, False), "BERT-base q/k/v joined"),
    (3072, 768, (True, "gelu", False), "BERT-base intermediate + gelu"),
    (768, 3072, (True, None, True), "BERT-base output + residual"),
    (768, 768, (True, None, True), "BERT-base attention output + residual"),
    (1024, 2048, (False, None, True), "Qwen3-0.6B o_proj + residual"),
    (1024, 3072, (False, None, True), "Qwen3-0.6B down_proj + residual"),
]


def chosen(args, name: str) -> bool:
    """Whether ``--kernels`` names kernel ``name`` (every kernel without it)."""
    return args.kernels is None or name in args.kernels.split(",")


def epilogue_sweep(args, tdtype) -> None:
    """BERT's and Qwen3's fused products (bias, gelu, residual) under each Hopper dense kernel
    (raw kernels, checked against torch first), next to torch running the same steps unfused:
    where each form's epilogue costs most, and whether the ping-pong form hides it."""
    hopper = device_cuda_target()
    if not cuda_dense.has_wgmma(hopper):
        print("epilogue sweep: not a Hopper GPU")
        return
    names = [name for name in HOPPER_DENSE_KERNELS if chosen(args, name)]
    print("epilogue sweep (ms, raw kernels; torch unfused):", "  ".join(["torch", *names]))
    for n, k, fields, what in EPILOGUE_SHAPES:
        epilogue = Epilogue(*fields)
        x = torch.randn(args.rows, k, device="cuda", dtype=tdtype)
        w = torch.randn(n, k, device="cuda", dtype=tdtype) / k**0.5
        b = torch.randn(n, device="cuda", dtype=tdtype)
        r = torch.randn(args.rows, n, device="cuda", dtype=tdtype)

        def unfused():
            y = torch.nn.functional.linear(x, w, b if epilogue.bias else None)
            if epilogue.activation:
                y = torch.nn.functional.gelu(y)
            return y + r if epilogue.residual else y

        ref = unfused()
        out = torch.empty(args.rows, n, device="cuda", dtype=tdtype)
        times = [f"{median_time(unfused, torch.cuda.synchronize) * 1e3:.3f}"]
        for name in names:
            try:
                func = HOPPER_DENSE_KERNELS[name](n, k, args.dtype, epilogue)
            except ValueError:  # a form without this epilogue (TMA stores: no residual)
                times.append("-")
                continue
            run = raw_kernel(func, hopper,
                             [x, w] + ([b] if epilogue.bias else [])
                             + ([r] if epilogue.residual else []), out)
            out.zero_()
            run()
            assert torch.allclose(out.float(), ref.float(), atol=5e-2, rtol=5e-2), name
            times.append(f"{median_time(run, torch.cuda.synchronize) * 1e3:.3f}")
        print(f"{n:5} {k:5} ", "  ".join(f"{t:>8}" for t in times), f" {what}", flush=True)


CPU_SHAPES = [  # (n, k, what)
    (384, 384, "MiniLM attention projections"),
    (1536, 384, "MiniLM intermediate"),
    (384, 1536, "MiniLM output"),
    (768, 768, "BERT-base attention projections"),
    (3072, 768, "BERT-base intermediate"),
    (768, 3072, "BERT-base output"),
]


# Each blocking besides kernels/config.py's, as changes to it: the register rows follow from
# the ISA's accumulator budget and ``cols``; a task holds ``task_blocks`` register blocks of rows
# (``long_task_blocks`` at a k of ``long_k`` or more).
CPU_SWEEP = [
    {"cols": 64},  # 4 vectors a row at AVX-512
    {"task_blocks": 4},
    {"depth": 128},
    {"depth": 512},
    {"task_blocks": 16},
    {"task_cols": 512},
    {"whole_k": 768},
    {"whole_k": 1536},
    {"long_k": 2048, "long_task_blocks": 16},
    {"depth": 128, "task_blocks": 16},
    {"whole_k": 768, "task_cols": 512},
    {"blocks_outer_k": 0},  # panels outermost at every k
    {"blocks_outer_k": 1 << 30},  # register blocks outermost at every k
    {"whole_k": 0},  # k in depth-deep slices at every k
]


def sweep_tiles(base, change: dict):
    """kernels/config.py's blocking ``base`` with one CPU_SWEEP entry applied."""
    import dataclasses

    cols = change.get("cols", base.cols)
    rows = max(1, base.rows * base.cols // cols)  # the same accumulators
    fields = {key: value for key, value in change.items() if not key.endswith("blocks")}
    fields["task_rows"] = rows * change.get("task_blocks", base.task_rows // base.rows)
    if "long_task_blocks" in change:
        fields["long_task_rows"] = rows * change["long_task_blocks"]
    return dataclasses.replace(base, **{**fields, "rows": rows, "cols": cols})


def tiles_label(tiles) -> str:
    """``12x32,256,96x256``: register block, depth, task; then ``whole<=K``, ``k>=K:R``,
    ``blocks-outer<=K`` where set."""
    label = f"{tiles.rows}x{tiles.cols},{tiles.depth},{tiles.task_rows}x{tiles.task_cols}"
    if tiles.whole_k:
        label += f",whole<={tiles.whole_k}"
    if tiles.long_k:
        label += f",k>={tiles.long_k}:{tiles.long_task_rows}"
    if tiles.blocks_outer_k:
        label += f",blocks-outer<={tiles.blocks_outer_k}"
    return label


def cpu_sweep(args) -> None:
    """The raw CPU kernel (weight packed outside the timing) under kernels/config.py's blocking
    ([0]) and the CPU_SWEEP entries ``--blockings`` names, for each ``--mcpu`` build, GFLOP/s,
    with torch's ``linear`` first. Each shape times every kernel once a round, ``--rounds``
    rounds, and prints the median: a noisy VM moves all of a round together."""
    import numpy as np
    from bench_models import cpu_target

    from relax_masked_attn.kernels import cpu_dense

    torch.set_num_threads(usable_cores())
    chosen = (range(len(CPU_SWEEP)) if args.blockings is None
              else [int(i) - 1 for i in args.blockings.split(",")])
    for target, label in (cpu_target(m) for m in args.mcpu.split(",")):
        base = cpu_dense.tiles_for(target)
        configs = {0: base, **{i + 1: sweep_tiles(base, CPU_SWEEP[i]) for i in chosen}}
        print(f"{label}, {usable_cores()} threads, median of {args.rounds} rounds: GFLOP/s of "
              "torch, then per blocking:")
        for i, tiles in configs.items():
            print(f"  [{i}] {tiles_label(tiles)}")
        print("    n     k   torch", "".join(f"{f'[{i}]':>7}" for i in configs))
        rng = np.random.default_rng(0)
        for n, k, what in CPU_SHAPES:
            x = rng.standard_normal((args.rows, k)).astype("float32")
            w = (rng.standard_normal((n, k)) / k**0.5).astype("float32")
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            runs = {"torch": lambda: torch.nn.functional.linear(xt, wt)}
            for i, tiles in configs.items():
                if n % tiles.cols:
                    continue
                func = cpu_dense.dense_kernel(n, k, "float32", Epilogue(), tiles)
                kernel = tvm.compile(tvm.IRModule({"main": func}), target=target)["main"]
                wp = np.ascontiguousarray(w.reshape(n // tiles.cols, tiles.cols, k)
                                          .transpose(0, 2, 1))
                targs = [tvm.runtime.tensor(a) for a in (x, wp, np.empty((args.rows, n),
                                                                          "float32"))]
                kernel(*targs)
                assert np.abs(targs[2].numpy() - x @ w.T).max() < 1e-3
                runs[i] = functools.partial(kernel, *targs)
            times = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    times[name].append(median_time(run, lambda: None))
            cells = [f"{2.0 * args.rows * n * k / statistics.median(times[name]) / 1e9:.0f}"
                     if name in times else "-" for name in ["torch", *configs]]
            print(f"{n:5} {k:5} ", "".join(f"{c:>7}" for c in cells), f" {what}", flush=True)


def bench_cpu(args) -> None:
    """float32 on the CPU: our dense kernel for each ``--mcpu`` build (the weight prepacked once,
    as the models run it) next to ``torch.nn.functional.linear`` (oneDNN / MKL), GFLOP/s."""
    import numpy as np
    from bench_models import cpu_name, cpu_target

    torch.set_num_threads(usable_cores())
    builds = [cpu_target(m) for m in args.mcpu.split(",")]
    cpu = cpu_name()
    print(f"CPU: {cpu}, {usable_cores()} threads, float32, {args.rows} rows; GFLOP/s, "
          "ratio = torch time / ours")
    print(f"{'n':>5} {'k':>5} {'torch':>7}", *(f"{label:>34} {'ratio':>6}" for _, label in builds),
          " what")
    rng = np.random.default_rng(0)
    rows = {}
    for n, k, what in CPU_SHAPES:
        x = rng.standard_normal((args.rows, k)).astype("float32")
        w = (rng.standard_normal((n, k)) / k**0.5).astype("float32")
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        t_torch = median_time(lambda: torch.nn.functional.linear(tx, tw), lambda: None)
        flops = 2.0 * args.rows * n * k
        cells = []
        rows[f"{n} x {k}\n{what}"] = {"torch linear": flops / t_torch / 1e9}
        for target, label in builds:
            mod = standalone_linear_module(n, k, "float32", rank=2)
            mod["main"] = mod["main"].with_attr("num_input", 1)
            pipeline = relax.get_pipeline("relax_masked_attn", prepack_weights=True)
            vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=pipeline),
                                      tvm.cpu())
            params = vm["transform_params"]([tvm.runtime.tensor(w)])
            tx_tvm = tvm.runtime.tensor(x)
            run = vm["main"]
            err = np.abs(run(tx_tvm, *params).numpy() - x @ w.T).max()
            assert err < 1e-3, err
            t_ours = median_time(lambda: run(tx_tvm, *params), lambda: None)
            cells.append(f"{flops / t_ours / 1e9:34.1f} {t_torch / t_ours:5.2f}x")
            rows[f"{n} x {k}\n{what}"][label] = flops / t_ours / 1e9
        print(f"{n:5} {k:5} {flops / t_torch / 1e9:7.1f}", *cells, f" {what}", flush=True)
    if args.plot:
        from bench_models import plot

        plot(rows, args.plot, f"nn.Linear on {cpu}, {usable_cores()} threads, float32, "
             f"{args.rows} rows", "GFLOP/s (higher is better)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--mcpu", default="native",
                        help="CPU: our builds, comma-separated (native, haswell, ...)")
    parser.add_argument("--rows", type=int, default=8192, help="rows of x (tokens)")
    parser.add_argument("--plot", metavar="FILE.png", help="CPU: draw the table as a chart")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--sweep", choices=["mma", "wgmma", "tma", "both"],
                        help="also time the tile configurations of these kernels (CPU: "
                        "only the blockings of CPU_SWEEP, any value)")
    parser.add_argument("--blockings", help="CPU sweep: which CPU_SWEEP entries, 1-based, "
                        "comma-separated (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="CPU sweep: rounds to take the "
                        "median of")
    parser.add_argument("--epilogue-sweep", action="store_true",
                        help="only time BERT's fused epilogues under each Hopper dense kernel")
    parser.add_argument("--kernels", help="CUDA: which kernels, comma-separated (mma.sync and "
                        f"the Hopper ones: {', '.join(HOPPER_DENSE_KERNELS)}; default: all)")
    args = parser.parse_args()
    if args.device == "cpu":
        cpu_sweep(args) if args.sweep else bench_cpu(args)
        return
    if args.epilogue_sweep:
        epilogue_sweep(args, getattr(torch, args.dtype))
        return
    dev = tvm.cuda(0)
    target = tvm.target.Target.from_device(dev)
    targets = {"mma.sync": target}
    hopper = device_cuda_target()
    if cuda_dense.has_wgmma(hopper):
        targets.update(dict.fromkeys(HOPPER_DENSE_KERNELS, hopper))
    targets = {name: tgt for name, tgt in targets.items() if chosen(args, name)}
    tdtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {args.rows} rows; TFLOP/s, ratio = "
          "torch time / ours")
    print(f"{'n':>5} {'k':>5} {'bias':>5} {'torch ms':>9} {'torch':>6}",
          *(f"{name + ' ms':>12} {name:>9} {'ratio':>6}" for name in targets), " what")
    for n, k, bias, what in SHAPES:
        x = torch.randn(args.rows, k, device="cuda", dtype=tdtype)
        w = torch.randn(n, k, device="cuda", dtype=tdtype) / k**0.5
        b = torch.randn(n, device="cuda", dtype=tdtype) if bias else None
        tvm_args = [tvm.runtime.from_dlpack(t) for t in (x, w, b) if t is not None]
        ref = torch.nn.functional.linear(x, w, b)
        sync = torch.cuda.synchronize
        t_torch = median_time(lambda: torch.nn.functional.linear(x, w, b), sync)
        flops = 2.0 * args.rows * n * k
        cells, errors = [], []
        for name, tgt in targets.items():
            if name in HOPPER_DENSE_KERNELS:
                out = torch.empty(args.rows, n, device="cuda", dtype=tdtype)
                run = raw_kernel(HOPPER_DENSE_KERNELS[name](n, k, args.dtype, Epilogue(bias)),
                                 tgt, [t for t in (x, w, b) if t is not None], out)
                run()
            else:
                ex = tvm.compile(standalone_linear_module(n, k, args.dtype, bias, rank=2),
                                 target=tgt, relax_pipeline=relax.get_pipeline("relax_masked_attn"))
                vm_main = relax.VirtualMachine(ex, dev)["main"]
                out = torch.from_dlpack(vm_main(*tvm_args))
                run = lambda: vm_main(*tvm_args)  # noqa: E731 (timed below like the raw kernel)
            errors.append((out.float() - ref.float()).abs().max().item())
            t_ours = median_time(run, sync)
            cells.append(f"{t_ours * 1e3:12.3f} {flops / t_ours / 1e12:9.1f} "
                         f"{t_torch / t_ours:5.2f}x")
        print(f"{n:5} {k:5} {str(bias):>5} {t_torch * 1e3:9.3f} {flops / t_torch / 1e12:6.1f}",
              *cells, f" {what} (max err {', '.join(f'{e:.2g}' for e in errors)})", flush=True)
    if args.sweep:
        sweep(args, dev, target, tdtype)


if __name__ == "__main__":
    main()
