"""The tensor-core CUDA kernel of ``masked_sequence_prefill`` (compute capability >= 8.0).

FlashAttention-2 structure in TVMScript with explicit threads and ``T.ptx``:

* a block of 4 warps owns 64 real query rows of one (batch row, query head); each warp owns 16
  rows, held as ``mma.sync.m16n8k16`` A fragments loaded once with ``ldmatrix``;
* key/value tiles of 64 rows are copied global -> shared with ``cp.async`` (16 bytes a thread,
  zero-filled outside the real block), in XOR-swizzled rows so ``ldmatrix`` is conflict-free;
* S = Q K^T and O += P V run on the tensor cores with fp32 accumulation; the online softmax
  stays in registers (a row is spread over the 4 lanes of a quad);
* tiles are laid out relative to the real block of each row: only the ``ceil(kv_end / 64)``
  key tiles that hold real, visible keys are loaded (``kv_end`` = L, or the tile's last row + 1
  when causal); query tiles past L do no attention. The padding rows of the output are zeroed
  by the same grid (tile ``t`` zeroes padding rows ``[64 t, 64 t + 64)``).

Fragment layouts and the ``T.ptx`` spelling follow ``shared/GPU-KERNEL-NOTES.md``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from ..modes import is_causal, is_left_padded
from .config import tensor_core_tiles
from .cpu import LOG2E, NEG_INF

SUPPORTED_HEAD_DIMS = (32, 64, 128)


def supports(target: Target, head_dim: int, dtype: str) -> bool:
    """Whether this kernel serves (target, head_dim, dtype); else the portable kernel does."""
    if target.kind.name != "cuda" or dtype not in ("float16", "bfloat16"):
        return False
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return False
    arch = str(target.attrs.get("arch", "")) if "arch" in target.attrs else ""
    if not arch.startswith("sm_"):
        return False  # unknown compute capability: stay portable
    return int("".join(ch for ch in arch[3:] if ch.isdigit())) >= 80


def tensor_core_kernel(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, mode: str, sm_scale: float
) -> tirx.PrimFunc:
    """PrimFunc ``(q, k, v, valid_len, out)`` on tensor cores; batch and lengths symbolic."""
    causal, left = is_causal(mode), is_left_padded(mode)
    group = heads_q // heads_kv
    d = head_dim
    rows, cols, warps = tensor_core_tiles(head_dim, dtype)
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
    loads_per_thread = rows * chunks // threads

    @T.macro
    def load_kv_tile(smem, src, b, h_kv, kv_off, n, c0, kv_end, tx):
        """cp.async key rows [c0, c0 + cols) of the real block into ``smem``; zero past kv_end."""
        for it in T.unroll(cols * chunks // threads):
            e = it * threads + tx
            r = e // chunks
            c = e % chunks
            T.ptx.cp.async_.cg.shared.global_(
                smem.ptr_to([r, (c ^ (r % swz)) * 8]),
                src.ptr_to([b, kv_off + T.min(c0 + r, n - 1), h_kv, c * 8]),
                16,
                T.if_then_else(c0 + r < kv_end, T.uint32(16), T.uint32(0)),
            )

    @T.prim_func
    def masked_prefill_tensor_core(
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        valid_len_handle: T.handle,
        out_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int32()
        seq_q = T.int32()
        seq_kv = T.int32()
        q = T.match_buffer(q_handle, (batch, seq_q, heads_q, d), dtype)
        k = T.match_buffer(k_handle, (batch, seq_kv, heads_kv, d), dtype)
        v = T.match_buffer(v_handle, (batch, seq_kv, heads_kv, d), dtype)
        valid_len = T.match_buffer(valid_len_handle, (batch,), "int32")
        out = T.match_buffer(out_handle, (batch, seq_q, heads_q, d), dtype)

        bh = T.launch_thread("blockIdx.x", batch * heads_q)
        qt_launch = T.launch_thread("blockIdx.y", (seq_q + rows - 1) // rows)
        tx = T.launch_thread("threadIdx.x", threads)

        q_smem = T.alloc_buffer((rows, d), dtype, scope="shared")
        k_smem = T.alloc_buffer((cols, d), dtype, scope="shared")
        v_smem = T.alloc_buffer((cols, d), dtype, scope="shared")
        q_frag = T.alloc_buffer((dk, 4), "uint32", scope="local")
        b_frag = T.alloc_buffer((4,), "uint32", scope="local")
        p_frag = T.alloc_buffer((4,), "uint32", scope="local")
        s_acc = T.alloc_buffer((sn, 4), "float32", scope="local")
        o_acc = T.alloc_buffer((on, 4), "float32", scope="local")
        m_i = T.alloc_buffer((2,), "float32", scope="local")  # running max of rows g, g + 8
        l_i = T.alloc_buffer((2,), "float32", scope="local")  # this lane's part of the row sums
        m_new = T.alloc_buffer((2,), "float32", scope="local")
        alpha = T.alloc_buffer((2,), "float32", scope="local")
        zero16 = T.alloc_buffer((8,), dtype, scope="local")

        b = bh // heads_q
        h = bh % heads_q
        h_kv = h // group
        n = T.max(T.min(valid_len[b], T.min(seq_q, seq_kv)), 0)
        q_off = T.if_then_else(left, seq_q - n, 0)
        kv_off = T.if_then_else(left, seq_kv - n, 0)
        pad_off = T.if_then_else(left, 0, n)  # first padding row
        # Blocks start in launch order: the last query tiles (the most key tiles when causal)
        # go first, so the short ones fill the tail of the grid instead of the long ones.
        qt = (seq_q + rows - 1) // rows - 1 - qt_launch
        r0 = qt * rows  # first row of this tile, relative to the real block
        warp = tx // 32
        lane = tx % 32
        g = lane // 4
        t4 = lane % 4

        # Padding rows [r0, r0 + rows) of the (seq_q - n) padding rows: exact zeros.
        for j in T.unroll(8):
            zero16[j] = T.Cast(dtype, T.float32(0))
        for it in T.serial(loads_per_thread):
            e = it * threads + tx
            pr = r0 + e // chunks
            if pr < seq_q - n:
                for j in T.vectorized(8):
                    out[b, pad_off + pr, h, (e % chunks) * 8 + j] = zero16[j]

        if r0 < n:
            kv_end = T.if_then_else(causal, T.min(n, r0 + rows), n)
            # Q tile -> shared (rows past n zero-filled), then into A fragments.
            for it in T.unroll(loads_per_thread):
                e = it * threads + tx
                r = e // chunks
                c = e % chunks
                T.ptx.cp.async_.cg.shared.global_(
                    q_smem.ptr_to([r, (c ^ (r % swz)) * 8]),
                    q.ptr_to([b, q_off + T.min(r0 + r, n - 1), h, c * 8]),
                    16,
                    T.if_then_else(r0 + r < n, T.uint32(16), T.uint32(0)),
                )
            T.ptx.cp.async_.commit_group()
            load_kv_tile(k_smem, k, b, h_kv, kv_off, n, 0, kv_end, tx)  # K(0) flies meanwhile
            T.ptx.cp.async_.commit_group()
            T.ptx.cp.async_.wait_group(1)
            T.cuda.cta_sync()
            for kk in T.unroll(dk):
                T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                    q_frag[kk, 0], q_frag[kk, 1], q_frag[kk, 2], q_frag[kk, 3],
                    q_smem.ptr_to(
                        [warp * 16 + lane % 16,
                         ((kk * 2 + lane // 16) ^ ((warp * 16 + lane % 16) % swz)) * 8]
                    ),
                )
            for i in T.unroll(2):
                m_i[i] = NEG_INF
                l_i[i] = T.float32(0)
            for j in T.unroll(on):
                for c in T.unroll(4):
                    o_acc[j, c] = T.float32(0)

            # Software pipeline: V(kt) loads while S(kt) computes, K(kt + 1) while O += P V(kt).
            num_kt = (kv_end + cols - 1) // cols
            for kt in T.serial(num_kt):
                c0 = kt * cols
                T.ptx.cp.async_.wait_group(0)
                T.cuda.cta_sync()  # K(kt) landed; every warp is done with V(kt - 1)
                load_kv_tile(v_smem, v, b, h_kv, kv_off, n, c0, kv_end, tx)
                T.ptx.cp.async_.commit_group()

                # S = Q K^T on the tensor cores.
                for j in T.unroll(sn):
                    for c in T.unroll(4):
                        s_acc[j, c] = T.float32(0)
                for kk in T.unroll(dk):
                    for jj in T.unroll(sn // 2):
                        T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                            b_frag[0], b_frag[1], b_frag[2], b_frag[3],
                            k_smem.ptr_to(
                                [jj * 16 + lane % 8 + (lane // 16) * 8,
                                 ((kk * 2 + (lane // 8) % 2)
                                  ^ ((jj * 16 + lane % 8 + (lane // 16) * 8) % swz)) * 8]
                            ),
                        )
                        T.ptx[mma](
                            s_acc[2 * jj, 0], s_acc[2 * jj, 1], s_acc[2 * jj, 2], s_acc[2 * jj, 3],
                            q_frag[kk, 0], q_frag[kk, 1], q_frag[kk, 2], q_frag[kk, 3],
                            b_frag[0], b_frag[1],
                            s_acc[2 * jj, 0], s_acc[2 * jj, 1], s_acc[2 * jj, 2], s_acc[2 * jj, 3],
                        )
                        T.ptx[mma](
                            s_acc[2 * jj + 1, 0], s_acc[2 * jj + 1, 1],
                            s_acc[2 * jj + 1, 2], s_acc[2 * jj + 1, 3],
                            q_frag[kk, 0], q_frag[kk, 1], q_frag[kk, 2], q_frag[kk, 3],
                            b_frag[2], b_frag[3],
                            s_acc[2 * jj + 1, 0], s_acc[2 * jj + 1, 1],
                            s_acc[2 * jj + 1, 2], s_acc[2 * jj + 1, 3],
                        )

                # Scale into the log2 domain; mask only tiles that cross the end of the real
                # keys or (causal) this warp's diagonal. c2, c3 belong to row g + 8.
                if c0 + cols > kv_end or (causal and c0 + cols - 1 > r0 + warp * 16):
                    for j in T.unroll(sn):
                        for c in T.unroll(4):
                            s_acc[j, c] = T.if_then_else(
                                (c0 + j * 8 + t4 * 2 + c % 2 < kv_end)
                                and (
                                    (not causal)
                                    or (c0 + j * 8 + t4 * 2 + c % 2
                                        <= r0 + warp * 16 + g + (c // 2) * 8)
                                ),
                                s_acc[j, c] * qk_scale,
                                NEG_INF,
                            )
                else:
                    for j in T.unroll(sn):
                        for c in T.unroll(4):
                            s_acc[j, c] = s_acc[j, c] * qk_scale
                # Online softmax: new row max over the tile, quad-reduced.
                for i in T.unroll(2):
                    m_new[i] = m_i[i]
                    for j in T.unroll(sn):
                        m_new[i] = T.max(m_new[i], T.max(s_acc[j, 2 * i], s_acc[j, 2 * i + 1]))
                    m_new[i] = T.cuda.warp_max(m_new[i], 4)
                    alpha[i] = T.exp2(m_i[i] - m_new[i])
                    m_i[i] = m_new[i]
                    l_i[i] = l_i[i] * alpha[i]
                    for j in T.unroll(sn):
                        s_acc[j, 2 * i] = T.exp2(s_acc[j, 2 * i] - m_new[i])
                        s_acc[j, 2 * i + 1] = T.exp2(s_acc[j, 2 * i + 1] - m_new[i])
                        l_i[i] = l_i[i] + s_acc[j, 2 * i] + s_acc[j, 2 * i + 1]
                for j in T.unroll(on):
                    for c in T.unroll(4):
                        o_acc[j, c] = o_acc[j, c] * alpha[c // 2]

                T.ptx.cp.async_.wait_group(0)
                T.cuda.cta_sync()  # V(kt) landed; every warp is done with K(kt)
                if kt + 1 < num_kt:
                    load_kv_tile(k_smem, k, b, h_kv, kv_off, n, c0 + cols, kv_end, tx)
                    T.ptx.cp.async_.commit_group()

                # O += P V: P's A fragments are S's accumulators packed to 16 bits.
                for kk in T.unroll(pk):
                    T.ptx[pack](p_frag[0], s_acc[2 * kk, 1], s_acc[2 * kk, 0])
                    T.ptx[pack](p_frag[1], s_acc[2 * kk, 3], s_acc[2 * kk, 2])
                    T.ptx[pack](p_frag[2], s_acc[2 * kk + 1, 1], s_acc[2 * kk + 1, 0])
                    T.ptx[pack](p_frag[3], s_acc[2 * kk + 1, 3], s_acc[2 * kk + 1, 2])
                    for jj in T.unroll(on // 2):
                        T.ptx.ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16(
                            b_frag[0], b_frag[1], b_frag[2], b_frag[3],
                            v_smem.ptr_to(
                                [kk * 16 + lane % 8 + ((lane // 8) % 2) * 8,
                                 ((jj * 2 + lane // 16)
                                  ^ ((kk * 16 + lane % 8 + ((lane // 8) % 2) * 8) % swz)) * 8]
                            ),
                        )
                        T.ptx[mma](
                            o_acc[2 * jj, 0], o_acc[2 * jj, 1], o_acc[2 * jj, 2], o_acc[2 * jj, 3],
                            p_frag[0], p_frag[1], p_frag[2], p_frag[3],
                            b_frag[0], b_frag[1],
                            o_acc[2 * jj, 0], o_acc[2 * jj, 1], o_acc[2 * jj, 2], o_acc[2 * jj, 3],
                        )
                        T.ptx[mma](
                            o_acc[2 * jj + 1, 0], o_acc[2 * jj + 1, 1],
                            o_acc[2 * jj + 1, 2], o_acc[2 * jj + 1, 3],
                            p_frag[0], p_frag[1], p_frag[2], p_frag[3],
                            b_frag[2], b_frag[3],
                            o_acc[2 * jj + 1, 0], o_acc[2 * jj + 1, 1],
                            o_acc[2 * jj + 1, 2], o_acc[2 * jj + 1, 3],
                        )

            # Normalize and store the real rows of this warp.
            for i in T.unroll(2):
                l_i[i] = T.cuda.warp_sum(l_i[i], 4)
                rr = r0 + warp * 16 + g + i * 8
                if rr < n:
                    for j in T.unroll(on):
                        for c in T.unroll(2):
                            out[b, q_off + rr, h, j * 8 + t4 * 2 + c] = T.Cast(
                                dtype, o_acc[j, 2 * i + c] / l_i[i]
                            )

    return masked_prefill_tensor_core
