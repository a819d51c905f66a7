"""Where one short text's time goes on CUDA (BERT-base's shape, random weights).

Prints, in microseconds (median of repeated calls): ``embed_ids`` end to end; its host steps
(checking and bucketing the inputs); the VM call alone on inputs already on the GPU, as a CUDA
graph replay (``forward_graph``) and as plain ``forward``; and the GPU time of each, measured
behind a sleep kernel so that the host has queued every launch before the GPU starts.

    python benchmarks/latency_cuda.py [--arch sm_90a] [--tokens 32,128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import tvm

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import median_of, random_checkpoint  # noqa: E402

from relax_masked_attn.embedding import EmbeddingModel, bucket_inputs, pad_batch  # noqa: E402
from relax_masked_attn.targets import device_cuda_target  # noqa: E402


def median_us(fn, reps: int = 300) -> float:
    fn()  # a bucket's second call records its CUDA graph: time from the third on
    return median_of(fn, reps) * 1e6


def gpu_us(fn, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda._sleep(20_000_000)  # the host queues everything while the GPU sleeps
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--tokens", default="32,128")
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    random_checkpoint("bert-base", folder)
    target = tvm.target.Target({**dict(device_cuda_target().export()), "arch": args.arch})
    model = EmbeddingModel.from_pretrained(folder, target=target, dtype="float16")
    rng = np.random.default_rng(0)
    print(f"{torch.cuda.get_device_name()}, BERT-base fp16 built for {args.arch}; microseconds")
    for n in (int(t) for t in args.tokens.split(",")):
        ids, mask = pad_batch([list(rng.integers(1, 1000, n))], "right")
        row = {"embed_ids": median_us(lambda: model.embed_ids(ids, mask)),
               "check": median_us(lambda: model._check_ids(ids, mask))}
        checked = model._check_ids(ids, mask)
        row["bucket"] = median_us(lambda: bucket_inputs(*checked, "right", 0,
                                                        model.spec.max_length))
        inputs = [tvm.runtime.tensor(x, device=model.device)
                  for x in bucket_inputs(*checked, "right", 0, model.spec.max_length)]
        for fn in ("forward_graph", "forward"):
            f = model._vm[fn]
            row[fn] = median_us(lambda: f(*inputs, *model._params).numpy())
            row[f"{fn} GPU"] = gpu_us(lambda: f(*inputs, *model._params))
        print(f"1 text of {n:3} tokens: " + "  ".join(f"{k} {v:.0f}" for k, v in row.items()),
              flush=True)


if __name__ == "__main__":
    main()
