"""A persistent Hopper dense kernel whose two consumer warpgroups take turns (ping-pong).

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
    tile_m, tile_k = 128, TILE_COLUMNS
    if n % tile_n or k % tile_k or tile_n != 128 or stages < 2 or cluster not in (1, 2):
        raise ValueError(f"pingpong_dense_kernel: n={n}, k={k} do not fit tiles ({tile_n}, 64) "
                         f"with {stages} stages in clusters of {cluster} (128 columns, at least "
                         "2 stages, clusters of 1 or 2)")
    staging_elems = -(-(tile_m * (tile_n + 8)) // 512) * 512  # a consumer's, 1 KiB aligned
    stage_elems = (tile_m + tile_n) * tile_k  # x's rows, then w's, 128 bytes each
    pool_elems = 2 * staging_elems + stages * stage_elems + 512  # + 1 KiB to realign
    if pool_elems * 2 > 226 * 1024:
        raise ValueError(f"pingpong_dense_kernel: {stages} stages of ({tile_n}, 64) tiles need "
                         f"{pool_elems * 2} bytes of shared memory, more than 226 KiB")
    num_kt = k // tile_k
    tiles_n = n // tile_n
    half_acc = tile_n // 2  # fp32 accumulators a thread for one 64-row half
    offset, store = staged_store(n, dtype, epilogue, tile_m, tile_n, 128, pool_elems,
                                 "shared.dyn", opaque=True)
    stage_half = wgmma_staging(dtype, epilogue, tile_n, offset, opaque=True)

    init_ring = ring_barriers(stages, cluster)  # a slot's consumer in each CTA releases it
    load_step = ring_loader(tile_m, tile_n, stages, cluster)
    encode_operands = operand_maps(n, k, dtype, tile_m, tile_n // cluster)
    # A cluster's CTAs take the `cluster` row tiles of one column of tiles (a group) together;
    # a cluster of one is a block taking one tile.
    groups_of, clusters_of = persistent_grid(tile_m, tiles_n, cluster)

    def count_of(m, bid):
        """The block's tiles: one in each of its cluster's groups ``c, c + clusters, ...``."""
        return (groups_of(m) - bid // cluster + clusters_of(m) - 1) // clusters_of(m)

    def tile_of(m, bid, i):
        """The output tile (row of tiles, column of tiles) of the block's ``i``-th tile."""
        group = bid // cluster + i * clusters_of(m)
        return group // tiles_n * cluster + bid % cluster, group % tiles_n

    consume = ring_consumer(tile_m, tile_n, stages, num_kt, dtype, cluster)

    @T.macro
    def body(x, w, bias_buf, residual, outs, m):
        x_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        w_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        encode_operands(x_map, w_map, x, w, m)
        bid = T.launch_thread("blockIdx.x", clusters_of(m) * cluster)
        if cluster > 1:
            T.launch_thread("clusterCtaIdx.x", cluster)  # launched in clusters
        tx, wg, smem, full, empty = warpgroup_roles(pool_elems, dtype, stages)
        acc_lo = T.alloc_buffer((half_acc,), "float32", scope="local")
        acc_hi = T.alloc_buffer((half_acc,), "float32", scope="local")
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
            # consumer wg takes the block's tiles wg - 1, wg + 1, ...; it waits for the other
            # consumer to have issued the previous tile's products before it waits on the ring
            for j in T.serial((count_of(m, bid) - wg + 2) // 2):
                if wg - 1 + 2 * j > 0:
                    T.ptx.bar.sync(T.uint32(ORDER_BARRIERS[0] - 1) + T.Cast("uint32", wg),
                                   T.uint32(256))
                consume(acc_lo, acc_hi, full, empty, base[0],
                        T.Cast("int32", base[1]) + 2 * staging_elems,
                        (wg - 1 + 2 * j) * num_kt, tx, 0,
                        (T.uint32(ORDER_BARRIERS[1] + 1) - T.Cast("uint32", wg),
                         wg + 2 * j < count_of(m, bid)))
                stage_half(smem, acc_lo, bias_buf, tile_of(m, bid, wg - 1 + 2 * j)[1] * tile_n,
                           0, tx, T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
                stage_half(smem, acc_hi, bias_buf, tile_of(m, bid, wg - 1 + 2 * j)[1] * tile_n,
                           64, tx, T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
                T.ptx.bar.sync(T.uint32(CONSUMER_BARRIERS[0] - 1) + T.Cast("uint32", wg),
                               T.uint32(128))
                store(smem, residual, outs, m, *tile_of(m, bid, wg - 1 + 2 * j), tx,
                      T.Cast("int32", base[1]) + (wg - 1) * staging_elems)
                # the staging tile read before this consumer's next tile writes it
                T.ptx.bar.sync(T.uint32(CONSUMER_BARRIERS[0] - 1) + T.Cast("uint32", wg),
                               T.uint32(128))
        if cluster > 1:
            # no CTA leaves while the other may still write its ring or arrive on its barriers
            T.cuda.cluster_sync()

    small = with_small_batches(n, k, dtype, epilogue, body, tile_n, 128)
    return dense_func(n, k, dtype, small, epilogue)
