"""The CUDA kernels on a real GPU (marked gpu; skipped where no CUDA device exists)."""

import math

import numpy as np
import pytest
import tvm

from relax_masked_attn import MODES
from relax_masked_attn.modes import is_left_padded

from .conftest import (
    assert_matches_reference,
    check_empty_batches,
    compiled_op,
    lengths,
    random_qkv,
)

pytestmark = pytest.mark.gpu
PATTERNS = ["zero", "full", "mixed", "one_zero"]


def check(mode, heads_q, heads_kv, head_dim, dtype, shapes, seed, target="cuda"):
    run = compiled_op(target, heads_q, heads_kv, head_dim, dtype, mode)
    rng = np.random.default_rng(seed)
    for batch, seq_q, seq_kv in shapes:
        q, k, v = random_qkv(batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, dtype, rng)
        for pattern in PATTERNS:
            valid_len = lengths(pattern, batch, min(seq_q, seq_kv), rng)
            assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, mode)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("mode", MODES)
def test_matrix(mode, dtype, head_dim):
    shapes = [(3, 130, 130), (1, 70, 70)]
    if mode.startswith("causal"):
        shapes += [(2, 65, 140), (2, 150, 40)]
    check(mode, 4, 2, head_dim, dtype, shapes, seed=head_dim)


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("mode", MODES)
def test_heads(mode, heads_q, heads_kv):
    check(mode, heads_q, heads_kv, 128, "float16", [(2, 100, 100)], seed=heads_kv)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_wgmma_matrix(mode, dtype, head_dim):
    """The Hopper kernel (sm_90a): every mode, GQA, the length patterns, seq_q != seq_kv."""
    shapes = [(3, 130, 130), (1, 70, 70)]
    if mode.startswith("causal"):
        shapes += [(2, 65, 140), (2, 150, 40)]
    check(mode, 4, 2, head_dim, dtype, shapes, seed=head_dim, target="cuda-sm90a")
    check(mode, 8, 8, head_dim, dtype, [(2, 100, 100)], seed=3, target="cuda-sm90a")


