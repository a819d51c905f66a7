"""Kernel benchmark: masked_sequence_prefill next to the alternatives, in one run, with ratios.

    python benchmarks/bench_kernel.py --device cpu     # ours vs torch SDPA (bool mask) vs NumPy
    python benchmarks/bench_kernel.py --device cuda    # ours vs TVM upstream vs torch SDPA
    python benchmarks/bench_kernel.py --device cuda --sweep   # tensor-core tile layouts
    python benchmarks/bench_kernel.py --device cuda --seq-sweep --plot attn.png  # vs seq length

Lengths: full (every row = seq), mixed (uniform in [seq/8, seq]), short (uniform in [1, seq/4]).
Every time is the median of several repeats of a timed loop, after a warm-up.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import tvm
from tvm import relax

import relax_masked_attn as rma
from relax_masked_attn.reference import masked_sequence_prefill as numpy_reference
from relax_masked_attn.targets import default_cpu_threads, usable_cores

# TVM's CPU thread pool defaults to half the logical cores (it assumes SMT); torch uses all
# the cores this process may run on (taskset or a cpuset narrows them): give TVM the same.
default_cpu_threads()

CPU_CONFIGS = [  # batch, seq, heads_q, heads_kv, head_dim, dtype, mode
    (32, 256, 12, 12, 32, "float32", "padded"),  # all-MiniLM-L6-v2
    (8, 512, 12, 12, 64, "float32", "padded"),
    (4, 512, 16, 8, 128, "float32", "causal_padded_left"),
]
CUDA_CONFIGS = [
    (32, 512, 12, 12, 64, "float16", "padded"),
    (16, 1024, 16, 8, 128, "float16", "causal_padded_left"),
    (4, 4096, 16, 8, 128, "bfloat16", "causal_padded_left"),
]


def draw_lengths(kind: str, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "full":
        return np.full(batch, seq, dtype="int32")
    lo, hi = (seq // 8, seq) if kind == "mixed" else (1, seq // 4)
    return rng.integers(lo, hi + 1, batch).astype("int32")


def torch_mask(valid_len: torch.Tensor, seq: int, mode: str) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask equivalent to ``mode`` for square shapes."""
    pos = torch.arange(seq, device=valid_len.device)[None, :]
    n = valid_len.long()[:, None]
    real = pos >= seq - n if mode.endswith("_left") else pos < n
    mask = real[:, :, None] & real[:, None, :]
    if mode.startswith("causal"):
        mask &= pos[:, None, :] <= pos[:, :, None]  # real blocks are aligned: col <= row
    # torch gives NaN rows where a query sees nothing; let padding queries see themselves.
    mask |= torch.eye(seq, dtype=torch.bool, device=mask.device)[None]
    return mask[:, None]


def median_time(fn, sync, repeats: int = 5, min_seconds: float = 0.2) -> float:
    fn()
    sync()
    start, loops = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / repeats or loops < 1:
        fn()
        loops += 1
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        sync()
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def useful_flops(valid_len: np.ndarray, heads_q: int, head_dim: int, mode: str) -> float:
    n = valid_len.astype("float64")
    pairs = (n * (n + 1) / 2).sum() if mode.startswith("causal") else (n * n).sum()
    return 4.0 * heads_q * head_dim * pairs


def ours(target, heads_q, heads_kv, head_dim, dtype, mode, dev):
    mod = rma.op.standalone_module(heads_q, heads_kv, head_dim, dtype, mode)
    ex = tvm.compile(mod, target=target)
    return relax.VirtualMachine(ex, dev)["main"]


def upstream(target, heads_q, heads_kv, head_dim, dtype, mode):
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_sequence_prefill_with_mask

    f = _attention_sequence_prefill_with_mask(
        heads_kv, heads_q, head_dim, dtype, target, 1 / math.sqrt(head_dim), mask_mode=mode
    )
    return tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]


