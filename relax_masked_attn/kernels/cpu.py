"""The CPU kernel of both attention ops (padded and packed): a tiled online-softmax loop in TIR.

One parallel task per (batch row, query head). Inside it, query tiles of ``TILE_Q`` rows walk key
tiles of ``TILE_K`` columns; only tiles that hold real, visible pairs are visited, so the cost
follows ``valid_len``, not the padded shape. Scores and the output update are vectorized (over the
key tile and over ``head_dim``), accumulation is float32 whatever the input dtype.

Each key tile's K and V rows are copied into local float32 tiles before the products, even for
float32 inputs: read where they lie (rows ``heads * head_dim`` apart), the products ran at
0.97-1.01x of this speed at head_dim 32, 0.95-0.96x at 64 and 0.78-0.80x at 128 (2-core Zen 3,
MiniLM's and two larger shapes, both forms timed in turn in one process).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..modes import is_causal, is_left_padded
from ..targets import cpu_isa
from .config import cpu_tiles
from .geometry import LOG2E, NEG_INF, attention_func
from .memo import memoized

PARTS = 256  # parallel parts; (batch row, head) pairs go to them in turn (a power of two)


def _bit_reversed(part: tirx.PrimExpr) -> tirx.PrimExpr:
    """``part``'s bits in reverse order, over log2(PARTS) bits (an int64)."""
    bits = PARTS.bit_length() - 1
    x = tirx.Cast("int64", part)
    out = tirx.const(0, "int64")
    for i in range(bits):
        bit = tirx.bitwise_and(tirx.shift_right(x, tirx.const(i, "int64")), tirx.const(1, "int64"))
        out = out + tirx.shift_left(bit, tirx.const(bits - 1 - i, "int64"))
    return out

# 2**f on [-0.5, 0.5], Cephes exp2f's minimax polynomial (relative error about 1e-7).
_EXP2_POLY = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
)


