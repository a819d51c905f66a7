"""The portable GPU kernel of both attention ops (padded and packed): generic TIR, one thread
per query row.

It uses only what every TVM GPU backend has (threads, shared memory, barriers), so it compiles
for CUDA, ROCm, Metal and Vulkan alike. A block owns ``rows`` query rows of one (batch row,
query head); key/value tiles are staged in shared memory and only tiles that hold real, visible
keys are loaded. Blocks whose rows are all padding only write zeros. CUDA targets with tensor
cores get :mod:`relax_masked_attn.kernels.cuda_mma` instead for fp16/bf16.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..modes import is_causal, is_left_padded
from .config import portable_gpu_tiles
from .geometry import LOG2E, NEG_INF, attention_func
from .memo import memoized


@memoized
def portable_gpu_kernel(
    heads_q: int, heads_kv: int, head_dim: int, dtype: str, mode: str, sm_scale: float,
    packed: bool = False,
) -> tirx.PrimFunc:
    """PrimFunc ``(q, k, v, valid_len, out)`` for any GPU target, batch and lengths symbolic;
    with ``packed``, the packed op's ``(q, k, v, seq_start, max_len, out)``."""
    causal, left = is_causal(mode), is_left_padded(mode)
    group = heads_q // heads_kv
    rows, cols = portable_gpu_tiles(head_dim, dtype)
    qk_scale = float(sm_scale * LOG2E)
    d = head_dim

    @T.macro
    def zero_rows(out, bi, h, begin, end, tx):
        """Exact zeros into rows [begin, end) of head ``h``, one row a thread at a time."""
        for it in T.serial((end - begin + rows - 1) // rows):
            if begin + it * rows + tx < end:
                for j in T.serial(d):
                    out[bi, begin + it * rows + tx, h, j] = T.Cast(dtype, T.float32(0))

    @T.macro
    def body(q, k, v, geom, out, batch, seq_q, seq_kv):

        bh = T.launch_thread("blockIdx.x", batch * heads_q)
        qt_launch = T.launch_thread("blockIdx.y", (seq_q + rows - 1) // rows)
        tx = T.launch_thread("threadIdx.x", rows)
        k_smem = T.alloc_buffer((cols, d), "float32", scope="shared")
        v_smem = T.alloc_buffer((cols, d), "float32", scope="shared")
        q_reg = T.alloc_buffer((d,), "float32", scope="local")
        acc = T.alloc_buffer((d,), "float32", scope="local")
        s = T.alloc_buffer((cols,), "float32", scope="local")
        stats = T.alloc_buffer((3,), "float32", scope="local")  # row max, row sum, rescale

        b, h, h_kv = geom.heads(bh, heads_q, group)
        n = geom.length(b)
        q_off, kv_off, bi = geom.offsets(b, n)
        grid_tiles = (seq_q + rows - 1) // rows
        if packed:
            # Rows of no sequence: zeros (only the first and last sequence have any). Tiles are
            # relative to the sequence's start; the grid covers max_len, longer ones loop.
            if qt_launch == 0:
                head_end, tail_begin = geom.uncovered(b)
                zero_rows(out, bi, h, 0, head_end, tx)
                zero_rows(out, bi, h, tail_begin, geom.total, tx)
            reps = ((n + rows - 1) // rows + grid_tiles - 1 - qt_launch) // grid_tiles
        else:
            reps = 1
        for rep in T.serial(reps):
            qt = qt_launch + rep * grid_tiles
            tile0 = T.if_then_else(packed, q_off, 0) + qt * rows  # absolute first row
            row = tile0 + tx  # absolute query position of this thread
            rel = row - q_off  # position inside the real block
            # Real rows of this block, relative: [first, last]; empty when first > last.
            first = T.max(tile0 - q_off, 0)
            last = T.min(tile0 + rows - 1 - q_off, n - 1)
            kv_end = T.if_then_else(causal, T.min(n, last + 1), n)

            if first <= last:
                if 0 <= rel and rel < n:
                    for j in T.serial(d):
                        q_reg[j] = T.Cast("float32", q[bi, row, h, j]) * qk_scale
                        acc[j] = T.float32(0)
                stats[0] = NEG_INF
                stats[1] = T.float32(0)
                for kt in T.serial((kv_end + cols - 1) // cols):
                    c0 = kt * cols
                    T.tvm_storage_sync("shared")
                    for it in T.serial((cols * d + rows - 1) // rows):
                        e = it * rows + tx
                        if e < cols * d:
                            c = e // d
                            j = e % d
                            k_smem[c, j] = T.if_then_else(
                                c0 + c < kv_end,
                                T.Cast("float32", k[bi, kv_off + T.min(c0 + c, n - 1), h_kv, j]),
                                T.float32(0),
                            )
                            v_smem[c, j] = T.if_then_else(
                                c0 + c < kv_end,
                                T.Cast("float32", v[bi, kv_off + T.min(c0 + c, n - 1), h_kv, j]),
                                T.float32(0),
                            )
                    T.tvm_storage_sync("shared")
                    if 0 <= rel and rel < n:
                        stats[2] = stats[0]
                        for c in T.unroll(cols):
                            s[c] = T.float32(0)
                            for j in T.serial(d):
                                s[c] = s[c] + q_reg[j] * k_smem[c, j]
                            if c0 + c >= kv_end or (causal and c0 + c > rel):
                                s[c] = NEG_INF
                            stats[0] = T.max(stats[0], s[c])
                        stats[2] = T.exp2(stats[2] - stats[0])
                        stats[1] = stats[1] * stats[2]
                        for j in T.serial(d):
                            acc[j] = acc[j] * stats[2]
                        for c in T.unroll(cols):
                            s[c] = T.exp2(s[c] - stats[0])
                            stats[1] = stats[1] + s[c]
                            for j in T.serial(d):
                                acc[j] = acc[j] + s[c] * v_smem[c, j]
            if packed:
                if first <= last and 0 <= rel and rel < n:
                    for j in T.serial(d):
                        out[bi, row, h, j] = T.Cast(dtype, acc[j] / stats[1])
            elif row < seq_q:
                if first <= last and 0 <= rel and rel < n:
                    for j in T.serial(d):
                        out[bi, row, h, j] = T.Cast(dtype, acc[j] / stats[1])
                else:
                    for j in T.serial(d):
                        out[bi, row, h, j] = T.Cast(dtype, T.float32(0))

    return attention_func(heads_q, heads_kv, head_dim, dtype, body, packed=packed, left=left)
