"""The Hopper (``sm_90a``) tensor-core kernel of both attention ops, on ``wgmma.mma_async``.

Same FlashAttention-2 structure and the same tile geometry as :mod:`.cuda_mma` (a block owns
128 query rows of one (batch row, query head); key tiles; only tiles holding real, visible
keys are loaded; padding rows zeroed by the same grid), but the products run on Hopper's
warpgroup MMA:

* the block is two warpgroups, each owning 64 of the query rows;
* S = Q K^T: ``wgmma.m64n{keys}k16`` with both operands read by the tensor cores from shared memory
  through matrix descriptors (Q and K tiles K-major, 128-byte swizzle, as the dense kernel's);
* O += P V: ``wgmma.m64n{head_dim}k16`` with P straight from the S accumulators (registers: the
  accumulator layout of S is the A-fragment layout, packed to 16 bits) and V from shared memory
  through an MN-major descriptor (the tile is stored like K's; ``imm-trans-b`` reads it as
  ``[keys, head_dim]``);
* Q arrives by ``cp.async``; K and V of the next key tile by TMA (the default: one thread
  copies a tile's boxes of a 3-D tensor map behind an mbarrier, one for K and one for V a
  stage; the V rows past the real keys are zeroed in shared memory) or by ``cp.async``, during
  the current tile; the online softmax runs in registers;
* the output leaves through shared memory in 16-byte vectors (``geometry.staged_output``);
* the grid runs heads innermost, then query tiles (the longest first), then batch rows, so the
  blocks resident at once share their K and V through L2.

Each query tile's key tiles run in one of two loops (``config.wgmma_attention_tiles``):
``serial_tiles``, each tile's S, softmax and O += P V in turn (the default), or
``overlapped_tiles``, FlashAttention-3's intra-warpgroup overlap: S of tile kt + 1 is issued
before O += P V(kt), and its softmax runs while O += P V(kt) is on the tensor cores; key
tiles are 64 or 128 keys (``WgmmaAttentionTiles.key_tile``), and K and V arrive by TMA or
``cp.async`` (``tma_kv``) in either loop. Every layout passes the GPU tests on the H200; the
sweep that chose the default is in ``config.wgmma_attention_tiles``.

``specialized`` (opt-in: passes the GPU tests, slower than the default on the H200, see
``config.wgmma_attention_tiles``) is FlashAttention-3's block structure: one persistent block an
SM of three warpgroups, each block taking a (batch row, query tile, head) work item a round
(``geometry.PersistentTileGrid``). Warpgroup 0 gives up registers (``setmaxnreg``) and one of
its threads copies each query tile's Q and its K and V tiles by TMA (three tensor maps) into a
two-stage ring: K's or V's tile of a stage once both consumers have released it (an ``empty``
mbarrier of two arrivals; K's as soon as S = Q K^T on it is done), Q's tile once both have
finished the last tile's products; the output leaves through a staging tile of its own, so the
next tile's Q and first K and V land while the last one's output is written. Warpgroups 1 and 2
(232 registers) own 64 query rows each and take turns at the
tensor cores: each issues its products only in its turn (named barriers 1 and 2) and hands the
turn over, so that its softmax runs under the other's products. Their key loop is the serial
one (S = Q K^T in a turn) or, with ``overlap``, FlashAttention-3's intra-warpgroup overlap
(S of tile kt + 1 and O += P V(kt) in one turn, the softmax of kt + 1 while the latter runs);
key tiles of 64 or 128. Their shared
memory accesses outside the tensor cores (the V tail's zeros, the staged output) are
``st.shared`` / ``ld.shared`` ordered by each warpgroup's own named barrier, since TVM 0.27's
barrier planner cannot place a barrier inside a role's branch; the roles never join after the
barriers are set up.

Descriptors on 128-byte-swizzled tiles: 16-byte chunk ``c`` of a 64-element row ``r`` is stored
at chunk ``c ^ (r % 8)``; 8 rows make a 1024-byte atom; a tile wider than 64 elements is stored
as consecutive 64-wide column blocks. K-major (Q, K): stride 1024 bytes between 8-row groups,
the k-step advances the start by 32 bytes within a column block. MN-major (V): leading offset =
the distance between 64-wide column blocks, stride 1024 bytes between 8-key groups, the k-step
advances 16 keys (2048 bytes).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.target import Target

from ..modes import is_causal, is_left_padded
from ..targets import cuda_arch
from .config import WgmmaAttentionTiles, wgmma_attention_tiles
from .cuda_copy import row_loader
from .fragment_softmax import fragment_softmax, rescale
from .geometry import (
    LOG2E,
    NEG_INF,
    PersistentTileGrid,
    attention_func,
    padding_zeroer,
    staged_output,
    tensor_core_grid,
)
from .hopper import (
    PERSISTENT_BLOCKS,
    copy_head_tile,
    encode_head_tiles,
    init_barrier,
    realign_pool,
    swizzle128_descriptor,
    wait_barrier,
    wait_released,
)
from .memo import memoized

SUPPORTED_HEAD_DIMS = (64, 128)
ROWS, THREADS = 128, 256  # query rows a block (2 warpgroups x 64)
# The warp-specialized block: a producer warpgroup and the two consumer ones, one block an SM;
# registers a thread after `setmaxnreg` (128 x 40 + 256 x 232 <= 65536).
SPECIALIZED_THREADS = 384
SPECIALIZED_PRODUCER_REGISTERS, SPECIALIZED_CONSUMER_REGISTERS = 40, 232
# Named barriers of the warp-specialized block (256 threads): consumer 1's and consumer 2's
# turn at the tensor cores (each waits on its own, the other arrives); then (128 threads) each
# consumer's own, ordering its writes and reads of shared memory (id 0: __syncthreads).
SCHEDULER_BARRIERS = (1, 2)
WARPGROUP_BARRIERS = (3, 4)


def supports(target: Target, head_dim: int, dtype: str) -> bool:
    """Whether this kernel serves (target, head_dim, dtype): ``sm_90a`` (``wgmma``), fp16/bf16,
    head_dim 64 or 128."""
    return (target.kind.name == "cuda" and cuda_arch(target) == "sm_90a"
            and dtype in ("float16", "bfloat16") and head_dim in SUPPORTED_HEAD_DIMS)


@memoized
def wgmma_attention_kernel(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, mode: str, sm_scale: float,
    packed: bool = False, tiles=None,
) -> tirx.PrimFunc:
    """The PrimFunc of :func:`~relax_masked_attn.kernels.cuda_mma.tensor_core_kernel` (padded or
    ``packed``), on ``wgmma``; for targets :func:`supports` accepts.

    ``tiles`` (a :class:`~relax_masked_attn.kernels.config.WgmmaAttentionTiles`, or a tuple of
    its first fields) overrides
    :func:`~relax_masked_attn.kernels.config.wgmma_attention_tiles`."""
    if head_dim not in SUPPORTED_HEAD_DIMS or dtype not in ("float16", "bfloat16"):
        raise ValueError(f"wgmma_attention_kernel: head_dim {head_dim} / {dtype} not supported")
    causal, left = is_causal(mode), is_left_padded(mode)
    group = heads_q // heads_kv
    min_blocks, defer_pv, stages, staged_out, overlap, cols, tma_kv, specialized = (
        WgmmaAttentionTiles(*(tiles or wgmma_attention_tiles(head_dim, dtype))))
    if stages not in (1, 2) or cols not in (64, 128):
        raise ValueError(f"wgmma_attention_kernel: 1 or 2 K/V stages of 64 or 128 keys, not "
                         f"{stages} of {cols}")
    if (overlap or tma_kv) and (stages != 2 or defer_pv):
        raise ValueError("wgmma_attention_kernel: the overlapped loop and TMA copies run on 2 "
                         "stages, with O += P V not deferred")
    if specialized and (min_blocks != 1 or not tma_kv or not staged_out):
        raise ValueError("wgmma_attention_kernel: the warp-specialized block runs one block an "
                         "SM, K and V by TMA and the staged output")
    d = head_dim
    chunks = d // 8  # 16-byte chunks in one row of a tile
    q_elems, kv_elems = ROWS * d, cols * d
    # Q, then K and V of each stage (specialized: then the output's staging tile, so that the
    # next tile's Q can land while this one's output leaves); + 1 KiB to realign the pool
    o_elem = q_elems + 2 * stages * kv_elems
    pool_elems = o_elem + (q_elems if specialized else 0) + 512
    if pool_elems * 2 * min_blocks > 227 * 1024:
        raise ValueError(f"wgmma_attention_kernel: {min_blocks} blocks of {pool_elems * 2} bytes "
                         "of shared memory do not fit an SM's 227 KiB")
    qk_scale = float(sm_scale * LOG2E)
    ab = "f16" if dtype == "float16" else "bf16"
    wgmma_s = f"wgmma.mma_async.sync.aligned.m64n{cols}k16.f32.{ab}.{ab}"
    wgmma_o = f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.{ab}.{ab}"
    pack = f"cvt.rn.{ab}x2.f32"
    s_len, o_len = cols // 2, d // 2  # fp32 accumulators a thread
    zero_padding = padding_zeroer(dtype, d, THREADS)
    online_softmax = fragment_softmax(1, cols // 8, d // 8, qk_scale, causal)
    scores_only = fragment_softmax(1, cols // 8, d // 8, qk_scale, causal, rescale_output=False)
    rescale_o = rescale(1, d // 8)

    def row_registers():
        """A warpgroup's registers for its 64 query rows (called in a macro, where the buffers
        are declared): ``(s_acc, o_acc, p_frag, m_i, l_i, s_acc3, o_acc3, m_i2, l_i2, m_new2,
        alpha2)``: S's and O's accumulators, P's fragments, the running maxima (rows g and
        g + 8) and this lane's part of the row sums, then the same registers as
        fragment_softmax's [atoms = 1, tiles, 4] and [1, 2] views (with the new maxima and
        rescale factors)."""
        s_acc = T.alloc_buffer((s_len,), "float32", scope="local")
        o_acc = T.alloc_buffer((o_len,), "float32", scope="local")
        p_frag = T.alloc_buffer((cols // 16, 4), "uint32", scope="local")
        m_i = T.alloc_buffer((2,), "float32", scope="local")
        l_i = T.alloc_buffer((2,), "float32", scope="local")
        # named as the parser names what a macro assigns: these two are not returned
        m_new = IRBuilder.name("m_new", T.alloc_buffer((2,), "float32", scope="local"))
        alpha = IRBuilder.name("alpha", T.alloc_buffer((2,), "float32", scope="local"))
        return (s_acc, o_acc, p_frag, m_i, l_i,
                T.decl_buffer((1, cols // 8, 4), "float32", data=s_acc.data, scope="local"),
                T.decl_buffer((1, d // 8, 4), "float32", data=o_acc.data, scope="local"),
                T.decl_buffer((1, 2), "float32", data=m_i.data, scope="local"),
                T.decl_buffer((1, 2), "float32", data=l_i.data, scope="local"),
                T.decl_buffer((1, 2), "float32", data=m_new.data, scope="local"),
                T.decl_buffer((1, 2), "float32", data=alpha.data, scope="local"))

    def swizzled(count, r, c):
        """Element offset of 16-byte chunk ``c`` of row ``r`` in a ``count``-row tile."""
        return (c // 8) * (count * 64) + r * 64 + ((c % 8) ^ (r % 8)) * 8

    load_rows = row_loader(THREADS, chunks)
    stage, write = staged_output(dtype, d, heads_q, lambda r, c: swizzled(ROWS, r, c))

    def swizzled_tile(smem, region, count):
        """Chunk ``c`` of row ``r`` of the ``count``-row tile at element ``region`` of ``smem``."""
        return lambda r, c: smem.ptr_to([region + swizzled(count, r, c)])

    @T.macro
    def load_tile(smem, region, src, bi, h, off, n, c0, end, count, tx):
        """cp.async rows [c0, c0 + count) of head ``h``'s real block into the swizzled tile at
        element ``region``."""
        load_rows(swizzled_tile(smem, region, count), src, bi, h, off, n, c0, end, count, tx)

    @T.macro
    def tma_tile(smem, pad, tmap, full, operand, stage, row, h_kv, tx):
        """Thread 0: the TMA copy of the K (``operand`` 0) or V (1) tile of key row ``row`` (of
        the map's rows) into ring stage ``stage``, completing barrier ``full[2 operand + stage]``
        by its bytes (``head_dim / 64`` boxes)."""
        if tx == 0:
            T.ptx.mbarrier.arrive.expect_tx.shared.b64(full.ptr_to([2 * operand + stage]),
                                                       T.uint32(kv_elems * 2))
            for cb in T.unroll(d // 64):
                copy_head_tile(smem.ptr_to([pad + q_elems + stage * 2 * kv_elems
                                            + operand * kv_elems + cb * cols * 64]),
                               tmap, row, h_kv, cb * 64, full.ptr_to([2 * operand + stage]))

    @T.macro
    def wait_tile(kv, operand, stage):
        """Every thread: wait for the K (``operand`` 0) or V (1) tile in ``stage``; ``kv`` as
        :func:`serial_tiles` takes it (the barrier's parity flips with each copy it completes)."""
        wait_barrier(kv[2].ptr_to([2 * operand + stage]), kv[3][2 * operand + stage])
        kv[3][2 * operand + stage] = kv[3][2 * operand + stage] ^ 1

    def v_tail_zeroer(threads: int, opaque: bool = False):
        """A macro ``zero_v_tail(words, pad, stage, first, tx)`` by which ``threads`` threads
        zero the rows ``first`` on of the V tile in ``stage`` (keys past the real block, which
        TMA copies as they are: P is 0 there, but 0 times a NaN or an infinity is not);
        ``opaque``: by ``st.shared``, unseen by TVM's barrier planner."""

        def word(pad, stage, it, tx):
            """The first word of the 16 bytes thread ``tx`` zeroes in step ``it``."""
            return pad // 8 * 4 + (q_elems + stage * 2 * kv_elems + kv_elems + swizzled(
                cols, (it * threads + tx) // chunks, (it * threads + tx) % chunks)) // 2

        @T.macro
        def zero_v_tail(words, pad, stage, first, tx):
            for it in T.serial((cols * chunks + threads - 1) // threads):
                if (it * threads + tx) // chunks < cols and (it * threads + tx) // chunks >= first:
                    if opaque:
                        T.ptx.st.shared.v4.b32(words.ptr_to([word(pad, stage, it, tx)]),
                                               T.uint32(0), T.uint32(0), T.uint32(0),
                                               T.uint32(0))
                    else:
                        words[T.Ramp(word(pad, stage, it, tx), 1, 4)] = T.Broadcast(
                            T.uint32(0), 4)

        return zero_v_tail

    zero_v_tail = v_tail_zeroer(THREADS)

    @T.macro
    def s_product(s_acc, descs, stage):
        """Issue S = Q K^T of this warpgroup's 64 rows on the K tile of ring stage ``stage``
        into ``s_acc`` (zeroed first), committed as one wgmma group."""
        for i in T.unroll(s_len):
            s_acc[i] = T.float32(0)
        T.ptx.wgmma.fence.sync.aligned()
        for kk in T.unroll(d // 16):
            T.ptx[wgmma_s](
                *[s_acc[i] for i in range(s_len)],
                descs[0] + T.uint64(((kk // 4) * (ROWS * 64) * 2 + (kk % 4) * 32) >> 4),
                descs[1] + T.uint64(((kk // 4) * (cols * 64) * 2 + (kk % 4) * 32) >> 4)
                + T.Cast("uint64", stage * (kv_elems // 4)),
                T.bool(True), 1, 1, 0, 0,
            )
        T.ptx.wgmma.commit_group.sync.aligned()

    @T.macro
    def pack_p(p_frag, s_acc):
        """P's A fragments from S's accumulators: step kk's are S tiles 2kk and 2kk + 1, rows g
        and g + 8, packed to 16 bits (all packed before the first wgmma reads them: the
        instructions read their registers asynchronously)."""
        for kk in T.unroll(cols // 16):
            for x in T.unroll(4):
                T.ptx[pack](
                    p_frag[kk, x],
                    s_acc[(2 * kk + x // 2) * 4 + (x % 2) * 2 + 1],
                    s_acc[(2 * kk + x // 2) * 4 + (x % 2) * 2],
                )

    @T.macro
    def pv_product(o_acc, p_frag, descs, stage):
        """Issue O += P V, 16 keys a step, on the V tile of ring stage ``stage``, committed as
        one wgmma group."""
        T.ptx.wgmma.fence.sync.aligned()
        for kk in T.unroll(cols // 16):
            T.ptx[wgmma_o](
                *[o_acc[i] for i in range(o_len)],
                p_frag[kk, 0], p_frag[kk, 1], p_frag[kk, 2], p_frag[kk, 3],
                descs[2] + T.uint64((kk * 16 * 128) >> 4)
                + T.Cast("uint64", stage * (kv_elems // 4)),
                T.bool(True), 1, 1, 1,
            )
        T.ptx.wgmma.commit_group.sync.aligned()

    @T.macro
    def first_descriptors(descs, base, pad, wg):
        """The descriptors of the k-step-0 operands (Q of warpgroup ``wg``, K and V of stage
        0); a k-step or a stage adds to the start address field (16-byte units)."""
        descs[0] = swizzle128_descriptor(base[0] + T.Cast("uint32", (pad + wg * 64 * 64) * 2), 16)
        descs[1] = swizzle128_descriptor(base[0] + T.Cast("uint32", (pad + q_elems) * 2), 16)
        descs[2] = swizzle128_descriptor(base[0] + T.Cast("uint32", (pad + q_elems + kv_elems) * 2),
                                         cols * 128)

    @T.macro
    def reset_rows(m_i, l_i, o_acc):
        """A query tile's running maxima, sums and output accumulators, before its first key."""
        for i in T.unroll(2):
            m_i[i] = NEG_INF
            l_i[i] = T.float32(0)
        for i in T.unroll(o_len):
            o_acc[i] = T.float32(0)

    @T.macro
    def first_scores(s_acc, p_frag, s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, kv_end, w0,
                     row0, t4):
        """The overlapped loops' start: once S of key tile 0 is done, its online softmax and
        P's fragments."""
        T.ptx.wgmma.wait_group.sync.aligned(0)
        online_softmax(s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, 0, kv_end,
                       cols > kv_end or (causal and cols - 1 > w0), row0, t4)
        pack_p(p_frag, s_acc)

    @T.macro
    def next_scores(s_acc, p_frag, s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, c0, kv_end, w0,
                    row0, t4):
        """The overlapped loops' step once S(kt + 1) and O += P V(kt) are issued: the softmax
        of key tile kt + 1 (at ``c0 + cols``) as soon as S is done, while the other product
        runs; then O rescaled to the new row maxima and P(kt + 1) packed."""
        T.ptx.wgmma.wait_group.sync.aligned(1)  # S(kt + 1) done; O += P V(kt) runs on
        scores_only(s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, c0 + cols, kv_end,
                    c0 + 2 * cols > kv_end or (causal and c0 + 2 * cols - 1 > w0), row0, t4)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        rescale_o(o_acc3, alpha2)  # O in the scale of the new row maxima
        pack_p(p_frag, s_acc)

    @T.macro
    def serial_tiles(q, k, v, smem, pad, descs, s_acc, o_acc, p_frag, s_acc3, o_acc3, m_i, l_i,
                     m_i2, m_new2, alpha2, l_i2, bi, h, h_kv, q_off, kv_off, n, r0, w0, row0,
                     kv_end, num_kt, t4, tx, kv):
        """The key tiles of one query tile, each tile's S, softmax and O += P V in turn (the
        other warpgroups of the SM keep the tensor cores busy meanwhile). ``kv``: with TMA
        copies, ``(k_map, v_map, full, phase, words)``: the tensor maps, the barriers of K's two
        stages then V's, the parity each barrier's next copy completes, the pool as uint32."""
        load_tile(smem, pad, q, bi, h, q_off, n, r0, n, ROWS, tx)
        if tma_kv:
            # the real block's first key, in the tensor maps' rows (bound here only: the
            # cp.async form does not compute it)
            row = bi * k.shape[1] + kv_off
            tma_tile(smem, pad, kv[0], kv[2], 0, 0, row, h_kv, tx)
            tma_tile(smem, pad, kv[1], kv[2], 1, 0, row, h_kv, tx)
        else:
            load_tile(smem, pad + q_elems, k, bi, h_kv, kv_off, n, 0, kv_end, cols, tx)
            if stages == 2:
                load_tile(smem, pad + q_elems + kv_elems, v, bi, h_kv, kv_off, n, 0, kv_end,
                          cols, tx)
        T.ptx.cp.async_.commit_group()
        reset_rows(m_i, l_i, o_acc)
        for kt in T.serial(num_kt):
            c0 = kt * cols
            T.ptx.cp.async_.wait_group(0)
            T.ptx.fence.proxy.async_.shared__cta()  # our copies, seen by the tensor cores
            if defer_pv:
                T.ptx.wgmma.wait_group.sync.aligned(0)  # O += P V(kt - 1) ran meanwhile
            if tma_kv:
                wait_tile(kv, 0, kt % 2)  # K(kt) landed
                wait_tile(kv, 1, kt % 2)  # V(kt)
                if c0 + cols > kv_end:
                    zero_v_tail(kv[4], pad, kt % 2, kv_end - c0, tx)
                    T.ptx.fence.proxy.async_.shared__cta()
                # every warp is done with tile kt - 1's stage (and the zeros are seen)
                T.tvm_storage_sync("shared")
            else:
                T.cuda.cta_sync()  # K(kt) (and Q) landed; every warp is done with V(kt - 1)
            if stages == 2:
                # K and V of tile kt + 1 into the other stage, a whole tile ahead.
                if kt + 1 < num_kt:
                    if tma_kv:
                        tma_tile(smem, pad, kv[0], kv[2], 0, (kt + 1) % 2, row + c0 + cols,
                                 h_kv, tx)
                        tma_tile(smem, pad, kv[1], kv[2], 1, (kt + 1) % 2, row + c0 + cols,
                                 h_kv, tx)
                    else:
                        load_tile(smem, pad + q_elems + (kt + 1) % 2 * 2 * kv_elems, k, bi,
                                  h_kv, kv_off, n, c0 + cols, kv_end, cols, tx)
                        load_tile(smem, pad + q_elems + (kt + 1) % 2 * 2 * kv_elems
                                  + kv_elems, v, bi, h_kv, kv_off, n, c0 + cols, kv_end,
                                  cols, tx)
            else:
                load_tile(smem, pad + q_elems + kv_elems, v, bi, h_kv, kv_off, n, c0,
                          kv_end, cols, tx)
            T.ptx.cp.async_.commit_group()
            # A causal tile wholly right of this warpgroup's rows adds nothing to them.
            if (not causal) or c0 < w0 + 64:
                s_product(s_acc, descs, kt % stages)
                T.ptx.wgmma.wait_group.sync.aligned(0)
                # Accumulator i is element (0, i // 4, i % 4) of the m16n8 layout
                # (fragment_softmax). Scale into the log2 domain, masking tiles that
                # cross the end of the real keys or this warpgroup's diagonal.
                online_softmax(s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, c0, kv_end,
                               c0 + cols > kv_end or (causal and c0 + cols - 1 > w0),
                               row0, t4)

            if stages == 1:
                T.ptx.cp.async_.wait_group(0)
                T.ptx.fence.proxy.async_.shared__cta()
                T.cuda.cta_sync()  # V(kt) landed; every warpgroup is done with K(kt)
                if kt + 1 < num_kt:
                    load_tile(smem, pad + q_elems, k, bi, h_kv, kv_off, n, c0 + cols,
                              kv_end, cols, tx)
                    T.ptx.cp.async_.commit_group()

            if (not causal) or c0 < w0 + 64:
                pack_p(p_frag, s_acc)
                pv_product(o_acc, p_frag, descs, kt % stages)
                if not defer_pv:
                    T.ptx.wgmma.wait_group.sync.aligned(0)

    @T.macro
    def overlapped_tiles(q, k, v, smem, pad, descs, s_acc, o_acc, p_frag, s_acc3, o_acc3, m_i,
                         l_i, m_i2, m_new2, alpha2, l_i2, bi, h, h_kv, q_off, kv_off, n, r0, w0,
                         row0, kv_end, num_kt, t4, tx, kv):
        """The key tiles of one query tile with the softmax of tile kt + 1 on the CUDA cores
        while O += P V(kt) runs on the tensor cores (FlashAttention-3's intra-warpgroup
        overlap). Tile t's K and V sit in ring stage t % 2; entering tile kt, K(kt + 1) and V(kt)
        are in flight and P(kt) is packed; each tile loads K(kt + 2) into the stage S(kt) read
        and V(kt + 1) into the one O += P V(kt - 1) read, both done once the block syncs. ``kv``
        as :func:`serial_tiles` takes it."""
        row = bi * k.shape[1] + kv_off  # the real block's first key, in the tensor maps' rows
        # Q and K(0); then K(1) and V(0), which fly during S(0) and its softmax
        load_tile(smem, pad, q, bi, h, q_off, n, r0, n, ROWS, tx)
        if tma_kv:
            tma_tile(smem, pad, kv[0], kv[2], 0, 0, row, h_kv, tx)
        else:
            load_tile(smem, pad + q_elems, k, bi, h_kv, kv_off, n, 0, kv_end, cols, tx)
        T.ptx.cp.async_.commit_group()
        reset_rows(m_i, l_i, o_acc)
        if tma_kv:
            if num_kt > 1:
                tma_tile(smem, pad, kv[0], kv[2], 0, 1, row + cols, h_kv, tx)
            tma_tile(smem, pad, kv[1], kv[2], 1, 0, row, h_kv, tx)
        else:
            if num_kt > 1:
                load_tile(smem, pad + q_elems + 2 * kv_elems, k, bi, h_kv, kv_off, n, cols,
                          kv_end, cols, tx)
            load_tile(smem, pad + q_elems + kv_elems, v, bi, h_kv, kv_off, n, 0, kv_end, cols,
                      tx)
            T.ptx.cp.async_.commit_group()
        T.ptx.cp.async_.wait_group(0 if tma_kv else 1)
        T.ptx.fence.proxy.async_.shared__cta()  # our copies, seen by the tensor cores
        if tma_kv:
            wait_tile(kv, 0, 0)
            T.tvm_storage_sync("shared")
        else:
            T.cuda.cta_sync()  # Q and K(0) landed
        s_product(s_acc, descs, 0)
        first_scores(s_acc, p_frag, s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, kv_end, w0,
                     row0, t4)
        for kt in T.serial(num_kt):
            c0 = kt * cols
            if tma_kv:
                if kt + 1 < num_kt:
                    wait_tile(kv, 0, (kt + 1) % 2)  # K(kt + 1) landed
                wait_tile(kv, 1, kt % 2)  # V(kt)
                if c0 + cols > kv_end:
                    zero_v_tail(kv[4], pad, kt % 2, kv_end - c0, tx)
                    T.ptx.fence.proxy.async_.shared__cta()
                # every warp is done with S(kt) and O += P V(kt - 1), and sees the zeros
                T.tvm_storage_sync("shared")
                if kt + 2 < num_kt:
                    tma_tile(smem, pad, kv[0], kv[2], 0, kt % 2, row + c0 + 2 * cols, h_kv, tx)
                if kt + 1 < num_kt:
                    tma_tile(smem, pad, kv[1], kv[2], 1, (kt + 1) % 2, row + c0 + cols, h_kv,
                             tx)
            else:
                T.ptx.cp.async_.wait_group(0)
                T.ptx.fence.proxy.async_.shared__cta()
                # K(kt + 1), V(kt) landed; every warp is done with S(kt), O += P V(kt - 1)
                T.cuda.cta_sync()
                if kt + 2 < num_kt:
                    load_tile(smem, pad + q_elems + kt % 2 * 2 * kv_elems, k, bi, h_kv, kv_off,
                              n, c0 + 2 * cols, kv_end, cols, tx)
                if kt + 1 < num_kt:
                    load_tile(smem, pad + q_elems + (kt + 1) % 2 * 2 * kv_elems + kv_elems, v,
                              bi, h_kv, kv_off, n, c0 + cols, kv_end, cols, tx)
                T.ptx.cp.async_.commit_group()
            # A causal tile wholly right of this warpgroup's rows adds nothing to them (and
            # neither does any after it: a visible tile kt + 1 means a visible tile kt).
            if kt + 1 < num_kt and ((not causal) or c0 + cols < w0 + 64):
                s_product(s_acc, descs, (kt + 1) % 2)
                pv_product(o_acc, p_frag, descs, kt % 2)
                next_scores(s_acc, p_frag, s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, c0,
                            kv_end, w0, row0, t4)
            else:
                if (not causal) or c0 < w0 + 64:
                    pv_product(o_acc, p_frag, descs, kt % 2)
                    T.ptx.wgmma.wait_group.sync.aligned(0)

    key_tiles = overlapped_tiles if overlap else serial_tiles  # a query tile's key loop

    @T.macro
    def block(q, k, v, geom, out, seq_q, bh, qt_launch, tx, k_map, v_map):
        smem = T.alloc_buffer((pool_elems,), dtype, scope="shared.dyn")
        smem_words = T.decl_buffer((pool_elems // 2,), "uint32", data=smem.data,
                                   scope="shared.dyn")
        base = T.alloc_buffer((2,), "uint32", scope="local")
        (s_acc, o_acc, p_frag, m_i, l_i, s_acc3, o_acc3, m_i2, l_i2, m_new2,
         alpha2) = row_registers()

        b, h, h_kv = geom.heads(bh, heads_q, group)
        n = geom.length(b)
        q_off, kv_off, bi = geom.offsets(b, n)
        grid_tiles = (seq_q + ROWS - 1) // ROWS
        qt_first = grid_tiles - 1 - qt_launch  # the most key tiles first (causal)
        wg = tx // 128
        lane = tx % 32
        g = lane // 4
        t4 = lane % 4
        realign_pool(base, smem)
        pad = T.Cast("int32", base[1])
        descs = T.alloc_buffer((3,), "uint64", scope="local")
        first_descriptors(descs, base, pad, wg)

        zero_padding(out, geom, b, h, n, qt_launch, qt_first * ROWS, ROWS, tx)
        reps = geom.tile_repeats(n, ROWS, grid_tiles, qt_first)
        if tma_kv:
            # K stages 0 and 1, then V's: a barrier each, and the parity its next copy completes
            full = T.alloc_buffer((4,), "uint64", scope="shared")
            phase = T.alloc_buffer((4,), "int32", scope="local")
            if tx == 0:
                for i in T.unroll(4):
                    init_barrier(full.ptr_to([i]), 1)
            for i in T.unroll(4):
                phase[i] = 0
            T.tvm_storage_sync("shared")

        for rep in T.serial(reps):
            r0 = (qt_first + rep * grid_tiles) * ROWS  # first row of the tile, in the real block
            w0 = r0 + wg * 64  # first row of this warpgroup
            # this thread's two rows (accumulators c < 2 and c >= 2), relative to the block
            row0 = w0 + (tx % 128) // 32 * 16 + g
            if r0 < n:
                kv_end = T.if_then_else(causal, T.min(n, r0 + ROWS), n)
                num_kt = (kv_end + cols - 1) // cols
                # (full and phase exist only with TMA copies: no name bound to None in TVMScript)
                if tma_kv:
                    key_tiles(q, k, v, smem, pad, descs, s_acc, o_acc, p_frag, s_acc3, o_acc3,
                              m_i, l_i, m_i2, m_new2, alpha2, l_i2, bi, h, h_kv, q_off, kv_off,
                              n, r0, w0, row0, kv_end, num_kt, t4, tx,
                              (k_map, v_map, full, phase, smem_words))
                else:
                    key_tiles(q, k, v, smem, pad, descs, s_acc, o_acc, p_frag, s_acc3, o_acc3,
                              m_i, l_i, m_i2, m_new2, alpha2, l_i2, bi, h, h_kv, q_off, kv_off,
                              n, r0, w0, row0, kv_end, num_kt, t4, tx, None)
                T.ptx.wgmma.wait_group.sync.aligned(0)
                if staged_out:
                    # Normalize into this warpgroup's own rows of the Q tile (its products are
                    # done with them), then write the real rows out in 16-byte vectors.
                    stage(smem, pad, o_acc3, l_i2, 0, row0 - r0, t4)
                    T.tvm_storage_sync("shared")
                    write(smem_words, pad, out, bi, q_off, h, r0, n, wg * 64, 64, tx % 128, 128)
                    # every warp is done with Q before the next reload (the planner's own
                    # barrier: these shared accesses are ones it sees)
                    T.tvm_storage_sync("shared")
                else:
                    # Normalize and store this thread's real rows, 4 bytes a store.
                    for r in T.unroll(2):
                        l_i[r] = T.cuda.warp_sum(l_i[r], 4)
                        if row0 + r * 8 < n:
                            for j in T.unroll(d // 8):
                                for c in T.unroll(2):
                                    out[bi, q_off + row0 + r * 8, h, j * 8 + t4 * 2 + c] = T.Cast(
                                        dtype, o_acc[j * 4 + 2 * r + c] / l_i[r]
                                    )
                    T.cuda.cta_sync()  # every warp is done with Q before a next tile reloads it

    # --- The warp-specialized block (``specialized``): FlashAttention-3's structure ----------
    ws_stage, ws_write = staged_output(dtype, d, heads_q, lambda r, c: swizzled(ROWS, r, c),
                                       opaque=True)
    ws_zero_v_tail = v_tail_zeroer(128, opaque=True)
    ws_zero_padding = padding_zeroer(dtype, d, THREADS)
    # one block an SM, each walking its (batch row, query tile, head) work items
    work = PersistentTileGrid(heads_q, ROWS, SPECIALIZED_THREADS, PERSISTENT_BLOCKS)

    def work_item(geom, batch, seq_q, bid, i):
        """Block ``bid``'s work item of round ``i`` (called in the roles' macros, which bind
        the names): ``(b, h, h_kv, n, q_off, kv_off, bi, qt_launch, qt_first, reps, real)``:
        its batch row, heads, real rows and offsets as ``block`` has them, its query tile
        (``qt_first``, the longest first), the query tiles it runs (``reps``: 0 past the
        last item) and whether it is one."""
        bh, qt_launch, real = work.item(batch, seq_q, bid, i)
        b, h, h_kv = geom.heads(bh, heads_q, group)
        n = geom.length(b)
        q_off, kv_off, bi = geom.offsets(b, n)
        grid_tiles = work.tiles(seq_q)
        qt_first = grid_tiles - 1 - qt_launch  # the most key tiles first (causal)
        reps = T.if_then_else(real, geom.tile_repeats(n, ROWS, grid_tiles, qt_first), 0)
        return b, h, h_kv, n, q_off, kv_off, bi, qt_launch, qt_first, reps, real

    @T.macro
    def load_when_free(smem, pad, tmap, full, empty, operand, g, row, h_kv, tx):
        """The producer's TMA copy of the K (``operand`` 0) or V (1) tile of the block's key
        tile ``g`` into stage ``g % 2``, once both consumers have released its previous one."""
        wait_released(empty.ptr_to([2 * operand + g % 2]), g, 2)
        tma_tile(smem, pad, tmap, full, operand, g % 2, row, h_kv, tx)

    @T.macro
    def producer(q, k, geom, smem, pad, q_maps, full, empty, q_bars, count, tx, batch, seq_q,
                 bid):
        """Warpgroup 0, thread 0, over the block's work items: each query tile's K and V tiles
        by TMA into the two-stage ring, each stage once both consumers have released it
        (``empty``: 2 arrivals a phase), and its Q once both consumers are done with the last
        tile's (issued after K of the first key tile, whose stage frees first)."""
        T.ptx["setmaxnreg.dec.sync.aligned.u32"](SPECIALIZED_PRODUCER_REGISTERS)
        if tx == 0:
            count[0] = 0
            tiles_done = T.alloc_buffer((1,), "int32", scope="local")
            tiles_done[0] = 0
            grid_tiles = work.tiles(seq_q)
            for i in T.serial(work.rounds(batch, seq_q)):
                (b, h, h_kv, n, q_off, kv_off, bi, qt_launch, qt_first, reps,
                 real) = work_item(geom, batch, seq_q, bid, i)
                for rep in T.serial(reps):
                    r0 = (qt_first + rep * grid_tiles) * ROWS
                    if r0 < n:
                        kv_end = T.if_then_else(causal, T.min(n, r0 + ROWS), n)
                        num_kt = (kv_end + cols - 1) // cols
                        row = bi * k.shape[1] + kv_off
                        load_when_free(smem, pad, q_maps[1], full, empty, 0, count[0], row,
                                       h_kv, tx)  # K(0)
                        if tiles_done[0] > 0:  # both consumers are done with the last Q
                            wait_barrier(q_bars.ptr_to([1]), (tiles_done[0] - 1) % 2)
                        tiles_done[0] = tiles_done[0] + 1
                        T.ptx.mbarrier.arrive.expect_tx.shared.b64(q_bars.ptr_to([0]),
                                                                   T.uint32(q_elems * 2))
                        for cb in T.unroll(d // 64):
                            copy_head_tile(smem.ptr_to([pad + cb * ROWS * 64]), q_maps[0],
                                           bi * q.shape[1] + q_off + r0, h, cb * 64,
                                           q_bars.ptr_to([0]))
                        load_when_free(smem, pad, q_maps[2], full, empty, 1, count[0], row,
                                       h_kv, tx)  # V(0)
                        for kt in T.serial(1, num_kt):
                            load_when_free(smem, pad, q_maps[1], full, empty, 0, count[0] + kt,
                                           row + kt * cols, h_kv, tx)  # K
                            load_when_free(smem, pad, q_maps[2], full, empty, 1, count[0] + kt,
                                           row + kt * cols, h_kv, tx)  # V
                        count[0] = count[0] + num_kt

    @T.macro
    def take_turn(wg):
        """Consumer ``wg`` (0 or 1) waits for its turn at the tensor cores."""
        T.ptx.bar.sync(T.uint32(SCHEDULER_BARRIERS[0]) + T.Cast("uint32", wg), T.uint32(256))

    @T.macro
    def pass_turn(wg):
        """Consumer ``wg`` hands the turn to the other once its products are issued."""
        T.ptx.bar.arrive(T.uint32(SCHEDULER_BARRIERS[1]) - T.Cast("uint32", wg), T.uint32(256))

    @T.macro
    def zero_v_tail_once(smem_words, pad, st, c0, kv_end, wg, tx):
        """Where the key tile at ``c0`` crosses the end of the real keys, the rows past it of
        the V tile in stage ``st`` zeroed by this consumer: both consumers write the same zeros,
        each seeing its own (fenced for the tensor cores) before its products read the tile."""
        if c0 + cols > kv_end:
            ws_zero_v_tail(smem_words, pad, st, kv_end - c0, tx % 128)
            T.ptx.fence.proxy.async_.shared__cta()
            T.ptx.bar.sync(T.uint32(WARPGROUP_BARRIERS[0]) + T.Cast("uint32", wg), T.uint32(128))

    @T.macro
    def release(empty, operand, st, tx):
        """One thread of a consumer: it is done with K's (``operand`` 0) or V's (1) tile in
        stage ``st``: K's once S = Q K^T on it is, so that the producer refills it while this
        tile's softmax and O += P V run."""
        if tx % 128 == 0:
            T.ptx.mbarrier.arrive.shared.b64(empty.ptr_to([2 * operand + st]), T.uint32(1))

    @T.macro
    def consumer(geom, out, smem, smem_words, pad, base, empty, q_bars, count, kv, tx, batch,
                 seq_q, bid):
        """Warpgroups 1 and 2 (``tx``: 0-255 over both; ``kv`` as :func:`serial_tiles` takes
        it): 64 query rows each, on the ring the producer fills, the serial key loop or (with
        ``overlap``) the overlapped one, taking turns at the tensor cores (each issues its
        products in its turn, named barrier 1 + its warpgroup, and hands the turn to the other,
        whose softmax then runs under them); each releases a stage's K tile once its S = Q K^T
        on it is done and its V tile once O += P V is, Q's tile once its last product is, and
        writes its rows of the output through its own rows of the output's staging tile
        (ordered by a named barrier of its 128 threads) while the producer loads the next
        tile's Q."""
        T.ptx["setmaxnreg.inc.sync.aligned.u32"](SPECIALIZED_CONSUMER_REGISTERS)
        (s_acc, o_acc, p_frag, m_i, l_i, s_acc3, o_acc3, m_i2, l_i2, m_new2,
         alpha2) = row_registers()
        wg = tx // 128  # 0 or 1: rows 64 wg .. of the tile
        lane = tx % 32
        g = lane // 4
        t4 = lane % 4
        descs = T.alloc_buffer((3,), "uint64", scope="local")
        first_descriptors(descs, base, pad, wg)
        q_phase = T.alloc_buffer((1,), "int32", scope="local")
        q_phase[0] = 0
        count[0] = 0
        if wg == 1:  # warpgroup 1 takes the first turn
            T.ptx.bar.arrive(T.uint32(SCHEDULER_BARRIERS[0]), T.uint32(256))
        grid_tiles = work.tiles(seq_q)
        for i in T.serial(work.rounds(batch, seq_q)):
            (b, h, h_kv, n, q_off, kv_off, bi, qt_launch, qt_first, reps,
             real) = work_item(geom, batch, seq_q, bid, i)
            if real:
                ws_zero_padding(out, geom, b, h, n, qt_launch, qt_first * ROWS, ROWS, tx)
            for rep in T.serial(reps):
                r0 = (qt_first + rep * grid_tiles) * ROWS
                w0 = r0 + wg * 64
                row0 = w0 + (tx % 128) // 32 * 16 + g
                if r0 < n:
                    kv_end = T.if_then_else(causal, T.min(n, r0 + ROWS), n)
                    num_kt = (kv_end + cols - 1) // cols
                    wait_barrier(q_bars.ptr_to([0]), q_phase[0])
                    q_phase[0] = q_phase[0] ^ 1
                    reset_rows(m_i, l_i, o_acc)
                    if overlap:
                        # tile 0's S and softmax; then each turn issues S(kt + 1) and
                        # O += P V(kt), and the softmax of kt + 1 runs while the latter does
                        wait_tile(kv, 0, count[0] % 2)  # K(0)
                        take_turn(wg)
                        s_product(s_acc, descs, count[0] % 2)
                        pass_turn(wg)
                        first_scores(s_acc, p_frag, s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2,
                                     kv_end, w0, row0, t4)
                        release(empty, 0, count[0] % 2, tx)  # K(0)
                        for kt in T.serial(num_kt):
                            c0 = kt * cols
                            st = (count[0] + kt) % 2
                            if kt + 1 < num_kt:
                                wait_tile(kv, 0, 1 - st)  # K(kt + 1)
                            wait_tile(kv, 1, st)  # V(kt)
                            zero_v_tail_once(smem_words, pad, st, c0, kv_end, wg, tx)
                            take_turn(wg)
                            if kt + 1 < num_kt and ((not causal) or c0 + cols < w0 + 64):
                                s_product(s_acc, descs, 1 - st)
                                pv_product(o_acc, p_frag, descs, st)
                                pass_turn(wg)
                                next_scores(s_acc, p_frag, s_acc3, o_acc3, m_i2, m_new2, alpha2,
                                            l_i2, c0, kv_end, w0, row0, t4)
                            else:
                                if (not causal) or c0 < w0 + 64:
                                    pv_product(o_acc, p_frag, descs, st)
                                pass_turn(wg)
                                T.ptx.wgmma.wait_group.sync.aligned(0)
                            if kt + 1 < num_kt:
                                release(empty, 0, 1 - st, tx)  # K(kt + 1): S is done
                            release(empty, 1, st, tx)  # V(kt)
                    else:
                        for kt in T.serial(num_kt):
                            c0 = kt * cols
                            st = (count[0] + kt) % 2
                            wait_tile(kv, 0, st)  # K(kt)
                            take_turn(wg)
                            if (not causal) or c0 < w0 + 64:
                                s_product(s_acc, descs, st)
                            pass_turn(wg)
                            if (not causal) or c0 < w0 + 64:
                                T.ptx.wgmma.wait_group.sync.aligned(0)
                            release(empty, 0, st, tx)  # K(kt)
                            if (not causal) or c0 < w0 + 64:
                                online_softmax(s_acc3, o_acc3, m_i2, m_new2, alpha2, l_i2, c0,
                                               kv_end,
                                               c0 + cols > kv_end
                                               or (causal and c0 + cols - 1 > w0), row0, t4)
                            wait_tile(kv, 1, st)  # V(kt)
                            zero_v_tail_once(smem_words, pad, st, c0, kv_end, wg, tx)
                            if (not causal) or c0 < w0 + 64:
                                pack_p(p_frag, s_acc)
                                pv_product(o_acc, p_frag, descs, st)
                                T.ptx.wgmma.wait_group.sync.aligned(0)
                            release(empty, 1, st, tx)  # V(kt)
                    count[0] = count[0] + num_kt
                    if tx % 128 == 0:  # every product is done: Q's tile back to the producer
                        T.ptx.mbarrier.arrive.shared.b64(q_bars.ptr_to([1]), T.uint32(1))
                    # normalize into this warpgroup's own rows of the staging tile, write them out
                    ws_stage(smem, pad + o_elem, o_acc3, l_i2, 0, row0 - r0, t4)
                    T.ptx.bar.sync(T.uint32(WARPGROUP_BARRIERS[0]) + T.Cast("uint32", wg),
                                   T.uint32(128))
                    ws_write(smem_words, pad + o_elem, out, bi, q_off, h, r0, n, wg * 64, 64,
                             tx % 128, 128)
                    T.ptx.bar.sync(T.uint32(WARPGROUP_BARRIERS[0]) + T.Cast("uint32", wg),
                                   T.uint32(128))

    @T.macro
    def specialized_block(q, k, v, geom, out, batch, seq_q, q_maps, bid, tx):
        smem = T.alloc_buffer((pool_elems,), dtype, scope="shared.dyn")
        smem_words = T.decl_buffer((pool_elems // 2,), "uint32", data=smem.data,
                                   scope="shared.dyn")
        base = T.alloc_buffer((2,), "uint32", scope="local")
        full = T.alloc_buffer((4,), "uint64", scope="shared")  # K stages 0, 1, then V's
        empty = T.alloc_buffer((4,), "uint64", scope="shared")
        q_bars = T.alloc_buffer((2,), "uint64", scope="shared")  # Q landed; Q's tile free
        phase = T.alloc_buffer((4,), "int32", scope="local")
        count = T.alloc_buffer((1,), "int32", scope="local")  # the block's key tiles so far
        realign_pool(base, smem)
        pad = T.Cast("int32", base[1])
        if tx == 0:
            for i in T.unroll(4):
                init_barrier(full.ptr_to([i]), 1)
                init_barrier(empty.ptr_to([i]), 2)  # a release from each consumer
            init_barrier(q_bars.ptr_to([0]), 1)
            init_barrier(q_bars.ptr_to([1]), 2)
        for i in T.unroll(4):
            phase[i] = 0
        T.tvm_storage_sync("shared")
        if tx < 128:
            producer(q, k, geom, smem, pad, q_maps, full, empty, q_bars, count, tx, batch,
                     seq_q, bid)
        else:
            consumer(geom, out, smem, smem_words, pad, base, empty, q_bars, count,
                     (q_maps[1], q_maps[2], full, phase, smem_words), tx - 128, batch, seq_q,
                     bid)

    grid = tensor_core_grid(heads_q, ROWS, THREADS)

    @T.macro
    def bounded_block(q, k, v, geom, out, seq_q, k_map, v_map, bh, qt_launch, tx):
        # __launch_bounds__(256, min_blocks): registers capped so that blocks share an SM.
        with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks):
            block(q, k, v, geom, out, seq_q, bh, qt_launch, tx, k_map, v_map)

    @T.macro
    def bounded_specialized_block(q, k, v, geom, out, batch, seq_q, q_maps, bid, tx):
        with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 1):
            specialized_block(q, k, v, geom, out, batch, seq_q, q_maps, bid, tx)

    @T.macro
    def encode_kv_maps(k_map, v_map, q, k, v):
        """Host side: K's and V's tensor maps, ``[rows, heads_kv, head_dim]``. Keys of no rows
        (``seq_kv`` 0: every output row is padding, no tile is read) get maps of one row over
        q's memory, which holds at least one row here: CUDA rejects a tensor map of no rows."""
        if k.shape[0] * k.shape[1] > 0:
            encode_head_tiles(k_map, k.data, dtype, k.shape[0] * k.shape[1], heads_kv, d, cols)
            encode_head_tiles(v_map, v.data, dtype, v.shape[0] * v.shape[1], heads_kv, d, cols)
        else:
            encode_head_tiles(k_map, q.data, dtype, 1, heads_kv, d, cols)
            encode_head_tiles(v_map, q.data, dtype, 1, heads_kv, d, cols)

    @T.macro
    def body(q, k, v, geom, out, batch, seq_q, seq_kv):
        if specialized:  # host side: Q's, K's and V's tensor maps, [rows, heads, head_dim]
            q_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            k_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            v_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            encode_head_tiles(q_map, q.data, dtype, q.shape[0] * q.shape[1], heads_q, d, ROWS)
            encode_kv_maps(k_map, v_map, q, k, v)
            work.launch(batch, seq_q, bounded_specialized_block,
                        (q, k, v, geom, out, batch, seq_q, (q_map, k_map, v_map)))
        elif tma_kv:  # host side: K's and V's tensor maps, [rows, heads_kv, head_dim]
            k_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            v_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            encode_kv_maps(k_map, v_map, q, k, v)
            grid(batch, seq_q, bounded_block, (q, k, v, geom, out, seq_q, k_map, v_map))
        else:
            grid(batch, seq_q, bounded_block, (q, k, v, geom, out, seq_q, None, None))

    return attention_func(heads_q, heads_kv, head_dim, dtype, body, packed=packed, left=left)
