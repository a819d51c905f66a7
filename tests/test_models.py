"""Embedding models against references nobody here wrote: sentence-transformers, transformers."""

import os
import warnings

import numpy as np
import pytest
import torch
import tvm

from relax_masked_attn.embedding import EmbeddingModel, pad_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Apache TVM compiles deep learning models for CPUs and GPUs.",
    "Embedding workloads batch texts of very different lengths, " * 3,
    "word " * 300,  # past the 256-token limit: truncated, like sentence-transformers does
]


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_minilm_matches_sentence_transformers(minilm, minilm_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = minilm.embed(TEXTS)
    theirs = st.encode(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    assert (cosine(ours, theirs) >= 0.99999).all(), cosine(ours, theirs)
    assert len(minilm.tokenize([TEXTS[-1]])[0]) == 256  # the limit holds exactly


def test_over_long_text_is_truncated_with_a_warning(minilm):
    with pytest.warns(UserWarning, match="truncated"):
        minilm.embed(["word " * 1000])


def test_batch_invariance(minilm):
    """A text's embedding does not depend on its batch-mates or position."""
    alone = np.stack([minilm.embed([t])[0] for t in TEXTS[:4]])
    together = minilm.embed(TEXTS[:4][::-1])[::-1]
    small_batches = minilm.embed(TEXTS[:4], batch_tokens=16)
    np.testing.assert_allclose(together, alone, atol=2e-6)
    np.testing.assert_allclose(small_batches, alone, atol=2e-6)


def test_bad_text_input(minilm):
    with pytest.raises(ValueError, match="at least one text"):
        minilm.embed([])
    with pytest.raises(TypeError, match="list of texts"):
        minilm.embed("one string")
    with pytest.raises(ValueError, match="must lie in"):
        minilm.embed_ids(np.array([[1, 99999]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="both be"):
        minilm.embed_ids(np.ones((2, 3)), np.ones((2, 4)))


def test_compiled_model_is_cached(minilm_path, minilm, capsys):
    EmbeddingModel.from_pretrained(minilm_path, progress=True)
    assert "loading compiled model from" in capsys.readouterr().err


# --- small random checkpoints made by transformers itself ---------------------------------------


def masks(lengths, seq, side):
    _, mask = pad_batch([[1] * n for n in lengths], side)
    full = np.zeros((len(lengths), seq), dtype="int64")
    if side == "left":
        full[:, seq - mask.shape[1]:] = mask
    else:
        full[:, :mask.shape[1]] = mask
    return full


def run_both(checkpoint, lengths, seq, side, seed, **options):
    """Our compiled model (``from_pretrained`` with ``options``) and the transformers one on the
    same random batch: (ours, ids, mask, transformers' last hidden state, ours)."""
    path, hf = checkpoint
    ours = EmbeddingModel.from_pretrained(path, use_cache=False, **options)
    ids = np.random.default_rng(seed).integers(1, 120, (len(lengths), seq)).astype("int64")
    mask = masks(lengths, seq, side)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return ours, ids, mask, ref.last_hidden_state.numpy(), ours.hidden_states(ids, mask)


def test_tiny_bert_matches_transformers(tiny_bert):
    lengths = [17, 1, 9, 17]
    ours, ids, mask, ref, hidden = run_both(tiny_bert, lengths, 17, "right", seed=0)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(hidden[b, :n], ref[b, :n], atol=1e-4)
    # No sentence-transformers files: mean pooling, no normalization.
    pooled = (ref * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(ours.embed_ids(ids, mask), pooled, atol=1e-4)


def test_tiny_qwen3_matches_transformers(tiny_qwen3):
    lengths = [20, 3, 1, 12]
    ours, ids, mask, ref, hidden = run_both(tiny_qwen3, lengths, 20, "left", seed=1)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(hidden[b, 20 - n:], ref[b, 20 - n:], atol=1e-4)
    last = ref[:, -1]
    expected = last / np.linalg.norm(last, axis=-1, keepdims=True)
    np.testing.assert_allclose(ours.embed_ids(ids, mask), expected, atol=1e-4)


@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_an_empty_row_leaves_the_others_alone(which, side, request):
    """Rows are packed into real tokens only: a row without tokens must not shift the others."""
    path, _ = request.getfixturevalue(which)
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 120, (3, 11)).astype("int64")
    with_empty = ours.embed_ids(ids, masks([11, 0, 4], 11, side))
    alone = ours.embed_ids(ids[[0, 2]], masks([11, 4], 11, side))
    np.testing.assert_allclose(with_empty[[0, 2]], alone, atol=1e-5)
    assert np.isfinite(with_empty).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_model_inputs_pack_the_real_tokens(side):
    from relax_masked_attn.embedding import model_inputs

    mask = masks([3, 0, 5], 5, side)
    ids = np.arange(15).reshape(3, 5)
    _, _, token_index = model_inputs(ids, mask, side)
    np.testing.assert_array_equal(token_index, np.flatnonzero(mask))
    assert model_inputs(ids, np.zeros((3, 5)), side)[2].size == 1  # never an empty gather


@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_masks_that_are_not_one_block_are_refused(which, side, request):
    path, _ = request.getfixturevalue(which)
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    ids = np.ones((2, 6), dtype="int64")
    gap = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    wrong_side = masks([2, 6], 6, "left" if side == "right" else "right")
    for mask in (gap if side == "right" else gap[:, ::-1], wrong_side):
        with pytest.raises(ValueError, match="one block of ones"):
            ours.embed_ids(ids, mask)


def test_profile_splits_the_time(tiny_bert):
    path, _ = tiny_bert
    ours = EmbeddingModel.from_pretrained(path, use_cache=False)
    ids, mask = np.ones((2, 8), dtype="int64"), masks([8, 3], 8, "right")
    kinds = ours.profile(ids, mask)
    assert set(kinds) == {"attention", "matmul", "rest"} and kinds["attention"] > 0
    functions = ours.profile(ids, mask, by="function")
    assert any(name.startswith("zz_packed_prefill") for name in functions)
    assert list(functions.values()) == sorted(functions.values(), reverse=True)
    with pytest.raises(ValueError, match="by must be"):
        ours.profile(ids, mask, by="op")


@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_bfloat16_models_match_transformers(which, side, request):
    """bf16 weights and activations (BERT's layer norms run in float32: TVM's layer_norm has no
    bf16), on CPU, against transformers in float32: cosine >= 0.999 at every real position."""
    _, _, mask, ref, hidden = run_both(request.getfixturevalue(which), [13, 1, 6], 13, side,
                                       seed=3, dtype="bfloat16")
    real = mask == 1
    assert cosine(hidden[real], ref[real]).min() >= 0.999


# --- CUDA: code generation on any machine, numerics on a GPU -------------------------------------


@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("which", ["tiny_bert", "tiny_qwen3"])
def test_models_compile_for_cuda(which, dtype, arch, request):
    """Through our pipeline, fp16 and bf16 models compile for CUDA with our tensor-core attention
    and dense kernels in them (the default pipeline would crash in dlight's tensorize); on
    sm_90a the dense products run on wgmma (head_dim 32 keeps the mma.sync attention)."""
    import tvm
    from tvm import relax

    from relax_masked_attn.checkpoint import read_spec
    from relax_masked_attn.embedding import export

    path, _ = request.getfixturevalue(which)
    mod, _ = export(read_spec(path), dtype)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_pipeline("relax_masked_attn"))
    src = ex.mod.imports[0].imports[0].inspect_source()
    ab = "f16" if dtype == "float16" else "bf16"
    assert "zz_packed_prefill" in src and f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}" in src
    assert "zz_dense_" in src  # the 128-wide MLP projections of the tiny models
    assert (f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{ab}.{ab}" in src) is (arch == "sm_90a")


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_qwen3"])
def test_attention_reads_the_packed_tokens(which, request):
    """One packed_sequence_prefill a layer and no gather a layer: a model one layer deeper has
    exactly one more attention call and the same number of takes (the packing at the input and
    the unpacking at the output only)."""
    import dataclasses
    import re

    from relax_masked_attn.checkpoint import read_spec
    from relax_masked_attn.embedding import export

    spec = read_spec(request.getfixturevalue(which)[0])
    counts = []
    for extra in (0, 1):
        deeper = dataclasses.replace(spec, config=dataclasses.replace(
            spec.config, num_hidden_layers=spec.config.num_hidden_layers + extra))
        script = export(deeper, "float32")[0]["forward"].script()
        counts.append((script.count('Call("relax_masked_attn.packed_sequence_prefill"'),
                       len(re.findall(r"R\.take\(", script)),
                       "masked_sequence_prefill" in script))
    (calls, takes, padded), (calls_deeper, takes_deeper, _) = counts
    assert calls == spec.config.num_hidden_layers and calls_deeper == calls + 1
    assert takes_deeper == takes and not padded


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_qwen3"])
def test_graph_forward_records_every_layer_in_cuda_graphs(which, request):
    """The CUDA build's ``forward_graph``: TVM's RewriteCUDAGraph lifts every attention and
    dense launch into capture functions (run through ``vm.builtin.cuda_graph.run_or_capture``)
    keyed by the batch's symbolic shape; ``forward`` itself keeps its plain launches."""
    import re

    import tvm
    from tvm import relax

    from relax_masked_attn.checkpoint import read_spec
    from relax_masked_attn.embedding import GRAPH_FORWARD, export, with_graph_forward

    spec = read_spec(request.getfixturevalue(which)[0])
    mod = with_graph_forward(export(spec, "float16")[0], spec.max_length)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target, tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        out = relax.get_pipeline("relax_masked_attn", prepack_weights=True)(mod)
    captures = [gv.name_hint for gv in out.get_global_vars()
                if gv.name_hint.startswith(f"{GRAPH_FORWARD}_cuda_graph_capture")]
    captured = "".join(out[name].script() for name in captures)
    graph, plain = out[GRAPH_FORWARD].script(), out["forward"].script()

    def launches(script, kernel):
        return len(re.findall(rf"\bzz_{kernel}\w*\(", script))

    layers = spec.config.num_hidden_layers
    assert launches(captured, "packed_prefill") == layers
    assert launches(graph, "packed_prefill") == launches(graph, "dense") == 0
    assert launches(plain, "packed_prefill") == layers and "run_or_capture" not in plain
    assert "vm.builtin.cuda_graph.run_or_capture" in graph
    assert '"batch", "seq", "tokens"' in graph  # one graph per bucket


@pytest.mark.gpu
def test_minilm_fp16_on_cuda_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    ours = EmbeddingModel.from_pretrained(minilm_path, target="cuda", use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = ours.embed(TEXTS)
    ref = SentenceTransformer(str(minilm_path), device="cpu").encode(TEXTS)
    assert (cosine(emb, ref) >= 0.999).all(), cosine(emb, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_tiny_models_fp16_on_cuda_match_transformers(which, side, request):
    lengths = [30, 1, 17, 64]
    _, _, _, ref, hidden = run_both(request.getfixturevalue(which), lengths, 64, side, seed=2,
                                    target="cuda")
    for b, n in enumerate(lengths):
        rows = slice(64 - n, 64) if side == "left" else slice(0, n)
        assert (cosine(hidden[b, rows], ref[b, rows]) >= 0.999).all()


@pytest.mark.gpu
@pytest.mark.parametrize("which,side", [("tiny_bert", "right"), ("tiny_qwen3", "left")])
def test_cuda_graph_replays_follow_each_call_inputs(which, side, request):
    """A bucket's second call records its CUDA graph, later ones replay it: every call, graph or
    not, equals the plain ``forward`` on its own inputs, which matches transformers; a bucket
    past ``max_cached_shapes`` starts a new virtual machine whose graphs are recorded again."""
    from relax_masked_attn.embedding import GRAPH_FORWARD

    path, hf = request.getfixturevalue(which)
    ours = EmbeddingModel.from_pretrained(path, target="cuda", use_cache=False,
                                          max_cached_shapes=2)
    assert ours._graphs
    rng = np.random.default_rng(3)
    batches = []
    for lengths in ([30, 1, 17, 64], [64, 20, 2, 30], [5, 9, 64, 33]):  # one bucket
        ids = rng.integers(1, 120, (4, 64)).astype("int64")
        batches.append((ids, masks(lengths, 64, side)))
    calls = [0, 0, 1, 2, 0, 1]
    runs = [ours.embed_ids(*batches[i]) for i in calls]
    first_vm = ours._vm
    for rows, seq in ((2, 9), (1, 40)):  # the third bucket starts a new virtual machine
        ours.embed_ids(rng.integers(1, 120, (rows, seq)), np.ones((rows, seq), "int64"))
    assert ours._vm is not first_vm
    runs += [ours.embed_ids(*batches[0]), ours.embed_ids(*batches[2])]
    calls += [0, 2]
    for i, emb in zip(calls, runs):
        ids, mask = batches[i]
        ids32, mask32, index = ours._check_ids(ids, mask)
        args = [tvm.runtime.tensor(x, device=ours.device) for x in (ids32, mask32, index)]
        plain = ours._vm["forward"](*args, *ours._params).numpy().astype("float32")
        np.testing.assert_allclose(emb, plain, atol=2e-3)
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        hidden = ref.last_hidden_state.numpy()
        if side == "left":
            pooled = hidden[:, -1]
            pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
        else:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        assert (cosine(emb, pooled) >= 0.999).all(), cosine(emb, pooled)
    assert ours._vm.module.implements_function(GRAPH_FORWARD)
