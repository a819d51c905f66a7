"""What both Hopper ``wgmma`` kernels (attention and dense) share: the matrix descriptor of a
128-byte-swizzled shared tile, and realigning the shared pool to the 1 KiB those tiles need."""

from __future__ import annotations

from tvm.script import tirx as T

# Blocks of a persistent kernel (dense or attention): one an SM of an H100 SXM / H200 (132 SMs).
# On a GPU with fewer SMs the extra blocks wait for a free one: slower, not wrong.
PERSISTENT_BLOCKS = 132


def swizzle128_descriptor(addr, leading_bytes: int = 16):
    """The ``wgmma`` matrix descriptor of a 128-byte-swizzled tile at shared byte address
    ``addr``: start address >> 4, leading byte offset (unused by K-major tiles, where it is 16),
    1024 bytes between 8-row groups, swizzle mode 128B.

    The constant fields are one literal: written as shifts, TVM's common-subexpression pass
    lifts them out of a kernel's body where two kernels of one PrimFunc share them, and the
    kernels then take them as ``uint64`` parameters, which apache-tvm 0.27's CUDA launcher
    refuses ("Cannot handle uint64 as device function argument")."""
    fields = (leading_bytes >> 4) << 16 | (1024 >> 4) << 32 | 1 << 62
    return T.Cast("uint64", (addr & T.uint32(0x3FFFF)) >> T.uint32(4)) | T.uint64(fields)


@T.macro
def realign_pool(base, smem):
    """``base[0]``: the shared address of the pool ``smem``; ``base[1]``: how many 2-byte
    elements to skip so the tiles start 1 KiB-aligned (the pool is allocated 1 KiB larger)."""
    base[0] = T.cuda.cvta_generic_to_shared(smem.ptr_to([0]))
    base[1] = ((T.uint32(1024) - (base[0] & T.uint32(1023))) & T.uint32(1023)) // T.uint32(2)


# --- TMA: tiles copied by the tensor memory accelerator (cp.async.bulk.tensor) ----------------

SWIZZLE_128B = 3  # CUtensorMapSwizzle's CU_TENSOR_MAP_SWIZZLE_128B
TILE_COLUMNS = 64  # elements of a 128-byte row of a 2-byte dtype: the swizzle's span


@T.macro
def encode_row_tiles(tmap, data, dtype: str, rows, cols: int, box_rows: int):
    """Host side: write into ``tmap`` (a ``T.tvm_stack_alloca("tensormap", 1)``) the tensor map
    of a row-major ``[rows, cols]`` tensor of a 2-byte ``dtype`` at ``data``, read in boxes of
    ``box_rows`` rows by :data:`TILE_COLUMNS` columns that land in shared memory in the layout
    :func:`swizzle128_descriptor` describes (128-byte rows, 16-byte chunk ``c`` of row ``r`` at
    ``c ^ (r % 8)``); rows past ``rows`` arrive as zeros. apache-tvm 0.27 encodes it through
    the CUDA runtime's ``cuTensorMapEncodeTiled`` and passes it to the kernel as a
    ``const __grid_constant__ CUtensorMap`` parameter."""
    T.tensormap_encode_tiled(tmap, data, cols, rows, cols * 2, TILE_COLUMNS, box_rows, 1, 1,
                             descriptor_dtype=dtype, rank=2, swizzle=SWIZZLE_128B)


@T.macro
def encode_head_tiles(tmap, data, dtype: str, rows, heads: int, head_dim: int, box_rows: int):
    """Host side: the tensor map of ``[rows, heads, head_dim]`` (a ``[batch, seq, heads,
    head_dim]`` tensor with ``rows = batch * seq``) of a 2-byte ``dtype`` at ``data``, read in
    boxes of ``box_rows`` rows of one head by :data:`TILE_COLUMNS` columns, which land as
    :func:`encode_row_tiles`' do (128-byte rows, 128-byte swizzle); rows past ``rows`` arrive
    as zeros."""
    T.tensormap_encode_tiled(tmap, data, head_dim, heads, rows, head_dim * 2,
                             heads * head_dim * 2, TILE_COLUMNS, 1, box_rows, 1, 1, 1,
                             descriptor_dtype=dtype, rank=3, swizzle=SWIZZLE_128B)


@T.macro
def copy_head_tile(dst, tmap, row, head, col, bar):
    """One thread: start the TMA copy of the box at (``row``, ``head``, ``col``) of ``tmap``
    (:func:`encode_head_tiles`) to shared pointer ``dst`` (1 KiB aligned); its bytes count
    towards the current phase of barrier ``bar``."""
    T.ptx["cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"](
        dst, T.address_of(tmap), col, head, row, bar)


@T.macro
def init_barrier(bar, arrivals: int):
    """One thread: ``mbarrier.init`` of the shared 8-byte barrier at ``bar`` (a pointer) for
    ``arrivals`` arrivals a phase; the block must sync before any other thread uses it."""
    T.ptx.mbarrier.init.shared.b64(bar, T.uint32(arrivals))
    T.ptx.fence.proxy.async_.shared__cta()  # the initialized barrier, visible to the TMA unit


