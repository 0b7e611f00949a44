"""Per-run control groups for the process backend, on cgroup v2 or v1 (DESIGN §3.4).

A run's group caps its memory (swap included: no escape into swap), its processes and,
when asked, its CPUs; it tells whether the kernel's OOM killer struck, the peak memory,
the CPU time, and kills every member. On cgroup v2 the groups live under one delegated
parent at the hierarchy's root. On cgroup v1 each controller is its own hierarchy, so a
run has one directory per controller, made under the group this process is in (a v1
host often puts the runner in a nested group it may write to, never at the root).
`group_of` finds the group another manager made (a container's), to read its counters.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from sandbox.spec import Limits

log = structlog.get_logger(__name__)

PARENT_NAME = "autoresearch-sandbox"  # cgroup v2: under the hierarchy's root; one child group per run
RUN_PREFIX = "ar-"
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")


def _mountinfo() -> list[tuple[str, str, str, set[str]]]:
    """(root inside the file system, mount point, file system type, super options) of every mount."""
    mounts = []
    with open("/proc/self/mountinfo") as lines:
        for line in lines:
            before, _, after = line.partition(" - ")
            fields, (fstype, _source, options) = before.split(), after.split()[:3]
            mounts.append((fields[3], fields[4], fstype, set(options.split(","))))
    return mounts


def _read_text(path: Path | None) -> str:
    try:
        return path.read_text() if path is not None else ""
    except OSError:
        return ""


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)  # False on a read-only mount too


@dataclass(frozen=True)
class CgroupHost:
    """Where this host lets us make run groups: controller -> the directory they are made in."""

    version: int
    parents: dict[str, Path]

    @property
    def memory(self) -> bool:
        return "memory" in self.parents

    @property
    def pids(self) -> bool:
        return "pids" in self.parents

    @property
    def swap(self) -> bool:
        """Whether swap is capped with memory (the kernel accounts swap: not everywhere on cgroup v1)."""
        name = "memory.swap.max" if self.version == 2 else "memory.memsw.limit_in_bytes"
        return self.memory and (self.parents["memory"] / name).exists()

    def describe(self) -> str:
        memory = "memory" if self.swap else "memory (swap not capped)"
        return f"cgroup v{self.version} {memory}" + ("+pids" if self.pids else "")

    def create(self, run_id: str, limits: Limits) -> Cgroup:
        """The run's group, with its limits written; OSError if the kernel refuses."""
        name = RUN_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:120]
        group = Cgroup(self.version, {controller: str(parent / name) for controller, parent in self.parents.items()})
        for folder in group.folders():
            folder.mkdir(exist_ok=True)
        group.limit(limits)
        return group


def find_cgroup_host() -> CgroupHost | None:
    """cgroup v2 where it offers memory and pids, else the writable cgroup v1 hierarchies; None if neither."""
    return _v2_host() or _v1_host()


def _v2_host() -> CgroupHost | None:
    root = next((Path(point) for fs_root, point, fstype, _ in _mountinfo() if fstype == "cgroup2" and fs_root == "/"), None)
    if root is None:
        return None
    available = set((root / "cgroup.controllers").read_text().split())
    if not {"memory", "pids"} <= available:
        return None
    wanted = {"memory", "pids"} | ({"cpu"} & available)
    parent = root / PARENT_NAME
    try:
        _enable_controllers(root, wanted)
        parent.mkdir(exist_ok=True)
        _enable_controllers(parent, wanted)
    except OSError as error:
        log.info("cgroups.no_v2", reason=str(error))
        return None
    return CgroupHost(2, dict.fromkeys(sorted(wanted), parent))


def _enable_controllers(group: Path, wanted: set[str]) -> None:
    missing = wanted - set((group / "cgroup.subtree_control").read_text().split())
    if missing:
        (group / "cgroup.subtree_control").write_text(" ".join(f"+{name}" for name in sorted(missing)))


def _v1_host() -> CgroupHost | None:
    """This process's own group in every mounted, writable v1 hierarchy of the controllers we use."""
    own = _groups_of("self")
    parents: dict[str, Path] = {}
    for fs_root, point, fstype, options in _mountinfo():
        for controller in set(V1_CONTROLLERS) & options if fstype == "cgroup" else ():
            folder = _folder(fs_root, point, own.get(controller))
            if folder is not None and _writable(folder):
                parents.setdefault(controller, folder)
    return CgroupHost(1, parents) if "memory" in parents else None


