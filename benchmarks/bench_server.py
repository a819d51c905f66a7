"""The server against offline ``encode``, in one run: tokens/s and latency at 1, 16 and 64
concurrent clients.

    python benchmarks/bench_server.py                 # all-MiniLM-L6-v2 on this CPU
    python benchmarks/bench_server.py --target cuda --texts 4096

The same texts (1-200 words, random) go through ``EmbeddingModel.encode`` in this process, then
through ``relax-masked-attn serve`` (a subprocess on a free loopback port), sent by N clients at
once (spread over ``--client-processes`` processes), each request ``--per-request`` texts, as
``encoding_format`` ``--format``. Throughput counts real tokens; the ratio is the server's over
the offline one.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

from relax_masked_attn.targets import default_cpu_threads, usable_cores

WORDS = ["the", "model", "compiles", "attention", "kernels", "for", "padded", "batches", "of",
         "text", "on", "every", "target", "with", "masks", "skipping", "work", "server"]


def texts_of(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, 201)))) for _ in range(n)]


def metrics(url: str) -> dict[str, float]:
    """The server's counters (``/metrics``), without their prefix."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {line.split()[0].removeprefix("relax_masked_attn_"): float(line.split()[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def fit(model, texts: list[str]) -> list[str]:
    """``texts`` with words dropped from the end of each that reaches the model's token limit
    (OpenAI's route refuses longer inputs rather than truncating them)."""
    fitted = []
    for text, ids in zip(texts, model.tokenize(texts)):
        words = text.split()
        while len(ids) >= model.spec.max_length:
            words = words[:-10]
            ids = model.tokenize([" ".join(words)])[0]
        fitted.append(" ".join(words))
    return fitted


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "relax_masked_attn", "serve", "--port", str(port),
           "--target", args.target, "--max-concurrent-requests", "4096",
           "--workers", str(args.workers)]
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


async def _send(url: str, requests: list[list[str]], clients: int, fmt: str):
    """(latencies, start, end) of ``requests`` sent by ``clients`` coroutines of this process."""
    import aiohttp

    latencies: list[float] = []
    pending = iter(requests)

    async def client(session):
        for batch in pending:
            start = time.perf_counter()
            body = {"input": batch, "encoding_format": fmt}
            async with session.post(url + "/v1/embeddings", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.time()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return latencies, start, time.time()


def _send_in_process(args) -> tuple[list[float], float, float]:
    return asyncio.run(_send(*args))


def load(url: str, texts: list[str], clients: int, per_request: int, fmt: str = "float",
         processes: int = 1) -> tuple[list[float], float]:
    """Latencies of every request, and the wall time, with ``clients`` senders at once spread
    over up to ``processes`` client processes (one Python process parsing HTTP for 64 clients
    would measure itself, not the server)."""
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    processes = max(1, min(processes, clients))
    if processes == 1:
        latencies, start, end = asyncio.run(_send(url, requests, clients, fmt))
        return latencies, end - start
    shares = [(url, requests[p::processes], len(range(p, clients, processes)), fmt)
              for p in range(processes)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        results = list(pool.map(_send_in_process, shares))
    latencies = [x for r in results for x in r[0]]
    return latencies, max(r[2] for r in results) - min(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo)")
    parser.add_argument("--target", default="llvm")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--workers", type=int, default=1, help="the server's front processes")
    parser.add_argument("--format", choices=["float", "base64"], default="float",
                        help="encoding_format of the requests (the openai client asks base64)")
    parser.add_argument("--client-processes", type=int, default=max(1, usable_cores() // 4),
                        help="processes the clients are spread over")
    args = parser.parse_args()
    default_cpu_threads()

    from relax_masked_attn import EmbeddingModel
    from relax_masked_attn.demo_model import demo_model_path

    model = EmbeddingModel.from_pretrained(args.model or demo_model_path(), target=args.target)
    texts = fit(model, texts_of(args.texts))
    tokens = sum(len(x) for x in model.tokenize(texts))
    model.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    model.encode(texts)
    offline = tokens / (time.perf_counter() - start)
    del model  # the server process takes the cores from here on
    print(f"{args.texts} texts ({tokens} tokens), {args.per_request} a request, {args.format}, "
          f"{args.workers} front process(es), "
          f"clients in {args.client_processes} process(es); offline encode: {offline:.0f} tok/s")
    proc, url = start_server(args)
    try:
        load(url, texts[:64], 4, args.per_request, args.format)  # warm-up
        print(f"{'clients':>8} {'tok/s':>9} {'vs offline':>10} {'p50 ms':>9} {'p99 ms':>9} "
              f"{'model busy':>10} {'texts/batch':>11}")
        for clients in (int(c) for c in args.clients.split(",")):
            before = metrics(url)
            latencies, wall = load(url, texts, clients, args.per_request, args.format,
                                   args.client_processes)
            after = metrics(url)
            p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            busy = (after["compute_seconds_sum"] - before["compute_seconds_sum"]) / wall
            batches = after["batches_total"] - before["batches_total"]
            per_batch = (after["batch_texts_sum"] - before["batch_texts_sum"]) / max(batches, 1)
            print(f"{clients:>8} {tokens / wall:>9.0f} {tokens / wall / offline:>9.2f}x "
                  f"{p50:>9.1f} {p99:>9.1f} {busy:>10.0%} {per_batch:>11.1f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


if __name__ == "__main__":
    main()
