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
``depth`` (a ``depth x cols`` panel stays in L1 while ``task_rows / rows`` register blocks
reuse it); parallel tasks of ``task_rows`` rows by ``task_cols`` columns, numbered row block
first so that a thread's consecutive tasks share their x rows in L2. The epilogue (bias, gelu,
residual) runs on the last slice's registers, before the one store.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from ..targets import cpu_isa
from .config import CpuDenseTiles, cpu_dense_tiles, largest_divisor
from .epilogue import Epilogue, dense_func
from .memo import memoized


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

    def finish(value, bias, residual, row, col):
        return epilogue.store(dtype, value, None if bias is None else bias[col],
                              None if residual is None else residual[row, col])

    @T.macro
    def multiply_add(acc, x, wp, row_of, s, col0):
        """``acc += x[row_of(i), slice s] @ panel col0 / cols`` for the ``rows`` register rows.
        ``row_of`` is affine in ``i`` wherever it can be: a clamped row index (``min``) makes
        LLVM keep one pointer a row, and AVX-512's 12 rows then outnumber the free general
        registers (pointers reloaded from the stack at every step of k)."""
        for kk in T.serial(depth):
            for i in T.unroll(rows):
                for j in T.vectorized(cols):
                    acc[i, j] = acc[i, j] + x[row_of(i), s * depth + kk] * wp[
                        col0 // cols, s * depth + kk, j]

    @T.macro
    def body(x, wp, bias, residual, outs, m):  # outs: the one output
        for task in T.parallel(((m + task_rows - 1) // task_rows) * col_tasks):
            acc = T.alloc_buffer((rows, cols), "float32", scope="local")
            for s in T.serial(slices):
                for p in T.serial(panels):
                    for b in T.serial(blocks):
                        row0: T.let[T.int64] = task // col_tasks * task_rows + b * rows
                        col0: T.let[T.int64] = (task % col_tasks * panels + p) * cols
                        if row0 < m:
                            for i in T.unroll(rows):
                                for j in T.vectorized(cols):
                                    acc[i, j] = T.if_then_else(
                                        s == 0, T.float32(0),
                                        outs[0][T.min(row0 + i, m - 1), col0 + j])
                            if row0 + rows <= m:
                                # rows at constant distances from row0: one base pointer
                                multiply_add(acc, x, wp, lambda i: row0 + i, s, col0)
                            else:  # the last rows: repeat row m - 1 past the end
                                multiply_add(acc, x, wp, lambda i: T.min(row0 + i, m - 1), s,
                                             col0)
                            for i in T.unroll(rows):
                                if row0 + i < m:
                                    if s < slices - 1:
                                        for j in T.vectorized(cols):
                                            outs[0][row0 + i, col0 + j] = acc[i, j]
                                    else:
                                        for j in T.vectorized(cols):
                                            outs[0][row0 + i, col0 + j] = finish(
                                                acc[i, j], bias, residual, row0 + i, col0 + j)

    return dense_func(n, k, dtype, body, epilogue, index_dtype="int64",
                      w_shape=(n // cols, k, cols))
