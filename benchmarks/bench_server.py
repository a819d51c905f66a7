"""The server against offline ``encode``, in one run: tokens/s and latency at 1, 16 and 64
concurrent clients.

    python benchmarks/bench_server.py                 # all-MiniLM-L6-v2 on this CPU
    python benchmarks/bench_server.py --target cuda --texts 4096

The same texts (1-200 words, random) go through ``EmbeddingModel.encode`` in this process, then
through ``relax-masked-attn serve`` (a subprocess on a free loopback port), sent by N clients at
once, each request ``--per-request`` texts. Throughput counts real tokens; the ratio is the
server's over the offline one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

WORDS = ["the", "model", "compiles", "attention", "kernels", "for", "padded", "batches", "of",
         "text", "on", "every", "target", "with", "masks", "skipping", "work", "server"]


def texts_of(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 201)))) for _ in range(n)]


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "relax_masked_attn", "serve", "--port", str(port),
           "--target", args.target, "--max-concurrent-requests", "4096"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited while starting") from None
            time.sleep(0.5)
    raise SystemExit("the server did not start")


async def load(url: str, texts: list[str], clients: int, per_request: int):
    """Latencies of every request, and the wall time, with ``clients`` senders at once."""
    import aiohttp

    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    next_index = 0

    async def client(session):
        nonlocal next_index
        while next_index < len(requests):
            batch = requests[next_index]
            next_index += 1
            start = time.perf_counter()
            async with session.post(url + "/v1/embeddings", json={"input": batch}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo)")
    parser.add_argument("--target", default="llvm")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--clients", default="1,16,64")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

    from relax_masked_attn import EmbeddingModel
    from relax_masked_attn.demo_model import demo_model_path

    model = EmbeddingModel.from_pretrained(args.model or demo_model_path(), target=args.target)
    texts = texts_of(args.texts)
    tokens = sum(len(x) for x in model.tokenize(texts))
    model.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    model.encode(texts)
    offline = tokens / (time.perf_counter() - start)
    del model  # the server process takes the cores from here on
    print(f"{args.texts} texts ({tokens} tokens), {args.per_request} a request; "
          f"offline encode: {offline:.0f} tok/s")
    proc, url = start_server(args)
    try:
        asyncio.run(load(url, texts[:64], 4, args.per_request))  # warm-up
        print(f"{'clients':>8} {'tok/s':>9} {'vs offline':>10} {'p50 ms':>9} {'p99 ms':>9}")
        for clients in (int(c) for c in args.clients.split(",")):
            latencies, wall = asyncio.run(load(url, texts, clients, args.per_request))
            p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            print(f"{clients:>8} {tokens / wall:>9.0f} {tokens / wall / offline:>9.2f}x "
                  f"{p50:>9.1f} {p99:>9.1f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


if __name__ == "__main__":
    main()
