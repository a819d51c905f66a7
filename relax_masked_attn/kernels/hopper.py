"""What both Hopper ``wgmma`` kernels (attention and dense) share: the matrix descriptor of a
128-byte-swizzled shared tile, and realigning the shared pool to the 1 KiB those tiles need."""

from __future__ import annotations

from tvm.script import tirx as T


def swizzle128_descriptor(addr, leading_bytes: int = 16):
    """The ``wgmma`` matrix descriptor of a 128-byte-swizzled tile at shared byte address
    ``addr``: start address >> 4, leading byte offset (unused by K-major tiles, where it is 16),
    1024 bytes between 8-row groups, swizzle mode 128B."""
    return (
        T.Cast("uint64", (addr & T.uint32(0x3FFFF)) >> T.uint32(4))
        | (T.uint64(leading_bytes >> 4) << T.uint64(16))
        | (T.uint64(1024 >> 4) << T.uint64(32))
        | (T.uint64(1) << T.uint64(62))
    )


@T.macro
def realign_pool(base, smem):
    """``base[0]``: the shared address of the pool ``smem``; ``base[1]``: how many 2-byte
    elements to skip so the tiles start 1 KiB-aligned (the pool is allocated 1 KiB larger)."""
    base[0] = T.cuda.cvta_generic_to_shared(smem.ptr_to([0]))
    base[1] = ((T.uint32(1024) - (base[0] & T.uint32(1023))) & T.uint32(1023)) // T.uint32(2)
