"""CPU schedules for the ops TVM legalizes itself (elementwise chains, norms, gathers).

apache-tvm 0.27's CPU pipeline schedules nothing: every legalized op runs as one thread of plain
loops. Our pipeline runs, after ``FuseTIR`` on ``llvm`` targets, dlight's CPU ``Reduction`` rule
(layer norm, RMS norm, softmax: parallel rows, vectorized injective parts) and
:class:`CPUInjective` below. On all-MiniLM-L6-v2 (2-core Zen 5) they took the model from 7845 to
9359 tokens/s in one side-by-side run (figures per op in docs/models.md).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline

from .targets import cpu_vector_lanes

CHUNK = 4096  # elements a parallel task takes when the loop nest is flattened


def injective_block(func: tirx.PrimFunc):
    """``(schedule, block info)`` when every block of ``func`` is injective and they inline into
    one (the shape both our injective rules, CPU and GPU, schedule); else None."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None or not all(info.is_injective() for info in infos):
        return None
    infos = try_inline(sch, infos)
    return (sch, infos[0]) if len(infos) == 1 else None


class CPUInjective(ScheduleRule):
    """Functions of injective blocks only (elementwise chains, broadcasts, gathers): inline into
    the last block, run its outer loops in parallel and vectorize the innermost when its static
    extent is a multiple of the target's float32 vector (``targets.cpu_vector_lanes``: 16 with
    AVX-512, 8 with AVX2, 4 with NEON or baseline x86-64), in steps of two vectors where they
    divide it; a nest without one is flattened and split into parallel chunks."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        found = injective_block(func)
        if found is None:
            return None
        sch, info = found
        loops = sch.get_loops(info.block_rv)
        if not loops:
            return None
        extent = sch.get(loops[-1]).extent
        lanes = cpu_vector_lanes(target)
        if len(loops) >= 2 and isinstance(extent, tirx.IntImm) and extent.value % lanes == 0:
            sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
            step = 2 * lanes if extent.value % (2 * lanes) == 0 else lanes
            sch.vectorize(sch.split(loops[-1], [None, step])[1])
        else:
            flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            sch.parallel(sch.split(flat, [None, CHUNK])[0])
        return sch


def cpu_default_schedule() -> tvm.transform.Pass:
    """dlight's ``ApplyDefaultSchedule`` with the CPU rules above; functions marked
    ``tirx.is_scheduled`` (our kernels) are left alone."""
    return dlight.ApplyDefaultSchedule(dlight.cpu.Reduction(), CPUInjective())
