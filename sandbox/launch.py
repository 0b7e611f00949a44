"""How one run of the process sandbox is launched and found again.

`RunHandle` is what identifies a run's processes on the host (its uid, cgroup and first
process), saved beside the run so that `reap()` finds them after a runner restart. `Launcher`
plans the run for sandbox.namespace_init: the child's argv and environment, and, where the
host allows namespaces, the sealed root's mounts, the run's uid and its pid limit; without
them, the sandbox paths (/app, /out, /data) become host paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from sandbox import namespace_init
from sandbox.cgroups import Cgroup, CgroupHost
from sandbox.harness import PROJECT_ROOT
from sandbox.host_support import HostSupport, unshare_flags
from sandbox.namespace_init import LaunchPlan
from sandbox.processes import cpu_seconds_of, processes, sigkill
from sandbox.sealed_root import RunMounts, runtime_needs, seal, under
from sandbox.spec import APP_DIR, OUT_DIR, Phase, RunSpec, SandboxUnavailable
from sandbox.supervision import KILL_GRACE_S

log = structlog.get_logger(__name__)

UID_BASE = 3_000_000  # runs get uids UID_BASE + hash(run_id) % UID_SPAN: never a real user's
UID_SPAN = 2**24
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the launcher is imported from this project, so it sees what this process sees (never the child's business)
LAUNCHER_PATH = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), *filter(None, sys.path)]))
RUN_RECORD = "run.json"  # per-run state under <snapshots>/.runs/<run_id>/, read by reap()


@dataclass
class RunHandle:
    """Everything that identifies a run's processes on the host, also after a runner restart."""

    run_id: str
    uid: int | None  # the run's own uid (None: it runs as the runner's user)
    cgroup: dict | None  # Cgroup.record()
    root_pid: int | None = None  # the process the backend started (unshare or the launcher)
    root_start: int | None = None
    new_root: str | None = None  # the empty host directory the launcher mounts the new root on
    owner: str | None = None  # the runner that supervises it (`pid:start`): a live runner's runs are never reaped

    def group(self) -> Cgroup | None:
        return Cgroup.from_record(self.cgroup) if self.cgroup else None

    def pids(self) -> set[int]:
        """Host PIDs of the run (zombies left out): its cgroup, its uid, its session and process tree.

        The session and the tree count only while the started process is still there (alive or
        a zombie not yet reaped), so that a reused pid never makes a stranger part of the run.
        """
        procs = processes()
        pids: set[int] = set()
        root = next((proc for proc in procs if proc.pid == self.root_pid), None)
        if root is not None and root.start == self.root_start:
            children: dict[int, list[int]] = {}
            for proc in procs:
                children.setdefault(proc.ppid, []).append(proc.pid)
            stack = [root.pid, *(proc.pid for proc in procs if proc.sid == root.pid)]
            while stack:
                pid = stack.pop()
                if pid not in pids:
                    pids.add(pid)
                    stack.extend(children.get(pid, []))
        if self.uid is not None:
            pids.update(proc.pid for proc in procs if proc.uid == self.uid)
        group = self.group()
        if group is not None:
            pids.update(group.pids())
        zombies = {proc.pid for proc in procs if proc.zombie}
        return pids - zombies - {os.getpid()}

    def cpu_seconds(self) -> float:
        """CPU time the run has used: its cgroup's account, else its live processes' (children they waited for
        included; a process that is gone and was not waited for is missed)."""
        group = self.group()
        usage = group.cpu_seconds() if group is not None else None
        return usage if usage is not None else sum(cpu_seconds_of(pid) for pid in self.pids())

    def kill(self) -> bool:
        """SIGKILL every process of the run until none is left; False if some survived."""
        group = self.group()
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline:
            if group is not None:
                group.kill()
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                sigkill(pid)
            time.sleep(0.02)
        log.error("process_backend.unkillable", run_id=self.run_id, pids=sorted(self.pids()))
        return False

    def save(self, state_dir: Path) -> None:
        """Write the record that lets reap() find the run after a runner restart."""
        (state_dir / RUN_RECORD).write_text(json.dumps(asdict(self)))

    def clean_up(self, state_dir: Path) -> None:
        group = self.group()
        if group is not None:
            group.remove()
        if self.new_root:
            try:  # never rmtree: were the namespace's mounts ever visible here, that would delete the host
                os.rmdir(self.new_root)
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("process_backend.root_left", path=self.new_root, error=str(error))
        shutil.rmtree(state_dir, ignore_errors=True)


# -----------------------------------------------------------------------------
# The backend


def _translate(value: str, views: dict[str, str]) -> str:
    """A sandbox path (/app, /data/..., /out/...) as the host path it stands for."""
    for inside, host in views.items():
        if under(value, inside):
            return host + value[len(inside) :]
    return value


