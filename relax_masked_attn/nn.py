"""``nn.Module``-level wrappers: call the op inside ``tvm.relax.frontend.nn`` graphs."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op as nn_op

from . import op as _op


def masked_sequence_prefill(
    q: nn.Tensor,
    k: nn.Tensor,
    v: nn.Tensor,
    valid_len: nn.Tensor,
    mode: str = "padded",
    sm_scale: float | None = None,
    name: str = "masked_sequence_prefill",
) -> nn.Tensor:
    """:func:`relax_masked_attn.masked_sequence_prefill` on ``nn.Tensor``.

    q ``[batch, seq_q, heads_q, head_dim]``, k/v ``[batch, seq_kv, heads_kv, head_dim]``,
    valid_len ``[batch]`` int32; returns ``[batch, seq_q, heads_q, head_dim]``.
    """
    call = _op.masked_sequence_prefill(q._expr, k._expr, v._expr, valid_len._expr, mode, sm_scale)
    return nn_op.wrap_nested(call, name)


def packed_sequence_prefill(
    q: nn.Tensor,
    k: nn.Tensor,
    v: nn.Tensor,
    seq_start: nn.Tensor,
    max_len,
    causal: bool = False,
    sm_scale: float | None = None,
    name: str = "packed_sequence_prefill",
) -> nn.Tensor:
    """:func:`relax_masked_attn.packed_sequence_prefill` on ``nn.Tensor``.

    q ``[t, heads_q, head_dim]``, k/v ``[t, heads_kv, head_dim]``, seq_start ``[batch + 1]``
    int32, ``max_len`` an int or a symbolic dim (such as a padded batch's ``seq``); returns
    ``[t, heads_q, head_dim]``.
    """
    call = _op.packed_sequence_prefill(
        q._expr, k._expr, v._expr, seq_start._expr, max_len, causal, sm_scale
    )
    return nn_op.wrap_nested(call, name)


def valid_len_from_attention_mask(mask: nn.Tensor, name: str = "valid_len") -> nn.Tensor:
    """The ``[batch]`` int32 count of ones of a ``[batch, seq]`` 0/1 attention mask.

    The mask is assumed to be one contiguous block of ones per row, on the side the mode says.
    """
    if mask.ndim != 2:
        raise ValueError(
            f"valid_len_from_attention_mask: mask should have 2 dimensions [batch, seq], "
            f"but got {mask.ndim}"
        )
    counts = nn_op.sum(nn_op.astype(mask, "int32"), axis=1)
    return nn_op.astype(counts, "int32", name=name)
