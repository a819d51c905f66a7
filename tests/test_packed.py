"""The packed ("varlen") op: type inference, the CPU kernel against the NumPy reference, the
CUDA code it generates, and (marked gpu) both CUDA kernels on a real GPU."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

import relax_masked_attn as rma

from . import conftest
from .conftest import (
    SM90,
    assert_packed_matches_reference,
    compiled_packed,
    packed_inputs,
)
from .test_op import tensor


def infer(*args, **kwargs):
    return conftest.infer(rma.packed_sequence_prefill, *args, **kwargs)


# --- type inference --------------------------------------------------------------------------


def test_symbolic_shapes_and_max_len():
    t, b1, s = tirx.Var("t", "int64"), tirx.Var("b1", "int64"), tirx.Var("s", "int64")
    ret = infer(tensor("q", (t, 8, 64)), tensor("k", (t, 2, 64)), tensor("v", (t, 2, 64)),
                tensor("seq_start", (b1,), "int32"), s, causal=True)
    tvm.ir.assert_structural_equal(ret, relax.TensorType((t, 8, 64), "float16"))


GOOD = {"q": ((10, 4, 64), "float16"), "k": ((10, 2, 64), "float16"),
        "v": ((10, 2, 64), "float16"), "seq_start": ((3,), "int32")}


@pytest.mark.parametrize(
    "name,shape,dtype,message",
    [
        ("q", (2, 10, 4, 64), "float16", "q should have 3 dimensions"),
        ("v", (10, 2, 32), "float16", "k and v must have the same head_dim"),
        ("kv", (10, 3, 64), "float16", "heads_q must be a multiple of heads_kv"),
        ("kv", (11, 2, 64), "float16", "q and k must have the same t"),
        ("seq_start", (3,), "int64", "seq_start must be a 1-D int32 tensor"),
        ("seq_start", (3, 1), "int32", "seq_start must be a 1-D int32 tensor"),
        ("k", (10, 2, 64), "float32", "q, k and v must share one dtype"),
    ],
)
def test_bad_input_is_named(name, shape, dtype, message):
    args = {n: tensor(n, *spec) for n, spec in GOOD.items()}
    for n in ("k", "v") if name == "kv" else (name,):
        args[n] = tensor(n, shape, dtype)
    with pytest.raises(ValueError, match=message):
        infer(args["q"], args["k"], args["v"], args["seq_start"], 64)


@pytest.mark.parametrize("max_len,error", [(-1, ValueError), (2.5, TypeError), (True, TypeError),
                                           (tirx.FloatImm("float32", 1.0), TypeError)])
def test_bad_max_len(max_len, error):
    q = tensor("q", (10, 4, 64))
    with pytest.raises(error, match="max_len"):
        rma.packed_sequence_prefill(q, q, q, tensor("s", (3,), "int32"), max_len)


def test_seq_start_without_entries_is_refused():
    q = tensor("q", (10, 4, 64))
    with pytest.raises(ValueError, match="seq_start must have at least 1 entry"):
        infer(q, q, q, tensor("s", (0,), "int32"), 8)


def test_head_dim_zero_is_refused():
    q = tensor("q", (10, 4, 0))
    with pytest.raises(ValueError, match="packed_sequence_prefill: head_dim must be positive"):
        infer(q, q, q, tensor("s", (3,), "int32"), 8)


@pytest.mark.parametrize("scale,error", [(-1.0, ValueError), ("x", TypeError)])
def test_sm_scale_errors_name_this_op(scale, error):
    q = tensor("q", (10, 4, 64))
    with pytest.raises(error, match=r"^packed_sequence_prefill: sm_scale"):
        rma.packed_sequence_prefill(q, q, q, tensor("s", (3,), "int32"), 8, sm_scale=scale)


def test_causal_must_be_a_bool():
    q = tensor("q", (10, 4, 64))
    with pytest.raises(TypeError, match="causal must be a bool"):
        rma.packed_sequence_prefill(q, q, q, tensor("s", (3,), "int32"), 8, causal="yes")


# --- CPU numerics ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_matches_reference(causal, heads_q, heads_kv, dtype):
    """Zero-length sequences among real ones, rows of no sequence before and after."""
    run = compiled_packed("llvm", heads_q, heads_kv, 64, dtype, causal, 64)
    rng = np.random.default_rng(heads_q + causal)
    for lens, head, tail in (([5, 0, 33, 1, 64], 0, 0), ([17], 3, 4), ([0, 0], 0, 6),
                             ([40, 23, 9], 0, 0)):
        q, k, v, seq_start = packed_inputs(lens, heads_q, heads_kv, 64, dtype, rng, head, tail)
        assert_packed_matches_reference(run(q, k, v, seq_start), q, k, v, seq_start, causal)


def _check_no_sequence(target):
    """``seq_start`` of one entry (no sequence at all): every row is exactly 0, whatever the
    buffer held before (the VM reuses the previous call's output buffer)."""
    run = compiled_packed(target, 4, 2, 64, "float16", True, 64)
    rng = np.random.default_rng(7)
    q, k, v, seq_start = packed_inputs([20, 12], 4, 2, 64, "float16", rng)
    assert np.abs(run(q, k, v, seq_start)).max() > 0  # fills the pool's buffer with values
    for start in (0, 5, 32, 99):
        out = run(q, k, v, np.array([start], "int32"))
        assert out.shape == q.shape and (out == 0).all()


def test_cpu_no_sequence_gives_zeros():
    _check_no_sequence("llvm")


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["cuda", "cuda-sm90a"])
def test_cuda_no_sequence_gives_zeros(target):
    _check_no_sequence(target)


