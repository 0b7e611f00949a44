"""The launcher of a process-backend run: what runs as root inside the run's namespaces (DESIGN §3.4).

The host side (sandbox.process_backend) writes a `LaunchPlan` as JSON and starts
`python -m sandbox.namespace_init PLAN` in new namespaces (under `unshare`), or as a
plain child where there are none. The launcher then:

1. builds the sealed root on the plan's empty directory (sandbox.sealed_root);
2. joins the run's cgroups: after the root is built (not the run's cost), before the fork;
3. forks the child, which chroots into the root, takes its rlimits, drops to the run's
   unprivileged uid with no-new-privileges (it cannot undo the mounts) and execs the command;
4. waits as the PID namespace's init, reaping every orphan, until the child has exited,
   and writes the child's exit status, or why the set-up failed, where the host reads it
   (`read_status`).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.sealed_root import RunMounts, SealedRoot, build_root

_PR_SET_NO_NEW_PRIVS = 38
SETUP_FAILED = 125  # the launcher's exit code when the root or the cgroups could not be set up


@dataclass
class LaunchPlan:
    """What the launcher does; written by the backend as JSON, read by the launcher."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    status_path: str  # the launcher writes {"returncode": n} or {"setup_error": why} here
    rlimits: dict[str, int] = field(default_factory=dict)
    cgroup_procs: list[str] = field(default_factory=list)  # the run's cgroup.procs files (one per hierarchy)
    new_root: str | None = None  # None: no namespaces, run in place
    uid: int | None = None
    sealed: dict | None = None  # SealedRoot, the host's part of the new root
    mounts: dict | None = None  # RunMounts, the run's own part


def exit_code(returncode: int) -> int:
    """A return code as a shell says it: a process killed by signal N exited 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def read_status(status_path: str) -> tuple[int | None, str | None]:
    """What the launcher wrote: the child's own return code (None: not written), and why the set-up failed."""
    path = Path(status_path)
    status = json.loads(path.read_text()) if path.exists() else {}
    return status.get("returncode"), status.get("setup_error")


def _exec_child(plan: LaunchPlan) -> None:
    """In the forked child: enter the new root, drop to the run's uid, exec. Never returns."""
    try:
        if plan.new_root is not None:
            os.chroot(plan.new_root)
        os.chdir(plan.cwd)
        for name, value in plan.rlimits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        if plan.uid is not None:
            os.setgroups([])
            os.setresgid(plan.uid, plan.uid, plan.uid)
            os.setresuid(plan.uid, plan.uid, plan.uid)
            if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        os.umask(0o022)
        os.execve(plan.argv[0], plan.argv, plan.env)
    except BaseException as error:  # the child must never return into the launcher's code
        os.write(2, f"[sandbox] cannot start {plan.argv[0]}: {error}\n".encode())
    os._exit(127)


def launch(plan_path: str) -> int:
    """The launcher's main: build the root, join the cgroups, run the child, reap everything."""
    plan = LaunchPlan(**json.loads(Path(plan_path).read_text()))
    status = Path(plan.status_path)
    try:
        if plan.new_root:
            build_root(plan.new_root, SealedRoot(**plan.sealed), RunMounts(**plan.mounts))
        for procs in plan.cgroup_procs:
            Path(procs).write_text("0")
    except OSError as error:
        status.write_text(json.dumps({"setup_error": str(error)}))
        return SETUP_FAILED
    child = os.fork()
    if child == 0:
        _exec_child(plan)
    while True:  # as the PID namespace's init, orphans are ours to reap
        pid, wait_status = os.wait()
        if pid == child:
            break
    returncode = os.waitstatus_to_exitcode(wait_status)
    status.write_text(json.dumps({"returncode": returncode}))
    return exit_code(returncode)


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1]))
