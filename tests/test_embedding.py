"""``EmbeddingModel`` as a server uses it: shared by threads, fed empty rows, odd inputs and
many shapes, loading from a cache that may be damaged."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from relax_masked_attn import embedding
from relax_masked_attn.embedding import EmbeddingModel, bucket_inputs, model_inputs, pad_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    words = "the a cat sat on mat while compilers fuse kernels for every target fast".split()
    return [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(n)]


def test_one_model_shared_by_threads_gives_the_serial_results(minilm):
    """Four threads embedding at once through one object: no crash, the serial vectors."""
    batches = [_texts(12, seed) for seed in range(16)]
    serial = [minilm.embed(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(minilm.embed, batches))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


def _masks(lengths, seq, side):
    cols = np.arange(seq)[None, :]
    n = np.asarray(lengths)[:, None]
    return (cols >= seq - n if side == "left" else cols < n).astype("int64")


@pytest.mark.parametrize("which,side,pooling", [
    ("tiny_bert", "right", "mean"), ("tiny_bert", "right", "cls"), ("tiny_qwen3", "left", "last"),
])
def test_a_row_without_tokens_embeds_to_zero(which, side, pooling, request, tmp_path):
    """An empty row never reads another row's state (it used to copy the previous row's
    last token, or the neighbour's CLS row): its embedding and hidden states are exactly 0."""
    path = request.getfixturevalue(which)[0]
    if pooling == "cls":
        path = _with_cls_pooling(path, tmp_path)
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    assert ours.spec.pooling == pooling
    ids = np.random.default_rng(0).integers(1, 120, (4, 9))
    for lengths in ([9, 0, 4, 2], [0, 9, 0, 3], [5, 7, 9, 0]):
        mask = _masks(lengths, 9, side)
        emb, hidden = ours.embed_ids(ids, mask), ours.hidden_states(ids, mask)
        empty = [b for b, n in enumerate(lengths) if n == 0]
        assert (emb[empty] == 0).all() and (hidden[empty] == 0).all()
        assert (hidden[mask == 0] == 0).all()  # padding slots too
        full = [b for b, n in enumerate(lengths) if n]
        np.testing.assert_allclose(emb[full], ours.embed_ids(ids[full], mask[full]), atol=1e-5)
    assert (ours.embed_ids(ids[:2], np.zeros((2, 9))) == 0).all()  # no real token anywhere


def _with_cls_pooling(src, tmp_path):
    import json
    import shutil

    dst = tmp_path / "cls"
    shutil.copytree(src, dst)
    (dst / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                               "pooling_mode_mean_tokens": False}))
    return dst