@T.macro
def wait_barrier(bar, parity):
    """Wait until the phase of barrier ``bar`` with parity ``parity`` has completed: one
    ``mbarrier.try_wait`` a poll, the loop around it in the kernel's code.

    TVM's ``T.cuda.mbarrier_wait`` does the same with the loop and its branch labels inside one
    asm block, which ptxas handles slowly: for the TMA dense kernel (gelu epilogue, 3072 x 768)
    it took ptxas 1.73 s against 0.54 s for the same kernel with this loop (nvcc 13, sm_90a; the
    same 168 registers), and NVRTC's time is most of a cold start."""
    done = T.alloc_buffer((1,), "uint32", scope="local")
    done[0] = T.uint32(0)
    while done[0] == T.uint32(0):
        T.ptx.mbarrier.try_wait.parity.shared.b64(done[0], bar, T.Cast("uint32", parity),
                                                   T.uint32(10_000_000))  # time hint, ns


@T.macro
def wait_released(empty, g, stages: int):
    """The producer of a ring of ``stages`` slots, before it refills a slot with the ring's
    ``g``-th fill: wait until the slot's previous fill (``g - stages``) has been released on
    ``empty``, the slot's barrier (no wait for the first ``stages`` fills). A fill ``j`` rounds
    in completes phase ``j - 1`` of that barrier, whose parity is what the wait names."""
    if g >= stages:
        wait_barrier(empty, (g // stages + 1) % 2)


@T.macro
def copy_row_tile(dst, tmap, row, col, bar, cta_mask: int = 0):
    """One thread: start the TMA copy of the box at (``row``, ``col``) of ``tmap``
    (:func:`encode_row_tiles`) to shared pointer ``dst`` (1 KiB aligned); its bytes count
    towards the current phase of barrier ``bar``. ``cta_mask`` (bit ``i``: CTA rank ``i`` of
    the cluster): the box lands at ``dst``'s offset in each CTA it names, counted by the
    barrier at ``bar``'s offset in each (multicast)."""
    if cta_mask == 0:
        T.ptx["cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"](
            dst, T.address_of(tmap), col, row, bar)
    else:
        T.ptx["cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
              ".multicast::cluster"](dst, T.address_of(tmap), col, row, bar, T.uint16(cta_mask))


@T.macro
def arrive_in_cta(bar, rank):
    """One arrival on the barrier at ``bar``'s offset in the shared memory of CTA ``rank`` of
    the cluster (``mapa``; the block's own rank too)."""
    remote = T.alloc_buffer((1,), "uint32", scope="local")
    T.ptx.mapa.shared__cluster.u32(remote[0], T.cuda.cvta_generic_to_shared(bar),
                                   T.uint32(rank))
    T.ptx.mbarrier.arrive.shared__cluster.b64(remote[0])


@T.macro
def sync_cluster_barriers(leader):
    """After the block's ``mbarrier.init`` (by the thread where ``leader`` holds) and a block
    sync: make the barriers visible to the cluster's other CTAs and wait for theirs
    (every thread of the block)."""
    if leader:
        T.ptx.fence.mbarrier_init.release.cluster()
    T.cuda.cluster_sync()


@T.macro
def load_row_tile(dst, tmap, row, col, bar, nbytes: int):
    """One thread: arrive on barrier ``bar`` expecting ``nbytes`` more bytes this phase (this
    copy's and any others the caller starts on it) and start :func:`copy_row_tile`; the
    barrier's phase completes when the bytes have landed (:func:`wait_barrier`)."""
    T.ptx.mbarrier.arrive.expect_tx.shared.b64(bar, T.uint32(nbytes))
    copy_row_tile(dst, tmap, row, col, bar)


@T.macro
def store_row_tile(tmap, row, col, src):
    """One thread: start the TMA store of the box at (``row``, ``col``) of ``tmap``
    (:func:`encode_row_tiles`; rows past the tensor's end are not written) from shared pointer
    ``src`` (1 KiB aligned, laid out as a loaded box lands), in the thread's current bulk group
    (:func:`commit_stores`, :func:`wait_stores_read`). The threads that wrote ``src`` must have
    made their writes visible to the TMA unit (``fence.proxy.async``) and synced first."""
    T.ptx["cp.async.bulk.tensor.2d.global.shared::cta.bulk_group"](
        T.address_of(tmap), col, row, src)


@T.macro
def commit_stores():
    """One thread: close its bulk group of :func:`store_row_tile` stores."""
    T.ptx["cp.async.bulk.commit_group"]()


@T.macro
def wait_stores_read():
    """One thread: wait until every bulk group it committed has read its shared memory (which
    may then be written again); the stores to global memory may still be in flight."""
    T.ptx["cp.async.bulk.wait_group.read"](0)
