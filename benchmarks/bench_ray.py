"""Corpus throughput on a local Ray cluster: 1 actor against 2 actors (one thread each), one run.

    python benchmarks/bench_ray.py --texts 4000

The same Parquet corpus (1-60 words a text) through ``relax_masked_attn.ray.embed_dataset``;
the model is compiled once (the cache) before either is timed. Prints tokens/s and the
2-actor / 1-actor ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from relax_masked_attn.targets import usable_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from relax_masked_attn import EmbeddingModel
    from relax_masked_attn.demo_model import demo_model_path
    from relax_masked_attn.ray import embed_dataset

    model = str(args.model or demo_model_path())
    rng = np.random.default_rng(0)
    words = "the model compiles attention kernels for padded batches of text".split()
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 61)))) for _ in range(args.texts)]
    tokens = sum(len(x) for x in EmbeddingModel.from_pretrained(model).tokenize(texts))
    folder = tempfile.mkdtemp()
    pq.write_table(pa.table({"text": texts}), os.path.join(folder, "in.parquet"))
    ray.init(num_cpus=usable_cores(), include_dashboard=False, log_to_driver=False)
    rates = {}
    for actors in (1, 2):
        start = time.perf_counter()
        embed_dataset(os.path.join(folder, "in.parquet"), os.path.join(folder, f"out{actors}"),
                      model, actors=actors, threads_per_actor=1)
        rates[actors] = tokens / (time.perf_counter() - start)
        print(f"{actors} actor(s), 1 thread each: {rates[actors]:.0f} tok/s")
    print(f"2 actors / 1 actor: {rates[2] / rates[1]:.2f}x ({args.texts} texts, {tokens} tokens,"
          f" {usable_cores()} CPUs)")


if __name__ == "__main__":
    main()
