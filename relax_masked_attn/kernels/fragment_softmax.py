"""The masking and online softmax both tensor-core attention kernels run on their S
accumulators, in the ``m16n8`` accumulator layout that ``mma.sync`` and ``wgmma`` share.

A thread holds, for each of its ``atoms`` m16 row tiles and each 8-column n-tile ``j``, four
fp32 values ``c = 0..3``: key column ``c0 + 8 j + 2 t4 + c % 2`` of query row
``row_base + 16 a + 8 (c // 2)`` (``t4 = lane % 4``, ``row_base`` the thread's first row). The
four threads of a quad share a row, so row statistics are quad-reduced.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .geometry import NEG_INF

FLOAT32_LOWEST = -3.4028234663852886e38


def fragment_softmax(atoms: int, s_tiles: int, o_tiles: int, qk_scale: float, causal: bool,
                     rescale_output: bool = True):
    """A ``T.macro`` ``online_softmax(s, o, m_i, m_new, alpha, l_i, c0, kv_end, masked,
    row_base, t4)`` over ``s [atoms, s_tiles, 4]`` (S of one key tile, raw products; it leaves
    ``P = exp2(S * qk_scale - max)``), ``o [atoms, o_tiles, 4]`` (the output accumulators,
    rescaled) and the running row statistics ``m_i``, ``l_i`` (with scratch ``m_new``,
    ``alpha``), each ``[atoms, 2]`` for rows ``g`` and ``g + 8``. Where ``masked`` (a tile
    crossing the end ``kv_end`` of the real keys, or the causal diagonal), invisible scores
    become ``NEG_INF / qk_scale``, so that they scale to ``NEG_INF``.

    S stays unscaled: the row max is taken over the raw products and scaled once a row
    (``qk_scale > 0``, which the op checks), and each exponent is one fused multiply-add,
    ``exp2(fma(s, qk_scale, -max))``, as FlashAttention-3 computes it: a separate multiply
    of every score would cost one more FP32 instruction an element in the softmax, the part
    of the kernel that the tensor cores wait on. ``m_i`` is kept scaled.

    ``rescale_output=False`` leaves ``o`` alone (a kernel whose O += P V of the previous tile
    is still in flight scales ``o`` by ``alpha`` once it is done: :func:`rescale`)."""
    assert qk_scale > 0, qk_scale
    scale_rows = _row_scaler(o_tiles)
    # a masked raw score: NEG_INF once scaled (at most float32's lowest value: with a scale
    # under 3e-9 it scales to less than NEG_INF, still far below any real score)
    hidden = max(NEG_INF / qk_scale, FLOAT32_LOWEST)

    @T.macro
    def online_softmax(s, o, m_i, m_new, alpha, l_i, c0, kv_end, masked, row_base, t4):
        if masked:
            for a in T.unroll(atoms):
                for j in T.unroll(s_tiles):
                    for c in T.unroll(4):
                        s[a, j, c] = T.if_then_else(
                            (c0 + j * 8 + t4 * 2 + c % 2 < kv_end)
                            and (
                                (not causal)
                                or (c0 + j * 8 + t4 * 2 + c % 2
                                    <= row_base + a * 16 + (c // 2) * 8)
                            ),
                            s[a, j, c],
                            T.float32(hidden),
                        )
        # New row max over the tile (raw, then scaled), quad-reduced; rescale what came before.
        for a in T.unroll(atoms):
            for i in T.unroll(2):
                m_new[a, i] = T.max(s[a, 0, 2 * i], s[a, 0, 2 * i + 1])
                for j in T.unroll(1, s_tiles):
                    m_new[a, i] = T.max(m_new[a, i], T.max(s[a, j, 2 * i], s[a, j, 2 * i + 1]))
                m_new[a, i] = T.max(m_i[a, i], T.cuda.warp_max(m_new[a, i], 4) * qk_scale)
                alpha[a, i] = T.exp2(m_i[a, i] - m_new[a, i])
                m_i[a, i] = m_new[a, i]
                l_i[a, i] = l_i[a, i] * alpha[a, i]
                for j in T.unroll(s_tiles):
                    for c in T.unroll(2):
                        s[a, j, 2 * i + c] = T.exp2(s[a, j, 2 * i + c] * qk_scale - m_new[a, i])
                        l_i[a, i] = l_i[a, i] + s[a, j, 2 * i + c]
            if rescale_output:
                scale_rows(o, alpha, a)

    return online_softmax


def rescale(atoms: int, o_tiles: int):
    """A ``T.macro`` ``rescale_o(o, alpha)``: the output accumulators ``o [atoms, o_tiles, 4]``
    times the row factors ``alpha [atoms, 2]`` that :func:`fragment_softmax` left."""
    scale_rows = _row_scaler(o_tiles)

    @T.macro
    def rescale_o(o, alpha):
        for a in T.unroll(atoms):
            scale_rows(o, alpha, a)

    return rescale_o


def _row_scaler(o_tiles: int):
    """``scale_rows(o, alpha, a)``: m16 tile ``a`` of ``o`` times its rows' ``alpha``."""

    @T.macro
    def scale_rows(o, alpha, a):
        for j in T.unroll(o_tiles):
            for c in T.unroll(4):
                o[a, j, c] = o[a, j, c] * alpha[a, c // 2]

    return scale_rows
