"""The ``cp.async`` load of attention tiles both tensor-core attention kernels use."""

from __future__ import annotations

from tvm.script import tirx as T


def row_loader(threads: int, chunks: int):
    """A ``T.macro`` ``load_rows(dest, src, bi, h, off, n, c0, end, count, tx)``: ``threads``
    threads ``cp.async`` rows ``[c0, c0 + count)`` of head ``h``'s real block (it starts at row
    ``off`` of ``src`` ``[*, seq, heads, head_dim]`` at batch index ``bi`` and has ``n`` rows),
    16 bytes (``chunks`` a row) a copy; rows from ``end`` on are zero-filled, and reads past the
    block are clamped to its last row. ``dest(r, c)`` is the shared pointer of chunk ``c`` of tile
    row ``r`` (each kernel's swizzled layout)."""

    @T.macro
    def load_rows(dest, src, bi, h, off, n, c0, end, count, tx):
        for it in T.unroll(count * chunks // threads):
            r = (it * threads + tx) // chunks
            c = (it * threads + tx) % chunks
            T.ptx.cp.async_.cg.shared.global_(
                dest(r, c),
                src.ptr_to([bi, off + T.min(c0 + r, n - 1), h, c * 8]),
                16,
                T.if_then_else(c0 + r < end, T.uint32(16), T.uint32(0)),
            )

    return load_rows
