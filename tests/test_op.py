"""Type inference of the op on static and symbolic shapes, and every error it must raise."""

import pytest
import tvm
from tvm import relax, tirx

import relax_masked_attn as rma

from . import conftest


def tensor(name, shape, dtype="float16"):
    return relax.Var(name, relax.TensorType(shape, dtype))


def infer(*args, **kwargs):
    return conftest.infer(rma.masked_sequence_prefill, *args, **kwargs)


def test_static_shapes():
    ret = infer(
        tensor("q", (2, 7, 8, 64)), tensor("k", (2, 9, 2, 64)), tensor("v", (2, 9, 2, 64)),
        tensor("valid_len", (2,), "int32"), mode="causal_padded_left",
    )
    tvm.ir.assert_structural_equal(ret, relax.TensorType((2, 7, 8, 64), "float16"))


def test_symbolic_shapes():
    b, s, t = (tirx.Var(n, "int64") for n in "bst")
    ret = infer(
        tensor("q", (b, s, 12, 64), "bfloat16"), tensor("k", (b, t, 12, 64), "bfloat16"),
        tensor("v", (b, t, 12, 64), "bfloat16"), tensor("valid_len", (b,), "int32"),
    )
    assert ret.dtype.dtype == "bfloat16"
    tvm.ir.assert_structural_equal(ret.shape.values[:2], [b, s])
    assert [int(x) for x in ret.shape.values[2:]] == [12, 64]


def test_attributes_are_carried():
    q, k = tensor("q", (1, 4, 2, 32), "float32"), tensor("k", (1, 4, 2, 32), "float32")
    call = rma.masked_sequence_prefill(q, k, k, tensor("n", (1,), "int32"), "padded_left", 0.5)
    assert call.op.name == rma.OP_NAME
    assert str(call.attrs["mode"]) == "padded_left"
    assert float(call.attrs["sm_scale"]) == 0.5


def test_unknown_shape_keeps_ndim():
    q = relax.Var("q", relax.TensorType(dtype="float16", ndim=4))
    ret = infer(q, q, q, tensor("valid_len", (3,), "int32"))
    assert ret.ndim == 4 and ret.dtype.dtype == "float16"


GOOD = {
    "q": ((2, 8, 4, 64), "float16"),
    "k": ((2, 8, 2, 64), "float16"),
    "v": ((2, 8, 2, 64), "float16"),
    "valid_len": ((2,), "int32"),
}


@pytest.mark.parametrize(
    "name,shape,dtype,message",
    [
        ("q", (2, 8, 256), "float16", "q should have 4 dimensions"),
        ("k", (2, 8, 2, 64, 1), "float16", "k should have 4 dimensions"),
        ("v", (2, 8, 2, 32), "float16", "k and v must have the same head_dim"),
        ("k", (2, 8, 2, 32), "float16", "head_dim"),
        ("kv", (2, 8, 3, 64), "float16", "heads_q must be a multiple of heads_kv"),
        ("v", (2, 8, 3, 64), "float16", "k and v must have the same heads_kv"),
        ("k", (3, 8, 2, 64), "float16", "q and k must have the same batch"),
        ("v", (2, 9, 2, 64), "float16", "k and v must have the same seq_kv"),
        ("valid_len", (2,), "int64", "valid_len must be int32"),
        ("valid_len", (2, 1), "int32", "valid_len should have 1 dimension"),
        ("valid_len", (5,), "int32", "valid_len must have one entry per batch row"),
        ("k", (2, 8, 2, 64), "float32", "q, k and v must share one dtype"),
        ("q", (2, 8, 4, 64), "int32", "q must have a dtype among"),
        ("q", (2, 8, 0, 64), "float16", "heads_q must be a multiple of heads_kv"),
    ],
)
def test_bad_input_is_named(name, shape, dtype, message):
    args = {n: tensor(n, *spec) for n, spec in GOOD.items()}
    for n in ("k", "v") if name == "kv" else (name,):
        args[n] = tensor(n, shape, dtype)
    with pytest.raises(ValueError, match=message):
        infer(args["q"], args["k"], args["v"], args["valid_len"])


def test_head_dim_zero_is_refused():
    """(It used to pass type inference and fail in legalization on a division by zero.)"""
    q, kv = tensor("q", (2, 8, 4, 0)), tensor("k", (2, 8, 2, 0))
    with pytest.raises(ValueError, match="masked_sequence_prefill: head_dim must be positive"):
        infer(q, kv, kv, tensor("valid_len", (2,), "int32"))


def test_symbolic_batch_that_may_match_is_accepted():
    b, c = tirx.Var("b", "int64"), tirx.Var("c", "int64")
    ret = infer(
        tensor("q", (b, 8, 4, 64)), tensor("k", (c, 8, 2, 64)), tensor("v", (c, 8, 2, 64)),
        tensor("valid_len", (b,), "int32"),
    )
    assert ret.ndim == 4


def test_unknown_mode():
    q = tensor("q", (1, 4, 2, 32))
    with pytest.raises(ValueError, match="mode must be one of 'padded', 'causal_padded'"):
        rma.masked_sequence_prefill(q, q, q, tensor("n", (1,), "int32"), mode="causal")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_sm_scale(scale):
    q = tensor("q", (1, 4, 2, 32))
    with pytest.raises(ValueError, match="sm_scale must be positive"):
        rma.masked_sequence_prefill(q, q, q, tensor("n", (1,), "int32"), sm_scale=scale)


def test_sm_scale_type():
    q = tensor("q", (1, 4, 2, 32))
    with pytest.raises(TypeError, match="sm_scale must be a float"):
        rma.masked_sequence_prefill(q, q, q, tensor("n", (1,), "int32"), sm_scale="0.1")


def test_non_tensor_argument():
    q = tensor("q", (1, 4, 2, 32))
    shape = relax.Var("s", relax.ShapeType(ndim=1))
    with pytest.raises(ValueError, match="valid_len must be a tensor"):
        infer(q, q, q, shape)