@pytest.fixture(scope="module")
def bare_tokenizer_model(tiny_bert, tmp_path_factory):
    """tiny_bert with a word-level tokenizer that adds no special token ("" -> no ids)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    dst = tmp_path_factory.mktemp("bare") / "ckpt"
    shutil.copytree(tiny_bert[0], dst)
    vocab = {w: i + 1 for i, w in enumerate("alpha beta gamma delta".split())}
    vocab["[UNK]"] = 5
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    return EmbeddingModel.from_pretrained(dst, use_cache=False)


def test_a_text_without_tokens_is_refused_by_index(bare_tokenizer_model):
    with pytest.raises(ValueError, match=r"text 2 \('  '\) has no tokens"):
        bare_tokenizer_model.embed(["alpha beta", "gamma", "  ", "delta"])
    with pytest.raises(ValueError, match=r"text 0 \(''\) has no tokens"):
        bare_tokenizer_model.embed([""])


@pytest.mark.parametrize("item,kind", [(None, "NoneType"), (b"alpha", "bytes"), (3, "int")])
def test_a_text_that_is_not_a_string_is_refused_by_index(bare_tokenizer_model, item, kind):
    with pytest.raises(TypeError, match=f"text 1 is a {kind}, not a str"):
        bare_tokenizer_model.embed(["alpha", item])


@pytest.mark.parametrize("ids,mask,match", [
    ([[1.0, np.nan]], [[1, 1]], r"input_ids must hold whole numbers, but got nan at \(0, 1\)"),
    ([[1.5, 2.0]], [[1, 1]], r"input_ids must hold whole numbers, but got 1.5 at \(0, 0\)"),
    ([[1, 2]], [[1, 2]], r"attention_mask values must be 0 or 1, but got 2 at \(0, 1\)"),
    ([[1, 2]], [[1, -1]], r"attention_mask values must be 0 or 1, but got -1"),
    ([[1, 2]], [[1.0, 0.5]], "attention_mask must hold whole numbers"),
    ([["a", "b"]], [[1, 1]], "input_ids must be an integer array"),
    ([[1, 99999]], [[1, 1]], "must lie in"),
    (np.ones((2, 3)), np.ones((2, 4)), "both be"),
])
def test_bad_ids_and_masks_are_refused(bare_tokenizer_model, ids, mask, match):
    with pytest.raises(ValueError, match=match):
        bare_tokenizer_model.embed_ids(np.array(ids), np.array(mask))


def test_whole_float_ids_are_accepted(bare_tokenizer_model):
    ids = np.array([[3, 7, 9]])
    np.testing.assert_array_equal(
        bare_tokenizer_model.embed_ids(ids.astype("float64"), np.ones((1, 3), "float32")),
        bare_tokenizer_model.embed_ids(ids, np.ones((1, 3), "int64")))


@pytest.mark.parametrize("side", ["right", "left"])
def test_bucketed_inputs_hold_the_same_tokens(side):
    """The bucket's extra rows are empty, its extra columns padding, its extra packed tokens
    after the last real one."""
    lengths = [5, 0, 3]
    ids = np.arange(1, 16).reshape(3, 5)
    mask = _masks(lengths, 5, side)
    ids_b, mask_b, index_b = bucket_inputs(*model_inputs(ids, mask, side), side, 0, 512)
    assert ids_b.shape == mask_b.shape == (4, 16) and index_b.size == 64
    cols = slice(11, 16) if side == "left" else slice(0, 5)
    np.testing.assert_array_equal(mask_b[:3, cols], mask)
    assert mask_b.sum() == mask.sum()
    np.testing.assert_array_equal(ids_b.reshape(-1)[index_b[:8]], ids[mask == 1])
    assert (index_b[8:] == 0).all()


@pytest.mark.parametrize("step", [embedding.TOKEN_STEP, embedding.CPU_TOKEN_STEP])
def test_packed_tokens_never_outgrow_the_padded_bucket(step):
    """The packed-token bucket is a multiple of the step capped at the padded bucket's
    batch x seq, which holds every token: one text of 29 tokens runs 32 rows, not 64."""
    assert embedding.bucket_shape(1, 29, 29, 512, step) == (1, 32, 32)
    rng = np.random.default_rng(0)
    for _ in range(500):
        batch, seq = int(rng.integers(1, 40)), int(rng.integers(1, 600))
        tokens = int(rng.integers(1, batch * seq + 1))
        batch_b, seq_b, tokens_b = embedding.bucket_shape(batch, seq, tokens, 512, step)
        assert batch_b >= batch and seq_b >= seq and tokens <= tokens_b <= batch_b * seq_b
        assert tokens_b % step == 0 or tokens_b == batch_b * seq_b
        assert tokens_b - tokens < step


def test_a_cpu_model_runs_a_short_text_at_its_token_count_rounded_to_8(tiny_bert, monkeypatch):
    """On CPU the packed tokens round up to a multiple of 8 (the layers' time follows the rows):
    one text of 20 tokens runs 24 rows, where the CUDA step would run the 32 of its padded
    bucket; the embedding is that of the text run at its exact shape."""
    ours = EmbeddingModel.from_pretrained(tiny_bert[0], use_cache=False)
    assert ours.token_step == embedding.CPU_TOKEN_STEP == 8
    ids = np.random.default_rng(2).integers(1, 120, (1, 20))
    mask = np.ones_like(ids)
    got = ours.embed_ids(ids, mask)
    assert list(ours._shapes) == [(1, 32, 24)]
    monkeypatch.setattr(embedding, "bucket_inputs", lambda ids, mask, index, *_: (ids, mask, index))
    want = ours.embed_ids(ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_buckets_do_not_change_results(which, side, request, monkeypatch):
    """The same batch run at its exact shape and at its bucket gives the same embeddings."""
    path = request.getfixturevalue(which)[0]
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    ids = np.random.default_rng(1).integers(1, 120, (3, 13))
    batches = [(ids, _masks([13, 6, 1], 13, side)), (ids[:1, :11], _masks([11], 11, side))]
    bucketed = [(ours.embed_ids(i, m), ours.hidden_states(i, m)) for i, m in batches]
    monkeypatch.setattr(embedding, "bucket_inputs", lambda ids, mask, index, *_: (ids, mask, index))
    exact = [(ours.embed_ids(i, m), ours.hidden_states(i, m)) for i, m in batches]
    assert bucketed[0][1].shape == exact[0][1].shape == (3, 13, 64)
    for got, want in zip(bucketed, exact):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_batches_past_the_row_limit_run_in_parts(which, side, request):
    """A model whose forward takes at most ``max_rows`` rows (CUDA: the attention grid's 65535
    sequences) runs a longer batch in parts, with the embeddings and hidden states of the whole
    batch in one forward (and, for BERT, transformers' hidden states)."""
    import torch

    path, hf = request.getfixturevalue(which)
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    assert ours.max_rows is None  # a CPU model has no such limit
    rng = np.random.default_rng(7)
    ids = rng.integers(1, 120, (5, 9))
    mask = _masks([9, 4, 1, 7, 9], 9, side)
    whole = ours.embed_ids(ids, mask), ours.hidden_states(ids, mask)
    ours.max_rows = 2
    parts = ours.embed_ids(ids, mask), ours.hidden_states(ids, mask)
    for got, want in zip(parts, whole):
        np.testing.assert_allclose(got, want, atol=1e-5)
    if which == "tiny_bert":
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        np.testing.assert_allclose(parts[1], ref.last_hidden_state.numpy() * mask[..., None],
                                   atol=2e-4)


def test_calls_in_one_bucket_follow_their_own_inputs(tiny_bert):
    """A bucket keeps its input buffers and copies only the inputs that changed since its last
    call: calls that change the ids alone, the mask alone, both, or nothing each give
    transformers' last hidden states of their own inputs."""
    import torch

    path, hf = tiny_bert
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    rng = np.random.default_rng(5)
    ids_a, ids_b = rng.integers(1, 120, (2, 3, 14))
    for ids, lengths in [(ids_a, [14, 9, 3]), (ids_b, [14, 9, 3]), (ids_b, [2, 14, 11]),
                         (ids_a, [5, 1, 14]), (ids_a, [5, 1, 14]), (ids_a, [14, 9, 3])]:
        mask = _masks(lengths, 14, "right")
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        ref = ref.last_hidden_state.numpy() * mask[..., None]
        np.testing.assert_allclose(ours.hidden_states(ids, mask), ref, atol=2e-4,
                                   err_msg=f"lengths {lengths}")


def test_the_pool_is_emptied_past_the_shape_limit(tiny_bert, monkeypatch):
    """Memory stays bounded: a shape bucket beyond the last ``max_cached_shapes`` ones empties
    the runtime's pool first; repeated shapes do not."""
    ours = EmbeddingModel.from_pretrained(tiny_bert[0], use_cache=False, max_cached_shapes=2)
    clears = []
    monkeypatch.setattr(embedding, "clear_memory_pool", lambda: clears.append(1))
    ids = np.ones((1, 64), dtype="int64")
    for seq in (10, 10, 30, 10, 30, 40, 40, 10, 60):  # buckets of 16, 32, 48, 64 columns
        ours.embed_ids(ids[:, :seq], np.ones((1, seq)))
    assert len(clears) == 2  # at 40 (a third bucket) and at 60 (after 40 and 10 refilled it)
    with pytest.raises(ValueError, match="max_cached_shapes"):
        EmbeddingModel.from_pretrained(tiny_bert[0], use_cache=False, max_cached_shapes=-1)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memory_stays_bounded_over_many_shapes(minilm):
    """Forty batches of fresh shapes (each a few thousand tokens) after a warm-up grow the
    process by far less than the ~40 MB a shape the pool used to keep (1.6 GB for 40)."""
    rng = np.random.default_rng(3)

    def batch(i):
        seq = int(rng.integers(64, 256))
        ids = rng.integers(1000, 20000, (24, seq))
        lengths = rng.integers(1, seq + 1, 24)
        return ids, (np.arange(seq)[None, :] < lengths[:, None]).astype("int64")

    for i in range(20):
        minilm.embed_ids(*batch(i))
    start = _rss_mb()
    for i in range(40):
        minilm.embed_ids(*batch(i))
    assert _rss_mb() - start < 400, f"grew {_rss_mb() - start:.0f} MB over 40 shapes"


_LOAD_AND_RUN = """
import json, sys, warnings
import numpy as np
from relax_masked_attn.embedding import EmbeddingModel
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = EmbeddingModel.from_pretrained(sys.argv[1])
ids = np.random.default_rng(0).integers(1, 120, (2, 7))
print(json.dumps(model.embed_ids(ids, np.ones((2, 7))).tolist()))
for w in caught:
    print("WARNING:", w.message)
"""


def _load_and_run(path, cache):
    """A fresh process that loads the checkpoint through the cache (a damaged shared object
    used to crash the process that loads it) and embeds: (the embeddings, warnings)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "RELAX_MASKED_ATTN_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    warned = [line for line in lines[1:] if line.startswith("WARNING:")]
    return np.array(json.loads(lines[0])), warned


@pytest.fixture(scope="module")
def filled_cache(tiny_bert, tmp_path_factory):
    cache = tmp_path_factory.mktemp("filled")
    value, warned = _load_and_run(tiny_bert[0], cache)
    assert not warned
    return cache, value


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_checksum"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(tiny_bert, filled_cache, tmp_path,
                                                         damage):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(filled_cache[0], cache)
    (lib,) = cache.glob("*.so")
    good = lib.read_bytes()
    if damage == "truncate":
        lib.write_bytes(good[: len(good) // 3])
    elif damage == "flip":
        data = bytearray(good)
        for i in range(len(data) // 4, len(data) // 4 + 64):
            data[i] ^= 0xFF
        lib.write_bytes(bytes(data))
    else:
        lib.with_name(lib.name + ".sha256").unlink()
    value, warned = _load_and_run(tiny_bert[0], cache)
    np.testing.assert_allclose(value, filled_cache[1], atol=1e-6)
    assert len(warned) == 1 and "compiling it again" in warned[0], warned
    value, warned = _load_and_run(tiny_bert[0], cache)  # the rebuilt entry is sound
    assert not warned
    np.testing.assert_allclose(value, filled_cache[1], atol=1e-6)


def test_pad_batch_round_trip():
    ids, mask = pad_batch([[4, 5, 6], [7]], "left", pad_id=0)
    np.testing.assert_array_equal(ids, [[4, 5, 6], [0, 0, 7]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])


@pytest.mark.parametrize("pinned", [False, True], ids=["all-cores", "pinned-to-one-core"])
def test_cpu_models_use_every_core(tiny_bert, pinned):
    """With TVM_NUM_THREADS unset, a CPU EmbeddingModel sets it to the cores this process may run
    on before TVM's thread pool starts (which otherwise takes half the logical cores): all of
    them, or one when the process is pinned to one (as ``taskset`` or a container's cpuset do)."""
    import subprocess
    import sys

    if pinned and not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    pin = "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " if pinned else ""
    code = (f"import os, relax_masked_attn as r, sys; {pin}"
            "r.EmbeddingModel.from_pretrained(sys.argv[1], use_cache=False); "
            "print(os.environ['TVM_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_bert[0])], env=env,
                          capture_output=True, text=True, timeout=600)
    if pinned:
        cores = 1
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert proc.stdout.split() == [str(cores)], proc.stderr[-2000:]
