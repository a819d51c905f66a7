"""Tensor-core CUDA dense kernels, ``out[m, n] = x @ w.T (+ bias)`` (nn.Linear's layout).

apache-tvm 0.27's wheel has no cuBLAS, and dlight's tensor-core matmul rule crashes in it
(``sch.tensorize``), so without these kernels every fp16 ``nn.Linear`` runs on CUDA cores. Two
generators, both in TVMScript with explicit threads and the same PrimFunc signature
(:func:`~relax_masked_attn.kernels.epilogue.dense_func`):

* :func:`wgmma_dense_kernel` for ``sm_90a`` (H100/H200 with the Hopper-only ``a`` features):
  ``wgmma.mma_async`` on descriptors of swizzled shared tiles, output staged through shared
  memory for 16-byte stores; 0.78-0.97x of cuBLAS on the H200 (docs/performance.md). Models
  built for ``sm_90a`` get its warp-specialized persistent form, :mod:`.cuda_tma_dense` (TMA
  copies from a producer warpgroup; 0.85-1.05x), which shares its epilogue, tiles and
  small-batch path;
* :func:`dense_kernel` for every other sm80+ target (A100, L40, and ``sm_90`` without the
  ``a``), described below; 0.55-0.61x of cuBLAS on the same shapes (the H200, where cuBLAS runs
  ``wgmma``).

Both stage the output tile in shared memory for 16-byte stores (:func:`staged_store`), and
both send batches of at most :data:`SMALL_ROWS` rows (a single text) to a split-k path
(:func:`with_small_batches`): with a few rows a product has only ``n / tile_n`` blocks, a few of
the GPU's SMs, each walking all of ``k``.

:func:`dense_kernel` uses the same machinery as the attention kernel (:mod:`.cuda_mma`):

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

from ..targets import compute_capability, cuda_arch
from .config import largest_divisor, tensor_core_dense_tiles, wgmma_dense_tiles
from .epilogue import Epilogue, dense_func
from .hopper import realign_pool, swizzle128_descriptor
from .memo import memoized


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


@memoized
def dense_kernel(n: int, k: int, dtype: str, epilogue: Epilogue | None = None,
                 tiles=None) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], w [n, k], [bias [n],] [residual [m, n],] out [m, n])``; ``m``
    symbolic; ``epilogue`` says what joins the product before it is stored. Batches of at most
    :data:`SMALL_ROWS` rows take the split-k path (:func:`with_small_batches`).

    ``tiles`` overrides :func:`~relax_masked_attn.kernels.config.tensor_core_dense_tiles`
    (for sweeps; ``n`` and ``k`` must be multiples of its tile sizes).
    """
    epilogue = epilogue or Epilogue()
    tiles = tiles or tensor_core_dense_tiles(dtype)
    body = _mma_bodies(n, k, dtype, epilogue, tiles)[0]
    small = with_small_batches(n, k, dtype, epilogue, body, tiles[1], tiles[3] * tiles[4] * 32)
    return dense_func(n, k, dtype, small, epilogue)


