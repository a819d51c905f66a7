"""The CPU dense kernel, ``out[m, n] = epilogue(x[m, k] @ w[n, k].T)``, on a packed weight.

apache-tvm 0.27 has no CPU matmul schedule (dlight's CPU rules cover GEMV and reductions only),
so a legalized ``nn.Linear`` runs as plain loops. This kernel is shaped like the BLAS
micro-kernels of BLIS, oneDNN and MLAS: a block of ``rows x cols`` outputs lives in vector
registers; each step over ``k`` broadcasts one x value a row and loads ``cols`` weights as whole
vectors, for ``rows * cols / lanes`` fused multiply-adds and no horizontal sums. The weight is
read in panels ``wp[n / cols, k, cols]`` (:func:`pack_weight`), so each step's ``cols`` weights
are one contiguous run; :func:`pack_weight` is a Relax expression on the parameter, which
``LiftTransformParams`` moves out of ``forward`` to run once at load time.

Blocking (``kernels.config.cpu_dense_tiles``, per vector ISA): ``k`` in slices of at most
``depth`` (in one slice up to ``whole_k``: 768 on AVX2 and AVX-512); parallel tasks of
``task_rows`` rows by ``task_cols`` columns, numbered row block first so that a thread's
consecutive tasks share their x rows in L2. Within a slice a task walks its weight panels
outermost, each ``depth x cols`` panel read by its ``task_rows / rows`` register blocks in
turn, or, where ``k <= blocks_outer_k`` (AVX-512 up to 768), its register blocks outermost,
each block's packed x rows read against every panel in turn and staying in or near L1 (an
AVX-512 panel slice of 32 KiB fills the L1 by itself). The epilogue (bias, gelu, residual) runs
on the last slice's registers, before the one store.

Each task copies its x rows of the slice into a buffer of its own first (``pack_rows``, rows
``depth + ROW_PAD`` floats apart), as BLAS libraries pack their broadcast operand: in ``x``
itself a register block's rows lie ``k`` floats apart, and at ``k = 3072`` (12 KiB) all 12
rows of an AVX-512 block map to one set of an 8-way L1, so each step of k missed L1 on every
broadcast. Measured on a 2-core Skylake-SP Xeon (AVX-512), 768 x 3072 with 8192 rows,
alternating with the unpacked kernel in one process: 0.82x torch against 0.72x (2 threads),
66-70 GFLOP/s against 61-62 on one; the other MiniLM / BERT shapes within 3%. The copy is a
vector copy of each row, under 1% of a task's multiply-adds, and rows past ``m`` are copied as
row ``m - 1``, so every register block runs the one loop.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from ..targets import cpu_isa
from .config import CpuDenseTiles, cpu_dense_tiles, largest_divisor
from .epilogue import Epilogue, dense_func
from .memo import memoized

# Floats added to each packed x row (see dense_kernel): a row of 256 floats plus 16 is 1088
# bytes, so a register block's rows fall in different L1 sets.
ROW_PAD = 16


def tiles_for(target: tvm.target.Target) -> CpuDenseTiles:
    return cpu_dense_tiles(cpu_isa(target))


def supports(target: tvm.target.Target, n: int, k: int, dtype: str) -> bool:
    return dtype == "float32" and n % tiles_for(target).cols == 0 and k > 0


def pack_weight(w: relax.Expr, cols: int) -> relax.Expr:
    """``wp[p, kk, j] = w[p * cols + j, kk]``: the ``[n, k]`` weight as ``n / cols`` panels."""
    n, k = (int(v) for v in w.ty.shape.values)
    panels = relax.op.reshape(w, [n // cols, cols, k])
    return relax.op.permute_dims(panels, [0, 2, 1])


def _divisor_at_most(value: int, limit: int, floor: int) -> int:
    """The largest divisor of ``value`` not above ``limit``; ``value`` itself when that divisor
    would be under ``floor`` (a prime ``k`` runs unsliced)."""
    best = largest_divisor(value, limit)
    return best if best >= floor else value


@memoized
def dense_kernel(n: int, k: int, dtype: str, epilogue: Epilogue,
                 tiles: CpuDenseTiles) -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], wp [n / cols, k, cols], [bias,] [residual,] out [m, n])``, ``m``
    symbolic; ``wp`` as :func:`pack_weight` lays it out."""
    rows, cols = tiles.rows, tiles.cols
    depth = k if k <= tiles.whole_k else _divisor_at_most(k, tiles.depth, 32)
    slices = k // depth
    task_cols = _divisor_at_most(n, tiles.task_cols, cols) // cols * cols
    panels = task_cols // cols  # panels a task
    col_tasks = n // task_cols
    # a longer k streams more weight a task: longer tasks read each panel for more rows
    task_rows = tiles.long_task_rows if tiles.long_k and k >= tiles.long_k else tiles.task_rows
    blocks = task_rows // rows  # register blocks a task, along m
    blocks_outer = k <= tiles.blocks_outer_k

    def finish(value, bias, residual, row, col):
        return epilogue.store(dtype, value, None if bias is None else bias[col],
                              None if residual is None else residual[row, col])

    stride = depth + ROW_PAD  # floats between two rows of the packed x
    lanes = tiles.lanes

    @T.macro
    def pack_rows(xp, x, row0, s, m):
        """``xp[r, :depth] = x[min(row0 + r, m - 1), slice s]`` for the task's rows: rows past
        ``m`` repeat row ``m - 1``, so every register block runs the one full-block loop."""
        for r in T.serial(task_rows):
            for c in T.serial(depth // lanes):  # whole vectors, then the rest one by one
                for j in T.vectorized(lanes):
                    xp[r * stride + c * lanes + j] = x[T.min(row0 + r, m - 1),
                                                       s * depth + c * lanes + j]
            for kk in T.serial(depth % lanes):
                xp[r * stride + depth // lanes * lanes + kk] = x[
                    T.min(row0 + r, m - 1), s * depth + depth // lanes * lanes + kk]

    @T.macro
    def multiply_add(acc, xp, wp, b, s, col0):
        """``acc += xp rows [b * rows, (b + 1) * rows) @ panel col0 / cols`` (slice ``s``)."""
        for kk in T.serial(depth):
            for i in T.unroll(rows):
                for j in T.vectorized(cols):
                    acc[i, j] = acc[i, j] + xp[(b * rows + i) * stride + kk] * wp[
                        col0 // cols, s * depth + kk, j]

    @T.macro
    def register_block(acc, xp, x, wp, bias, residual, outs, m, task, task_row0, s, p, b):
        """Register block ``b`` of the task's rows by panel ``p`` of its columns, slice ``s``:
        the partial sums from ``out`` (zero in the first slice), the slice's products, back to
        ``out`` (with the epilogue after the last slice)."""
        row0: T.let[T.int64] = task_row0 + b * rows
        col0: T.let[T.int64] = (task % col_tasks * panels + p) * cols
        if row0 < m:
            for i in T.unroll(rows):
                for j in T.vectorized(cols):
                    acc[i, j] = T.if_then_else(
                        s == 0, T.float32(0),
                        outs[0][T.min(row0 + i, m - 1), col0 + j])
            multiply_add(acc, xp, wp, b, s, col0)
            for i in T.unroll(rows):
                if row0 + i < m:
                    if s < slices - 1:
                        for j in T.vectorized(cols):
                            outs[0][row0 + i, col0 + j] = acc[i, j]
                    else:
                        for j in T.vectorized(cols):
                            outs[0][row0 + i, col0 + j] = finish(
                                acc[i, j], bias, residual, row0 + i, col0 + j)

    @T.macro
    def body(x, wp, bias, residual, outs, m):  # outs: the one output
        for task in T.parallel(((m + task_rows - 1) // task_rows) * col_tasks):
            acc = T.alloc_buffer((rows, cols), "float32", scope="local")
            xp = T.alloc_buffer((task_rows * stride,), "float32")
            task_row0: T.let[T.int64] = task // col_tasks * task_rows
            for s in T.serial(slices):
                pack_rows(xp, x, task_row0, s, m)
                if blocks_outer:  # a block's packed x rows stay in L1 across the panels
                    for b in T.serial(blocks):
                        for p in T.serial(panels):
                            register_block(acc, xp, x, wp, bias, residual, outs, m, task,
                                           task_row0, s, p, b)
                else:  # a panel is read by the task's blocks one after another
                    for p in T.serial(panels):
                        for b in T.serial(blocks):
                            register_block(acc, xp, x, wp, bias, residual, outs, m, task,
                                           task_row0, s, p, b)

    return dense_func(n, k, dtype, body, epilogue, index_dtype="int64",
                      w_shape=(n // cols, k, cols))
