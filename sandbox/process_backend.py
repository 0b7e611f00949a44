"""The process isolation backend, for hosts without a Docker engine (DESIGN §3.4).

Each run is a child of the `unshare` command in new network, mount and (where the
kernel allows) PID namespaces. Inside, a small launcher running as root
(sandbox.namespace_init) builds a sealed root filesystem on a tmpfs (sandbox.sealed_root):

- only the host's runtime, read-only: the Python interpreter and the packages the
  harness imports, the system libraries, the few programs torch.compile and Triton run,
  the CUDA libraries and NVIDIA devices where present, all found by asking the host; a
  synthesized /etc and a minimal /dev. Nothing else of the host: no home, /var, /opt,
  /run or project directory, and no host unix socket (those inside the runtime's trees
  are covered; abstract ones belong to the network namespace);
- `/app` = the run's snapshot (the harness files + train.py), `/data/...` = the data
  mounts, `/out` (read-only in phase 2), all bound as in the docker backend, so
  commands and paths are the same for both backends;
- a size-limited tmpfs on `/tmp` and `/dev/shm`, a fresh `/proc` and `/sys` (so
  only loopback is visible), and the data cache, snapshots and run directories
  covered by empty tmpfs where the runtime's trees hold them.

It then chroots the child, drops it to a per-run unprivileged uid with
no-new-privileges (it cannot undo the mounts) and waits for it as the PID
namespace's init: when train.py exits, everything it spawned dies with the
namespace. A per-run cgroup (v2, or v1 where that is what the host has: sandbox.cgroups)
caps memory with no swap, and pids; where no pids controller is writable,
RLIMIT_NPROC on the run's uid bounds them. Where no memory limit can be enforced,
isolated runs refuse to start (SandboxUnavailable) rather than run unlimited.

Without root (or where `unshare` fails) the command runs as a plain child process:
no isolation and no limits at all, which the `isolation` string and the log say loudly.

This module is the host's side: it plans the run, starts the launcher and hands the
run to the supervisor (sandbox.supervision, the same loop as the docker backend's).
Who ends a run: the deadline, the cancel token, the budget account and the GPU
watchdog kill it through the supervisor (SIGKILL to the cgroup, the run's uid and its
process tree, the namespace's init among them, until none is left); an OOM is the
cgroup's `oom_kill` counter (on cgroup v1, where the kernel kills one process, the
supervisor then ends the whole run), or, where nothing counts it, a SIGKILL that the
host did not send (the kernel's OOM killer is the only other sender). After any end,
whatever the run started is killed too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from contract import cache_dir
from sandbox import namespace_init
from sandbox.cgroups import Cgroup, CgroupHost, find_cgroup_host
from sandbox.gpu_watchdog import Reader
from sandbox.harness import HARNESS_FILES, PROJECT_ROOT, harness_files
from sandbox.namespace_init import LaunchPlan
from sandbox.processes import stat_fields
from sandbox.runlog import LineLog
from sandbox.sealed_root import RunMounts, runtime_needs, seal, under
from sandbox.spec import APP_DIR, OUT_DIR, CancelToken, Phase, RunResult, RunSpec, SandboxUnavailable
from sandbox.status import Status
from sandbox.supervision import KILL_GRACE_S, Ending, Exit, Supervisor

log = structlog.get_logger(__name__)

UID_BASE = 3_000_000  # runs get uids UID_BASE + hash(run_id) % UID_SPAN: never a real user's
UID_SPAN = 2**24
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the launcher is imported from this project, so it sees what this process sees (never the child's business)
_LAUNCHER_PATH = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), *filter(None, sys.path)]))
# Prints what a run's runtime is: the child's Python and the packages the harness imports, with versions.
RUNTIME_VERSIONS = ("import sys, importlib.metadata as m; print(sys.version.split()[0], "
                    "*(f'{p}=={m.version(p)}' for p in ('torch', 'numpy', 'tiktoken')))")
RUN_RECORD = "run.json"  # per-run state under <snapshots>/.runs/<run_id>/, read by reap()


def default_snapshots_root() -> Path:
    """`<cache>/snapshots` (contract.cache_dir, the harness's own rule)."""
    return cache_dir() / "snapshots"


# -----------------------------------------------------------------------------
# What this host supports


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


def _unshare_flags(namespaces: tuple[str, ...]) -> list[str]:
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
        probe = subprocess.run([unshare, *_unshare_flags(namespaces), "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return HostSupport(namespaces, cgroup)
        failure = probe.stderr.strip()
    return HostSupport((), cgroup, f"unshare failed: {failure}")


# -----------------------------------------------------------------------------
# Host processes of a run


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    uid: int
    start: int  # clock ticks after boot: tells a process from a later one with the same pid
    zombie: bool


def _read_proc(pid: int) -> _Proc | None:
    fields = stat_fields(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    if fields is None:
        return None
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
    return _Proc(pid, int(fields[1]), int(fields[3]), int(uid[1]) if uid else -1, int(fields[19]), fields[0] == "Z")


def _cpu_seconds_of(pid: int) -> float:
    """utime + stime + cutime + cstime of a process, in seconds (0 when it is gone)."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else sum(int(tick) for tick in fields[11:15]) / _CLOCK_TICKS


def _processes() -> list[_Proc]:
    found = (_read_proc(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return [proc for proc in found if proc is not None]


@dataclass
class _RunHandle:
    """Everything that identifies a run's processes on the host, also after a runner restart."""

    run_id: str
    uid: int | None  # the run's own uid (None: it runs as the runner's user)
    cgroup: dict | None  # Cgroup.record()
    root_pid: int | None = None  # the process the backend started (unshare or the launcher)
    root_start: int | None = None
    new_root: str | None = None  # the empty host directory the launcher mounts the new root on

    def group(self) -> Cgroup | None:
        return Cgroup.from_record(self.cgroup) if self.cgroup else None

    def pids(self) -> set[int]:
        """Host PIDs of the run (zombies left out): its cgroup, its uid, its session and process tree.

        The session and the tree count only while the started process is still there (alive or
        a zombie not yet reaped), so that a reused pid never makes a stranger part of the run.
        """
        procs = _processes()
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
        return usage if usage is not None else sum(_cpu_seconds_of(pid) for pid in self.pids())

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
                _sigkill(pid)
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
# Snapshots ("images")


def snapshot_id(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):  # length-prefixed: no two sets of files hash alike
        for part in (name.encode(), files[name]):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def _make_writable_tree(path: Path) -> None:
    for folder, _, _ in os.walk(path):
        os.chmod(folder, 0o755)


# -----------------------------------------------------------------------------
# The backend


class _Waiter(threading.Thread):
    """Notices when the started process exits, without reaping it.

    Until `reap()`, the exited process stays a zombie, so its pid (the session id of
    everything it started) cannot be reused while the run's processes are killed.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        super().__init__(name=f"wait-{process.pid}", daemon=True)
        self.process = process
        self.done = threading.Event()

    def run(self) -> None:
        os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
        self.done.set()

    def reap(self) -> tuple[int | None, int | None]:
        """(returncode, peak RSS in bytes of the largest process it waited for); Nones if it still runs."""
        pid, wait_status, usage = os.wait4(self.process.pid, 0 if self.done.is_set() else os.WNOHANG)
        if pid == 0:
            return None, None
        self.process.returncode = os.waitstatus_to_exitcode(wait_status)
        return self.process.returncode, usage.ru_maxrss * 1024


def _pump(stream, line_log: LineLog, stop: threading.Event) -> None:
    """Copy the child's output into the log until EOF (or until stopped and quiet)."""
    fd = stream.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            if stop.is_set():
                return
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        line_log.feed(chunk)


class _ProcessRun:
    """The launcher process of one run, as the supervisor drives it (sandbox.supervision.Supervised)."""

    def __init__(self, command: list[str], state_dir: Path, handle: _RunHandle, plan: LaunchPlan,
                 line_log: LineLog) -> None:
        self._command, self._state_dir, self._handle, self._plan = command, state_dir, handle, plan
        self._log = line_log
        self._process: subprocess.Popen | None = None
        self._waiter: _Waiter | None = None
        self._pump: threading.Thread | None = None
        self._stop_pump = threading.Event()

    def start(self) -> None:
        self._process = subprocess.Popen(
            self._command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={"PATH": CHILD_PATH, "PYTHONPATH": _LAUNCHER_PATH}, cwd=self._state_dir, start_new_session=True,
        )
        root = _read_proc(self._process.pid)
        self._handle.root_pid, self._handle.root_start = self._process.pid, root.start if root else None
        self._handle.save(self._state_dir)
        self._waiter = _Waiter(self._process)
        self._waiter.start()
        self._pump = threading.Thread(target=_pump, args=(self._process.stdout, self._log, self._stop_pump),
                                      daemon=True)
        self._pump.start()

    def wait(self, timeout_s: float) -> bool:
        return self._waiter.done.wait(timeout_s)

    def kill(self) -> None:
        self._handle.kill()

    def pids(self) -> set[int]:
        return self._handle.pids()

    def meter(self) -> float | None:
        return self._handle.cpu_seconds()

    def oom_seen(self) -> bool:  # cgroup v1's OOM killer kills one process: the supervisor then ends them all
        group = self._handle.group()
        return group is not None and bool(group.oom_killed())

    def report(self) -> Exit:
        self._handle.kill()  # also after a clean exit: nothing the run started outlives it
        self._waiter.done.wait(KILL_GRACE_S)
        self.close_output()
        returncode, max_rss = self._waiter.reap()
        child_returncode, setup_error = namespace_init.read_status(self._plan.status_path)
        if setup_error is not None:
            raise SandboxUnavailable(f"the process sandbox could not be set up: {setup_error}.")
        returncode = returncode if child_returncode is None else child_returncode  # the child's own, not the launcher's
        group = self._handle.group()
        oom, peak = (group.oom_killed(), group.peak_bytes()) if group is not None else (None, max_rss)
        return Exit(None if returncode is None else namespace_init.exit_code(returncode), oom, peak)

    def close_output(self) -> None:
        """Stop copying the run's output (its last lines are in the log) and close the pipe; again: nothing."""
        if self._pump is None:
            return
        self._stop_pump.set()
        self._pump.join(KILL_GRACE_S)
        self._process.stdout.close()
        self._pump = None


def _translate(value: str, views: dict[str, str]) -> str:
    """A sandbox path (/app, /data/..., /out/...) as the host path it stands for."""
    for inside, host in views.items():
        if under(value, inside):
            return host + value[len(inside) :]
    return value


class ProcessBackend:
    """Runs each `RunSpec` as an isolated child process (see the module docstring).

    `python` is the interpreter the child runs ("python"/"python3" in a command
    mean it); it must import torch, so its installation is bound into the sandbox.
    `hide` adds host paths the child must not see (the runner's run directory).
    """

    name = "process"

    def __init__(
        self,
        snapshots_root: Path | None = None,
        harness_root: Path | None = None,
        python: str = sys.executable,
        hide: tuple[Path, ...] = (),
        support: HostSupport | None = None,
        gpu_reader: Reader | None = None,
    ) -> None:
        self.snapshots_root = Path(snapshots_root or default_snapshots_root())
        self.state_root = self.snapshots_root / ".runs"
        self.harness_root = Path(harness_root or PROJECT_ROOT)  # holds the trusted harness files
        self.python = shutil.which(python) or python
        self._hide = tuple(hide) + (self.snapshots_root.parent,)
        self._support = support
        self._gpu_reader = gpu_reader  # None: NVML
        self._active: set[str] = set()
        self._lock = threading.Lock()

    # -- host support ---------------------------------------------------------

    @property
    def support(self) -> HostSupport:
        if self._support is None:
            self._support = probe_host()
            if self._support.isolated:
                log.info("process_backend.isolation", isolation=self._support.describe())
            else:
                log.warning("process_backend.NO_ISOLATION", isolation=self._support.describe(),
                            hint="run as root on Linux with the unshare command for a real sandbox")
        return self._support

    @property
    def isolation(self) -> str:
        return self.support.describe()

    @property
    def child_path(self) -> str:
        """The child's PATH: its Python's directory first."""
        return f"{Path(self.python).parent}:{CHILD_PATH}"

    def _runtime_needs(self) -> tuple[str, ...]:
        """The host paths the child's runtime needs (sandbox.sealed_root), found once per interpreter."""
        return runtime_needs(self.python, self.harness_root.resolve(), self.child_path)

    # -- images ---------------------------------------------------------------

    def ensure_ready(self) -> None:
        missing = [name for name in HARNESS_FILES if not (self.harness_root / name).is_file()]
        if missing:
            raise SandboxUnavailable(f"the harness file {self.harness_root / missing[0]} does not exist.")
        if refusal := self.support.refusal():
            raise SandboxUnavailable(refusal)
        with self._snapshot_writes():
            self.snapshots_root.mkdir(parents=True, exist_ok=True)
            self.state_root.mkdir(parents=True, exist_ok=True)
        self._self_check()

    @contextmanager
    def _snapshot_writes(self) -> Iterator[None]:
        """A cache that cannot be written (read-only, full) is a sandbox that cannot work, said in one sentence."""
        try:
            yield
        except OSError as error:
            raise SandboxUnavailable(f"the process sandbox cannot write its snapshots under {self.snapshots_root} "
                                     f"({error.strerror or error}); AR_CACHE must be a writable directory.") from error

    def _self_check(self) -> None:
        """Run a trivial child through the whole sandbox once: a broken setup fails here, clearly."""
        probe = "import importlib.util as u, sys\nassert u.find_spec('torch'), 'torch is not importable'\nprint('sandbox-ok')\n"
        image = self.build_image(probe, "self-check")
        with tempfile.TemporaryDirectory() as tmp:
            spec = RunSpec(run_id=f"self-check-{os.getpid()}", image=image, phase=Phase.TRAIN,
                           command=["python", "train.py"], log_path=Path(tmp, "log"), out_dir=Path(tmp, "out"),
                           deadline_s=120.0)
            spec.out_dir.mkdir()
            result = self.run(spec)
        if result.status is not Status.OK:
            raise SandboxUnavailable(f"the process sandbox cannot run its Python ({result.status.value}): "
                                     f"{result.log_tail.strip()[-500:]}")

    def recipe(self) -> str:
        """The harness files and the runtime the child imports: its Python and the packages the harness
        needs, at the versions installed for the child's interpreter (asked of that interpreter)."""
        versions = subprocess.run([self.python, "-c", RUNTIME_VERSIONS], capture_output=True, text=True, timeout=60)
        if versions.returncode != 0:
            raise SandboxUnavailable(f"the process sandbox's Python {self.python} cannot name its packages: "
                                     f"{versions.stderr.strip()[-300:]}")
        return f"process-{snapshot_id({**harness_files(self.harness_root), 'runtime': versions.stdout.encode()})}"

    def build_image(self, train_py: str, exp_id: str) -> str:
        files = {**harness_files(self.harness_root), "train.py": train_py.encode()}
        path = self.snapshots_root / snapshot_id(files)
        if not self.image_exists(str(path)):
            with self._snapshot_writes():
                self.snapshots_root.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.snapshots_root))
                for name, content in files.items():
                    (staging / name).write_bytes(content)
                    (staging / name).chmod(0o444)
                staging.chmod(0o555)
            try:
                staging.rename(path)
            except OSError:  # made meanwhile by another run of the same content
                _make_writable_tree(staging)
                shutil.rmtree(staging)
        log.info("process_backend.snapshot", exp_id=exp_id, image=str(path))
        return str(path)

    def image_exists(self, image: str) -> bool:
        path = Path(image)
        return path.parent == self.snapshots_root and all((path / name).is_file() for name in (*HARNESS_FILES, "train.py"))

    def remove_image(self, image: str) -> None:
        path = Path(image)
        if path.parent == self.snapshots_root and path.is_dir():
            _make_writable_tree(path)
            shutil.rmtree(path)

    # -- runs -----------------------------------------------------------------

    def run(self, spec: RunSpec, cancel: CancelToken | None = None) -> RunResult:
        with Supervisor(spec) as supervisor:
            if self.image_exists(spec.image):
                ending = self._run(spec, cancel, supervisor)
            else:
                supervisor.log.note(f"snapshot {spec.image} does not exist")
                ending = Ending(Status.CRASH)
            return supervisor.result(ending, self.isolation)

    def _run(self, spec: RunSpec, cancel: CancelToken | None, supervisor: Supervisor) -> Ending:
        if refusal := self.support.refusal():  # never a run without the memory limit it was given
            raise SandboxUnavailable(refusal)
        state_dir = self.state_root / spec.run_id
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True)
        support = self.support
        handle = _RunHandle(spec.run_id, uid=self._uid(state_dir) if support.isolated else None, cgroup=None)
        with self._lock:
            self._active.add(spec.run_id)
        try:
            if support.cgroups is not None:
                handle.cgroup = self._cgroup(support.cgroups, spec, state_dir).record()
            plan = self._plan(spec, handle, state_dir)
            run = _ProcessRun(self._command(state_dir), state_dir, handle, plan, supervisor.log)
            try:
                return supervisor.supervise(run, cancel, self._gpu_reader)
            finally:
                run.close_output()
        finally:
            handle.kill()
            handle.clean_up(state_dir)
            with self._lock:
                self._active.discard(spec.run_id)

    @staticmethod
    def _uid(state_dir: Path) -> int:
        """The run's own uid: one per run and per backend (another backend's run of the same id has another)."""
        return UID_BASE + int(hashlib.sha256(str(state_dir).encode()).hexdigest(), 16) % UID_SPAN

    @staticmethod
    def _cgroup(cgroups: CgroupHost, spec: RunSpec, state_dir: Path) -> Cgroup:
        name = f"{spec.run_id}-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]}"  # per backend too
        try:
            return cgroups.create(name, spec.limits)
        except OSError as error:
            raise SandboxUnavailable(f"the process sandbox cannot make the run's cgroup: {error}.") from error

    def _plan(self, spec: RunSpec, handle: _RunHandle, state_dir: Path) -> LaunchPlan:
        support = self.support
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
            self._isolate(plan, spec, handle, state_dir)
        else:
            self._run_in_place(plan, spec, state_dir)
        handle.save(state_dir)
        plan_path = state_dir / "plan.json"
        plan_path.write_text(json.dumps(asdict(plan)))
        plan_path.chmod(0o600)
        return plan

    def _isolate(self, plan: LaunchPlan, spec: RunSpec, handle: _RunHandle, state_dir: Path) -> None:
        """Fill the plan for a namespaced run: the new root's mounts, the uid, the pid limit."""
        assert handle.uid is not None
        handle.new_root = tempfile.mkdtemp(prefix="autoresearch-root-", dir="/tmp")  # /tmp: never bound inside
        plan.new_root, plan.uid = handle.new_root, handle.uid
        if not self.support.cgroups or not self.support.cgroups.pids:
            plan.rlimits["RLIMIT_NPROC"] = spec.limits.pids  # counts the processes of the run's own uid
        program = [plan.argv[0]] if plan.argv and os.path.isabs(plan.argv[0]) else []  # e.g. `env`, found on the host
        sealed = seal([*self._runtime_needs(), *program], handle.uid)
        empty = state_dir / "empty"
        empty.touch(mode=0o444)
        mounts = RunMounts(fresh_proc="pid" in self.support.namespaces, empty_file=str(empty),
                           tmpfs=[("/tmp", spec.limits.tmp_bytes), ("/dev/shm", spec.limits.shm_bytes)])
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        out_dir = os.path.realpath(spec.out_dir)
        for folder, _, files in os.walk(out_dir):  # /out belongs to the run's uid
            for path in [folder, *(os.path.join(folder, name) for name in files)]:
                os.lchown(path, handle.uid, handle.uid)
        mounts.binds = [(os.path.realpath(spec.image), APP_DIR, True), (out_dir, OUT_DIR, spec.phase is Phase.EVAL)]
        mounts.binds += [(os.path.realpath(m.source), m.target, True) for m in spec.mounts]
        hide = {os.path.realpath(path) for path in
                (*self._hide, self.snapshots_root, spec.out_dir.parent, *(m.source.parent for m in spec.mounts))}
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

    def _command(self, state_dir: Path) -> list[str]:
        launcher = [sys.executable, "-m", namespace_init.__name__, str(state_dir / "plan.json")]
        if not self.support.isolated:
            return launcher
        unshare = shutil.which("unshare")
        assert unshare is not None
        return [unshare, *_unshare_flags(self.support.namespaces), *launcher]

    # -- leftovers ------------------------------------------------------------

    def reap(self) -> int:
        """Kill and remove what runs of an earlier runner left: processes, cgroups, state."""
        with self._lock:
            active = set(self._active)
        reaped = 0
        for record in sorted(self.state_root.glob(f"*/{RUN_RECORD}")):
            handle = _RunHandle(**json.loads(record.read_text()))
            if handle.run_id in active:
                continue
            handle.kill()
            handle.clean_up(record.parent)
            reaped += 1
        if reaped:
            log.info("process_backend.reaped", runs=reaped)
        return reaped