def _mma_bodies(n: int, k: int, dtype: str, epilogue: Epilogue, tiles, splits: int = 1,
                launch_cols: int | None = None):
    """The ``mma.sync`` kernel as ``T.macro`` bodies: ``(body(x, w, bias, residual, out, m),
    partial(x, w, ws, m))``. ``body`` is the whole product and epilogue; ``partial`` runs the
    product split ``splits`` ways along k, part ``p`` summing k-steps ``[p s, (p + 1) s)`` and
    writing its fp32 sums to ``ws[p, row, col]`` (rows past ``m`` not written). Its grid has
    ``n / launch_cols`` blocks along x (default: one a tile) and ``splits * launch_cols /
    tile_n`` along z, which names the part and the tile within the ``launch_cols`` columns."""
    tile_m, tile_n, tile_k, warps_m, warps_n, stages = tiles
    launch_cols = launch_cols or tile_n
    sub = launch_cols // tile_n  # tiles a block of x
    if n % tile_n or k % tile_k or tile_k not in (32, 64) or (k // tile_k) % splits:
        raise ValueError(f"dense_kernel: n={n}, k={k} do not fit tiles {tiles} (k-step 32 or 64)"
                         f" split {splits} ways")
    smem_bytes = stages * (tile_m + tile_n) * tile_k * 2
    # Past the 48 KiB of static shared memory a block needs the dynamic kind (TVM's runtime
    # raises the kernel's limit when it loads it).
    scope = "shared" if smem_bytes <= 48 * 1024 else "shared.dyn"
    threads = warps_m * warps_n * 32
    warp_m, warp_n = tile_m // warps_m, tile_n // warps_n  # outputs of one warp
    fm, fn = warp_m // 16, warp_n // 8  # mma tiles of one warp
    chunks = tile_k // 8  # 16-byte chunks in one shared row
    rows_per_line = 8 // chunks  # shared rows in one 128-byte line
    steps = k // tile_k // splits  # k-steps of one block
    b_base = tile_m // rows_per_line
    pool_elems = stages * (tile_m + tile_n) * tile_k
    offset, store = staged_store(n, dtype, epilogue, tile_m, tile_n, threads, pool_elems, scope)
    ab = "f16" if dtype == "float16" else "bf16"
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"

    def line(r):
        return r // rows_per_line

    def chunk(r, c):
        """Swizzled 16-byte chunk of logical (row r, chunk c) within its 128-byte line."""
        return ((r % rows_per_line) * chunks + c) ^ (line(r) % 8)

    # Expressions, not names assigned in the macro (which TVMScript makes mutable locals, opaque
    # to the simplifier): the row and chunk thread tx copies in turn it of a tile.
    def copy_row(it, tx):
        return (it * threads + tx) // chunks

    def copy_chunk(it, tx):
        return (it * threads + tx) % chunks

    def copy_dest(smem, base, slot, it, tx):
        """Shared pointer of the chunk thread tx copies in turn it, tile from line base on."""
        return smem.ptr_to([slot, base + line(copy_row(it, tx)),
                            chunk(copy_row(it, tx), copy_chunk(it, tx)) * 8])

    @T.macro
    def load_tile(smem, base, src, row0, rows, limit, kt, slot, tx, bounded):
        """cp.async ``src[row0 : row0 + rows, kt * tile_k : ...]`` into ``smem[slot]`` from line
        ``base`` on; where ``bounded``, rows from ``limit`` on are zeros (and read row
        ``limit - 1``). An unbounded copy's addresses are a base fixed for the thread plus
        constants, which the compiler keeps out of the k-loop."""
        for it in T.unroll(rows * chunks // threads):
            if bounded:
                T.ptx.cp.async_.cg.shared.global_(
                    copy_dest(smem, base, slot, it, tx),
                    src.ptr_to([T.min(row0 + copy_row(it, tx), limit - 1),
                                kt * tile_k + copy_chunk(it, tx) * 8]),
                    16,
                    T.if_then_else(row0 + copy_row(it, tx) < limit, T.uint32(16), T.uint32(0)),
                )
            else:
                T.ptx.cp.async_.cg.shared.global_(
                    copy_dest(smem, base, slot, it, tx),
                    src.ptr_to([row0 + copy_row(it, tx), kt * tile_k + copy_chunk(it, tx) * 8]),
                    16,
                )

    @T.macro
    def load_step(x, w, smem, m, m0, n0, kt, slot, tx):
        """k-step ``kt`` of the block's x rows and w rows into ``smem[slot]``: w's rows always
        exist (``n`` is a multiple of ``tile_n``), x's only past the last whole tile of rows
        need bounds."""
        if m0 + tile_m <= m:
            load_tile(smem, 0, x, m0, tile_m, m, kt, slot, tx, False)
        else:
            load_tile(smem, 0, x, m0, tile_m, m, kt, slot, tx, True)
        load_tile(smem, b_base, w, n0, tile_n, n, kt, slot, tx, False)

    @T.macro
    def product(x, w, smem, acc, m, m0, n0, kt0, tx):
        """``acc`` = the block's tile of ``x @ w.T`` over k-steps ``[kt0, kt0 + steps)``."""
        a_frag = T.alloc_buffer((fm, 4), "uint32", scope="local")
        b_frag = T.alloc_buffer((fn // 2, 4), "uint32", scope="local")
        warp = tx // 32
        lane = tx % 32
        wm = warp // warps_n
        wn = warp % warps_n
        for i in T.unroll(fm):
            for j in T.unroll(fn):
                for c in T.unroll(4):
                    acc[i, j, c] = T.float32(0)
        for s in T.unroll(stages - 1):
            if s < steps:
                load_step(x, w, smem, m, m0, n0, kt0 + s, s, tx)
            T.ptx.cp.async_.commit_group()
        for kt in T.serial(steps):
            T.ptx.cp.async_.wait_group(stages - 2)
            T.cuda.cta_sync()  # k-step kt landed; every warp is done with the slot of kt - 1
            if kt + stages - 1 < steps:
                load_step(x, w, smem, m, m0, n0, kt0 + kt + stages - 1,
                          (kt + stages - 1) % stages, tx)
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
        T.ptx.cp.async_.wait_group(0)

    def fragment_row(tx, i, h):
        """Row within the block's tile of accumulators ``acc[i, j, 2 h]``, ``acc[i, j, 2 h + 1]``
        (``mma``'s c0, c1 are row g of the warp's m16 tile i, c2, c3 row g + 8)."""
        return tx // 32 // warps_n * warp_m + i * 16 + tx % 32 // 4 + h * 8

    def fragment_col(tx, j):
        """Column within the block's tile of accumulator ``acc[i, j, 0]`` (``+ 1``:
        ``acc[i, j, 1]``; columns 2 t, 2 t + 1 of the warp's n8 tile j)."""
        return tx // 32 % warps_n * warp_n + j * 8 + tx % 4 * 2

    @T.macro
    def body(x, w, bias_buf, residual, outs, m):
        bn = T.launch_thread("blockIdx.x", n // tile_n)
        bm = T.launch_thread("blockIdx.y", (m + tile_m - 1) // tile_m)
        tx = T.launch_thread("threadIdx.x", threads)
        # One shared pool a stage: x's rows in lines [0, b_base), w's rows after them.
        smem = T.alloc_buffer((stages, (tile_m + tile_n) // rows_per_line, 64), dtype, scope=scope)
        acc = T.alloc_buffer((fm, fn, 4), "float32", scope="local")
        n0 = bn * tile_n
        product(x, w, smem, acc, m, bm * tile_m, n0, 0, tx)
        # Epilogue through shared memory (staged_store): each accumulator pair goes to the
        # staging tile in the output dtype, bias and activation applied.
        T.tvm_storage_sync("shared")  # every warp is done reading the ring
        staging = T.decl_buffer((pool_elems,), dtype, data=smem.data, scope=scope)
        pair = T.alloc_buffer((2,), dtype, scope="local")
        for i in T.unroll(fm):
            for h in T.unroll(2):
                r = fragment_row(tx, i, h)
                for j in T.unroll(fn):
                    col = fragment_col(tx, j)
                    for c in T.unroll(2):
                        pair[c] = T.Cast(dtype, epilogue.value(
                            acc[i, j, h * 2 + c],
                            bias_buf[n0 + col + c] if epilogue.bias else None,
                        ))
                    staging[T.Ramp(offset(r, col), 1, 2)] = pair[T.Ramp(0, 1, 2)]
        T.tvm_storage_sync("shared")
        store(smem, residual, outs, m, bm, bn, tx, 0)

    def tile_col(bn, bz):
        """First column of the tile of block (``bn``, ``bz``)."""
        return bn * launch_cols + bz % sub * tile_n

    @T.macro
    def partial(x, w, ws, m):
        with T.launch_thread("blockIdx.x", n // launch_cols) as bn:
            bm = T.launch_thread("blockIdx.y", (m + tile_m - 1) // tile_m)
            bz = T.launch_thread("blockIdx.z", splits * sub)
            tx = T.launch_thread("threadIdx.x", threads)
            smem = T.alloc_buffer((stages, (tile_m + tile_n) // rows_per_line, 64), dtype,
                                  scope=scope)
            acc = T.alloc_buffer((fm, fn, 4), "float32", scope="local")
            product(x, w, smem, acc, m, bm * tile_m, tile_col(bn, bz), bz // sub * steps, tx)
            for i in T.unroll(fm):
                for h in T.unroll(2):
                    if bm * tile_m + fragment_row(tx, i, h) < m:
                        for j in T.unroll(fn):
                            for c in T.unroll(2):
                                ws[bz // sub, bm * tile_m + fragment_row(tx, i, h),
                                   tile_col(bn, bz) + fragment_col(tx, j) + c] = (
                                    acc[i, j, h * 2 + c])

    return body, partial


# Batches of at most this many rows (one text of up to 64 tokens, a few short ones) run the
# split-k path: at 32 rows a 768-column product has 3 to 6 blocks, a few of the GPU's 132 SMs,
# each walking all of k; splitting k fills the GPU.
SMALL_ROWS = 64
# Blocks the split aims at: one an SM of an H100/H200. BERT-base's 32-token forward (a CUDA
# graph on the H200) took 562 us of GPU time at 132, 611 at 264, 636 at 66, 689 at 528: more
# parts make more partial sums to write and add, fewer leave SMs idle.
SMALL_BLOCKS = 132


def small_batch_splits(n: int, k: int, tile_n: int = 128) -> int:
    """How many ways the split-k path divides ``k`` (in 64-wide k-steps, evenly): the most that
    keep the grid of ``tile_n``-column tiles within :data:`SMALL_BLOCKS`."""
    return largest_divisor(k // 64, max(1, SMALL_BLOCKS // (n // tile_n)))


def with_small_batches(n: int, k: int, dtype: str, epilogue: Epilogue, body, tile_n: int,
                       threads: int):
    """``body`` (a dense kernel's macro, blocks of ``tile_n`` columns and ``threads`` threads) for
    batches of more than :data:`SMALL_ROWS` rows; smaller ones run an ``mma.sync`` product split
    along k (:func:`small_batch_splits` ways) into an fp32 workspace of ``SMALL_ROWS`` rows,
    then a kernel that adds the partial sums and applies the epilogue (a gated one pairs gate
    and up columns as :func:`gate_group` interleaves them, ``tile_n / 2`` of each a block).

    All three kernels launch ``blockIdx.x`` (``n / tile_n``), ``blockIdx.y`` (128-row tiles)
    and ``threadIdx.x`` (``threads``) alike; the split product and the sum add ``blockIdx.z``.
    (apache-tvm 0.27 gives each kernel of a PrimFunc its own launch extents: two kernels in the
    branches of one PrimFunc with 128 and 256 threads along x compile to
    ``__launch_bounds__(128)`` and ``(256)``.) The split
    product runs tiles of ``SMALL_ROWS`` x 128 (``tile_n / 128`` of them a block of x, told
    apart by z: for the Hopper kernels' 256-column blocks that doubles the blocks and halves
    their shared memory), its warps side by side along n, so that every warp works on rows the
    batch has (a 128-row tile on two warp rows ran the second on absent rows, which doubled the
    kernel's code and its tensor-core work)."""
    splits = small_batch_splits(n, k, 128)
    depth = splits * (tile_n // 128)  # blockIdx.z
    tiles = (SMALL_ROWS, 128, 64, 1, threads // 32, 3)  # one warp row: no warp on absent rows
    partial = _mma_bodies(n, k, dtype, epilogue, tiles, splits, launch_cols=tile_n)[1]
    cols = epilogue.out_columns(tile_n)  # output columns of a block
    row_steps = (SMALL_ROWS + depth - 1) // depth

    def row_of(bm, bz, i):
        return bm * 128 + i * depth + bz

    def col_of(q, tx):
        """Column within the block's ``cols`` outputs."""
        return q * threads + tx

    parts = epilogue.outputs(n)  # (first column, width) of each output

    @T.macro
    def put(outs, row, col, value):
        """``value`` to column ``col`` of the product's outputs (one, or the split's part that
        holds it: a block's columns lie in one part)."""
        if len(parts) == 1:
            outs[0][row, col] = value
        else:
            if col < parts[1][0]:
                outs[0][row, col] = value
            else:
                if len(parts) == 2:
                    outs[1][row, col - parts[1][0]] = value
                else:
                    if col < parts[2][0]:
                        outs[1][row, col - parts[1][0]] = value
                    else:
                        outs[2][row, col - parts[2][0]] = value

    @T.macro
    def reduce(ws, bias_buf, residual, outs, m):
        with T.launch_thread("blockIdx.x", n // tile_n) as bn:
            bm = T.launch_thread("blockIdx.y", (m + 127) // 128)
            bz = T.launch_thread("blockIdx.z", depth)
            tx = T.launch_thread("threadIdx.x", threads)
            total = T.alloc_buffer((2,), "float32", scope="local")
            for q in T.serial((cols + threads - 1) // threads):
                for i in T.serial(row_steps):
                    if row_of(bm, bz, i) < m and col_of(q, tx) < cols:
                        total[0] = T.float32(0)
                        total[1] = T.float32(0)
                        for z in T.unroll(splits):  # independent loads, all in flight
                            # gated: gate rows [bn tile_n, + cols), the matching up rows after them
                            total[0] = total[0] + ws[z, row_of(bm, bz, i),
                                                     bn * tile_n + col_of(q, tx)]
                            if epilogue.gated:
                                total[1] = total[1] + ws[z, row_of(bm, bz, i),
                                                         bn * tile_n + cols + col_of(q, tx)]
                        if epilogue.gated:
                            put(outs, row_of(bm, bz, i), bn * cols + col_of(q, tx),
                                epilogue.swiglu(dtype, T.Cast(dtype, total[0]),
                                                T.Cast(dtype, total[1])))
                        else:
                            put(outs, row_of(bm, bz, i), bn * cols + col_of(q, tx),
                                epilogue.store(
                                    dtype, total[0],
                                    bias_buf[bn * cols + col_of(q, tx)] if epilogue.bias
                                    else None,
                                    residual[row_of(bm, bz, i), bn * cols + col_of(q, tx)]
                                    if epilogue.residual else None))

    @T.macro
    def dispatch(x, w, bias_buf, residual, outs, m):
        if m <= SMALL_ROWS:
            ws = T.alloc_buffer((splits, SMALL_ROWS, n), "float32")
            partial(x, w, ws, m)
            reduce(ws, bias_buf, residual, outs, m)
        else:
            body(x, w, bias_buf, residual, outs, m)

    return dispatch


# Rows whose residual vectors a thread of the staged epilogue reads at once, before it stores
# the first of them (16 registers). On the H200 (fp16, 10368 rows, timed in alternation):
# BERT-base's attention output product (768 x 768 + residual) 33.4 us against 39.4 reading
# each row's residual next to its store (the persistent TMA kernel), 47.0 against 53.7 us
# (``mma.sync``, sm_80 build); at 768 x 3072 3% and 2.5%. 8 rows ran slower in both (the
# persistent kernel, capped at 168 registers, spills 100 bytes; all 16 rows at once, 308).
RESIDUAL_BATCH = 4


def staged_store(n: int, dtype: str, epilogue: Epilogue, tile_m: int, tile_n: int,
                 threads: int, pool_elems: int, scope: str, opaque: bool = False,
                 swizzled: bool = False):
    """The second half of both kernels' epilogue: the block's output tile, staged in the shared
    pool as ``tile_m`` rows of ``tile_n + 8`` elements (the value before the residual, in the
    output dtype), written to ``out`` in whole 16-byte vectors, the residual's 16 bytes read and
    added on the way (those of :data:`RESIDUAL_BATCH` rows read before the first of them is
    stored, so that their global latencies overlap). Returns ``(offset, macro)``: ``offset(r,
    col)`` is the element of the staging tile that output ``(r, col)`` of the tile goes to (for
    :func:`wgmma_staging`); the macro is called as ``store(smem, residual, out, m, bm, bn, tx,
    base)`` after a barrier that follows the writes, ``base`` the staging tile's first element
    in the pool.
    ``opaque``: the tile is read by ``ld.shared`` on its addresses, which TVM's barrier planner
    does not see (for kernels whose warpgroups order their own accesses with named barriers).
    ``swizzled``: the rows are not padded; 16-byte chunk ``j`` of row ``r`` lies at chunk ``j ^
    (r % 8)`` of it, which spreads a fragment's 8 rows over the banks as the padding does, in
    ``tile_m * tile_n`` elements (the cooperative kernel's 4-stage ring leaves no more).

    The staging rows are padded by 16 bytes, so the 8 rows of an ``mma`` fragment that a warp
    writes at once fall in distinct banks. Each thread moves 8 columns of a row as four 4-byte
    shared loads and one 16-byte global store (word views of the pool, of ``out`` and of the
    residual, whose halves are read as ``dtype``). Nsight Compute had shown the direct 2-byte
    stores of the fragments using 8 of every 32 bytes sent. A ``gated`` epilogue's tile holds
    gate columns in its first half and the matching up columns in its second
    (:func:`~relax_masked_attn.kernels.epilogue.gated_weight` with ``group = tile_n / 2``): a
    thread reads 8 of each and writes 8 outputs ``silu(gate) * up``.
    """
    out_stride = tile_n if swizzled else tile_n + 8
    cols = epilogue.out_columns(tile_n)  # output columns of the tile
    parts = epilogue.outputs(n)  # (first column, width) of each output
    per_row = cols // 8  # threads a row
    assert tile_m * out_stride <= pool_elems and threads % per_row == 0

    def offset(r, col):
        """Element of output ``(r, col)`` of the tile within the staging tile."""
        if swizzled:
            return r * out_stride + (col // 8 ^ r % 8) * 8 + col % 8
        return r * out_stride + col
    assert all(start % cols == 0 for start, _ in parts), "a tile must lie in one split part"

    steps = tile_m * per_row // threads  # rows a thread moves
    batch = largest_divisor(steps, RESIDUAL_BATCH)

    def tile_row(it, tx):
        """The row of the tile whose 8 columns thread ``tx`` moves in step ``it``."""
        return it * (threads // per_row) + tx // per_row

    def out_word(bm, bn, it, tx, part: int = 0):
        """Index of the first 32-bit word, in output ``part``, of the 8 columns thread ``tx``
        moves in step ``it`` (written out in thread and loop variables, whose multiple of 4 the
        code generator must see to emit one 16-byte access, not four)."""
        start, width = parts[part]
        row = bm * tile_m + tile_row(it, tx)
        return (row * width + bn * cols - start + tx % per_row * 8) // 2

    def read_staged(words, smem, elem):
        """The 4 words at element ``elem`` of the pool into ``words``, by ``ld.shared``."""
        return T.ptx.ld.shared.v4.b32(words[0], words[1], words[2], words[3],
                                      smem.ptr_to([elem]))

    @T.macro
    def store(smem, residual, outs, m, bm, bn, tx, base):
        smem_words = T.decl_buffer((pool_elems // 2,), "uint32", data=smem.data, scope=scope)
        out_words = T.decl_buffer((m * (parts[0][1] // 2),), "uint32", data=outs[0].data)
        if len(parts) > 1:
            out_words1 = T.decl_buffer((m * (parts[1][1] // 2),), "uint32", data=outs[1].data)
        if len(parts) > 2:
            out_words2 = T.decl_buffer((m * (parts[2][1] // 2),), "uint32", data=outs[2].data)
        words = T.alloc_buffer((4,), "uint32", scope="local")
        halves = T.decl_buffer((8,), dtype, data=words.data, scope="local")
        if epilogue.residual:
            res_words = T.decl_buffer((m * (n // 2),), "uint32", data=residual.data)
            res = T.alloc_buffer((batch * 4,), "uint32", scope="local")
            res_halves = T.decl_buffer((batch * 8,), dtype, data=res.data, scope="local")
        if epilogue.gated:
            up = T.alloc_buffer((4,), "uint32", scope="local")
            up_halves = T.decl_buffer((8,), dtype, data=up.data, scope="local")
        for c in T.unroll(steps // batch):
            if epilogue.residual:
                # a batch's residual vectors are read before its first store, so that the
                # reads are in flight together (read in the store's loop, each one stayed
                # behind the previous row's store in ptxas's schedule)
                for j in T.unroll(batch):
                    if bm * tile_m + tile_row(c * batch + j, tx) < m:
                        res[T.Ramp(j * 4, 1, 4)] = res_words[
                            T.Ramp(out_word(bm, bn, c * batch + j, tx), 1, 4)]
            for j in T.unroll(batch):
                it = c * batch + j
                r = tile_row(it, tx)
                col = tx % per_row * 8
                if bm * tile_m + r < m:
                    if opaque:
                        read_staged(words, smem, base + offset(r, col))
                    else:
                        for q in T.unroll(4):
                            words[q] = smem_words[(base + offset(r, col)) // 2 + q]
                    if epilogue.residual:
                        for e in T.unroll(8):
                            halves[e] = epilogue.add_residual(dtype, halves[e],
                                                              res_halves[j * 8 + e])
                    if epilogue.gated:
                        if opaque:
                            read_staged(up, smem, base + offset(r, cols + col))
                        else:
                            for q in T.unroll(4):
                                up[q] = smem_words[(base + offset(r, cols + col)) // 2 + q]
                        for e in T.unroll(8):
                            halves[e] = epilogue.swiglu(dtype, halves[e], up_halves[e])
                    if len(parts) == 1:
                        out_words[T.Ramp(out_word(bm, bn, it, tx), 1, 4)] = words[T.Ramp(0, 1, 4)]
                    else:
                        if bn * cols < parts[1][0]:
                            out_words[T.Ramp(out_word(bm, bn, it, tx), 1, 4)] = words[
                                T.Ramp(0, 1, 4)]
                        else:
                            if len(parts) == 2:
                                out_words1[T.Ramp(out_word(bm, bn, it, tx, 1), 1, 4)] = words[
                                    T.Ramp(0, 1, 4)]
                            else:
                                if bn * cols < parts[2][0]:
                                    out_words1[T.Ramp(out_word(bm, bn, it, tx, 1), 1, 4)] = words[
                                        T.Ramp(0, 1, 4)]
                                else:
                                    out_words2[T.Ramp(out_word(bm, bn, it, tx, 2), 1, 4)] = words[
                                        T.Ramp(0, 1, 4)]

    return offset, store


def wgmma_staging(dtype: str, epilogue: Epilogue, tile_n: int, offset,
                  opaque: bool = False, swiglu: bool = False, window: int | None = None):
    """The first half of the ``wgmma`` kernels' epilogue (the second is :func:`staged_store`, or
    for the TMA-store form ``cuda_tma_dense.tile_stores``): a macro ``(smem, acc, bias, n0,
    row0, t, base)`` by which thread ``t`` of a warpgroup writes its ``m64n{tile_n}``
    accumulators, rows ``row0 ..`` of the staging tile at element ``base`` of the pool, in the
    output dtype with bias and activation applied (``n0``: the tile's first column); output
    ``(r, col)`` of the tile goes to element ``base + offset(r, col)``. Accumulator ``i`` of a
    thread: n8 tile ``i // 4``, row ``g`` (+ 8 for ``i % 4 >= 2``), column ``2 t`` (+ 1).
    ``opaque`` as in :func:`staged_store` (``st.shared``). ``swiglu``: a gated tile's gate
    columns are its first half and up the second, and the tile stages ``silu(gate) * up``,
    ``tile_n / 2`` columns (else a gated tile is staged as it is, for the store to pair).
    ``window``: the macro takes one more argument, ``first`` (a multiple of ``window``), and
    stages only the accumulators of columns ``first .. first + window``, as columns ``0 ..
    window`` of the staging tile."""
    tiles8 = (tile_n // 2 if swiglu else tile_n) // 8  # n8 tiles of staged outputs
    gate_shift = tile_n // 2 // 8 * 4  # accumulators from a gate column to its up column
    if window is not None:
        assert not swiglu and tile_n % window == 0
        tiles8 = window // 8

    def write_pair(smem, pair_word, elem):
        """The two halves of ``pair_word`` to element ``elem`` of the pool, by ``st.shared``."""
        return T.ptx.st.shared.b32(smem.ptr_to([elem]), pair_word[0])

    @T.macro
    def stage_window(smem, acc, bias_buf, n0, row0, t, base, first):
        lane = t % 32
        pair = T.alloc_buffer((2,), dtype, scope="local")
        pair_word = T.decl_buffer((1,), "uint32", data=pair.data, scope="local")
        if opaque and epilogue.bias:
            # the thread's bias values first: an `st.shared` (an asm statement that may write
            # memory, to the compiler) would otherwise hold each bias read behind the last one
            bias_regs = T.alloc_buffer((tiles8 * 2,), dtype, scope="local")
            for j in T.unroll(tiles8):
                for c in T.unroll(2):
                    bias_regs[j * 2 + c] = bias_buf[n0 + first + j * 8 + lane % 4 * 2 + c]
        for h in T.unroll(2):
            r = row0 + t // 32 * 16 + lane // 4 + h * 8
            for j in T.unroll(tiles8):
                col = j * 8 + lane % 4 * 2
                for c in T.unroll(2):
                    if swiglu:
                        pair[c] = epilogue.swiglu(
                            dtype, T.Cast(dtype, acc[j * 4 + h * 2 + c]),
                            T.Cast(dtype, acc[j * 4 + h * 2 + c + gate_shift]))
                    else:
                        pair[c] = T.Cast(dtype, epilogue.value(
                            acc[first // 2 + j * 4 + h * 2 + c],
                            (bias_regs[j * 2 + c] if opaque else bias_buf[n0 + first + col + c])
                            if epilogue.bias else None))
                if opaque:
                    write_pair(smem, pair_word, base + offset(r, col))
                else:
                    smem[T.Ramp(base + offset(r, col), 1, 2)] = pair[T.Ramp(0, 1, 2)]

    @T.macro
    def stage(smem, acc, bias_buf, n0, row0, t, base):
        stage_window(smem, acc, bias_buf, n0, row0, t, base, 0)

    return stage if window is None else stage_window


def split_fits(target: Target, widths, k: int, dtype: str) -> bool:
    """Whether one kernel serves products of ``widths`` weight rows stacked along ``n``
    (``Epilogue.split``): every part starts at a multiple of the kernel's column tile, so that
    a block writes one part."""
    n = sum(widths)
    if not supports(target, n, k, dtype):
        return False
    tile_n = wgmma_dense_tiles(n, dtype)[0] if has_wgmma(target) else tensor_core_dense_tiles(
        dtype)[1]
    return all(sum(widths[:i]) % tile_n == 0 for i in range(len(widths)))


def gate_group(target: Target, n: int, dtype: str) -> int:
    """Rows of gate, then of up, a group of the interleaved weight of a gated product of ``n``
    weight rows (both projections) on ``target``: half the columns of the kernel's tile."""
    tile_n = (wgmma_dense_tiles(n, dtype)[0] if has_wgmma(target)
              else tensor_core_dense_tiles(dtype)[1])
    return tile_n // 2


def has_wgmma(target: Target) -> bool:
    """Whether ``target`` can run Hopper's ``wgmma`` (arch ``sm_90a``: the ``a`` features)."""
    return target.kind.name == "cuda" and cuda_arch(target) == "sm_90a"


@memoized
def wgmma_dense_kernel(n: int, k: int, dtype: str, epilogue: Epilogue | None = None,
                       tiles=None) -> tirx.PrimFunc:
    """The same PrimFunc as :func:`dense_kernel` for ``sm_90a``, on ``wgmma.mma_async``.

    A block of two warpgroups owns ``128 x tile_n`` outputs; warpgroup ``g`` computes rows
    ``64 g .. 64 g + 63`` with one ``m64n{tile_n}k16`` instruction a 16-wide k-step, both operands
    read by the tensor cores straight from shared memory through matrix descriptors (no
    ``ldmatrix``, no register fragments for A and B). The shared tiles use the layout the
    descriptors call 128-byte swizzle: 64-wide k-rows of 128 bytes, 16-byte chunk ``c`` of row
    ``r`` at chunk ``c ^ (r % 8)``, each 8-row group 1024 bytes and 1024-byte aligned (the pool is
    realigned at run time). k-steps of 64 stream through a ``stages``-deep ``cp.async`` ring, one
    ``wgmma`` group in flight while the next is issued.

    Element offsets are int32, as in :func:`dense_kernel`: ``m * k`` and ``m * n`` must stay
    below 2**31 (699 050 rows at k = 3072; ``EmbeddingModel`` batches 8192 tokens); the host
    side of the call checks it and raises (``kernels/int32_guard.py: fits_int32``).
    """
    epilogue = epilogue or Epilogue()
    tile_n, stages = tiles or wgmma_dense_tiles(n, dtype)
    tile_m, tile_k, threads = 128, 64, 256
    if n % tile_n or k % tile_k or tile_n not in (128, 256) or stages < 3:
        raise ValueError(f"wgmma_dense_kernel: n={n}, k={k} do not fit tiles ({tile_n}, 64) "
                         f"with {stages} stages (128 or 256 columns, at least 3 stages)")
    rows = tile_m + tile_n  # 128-byte shared rows a stage: x's, then w's
    stage_elems = rows * 64
    pool_elems = stages * stage_elems + 512  # + 1 KiB to realign the pool to 1024 bytes
    num_kt = k // tile_k
    ab = "f16" if dtype == "float16" else "bf16"
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{tile_n}k16.f32.{ab}.{ab}"
    acc_len = tile_n // 2  # fp32 accumulators a thread
    loads = rows * 8 // threads  # 16-byte cp.async a thread a stage
    x_loads = tile_m * 8 // threads  # of which copy x's rows (each copy: 32 rows, 8 chunks)
    offset, store = staged_store(n, dtype, epilogue, tile_m, tile_n, threads, pool_elems,
                                 "shared.dyn")
    stage_accumulators = wgmma_staging(dtype, epilogue, tile_n, offset)

    @T.macro
    def load_stage(smem, x_flat, w_flat, offsets, fill, kt):
        """cp.async k-step ``kt`` of x's and w's tile rows into its ring slot; ``offsets`` and
        ``fill`` hold each copy's k-step-0 addresses and x's zero-fill size (computed once)."""
        for it in T.unroll(loads):
            dst = smem.ptr_to([offsets[it, 0] + (kt % stages) * stage_elems])
            if it < x_loads:
                T.ptx.cp.async_.cg.shared.global_(
                    dst, x_flat.ptr_to([offsets[it, 1] + kt * tile_k]), 16, fill[it]
                )
            else:
                T.ptx.cp.async_.cg.shared.global_(
                    dst, w_flat.ptr_to([offsets[it, 1] + kt * tile_k]), 16
                )

    @T.macro
    def body(x, w, bias_buf, residual, outs, m):
        bn = T.launch_thread("blockIdx.x", n // tile_n)
        bm = T.launch_thread("blockIdx.y", (m + tile_m - 1) // tile_m)
        tx = T.launch_thread("threadIdx.x", threads)
        smem = T.alloc_buffer((pool_elems,), dtype, scope="shared.dyn")
        acc = T.alloc_buffer((acc_len,), "float32", scope="local")
        base = T.alloc_buffer((2,), "uint32", scope="local")
        m0 = bm * tile_m
        n0 = bn * tile_n
        wg = tx // 128
        realign_pool(base, smem)
        pad = T.Cast("int32", base[1])
        x_flat = T.decl_buffer((m * k,), dtype, data=x.data)
        w_flat = T.decl_buffer((n * k,), dtype, data=w.data)
        # Copy it of a thread: row r = 32 it + tx // 8 of the stage (x's rows, then w's), chunk
        # c = tx % 8. offsets[it]: (shared element, global element at k-step 0).
        offsets = T.alloc_buffer((loads, 2), "int32", scope="local")
        fill = T.alloc_buffer((x_loads,), "uint32", scope="local")
        for it in T.unroll(loads):
            r = it * (threads // 8) + tx // 8
            c = tx % 8
            offsets[it, 0] = pad + r * 64 + ((c ^ (r % 8)) * 8)
            if it < x_loads:
                offsets[it, 1] = T.min(m0 + r, m - 1) * k + c * 8
                fill[it] = T.if_then_else(m0 + r < m, T.uint32(16), T.uint32(0))
            else:
                offsets[it, 1] = (n0 + r - tile_m) * k + c * 8
        for i in T.unroll(acc_len):
            acc[i] = T.float32(0)
        for s in T.unroll(stages - 2):
            if s < num_kt:
                load_stage(smem, x_flat, w_flat, offsets, fill, s)
            T.ptx.cp.async_.commit_group()
        for kt in T.serial(num_kt):
            T.ptx.cp.async_.wait_group(stages - 3)
            T.ptx.fence.proxy.async_.shared__cta()  # our copies, visible to the tensor cores
            # k-step kt landed everywhere; every warpgroup finished the wgmma group of kt - 2,
            # whose slot the next copy reuses.
            T.cuda.cta_sync()
            if kt + stages - 2 < num_kt:
                load_stage(smem, x_flat, w_flat, offsets, fill, kt + stages - 2)
            T.ptx.cp.async_.commit_group()
            stage = base[0] + T.Cast("uint32", (pad + (kt % stages) * stage_elems) * 2)
            T.ptx.wgmma.fence.sync.aligned()
            for kk in T.unroll(tile_k // 16):
                T.ptx[wgmma](
                    *[acc[i] for i in range(acc_len)],
                    swizzle128_descriptor(stage + T.uint32(wg * 64 * 128 + kk * 32)),
                    swizzle128_descriptor(stage + T.uint32(tile_m * 128 + kk * 32)),
                    T.bool(True), 1, 1, 0, 0,
                )
            T.ptx.wgmma.commit_group.sync.aligned()
            T.ptx.wgmma.wait_group.sync.aligned(1)
        T.ptx.wgmma.wait_group.sync.aligned(0)
        # Epilogue through shared memory (staged_store)
        T.tvm_storage_sync("shared")  # every warpgroup is done reading the ring
        stage_accumulators(smem, acc, bias_buf, n0, wg * 64, tx % 128, 0)
        T.tvm_storage_sync("shared")
        store(smem, residual, outs, m, bm, bn, tx, 0)

    small = with_small_batches(n, k, dtype, epilogue, body, tile_n, threads)
    return dense_func(n, k, dtype, small, epilogue)
