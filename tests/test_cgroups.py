"""Per-run cgroups: the files each cgroup version is driven and read through (on directories shaped like the kernel's)."""

from __future__ import annotations

from pathlib import Path

from sandbox.cgroups import Cgroup, CgroupHost
from sandbox.spec import Limits

LIMITS = Limits(memory_bytes=2**30, pids=64, cpus=1.5)
V2_FILES = ("cgroup.procs", "memory.max", "memory.swap.max", "memory.oom.group", "pids.max", "cpu.max")
V1_FILES = {"memory": ("cgroup.procs", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
            "pids": ("cgroup.procs", "pids.max"), "cpu": ("cgroup.procs", "cpu.cfs_period_us", "cpu.cfs_quota_us"),
            "cpuacct": ("cgroup.procs",)}


def _kernel_like(folder: Path, names) -> Path:
    """A group directory as the kernel would make it: its control files exist."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("")
    return folder


def test_a_v2_group_caps_memory_without_swap_and_reads_the_kernels_counters(tmp_path):
    parent = tmp_path / "autoresearch-sandbox"
    _kernel_like(parent / "ar-run", V2_FILES)
    host = CgroupHost(2, dict.fromkeys(("memory", "pids", "cpu"), parent))
    group = host.create("run", LIMITS)
    files = {name: (parent / "ar-run" / name).read_text() for name in V2_FILES}
    assert files == {"cgroup.procs": "", "memory.max": str(2**30), "memory.swap.max": "0", "memory.oom.group": "1",
                     "pids.max": "64", "cpu.max": "150000 100000"}
    assert group.join_files() == [str(parent / "ar-run" / "cgroup.procs")]
    (parent / "ar-run" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (parent / "ar-run" / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (parent / "ar-run" / "memory.peak").write_text("123456\n")
    assert (group.oom_killed(), group.cpu_seconds(), group.peak_bytes()) == (True, 2.5, 123456)
    assert Cgroup.from_record(group.record()).dirs == group.dirs


def test_a_v1_group_has_a_directory_per_hierarchy_and_caps_memory_plus_swap(tmp_path):
    parents = {controller: tmp_path / controller / "runner-group" for controller in V1_FILES}
    for controller, names in V1_FILES.items():
        _kernel_like(parents[controller] / "ar-run", names)
    group = CgroupHost(1, parents).create("run", LIMITS)
    assert (parents["memory"] / "ar-run" / "memory.limit_in_bytes").read_text() == str(2**30)
    assert (parents["memory"] / "ar-run" / "memory.memsw.limit_in_bytes").read_text() == str(2**30)
    assert (parents["pids"] / "ar-run" / "pids.max").read_text() == "64"
    assert (parents["cpu"] / "ar-run" / "cpu.cfs_quota_us").read_text() == "150000"
    assert sorted(group.join_files()) == sorted(str(parents[c] / "ar-run" / "cgroup.procs") for c in V1_FILES)
    (parents["memory"] / "ar-run" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (parents["cpuacct"] / "ar-run" / "cpuacct.usage").write_text("1500000000\n")
    (parents["memory"] / "ar-run" / "memory.max_usage_in_bytes").write_text("4096\n")
    (parents["pids"] / "ar-run" / "cgroup.procs").write_text("11\n12\n")
    assert (group.oom_killed(), group.cpu_seconds(), group.peak_bytes(), group.pids()) == (False, 1.5, 4096, {11, 12})


def test_an_oom_the_kernel_does_not_count_is_unknown(tmp_path):
    folder = _kernel_like(tmp_path / "ar-run", ("memory.oom_control",))
    (folder / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # kernels before 4.13
    assert Cgroup(1, {"memory": str(folder)}).oom_killed() is None


def test_the_isolation_string_says_when_swap_is_not_capped(tmp_path):
    with_swap = _kernel_like(tmp_path / "a", ("memory.memsw.limit_in_bytes",))
    without_swap = _kernel_like(tmp_path / "b", ())
    assert CgroupHost(1, {"memory": with_swap, "pids": with_swap}).describe() == "cgroup v1 memory+pids"
    assert CgroupHost(1, {"memory": without_swap}).describe() == "cgroup v1 memory (swap not capped)"
