"""A tensor-core CUDA dense kernel, ``out[m, n] = x @ w.T (+ bias)`` (nn.Linear's layout), sm80+.

apache-tvm 0.27's wheel has no cuBLAS, and dlight's tensor-core matmul rule crashes in it
(``sch.tensorize``), so without this kernel every fp16 ``nn.Linear`` runs on CUDA cores. Same
machinery as the attention kernel (:mod:`.cuda_mma`), in TVMScript with explicit threads:

* a block owns a ``128 x 128`` tile of ``out``; its 4 warps form a 2 x 2 grid, each owning
  ``64 x 64`` outputs as 4 x 8 ``mma.sync.m16n8k16`` fp32 accumulators (the tiles are set in
  :func:`~relax_masked_attn.kernels.config.tensor_core_dense_tiles`);
* ``x`` and ``w`` are both read along ``k`` (``w`` is ``[n, k]``, the B operand's column-major
  layout), in 64-wide k-steps copied global -> shared with ``cp.async`` through a 3-stage ring,
  so two k-steps are in flight while the tensor cores work on a third; the ring is one shared
  pool (dynamic shared memory once it passes 48 KiB);
* shared rows are XOR-swizzled in 16-byte chunks within 128-byte lines (a 64-wide row is one
  line, two 32-wide rows share one), so every ``ldmatrix`` phase hits 8 distinct bank groups;
* rows of ``x`` past ``m`` are zero-filled on load and never stored; the bias, if any, is added
  in fp32 before the one rounding to the output dtype.

``m`` is symbolic (one kernel for every batch shape); ``n`` and ``k`` must be multiples of the
tile's 128 and 64 (:func:`supports`), which every hidden size of the supported models is.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .common import compute_capability, dense_func
from .config import tensor_core_dense_tiles


def supports(target: Target, n: int, k: int, dtype: str) -> bool:
    """Whether this kernel serves an ``[m, k] x [n, k]^T`` product on ``target``."""
    tile_m, tile_n, tile_k, _, _, _ = tensor_core_dense_tiles(dtype)
    return (
        target.kind.name == "cuda"
        and compute_capability(target) >= 80
        and dtype in ("float16", "bfloat16")
        and n % tile_n == 0
        and k % tile_k == 0
    )


def dense_kernel(n: int, k: int, dtype: str, bias: bool = False, tiles=None) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], w [n, k], [bias [n],] out [m, n])``; ``m`` symbolic.

    ``tiles`` overrides :func:`~relax_masked_attn.kernels.config.tensor_core_dense_tiles`
    (for sweeps; ``n`` and ``k`` must be multiples of its tile sizes).
    """
    tiles = tiles or tensor_core_dense_tiles(dtype)
    tile_m, tile_n, tile_k, warps_m, warps_n, stages = tiles
    if n % tile_n or k % tile_k or tile_k not in (32, 64):
        raise ValueError(f"dense_kernel: n={n}, k={k} do not fit tiles {tiles} (k-step 32 or 64)")
    smem_bytes = stages * (tile_m + tile_n) * tile_k * 2
    # Past the 48 KiB of static shared memory a block needs the dynamic kind (TVM's runtime
    # raises the kernel's limit when it loads it).
    scope = "shared" if smem_bytes <= 48 * 1024 else "shared.dyn"
    threads = warps_m * warps_n * 32
    warp_m, warp_n = tile_m // warps_m, tile_n // warps_n  # outputs of one warp
    fm, fn = warp_m // 16, warp_n // 8  # mma tiles of one warp
    chunks = tile_k // 8  # 16-byte chunks in one shared row
    rows_per_line = 8 // chunks  # shared rows in one 128-byte line
    num_kt = k // tile_k
    b_base = tile_m // rows_per_line
    ab = "f16" if dtype == "float16" else "bf16"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"

    def line(r):
        return r // rows_per_line

    def chunk(r, c):
        """Swizzled 16-byte chunk of logical (row r, chunk c) within its 128-byte line."""
        return ((r % rows_per_line) * chunks + c) ^ (line(r) % 8)

    @T.macro
    def load_tile(smem, base, src, row0, rows, limit, kt, slot, tx):
        """cp.async ``src[row0 : row0 + rows, kt * tile_k : ...]`` into ``smem[slot]`` from line
        ``base`` on."""
        for it in T.unroll(rows * chunks // threads):
            e = it * threads + tx
            r = e // chunks
            c = e % chunks
            T.ptx.cp.async_.cg.shared.global_(
                smem.ptr_to([slot, base + line(r), chunk(r, c) * 8]),
                src.ptr_to([T.min(row0 + r, limit - 1), kt * tile_k + c * 8]),
                16,
                T.if_then_else(row0 + r < limit, T.uint32(16), T.uint32(0)),
            )

    @T.macro
    def body(x, w, bias_buf, out, m):
        bn = T.launch_thread("blockIdx.x", n // tile_n)
        bm = T.launch_thread("blockIdx.y", (m + tile_m - 1) // tile_m)
        tx = T.launch_thread("threadIdx.x", threads)
        # One shared pool a stage: x's rows in lines [0, b_base), w's rows after them.
        smem = T.alloc_buffer((stages, (tile_m + tile_n) // rows_per_line, 64), dtype, scope=scope)
        a_frag = T.alloc_buffer((fm, 4), "uint32", scope="local")
        b_frag = T.alloc_buffer((fn // 2, 4), "uint32", scope="local")
        acc = T.alloc_buffer((fm, fn, 4), "float32", scope="local")
        m0 = bm * tile_m
        n0 = bn * tile_n
        warp = tx // 32
        lane = tx % 32
        wm = warp // warps_n
        wn = warp % warps_n
        g = lane // 4
        t4 = lane % 4

        for i in T.unroll(fm):
            for j in T.unroll(fn):
                for c in T.unroll(4):
                    acc[i, j, c] = T.float32(0)
        for s in T.unroll(stages - 1):
            if s < num_kt:
                load_tile(smem, 0, x, m0, tile_m, m, s, s, tx)
                load_tile(smem, b_base, w, n0, tile_n, n, s, s, tx)
            T.ptx.cp.async_.commit_group()
        for kt in T.serial(num_kt):
            T.ptx.cp.async_.wait_group(stages - 2)
            T.cuda.cta_sync()  # k-step kt landed; every warp is done with the slot of kt - 1
            if kt + stages - 1 < num_kt:
                nxt = (kt + stages - 1) % stages
                load_tile(smem, 0, x, m0, tile_m, m, kt + stages - 1, nxt, tx)
                load_tile(smem, b_base, w, n0, tile_n, n, kt + stages - 1, nxt, tx)
            T.ptx.cp.async_.commit_group()
            slot = kt % stages
            for kk in T.unroll(tile_k // 16):
                for i in T.unroll(fm):
                    T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                        a_frag[i, 0], a_frag[i, 1], a_frag[i, 2], a_frag[i, 3],
                        smem.ptr_to(
                            [slot, line(wm * warp_m + i * 16 + lane % 16),
                             chunk(wm * warp_m + i * 16 + lane % 16, kk * 2 + lane // 16) * 8]
                        ),
                    )
                for jj in T.unroll(fn // 2):
                    T.ptx.ldmatrix.sync.aligned.m8n8.x4.shared.b16(
                        b_frag[jj, 0], b_frag[jj, 1], b_frag[jj, 2], b_frag[jj, 3],
                        smem.ptr_to(
                            [slot,
                             b_base + line(wn * warp_n + jj * 16 + lane % 8 + (lane // 16) * 8),
                             chunk(wn * warp_n + jj * 16 + lane % 8 + (lane // 16) * 8,
                                   kk * 2 + (lane // 8) % 2) * 8]
                        ),
                    )
                for i in T.unroll(fm):
                    for j in T.unroll(fn):
                        T.ptx[mma](
                            acc[i, j, 0], acc[i, j, 1], acc[i, j, 2], acc[i, j, 3],
                            a_frag[i, 0], a_frag[i, 1], a_frag[i, 2], a_frag[i, 3],
                            b_frag[j // 2, (j % 2) * 2], b_frag[j // 2, (j % 2) * 2 + 1],
                            acc[i, j, 0], acc[i, j, 1], acc[i, j, 2], acc[i, j, 3],
                        )
        # Epilogue: c0, c1 are (row g, cols 2t, 2t + 1); c2, c3 the same of row g + 8.
        for i in T.unroll(fm):
            for h in T.unroll(2):
                row = m0 + wm * warp_m + i * 16 + g + h * 8
                if row < m:
                    for j in T.unroll(fn):
                        for c in T.unroll(2):
                            col = n0 + wn * warp_n + j * 8 + t4 * 2 + c
                            if bias:
                                out[row, col] = T.Cast(
                                    dtype, acc[i, j, h * 2 + c] + T.Cast("float32", bias_buf[col])
                                )
                            else:
                                out[row, col] = T.Cast(dtype, acc[i, j, h * 2 + c])

    return dense_func(n, k, dtype, body, bias)
