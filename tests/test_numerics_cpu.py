"""The CPU kernel, compiled through tvm.compile, against the NumPy reference."""

import numpy as np
import pytest

from relax_masked_attn import MODES

from .conftest import (
    assert_matches_reference,
    assert_packed_matches_reference,
    check_empty_batches,
    compiled_op,
    compiled_packed,
    lengths,
    packed_inputs,
    random_qkv,
)

HEADS = [(4, 4), (4, 2), (8, 2)]  # MHA, GQA 2:1, GQA 4:1
PATTERNS = ["zero", "full", "mixed", "one_zero"]


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("heads_q,heads_kv", HEADS)
@pytest.mark.parametrize("mode", MODES)
def test_matrix(mode, heads_q, heads_kv, dtype, head_dim):
    run = compiled_op("llvm", heads_q, heads_kv, head_dim, dtype, mode)
    rng = np.random.default_rng(hash((mode, heads_q, dtype, head_dim)) % 2**32)
    # seq_q != seq_kv for the causal modes, and batch 1, on the same compiled module.
    shapes = [(3, 37, 37), (1, 20, 20)]
    if mode.startswith("causal"):
        shapes += [(3, 19, 40), (2, 33, 9)]
    for batch, seq_q, seq_kv in shapes:
        q, k, v = random_qkv(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, rng)
        for pattern in PATTERNS:
            valid_len = lengths(pattern, batch, min(seq_q, seq_kv), rng)
            out = run(q, k, v, valid_len)
            assert_matches_reference(out, q, k, v, valid_len, mode)


@pytest.mark.parametrize("mode", MODES)
def test_lengths_are_clamped(mode):
    run = compiled_op("llvm", 2, 1, 32, "float32", mode)
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(4, 12, 12, 2, 1, 32, "float32", rng)
    valid_len = np.array([-5, 13, 1000, 6], dtype="int32")
    out = run(q, k, v, valid_len)
    assert_matches_reference(out, q, k, v, valid_len, mode)
    assert (out[0] == 0).all()


def test_custom_sm_scale():
    run = compiled_op("llvm", 4, 2, 64, "float32", "padded", 0.02)
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(2, 30, 30, 4, 2, 64, "float32", rng)
    valid_len = np.array([30, 11], dtype="int32")
    assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, "padded", 0.02)


def test_one_module_many_shapes():
    """One compiled module serves every batch size and length, including long tile-crossing ones."""
    run = compiled_op("llvm", 4, 4, 64, "float32", "causal_padded_left")
    rng = np.random.default_rng(5)
    for batch, seq in [(1, 1), (5, 3), (2, 130), (7, 64), (3, 257)]:
        q, k, v = random_qkv(batch, seq, seq, 4, 4, 64, "float32", rng)
        valid_len = lengths("mixed", batch, seq, rng)
        assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, "causal_padded_left")


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16(mode):
    run = compiled_op("llvm", 4, 2, 64, "bfloat16", mode)
    rng = np.random.default_rng(8)
    for batch, seq in [(3, 40), (1, 9)]:
        q, k, v = random_qkv(batch, seq, seq, 4, 2, 64, "bfloat16", rng)
        for pattern in PATTERNS:
            valid_len = lengths(pattern, batch, seq, rng)
            assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, mode)


@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
@pytest.mark.parametrize("magnitude", [1e20, 1e28])
def test_huge_finite_scores_stay_within_the_contract(mode, magnitude):
    """Scaled scores ``sm_scale * q.k`` of up to 1e28 in magnitude (the op's documented range is
    1e29) give the float64 reference's answer, never NaN: softmax then picks the largest score."""
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(2, 24, 24, 4, 2, 32, "float32", rng)
    scale = float(magnitude / 32.0)  # scores of order magnitude * |q.k| / 32
    run = compiled_op("llvm", 4, 2, 32, "float32", mode, scale)
    valid_len = np.array([24, 13], dtype="int32")
    assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, mode, scale)


@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_every_row_and_head_is_computed_around_the_part_count(mode):
    """The kernel's parallel parts: a part a (row, head) pair below cpu.PARTS pairs (the rows
    interleaved), else PARTS parts taking pairs in bit-reversed order; padded batches and
    packed sequences on both sides of the boundary, of mixed lengths, against the reference."""
    from relax_masked_attn.kernels.cpu import PARTS

    run = compiled_op("llvm", 4, 2, 32, "float32", mode)
    rng = np.random.default_rng(17)
    for batch in (PARTS // 4 - 1, PARTS // 4, PARTS // 4 + 1, PARTS // 2 + 3):
        q, k, v = random_qkv(batch, 9, 9, 4, 2, 32, "float32", rng)
        valid_len = rng.integers(0, 10, batch).astype("int32")
        assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, mode)
    packed = compiled_packed("llvm", 4, 2, 32, "float32", mode.startswith("causal"), 9)
    for count in (PARTS // 4 - 1, PARTS // 4 + 1):
        q, k, v, seq_start = packed_inputs(rng.integers(0, 10, count), 4, 2, 32, "float32", rng,
                                           2, 3)
        assert_packed_matches_reference(packed(q, k, v, seq_start), q, k, v, seq_start,
                                        mode.startswith("causal"))


@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_empty_batches(mode):
    check_empty_batches("llvm", mode, "float32")


def test_fast_exp2_matches_numpy_on_its_domain():
    """The CPU kernel's vectorized ``2**x`` (``cpu.fast_exp2``, for ``x <= 0``) against NumPy:
    within a few float32 ulp where the result is a normal float, exactly 0 below -126.5
    (``NEG_INF`` included), exactly 1 at 0."""
    import tvm
    from tvm.script import tirx as T

    from relax_masked_attn.kernels.cpu import fast_exp2

    @T.prim_func
    def exp2_func(x: T.Buffer((4096,), "float32"), y: T.Buffer((4096,), "float32")):
        for i in T.vectorized(4096):
            y[i] = fast_exp2(x[i])

    run = tvm.compile(exp2_func, target="llvm")
    x = np.concatenate([-np.geomspace(1e-8, 126.0, 3000), -np.linspace(126.5, 1e4, 1090),
                        [0.0, -0.5, -1.0, -1e30, -np.finfo("float32").max, -126.4]])
    x = x.astype("float32")
    y = tvm.runtime.tensor(np.zeros(4096, "float32"))
    run(tvm.runtime.tensor(x), y)
    got, want = y.numpy(), np.exp2(x.astype("float64"))
    normal = x > -126
    np.testing.assert_allclose(got[normal], want[normal], rtol=4e-7, atol=0)
    assert (got[x < -126.5] == 0).all()
    assert got[x == 0][0] == 1.0
