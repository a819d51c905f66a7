"""A warp-specialized Hopper dense kernel: TMA copies, an mbarrier ring, ``wgmma`` consumers.

:func:`tma_dense_kernel` computes what :func:`~relax_masked_attn.kernels.cuda_dense.
wgmma_dense_kernel` does (same PrimFunc, same epilogues, same split-k path for small batches)
with the block split into roles, as CUTLASS's warp-specialized Hopper GEMMs and FlashAttention-3
split theirs:

* warpgroup 0 is the producer: it gives up registers (``setmaxnreg.dec``) and one of its
  threads issues, for each 64-wide k-step, two TMA copies (``cp.async.bulk.tensor``: a box of
  128 rows of ``x`` and one of ``tile_n`` rows of ``w``) into a ring slot, after waiting on that
  slot's ``empty`` barrier; the copies complete the slot's ``full`` barrier by their byte count;
* warpgroups 1 and 2 are consumers (``setmaxnreg.inc``): each waits on ``full``, runs 4
  ``wgmma.m64n{tile_n}k16`` on its 64 rows straight from the slot, keeps one ``wgmma`` group in
  flight, and releases the slot of the previous k-step on its ``empty`` barrier.

No thread copies data or computes an address per element in the main loop, and the tensor
maps land the tiles in the 128-byte-swizzled layout the ``wgmma`` descriptors read
(:mod:`.hopper`); rows of ``x`` past ``m`` arrive as zeros. The epilogue is the shared one
(:func:`~relax_masked_attn.kernels.cuda_dense.staged_store`) on the consumers' 256 threads.

Its persistent form (``persistent=True``) is the dense kernel of ``sm_90a`` builds for SwiGLU's
gated products (``DispatchDense``; the others get the kernels of :mod:`.cuda_pingpong_dense`,
whose roles never join):
:data:`PERSISTENT_BLOCKS` blocks walk the output tiles ``bid, bid + grid,
...``; the staging tile of the epilogue lies apart from the ring (so at most 3 stages of
256-column tiles fit in 226 KiB), and the producer, once this tile's k-steps are issued, loads
the next tile's first ``stages`` k-steps into the slots the consumers free, so the next main
loop starts on a full ring while this tile's epilogue runs. The ring's slot and phase follow
the block's k-step count across tiles. TVM 0.27's sync planner cannot place a barrier inside a
role's branch, so the roles split and rejoin in every tile; each warpgroup returns to the
launch budget (``setmaxnreg`` to :data:`LAUNCH_REGISTERS`) before the join, so that the code
after it is not held to the producer's 40 registers. The producer takes its registers back
only after both consumers hold theirs (named barrier :data:`CONSUMERS_HOLD`): ``setmaxnreg``
draws on one pool a block, and without that order the producer's idle warps took the registers
its own ``dec`` had just freed, the consumers' ``inc`` waited for ever and the kernel hung.

On an H200 (``bench_dense.py``, 8192 rows, fp16, one run) the persistent form reaches
0.85-1.05x cuBLAS on the seven BERT-base and Qwen3-0.6B linears (493-606 TFLOP/s), the one-shot
form 0.85-1.03x, the ``cp.async`` ``wgmma`` kernel 0.78-0.97x; whole BERT-base runs 1% faster
with the persistent form than the one-shot one (``bench_models.py --hopper-dense NAME`` builds
either). Below cuBLAS most on BERT-base's two large products (0.93x at n x k = 3072 x 768,
0.85x at 768 x 3072): the second's 192 output tiles are 1.45 waves of 132 blocks, an uneven
load that cuBLAS's Hopper kernels spread by splitting k (stream-k) and this kernel does not.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .config import wgmma_dense_tiles
from .cuda_dense import staged_store, wgmma_staging, with_small_batches
from .epilogue import Epilogue, dense_func
from .hopper import (
    PERSISTENT_BLOCKS,
    TILE_COLUMNS,
    arrive_in_cta,
    commit_stores,
    copy_row_tile,
    encode_row_tiles,
    init_barrier,
    load_row_tile,
    realign_pool,
    store_row_tile,
    swizzle128_descriptor,
    wait_barrier,
    wait_released,
    wait_stores_read,
)
from .memo import memoized

PRODUCER_REGISTERS = 40  # setmaxnreg: the producer warpgroup's registers a thread
CONSUMER_REGISTERS = 232  # and each consumer's: 128 x 40 + 256 x 232 <= 65536
# What ptxas gives each of the 384 threads at launch (__launch_bounds__(384)): the persistent
# form returns every warpgroup to it where the roles join in each tile (so that the code after
# the join is not held to the producer's budget) and splits it again in the next.
LAUNCH_REGISTERS = 168
# Named barrier of the persistent form: the consumers arrive once their `setmaxnreg.inc` has
# its registers, the producer waits there before its own `inc` (ids 0: __syncthreads, 1: the
# consumers' barrier of the one-shot form).
CONSUMERS_HOLD = 2
# Named barrier of the TMA-store form (both consumers' 256 threads): the staging tile is free
# again (the previous tile's stores have read it).
STAGING_FREE = 1


def ring_barriers(stages: int, releases: int):
    """A macro ``init_ring(full, empty, tx, wg)`` by which one thread initializes the ring's
    ``full`` barriers (one arrival: the producer's ``expect_tx``) and ``empty`` barriers
    (``releases`` arrivals: the consumer warpgroups that release a slot); the block then
    syncs."""

    @T.macro
    def init_ring(full, empty, tx, wg):
        if tx == 0 and wg == 0:
            for s in T.unroll(stages):
                init_barrier(full.ptr_to([s]), 1)
                init_barrier(empty.ptr_to([s]), releases)
        T.tvm_storage_sync("shared")

    return init_ring


def warpgroup_roles(pool_elems: int, dtype: str, stages: int):
    """The launch and ring of both warp-specialized kernels (called in a macro, inside the
    block launch, where the threads and buffers are declared): ``(tx, wg, smem, full, empty)``.
    ``threadIdx.y`` names the warpgroup (3: the producer, two consumers), ``threadIdx.x`` the
    thread within it (128, as many as the split-k kernels of the same PrimFunc launch along
    x); the shared pool of ``pool_elems`` elements and the ring's ``full`` and ``empty``
    barriers, one of each a stage."""
    return (T.launch_thread("threadIdx.x", 128), T.launch_thread("threadIdx.y", 3),
            T.alloc_buffer((pool_elems,), dtype, scope="shared.dyn"),
            T.alloc_buffer((stages,), "uint64", scope="shared"),
            T.alloc_buffer((stages,), "uint64", scope="shared"))


def ring_loader(tile_m: int, tile_n: int, stages: int, cluster: int = 1):
    """The producer's step of both warp-specialized kernels: a macro ``load_step(smem, ring,
    full, empty, x_map, w_map, g, bm, bn, kt, rank=0)`` by which one thread loads k-step ``kt``
    of output tile (``bm``, ``bn``) into the ring slot of the block's k-step count ``g`` (slots
    of ``tile_m + tile_n`` rows of 128 bytes from element ``ring`` of the pool), once the
    slot's previous k-step is released on its ``empty`` barrier; the copies complete the
    slot's ``full`` barrier by their bytes.

    ``cluster`` 2: the block is CTA ``rank`` of a cluster of two whose CTAs load the same
    rows of ``w`` (their tiles share a column); each loads its own ``x`` box and multicasts
    its half of the ``w`` box (``w_map``'s boxes are ``tile_n / 2`` rows) to the same place in
    both CTAs' slots, so each ``full`` barrier counts the peer's half too."""
    tile_k = TILE_COLUMNS
    stage_elems = (tile_m + tile_n) * tile_k
    w_rows = tile_n // cluster  # rows of w a CTA loads

    @T.macro
    def load_step(smem, ring, full, empty, x_map, w_map, g, bm, bn, kt, rank=0):
        wait_released(empty.ptr_to([g % stages]), g, stages)
        load_row_tile(smem.ptr_to([ring + g % stages * stage_elems]), x_map, bm * tile_m,
                      kt * tile_k, full.ptr_to([g % stages]),
                      stage_elems * 2)  # all copies' bytes
        copy_row_tile(
            smem.ptr_to([ring + g % stages * stage_elems + (tile_m + rank * w_rows) * tile_k]),
            w_map, bn * tile_n + rank * w_rows, kt * tile_k, full.ptr_to([g % stages]),
            0 if cluster == 1 else (1 << cluster) - 1)  # multicast to the cluster's CTAs

    return load_step


def operand_maps(n: int, k: int, dtype: str, tile_m: int, tile_n: int):
    """Host side of both warp-specialized kernels: a macro ``encode(x_map, w_map, x, w, m)``
    writing the tensor maps of ``x [m, k]`` (boxes of ``tile_m`` rows) and ``w [n, k]`` (boxes
    of ``tile_n`` rows: a CTA's share of a cluster's tile, :func:`ring_loader`) into two
    ``T.tvm_stack_alloca("tensormap", 1)`` handles."""

    @T.macro
    def encode(x_map, w_map, x, w, m):
        encode_row_tiles(x_map, x.data, dtype, m, k, tile_m)
        encode_row_tiles(w_map, w.data, dtype, n, k, tile_n)

    return encode


def ring_consumer(tile_m: int, tile_n: int, stages: int, num_kt: int, dtype: str,
                  cluster: int = 1):
    """The consumer's main loop of both warp-specialized kernels: a macro ``consume(acc_lo, acc_hi,
    full, empty, pool, ring, g0, tx, row0, hand_over=None)`` by which a warpgroup multiplies the 64
    rows of the ring's x tiles from ``row0`` into ``acc_lo`` (``m64n{tile_n}``, ``tile_n / 2``
    floats a thread) and, where ``acc_hi`` is a buffer too, the next 64 into it, over a tile's
    ``num_kt`` k-steps. ``g0``: the block's k-steps before this tile (ring slot and phase of k-step
    ``kt``: those of count ``g0 + kt``), ``pool``/``ring``: the pool's shared address and the ring's
    first element. Each k-step: wait on its slot's ``full``, 4 (or 8) ``wgmma`` from the slot, one
    group kept in flight, the previous k-step's slot released on ``empty`` by thread 0; the last
    slot is released once the tile's products are done.
    ``hand_over``: a pair ``(barrier, more)``; where ``more`` holds, the warpgroup arrives on named
    barrier ``barrier`` (256 threads) once the last k-step's ``wgmma`` are issued, before it waits
    for them (the ping-pong kernel hands the ring to its other consumer there).
    ``cluster`` 2: a slot is released in both CTAs of the cluster (:func:`ring_loader`: the
    peer's producer writes half of each slot)."""
    tile_k = TILE_COLUMNS
    stage_elems = (tile_m + tile_n) * tile_k
    ab = "f16" if dtype == "float16" else "bf16"
    wgmma = f"wgmma.mma_async.sync.aligned.m64n{tile_n}k16.f32.{ab}.{ab}"
    acc_len = tile_n // 2

    @T.macro
    def release(bar):
        """One thread: release a ring slot on its ``empty`` barrier ``bar``, in every CTA of
        the cluster."""
        if cluster == 1:
            T.ptx.mbarrier.arrive.shared.b64(bar, T.uint32(1))
        else:
            for rank in T.unroll(cluster):
                arrive_in_cta(bar, rank)

    @T.macro
    def consume(acc_lo, acc_hi, full, empty, pool, ring, g0, tx, row0, hand_over=None):
        for i in T.unroll(acc_len):
            acc_lo[i] = T.float32(0)
            if acc_hi is not None:
                acc_hi[i] = T.float32(0)
        for kt in T.serial(num_kt):
            wait_barrier(full.ptr_to([(g0 + kt) % stages]), (g0 + kt) // stages % 2)
            slot = pool + T.Cast("uint32", (ring + (g0 + kt) % stages * stage_elems) * 2)
            T.ptx.wgmma.fence.sync.aligned()
            for kk in T.unroll(tile_k // 16):
                T.ptx[wgmma](
                    *[acc_lo[i] for i in range(acc_len)],
                    swizzle128_descriptor(slot + T.uint32(row0 * 128 + kk * 32)),
                    swizzle128_descriptor(slot + T.uint32(tile_m * 128 + kk * 32)),
                    T.bool(True), 1, 1, 0, 0,
                )
                if acc_hi is not None:
                    T.ptx[wgmma](
                        *[acc_hi[i] for i in range(acc_len)],
                        swizzle128_descriptor(slot + T.uint32((row0 + 64) * 128 + kk * 32)),
                        swizzle128_descriptor(slot + T.uint32(tile_m * 128 + kk * 32)),
                        T.bool(True), 1, 1, 0, 0,
                    )
            T.ptx.wgmma.commit_group.sync.aligned()
            T.ptx.wgmma.wait_group.sync.aligned(1)  # k-step kt - 1's group is done
            if kt > 0 and tx == 0:
                release(empty.ptr_to([(g0 + kt - 1) % stages]))
        if hand_over is not None:
            if hand_over[1]:
                T.ptx.bar.arrive(hand_over[0], T.uint32(256))
        T.ptx.wgmma.wait_group.sync.aligned(0)
        if tx == 0:
            release(empty.ptr_to([(g0 + num_kt - 1) % stages]))

    return consume


def box_offset(r, c):
    """Element of (row ``r``, column ``c``) in a staging tile of 128-row, 64-column TMA boxes
    (128-byte swizzle: 16-byte chunk ``j`` of a row at ``j ^ (r % 8)``), as a loaded box lands
    and as a TMA store reads it."""
    return (c // TILE_COLUMNS) * (128 * TILE_COLUMNS) + r * TILE_COLUMNS + (
        (c % TILE_COLUMNS // 8) ^ (r % 8)) * 8 + c % 8


def output_maps(n: int, dtype: str, epilogue: Epilogue, tile_m: int):
    """Host side of the TMA-store form: a macro ``with_output_maps(outs, m, then, args)`` that
    encodes a tensor map (boxes of ``tile_m`` rows by 64 columns) of each output of ``m`` rows
    and calls ``then(*args, maps)`` with the tuple of them."""
    parts = epilogue.outputs(n)

    @T.macro
    def with_output_maps(outs, m, then, args):
        map0: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode_row_tiles(map0, outs[0].data, dtype, m, parts[0][1], tile_m)
        if len(parts) == 1:
            then(*args, (map0,))
        else:
            map1: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
            encode_row_tiles(map1, outs[1].data, dtype, m, parts[1][1], tile_m)
            if len(parts) == 2:
                then(*args, (map0, map1))
            else:
                map2: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
                encode_row_tiles(map2, outs[2].data, dtype, m, parts[2][1], tile_m)
                then(*args, (map0, map1, map2))

    return with_output_maps


def tile_stores(n: int, epilogue: Epilogue, tile_m: int, tile_n: int):
    """The TMA-store form's epilogue, second half: a macro ``store_tile(smem, maps, bm, bn,
    base)`` by which one thread stores output tile (``bm``, ``bn``) from the staging tile at
    element ``base`` (:func:`box_offset`'s layout) by TMA, a box per 64 columns, into the
    output that holds the tile (``maps``: :func:`output_maps`'), and commits them as one bulk
    group. Rows past the output's end are not written."""
    parts = epilogue.outputs(n)
    cols = epilogue.out_columns(tile_n)

    @T.macro
    def store_box(smem, tmap, first, bm, bn, b, base):
        """Box ``b`` of the tile into the output of ``tmap``, whose column 0 is the product's
        column ``first``."""
        store_row_tile(tmap, bm * tile_m, bn * cols - first + b * TILE_COLUMNS,
                       smem.ptr_to([base + b * tile_m * TILE_COLUMNS]))

    @T.macro
    def store_tile(smem, maps, bm, bn, base):
        for b in T.unroll(cols // TILE_COLUMNS):
            if len(parts) == 1:
                store_box(smem, maps[0], 0, bm, bn, b, base)
            else:
                if bn * cols < parts[1][0]:
                    store_box(smem, maps[0], 0, bm, bn, b, base)
                else:
                    if len(parts) == 2 or bn * cols < parts[-1][0]:
                        store_box(smem, maps[1], parts[1][0], bm, bn, b, base)
                    else:
                        store_box(smem, maps[-1], parts[-1][0], bm, bn, b, base)
        commit_stores()

    return store_tile


def persistent_grid(tile_m: int, tiles_n: int, cluster: int = 1):
    """``(total_of, grid_of)``, as functions of ``m``: the work items of a product of ``m`` rows
    (``tiles_n`` tiles a row of tiles), each ``cluster`` consecutive row tiles of one column of
    tiles (one output tile where ``cluster`` is 1; rows past ``m`` in the last item's tiles
    arrive as zeros and are never stored), and the clusters of a persistent kernel over them
    (blocks, where ``cluster`` is 1). Written out where used: a name bound in a macro would be
    a host variable that the kernel does not receive."""

    def total_of(m):
        return ((m + tile_m - 1) // tile_m + cluster - 1) // cluster * tiles_n

    def grid_of(m):
        return T.min(total_of(m), PERSISTENT_BLOCKS // cluster)

    return total_of, grid_of


@memoized
def tma_dense_kernel(n: int, k: int, dtype: str, epilogue: Epilogue | None = None,
                     tiles=None, persistent: bool = False,
                     tma_store: bool = False) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], w [n, k], [bias [n],] [residual [m, n],] out [m, n])`` for
    ``sm_90a``; ``tiles`` is ``(tile_n, stages)`` (default:
    :func:`~relax_masked_attn.kernels.config.wgmma_dense_tiles`; with ``persistent`` at most 3
    stages, which is what fits next to the staging tile). ``persistent``: the persistent form
    (this module's docstring). ``tma_store`` (persistent form, no residual): the consumers
    leave each tile's outputs, epilogue applied, in the staging tile laid out as TMA boxes and
    one thread stores them by TMA while the next tile's products run
    (``cuda_dense.wgmma_staging`` with :func:`box_offset`).
    Opt-in: on an H200 (8192 rows, fp16) it runs BERT-base's q/k/v product 0.058 ms against
    0.059 and its gelu product 0.095 against 0.096, within run-to-run spread, so the 256
    consumer threads' own 16-byte stores were not what held those products back."""
    epilogue = epilogue or Epilogue()
    if tma_store and (not persistent or epilogue.residual):
        raise ValueError("tma_dense_kernel: TMA stores are for the persistent form's products "
                         "without a residual")
    tile_n, stages = tiles or wgmma_dense_tiles(n, dtype)
    if persistent and tiles is None:
        stages = min(stages, 3)
    tile_m, tile_k = 128, TILE_COLUMNS
    if n % tile_n or k % tile_k or tile_n not in (128, 256) or stages < 2:
        raise ValueError(f"tma_dense_kernel: n={n}, k={k} do not fit tiles ({tile_n}, 64) "
                         f"with {stages} stages (128 or 256 columns, at least 2 stages)")
    stage_elems = (tile_m + tile_n) * tile_k  # x's rows, then w's, 128 bytes each
    # Persistent: the staging tile of the epilogue first, the ring after it (1 KiB aligned),
    # so that the producer fills the ring for the next tile during this one's epilogue.
    staging_elems = -(-(tile_m * (tile_n + 8)) // 512) * 512 if persistent else 0
    if tma_store:  # boxes of 128 rows x 64 columns, unpadded (the tile's first 1 KiB boundary)
        staging_elems = tile_m * tile_n
    # + 1 KiB to realign the pool to 1024 bytes
    pool_elems = staging_elems + stages * stage_elems + 512
    if pool_elems * 2 > 226 * 1024:  # of the 227 KiB a block, 1 KiB for its barriers
        raise ValueError(f"tma_dense_kernel: {stages} stages of ({tile_n}, 64) tiles need "
                         f"{pool_elems * 2} bytes of shared memory, more than 226 KiB")
    num_kt = k // tile_k
    acc_len = tile_n // 2  # fp32 accumulators a consumer thread
    offset, store = staged_store(n, dtype, epilogue, tile_m, tile_n, 256, pool_elems,
                                 "shared.dyn")
    stage_accumulators = wgmma_staging(dtype, epilogue, tile_n, offset)
    # the TMA-store form: SwiGLU applied, boxes of 64 columns (box_offset)
    stage_final = wgmma_staging(dtype, epilogue, tile_n, box_offset, swiglu=epilogue.gated)
    store_tile = tile_stores(n, epilogue, tile_m, tile_n)
    with_output_maps = output_maps(n, dtype, epilogue, tile_m)

    init_ring = ring_barriers(stages, 2)  # both consumers release each slot
    load_step = ring_loader(tile_m, tile_n, stages)
    encode_operands = operand_maps(n, k, dtype, tile_m, tile_n)

    consume = ring_consumer(tile_m, tile_n, stages, num_kt, dtype)

    total_of, grid_of = persistent_grid(tile_m, n // tile_n)

    @T.macro
    def persistent_tiles(x_map, w_map, bias_buf, residual, outs, m, bid, tx, wg, smem, full,
                         empty, acc, base, ring, out_maps):
        """The persistent form's walk over the block's output tiles ``bid, bid + grid, ...``."""
        ahead = min(stages, num_kt)  # k-steps of the next tile the producer loads in advance
        for it in T.serial((total_of(m) - bid + grid_of(m) - 1) // grid_of(m)):
            tile = bid + it * grid_of(m)
            bm = tile // (n // tile_n)
            bn = tile % (n // tile_n)
            if wg == 0:
                T.ptx["setmaxnreg.dec.sync.aligned.u32"](PRODUCER_REGISTERS)
                if tx == 0:
                    # this tile's k-steps not loaded in advance, then the next tile's first
                    for j in T.serial(T.if_then_else(it == 0, num_kt, num_kt - ahead)
                                      + T.if_then_else(tile + grid_of(m) < total_of(m), ahead, 0)):
                        kt = j + T.if_then_else(it == 0, 0, ahead)  # k-step from this tile's
                        g = it * num_kt + kt  # the block's k-step count: ring slot and phase
                        nxt = tile + kt // num_kt * grid_of(m)
                        load_step(smem, ring, full, empty, x_map, w_map, g,
                                  nxt // (n // tile_n), nxt % (n // tile_n), kt % num_kt)
                # Not before both consumers hold their registers: the pool has the 128 x 128
                # this takes only once they have given theirs back, where otherwise it would
                # take what the producer's `dec` freed and the consumers' `inc` waits on.
                T.ptx.bar.sync(T.uint32(CONSUMERS_HOLD), T.uint32(384))
                T.ptx["setmaxnreg.inc.sync.aligned.u32"](LAUNCH_REGISTERS)
            else:
                T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGISTERS)
                T.ptx.bar.arrive(T.uint32(CONSUMERS_HOLD), T.uint32(384))
                consume(acc, None, full, empty, base[0], ring, it * num_kt, tx, (wg - 1) * 64)
                # Each consumer writes its 64 rows of the staging tile (apart from the ring)
                # before the roles join; no accumulator lives past the join.
                if tma_store:
                    # the previous tile's TMA stores have read the staging tile (issued a main
                    # loop ago, so this is no wait): thread 0 of warpgroup 1 knows, and tells
                    # the other consumer threads
                    if wg == 1 and tx == 0:
                        wait_stores_read()
                    T.ptx.bar.sync(T.uint32(STAGING_FREE), T.uint32(256))
                    stage_final(smem, acc, bias_buf, bn * tile_n, (wg - 1) * 64, tx,
                                T.Cast("int32", base[1]))
                    T.ptx.fence.proxy.async_.shared__cta()  # seen by the TMA unit
                else:
                    stage_accumulators(smem, acc, bias_buf, bn * tile_n, (wg - 1) * 64, tx, 0)
                T.ptx["setmaxnreg.dec.sync.aligned.u32"](LAUNCH_REGISTERS)
            T.tvm_storage_sync("shared")
            if tma_store:
                if wg == 1 and tx == 0:
                    store_tile(smem, out_maps, bm, bn, T.Cast("int32", base[1]))
            else:
                if wg > 0:
                    store(smem, residual, outs, m, bm, bn, (wg - 1) * 128 + tx, 0)
                T.tvm_storage_sync("shared")  # the staging tile read before the next tile's writes
        if tma_store:
            if wg == 1 and tx == 0:
                wait_stores_read()  # the last tile's stores have read shared memory

    @T.macro
    def launch(x_map, w_map, bias_buf, residual, outs, m, out_maps):
        if persistent:
            bid = T.launch_thread("blockIdx.x", grid_of(m))
        else:
            bn = T.launch_thread("blockIdx.x", n // tile_n)
            bm = T.launch_thread("blockIdx.y", (m + tile_m - 1) // tile_m)
        tx, wg, smem, full, empty = warpgroup_roles(pool_elems, dtype, stages)
        acc = T.alloc_buffer((acc_len,), "float32", scope="local")
        base = T.alloc_buffer((2,), "uint32", scope="local")
        realign_pool(base, smem)
        # the ring's first element: the pool's first 1 KiB boundary, past the staging tile of
        # the persistent form
        ring = T.Cast("int32", base[1]) + staging_elems
        init_ring(full, empty, tx, wg)
        if persistent:
            persistent_tiles(x_map, w_map, bias_buf, residual, outs, m, bid, tx, wg, smem, full,
                             empty, acc, base, ring, out_maps)
        else:
            if wg == 0:
                T.ptx["setmaxnreg.dec.sync.aligned.u32"](PRODUCER_REGISTERS)
                if tx == 0:
                    for kt in T.serial(num_kt):
                        load_step(smem, ring, full, empty, x_map, w_map, kt, bm, bn, kt)
            else:
                T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGISTERS)
                consume(acc, None, full, empty, base[0], ring, 0, tx, (wg - 1) * 64)
                # Epilogue through shared memory (staged_store): each consumer writes its rows
                # of the staging tile (in the output dtype, bias and activation applied) once
                # both are done with the ring (named barrier 1, the consumers' 256 threads), so
                # that no accumulator lives past the join of the roles, where the producer's
                # register budget would cap every thread's.
                T.ptx.bar.sync(T.uint32(1), T.uint32(256))
                stage_accumulators(smem, acc, bias_buf, bn * tile_n, (wg - 1) * 64, tx, 0)
            T.tvm_storage_sync("shared")
            if wg > 0:
                store(smem, residual, outs, m, bm, bn, (wg - 1) * 128 + tx, 0)

    @T.macro
    def body(x, w, bias_buf, residual, outs, m):
        x_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        w_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode_operands(x_map, w_map, x, w, m)
        if tma_store:
            with_output_maps(outs, m, launch, (x_map, w_map, bias_buf, residual, outs, m))
        else:
            launch(x_map, w_map, bias_buf, residual, outs, m, None)

    small = with_small_batches(n, k, dtype, epilogue, body, tile_n, 128)
    return dense_func(n, k, dtype, small, epilogue)
