"""Pieces every embedding model shares: pooling, L2 normalization, rotary embedding helpers."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .. import nn as rma_nn


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


def _gather(x: nn.Tensor, index: nn.Tensor) -> nn.Tensor:
    """Rows ``x[index]``; an index out of range (a hand-made ``token_index``) is clamped instead
    of reading out of bounds."""
    return op.wrap_nested(relax.op.take(x._expr, index._expr, axis=0, mode="clip"), "gather")


class Embedding(nn.Embedding):
    """``nn.Embedding`` of 1-D ids whose lookup clamps out-of-range ids (``EmbeddingModel``
    refuses them before; a hand-called compiled library cannot read out of bounds)."""

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        return _gather(self.weight, ids)


class PackedBatch:
    """The real tokens of a padded ``[b, s]`` batch, packed row by row into ``[t]``.

    Every layer runs on the ``t`` packed tokens, so its cost follows the real tokens, not the
    padded shape: token-wise ones (embeddings, linears, norms, MLPs) directly, attention through
    ``packed_sequence_prefill`` with :attr:`seq_start`. :meth:`to_packed` and :meth:`to_padded`
    convert at the model's input and output.

    ``token_index`` ``[t]`` (int32, computed by the caller: the flat indices ``row * s + col`` of
    the mask's ones in row-major order, ``numpy.flatnonzero(mask)``) gives the gather to packed
    order; the inverse map is built here from ``valid_len``: slot ``(row, col)`` of the padded
    batch reads packed token ``row_start[row] + clamp(col - offset, 0, L - 1)``, so padding slots
    repeat a real token of their row (finite values that attention and pooling never use).
    """

    def __init__(self, attention_mask: nn.Tensor, token_index: nn.Tensor, side: str):
        self.batch, self.seq = attention_mask.shape
        self.attention_mask = attention_mask
        self.token_index = token_index
        self.valid_len = rma_nn.valid_len_from_attention_mask(attention_mask)
        length = op.unsqueeze(self.valid_len, -1)  # (b, 1)
        row_start = op.cumsum(self.valid_len, axis=0, exclusive=True)  # (b,)
        # (b + 1,): row b's tokens are packed rows [seq_start[b], seq_start[b + 1])
        total = op.sum(self.valid_len, axis=0, keepdims=True)  # (1,)
        self.seq_start = op.concat([row_start, total], dim=0)
        if side == "left":  # column - (s - L)
            col = op.add(op.unsqueeze(op.arange(-self.seq, 0, dtype="int32"), 0), length)
        else:
            col = op.unsqueeze(op.arange(0, self.seq, dtype="int32"), 0)  # (1, s)
        within = op.minimum(op.maximum(col, op.zeros((1, 1), "int32")),
                            op.subtract(length, op.full((1, 1), 1, "int32")))
        slots = op.add(op.unsqueeze(row_start, -1), within)  # (b, s); -1 only for empty rows
        slots = op.maximum(slots, op.zeros((1, 1), "int32"))  # (to_padded zeroes those rows)
        self.slot_index = op.reshape(slots, (self.batch * self.seq,), name="slot_index")

    def positions(self) -> nn.Tensor:
        """``[t]`` int32: each token's column in the padded batch (Hugging Face's default
        position ids: right padding starts at 0; left padding counts the padding too)."""
        cols = op.broadcast_to(op.arange(0, self.seq, dtype="int32"), (self.batch, self.seq))
        return self.to_packed(cols)

    def to_padded(self, x: nn.Tensor) -> nn.Tensor:
        """``[t, f]`` -> ``[b, s, f]``, padding slots 0."""
        padded = op.reshape(_gather(x, self.slot_index), (self.batch, self.seq, x.shape[1]))
        real = op.unsqueeze(op.astype(self.attention_mask, x.dtype), -1)  # (b, s, 1)
        return op.multiply(padded, real, name="to_padded")

    def to_packed(self, x: nn.Tensor) -> nn.Tensor:
        """``[b, s, *f]`` -> ``[t, *f]``."""
        return _gather(op.reshape(x, (self.batch * self.seq, *x.shape[2:])), self.token_index)

    def attention(self, q: nn.Tensor, k: nn.Tensor, v: nn.Tensor, causal: bool) -> nn.Tensor:
        """``packed_sequence_prefill`` of packed ``[t, heads, head_dim]`` q/k/v: each row's
        tokens attend among themselves, no padding in between."""
        return rma_nn.packed_sequence_prefill(q, k, v, self.seq_start, self.seq, causal=causal)


def rope_tables(positions: nn.Tensor, theta: float, dim: int, dtype: str):
    """``(cos, signed sin)``, each ``[t, 1, 2, dim / 2]`` in ``dtype``: rotary angles
    ``pos * theta^(-2i/dim)`` of every token in the rotate-half layout, the sine negated on the
    first half (what :func:`rope` multiplies the swapped halves by). Computed once a forward,
    shared by every layer."""
    half = dim // 2
    # Constants computed here, not as ops: TVM's FoldConstant would build and run a kernel for
    # each op on them at every compile (a second of a Qwen3 compile).
    inv_freq = nn.Tensor.from_const(
        (theta ** (-2.0 * np.arange(half) / dim)).astype("float32")[None, :])  # (1, d/2)
    sign = nn.Tensor.from_const(np.repeat(np.array([-1.0, 1.0], "float32"), half)
                                .reshape(1, 1, 2, half))
    pos = op.astype(positions, "float32")  # (t,)
    freqs = op.unsqueeze(op.multiply(op.unsqueeze(pos, -1), inv_freq), 1)
    angles = op.unsqueeze(op.concat([freqs, freqs], dim=1), 1)  # (t, 1, 2, d/2)
    cos = op.astype(_unary(relax.op.cos, angles, "rope_cos"), dtype)
    sin = op.astype(op.multiply(_unary(relax.op.sin, angles, "rope_sin"), sign), dtype)
    return cos, sin


def rope(x: nn.Tensor, tables, name: str = "rope") -> nn.Tensor:
    """Rotary position embedding of ``[t, h, d]`` with :func:`rope_tables`' tables:
    ``x * cos + swap_halves(x) * signed_sin``, the halves swapped by a flip of a ``[t, h, 2,
    d / 2]`` view, so that every access is contiguous along the last axis (TVM's GPU schedules
    run it in 16-byte vectors; a split and concatenation did not vectorize)."""
    cos, sin = tables
    t, h, d = x.shape
    x4 = op.reshape(x, (t, h, 2, d // 2))
    swapped = op.wrap_nested(relax.op.flip(x4._expr, axis=2), f"{name}_swap")
    out = op.add(op.multiply(x4, cos), op.multiply(swapped, sin))
    return op.reshape(out, (t, h, d), name=name)
