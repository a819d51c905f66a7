"""Persistent Hopper dense kernels whose roles never join: ping-pong and cooperative.

The persistent form of :func:`~relax_masked_attn.kernels.cuda_tma_dense.tma_dense_kernel` splits
each 128-row tile between its two consumer warpgroups and joins all three warpgroups at every
tile: the epilogue (bias, gelu, residual, the 16-byte stores) runs while the tensor cores wait.
Here, as in CUTLASS's ping-pong Hopper GEMMs, each consumer owns whole tiles: warpgroup 1 takes
the block's tiles 0, 2, 4, ..., warpgroup 2 tiles 1, 3, 5, ..., and each runs its tile's main
loop and then its epilogue, so that one warpgroup's epilogue runs under the other's products.
The roles never join:

* warpgroup 0, the producer, gives up registers and one of its threads loads the k-steps of
  the block's tiles, in tile order, into a ring of ``stages`` slots (TMA boxes of 128 rows of
  ``x`` and 128 rows of ``w``, completing the slot's ``full`` barrier by their bytes); it
  waits on a slot's ``empty`` barrier, which the one consumer of its last k-step releases;
* a consumer runs two ``wgmma.m64n128k16`` a 16-wide k-step (the two 64-row halves of its
  128 x 128 tile, 2 x 64 accumulators a thread), one group of a k-step in flight, then writes
  the tile, bias and activation applied, into its own staging tile of shared memory and
  stores it in 16-byte vectors (:func:`~relax_masked_attn.kernels.cuda_dense.staged_store`, the
  residual added on the way).

The consumers take turns at the ring: each waits on a named barrier of both consumers' 256
threads (:data:`ORDER_BARRIERS`) before its tile's first wait on the ring, and arrives on the
other's once its tile's products are issued. A wait on an mbarrier names only the parity of
the phase it waits for, so without the turns the second consumer, waiting on k-steps two phases
of a slot ahead of the producer, finds them "complete" at once and reads slots not yet loaded
(every GPU test then ends in a launch failure). TVM 0.27's barrier planner cannot
place a barrier inside one role's branch, so the staging tiles are written and read by
``st.shared`` / ``ld.shared`` on their addresses, which it does not see, and each consumer
orders its own accesses with a named barrier of its 128 threads (ids 3 and 4).

Tiles are 128 x 128 (128 accumulators a consumer thread, as the cooperative kernel's 128 x 256
tile gives each of its consumers; the small-batch kernels of the same PrimFunc take columns in
multiples of 128). Shared memory: two staging tiles of 128 x 136 elements and a ring of 4 slots
of 256 rows of 128 bytes, 197 KiB in all.

A gated (SwiGLU) product gets the persistent kernel of ``cuda_tma_dense``: its weight is
interleaved in groups of half that kernel's 256-column tile (``cuda_dense.gate_group``), which a
128-column tile would split.

ptxas: 168 registers, no spills, no serialized ``wgmma``. On an H200 (fp16, 8192 rows) it runs
products that add a residual 1-15% faster than the persistent kernel (BERT-base's 768 x 768 +
residual 0.022 against 0.026 ms, 768 x 3072 + residual 0.071 against 0.083) and the gelu product
5% slower, so ``dispatch_dense.HOPPER_DENSE`` gives it the residual products.

**Clusters of two** (``cluster=2``, opt-in: ``HOPPER_DENSE_KERNELS["pingpong-cluster"]``), as
CUTLASS pairs its ping-pong kernels with 2-CTA clusters: the blocks launch in clusters of two
CTAs (``clusterCtaIdx.x``, which TVM 0.27's runtime launches with
``cudaLaunchAttributeClusterDimension``) that take the two row tiles of one column of tiles
together, so both read the same ``w`` box every k-step. Each CTA's producer loads its own
``x`` box and multicasts its half of the ``w`` box (64 of its 128 rows) into the same slot of
both CTAs (``cp.async.bulk.tensor ... multicast::cluster``), whose ``full`` barriers count the
peer's half too; a consumer releases a slot in both CTAs (``mapa`` and a remote
``mbarrier.arrive``), since the peer's producer writes half of it; the barriers are
initialized before a cluster barrier, and a last cluster barrier keeps either CTA from leaving
while the other may still write its ring. Each CTA then brings 24 KiB a k-step from L2 instead
of 32. Every GPU test passes with it (fp16 and bf16, every epilogue, 1 to 20000 rows, an odd
number of row tiles), but on an H200 it runs 2-9% *slower* than the plain ping-pong form on
every product of ``bench_dense.py`` and 2-14% on its fused ones (docs/performance.md#dense):
the L2 traffic it saves is not what holds the ping-pong form back, and the two CTAs' rings
now move in lockstep, each slot waiting for the slower of two consumers (the likely cost; not
profiled).

**The cooperative kernel** (:func:`cooperative_dense_kernel`; what ``sm_90a`` products get that
neither add a residual nor gate) has the same producer and never joins either, but both
consumers work on every tile, as in the persistent form of ``cuda_tma_dense``: a 128 x 256 tile
(128 x 128 where n is not a multiple of 256), 64 rows a consumer, one ``wgmma.m64n256k16`` a
16-wide k-step. Each consumer then writes its rows to a staging tile of its own, 128 columns at
a time (``wgmma_staging``'s ``window``), and stores them, ordered by its own named barrier;
meanwhile the producer already fills the ring with the next tile's k-steps, and a consumer that
is done starts the next tile's products while the other still stores. A consumer's staging
tile is 64 rows of 128 unpadded columns, its 16-byte chunks swizzled (``staged_store``'s
``swizzled``: 16 KiB, where a padded 128 x 264 tile took 66 KiB), so the ring has 4 slots of
256-column k-steps (6 of 128 columns) where the persistent form fits 3. On an H200 (8192 and
10368 rows, the eight BERT-base and Qwen3-0.6B products, timed in turns in one process) it runs
0-3% faster than the persistent form on all but one (768 x 3072 at 10368 rows, 1% slower), and
BERT-base's fused q/k/v and gelu products 0.058 and 0.088 ms against 0.060 and 0.089; the
ring's depth gives most of that: its own 3-slot form ran within 0.5% of the persistent form,
and 2 slots 13% slower. So the roles' join in every tile was not what kept the persistent form
below cuBLAS. Nsight Compute's warp samples of it (3072 x 768): the consumers wait mostly for
their own ``wgmma`` groups (``wgmma.wait_group``, the tensor pipe busy), then on the ring's
``full`` barriers (about 40% as often), the epilogue's stores a small share.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .cuda_dense import staged_store, wgmma_staging, with_small_batches
from .cuda_tma_dense import (
    CONSUMER_REGISTERS,
    PRODUCER_REGISTERS,
    operand_maps,
    persistent_grid,
    ring_barriers,
    ring_consumer,
    ring_loader,
    tma_dense_kernel,
    warpgroup_roles,
)
from .epilogue import Epilogue, dense_func
from .hopper import (
    PERSISTENT_BLOCKS,
    TILE_COLUMNS,
    realign_pool,
    sync_cluster_barriers,
)
from .memo import memoized

CONSUMER_BARRIERS = (3, 4)  # named barrier of consumer 1 and of consumer 2 (128 threads each)
# Named barriers on which consumer 1 and consumer 2 wait for their turn at the ring (256
# threads: the waiting consumer's and the other's, which arrives once its tile's products are
# issued).
ORDER_BARRIERS = (5, 6)
DEFAULT_TILES = (128, 4)  # (tile_n, stages)


def block_walk(tile_m: int, tiles_n: int, cluster: int = 1):
    """``(blocks_of, count_of, tile_of)`` of both kernels' persistent schedule, as functions of
    ``m`` (and the block ``bid``): the blocks launched, how many output tiles block ``bid``
    takes, and the tile (row of tiles, column of tiles) of its ``i``-th. A cluster's CTAs take
    the ``cluster`` row tiles of one column of tiles (a group) together, each cluster the groups
    ``c, c + clusters, ...``; a cluster of one is a block taking one tile."""
    groups_of, clusters_of = persistent_grid(tile_m, tiles_n, cluster)

    def blocks_of(m):
        return clusters_of(m) * cluster

    def count_of(m, bid):
        return (groups_of(m) - bid // cluster + clusters_of(m) - 1) // clusters_of(m)

    def tile_of(m, bid, i):
        group = bid // cluster + i * clusters_of(m)
        return group // tiles_n * cluster + bid % cluster, group % tiles_n

    return blocks_of, count_of, tile_of


def pool_size(tile_n: int, stages: int, staging_elems: int) -> int:
    """Elements of both kernels' shared pool: two staging tiles of ``staging_elems``, a ring of
    ``stages`` slots of 128 rows of ``x`` and ``tile_n`` of ``w`` (128 bytes each), and 1 KiB
    to realign it."""
    return 2 * staging_elems + stages * (128 + tile_n) * TILE_COLUMNS + 512


def never_joining(name: str, n: int, k: int, dtype: str, tile_n: int, stages: int,
                  staging_elems: int, releases: int, consumers, cluster: int = 1):
    """The body (``T.macro`` ``(x, w, bias, residual, outs, m)``, as ``epilogue.dense_func``
    takes it) of both kernels around their consumers: tensor maps, the launch of
    :func:`block_walk`'s blocks (in clusters of ``cluster``), the pool (two staging tiles of
    ``staging_elems`` elements, then a ring of ``stages`` slots of 128 rows of ``x`` and
    ``tile_n`` of ``w``), the ring's barriers (``releases`` arrivals free a slot) and the
    producer, whose one thread loads the k-steps of the block's tiles in order. The consumer
    warpgroups run the macro ``consumers(smem, full, empty, base, ring, m, bid, tx, wg, bias,
    residual, outs)`` (``base``: :func:`realign_pool`'s, ``ring``: the ring's first element)."""
    tile_m = 128
    pool_elems = pool_size(tile_n, stages, staging_elems)
    if pool_elems * 2 > 226 * 1024:
        raise ValueError(f"{name}: {stages} stages of ({tile_n}, 64) tiles need "
                         f"{pool_elems * 2} bytes of shared memory, more than 226 KiB")
    num_kt = k // TILE_COLUMNS
    init_ring = ring_barriers(stages, releases)
    load_step = ring_loader(tile_m, tile_n, stages, cluster)
    encode_operands = operand_maps(n, k, dtype, tile_m, tile_n // cluster)
    blocks_of, count_of, tile_of = block_walk(tile_m, n // tile_n, cluster)

    @T.macro
    def body(x, w, bias_buf, residual, outs, m):
        x_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        w_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode_operands(x_map, w_map, x, w, m)
        bid = T.launch_thread("blockIdx.x", blocks_of(m))
        if cluster > 1:
            T.launch_thread("clusterCtaIdx.x", cluster)  # launched in clusters
        tx, wg, smem, full, empty = warpgroup_roles(pool_elems, dtype, stages)
        base = T.alloc_buffer((2,), "uint32", scope="local")
        realign_pool(base, smem)
        init_ring(full, empty, tx, wg)
        if cluster > 1:
            sync_cluster_barriers(tx == 0 and wg == 0)
        if wg == 0:
            T.ptx["setmaxnreg.dec.sync.aligned.u32"](PRODUCER_REGISTERS)
            if tx == 0:
                for i in T.serial(count_of(m, bid)):
                    for kt in T.serial(num_kt):
                        load_step(smem, T.Cast("int32", base[1]) + 2 * staging_elems, full,
                                  empty, x_map, w_map, i * num_kt + kt, *tile_of(m, bid, i), kt,
                                  bid % cluster)
        else:
            T.ptx["setmaxnreg.inc.sync.aligned.u32"](CONSUMER_REGISTERS)
            consumers(smem, full, empty, base, T.Cast("int32", base[1]) + 2 * staging_elems, m,
                      bid, tx, wg, bias_buf, residual, outs)
        if cluster > 1:
            # no CTA leaves while the other may still write its ring or arrive on its barriers
            T.cuda.cluster_sync()

    return body


@T.macro
def consumer_barrier(wg):
    """Named barrier of consumer warpgroup ``wg``'s 128 threads (:data:`CONSUMER_BARRIERS`)."""
    T.ptx.bar.sync(T.uint32(CONSUMER_BARRIERS[0] - 1) + T.Cast("uint32", wg), T.uint32(128))


