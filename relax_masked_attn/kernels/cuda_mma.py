"""The tensor-core CUDA kernel of both attention ops (compute capability >= 8.0).

FlashAttention-2 structure in TVMScript with explicit threads and ``T.ptx``:

* a block of ``warps`` warps owns ``warps * atoms * 16`` real query rows of one (batch row,
  query head); each warp owns ``atoms`` m16 tiles of them (``mma.sync.m16n8k16`` A fragments
  loaded with ``ldmatrix``, kept in registers or re-read from shared memory every k-step), so
  each K/V fragment it loads feeds ``atoms`` products (tiles per head_dim:
  :func:`~relax_masked_attn.kernels.config.tensor_core_tiles`);
* key/value tiles are copied global -> shared with ``cp.async`` (16 bytes a thread, zero-filled
  outside the real block), in XOR-swizzled rows so ``ldmatrix`` is conflict-free;
* S = Q K^T and O += P V run on the tensor cores with fp32 accumulation; the online softmax
  stays in registers (a row is spread over the 4 lanes of a quad);
* tiles are laid out relative to the real block of each row: only the key tiles that hold real,
  visible keys are loaded (up to ``kv_end`` = L, or the query tile's last row + 1 when causal),
  and a causal warp skips the products of key tiles wholly right of its own rows; query tiles
  past L do no attention. The padding rows of the output are zeroed by the same grid (tile
  ``t`` zeroes padding rows ``[rows t, rows (t + 1))``); the grid runs heads innermost, then
  query tiles (those with the most key tiles first), then batch rows;
* the output is normalized into the Q tile's rows and leaves in 16-byte vectors
  (``geometry.staged_output``; ``tensor_core_tiles``' last field).

Fragment layouts are those of the PTX ISA's ``mma.m16n8k16`` and ``ldmatrix`` tables.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from ..modes import is_causal, is_left_padded
from ..targets import compute_capability
from .config import tensor_core_tiles
from .cuda_copy import row_loader
from .fragment_softmax import fragment_softmax
from .geometry import (
    LOG2E,
    NEG_INF,
    attention_func,
    padding_zeroer,
    staged_output,
    tensor_core_grid,
)
from .memo import memoized

SUPPORTED_HEAD_DIMS = (32, 64, 128)


def supports(target: Target, head_dim: int, dtype: str) -> bool:
    """Whether this kernel serves (target, head_dim, dtype); else the portable kernel does."""
    if target.kind.name != "cuda" or dtype not in ("float16", "bfloat16"):
        return False
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return False
    return compute_capability(target) >= 80  # unknown (0): stay portable


@memoized
def tensor_core_kernel(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, mode: str, sm_scale: float,
    tiles=None, packed: bool = False,
) -> tirx.PrimFunc:
    """PrimFunc ``(q, k, v, valid_len, out)`` on tensor cores, batch and lengths symbolic; with
    ``packed``, the packed op's ``(q, k, v, seq_start, max_len, out)``: query tiles are then laid
    out from each sequence's first row, and a block loops over the tiles past ``max_len``.

    ``tiles`` overrides :func:`~relax_masked_attn.kernels.config.tensor_core_tiles` (sweeps).
    """
    causal, left = is_causal(mode), is_left_padded(mode)
    group = heads_q // heads_kv
    d = head_dim
    warps, atoms, cols, q_in_regs, staged_out = tiles or tensor_core_tiles(head_dim, dtype)
    rows = warps * atoms * 16  # query rows of a block
    warp_rows = atoms * 16  # query rows of a warp: `atoms` m16 tiles sharing each K/V fragment
    threads = warps * 32
    chunks = d // 8  # 16-byte chunks in one row of a tile
    swz = min(8, chunks)  # XOR-swizzle width, in chunks
    dk = d // 16  # k-steps of S = Q K^T
    sn = cols // 8  # n-tiles of S (8 columns each)
    on = d // 8  # n-tiles of O
    pk = cols // 16  # k-steps of O += P V
    qk_scale = float(sm_scale * LOG2E)
    ab = "f16" if dtype == "float16" else "bf16"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"
    pack = f"cvt.rn.{ab}x2.f32"
    q_slots = dk if q_in_regs else 1  # Q fragments held: all k-steps, or the current one
    zero_padding = padding_zeroer(dtype, d, threads)
    online_softmax = fragment_softmax(atoms, sn, on, qk_scale, causal)

    load_rows = row_loader(threads, chunks)
    # The output through the Q tile (staged_out): chunk c of row r at chunk c ^ (r % swz).
    stage, write = staged_output(dtype, d, heads_q, lambda r, c: r * d + (c ^ (r % swz)) * 8)
    # Q, K and V tiles: static shared memory up to 48 KiB, the most sm_80/86/89 (A100, A10,
    # L4, L40) allow a kernel statically; above (head_dim 128: 64 KiB), one dynamic pool that
    # the three tiles view, which TVM's runtime lets the kernel have when it loads it.
    tile_elems = (rows + 2 * cols) * d
    dynamic = tile_elems * 2 > 48 * 1024
    q_scope = "shared.dyn" if dynamic else "shared"

    def xor_swizzled(smem):
        """Chunk ``c`` of row ``r`` at chunk ``c ^ (r % swz)`` of the 2-D tile ``smem``."""
        return lambda r, c: smem.ptr_to([r, (c ^ (r % swz)) * 8])

    @T.macro
    def load_tile(smem, src, b, h, off, n, c0, end, count, tx):
        """cp.async rows [c0, c0 + count) of head ``h``'s real block into ``smem``."""
        load_rows(xor_swizzled(smem), src, b, h, off, n, c0, end, count, tx)

    @T.macro
    def load_q_frags(q_frag, q_smem, kk, slot, warp, lane):
        """``ldmatrix`` the A fragments of k-step ``kk`` of each of this warp's m16 tiles."""
        for a in T.unroll(atoms):
            T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                q_frag[a, slot, 0], q_frag[a, slot, 1], q_frag[a, slot, 2], q_frag[a, slot, 3],
                q_smem.ptr_to(
                    [warp * warp_rows + a * 16 + lane % 16,
                     ((kk * 2 + lane // 16) ^ ((warp * warp_rows + a * 16 + lane % 16) % swz)) * 8]
                ),
            )

    grid = tensor_core_grid(heads_q, rows, threads)

    @T.macro
    def block(q, k, v, geom, out, seq_q, seq_kv, bh, qt_launch, tx):
        if dynamic:
            pool = T.alloc_buffer((tile_elems,), dtype, scope="shared.dyn")
            q_smem = T.decl_buffer((rows, d), dtype, data=pool.data, scope="shared.dyn")
            k_smem = T.decl_buffer((cols, d), dtype, data=pool.data, elem_offset=rows * d,
                                   scope="shared.dyn")
            v_smem = T.decl_buffer((cols, d), dtype, data=pool.data,
                                   elem_offset=(rows + cols) * d, scope="shared.dyn")
        else:
            q_smem = T.alloc_buffer((rows, d), dtype, scope="shared")
            k_smem = T.alloc_buffer((cols, d), dtype, scope="shared")
            v_smem = T.alloc_buffer((cols, d), dtype, scope="shared")
        q_frag = T.alloc_buffer((atoms, q_slots, 4), "uint32", scope="local")
        b_frag = T.alloc_buffer((4,), "uint32", scope="local")
        p_frag = T.alloc_buffer((atoms, 4), "uint32", scope="local")
        s_acc = T.alloc_buffer((atoms, sn, 4), "float32", scope="local")
        o_acc = T.alloc_buffer((atoms, on, 4), "float32", scope="local")
        m_i = T.alloc_buffer((atoms, 2), "float32", scope="local")  # running max, rows g, g + 8
        l_i = T.alloc_buffer((atoms, 2), "float32", scope="local")  # this lane's part of the sums
        m_new = T.alloc_buffer((atoms, 2), "float32", scope="local")
        alpha = T.alloc_buffer((atoms, 2), "float32", scope="local")

        b, h, h_kv = geom.heads(bh, heads_q, group)
        n = geom.length(b)
        q_off, kv_off, bi = geom.offsets(b, n)
        grid_tiles = (seq_q + rows - 1) // rows
        # Blocks start in launch order: the last query tiles (the most key tiles when causal)
        # go first, so the short ones fill the tail of the grid instead of the long ones.
        qt_first = grid_tiles - 1 - qt_launch
        warp = tx // 32
        lane = tx % 32
        g = lane // 4
        t4 = lane % 4

        zero_padding(out, geom, b, h, n, qt_launch, qt_first * rows, rows, tx)
        reps = geom.tile_repeats(n, rows, grid_tiles, qt_first)

        for rep in T.serial(reps):
            qt = qt_first + rep * grid_tiles
            r0 = qt * rows  # first row of this tile, relative to the real block
            w0 = r0 + warp * warp_rows  # first row of this warp
            if r0 < n:
                kv_end = T.if_then_else(causal, T.min(n, r0 + rows), n)
                # Q tile -> shared (rows past n zero-filled); K(0) flies meanwhile.
                load_tile(q_smem, q, bi, h, q_off, n, r0, n, rows, tx)
                T.ptx.cp.async_.commit_group()
                load_tile(k_smem, k, bi, h_kv, kv_off, n, 0, kv_end, cols, tx)
                T.ptx.cp.async_.commit_group()
                T.ptx.cp.async_.wait_group(1)
                T.cuda.cta_sync()
                if q_in_regs:
                    for kk in T.unroll(dk):
                        load_q_frags(q_frag, q_smem, kk, kk, warp, lane)
                for a in T.unroll(atoms):
                    for i in T.unroll(2):
                        m_i[a, i] = NEG_INF
                        l_i[a, i] = T.float32(0)
                    for j in T.unroll(on):
                        for c in T.unroll(4):
                            o_acc[a, j, c] = T.float32(0)

                # Software pipeline: V(kt) loads while S(kt) computes, K(kt + 1) while O += P V(kt).
                num_kt = (kv_end + cols - 1) // cols
                for kt in T.serial(num_kt):
                    c0 = kt * cols
                    T.ptx.cp.async_.wait_group(0)
                    T.cuda.cta_sync()  # K(kt) landed; every warp is done with V(kt - 1)
                    load_tile(v_smem, v, bi, h_kv, kv_off, n, c0, kv_end, cols, tx)
                    T.ptx.cp.async_.commit_group()

                    # A causal tile wholly right of this warp's last row adds nothing to its rows:
                    # the warp skips its products (the barriers stay outside, for every warp).
                    if (not causal) or c0 < w0 + warp_rows:
                        # S = Q K^T on the tensor cores; each K fragment feeds every m16 tile.
                        for a in T.unroll(atoms):
                            for j in T.unroll(sn):
                                for c in T.unroll(4):
                                    s_acc[a, j, c] = T.float32(0)
                        for kk in T.unroll(dk):
                            if not q_in_regs:
                                load_q_frags(q_frag, q_smem, kk, 0, warp, lane)
                            for jj in T.unroll(sn // 2):
                                T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                                    b_frag[0], b_frag[1], b_frag[2], b_frag[3],
                                    k_smem.ptr_to(
                                        [jj * 16 + lane % 8 + (lane // 16) * 8,
                                         ((kk * 2 + (lane // 8) % 2)
                                          ^ ((jj * 16 + lane % 8 + (lane // 16) * 8) % swz)) * 8]
                                    ),
                                )
                                for a in T.unroll(atoms):
                                    for half in T.unroll(2):
                                        T.ptx[mma](
                                            s_acc[a, 2 * jj + half, 0], s_acc[a, 2 * jj + half, 1],
                                            s_acc[a, 2 * jj + half, 2], s_acc[a, 2 * jj + half, 3],
                                            q_frag[a, kk % q_slots, 0], q_frag[a, kk % q_slots, 1],
                                            q_frag[a, kk % q_slots, 2], q_frag[a, kk % q_slots, 3],
                                            b_frag[2 * half], b_frag[2 * half + 1],
                                            s_acc[a, 2 * jj + half, 0], s_acc[a, 2 * jj + half, 1],
                                            s_acc[a, 2 * jj + half, 2], s_acc[a, 2 * jj + half, 3],
                                        )

                        # Scale into the log2 domain (masking only tiles that cross the end of
                        # the real keys or, causal, this warp's diagonal), then online softmax.
                        online_softmax(s_acc, o_acc, m_i, m_new, alpha, l_i, c0, kv_end,
                                       c0 + cols > kv_end or (causal and c0 + cols - 1 > w0),
                                       w0 + g, t4)

                    T.ptx.cp.async_.wait_group(0)
                    T.cuda.cta_sync()  # V(kt) landed; every warp is done with K(kt)
                    if kt + 1 < num_kt:
                        load_tile(k_smem, k, bi, h_kv, kv_off, n, c0 + cols, kv_end, cols, tx)
                        T.ptx.cp.async_.commit_group()

                    if (not causal) or c0 < w0 + warp_rows:
                        # O += P V: P's A fragments are S's accumulators packed to 16 bits.
                        for kk in T.unroll(pk):
                            for a in T.unroll(atoms):
                                # (c1, c0) and (c3, c2) of n-tiles 2kk, 2kk + 1
                                for x in T.unroll(4):
                                    T.ptx[pack](
                                        p_frag[a, x],
                                        s_acc[a, 2 * kk + x // 2, (x % 2) * 2 + 1],
                                        s_acc[a, 2 * kk + x // 2, (x % 2) * 2],
                                    )
                            for jj in T.unroll(on // 2):
                                T.ptx.ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16(
                                    b_frag[0], b_frag[1], b_frag[2], b_frag[3],
                                    v_smem.ptr_to(
                                        [kk * 16 + lane % 8 + ((lane // 8) % 2) * 8,
                                         ((jj * 2 + lane // 16)
                                          ^ ((kk * 16 + lane % 8 + ((lane // 8) % 2) * 8)
                                             % swz)) * 8]
                                    ),
                                )
                                for a in T.unroll(atoms):
                                    for half in T.unroll(2):
                                        T.ptx[mma](
                                            o_acc[a, 2 * jj + half, 0], o_acc[a, 2 * jj + half, 1],
                                            o_acc[a, 2 * jj + half, 2], o_acc[a, 2 * jj + half, 3],
                                            p_frag[a, 0], p_frag[a, 1], p_frag[a, 2], p_frag[a, 3],
                                            b_frag[2 * half], b_frag[2 * half + 1],
                                            o_acc[a, 2 * jj + half, 0], o_acc[a, 2 * jj + half, 1],
                                            o_acc[a, 2 * jj + half, 2], o_acc[a, 2 * jj + half, 3],
                                        )

                if staged_out:
                    # Each warp normalizes into its own rows of the Q tile (only it reads them,
                    # and its products are done), then the block writes the real rows out in
                    # 16-byte vectors.
                    q_flat = T.decl_buffer((rows * d,), dtype, data=q_smem.data,
                                           scope=q_scope)
                    q_words = T.decl_buffer((rows * d // 2,), "uint32", data=q_smem.data,
                                            scope=q_scope)
                    for a in T.unroll(atoms):
                        stage(q_flat, 0, o_acc, l_i, a, warp * warp_rows + a * 16 + g, t4)
                    T.tvm_storage_sync("shared")
                    write(q_words, 0, out, bi, q_off, h, r0, n, 0, rows, tx, threads)
                    # every warp is done with the Q tile before a next tile reloads it
                    T.tvm_storage_sync("shared")
                else:
                    # Normalize and store the real rows of this warp, 4 bytes a store.
                    for a in T.unroll(atoms):
                        for i in T.unroll(2):
                            l_i[a, i] = T.cuda.warp_sum(l_i[a, i], 4)
                            rr = w0 + a * 16 + g + i * 8
                            if rr < n:
                                for j in T.unroll(on):
                                    for c in T.unroll(2):
                                        out[bi, q_off + rr, h, j * 8 + t4 * 2 + c] = T.Cast(
                                            dtype, o_acc[a, j, 2 * i + c] / l_i[a, i]
                                        )

    @T.macro
    def body(q, k, v, geom, out, batch, seq_q, seq_kv):
        grid(batch, seq_q, block, (q, k, v, geom, out, seq_q, seq_kv))

    return attention_func(heads_q, heads_kv, head_dim, dtype, body, packed=packed, left=left)