def _groups_of(pid: int | str) -> dict[str, str]:
    """Controller -> the group process `pid` is in (cgroup v2's one group under ""); empty if it is gone."""
    groups: dict[str, str] = {}
    for line in _read_text(Path(f"/proc/{pid}/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        groups.update(dict.fromkeys(controllers.split(","), path))
    return groups


def _folder(fs_root: str, point: str, path: str | None) -> Path | None:
    """The directory of group `path` under a mount (at `point`) of the hierarchy from `fs_root`; None if it is
    outside what the mount shows."""
    if path is None or not (path + "/").startswith(fs_root.rstrip("/") + "/"):
        return None
    return Path(point, os.path.relpath(path, fs_root))


def group_of(pid: int) -> Cgroup | None:
    """The group process `pid` is in, for its counters: its cgroup v1 memory and cpuacct directories, else its
    cgroup v2 one; None where this host's mounts do not show it (a process of another machine or namespace)."""
    groups, found = _groups_of(pid), {}
    for fs_root, point, fstype, options in _mountinfo():
        keys = {"memory", "cpuacct"} & options if fstype == "cgroup" else {""} if fstype == "cgroup2" else set()
        for key in keys:  # "": the v2 group
            folder = _folder(fs_root, point, groups.get(key))
            if folder is not None and folder.is_dir():
                found.setdefault(key, str(folder))
    if "memory" in found and "cpuacct" in found:
        return Cgroup(1, {"memory": found["memory"], "cpuacct": found["cpuacct"]})
    return Cgroup(2, {"memory": found[""]}) if "" in found else None


class Cgroup:
    """One run's group: a directory per controller (all the same one on cgroup v2)."""

    def __init__(self, version: int, dirs: dict[str, str]) -> None:
        self.version = version
        self.dirs = dirs

    def record(self) -> dict:
        """What reap() needs to find the group again after a restart (JSON)."""
        return {"version": self.version, "dirs": self.dirs}

    @classmethod
    def from_record(cls, record: dict | str) -> Cgroup:
        if isinstance(record, str):  # left by a runner from before cgroup v1: the path of a v2 group
            return cls(2, {"memory": record})
        return cls(record["version"], record["dirs"])

    def folders(self) -> list[Path]:
        return [Path(folder) for folder in sorted(set(self.dirs.values()))]

    def _file(self, controller: str, name: str) -> Path | None:
        """A controller's file; on cgroup v2 every file is in the one directory (cpu.stat always is)."""
        folder = next(iter(self.dirs.values())) if self.version == 2 else self.dirs.get(controller)
        return Path(folder, name) if folder is not None else None

    def _write(self, controller: str, name: str, value: object) -> None:
        path = self._file(controller, name)
        if path is not None and path.exists():  # swap and cpu files exist only where configured
            path.write_text(str(value))

    def _read(self, controller: str, name: str) -> str:
        return _read_text(self._file(controller, name))

    def limit(self, limits: Limits) -> None:
        if self.version == 2:
            self._write("memory", "memory.max", limits.memory_bytes)
            self._write("memory", "memory.swap.max", 0)
            self._write("memory", "memory.oom.group", 1)  # an OOM ends the whole run, not one random process
            if limits.cpus:
                self._write("cpu", "cpu.max", f"{int(limits.cpus * 100_000)} 100000")
        else:
            self._write("memory", "memory.limit_in_bytes", limits.memory_bytes)
            self._write("memory", "memory.memsw.limit_in_bytes", limits.memory_bytes)  # memory + swap: no swap
            if limits.cpus:
                self._write("cpu", "cpu.cfs_period_us", 100_000)
                self._write("cpu", "cpu.cfs_quota_us", int(limits.cpus * 100_000))
        self._write("pids", "pids.max", limits.pids)

    def join_files(self) -> list[str]:
        """The `cgroup.procs` files a process writes "0" into to enter the group (one per hierarchy)."""
        return [str(folder / "cgroup.procs") for folder in self.folders()]

    def pids(self) -> set[int]:
        return {int(pid) for folder in self.folders() for pid in _read_text(folder / "cgroup.procs").split()}

    def oom_killed(self) -> bool | None:
        """Whether the kernel's OOM killer killed a member; None where the kernel does not count it."""
        counters = self._read("memory", "memory.events" if self.version == 2 else "memory.oom_control")
        match = re.search(r"^oom_kill (\d+)", counters, re.M)
        return int(match[1]) > 0 if match else None

    def cpu_seconds(self) -> float | None:
        if self.version == 2:
            match = re.search(r"^usage_usec (\d+)", self._read("cpu", "cpu.stat"), re.M)
            return int(match[1]) / 1e6 if match else None
        usage = self._read("cpuacct", "cpuacct.usage").strip()
        return int(usage) / 1e9 if usage.isdigit() else None

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"  # v2: kernel >= 5.19
        peak = self._read("memory", name).strip()
        return int(peak) if peak.isdigit() else None

    def memory_bytes(self) -> int | None:
        """The memory in use now (a sampler's peak where the kernel keeps none)."""
        usage = self._read("memory", "memory.current" if self.version == 2 else "memory.usage_in_bytes").strip()
        return int(usage) if usage.isdigit() else None

    def kill(self) -> None:
        kill_file = self._file("memory", "cgroup.kill")
        if self.version == 2 and kill_file is not None and kill_file.exists():  # kernel >= 5.14: atomic
            kill_file.write_text("1")
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self) -> None:
        for folder in self.folders():
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as error:  # still populated: reap() will get it
                log.warning("cgroups.left", cgroup=str(folder), error=str(error))