def ort_attention(folder: str, head_dim: int):
    """torch's SDPA with a boolean mask, exported with ``torch.onnx.export`` into ``folder`` and
    loaded in ONNX Runtime (MatMul, Where, Softmax, MatMul) with the machine's cores; grouped
    query attention takes K and V with their heads repeated, as ONNX has no grouped form."""
    import onnxruntime as ort

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    x = torch.zeros(1, 2, 4, head_dim)
    path = os.path.join(folder, f"attention_d{head_dim}.onnx")
    axes = {0: "batch", 1: "heads", 2: "seq"}
    torch.onnx.export(Attention(), (x, x, x, torch.ones(1, 1, 4, 4, dtype=torch.bool)), path,
                      input_names=["q", "k", "v", "mask"], output_names=["out"],
                      dynamic_axes={"q": axes, "k": axes, "v": axes, "out": axes,
                                    "mask": {0: "batch", 2: "seq", 3: "seq_k"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(q, k, v, mask):
        return session.run(None, {"q": q, "k": k, "v": v, "mask": mask})[0]

    return run


def bench_cpu(args) -> None:
    """Ours for each ``--mcpu`` build (``native``: this CPU) next to torch SDPA with a boolean
    mask, ONNX Runtime running the same SDPA graph, and the NumPy reference."""
    import tempfile

    from bench_models import cpu_name, cpu_target

    torch.set_num_threads(usable_cores())
    builds = [cpu_target(m) for m in args.mcpu.split(",")]
    cpu = cpu_name()
    print(f"CPU: {cpu}; torch {torch.get_num_threads()} threads, TVM "
          f"{os.environ['TVM_NUM_THREADS']} threads")
    print(f"{'config':44} {'lengths':7} {'torch ms':>9} {'ORT ms':>9} {'numpy ms':>9}",
          *(f"{label:>30} {'vs torch':>8} {'vs ORT':>7}" for _, label in builds))
    rng = np.random.default_rng(0)
    rows = {}
    for batch, seq, hq, hkv, d, dtype, mode in CPU_CONFIGS:
        with tempfile.TemporaryDirectory() as folder:
            ort_run = ort_attention(folder, d)
        runs = [ours(target, hq, hkv, d, dtype, mode, tvm.cpu()) for target, _ in builds]
        q, k, v = (rng.standard_normal((batch, seq, h, d)).astype(dtype) for h in (hq, hkv, hkv))
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
        for kind in ("full", "mixed", "short"):
            valid_len = draw_lengths(kind, batch, seq, rng)
            tvm_args = [tvm.runtime.tensor(x) for x in (q, k, v, valid_len)]
            mask = torch_mask(torch.from_numpy(valid_len), seq, mode)
            t_torch = median_time(
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, attn_mask=mask, enable_gqa=hq != hkv
                ),
                lambda: None,
            )
            t_np = median_time(
                lambda: numpy_reference(q, k, v, valid_len, mode), lambda: None, repeats=1
            )
            heads = (qt.numpy(), *(np.repeat(x.numpy(), hq // hkv, axis=1) for x in (kt, vt)))
            ort_args = (*(np.ascontiguousarray(x) for x in heads), mask.numpy())
            t_ort = median_time(lambda: ort_run(*ort_args), lambda: None)
            cfg = f"({batch}, {seq}, {hq}/{hkv}, {d}, {mode})"
            times = {"torch SDPA": t_torch, "ONNX Runtime": t_ort}
            cells = []
            for (_, label), run in zip(builds, runs):
                t_ours = median_time(lambda: run(*tvm_args), lambda: None)  # noqa: B023
                times[label] = t_ours
                cells.append(f"{t_ours * 1e3:27.2f} ms {t_torch / t_ours:7.2f}x "
                             f"{t_ort / t_ours:6.2f}x")
            rows[f"{batch}x{seq}, d{d}\n{mode}\n{kind}"] = {k: 1 / v for k, v in times.items()}
            print(f"{cfg:44} {kind:7} {t_torch*1e3:9.2f} {t_ort*1e3:9.2f} {t_np*1e3:9.1f}",
                  *cells, flush=True)
    if args.plot:
        from bench_models import plot

        plot(rows, args.plot, f"attention on {cpu}, {usable_cores()} threads, float32",
             "calls / s (higher is better)", log=True)


def torch_time(q, k, v, valid_len, mode: str) -> float:
    """Seconds of torch SDPA with :func:`torch_mask`'s boolean mask on ``[b, s, h, d]`` CUDA
    tensors (grouped-query heads where k has fewer)."""
    mask = torch_mask(valid_len, q.shape[1], mode)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return median_time(lambda: torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]), torch.cuda.synchronize)


def upstream_time(base, tvm_args, q) -> float:
    """Seconds of :func:`upstream`'s kernel (NaN when ``base`` is None: ``--skip-upstream``) on
    ``tvm_args`` (q, k, v, valid_len), with its output and log-sum-exp buffers."""
    if base is None:
        return float("nan")
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device="cuda", dtype=q.dtype)
    args = tvm_args + [tvm.runtime.from_dlpack(out), tvm.runtime.from_dlpack(lse)]
    return median_time(lambda: base(*args), torch.cuda.synchronize, repeats=3, min_seconds=0.0)


def bench_cuda(args) -> None:
    """Ours for the device's target (``device_cuda_target``: on Hopper ``sm_90a``, the ``wgmma``
    kernel) and, on Hopper, for plain ``sm_90`` too (the ``mma.sync`` kernel, column "mma ms")."""
    from relax_masked_attn.targets import device_cuda_target

    dev = tvm.cuda(0)
    target = device_cuda_target()
    plain = tvm.target.Target.from_device(dev)
    both = str(target.attrs.get("arch")) != str(plain.attrs.get("arch"))
    print(f"CUDA: {torch.cuda.get_device_name()}, target arch {target.attrs.get('arch')}"
          + (f" (mma ms: arch {plain.attrs.get('arch')})" if both else ""))
    print(f"{'config':50} {'lengths':7} {'ours ms':>8} {'mma ms':>8} {'upstrm ms':>9} "
          f"{'torch ms':>8} {'vs upstrm':>9} {'vs torch':>8} {'TFLOP/s':>8}")
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize
    for batch, seq, hq, hkv, d, dtype, mode in CUDA_CONFIGS:
        if args.max_seq and seq > args.max_seq:
            continue
        start = time.perf_counter()
        run = ours(target, hq, hkv, d, dtype, mode, dev)
        run_mma = ours(plain, hq, hkv, d, dtype, mode, dev) if both else None
        base = upstream(plain, hq, hkv, d, dtype, mode) if not args.skip_upstream else None
        print(f"  (compiled ours and upstream in {time.perf_counter() - start:.1f} s)", flush=True)
        tdt = getattr(torch, dtype)
        q, k, v = (
            torch.randn(batch, seq, h, d, device="cuda", dtype=tdt) for h in (hq, hkv, hkv)
        )
        for kind in ("full", "mixed", "short"):
            valid_len = draw_lengths(kind, batch, seq, rng)
            vl = torch.from_numpy(valid_len).cuda()
            tvm_args = [tvm.runtime.from_dlpack(x) for x in (q, k, v, vl)]
            t_ours = median_time(lambda: run(*tvm_args), sync)
            t_mma = median_time(lambda: run_mma(*tvm_args), sync) if both else float("nan")
            t_base = upstream_time(base, tvm_args, q)
            t_torch = torch_time(q, k, v, vl, mode)
            tflops = useful_flops(valid_len, hq, d, mode) / t_ours / 1e12
            cfg = f"({batch}, {seq}, {hq}/{hkv}, {d}, {dtype}, {mode})"
            print(f"{cfg:50} {kind:7} {t_ours*1e3:8.3f} {t_mma*1e3:8.3f} {t_base*1e3:9.3f} "
                  f"{t_torch*1e3:8.3f} "
                  f"{t_base/t_ours:8.1f}x {t_torch/t_ours:7.2f}x {tflops:8.1f}", flush=True)


SEQ_SWEEP = [256, 512, 1024, 2048, 4096, 8192]  # 16384 tokens a batch at every length
SEQ_SWEEP_HEADS = (16, 8, 128, "float16", "causal_padded_left")  # Qwen3-0.6B's attention


def seq_sweep_cuda(args) -> None:
    """Useful TFLOP/s against sequence length at full lengths, 16384 tokens a batch (batch =
    16384 / seq), Qwen3-0.6B's heads, causal: ours (the device's target), ``mma.sync`` (on
    Hopper), torch SDPA with a boolean mask and upstream TVM; ``--plot`` draws it."""
    from relax_masked_attn.targets import device_cuda_target

    dev = tvm.cuda(0)
    target = device_cuda_target()
    plain = tvm.target.Target.from_device(dev)
    hq, hkv, d, dtype, mode = SEQ_SWEEP_HEADS
    tdt = getattr(torch, dtype)
    sync = torch.cuda.synchronize
    systems = {"ours": target}
    if str(target.attrs.get("arch")) != str(plain.attrs.get("arch")):
        systems["ours, mma.sync"] = plain
    runs = {name: ours(tgt, hq, hkv, d, dtype, mode, dev) for name, tgt in systems.items()}
    base = upstream(plain, hq, hkv, d, dtype, mode) if not args.skip_upstream else None
    series = {name: [] for name in [*runs, "torch SDPA + mask", "upstream TVM"]}
    print(f"CUDA: {torch.cuda.get_device_name()}; {hq}/{hkv} heads, d{d}, {dtype}, {mode}, full "
          "lengths, 16384 tokens a batch; useful TFLOP/s")
    print(f"{'seq':>6} {'batch':>5}", *(f"{name:>18}" for name in series))
    for seq in SEQ_SWEEP:
        batch = max(1, 16384 // seq)
        q, k, v = (torch.randn(batch, seq, h, d, device="cuda", dtype=tdt)
                   for h in (hq, hkv, hkv))
        valid_len = draw_lengths("full", batch, seq, np.random.default_rng(0))
        vl = torch.from_numpy(valid_len).cuda()
        flops = useful_flops(valid_len, hq, d, mode)
        tvm_args = [tvm.runtime.from_dlpack(x) for x in (q, k, v, vl)]
        for name, run in runs.items():
            series[name].append(flops / median_time(lambda: run(*tvm_args), sync) / 1e12)
        series["torch SDPA + mask"].append(flops / torch_time(q, k, v, vl, mode) / 1e12)
        series["upstream TVM"].append(flops / upstream_time(base, tvm_args, q) / 1e12)
        print(f"{seq:6} {batch:5}", *(f"{values[-1]:18.1f}" for values in series.values()),
              flush=True)
    if args.plot:
        line_plot(SEQ_SWEEP, series, args.plot,
                  f"attention on {torch.cuda.get_device_name()}: {hq}/{hkv} heads, d{d}, "
                  f"{dtype}, causal, full lengths, 16384 tokens a batch")


def line_plot(xs, series: dict[str, list[float]], filename: str, title: str) -> None:
    """One line a system: useful TFLOP/s against sequence length (log-2 x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in series.items():
        if not all(np.isnan(values)):
            ax.plot(xs, values, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("useful TFLOP/s (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    print(f"chart written to {filename}")


TC_SWEEP = [  # (warps, m16 tiles a warp, key rows a tile, Q in registers, output staged
    (4, 2, 64, False, False),  # through shared memory); see kernels/config.py
    (4, 2, 64, False, True),
    (4, 1, 64, True, False),
    (4, 1, 64, True, True),
    (4, 2, 32, False, False),
    (8, 1, 64, True, False),
    (8, 2, 32, False, False),
]


# config.WgmmaAttentionTiles: (blocks an SM, O += P V deferred, K/V stages, output staged,
# softmax overlapping O += P V[, keys a tile, K/V by TMA, warp-specialized])
WGMMA_SWEEP = [
    (2, False, 2, True, False, 64, True),  # the default: K and V by TMA
    (1, False, 2, True, False, 64, True, True),  # a producer warpgroup, consumers taking turns
    (1, False, 2, True, False, 128, True, True),  # and 128-key tiles
    (1, False, 2, True, True, 128, True, True),  # and the softmax overlap: FA3's structure
    (1, False, 2, True, True, 64, True, True),
    (2, False, 2, True, False),  # by cp.async
    (2, False, 2, True, True),
    (1, False, 2, True, True),
    (1, False, 2, True, True, 128),  # and 128-key tiles
    (1, False, 2, True, False, 128, True),
    (2, False, 2, True, True, 64, True),  # overlapped, on TMA copies
    (1, False, 2, True, True, 128, True),
    (2, False, 2, False, False),
    (1, False, 2, True, False),
]


def sweep_cuda(args) -> None:
    """Full-length CUDA configs under each tensor-core tile layout of TC_SWEEP, then on Hopper
    each wgmma layout of WGMMA_SWEEP (raw kernels, checked against the NumPy reference on a few
    rows first); with ``--layouts``, only those wgmma layouts."""
    from relax_masked_attn.kernels import cuda_mma, cuda_wgmma
    from relax_masked_attn.targets import device_cuda_target

    dev = tvm.cuda(0)
    target = tvm.target.Target.from_device(dev)
    hopper = device_cuda_target()
    chosen = None
    if args.layouts:
        picks = [int(i) for i in args.layouts.split(",")]
        if not all(0 <= i < len(WGMMA_SWEEP) for i in picks):
            raise SystemExit(f"--layouts: indices 0-{len(WGMMA_SWEEP) - 1} of WGMMA_SWEEP")
        chosen = [WGMMA_SWEEP[i] for i in picks]
    kernels = [] if chosen else [(cuda_mma.tensor_core_kernel, tiles, target)
                                 for tiles in TC_SWEEP]
    if cuda_wgmma.supports(hopper, 128, "float16"):
        kernels += [(cuda_wgmma.wgmma_attention_kernel, tiles, hopper)
                    for tiles in chosen or WGMMA_SWEEP]
    sync = torch.cuda.synchronize
    print("tile sweep, full lengths, useful TFLOP/s:",
          "  ".join(f"{'wgmma' if tgt is hopper else 'mma'}{tiles}" for _, tiles, tgt in kernels))
    for batch, seq, hq, hkv, d, dtype, mode in CUDA_CONFIGS:
        tdt = getattr(torch, dtype)
        q, k, v = (torch.randn(batch, seq, h, d, device="cuda", dtype=tdt) for h in (hq, hkv, hkv))
        out = torch.empty_like(q)
        valid_len = draw_lengths("full", batch, seq, np.random.default_rng(0))
        vl = torch.from_numpy(valid_len).cuda()
        ref = numpy_reference(*(x[:1, :256].float().cpu().numpy() for x in (q, k, v)),
                              np.minimum(valid_len[:1], 256), mode)
        cells = []
        small = [tvm.runtime.from_dlpack(x[:1, :256].contiguous()) for x in (q, k, v)]
        small_len = tvm.runtime.from_dlpack(torch.clamp(vl[:1], max=256).int())
        small_out = torch.empty_like(q[:1, :256])
        for make, tiles, tgt in kernels:
            try:
                func = make(hq, hkv, d, dtype, mode, d**-0.5, tiles=tiles)
                kernel = tvm.compile(tvm.IRModule({"main": func}), target=tgt)["main"]
                kernel(*small, small_len, tvm.runtime.from_dlpack(small_out))
            except Exception as err:  # noqa: BLE001  (a layout that does not fit: say so)
                cells.append(f"failed ({str(err).splitlines()[-1][:40]})")
                continue
            err = np.abs(small_out.float().cpu().numpy() - ref).max()
            targs = [tvm.runtime.from_dlpack(x) for x in (q, k, v, vl, out)]
            t = median_time(lambda: kernel(*targs), sync)
            tflops = useful_flops(valid_len, hq, d, mode) / t / 1e12
            cells.append(f"{tflops:6.1f}{'' if err < 5e-2 else ' WRONG'}")
        cfg = f"({batch}, {seq}, {hq}/{hkv}, {d}, {dtype}, {mode})"
        print(f"{cfg:50}", "  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mcpu", default="native",
                        help="CPU: our builds, comma-separated (native, haswell, ...)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="CPU: draw the table as a chart; CUDA with --seq-sweep: the sweep")
    parser.add_argument("--seq-sweep", action="store_true",
                        help="CUDA: useful TFLOP/s against sequence length (SEQ_SWEEP)")
    parser.add_argument("--skip-upstream", action="store_true", help="CUDA: skip the slow baseline")
    parser.add_argument("--max-seq", type=int, default=0,
                        help="CUDA: skip configs longer than this")
    parser.add_argument("--sweep", action="store_true",
                        help="CUDA: time the tensor-core tile layouts of TC_SWEEP instead")
    parser.add_argument("--layouts", default="",
                        help="CUDA, with --sweep: only these WGMMA_SWEEP lines (0-based, "
                             "comma-separated)")
    args = parser.parse_args()
    if args.device == "cuda":
        if args.seq_sweep:
            seq_sweep_cuda(args)
        else:
            sweep_cuda(args) if args.sweep else bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
