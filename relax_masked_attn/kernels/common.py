"""What the kernels share: log2-domain constants, the PrimFunc signatures, the CUDA arch."""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

LOG2E = math.log2(math.e)
NEG_INF = -1.0e30  # finite "minus infinity": exp2 of it minus a real max is exactly 0


def cuda_arch(target: Target) -> str:
    """The target's ``arch`` attribute (``"sm_90a"``), ``""`` when it names none."""
    return str(target.attrs["arch"]) if "arch" in target.attrs else ""


def compute_capability(target: Target) -> int:
    """``80`` for a CUDA target with ``arch`` ``sm_80`` (``90`` for ``sm_90a``); 0 when the target
    names no ``sm_`` arch (then the tensor-core kernels stay out)."""
    arch = cuda_arch(target)
    if not arch.startswith("sm_"):
        return 0
    return int("".join(ch for ch in arch[3:] if ch.isdigit()))


def attention_func(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, body, index_dtype: str = "int32",
    scheduled: bool = True,
) -> tirx.PrimFunc:
    """The op's PrimFunc ``(q, k, v, valid_len, out)`` around a kernel body.

    ``body`` is a ``T.macro`` called as ``body(q, k, v, valid_len, out, batch, seq_q, seq_kv)``
    with q ``[batch, seq_q, heads_q, head_dim]``, k/v ``[batch, seq_kv, heads_kv, head_dim]``,
    valid_len ``[batch]`` int32 and out shaped like q; batch and lengths are symbolic variables
    of ``index_dtype``. ``scheduled`` marks the function ``tirx.is_scheduled`` (GPU kernels with
    explicit threads; dlight leaves them alone).
    """
    attrs = {"tirx.noalias": True, **({"tirx.is_scheduled": True} if scheduled else {})}
    index_var = getattr(T, index_dtype)
    d = head_dim

    @T.prim_func
    def masked_prefill(
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        valid_len_handle: T.handle,
        out_handle: T.handle,
    ):
        T.func_attr(attrs)
        batch = index_var()
        seq_q = index_var()
        seq_kv = index_var()
        q = T.match_buffer(q_handle, (batch, seq_q, heads_q, d), dtype)
        k = T.match_buffer(k_handle, (batch, seq_kv, heads_kv, d), dtype)
        v = T.match_buffer(v_handle, (batch, seq_kv, heads_kv, d), dtype)
        valid_len = T.match_buffer(valid_len_handle, (batch,), "int32")
        out = T.match_buffer(out_handle, (batch, seq_q, heads_q, d), dtype)
        body(q, k, v, valid_len, out, batch, seq_q, seq_kv)

    return masked_prefill


def dense_func(
    n: int, k: int, dtype: str, body, bias: bool = False, index_dtype: str = "int32",
    scheduled: bool = True,
) -> tirx.PrimFunc:
    """The dense PrimFunc ``(x [m, k], w [n, k], [bias [n],] out [m, n])`` around a kernel body.

    ``body`` is a ``T.macro`` called as ``body(x, w, bias, out, m)`` (``bias`` None without
    one); ``m`` is a symbolic variable of ``index_dtype``. ``scheduled`` as in
    :func:`attention_func`.
    """
    attrs = {"tirx.noalias": True, **({"tirx.is_scheduled": True} if scheduled else {})}
    index_var = getattr(T, index_dtype)

    if bias:

        @T.prim_func
        def dense_bias(
            x_handle: T.handle, w_handle: T.handle, bias_handle: T.handle, out_handle: T.handle
        ):
            T.func_attr(attrs)
            m = index_var()
            x = T.match_buffer(x_handle, (m, k), dtype)
            w = T.match_buffer(w_handle, (n, k), dtype)
            bias_buf = T.match_buffer(bias_handle, (n,), dtype)
            out = T.match_buffer(out_handle, (m, n), dtype)
            body(x, w, bias_buf, out, m)

        return dense_bias

    @T.prim_func
    def dense(x_handle: T.handle, w_handle: T.handle, out_handle: T.handle):
        T.func_attr(attrs)
        m = index_var()
        x = T.match_buffer(x_handle, (m, k), dtype)
        w = T.match_buffer(w_handle, (n, k), dtype)
        out = T.match_buffer(out_handle, (m, n), dtype)
        body(x, w, None, out, m)

    return dense
