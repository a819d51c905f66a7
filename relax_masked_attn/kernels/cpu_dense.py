"""A CPU dense kernel, ``out[m, n] = sum_k x[m, k] * w[n, k]`` (``x @ w.T``, nn.Linear's layout).

apache-tvm 0.27 has no CPU matmul schedule (dlight's CPU rules cover GEMV and reductions only),
so a legalized ``nn.Linear`` runs as plain loops, about 100x slower than PyTorch. This kernel
computes blocks of ``rows x cols`` outputs as dot products vectorized over ``k``: the
``rows * cols`` accumulators stay in vector registers, each step loads ``rows + cols`` vectors
for ``rows * cols`` fused multiply-adds. Parallel over row blocks.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .config import cpu_dense_tiles
from .epilogue import dense_func


def supports(n: int, k: int, dtype: str) -> bool:
    rows, cols, lanes = cpu_dense_tiles(dtype)
    return dtype == "float32" and n % cols == 0 and k % lanes == 0


def dense_kernel(n: int, k: int, dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc ``(x [m, k], w [n, k], out [m, n])``, ``m`` symbolic."""
    rows, cols, lanes = cpu_dense_tiles(dtype)

    def lane_sum(acc, i, j):
        total = acc[i, j, 0]
        for lane in range(1, lanes):
            total = total + acc[i, j, lane]
        return total

    @T.macro
    def body(x, w, _bias, _residual, out, m):
        for mo in T.parallel((m + rows - 1) // rows):
            acc = T.alloc_buffer((rows, cols, lanes), "float32", scope="local")
            for no in T.serial(n // cols):
                for i in T.unroll(rows):
                    for j in T.unroll(cols):
                        for lane in T.vectorized(lanes):
                            acc[i, j, lane] = T.float32(0)
                for ks in T.serial(k // lanes):
                    for i in T.unroll(rows):
                        for j in T.unroll(cols):
                            for lane in T.vectorized(lanes):
                                acc[i, j, lane] = acc[i, j, lane] + (
                                    x[T.min(mo * rows + i, m - 1), ks * lanes + lane]
                                    * w[no * cols + j, ks * lanes + lane]
                                )
                for i in T.unroll(rows):
                    for j in T.unroll(cols):
                        if mo * rows + i < m:
                            out[mo * rows + i, no * cols + j] = lane_sum(acc, i, j)

    return dense_func(n, k, dtype, body, index_dtype="int64")
