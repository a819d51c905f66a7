"""Pieces every embedding model shares: pooling, L2 normalization, rotary embedding helpers."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op


def _unary(fn, x: nn.Tensor, name: str) -> nn.Tensor:
    return op.wrap_nested(fn(x._expr), name)


def l2_normalize(x: nn.Tensor, eps: float = 1e-12) -> nn.Tensor:
    """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize's definition)."""
    norm = op.sqrt(op.sum(op.square(x), axis=-1, keepdims=True))
    return op.divide(x, op.maximum(norm, op.full(norm.shape, eps, x.dtype)), name="l2_normalize")


def mean_pool(hidden: nn.Tensor, attention_mask: nn.Tensor, valid_len: nn.Tensor) -> nn.Tensor:
    """Mean of the real tokens' hidden states: ``[b, s, h]`` -> ``[b, h]``."""
    weights = op.unsqueeze(op.astype(attention_mask, hidden.dtype), -1)  # (b, s, 1)
    total = op.sum(op.multiply(hidden, weights), axis=1)  # (b, h)
    count = op.astype(op.maximum(valid_len, op.full(valid_len.shape, 1, "int32")), hidden.dtype)
    return op.divide(total, op.unsqueeze(count, -1), name="mean_pool")


def rope(x: nn.Tensor, theta: float, name: str = "rope") -> nn.Tensor:
    """Rotary position embedding, rotate-half layout, positions ``0..s-1``: ``[b, s, h, d]``.

    Positions count columns, padding included (as Hugging Face does when no position_ids are
    given); attention depends only on position differences, so left padding does not matter.
    """
    _, seq, _, dim = x.shape
    half = dim // 2
    inv_freq = op.exp(
        op.multiply(
            op.arange(0, half, dtype="float32"),
            op.full((half,), -2.0 * __import__("math").log(theta) / dim, "float32"),
        )
    )  # theta ** (-2 i / d)
    pos = op.arange(0, seq, dtype="float32")  # (s,)
    freqs = op.multiply(op.unsqueeze(pos, -1), op.unsqueeze(inv_freq, 0))  # (s, d/2)
    angles = op.concat([freqs, freqs], dim=-1)  # (s, d)
    cos = op.astype(_unary(relax.op.cos, angles, "rope_cos"), x.dtype)
    sin = op.astype(_unary(relax.op.sin, angles, "rope_sin"), x.dtype)
    cos = op.reshape(cos, (1, seq, 1, dim))
    sin = op.reshape(sin, (1, seq, 1, dim))
    x1, x2 = op.split(x, 2, axis=-1)
    rotated = op.concat([op.negative(x2), x1], dim=-1)
    return op.add(op.multiply(x, cos), op.multiply(rotated, sin), name=name)
