"""The Relax op ``relax_masked_attn.masked_sequence_prefill``: registration and type inference.

Importing this module registers the op (``FInferType``, ``FPurity``); the legalization lives in
:mod:`relax_masked_attn.legalize`.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax

from .modes import check_mode

OP_NAME = "relax_masked_attn.masked_sequence_prefill"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def masked_sequence_prefill(
    q: relax.Expr,
    k: relax.Expr,
    v: relax.Expr,
    valid_len: relax.Expr,
    mode: str = "padded",
    sm_scale: float | None = None,
) -> relax.Expr:
    """Attention over the real (non-padding) tokens of each batch row.

    Parameters
    ----------
    q : relax.Expr
        The queries, ``[batch, seq_q, heads_q, head_dim]``.
    k, v : relax.Expr
        The keys and values, ``[batch, seq_kv, heads_kv, head_dim]``, with
        ``heads_q % heads_kv == 0`` (grouped-query attention when ``heads_kv < heads_q``).
    valid_len : relax.Expr
        ``[batch]`` int32, the number of real tokens of each row. Values outside
        ``[0, min(seq_q, seq_kv)]`` are clamped into that range.
    mode : str
        ``"padded"``, ``"causal_padded"``, ``"padded_left"`` or ``"causal_padded_left"``; see
        :mod:`relax_masked_attn.modes`.
    sm_scale : float, optional
        The softmax scale, positive; ``1 / sqrt(head_dim)`` if not given.

    Returns
    -------
    relax.Expr
        ``[batch, seq_q, heads_q, head_dim]`` in q's dtype. Rows of padding queries, and every row
        of a batch row with no real token, are exactly 0. Finite wherever the scaled scores
        ``sm_scale * (q . k)`` lie within ``±1e29`` (float32 scores, masked with ``-1e30``).

    Notes
    -----
    On CUDA's tensor-core kernels (sm_80 and up, fp16/bf16) a call takes at most 65535 batch
    rows and 65535 query tiles of 64-128 rows (CUDA's grid limits); a larger one stops with a
    message saying so (``kernels.geometry.GRID_BATCH_MESSAGE``).
    """
    check_mode(mode)
    attrs = {"mode": mode}
    if sm_scale is not None:
        attrs["sm_scale"] = _check_sm_scale(sm_scale)
    call_attrs = tvm.ir.make_node("ir.DictAttrs", **attrs)
    return relax.Call(tvm.ir.Op.get(OP_NAME), [q, k, v, valid_len], call_attrs)


def _check_sm_scale(sm_scale: object, op_name: str = "masked_sequence_prefill") -> float:
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"{op_name}: sm_scale must be a float, but got {sm_scale!r}")
    scale = float(sm_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op_name}: sm_scale must be positive and finite, but got {sm_scale!r}")
    return scale


def call_mode(call: relax.Call) -> str:
    """The mode of a call of the op."""
    return check_mode(str(call.attrs["mode"]))


def call_sm_scale(call: relax.Call, head_dim: int) -> float:
    """The softmax scale of a call of either op (its attribute, else ``1 / sqrt(head_dim)``)."""
    if "sm_scale" in call.attrs.keys():
        return _check_sm_scale(float(call.attrs["sm_scale"]), _op_name(call))
    return 1.0 / math.sqrt(head_dim)


def _op_name(call: relax.Call) -> str:
    packed = call.op.name == PACKED_OP_NAME
    return "packed_sequence_prefill" if packed else "masked_sequence_prefill"


def _error(msg: str) -> ValueError:
    return ValueError(f"masked_sequence_prefill: {msg}")


def _tensor_type(arg: relax.Expr, name: str, error=None) -> relax.TensorType:
    ty = arg.ty
    if not isinstance(ty, relax.TensorType):
        raise (error or _error)(f"{name} must be a tensor, but got {ty}")
    return ty


def _check_qkv(q, k, v, layouts: tuple[str, str], error) -> None:
    """q, k and v: the dimensions of ``layouts`` (q's, k's and v's), float dtypes, one dtype."""
    for ty, name, layout in ((q, "q", layouts[0]), (k, "k", layouts[1]), (v, "v", layouts[1])):
        ndim = layout.count(",") + 1
        if ty.ndim != ndim:
            raise error(f"{name} should have {ndim} dimensions {layout}, but got {ty.ndim}")
        if ty.dtype.dtype not in FLOAT_DTYPES:
            raise error(
                f"{name} must have a dtype among {', '.join(FLOAT_DTYPES)}, "
                f"but got {ty.dtype.dtype}"
            )
    if not (q.dtype.dtype == k.dtype.dtype == v.dtype.dtype):
        raise error(
            "q, k and v must share one dtype, but got "
            f"{q.dtype.dtype}, {k.dtype.dtype} and {v.dtype.dtype}"
        )


def _check_same(error, a: str, a_shape, b: str, b_shape, dims) -> None:
    """``a`` and ``b`` agree on each ``(axis, what)`` of ``dims`` where that is provable."""
    for axis, what in dims:
        if _provably_different(a_shape[axis], b_shape[axis]):
            raise error(f"{a} and {b} must have the same {what}, but got "
                        f"{_fmt(a_shape[axis])} and {_fmt(b_shape[axis])}")


def _check_head_dim(head_dim, error) -> None:
    if _provably_zero(head_dim):
        raise error(f"head_dim must be positive, but got {_fmt(head_dim)}")


def _check_heads(heads_q, heads_kv, error) -> None:
    if isinstance(heads_q, tvm.tirx.IntImm) and isinstance(heads_kv, tvm.tirx.IntImm):
        if heads_kv.value <= 0 or heads_q.value <= 0 or heads_q.value % heads_kv.value != 0:
            raise error(
                "heads_q must be a multiple of heads_kv, "
                f"but got heads_q={heads_q.value} and heads_kv={heads_kv.value}"
            )


def _fmt(dim) -> str:
    return str(dim.value) if isinstance(dim, tvm.tirx.IntImm) else str(dim)


def _provably_different(a, b) -> bool:
    return tvm.sym.Analyzer().can_prove(a != b)


def _provably_zero(dim) -> bool:
    """Whether a dimension is provably 0 (the only non-positive extent a shape can have)."""
    return tvm.sym.Analyzer().can_prove(dim <= 0)


def infer_type(call: relax.Call, _block_builder=None) -> relax.TensorType:
    """Check the arguments of a call and return the type of its result.

    Raises only on what it can prove wrong: a symbolic batch or length that might match is
    accepted.
    """
    if len(call.args) != 4:
        raise _error(f"expects 4 arguments (q, k, v, valid_len), but got {len(call.args)}")
    call_mode(call)
    if "sm_scale" in call.attrs.keys():
        _check_sm_scale(float(call.attrs["sm_scale"]))
    q, k, v, valid_len = (
        _tensor_type(arg, name) for arg, name in zip(call.args, ("q", "k", "v", "valid_len"))
    )
    layouts = ("[batch, seq_q, heads_q, head_dim]", "[batch, seq_kv, heads_kv, head_dim]")
    _check_qkv(q, k, v, layouts, _error)
    if valid_len.ndim != 1:
        raise _error(f"valid_len should have 1 dimension [batch], but got {valid_len.ndim}")
    if valid_len.dtype.dtype != "int32":
        raise _error(f"valid_len must be int32, but got {valid_len.dtype.dtype}")
    if q.shape is None or k.shape is None or v.shape is None:
        return relax.TensorType(dtype=q.dtype, ndim=4, vdevice=q.vdevice)
    qs, ks, vs = q.shape.values, k.shape.values, v.shape.values

    _check_same(_error, "k", ks, "v", vs, ((3, "head_dim"), (2, "heads_kv"), (1, "seq_kv")))
    _check_same(_error, "q", qs, "k", ks, ((3, "head_dim"),))
    for name, shape in (("k", ks), ("v", vs)):
        _check_same(_error, "q", qs, name, shape, ((0, "batch"),))
    if valid_len.shape is not None and _provably_different(qs[0], valid_len.shape.values[0]):
        raise _error(
            f"valid_len must have one entry per batch row ({_fmt(qs[0])}), "
            f"but got {_fmt(valid_len.shape.values[0])}"
        )
    _check_heads(qs[2], ks[2], _error)
    _check_head_dim(qs[3], _error)
    return relax.TensorType(q.shape, q.dtype, vdevice=q.vdevice)


PACKED_OP_NAME = "relax_masked_attn.packed_sequence_prefill"


def packed_sequence_prefill(
    q: relax.Expr,
    k: relax.Expr,
    v: relax.Expr,
    seq_start: relax.Expr,
    max_len,
    causal: bool = False,
    sm_scale: float | None = None,
) -> relax.Expr:
    """Attention over sequences packed one after another without padding ("varlen").

    Parameters
    ----------
    q : relax.Expr
        The queries of every sequence, ``[t, heads_q, head_dim]``.
    k, v : relax.Expr
        The keys and values, ``[t, heads_kv, head_dim]`` (``heads_q % heads_kv == 0``).
    seq_start : relax.Expr
        ``[batch + 1]`` int32, non-decreasing: sequence ``b`` is rows
        ``[seq_start[b], seq_start[b + 1])`` (values are clamped into ``[0, t]``); FlashAttention
        calls it ``cu_seqlens``. For sequences of lengths ``[2, 5, 3]`` packed from row 0 it holds
        ``[0, 2, 7, 10]``. Rows before ``seq_start[0]`` or from ``seq_start[batch]`` on belong to
        no sequence and come out 0. At least one entry (a call with none is refused).
    max_len : int or PrimExpr
        The longest sequence to size the GPU grid for (the padded length ``seq`` of the batch
        is a good one; for ``[2, 5, 3]``, 5). Longer sequences are still right, only slower.
    causal : bool
        Whether a token sees only the tokens at or before it in its sequence.
    sm_scale : float, optional
        The softmax scale, positive; ``1 / sqrt(head_dim)`` if not given.

    Returns
    -------
    relax.Expr
        ``[t, heads_q, head_dim]`` in q's dtype: each sequence attends only within itself.
        Rows of no sequence (all ``t`` rows when ``seq_start`` has one entry) are exactly 0;
        finite within the same score range as :func:`masked_sequence_prefill`.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"packed_sequence_prefill: causal must be a bool, but got {causal!r}")
    is_prim_int = isinstance(max_len, tvm.ir.Expr) and _is_int_prim(getattr(max_len, "ty", None))
    if isinstance(max_len, bool) or not (isinstance(max_len, int) or is_prim_int):
        raise TypeError(
            "packed_sequence_prefill: max_len must be an int or an integer PrimExpr, "
            f"but got {max_len!r}"
        )
    if isinstance(max_len, int) and max_len < 0:
        raise ValueError(f"packed_sequence_prefill: max_len must be >= 0, but got {max_len}")
    attrs = {"causal": causal}
    if sm_scale is not None:
        attrs["sm_scale"] = _check_sm_scale(sm_scale, "packed_sequence_prefill")
    call_attrs = tvm.ir.make_node("ir.DictAttrs", **attrs)
    if isinstance(max_len, int):
        max_len = tvm.tirx.IntImm("int64", max_len)
    elif str(max_len.ty.dtype) != "int64":
        max_len = tvm.tirx.Cast("int64", max_len)
    return relax.Call(tvm.ir.Op.get(PACKED_OP_NAME), [q, k, v, seq_start, max_len], call_attrs)


def _is_int_prim(ty) -> bool:
    return isinstance(ty, tvm.ir.PrimType) and str(ty.dtype).startswith(("int", "uint"))


def call_causal(call: relax.Call) -> bool:
    """Whether a call of the packed op is causal."""
    return bool(call.attrs["causal"])


def _packed_error(msg: str) -> ValueError:
    return ValueError(f"packed_sequence_prefill: {msg}")


def infer_packed_type(call: relax.Call, _block_builder=None) -> relax.TensorType:
    """Check a call of the packed op and return its result's type (raises only on what it can
    prove wrong)."""
    if len(call.args) != 5:
        raise _packed_error(
            f"expects 5 arguments (q, k, v, seq_start, max_len), but got {len(call.args)}"
        )
    if "sm_scale" in call.attrs.keys():
        _check_sm_scale(float(call.attrs["sm_scale"]), "packed_sequence_prefill")
    max_len_ty = call.args[4].ty
    if not _is_int_prim(max_len_ty):
        raise _packed_error(f"max_len must be an integer PrimValue, but got {max_len_ty}")
    q, k, v, seq_start = (
        _tensor_type(arg, name, _packed_error)
        for arg, name in zip(call.args[:4], ("q", "k", "v", "seq_start"))
    )
    _check_qkv(q, k, v, ("[t, heads_q, head_dim]", "[t, heads_kv, head_dim]"), _packed_error)
    if seq_start.ndim != 1 or seq_start.dtype.dtype != "int32":
        raise _packed_error(
            f"seq_start must be a 1-D int32 tensor [batch + 1], but got {seq_start.ndim}-D "
            f"{seq_start.dtype.dtype}"
        )
    if seq_start.shape is not None and _provably_zero(seq_start.shape.values[0]):
        raise _packed_error("seq_start must have at least 1 entry ([batch + 1]), but got 0")
    if q.shape is None or k.shape is None or v.shape is None:
        return relax.TensorType(dtype=q.dtype, ndim=3, vdevice=q.vdevice)
    qs, ks, vs = q.shape.values, k.shape.values, v.shape.values
    _check_same(_packed_error, "k", ks, "v", vs, ((0, "t"), (1, "heads_kv"), (2, "head_dim")))
    _check_same(_packed_error, "q", qs, "k", ks, ((0, "t"), (2, "head_dim")))
    _check_heads(qs[1], ks[1], _packed_error)
    _check_head_dim(qs[2], _packed_error)
    return relax.TensorType(q.shape, q.dtype, vdevice=q.vdevice)


def _register() -> None:
    for name, infer in ((OP_NAME, infer_type), (PACKED_OP_NAME, infer_packed_type)):
        tvm.ir.register_op_attr(name, "FInferType", infer)
        tvm.ir.register_op_attr(name, "FPurity", True)


_register()


def standalone_module(
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: str,
    mode: str = "padded",
    sm_scale: float | None = None,
) -> tvm.IRModule:
    """A Relax module whose ``main(q, k, v, valid_len)`` is one call of the op.

    Batch and lengths are symbolic (``batch``, ``seq_q``, ``seq_kv``), so one compiled module
    serves every shape; handy for benchmarks, demos and checking a kernel in isolation.
    """
    batch, seq_q, seq_kv = (tvm.tirx.Var(n, "int64") for n in ("batch", "seq_q", "seq_kv"))
    q = relax.Var("q", relax.TensorType((batch, seq_q, heads_q, head_dim), dtype))
    k = relax.Var("k", relax.TensorType((batch, seq_kv, heads_kv, head_dim), dtype))
    v = relax.Var("v", relax.TensorType((batch, seq_kv, heads_kv, head_dim), dtype))
    valid_len = relax.Var("valid_len", relax.TensorType((batch,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v, valid_len]):
        out = bb.emit(masked_sequence_prefill(q, k, v, valid_len, mode, sm_scale))
        bb.emit_func_output(out)
    return bb.get()


def standalone_packed_module(
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    dtype: str,
    causal: bool = False,
    max_len: int = 1024,
    sm_scale: float | None = None,
) -> tvm.IRModule:
    """A Relax module whose ``main(q, k, v, seq_start)`` is one call of the packed op, the token
    count ``t`` and batch symbolic, the grid sized for sequences of up to ``max_len`` tokens."""
    t, batch1 = tvm.tirx.Var("t", "int64"), tvm.tirx.Var("batch_plus_1", "int64")
    q = relax.Var("q", relax.TensorType((t, heads_q, head_dim), dtype))
    k = relax.Var("k", relax.TensorType((t, heads_kv, head_dim), dtype))
    v = relax.Var("v", relax.TensorType((t, heads_kv, head_dim), dtype))
    seq_start = relax.Var("seq_start", relax.TensorType((batch1,), "int32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v, seq_start]):
        out = bb.emit(packed_sequence_prefill(q, k, v, seq_start, max_len, causal, sm_scale))
        bb.emit_func_output(out)
    return bb.get()