@memoized
def pingpong_dense_kernel(n: int, k: int, dtype: str, epilogue: Epilogue | None = None,
                          tiles=None, cluster: int = 1) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], w [n, k], [bias [n],] [residual [m, n],] out [m, n])`` for
    ``sm_90a``, as :func:`~relax_masked_attn.kernels.cuda_tma_dense.tma_dense_kernel`'s;
    ``tiles`` is ``(tile_n, stages)``, default :data:`DEFAULT_TILES`. ``cluster`` 2: blocks
    run in clusters of two whose tiles share their columns (rows ``2 i`` and ``2 i + 1`` of
    tiles), each CTA multicasting half of every ``w`` box to both (see the module
    docstring)."""
    epilogue = epilogue or Epilogue()
    if epilogue.gated:
        return tma_dense_kernel(n, k, dtype, epilogue, persistent=True)
    tile_n, stages = tiles or DEFAULT_TILES
    tile_m = 128
    if n % tile_n or k % TILE_COLUMNS or tile_n != 128 or stages < 2 or cluster not in (1, 2):
        raise ValueError(f"pingpong_dense_kernel: n={n}, k={k} do not fit tiles ({tile_n}, 64) "
                         f"with {stages} stages in clusters of {cluster} (128 columns, at least "
                         "2 stages, clusters of 1 or 2)")
    staging_elems = -(-(tile_m * (tile_n + 8)) // 512) * 512  # a consumer's, 1 KiB aligned
    num_kt = k // TILE_COLUMNS
    half_acc = tile_n // 2  # fp32 accumulators a thread for one 64-row half
    offset, store = staged_store(n, dtype, epilogue, tile_m, tile_n, 128,
                                 pool_size(tile_n, stages, staging_elems), "shared.dyn",
                                 opaque=True)
    stage_half = wgmma_staging(dtype, epilogue, tile_n, offset, opaque=True)
    _, count_of, tile_of = block_walk(tile_m, n // tile_n, cluster)
    consume = ring_consumer(tile_m, tile_n, stages, num_kt, dtype, cluster)

    @T.macro
    def consumers(smem, full, empty, base, ring, m, bid, tx, wg, bias_buf, residual, outs):
        acc_lo = T.alloc_buffer((half_acc,), "float32", scope="local")
        acc_hi = T.alloc_buffer((half_acc,), "float32", scope="local")
        # consumer wg takes the block's tiles wg - 1, wg + 1, ...; it waits for the other
        # consumer to have issued the previous tile's products before it waits on the ring
        for j in T.serial((count_of(m, bid) - wg + 2) // 2):
            if wg - 1 + 2 * j > 0:
                T.ptx.bar.sync(T.uint32(ORDER_BARRIERS[0] - 1) + T.Cast("uint32", wg),
                               T.uint32(256))
            consume(acc_lo, acc_hi, full, empty, base[0], ring, (wg - 1 + 2 * j) * num_kt, tx, 0,
                    (T.uint32(ORDER_BARRIERS[1] + 1) - T.Cast("uint32", wg),
                     wg + 2 * j < count_of(m, bid)))
            stage_half(smem, acc_lo, bias_buf, tile_of(m, bid, wg - 1 + 2 * j)[1] * tile_n,
                       0, tx, T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
            stage_half(smem, acc_hi, bias_buf, tile_of(m, bid, wg - 1 + 2 * j)[1] * tile_n,
                       64, tx, T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
            consumer_barrier(wg)
            store(smem, residual, outs, m, *tile_of(m, bid, wg - 1 + 2 * j), tx,
                  T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
            consumer_barrier(wg)  # the staging tile read before this consumer's next tile

    body = never_joining("pingpong_dense_kernel", n, k, dtype, tile_n, stages, staging_elems,
                         cluster, consumers, cluster)
    return dense_func(n, k, dtype, with_small_batches(n, k, dtype, epilogue, body, tile_n, 128),
                      epilogue)


COOPERATIVE_WINDOW = 128  # columns of the cooperative kernel's staging tiles
# The cooperative kernel's 256-column tiles do a product's work at this rate over its 128-column
# ones when both fill their waves (H200, 8192 rows: 2.5-3.5% faster on the four products whose
# waves are whole either way), in hundredths: ``wide_tiles_win``'s weight.
WIDE_TILE_RATE = 103


def wide_tiles_win(n: int, m):
    """Whether the cooperative kernel's 256-column tiles finish ``m`` rows sooner than its
    128-column ones (``m`` a TIR expression, evaluated on the host at each call): the waves of
    :data:`PERSISTENT_BLOCKS` tiles each takes, a wide wave costing twice a narrow one less
    :data:`WIDE_TILE_RATE`'s gain. 8192 rows of BERT-base's n = 768 make 192 wide tiles (2 waves
    of 132 SMs, the second half empty) or 384 narrow ones (3 waves): narrow; 10368 rows make 243
    and 486 (2 and 4 waves): wide, and 3072 columns the other way round (8 and 15 waves) -- as
    timed on an H200 at each, as on all sixteen products of ``bench_dense.py``'s shapes at those
    two row counts."""
    row_tiles = (m + 127) // 128

    def waves(tiles_n):
        return (row_tiles * tiles_n + PERSISTENT_BLOCKS - 1) // PERSISTENT_BLOCKS

    return waves(n // 128) * WIDE_TILE_RATE >= waves(n // 256) * 200


def cooperative_body(n: int, k: int, dtype: str, epilogue: Epilogue, tile_n: int, stages: int):
    """The cooperative kernel's body on ``tile_n``-column tiles in ``stages`` slots (the module
    docstring)."""
    window = COOPERATIVE_WINDOW
    if n % tile_n or k % TILE_COLUMNS or tile_n not in (128, 256) or stages < 2:
        raise ValueError(f"cooperative_dense_kernel: n={n}, k={k} do not fit tiles "
                         f"({tile_n}, 64) with {stages} stages (128 or 256 columns, at least 2 "
                         "stages)")
    staging_elems = 64 * window  # a consumer's, unpadded (swizzled)
    num_kt = k // TILE_COLUMNS
    offset, store = staged_store(n, dtype, epilogue, 64, window, 128,
                                 pool_size(tile_n, stages, staging_elems), "shared.dyn",
                                 opaque=True, swizzled=True)
    stage_window = wgmma_staging(dtype, epilogue, tile_n, offset, opaque=True, window=window)
    _, count_of, tile_of = block_walk(128, n // tile_n)
    consume = ring_consumer(128, tile_n, stages, num_kt, dtype)

    @T.macro
    def consumers(smem, full, empty, base, ring, m, bid, tx, wg, bias_buf, residual, outs):
        acc = T.alloc_buffer((tile_n // 2,), "float32", scope="local")
        for i in T.serial(count_of(m, bid)):
            consume(acc, None, full, empty, base[0], ring, i * num_kt, tx, (wg - 1) * 64)
            # its rows, 128 columns at a time: rows of 64 are tiles 2 bm and 2 bm + 1
            for part in T.unroll(tile_n // window):
                stage_window(smem, acc, bias_buf, tile_of(m, bid, i)[1] * tile_n, 0, tx,
                             T.Cast("int32", base[1]) + (wg - 1) * staging_elems, part * window)
                consumer_barrier(wg)
                store(smem, residual, outs, m, tile_of(m, bid, i)[0] * 2 + wg - 1,
                      tile_of(m, bid, i)[1] * (tile_n // window) + part, tx,
                      T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
                consumer_barrier(wg)  # the staging tile read before it is written again

    return never_joining("cooperative_dense_kernel", n, k, dtype, tile_n, stages, staging_elems,
                         2, consumers)


@memoized
def cooperative_dense_kernel(n: int, k: int, dtype: str, epilogue: Epilogue | None = None,
                             tiles=None) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], w [n, k], [bias [n],] [residual [m, n],] out [m, n])`` for
    ``sm_90a``, as :func:`pingpong_dense_kernel`'s, both consumers on every tile (the module
    docstring). ``tiles`` is ``(tile_n, stages)``, 128 or 256 columns; by default 128-column
    tiles in 6 stages, and where ``n`` is a multiple of 256 also 256-column ones in 4, the host
    choosing between them at each call by the row count (:func:`wide_tiles_win`). A gated
    product gets the persistent kernel of ``cuda_tma_dense``."""
    epilogue = epilogue or Epilogue()
    if epilogue.gated:
        return tma_dense_kernel(n, k, dtype, epilogue, persistent=True)
    if tiles is not None or n % 256:
        tile_n, stages = tiles or (128, 6)
        body = cooperative_body(n, k, dtype, epilogue, tile_n, stages)
    else:
        tile_n = 256
        wide = cooperative_body(n, k, dtype, epilogue, 256, 4)
        narrow = cooperative_body(n, k, dtype, epilogue, 128, 6)

        @T.macro
        def body(x, w, bias_buf, residual, outs, m):
            if wide_tiles_win(n, m):
                wide(x, w, bias_buf, residual, outs, m)
            else:
                narrow(x, w, bias_buf, residual, outs, m)

    return dense_func(n, k, dtype, with_small_batches(n, k, dtype, epilogue, body, tile_n, 128),
                      epilogue)
