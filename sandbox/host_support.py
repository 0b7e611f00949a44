"""What isolation this host allows the process sandbox, found out by trying: namespaces (`unshare`) and cgroups."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from sandbox.cgroups import CgroupHost, find_cgroup_host


@dataclass(frozen=True)
class HostSupport:
    """The isolation this host allows: namespaces (empty: none), and where run cgroups can be made."""

    namespaces: tuple[str, ...]
    cgroups: CgroupHost | None
    reason: str = ""  # why there are no namespaces

    @property
    def isolated(self) -> bool:
        return bool(self.namespaces)

    @property
    def memory_limit(self) -> bool:
        return self.cgroups is not None and self.cgroups.memory

    @property
    def pids_limit(self) -> bool:
        return (self.cgroups is not None and self.cgroups.pids) or self.isolated  # else RLIMIT_NPROC on the run's uid

    def describe(self) -> str:
        if not self.isolated:
            return f"process (no isolation: {self.reason})"
        if not self.memory_limit:
            return f"process({'+'.join(self.namespaces)} namespaces, no memory limit can be enforced)"
        pids = "" if self.cgroups.pids else ", rlimit pids"
        return f"process({'+'.join(self.namespaces)} namespaces, sealed root, unprivileged uid, {self.cgroups.describe()}{pids})"

    def refusal(self) -> str:
        """Why an isolated run may not start here ("" if it may): a memory limit that nothing would enforce."""
        if self.isolated and not self.memory_limit:
            return ("the process sandbox cannot enforce a memory limit on this host: it needs a writable cgroup v2 "
                    "hierarchy with the memory controller, or a writable cgroup v1 memory hierarchy.")
        return ""


def unshare_flags(namespaces: tuple[str, ...]) -> list[str]:
    flags = ["--net", "--mount", "--propagation", "private"]
    if "pid" in namespaces:
        flags += ["--pid", "--fork", "--kill-child"]  # the launcher is the namespace's init
    return flags


def probe_host() -> HostSupport:
    """Find out, by trying, which namespaces and which cgroups this host gives us."""
    if os.geteuid() != 0:
        return HostSupport((), None, "not root")
    cgroup = find_cgroup_host()
    unshare = shutil.which("unshare")
    if unshare is None:
        return HostSupport((), cgroup, "the unshare command is missing")
    failure = ""
    for namespaces in (("net", "mount", "pid"), ("net", "mount")):
        probe = subprocess.run([unshare, *unshare_flags(namespaces), "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return HostSupport(namespaces, cgroup)
        failure = probe.stderr.strip()
    return HostSupport((), cgroup, f"unshare failed: {failure}")
