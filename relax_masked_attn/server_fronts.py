"""``serve --workers N``: HTTP front processes around the one process that owns the model.

One Python process parses HTTP, tokenizes and writes JSON for about a thousand requests a second;
a GPU embeds a short text in well under a microsecond of kernel time, so a single process leaves
it idle. With ``workers`` > 1 this process keeps the model and its :class:`~.server.Batcher`, and
starts N front processes (``spawn``: no TVM state is inherited) that listen on the same port
(``SO_REUSEPORT``: the kernel spreads connections over them). A front runs the same
:class:`~.server.EmbeddingServer` routes with the checkpoint's tokenizer, and sends each
request's token ids down a pipe; a thread here per front queues them on the batcher, whose
worker thread sends each request's rows back. Counters go to this process too, so ``/metrics``
answers for the whole server whichever front takes the scrape.

SIGTERM / SIGINT: the fronts stop accepting and finish what they accepted (they still reach the
model), then this process closes the batcher and returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import signal
import sys
import threading

from .server import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    Batcher,
    EmbeddingServer,
    Metrics,
    _settle,
    require_tokenizer,
)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a front needs of the model: the checkpoint (for its tokenizer and limits) and what
    ``/info`` reports."""

    path: str
    hidden_size: int
    dtype: str
    target: str


class ModelView:
    """The model as a front sees it: spec, tokenizer and the attributes the routes read."""

    def __init__(self, info: ModelInfo):
        from .checkpoint import read_spec
        from .embedding import load_tokenizer

        self.spec = read_spec(info.path)
        self.tokenizer = load_tokenizer(self.spec)
        self.prompts = self.spec.prompts
        self.hidden_size, self.dtype, self.target = info.hidden_size, info.dtype, info.target


class _Pipe:
    """One end of a front's pipe: sends from any thread, replies matched to waiting futures."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    def send(self, message) -> None:
        with self._lock:
            self.conn.send(message)

    async def ask(self, kind: str, payload=None):
        loop = asyncio.get_running_loop()
        key = next(self._ids)
        future = loop.create_future()
        self._waiting[key] = (loop, future)
        self.send((kind, key, payload))
        return await future

    def read_replies(self) -> None:
        """The front's reader thread: settle each waiting request as its reply comes."""
        while True:
            try:
                kind, key, payload = self.conn.recv()
            except (EOFError, OSError):
                error = RuntimeError("the model process is gone")
                for loop, future in self._waiting.values():
                    loop.call_soon_threadsafe(_settle, future, None, error)
                return
            loop, future = self._waiting.pop(key)
            error = RuntimeError(payload) if kind == "error" else None
            loop.call_soon_threadsafe(_settle, future, None if error else payload, error)


class RemoteBatcher:
    """A front's stand-in for :class:`~.server.Batcher`: the batching happens in the model
    process."""

    def __init__(self, pipe: _Pipe, max_batch_tokens: int):
        self.pipe, self.max_batch_tokens = pipe, max_batch_tokens
        threading.Thread(target=pipe.read_replies, name="relax-masked-attn-replies",
                         daemon=True).start()

    async def embed(self, ids: list[list[int]]):
        return await self.pipe.ask("embed", ids)

    async def metrics_text(self) -> str:
        return await self.pipe.ask("metrics")

    def close(self) -> None:
        pass


class RemoteMetrics(Metrics):
    """A front's counters: every increment goes to the model process's :class:`Metrics`."""

    def __init__(self, pipe: _Pipe):
        super().__init__()
        self.pipe = pipe

    def add(self, **increments) -> None:
        self.pipe.send(("count", -1, increments))


def _front_main(conn, info: ModelInfo, model_name: str, host: str, port: int,
                max_batch_tokens: int, options: dict) -> None:
    from aiohttp import web

    pipe = _Pipe(conn)
    server = EmbeddingServer(ModelView(info), model_name,
                             batcher=RemoteBatcher(pipe, max_batch_tokens),
                             metrics=RemoteMetrics(pipe), **options)
    web.run_app(server.app(), host=host, port=port, reuse_port=True, print=None,
                shutdown_timeout=120)


def _serve_front(conn, batcher: Batcher, metrics: Metrics) -> None:
    """This process's thread for one front: its requests onto the batcher, rows back."""
    lock = threading.Lock()

    def send(message) -> None:
        try:
            with lock:
                conn.send(message)
        except (BrokenPipeError, OSError):
            pass  # the front is gone; nothing waits for this reply

    while True:
        try:
            kind, key, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "embed":
            def done(rows, error, key=key):
                send(("result", key, rows) if error is None else ("error", key, str(error)))

            batcher.submit(payload, done)
        elif kind == "count":
            metrics.add(**payload)
        elif kind == "metrics":
            send(("metrics", key, metrics.text()))


def serve_with_fronts(model, model_name: str, host: str, port: int, workers: int,
                      max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                      max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
                      **options) -> None:
    """``serve`` with ``workers`` front processes (see the module docstring). The limit on
    requests in the server is shared out evenly among the fronts."""
    require_tokenizer(model)  # here, before any front starts and fails on it
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens, metrics)
    info = ModelInfo(str(model.spec.path), model.hidden_size, model.dtype, str(model.target))
    options["max_concurrent_requests"] = -(-max_concurrent_requests // workers)
    context = multiprocessing.get_context("spawn")
    fronts = []
    for _ in range(workers):
        mine, theirs = context.Pipe()
        front = context.Process(target=_front_main, args=(
            theirs, info, model_name, host, port, max_batch_tokens, options))
        front.start()
        theirs.close()
        threading.Thread(target=_serve_front, args=(mine, batcher, metrics), daemon=True).start()
        fronts.append(front)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"[relax-masked-attn] serving {model_name} on http://{host}:{port} "
          f"({workers} front processes)", flush=True)
    try:
        while not stop.wait(0.5):
            if any(not front.is_alive() for front in fronts):
                print("[relax-masked-attn] a front process exited; stopping", file=sys.stderr,
                      flush=True)
                break
    finally:
        for front in fronts:
            if front.is_alive():
                front.terminate()  # SIGTERM: the front finishes what it accepted
        for front in fronts:
            front.join(timeout=150)
        batcher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
