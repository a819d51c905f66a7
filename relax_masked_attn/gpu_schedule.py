"""A CUDA schedule for the elementwise chains and gathers TVM legalizes itself: 16-byte vectors.

dlight's GPU ``Fallback`` rule (what apache-tvm 0.27 gives them) runs one element a thread, with
the index arithmetic in int64 (divisions by the symbolic row length included) recomputed for
every element: on an H100 the packing gathers of a BERT-base batch move about 0.8 TB/s that way
(from the profiled time of each call). The rule here takes the same functions when their innermost
loop can be cut into 16-byte vectors (8 fp16 / bf16, 4 fp32 / int32 lanes) and runs one vector
a thread, so every load and store is a 16-byte access and the index arithmetic is paid once
per vector.

A vector access is only emitted where it is aligned: every buffer the block touches along its
innermost loop must be indexed by ``lanes * q + (that loop)`` with a unit step in a last
dimension whose static extent is a multiple of ``lanes`` (a gather's data-dependent row index sits
in an outer dimension; a slice starting off a vector boundary makes the rule step aside).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.base import ScheduleRule

from .cpu_schedule import injective_block

THREADS = 256  # threads a block
VECTOR_BYTES = 16


def _uses(expr, var: tirx.Var) -> bool:
    found = []

    def visit(v):
        if v.same_as(var):
            found.append(v)

    tvm_ffi.structural_walk(expr, [(tvm.ir.Var, visit)])
    return bool(found)


def _aligned_access(buffer: tirx.Buffer, indices, var: tirx.Var, lanes: int,
                    analyzer: tvm.sym.Analyzer) -> bool:
    """Whether ``buffer[indices]``, ``var`` starting at multiples of ``lanes``, is independent
    of ``var`` (a broadcast) or an aligned, contiguous vector along ``var``."""
    if not any(_uses(i, var) for i in indices):
        return True
    if any(_uses(i, var) for i in indices[:-1]):
        return False
    last_extent = buffer.shape[-1]
    if not isinstance(last_extent, tirx.IntImm) or last_extent.value % lanes:
        return False
    if not (isinstance(buffer.elem_offset, tirx.IntImm) and buffer.elem_offset.value % lanes == 0):
        return False
    linear = tvm.sym.detect_linear_equation(indices[-1], [var])
    if len(linear) != 2 or not (isinstance(linear[0], tirx.IntImm) and linear[0].value == 1):
        return False
    start = analyzer.modular_set(linear[1])
    return start.coeff % lanes == 0 and start.base % lanes == 0


def _vectorizable(block: tirx.SBlock, var: tirx.Var, lanes: int) -> bool:
    analyzer = tvm.sym.Analyzer()
    accesses = []

    def load(node):
        accesses.append((node.source, node.indices))

    def store(node):
        accesses.append((node.buffer, node.indices))

    tvm_ffi.structural_walk(block.body, [(tvm.ir.TensorLoad, load), (tirx.BufferStore, store)])
    if not all(hasattr(buf, "shape") and hasattr(buf, "elem_offset") for buf, _ in accesses):
        return False
    return bool(accesses) and all(
        _aligned_access(buf, idx, var, lanes, analyzer) for buf, idx in accesses
    )


class GPUInjective(ScheduleRule):
    """Functions of injective blocks only (elementwise chains, broadcasts, gathers): inline into
    the last block, cut its innermost loop into 16-byte vectors, one vector a thread. CUDA
    targets only; other GPUs keep dlight's rules."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None  # 8-lane half vectors: CUDA only (Vulkan's SPIR-V stops at 4 lanes)
        found = injective_block(func)
        if found is None or not found[1].iters:
            return None
        sch, info = found
        block = sch.get(info.block_rv)
        if not isinstance(block.body, tirx.BufferStore):
            return None
        bits = tvm.DataType(block.body.buffer.dtype).bits
        lanes = VECTOR_BYTES * 8 // bits if bits in (8, 16, 32) else 0
        inner = info.iters[-1]
        extent = inner.dom.value if isinstance(inner.dom, tirx.IntImm) else inner.dom
        if not lanes or not isinstance(extent, int) or extent % lanes:
            return None
        if not _vectorizable(block, inner.var, lanes):
            return None
        loops = [it.loop_rv for it in info.iters]
        outer, vec = sch.split(loops[-1], [None, lanes])
        flat = sch.fuse(*loops[:-1], outer) if len(loops) > 1 else outer
        bx, tx = sch.split(flat, [None, THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        return sch


def gpu_default_schedule() -> tvm.transform.Pass:
    """:class:`GPUInjective` as a dlight pass, run before TVM's default GPU rules; functions
    marked ``tirx.is_scheduled`` (our kernels) are left alone."""
    return dlight.ApplyDefaultSchedule(GPUInjective())
