"""Targets: reading a CUDA target's arch, and the target factories ``EmbeddingModel``, the CLI
and the benchmarks use (this CPU's ``llvm``, this GPU's ``cuda`` with Hopper's ``sm_90a``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from tvm.target import Target


def cuda_arch(target: Target) -> str:
    """The target's ``arch`` attribute (``"sm_90a"``), ``""`` when it names none."""
    return str(target.attrs["arch"]) if "arch" in target.attrs else ""


def compute_capability(target: Target) -> int:
    """``80`` for a CUDA target with ``arch`` ``sm_80`` (``90`` for ``sm_90a``); 0 when the target
    names no ``sm_`` arch (then the tensor-core kernels stay out)."""
    arch = cuda_arch(target)
    if not arch.startswith("sm_"):
        return 0
    return int("".join(ch for ch in arch[3:] if ch.isdigit()))


def host_cpu_target() -> Target:
    """``llvm`` tuned for this machine's CPU (plain ``"llvm"`` targets a generic x86-64)."""
    from tvm.target import codegen

    return Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one (``taskset``,
    a container's cpuset), else ``os.cpu_count()``, and no more than its cgroup's CPU quota
    (``docker --cpus``, a Kubernetes CPU limit; :func:`cgroup_cpu_limit`) rounded up. A pool
    sized by ``os.cpu_count()`` in a container limited to 2 CPUs of a 16-core host runs 16
    threads in the time of 2, each stopped by the quota in turn."""
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit)) if limit else cores


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup"
                     ) -> int | None:
    """CPUs this process's cgroup may use a period, rounded up (a quota of 1.5 CPUs: 2); None
    where no quota is set or none can be read (no cgroups: macOS, Windows). cgroup v2: the
    smallest ``cpu.max`` ("quota period", or "max period") of the process's cgroup (its line
    ``0::path`` in ``membership``) and its ancestors up to ``root``; v1: ``cpu.cfs_quota_us``
    over ``cpu.cfs_period_us`` in ``root/cpu`` (a quota of -1: none)."""
    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def cpus(quota: str, period: str) -> int | None:
        try:
            q, p = int(quota), int(period)
        except ValueError:  # "max"
            return None
        return math.ceil(q / p) if q > 0 and p > 0 else None

    base = Path(root)
    own = ""
    for line in (read(Path(membership)) or "").splitlines():
        if line.startswith("0::"):
            own = line[3:].strip("/")
    parts = [part for part in own.split("/") if part]
    found, limits = False, []
    for depth in range(len(parts), -1, -1):  # the process's cgroup, then each ancestor
        fields = (read(base.joinpath(*parts[:depth], "cpu.max")) or "").split()
        if len(fields) >= 2:
            found = True
            limits.append(cpus(*fields[:2]))
    if found:
        return min((limit for limit in limits if limit), default=None)
    quota = read(base / "cpu" / "cpu.cfs_quota_us")
    period = read(base / "cpu" / "cpu.cfs_period_us")
    return cpus(quota, period) if quota and period else None


def default_cpu_threads() -> None:
    """Sets ``TVM_NUM_THREADS`` to :func:`usable_cores` unless the user set it: TVM's CPU thread
    pool otherwise takes half the logical cores (it assumes SMT). Read when the pool starts, so it
    holds unless TVM ran a parallel op before."""
    os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))


# float32 lanes of one vector register of each ISA :func:`cpu_isa` names
VECTOR_LANES = {"avx512": 16, "avx2": 8, "neon": 4, "sse": 4}


def cpu_isa(target: Target) -> str:
    """The float32 vector ISA an ``llvm`` target compiles for: ``"avx512"`` (``avx512f``),
    ``"avx2"`` (``avx2`` and ``fma``), ``"neon"`` (aarch64), else ``"sse"`` (baseline x86-64:
    what a plain ``llvm`` target with no ``mcpu`` gets). Read from the target's CPU features, never
    from the machine that compiles."""
    from tvm.target.codegen import llvm_cpu_has_features

    if llvm_cpu_has_features("avx512f", target):
        return "avx512"
    if llvm_cpu_has_features(["avx2", "fma"], target):
        return "avx2"
    if llvm_cpu_has_features("neon", target):
        return "neon"
    return "sse"


def cpu_vector_lanes(target: Target) -> int:
    """float32 lanes of one vector register of :func:`cpu_isa`: 16, 8, or 4 (NEON, SSE)."""
    return VECTOR_LANES[cpu_isa(target)]


def device_cuda_target(device_id: int = 0) -> Target:
    """The CUDA target of a visible GPU, as ``Target.from_device``, except that compute
    capability 9.0 (H100, H200) gets arch ``sm_90a``: the Hopper-only instructions (``wgmma``)
    that our dense and attention kernels use need the ``a`` arch, which ``from_device`` does not
    name."""
    import tvm

    target = Target.from_device(tvm.cuda(device_id))
    if cuda_arch(target) != "sm_90":
        return target
    return Target({**dict(target.export()), "arch": "sm_90a"})