def fast_exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32 ``2**x`` for ``x <= 0`` (the online softmax's exponents: a score, or an old row
    maximum, minus the new row maximum) from a polynomial and the exponent bits, so LLVM
    vectorizes it (it lowers a vector ``exp2`` to one libm call per lane).

    Clamped at -127, whose exponent field is 0: inputs below -126.5 give exactly 0 with
    no further select (``NEG_INF`` scores included). Positive inputs are outside its domain."""
    f32 = "float32"
    xc = tirx.max(x, tirx.const(-127.0, f32))
    n = tirx.round(xc)
    f = xc - n
    poly = tirx.const(_EXP2_POLY[0], f32)
    for coef in _EXP2_POLY[1:]:
        poly = poly * f + tirx.const(coef, f32)
    bits = tirx.shift_left(tirx.Cast("int32", n) + 127, tirx.const(23, "int32"))
    return (poly * f + 1.0) * tirx.reinterpret(f32, bits)


def cpu_kernel(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, mode: str, sm_scale: float,
    packed: bool = False, isa: str | None = None,
) -> tirx.PrimFunc:
    """PrimFunc ``(q, k, v, valid_len, out)`` for the CPU, batch and lengths symbolic; with
    ``packed``, the packed op's ``(q, k, v, seq_start, max_len, out)`` (``mode`` then says only
    whether attention is causal; see :func:`~relax_masked_attn.kernels.geometry.attention_func`).
    ``isa``: the vector ISA the tiles are sized for (``targets.cpu_isa``; default that of the
    current target, else ``avx2``)."""
    if isa is None:
        current = tvm.target.Target.current()
        isa = cpu_isa(current) if current is not None and current.kind.name == "llvm" else "avx2"
    return _cpu_kernel(heads_q, heads_kv, head_dim, dtype, mode, sm_scale, packed, isa)


@memoized
def _cpu_kernel(heads_q: int, heads_kv: int, head_dim: int, dtype: str, mode: str,
                sm_scale: float, packed: bool, isa: str) -> tirx.PrimFunc:
    causal, left = is_causal(mode), is_left_padded(mode)
    group = heads_q // heads_kv
    tiles = cpu_tiles(isa, head_dim)
    tq, tk = tiles.rows, tiles.keys
    kb, rb, jb = tiles.key_block, tiles.row_block, tiles.col_block
    qk_scale = float(sm_scale * LOG2E)  # scores live in the log2 domain: exp2 is cheaper than exp
    d = head_dim
    # TVM 0.27's LLVM lowering of bfloat16 cannot store bf16 vectors; store those lane by lane.
    store_loop = T.serial if dtype == "bfloat16" else T.vectorized

    @T.macro
    def body(q, k, v, rows, out, batch, seq_q, seq_kv):

        # Fewer pairs than PARTS: a part each, the rows interleaved (part p: row p % batch, head
        # p // batch); else PARTS parts, part p taking pairs bit_reversed(p) + PARTS * step. Either
        # way whichever contiguous range of parts a thread runs, it gets rows of every length.
        # Every part pays for its buffers (TVM takes them from its workspace pool): 256 parts
        # for a one-text batch's 12 pairs cost 0.1 ms a call.
        for part in T.parallel(T.min(batch * heads_q, PARTS)):
            # Q transposed and scores transposed: the softmax runs as vectors across query rows
            q_t = T.alloc_buffer((d, tq), "float32", scope="local")
            k_tile = T.alloc_buffer((tk, d), "float32", scope="local")
            v_tile = T.alloc_buffer((tk, d), "float32", scope="local")
            s_t = T.alloc_buffer((tk, tq), "float32", scope="local")
            acc = T.alloc_buffer((tq, d), "float32", scope="local")
            row_max = T.alloc_buffer((tq,), "float32", scope="local")
            new_max = T.alloc_buffer((tq,), "float32", scope="local")
            row_sum = T.alloc_buffer((tq,), "float32", scope="local")
            rescale = T.alloc_buffer((tq,), "float32", scope="local")
            s_blk = T.alloc_buffer((kb, tq), "float32", scope="local")
            o_blk = T.alloc_buffer((rb, jb), "float32", scope="local")

            first: T.let[T.int64] = T.if_then_else(
                batch * heads_q < PARTS, part % batch * heads_q + part // batch,
                _bit_reversed(part))
            for step in T.serial(T.max(batch * heads_q - first + PARTS - 1, 0) // PARTS):
                bh: T.let[T.int64] = first + step * PARTS
                b: T.let[T.int64] = rows.heads(bh, heads_q, group)[0]
                h: T.let[T.int64] = rows.heads(bh, heads_q, group)[1]
                h_kv: T.let[T.int64] = rows.heads(bh, heads_q, group)[2]
                n: T.let[T.int64] = rows.length(b)
                q_off: T.let[T.int64] = rows.offsets(b, n)[0]
                kv_off: T.let[T.int64] = rows.offsets(b, n)[1]
                bi: T.let[T.int64] = rows.offsets(b, n)[2]

                # Padding queries (packed: rows of no sequence): exact zeros.
                if packed:
                    head_end: T.let[T.int64] = rows.uncovered(b)[0]
                    tail_begin: T.let[T.int64] = rows.uncovered(b)[1]
                    for r in T.serial(head_end):
                        for j in store_loop(d):
                            out[bi, r, h, j] = T.Cast(dtype, T.float32(0))
                    for r in T.serial(rows.total - tail_begin):
                        for j in store_loop(d):
                            out[bi, tail_begin + r, h, j] = T.Cast(dtype, T.float32(0))
                else:
                    for r in T.serial(seq_q - n):
                        for j in store_loop(d):
                            out[b, T.if_then_else(left, r, n + r), h, j] = T.Cast(
                                dtype, T.float32(0))

                for qt in T.serial((n + tq - 1) // tq):
                    r0: T.let[T.int64] = qt * tq
                    for i in T.serial(tq):
                        for j in T.serial(d):
                            q_t[j, i] = T.if_then_else(
                                r0 + i < n,
                                T.Cast("float32", q[bi, q_off + T.min(r0 + i, n - 1), h, j])
                                * qk_scale,
                                T.float32(0),
                            )
                    for i in T.vectorized(tq):
                        row_max[i] = NEG_INF
                        row_sum[i] = T.float32(0)
                    for i in T.serial(tq):
                        for j in T.vectorized(d):
                            acc[i, j] = T.float32(0)

                    # Keys this query tile can see: all n, or up to its last row when causal.
                    kv_end: T.let[T.int64] = T.if_then_else(causal, T.min(n, r0 + tq), n)
                    for kt in T.serial((kv_end + tk - 1) // tk):
                        c0: T.let[T.int64] = kt * tk
                        # the tile's keys that exist (a sequence's last tile is partial): only those
                        # are loaded, scored and summed, in whole key blocks for the scores
                        kc: T.let[T.int64] = T.min(tk, kv_end - c0)
                        for c in T.serial((kc + kb - 1) // kb * kb):
                            for j in T.vectorized(d):
                                k_tile[c, j] = T.if_then_else(
                                    c0 + c < kv_end,
                                    T.Cast("float32",
                                           k[bi, kv_off + T.min(c0 + c, n - 1), h_kv, j]),
                                    T.float32(0),
                                )
                                v_tile[c, j] = T.if_then_else(
                                    c0 + c < kv_end,
                                    T.Cast("float32",
                                           v[bi, kv_off + T.min(c0 + c, n - 1), h_kv, j]),
                                    T.float32(0),
                                )
                        # S^T = K Q^T, kb keys at a time in registers; masked scores get NEG_INF
                        for cb in T.serial((kc + kb - 1) // kb):
                            for c in T.unroll(kb):
                                for i in T.vectorized(tq):
                                    s_blk[c, i] = T.float32(0)
                            for j in T.serial(d):
                                for c in T.unroll(kb):
                                    for i in T.vectorized(tq):
                                        s_blk[c, i] = (s_blk[c, i]
                                                       + k_tile[cb * kb + c, j] * q_t[j, i])
                            for c in T.unroll(kb):
                                for i in T.vectorized(tq):
                                    s_t[cb * kb + c, i] = T.if_then_else(
                                        (c0 + cb * kb + c < kv_end)
                                        and ((not causal) or (c0 + cb * kb + c <= r0 + i)),
                                        s_blk[c, i],
                                        NEG_INF,
                                    )
                        # online softmax, vectors across the tile's query rows
                        for i in T.vectorized(tq):
                            new_max[i] = row_max[i]
                        for c in T.serial(kc):
                            for i in T.vectorized(tq):
                                new_max[i] = T.max(new_max[i], s_t[c, i])
                        for i in T.vectorized(tq):
                            rescale[i] = fast_exp2(row_max[i] - new_max[i])
                            row_max[i] = new_max[i]
                            row_sum[i] = row_sum[i] * rescale[i]
                        for c in T.serial(kc):
                            for i in T.vectorized(tq):
                                s_t[c, i] = fast_exp2(s_t[c, i] - new_max[i])
                                row_sum[i] = row_sum[i] + s_t[c, i]
                        # O = O * rescale + P V, rb rows by jb columns at a time in registers
                        for ob in T.serial(d // jb):
                            for ib in T.serial(tq // rb):
                                for r in T.unroll(rb):
                                    for j in T.vectorized(jb):
                                        o_blk[r, j] = (acc[ib * rb + r, ob * jb + j]
                                                       * rescale[ib * rb + r])
                                for c in T.serial(kc):
                                    for r in T.unroll(rb):
                                        for j in T.vectorized(jb):
                                            o_blk[r, j] = (o_blk[r, j] + s_t[c, ib * rb + r]
                                                           * v_tile[c, ob * jb + j])
                                for r in T.unroll(rb):
                                    for j in T.vectorized(jb):
                                        acc[ib * rb + r, ob * jb + j] = o_blk[r, j]

                    for i in T.serial(T.min(tq, n - r0)):
                        for j in store_loop(d):
                            out[bi, q_off + r0 + i, h, j] = T.Cast(dtype, acc[i, j] / row_sum[i])

    return attention_func(
        heads_q, heads_kv, head_dim, dtype, body, index_dtype="int64", scheduled=False,
        packed=packed, left=left,
    )