class Launcher:
    """Plans runs for one interpreter and harness: `python` must import torch (its installation is bound into the
    sandbox); `hide` are host paths the child must not see even where the runtime's trees hold them."""

    def __init__(self, python: str, harness_root: Path, snapshots_root: Path, hide: tuple[Path, ...]) -> None:
        self.python, self.harness_root, self.snapshots_root, self.hide = python, harness_root, snapshots_root, hide

    @property
    def child_path(self) -> str:
        """The child's PATH: its Python's directory first."""
        return f"{Path(self.python).parent}:{CHILD_PATH}"

    def _runtime_needs(self) -> tuple[str, ...]:
        """The host paths the child's runtime needs (sandbox.sealed_root), found once per interpreter."""
        return runtime_needs(self.python, self.harness_root.resolve(), self.child_path)

    @staticmethod
    def uid(state_dir: Path) -> int:
        """The run's own uid: one per run and per backend (another backend's run of the same id has another)."""
        return UID_BASE + int(hashlib.sha256(str(state_dir).encode()).hexdigest(), 16) % UID_SPAN

    @staticmethod
    def cgroup(cgroups: CgroupHost, spec: RunSpec, state_dir: Path) -> Cgroup:
        name = f"{spec.run_id}-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]}"  # per backend too
        try:
            return cgroups.create(name, spec.limits)
        except OSError as error:
            raise SandboxUnavailable(f"the process sandbox cannot make the run's cgroup: {error}.") from error

    def plan(self, spec: RunSpec, handle: RunHandle, state_dir: Path, support: HostSupport) -> LaunchPlan:
        """The launcher's plan for the run, written to <state_dir>/plan.json (readable by the runner's user alone)."""
        env = {"PATH": self.child_path, "HOME": "/tmp", "TMPDIR": "/tmp",
               "USER": "sandbox", "LOGNAME": "sandbox", **spec.env,  # USER: getpass (torch.compile) needs a name
               "CUDA_VISIBLE_DEVICES": spec.gpu_uuid or ""}
        argv = list(spec.command)
        if argv and argv[0] in ("python", "python3"):
            argv[0] = self.python
        elif argv and "/" not in argv[0]:
            argv[0] = shutil.which(argv[0], path=CHILD_PATH) or argv[0]
        group = handle.group()
        plan = LaunchPlan(argv=argv, env=env, cwd=APP_DIR, status_path=str(state_dir / "exit.json"),
                     rlimits={"RLIMIT_CORE": 0}, cgroup_procs=group.join_files() if group is not None else [])
        if support.isolated:
            self._isolate(plan, spec, handle, state_dir, support)
        else:
            self._run_in_place(plan, spec, state_dir)
        handle.save(state_dir)
        plan_path = state_dir / "plan.json"
        plan_path.write_text(json.dumps(asdict(plan)))
        plan_path.chmod(0o600)
        return plan

    def _isolate(self, plan: LaunchPlan, spec: RunSpec, handle: RunHandle, state_dir: Path,
                 support: HostSupport) -> None:
        """Fill the plan for a namespaced run: the new root's mounts, the uid, the pid limit."""
        assert handle.uid is not None
        handle.new_root = tempfile.mkdtemp(prefix="autoresearch-root-", dir="/tmp")  # /tmp: never bound inside
        plan.new_root, plan.uid = handle.new_root, handle.uid
        if not support.cgroups or not support.cgroups.pids:
            plan.rlimits["RLIMIT_NPROC"] = spec.limits.pids  # counts the processes of the run's own uid
        program = [plan.argv[0]] if plan.argv and os.path.isabs(plan.argv[0]) else []  # e.g. `env`, found on the host
        sealed = seal([*self._runtime_needs(), *program], handle.uid)
        empty = state_dir / "empty"
        empty.touch(mode=0o444)
        mounts = RunMounts(fresh_proc="pid" in support.namespaces, empty_file=str(empty),
                           tmpfs=[("/tmp", spec.limits.tmp_bytes), ("/dev/shm", spec.limits.shm_bytes)])
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        out_dir = os.path.realpath(spec.out_dir)
        for folder, _, files in os.walk(out_dir):  # /out belongs to the run's uid
            for path in [folder, *(os.path.join(folder, name) for name in files)]:
                os.lchown(path, handle.uid, handle.uid)
        mounts.binds = [(os.path.realpath(spec.image), APP_DIR, True), (out_dir, OUT_DIR, spec.phase is Phase.EVAL)]
        mounts.binds += [(os.path.realpath(m.source), m.target, True) for m in spec.mounts]
        hide = {os.path.realpath(path) for path in
                (*self.hide, self.snapshots_root, spec.out_dir.parent, *(m.source.parent for m in spec.mounts))}
        mounts.hide = sorted(path for path in hide if any(under(path, bound) for bound in sealed.binds))
        plan.sealed, plan.mounts = asdict(sealed), asdict(mounts)

    def _run_in_place(self, plan: LaunchPlan, spec: RunSpec, state_dir: Path) -> None:
        """Fill the plan for a run without namespaces: sandbox paths become host paths."""
        view = state_dir / "view"
        views = {APP_DIR: os.path.realpath(spec.image), OUT_DIR: os.path.realpath(spec.out_dir)}
        for mount in spec.mounts:
            link = view / mount.target.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.realpath(mount.source))
            top = "/" + mount.target.strip("/").split("/")[0]
            views.setdefault(top, str(view / top.lstrip("/")))
        home = state_dir / "home"
        home.mkdir()
        plan.env.update(HOME=str(home), TMPDIR=str(home))
        plan.env = {key: _translate(value, views) for key, value in plan.env.items()}
        plan.argv = [_translate(arg, views) for arg in plan.argv]
        plan.cwd = views[APP_DIR]

    @staticmethod
    def command(state_dir: Path, support: HostSupport) -> list[str]:
        """The launcher's command line: inside new namespaces where the host allows them."""
        launcher = [sys.executable, "-m", namespace_init.__name__, str(state_dir / "plan.json")]
        if not support.isolated:
            return launcher
        unshare = shutil.which("unshare")
        assert unshare is not None
        return [unshare, *unshare_flags(support.namespaces), *launcher]
