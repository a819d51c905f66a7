"""How many CPU threads the package runs (``targets.usable_cores``): the affinity mask and the
cgroup's CPU quota, read from cgroup files laid out as Linux lays them out."""

from __future__ import annotations

import os

import pytest

from relax_masked_attn import targets


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("cpu_max,expected", [
    ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)])
def test_cgroup_v2_quota_of_the_process_own_cgroup(tmp_path, cpu_max, expected):
    """cgroup v2: the ``cpu.max`` of the cgroup named on the process's ``0::`` line, rounded up
    to whole CPUs (``docker --cpus 1.5``: 150000 of every 100000 us: 2 threads); "max": none.
    The root's own file (no quota) does not hide it."""
    write(tmp_path / "cgroup" / "cpu.max", "max 100000\n")
    write(tmp_path / "cgroup" / "kubepods" / "pod7" / "cpu.max", cpu_max)
    write(tmp_path / "self", "0::/kubepods/pod7\n")
    limit = targets.cgroup_cpu_limit(str(tmp_path / "cgroup"), str(tmp_path / "self"))
    assert limit == expected


def test_cgroup_v2_quota_of_an_ancestor(tmp_path):
    """A quota on a parent cgroup (a Kubernetes pod's, over its container's) binds too: the
    smallest on the way up counts."""
    write(tmp_path / "cgroup" / "kubepods" / "cpu.max", "800000 100000\n")
    write(tmp_path / "cgroup" / "kubepods" / "pod7" / "cpu.max", "200000 100000\n")
    write(tmp_path / "cgroup" / "kubepods" / "pod7" / "app" / "cpu.max", "max 100000\n")
    write(tmp_path / "self", "0::/kubepods/pod7/app\n")
    assert targets.cgroup_cpu_limit(str(tmp_path / "cgroup"), str(tmp_path / "self")) == 2


def test_cgroup_v2_quota_at_the_root_of_a_container(tmp_path):
    """Inside a container the process's cgroup is the namespace's root (``0::/``)."""
    write(tmp_path / "cgroup" / "cpu.max", "300000 100000\n")
    write(tmp_path / "self", "0::/\n")
    assert targets.cgroup_cpu_limit(str(tmp_path / "cgroup"), str(tmp_path / "self")) == 3


@pytest.mark.parametrize("quota,expected", [("400000", 4), ("-1", None)])
def test_cgroup_v1_cfs_quota(tmp_path, quota, expected):
    """cgroup v1: ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; -1 means no quota."""
    write(tmp_path / "cgroup" / "cpu" / "cpu.cfs_quota_us", quota + "\n")
    write(tmp_path / "cgroup" / "cpu" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "self", "4:cpu,cpuacct:/\n")
    assert targets.cgroup_cpu_limit(str(tmp_path / "cgroup"),
                                    str(tmp_path / "self")) == expected


def test_no_cgroup_files_no_limit(tmp_path):
    assert targets.cgroup_cpu_limit(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_usable_cores_take_the_smaller_of_affinity_and_quota(monkeypatch):
    affinity = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count())
    monkeypatch.setattr(targets, "cgroup_cpu_limit", lambda: None)
    assert targets.usable_cores() == affinity
    monkeypatch.setattr(targets, "cgroup_cpu_limit", lambda: 1)
    assert targets.usable_cores() == 1
    monkeypatch.setattr(targets, "cgroup_cpu_limit", lambda: affinity + 8)
    assert targets.usable_cores() == affinity