def test_cpu_matches_the_padded_op():
    """The same sequences through both ops: the packed output is the padded one's real rows."""
    rng = np.random.default_rng(2)
    lens = np.array([9, 30, 1, 17], dtype="int32")
    q, k, v, seq_start = packed_inputs(lens, 4, 2, 32, "float32", rng)
    packed = compiled_packed("llvm", 4, 2, 32, "float32", True, 30)(q, k, v, seq_start)
    seq = 30
    pq, pk, pv = (np.zeros((4, seq, *x.shape[1:]), "float32") for x in (q, k, v))
    for b, n in enumerate(lens):
        for dst, src in ((pq, q), (pk, k), (pv, v)):
            dst[b, seq - n:] = src[seq_start[b]:seq_start[b + 1]]
    from .conftest import compiled_op

    padded = compiled_op("llvm", 4, 2, 32, "float32", "causal_padded_left")(pq, pk, pv, lens)
    for b, n in enumerate(lens):
        np.testing.assert_allclose(packed[seq_start[b]:seq_start[b + 1]], padded[b, seq - n:],
                                   atol=1e-5)


# --- CUDA code, no GPU needed ----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim,tensor_cores", [(128, True), (96, False)])
def test_cuda_kernels_compile(causal, head_dim, tensor_cores):
    target = SM90
    mod = rma.op.standalone_packed_module(8, 4, head_dim, "float16", causal, 512)
    src = tvm.compile(mod, target=target).mod.imports[0].imports[0].inspect_source()
    kind = "causal" if causal else "full"
    assert f"zz_packed_prefill_{kind}_h8_4_d{head_dim}_float16" in src
    assert ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src) is tensor_cores


@pytest.mark.parametrize("packed_kernel", ["tensor_core", "portable"])
def test_packed_kernels_are_well_formed(packed_kernel):
    from relax_masked_attn.kernels import cuda_mma, gpu

    tensor_core = packed_kernel == "tensor_core"
    make = cuda_mma.tensor_core_kernel if tensor_core else gpu.portable_gpu_kernel
    func = make(8, 2, 64, "float16", "causal_padded", 0.125, packed=True)
    assert tvm.tirx.analysis.verify_well_formed(func)
    assert [str(p.name) for p in func.params] == ["q", "k", "v", "seq_start", "max_len", "out"]


# --- CUDA on a real GPU ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("target", ["cuda", "cuda-sm90a"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_matches_reference(causal, head_dim, dtype, target):
    """Tensor-core (fp16/bf16, head_dim 64/128: mma.sync, and wgmma on sm_90a) and portable
    (fp32, head_dim 96) kernels; lengths off the tiles (1, 7, 127, 129, 1000), zero lengths,
    rows of no sequence; ``max_len`` 1000 and 100 (longer sequences loop over the grid)."""
    rng = np.random.default_rng(head_dim + causal)
    for max_len in (1000, 100):
        run = compiled_packed(target, 8, 4, head_dim, dtype, causal, max_len)
        for lens, head, tail in (([1, 7, 127, 0, 129, 1000], 0, 0), ([300, 64], 5, 3)):
            q, k, v, seq_start = packed_inputs(lens, 8, 4, head_dim, dtype, rng, head, tail)
            assert_packed_matches_reference(run(q, k, v, seq_start), q, k, v, seq_start, causal)