@pytest.mark.parametrize("target", ["cuda", "cuda-sm90a"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_awkward_lengths(mode, dtype, head_dim, target):
    """Lengths that are not multiples of the tiles: 1, 7, 127, 129, 1000 (mma.sync and wgmma)."""
    run = compiled_op(target, 8, 4, head_dim, dtype, mode)
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(5, 1000, 1000, 8, 4, head_dim, dtype, rng)
    valid_len = np.array([1, 7, 127, 129, 1000], dtype="int32")
    assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, mode)


@pytest.mark.parametrize("target", ["cuda", "cuda-sm90a"])
def test_batch_beyond_the_grid_fails_clearly(target):
    """The tensor-core kernels put batch rows on the grid's z dimension: 65535 rows run (and
    are right at both ends), 65536 stop with a message that says what to do, not a launch
    failure."""
    run = compiled_op(target, 2, 2, 64, "float16", "padded")
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(65535, 2, 2, 2, 2, 64, "float16", rng)
    valid_len = rng.integers(0, 3, size=65535).astype("int32")
    out = run(q, k, v, valid_len)
    ends = np.r_[0:50, 65485:65535]
    assert_matches_reference(out[ends], q[ends], k[ends], v[ends], valid_len[ends], "padded")
    big = [np.concatenate([x, x[:1]]) for x in (q, k, v, valid_len)]
    with pytest.raises(Exception, match="at most 65535 batch rows"):
        run(*big)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_agrees_with_upstream_on_valid_rows(mode, dtype):
    """Cross-check against TVM's own _attention_sequence_prefill_with_mask."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_sequence_prefill_with_mask

    heads_q, heads_kv, d, batch, seq = 8, 4, 64, 4, 200
    target = tvm.target.Target.from_device(tvm.cuda(0))
    f = _attention_sequence_prefill_with_mask(
        heads_kv, heads_q, d, dtype, target, 1 / math.sqrt(d), mask_mode=mode
    )
    upstream = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(batch, seq, seq, heads_q, heads_kv, d, dtype, rng)
    valid_len = np.array([200, 1, 77, 150], dtype="int32")
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(x, device=dev) for x in (q, k, v, valid_len)]
    out = tvm.runtime.tensor(np.zeros(q.shape, q.dtype), device=dev)
    lse = tvm.runtime.tensor(np.zeros((batch, seq, heads_q), q.dtype), device=dev)
    upstream(*args, out, lse)
    theirs = out.numpy().astype("float32")
    ours = compiled_op("cuda", heads_q, heads_kv, d, dtype, mode)(q, k, v, valid_len)
    ours = ours.astype("float32")
    for b, n in enumerate(valid_len):
        rows = slice(seq - n, seq) if mode.endswith("_left") else slice(0, n)
        atol = 3e-2 if dtype == "bfloat16" else 4e-3
        np.testing.assert_allclose(ours[b, rows], theirs[b, rows], atol=atol)


@pytest.mark.parametrize("head_dim", [80, 96, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_other_head_dims(mode, dtype, head_dim):
    """head_dims the tensor-core kernel does not take run (correctly) on the portable kernel."""
    check(mode, 4, 2, head_dim, dtype, [(3, 130, 130)], seed=head_dim)


def kernel_variant(variant: str):
    """(module, its generator, the name of its tiles function, tiles of ``variant``, target):
    a layout of the ``wgmma`` or ``mma.sync`` attention kernel that its default tiles do not
    choose."""
    from relax_masked_attn.kernels import config, cuda_mma, cuda_wgmma

    wgmma = (cuda_wgmma, cuda_wgmma.wgmma_attention_kernel, "wgmma_attention_tiles")
    if variant == "wgmma-direct-store":  # 4-byte stores straight from the accumulators
        return (*wgmma, lambda d, dt: (2, False, 2, False, False), "cuda-sm90a")
    if variant == "wgmma-overlap":  # the softmax of tile kt + 1 during O += P V(kt)
        return (*wgmma, lambda d, dt: (2 if d == 64 else 1, False, 2, True, True), "cuda-sm90a")
    if variant == "wgmma-128-keys":  # and tiles of 128 keys, one block an SM
        return (*wgmma, lambda d, dt: (1, False, 2, True, True, 128), "cuda-sm90a")
    if variant == "wgmma-cp-async":  # K and V tiles copied by cp.async (the default: TMA)
        return (*wgmma, lambda d, dt: (2, False, 2, True, False), "cuda-sm90a")
    if variant == "wgmma-tma-128-keys":
        return (*wgmma, lambda d, dt: (1, False, 2, True, False, 128, True), "cuda-sm90a")
    if variant == "wgmma-specialized":  # a producer warpgroup, consumers taking turns
        return (*wgmma, lambda d, dt: (1, False, 2, True, False, 64, True, True), "cuda-sm90a")
    if variant == "wgmma-specialized-overlap":  # and the softmax overlap, 128-key tiles at 128
        return (*wgmma, lambda d, dt: (1, False, 2, True, True, 64 if d == 64 else 128, True,
                                       True), "cuda-sm90a")
    if variant == "wgmma-overlap-tma":  # the overlapped loop on TMA copies
        return (*wgmma, lambda d, dt: (2 if d == 64 else 1, False, 2, True, True, 64, True),
                "cuda-sm90a")
    assert variant == "mma-direct-store"  # 4-byte stores (the default: staged output)
    return (cuda_mma, cuda_mma.tensor_core_kernel, "tensor_core_tiles",
            lambda d, dt: (*config.tensor_core_tiles(d, dt)[:4], False), "cuda")


@pytest.mark.parametrize("variant,head_dim", [
    ("wgmma-direct-store", 64), ("wgmma-direct-store", 128), ("wgmma-overlap", 64),
    ("wgmma-overlap", 128), ("wgmma-128-keys", 64), ("wgmma-128-keys", 128), ("wgmma-cp-async", 64),
    ("wgmma-cp-async", 128), ("wgmma-tma-128-keys", 128), ("wgmma-overlap-tma", 64),
    ("wgmma-overlap-tma", 128), ("wgmma-specialized", 64), ("wgmma-specialized", 128),
    ("wgmma-specialized-overlap", 64), ("wgmma-specialized-overlap", 128),
    ("mma-direct-store", 32), ("mma-direct-store", 64),
    ("mma-direct-store", 128)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_kernel_variants(monkeypatch, variant, mode, dtype, head_dim):
    """The tensor-core kernels' layouts that their tiles (``config.wgmma_attention_tiles``,
    ``config.tensor_core_tiles``) do not choose by default: the ``wgmma`` kernel storing 4 bytes
    straight from the accumulators, overlapping the softmax of key tile kt + 1 with
    O += P V(kt) (on tiles of 64 or 128 keys, copied by TMA or ``cp.async``), or copying K and
    V by ``cp.async`` (the default's TMA boxes take the padding rows past a sequence as they
    are: they hold NaN here); the ``mma.sync`` kernel storing 4 bytes from its accumulators
    (the default stages the output through shared memory: ``geometry.staged_output``).
    Every mode, GQA, the length patterns, lengths off the tiles (one key tile, two, many), and
    the packed op with rows of no sequence around its sequences, its grid sized for the longest
    sequence or for a third of it."""
    import relax_masked_attn as rma

    from .conftest import assert_packed_matches_reference, op_module, packed_inputs, vm_main

    module, generator, tiles_name, tiles, target = kernel_variant(variant)
    monkeypatch.setattr(module, tiles_name, tiles)
    generator.cache_clear()  # no default-tile kernel from before
    try:
        run = vm_main(op_module(8, 4, head_dim, dtype, mode), target)
        rng = np.random.default_rng(head_dim)
        q, k, v = random_qkv(5, 1000, 1000, 8, 4, head_dim, dtype, rng)
        valid_len = np.array([1, 7, 127, 129, 1000], dtype="int32")
        # keys and values of the padding are NaN: no kernel may let them into a real row
        poisoned_k, poisoned_v = k.copy(), v.copy()
        for b, n in enumerate(valid_len):
            pad = slice(0, 1000 - n) if is_left_padded(mode) else slice(n, 1000)
            poisoned_k[b, pad] = np.nan
            poisoned_v[b, pad] = np.nan
        assert_matches_reference(run(q, poisoned_k, poisoned_v, valid_len), q, k, v, valid_len,
                                 mode)
        q, k, v = random_qkv(3, 130, 130, 8, 4, head_dim, dtype, rng)
        for pattern in PATTERNS:
            valid_len = lengths(pattern, 3, 130, rng)
            assert_matches_reference(run(q, k, v, valid_len), q, k, v, valid_len, mode)
        causal = mode.startswith("causal")
        q, k, v, seq_start = packed_inputs([5, 0, 300, 129], 8, 4, head_dim, dtype, rng, 3, 4)
        for max_len in (300, 100):  # 100: the longer sequences loop over the grid's tiles
            packed = vm_main(rma.op.standalone_packed_module(8, 4, head_dim, dtype, causal,
                                                             max_len), target)
            assert_packed_matches_reference(packed(q, k, v, seq_start), q, k, v, seq_start,
                                            causal)
    finally:
        generator.cache_clear()  # nor one of the other layout after


@pytest.mark.parametrize("target", ["cuda", "cuda-sm90a"])
@pytest.mark.parametrize("mode", ["padded", "causal_padded_left"])
def test_empty_batches(mode, target):
    """Nothing to compute on the tensor-core kernels: empty outputs, no launch of an empty grid
    (which left the CUDA context broken)."""
    check_empty_batches(target, mode)
