"""The plain NumPy references of ``masked_sequence_prefill`` and ``packed_sequence_prefill``:
slow, float64 inside, obviously right.

Every fast kernel of the package is tested against this function.
"""

from __future__ import annotations

import math

import numpy as np

from .modes import is_causal, is_left_padded


def masked_sequence_prefill(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    valid_len: np.ndarray,
    mode: str = "padded",
    sm_scale: float | None = None,
) -> np.ndarray:
    """Attention over the real tokens of each batch row.

    Parameters
    ----------
    q : ndarray, ``[batch, seq_q, heads_q, head_dim]``
    k, v : ndarray, ``[batch, seq_kv, heads_kv, head_dim]``, ``heads_q % heads_kv == 0``
    valid_len : ndarray, ``[batch]``, the number of real tokens of each row, clamped into
        ``[0, min(seq_q, seq_kv)]``
    mode : str, one of :data:`relax_masked_attn.modes.MODES`
    sm_scale : float, optional, the softmax scale; ``1 / sqrt(head_dim)`` if not given

    Returns
    -------
    ndarray, ``[batch, seq_q, heads_q, head_dim]`` in q's dtype; rows of padding queries are 0.
    """
    causal, left = is_causal(mode), is_left_padded(mode)
    batch, seq_q, _, head_dim = q.shape
    seq_kv = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    out = np.zeros(q.shape, dtype=np.float64)
    for b in range(batch):
        n = int(np.clip(valid_len[b], 0, min(seq_q, seq_kv)))
        q_off, kv_off = (seq_q - n, seq_kv - n) if left else (0, 0)
        out[b, q_off : q_off + n] = _attend(
            q[b, q_off : q_off + n], k[b, kv_off : kv_off + n], v[b, kv_off : kv_off + n],
            causal, scale,
        )
    return out.astype(q.dtype)


def packed_sequence_prefill(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    seq_start: np.ndarray,
    causal: bool = False,
    sm_scale: float | None = None,
) -> np.ndarray:
    """Attention within each of the sequences packed one after another.

    q ``[t, heads_q, head_dim]``, k/v ``[t, heads_kv, head_dim]``; sequence ``b`` is rows
    ``[start, end)`` with ``start = clip(seq_start[b], 0, t)`` and
    ``end = clip(seq_start[b + 1], start, t)``. Rows of no sequence are 0.
    """
    t, _, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    out = np.zeros(q.shape, dtype=np.float64)
    for b in range(len(seq_start) - 1):
        start = int(np.clip(seq_start[b], 0, t))
        end = int(np.clip(seq_start[b + 1], start, t))
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], causal, scale)
    return out.astype(q.dtype)


def _attend(q, k, v, causal: bool, scale: float) -> np.ndarray:
    """Softmax attention of one sequence: q ``[n, heads_q, d]``, k/v ``[n, heads_kv, d]``;
    float64 ``[n, heads_q, d]``."""
    n, heads_q, _ = q.shape
    if n == 0:
        return np.zeros(q.shape, dtype=np.float64)
    group = heads_q // k.shape[1]
    qb = q.astype(np.float64)
    kb = np.repeat(k.astype(np.float64), group, axis=1)
    vb = np.repeat(v.astype(np.float64), group, axis=1)
    s = np.einsum("qhd,khd->hqk", qb, kb) * scale  # (heads_q, n, n)
    if causal:
        s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, vb)
