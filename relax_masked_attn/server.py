"""``relax-masked-attn serve``: an embedding server over one compiled model.

Routes (JSON in and out):

* ``POST /v1/embeddings`` - OpenAI's contract: ``input`` (a string, a list of strings, a list
  of token ids or a list of such lists), ``model`` (accepted whatever it says, echoed back),
  ``encoding_format`` (``float`` or ``base64``: little-endian float32), ``dimensions`` (the first
  dims, renormalized); errors as OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
* ``POST /embed`` - text-embeddings-inference's: ``inputs``, ``normalize`` (default true),
  ``truncate`` (default false), ``prompt_name``, ``dimensions``; returns ``[[float]]``.
* ``POST /tokenize``, ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus text).

Why aiohttp: it is the one asynchronous HTTP server among the packages this project's machines
have (no FastAPI, uvicorn or pydantic on the GPU machine, and little room to carry them), and an
event loop holds many waiting clients on one thread while one worker thread owns the model.

Batching: every request's texts are tokenized on arrival (on tokenizer threads) and queued; the
worker takes queued requests in arrival order while their texts fit ``max_batch_tokens`` padded
tokens, runs them as one length-sorted call of the model and hands each request its own rows.
At most ``max_concurrent_requests`` requests are in the server at once (over it: 429,
"overloaded").
SIGTERM stops accepting connections, lets every accepted request finish, then exits 0.
``serve(workers=N)`` puts N HTTP front processes around the model's process
(:mod:`relax_masked_attn.server_fronts`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import hmac
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .embedding import truncate_and_normalize
from .targets import usable_cores

DEFAULT_MAX_BATCH_TOKENS = 16384
DEFAULT_MAX_CLIENT_BATCH_SIZE = 512
DEFAULT_MAX_CONCURRENT_REQUESTS = 512
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


_POW10 = 10.0 ** np.arange(-64, 65)  # _POW10[64 + e] = 10 ** e
_FOUR_DIGITS = np.array([list(f"{i:04d}".encode()) for i in range(10000)], dtype=np.uint8)


def json_float_rows(rows: np.ndarray) -> list[str]:
    """Each row of a float matrix as the text of a JSON array of its float32 values.

    Every number is written as ``-d.dddddddde-dd`` (a space for the plus sign): nine significant
    digits, which parse back to the same float32 (its spacing is at least 6e-8 relative, theirs
    at most 1e-8). Built with array operations, about 5x faster than ``json.dumps`` of
    ``tolist()``, whose float64 reprs of float32 values are long; a server's float responses
    are mostly numbers. Non-finite values are refused (JSON has no NaN or infinity).
    """
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError("json_float_rows takes a 2-D array of finite values")
    n, d = x.shape
    mag = np.abs(x).astype(np.float64)
    exp = np.floor(np.log10(np.where(mag > 0, mag, 1.0))).astype(np.int64)
    mant = np.rint(mag * _POW10[72 - exp]).astype(np.int64)  # 9 digits: [1e8, 1e9)
    low, high = (mant < 10**8) & (mag > 0), mant >= 10**9  # log10 rounded, or a carry
    exp += high.astype(np.int64) - low
    redo = low | high
    if redo.any():
        mant[redo] = np.rint(mag[redo] * _POW10[72 - exp[redo]])
    out = np.empty((n, d, 16), dtype=np.uint8)
    out[..., 0] = np.where(np.signbit(x), ord("-"), ord(" "))
    out[..., 1] = mant // 10**8 + ord("0")
    out[..., 2] = ord(".")
    out[..., 3:7] = _FOUR_DIGITS[(mant // 10**4) % 10**4]
    out[..., 7:11] = _FOUR_DIGITS[mant % 10**4]
    out[..., 11] = ord("e")
    out[..., 12] = np.where(exp < 0, ord("-"), ord("+"))
    out[..., 13:15] = _FOUR_DIGITS[np.abs(exp)][..., 2:]
    out[..., 15] = ord(",")
    text = out.reshape(n, d * 16)[:, :-1]
    return ["[" + row.tobytes().decode("ascii") + "]" for row in text]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the field at fault, a message."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class _Job:
    ids: list[list[int]]
    done: Callable[[np.ndarray | None, Exception | None], None]  # called on the worker thread
    queued: float = field(default_factory=time.perf_counter)


class Metrics:
    """Counters for ``/metrics`` (Prometheus text format), updated from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values = {"requests_total": 0, "request_errors_total": 0, "tokens_total": 0,
                       "batches_total": 0, "batch_texts_sum": 0, "queue_seconds_sum": 0.0,
                       "compute_seconds_sum": 0.0}

    def add(self, **increments) -> None:
        with self._lock:
            for key, value in increments.items():
                self.values[key] += value

    def text(self) -> str:
        with self._lock:
            values = dict(self.values)
        lines = []
        for key, value in values.items():
            name = f"relax_masked_attn_{key}"
            kind = "counter"
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class Batcher:
    """One worker thread that owns the model and runs queued requests in token-budget batches."""

    def __init__(self, model, max_batch_tokens: int, metrics: Metrics):
        self.model, self.max_batch_tokens, self.metrics = model, max_batch_tokens, metrics
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: _Job | None = None  # the worker's: a job that opens the next batch
        self._thread = threading.Thread(target=self._run, name="relax-masked-attn-worker",
                                        daemon=True)
        self._thread.start()

    async def embed(self, ids: list[list[int]]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.submit(ids, lambda rows, error: loop.call_soon_threadsafe(
            _settle, future, rows, error))
        return await future

    def submit(self, ids: list[list[int]], done) -> None:
        """Queue ``ids``; ``done(rows, error)`` is called on the worker thread with its rows."""
        self._queue.put(_Job(ids, done))

    async def metrics_text(self) -> str:
        return self.metrics.text()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _take(self) -> list[_Job] | None:
        """The next batch: queued jobs in arrival order while their texts, padded to the
        longest, fit ``max_batch_tokens`` (a first job over it alone still runs); None to stop.
        A job that does not fit is held for the next batch."""
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is None:
            return None
        jobs, longest, texts = [first], max(len(x) for x in first.ids), len(first.ids)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is None:  # close(): this batch, then stop
                self._held = None
                self._queue.put(None)
                return jobs
            grown = max(longest, max(len(x) for x in job.ids))
            if grown * (texts + len(job.ids)) > self.max_batch_tokens:
                self._held = job
                return jobs
            jobs.append(job)
            longest, texts = grown, texts + len(job.ids)

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            start = time.perf_counter()
            ids = [x for job in jobs for x in job.ids]
            try:
                emb = self.model.embed_tokens(ids, batch_tokens=self.max_batch_tokens)
                error = None
            except Exception as err:  # noqa: BLE001 - handed to the waiting request
                emb, error = None, err
            done = time.perf_counter()
            self.metrics.add(batches_total=1, batch_texts_sum=len(ids),
                             compute_seconds_sum=done - start,
                             queue_seconds_sum=sum(start - job.queued for job in jobs))
            row = 0
            for job in jobs:
                job.done(None if error is not None else emb[row:row + len(job.ids)], error)
                row += len(job.ids)


def _settle(future: asyncio.Future, value, error: Exception | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def require_tokenizer(model) -> None:
    """The server takes texts: refuse a model whose checkpoint has no tokenizer.json."""
    if model.tokenizer is None:
        raise ValueError(f"{model.spec.path} has no tokenizer.json: the server takes texts")


class EmbeddingServer:
    """The aiohttp application around one ``EmbeddingModel`` (see the module docstring)."""

    def __init__(self, model, model_name: str, api_key: str | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE,
                 max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, batcher=None, metrics=None):
        """``batcher`` and ``metrics``: where requests and counts go (default: a
        :class:`Batcher` over ``model`` in this process; a front process of ``serve(workers=N)``
        passes the proxies of ``server_fronts``)."""
        require_tokenizer(model)
        self.model, self.model_name, self.api_key = model, model_name, api_key
        self.max_client_batch_size = max_client_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or Metrics()
        self.batcher = batcher or Batcher(model, max_batch_tokens, self.metrics)
        self.in_flight = 0  # touched by the event loop only
        # the model's tokenizer truncates at its limit; requests must see their full length
        self._full_length = copy.deepcopy(model.tokenizer)
        self._full_length.no_truncation()
        self._tokenizer_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, usable_cores()), thread_name_prefix="relax-masked-attn-tok")

    # --- the application ----------------------------------------------------------------

    def app(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            return await self._guard(request, handler)

        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[guard])
        app.router.add_post("/v1/embeddings", self.openai_embeddings)
        app.router.add_post("/embed", self.tei_embed)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/info", self.info)
        app.router.add_get("/metrics", self.prometheus)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        self._tokenizer_threads.shutdown()

    def _openai_route(self, request) -> bool:
        return request.path.startswith("/v1/")

    async def _guard(self, request, handler):
        """Every request: the API key, the in-flight limit, refusals as error bodies."""
        from aiohttp import web

        if request.path != "/health" and self.api_key is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return self._error(request, RequestError(
                    401, "missing or wrong API key (Authorization: Bearer <key>)", None,
                    "authentication_error"))
        if self.in_flight >= self.max_concurrent_requests:
            return self._error(request, RequestError(
                429, f"overloaded: {self.in_flight} requests in flight, the limit is "
                f"{self.max_concurrent_requests}", None, "overloaded"))
        self.in_flight += 1
        try:
            return await handler(request)
        except RequestError as err:
            return self._error(request, err)
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, RequestError(
                413, f"request body over {self.max_body_bytes} bytes", None))
        finally:
            self.in_flight -= 1

    def _error(self, request, err: RequestError):
        from aiohttp import web

        self.metrics.add(request_errors_total=1)
        if self._openai_route(request):
            body = {"error": {"message": err.message, "type": err.kind, "param": err.param,
                              "code": err.status}}
        else:  # text-embeddings-inference's error shape
            body = {"error": err.message, "error_type": err.kind}
        return web.json_response(body, status=err.status)

    # --- request parsing ------------------------------------------------------------------

    async def _json(self, request) -> dict:
        from aiohttp import web

        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(413, f"request body over {self.max_body_bytes} bytes") from None
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise RequestError(422, "the body must be a JSON object")
        return value

    async def _token_ids(self, value, field_name: str, truncate: bool) -> list[list[int]]:
        """Texts, or token ids, of an ``input`` / ``inputs`` field as checked token id lists.
        Texts are tokenized on the tokenizer threads (the tokenizer releases the GIL), not on
        the event loop."""
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list) and value and all(
                isinstance(x, int) and not isinstance(x, bool) for x in value):
            value = [value]  # one text as token ids
        if not isinstance(value, list) or not value:
            raise RequestError(422, f"'{field_name}' must be a string, a non-empty list of "
                               "strings, or token ids", field_name)
        if len(value) > self.max_client_batch_size:
            raise RequestError(413, f"'{field_name}' holds {len(value)} inputs, over the "
                               f"limit of {self.max_client_batch_size} a request", field_name)
        limit, vocab = self.model.spec.max_length, self.model.spec.config.vocab_size
        if all(isinstance(x, str) for x in value):
            ids = [e.ids for e in await self._tokenize(self._full_length, value)]
        elif all(isinstance(x, list) for x in value):
            ids = []
            for i, item in enumerate(value):
                if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                           for t in item):
                    raise RequestError(422, f"'{field_name}[{i}]' must hold token ids in "
                                       f"[0, {vocab})", f"{field_name}[{i}]")
                ids.append(list(item))
        else:
            raise RequestError(422, f"'{field_name}' must be all strings or all token id lists",
                               field_name)
        too_long = []
        for i, x in enumerate(ids):
            if not x:
                raise RequestError(422, f"'{field_name}[{i}]' has no tokens",
                                   f"{field_name}[{i}]")
            if len(x) > limit:
                if not truncate:
                    raise RequestError(413, f"'{field_name}[{i}]' has {len(x)} tokens, over the "
                                       f"model limit of {limit} (ask for truncate)",
                                       f"{field_name}[{i}]")
                too_long.append(i)
        texts = [i for i in too_long if isinstance(value[i], str)]
        # texts: the model's own truncation (it keeps the closing special token)
        cut = await self._tokenize(self.model.tokenizer, [value[i] for i in texts])
        for i, encoding in zip(texts, cut):
            ids[i] = encoding.ids
        for i in too_long:
            ids[i] = ids[i][:limit]
        return ids

    async def _tokenize(self, tokenizer, texts: list[str]) -> list:
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_threads, tokenizer.encode_batch, texts)

    def _dimensions(self, body: dict) -> int | None:
        dims = body.get("dimensions")
        hidden = self.model.hidden_size
        if dims is not None and not (isinstance(dims, int) and not isinstance(dims, bool)
                                     and 0 < dims <= hidden):
            raise RequestError(422, f"'dimensions' must be an integer in [1, {hidden}]",
                               "dimensions")
        return dims

    def _prompt(self, body: dict) -> str | None:
        name = body.get("prompt_name")
        if name is None:
            return None
        if not isinstance(name, str) or name not in self.model.prompts:
            raise RequestError(422, f"'prompt_name' must be one of {sorted(self.model.prompts)}",
                               "prompt_name")
        return self.model.prompts[name]

    async def _embed(self, ids: list[list[int]]) -> np.ndarray:
        self.metrics.add(requests_total=1, tokens_total=sum(len(x) for x in ids))
        return await self.batcher.embed(ids)

    # --- routes ---------------------------------------------------------------------------

    async def openai_embeddings(self, request):
        from aiohttp import web

        body = await self._json(request)
        if "input" not in body:
            raise RequestError(422, "'input' is required", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(422, "'encoding_format' must be 'float' or 'base64'",
                               "encoding_format")
        model = body.get("model", self.model_name)
        if not isinstance(model, str):
            raise RequestError(422, "'model' must be a string", "model")
        dims = self._dimensions(body)
        ids = await self._token_ids(body["input"], "input", truncate=False)
        emb = truncate_and_normalize(await self._embed(ids), dims)
        if fmt == "base64":
            vectors = [f'"{base64.b64encode(row.astype("<f4").tobytes()).decode()}"'
                       for row in emb]
        else:
            vectors = json_float_rows(emb)
        data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{vector}}}'
                        for i, vector in enumerate(vectors))
        tokens = sum(len(x) for x in ids)
        usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens})
        return web.Response(text=f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},'
                            f'"usage":{usage}}}', content_type="application/json")

    async def tei_embed(self, request):
        from aiohttp import web

        body = await self._json(request)
        if "inputs" not in body:
            raise RequestError(422, "'inputs' is required", "inputs")
        for flag in ("normalize", "truncate"):
            if not isinstance(body.get(flag, False), bool):
                raise RequestError(422, f"'{flag}' must be a boolean", flag)
        prompt = self._prompt(body)
        dims = self._dimensions(body)
        inputs = body["inputs"]
        if prompt and isinstance(inputs, str):
            inputs = prompt + inputs
        elif prompt and isinstance(inputs, list):
            inputs = [prompt + x if isinstance(x, str) else x for x in inputs]
        ids = await self._token_ids(inputs, "inputs", truncate=body.get("truncate", False))
        emb = truncate_and_normalize(await self._embed(ids), dims, body.get("normalize", True))
        return web.Response(text="[" + ",".join(json_float_rows(emb)) + "]",
                            content_type="application/json")

    async def tokenize(self, request):
        from aiohttp import web

        body = await self._json(request)
        inputs = body.get("inputs")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError(422, "'inputs' must be a string or a list of strings", "inputs")
        out = []
        for enc in await self._tokenize(self.model.tokenizer, texts):
            out.append([{"id": i, "text": t, "start": s, "stop": e}
                        for i, t, (s, e) in zip(enc.ids, enc.tokens, enc.offsets)])
        return web.json_response(out)

    async def health(self, _request):
        from aiohttp import web

        return web.Response(text="ok")

    async def info(self, _request):
        from aiohttp import web

        spec = self.model.spec
        return web.json_response({
            "model_id": self.model_name, "model_path": str(spec.path),
            "model_type": spec.model_type, "dimensions": self.model.hidden_size,
            "max_input_length": spec.max_length, "dtype": self.model.dtype,
            "target": str(self.model.target), "pooling": spec.pooling,
            "prompts": sorted(spec.prompts), "max_client_batch_size": self.max_client_batch_size,
            "max_batch_tokens": self.batcher.max_batch_tokens,
            "max_concurrent_requests": self.max_concurrent_requests,
        })

    async def prometheus(self, _request):
        from aiohttp import web

        return web.Response(text=await self.batcher.metrics_text(), content_type="text/plain")


def serve(model, model_name: str, host: str = "127.0.0.1", port: int = 8080, workers: int = 1,
          **options) -> None:
    """Run the server until SIGTERM or SIGINT (then finish what was accepted and return).

    ``workers`` > 1: that many HTTP front processes share the port (``SO_REUSEPORT``), each
    parsing, tokenizing and formatting, and hand token ids to this process, whose one worker
    thread batches them on the model (``relax_masked_attn.server_fronts``): one Python process
    serves about a thousand requests a second, which a GPU outruns."""
    if workers > 1:
        from .server_fronts import serve_with_fronts

        serve_with_fronts(model, model_name, host, port, workers, **options)
        return
    from aiohttp import web

    server = EmbeddingServer(model, model_name, **options)
    print(f"[relax-masked-attn] serving {model_name} on http://{host}:{port}", flush=True)
    web.run_app(server.app(), host=host, port=port, print=None, shutdown_timeout=120)
