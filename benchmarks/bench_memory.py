"""Memory over many shapes: resident memory and throughput of all-MiniLM-L6-v2 on this CPU under
the pool policies of ``EmbeddingModel``, in one run.

    python benchmarks/bench_memory.py [--batches 60]

Each policy runs in a fresh process: the same batches of 24 rows of random lengths in 64-256
tokens (each batch a new shape), RSS after 0 / 10 / 30 / 60 batches, tokens per second over
all of them. "none" is what TVM does alone: no shape buckets, no pool limit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from relax_masked_attn.targets import default_cpu_threads, usable_cores

# TVM's CPU thread pool defaults to half the logical cores (it assumes SMT); torch uses all
# the cores this process may run on (taskset or a cpuset narrows them): give TVM the same.
default_cpu_threads()


POLICIES = {"none": None, "max_cached_shapes=8 (default)": 8, "max_cached_shapes=0": 0}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    return kb / 1024


def run_policy(limit, batches: int) -> dict:
    import numpy as np

    from relax_masked_attn import embedding
    from relax_masked_attn.demo_model import demo_model_path

    if limit is None:  # TVM alone: every call at its own shape, the pool never emptied
        embedding.bucket_inputs = lambda ids, mask, index, *_: (ids, mask, index)
        limit = 1 << 30
    model = embedding.EmbeddingModel.from_pretrained(demo_model_path(), max_cached_shapes=limit)
    rng = np.random.default_rng(0)
    marks, tokens = {0: rss_mb()}, 0
    start = time.perf_counter()
    for i in range(1, batches + 1):
        lengths = rng.integers(64, 257, 24)
        ids = [list(rng.integers(1000, 2000, n)) for n in lengths]
        input_ids, mask = embedding.pad_batch(ids, "right", model.pad_id)
        model.embed_ids(input_ids, mask)
        tokens += int(lengths.sum())
        if i in (10, 30, batches):
            marks[i] = rss_mb()
    return {"rss": marks, "tok_s": tokens / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--policy", help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args()
    if args.policy is not None:
        print(json.dumps(run_policy(POLICIES[args.policy], args.batches)))
        return
    print(f"all-MiniLM-L6-v2, {args.batches} batches of 24 rows in 64-256 tokens, "
          f"{usable_cores()} threads")
    print(f"{'policy':32} {'RSS MB after 0 / 10 / 30 / ' + str(args.batches) + ' batches':>44} "
          f"{'tok/s':>8}")
    for name in POLICIES:
        out = subprocess.run([sys.executable, __file__, "--batches", str(args.batches),
                              "--policy", name], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rss = " / ".join(f"{v:.0f}" for v in result["rss"].values())
        print(f"{name:32} {rss:>44} {result['tok_s']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
