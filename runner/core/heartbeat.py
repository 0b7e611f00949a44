"""Who runs a night: a lock its runner holds, and a sign of life in the ledger, renewed while it lives.

One runner per night: `sole_runner` holds an advisory lock on a file of the night's directory for
the runner's lifetime, and refuses a second runner of the same night with one sentence that names
the first. The kernel releases the lock when the process ends, however it ends, so a killed
runner never blocks a resume. A runner on another machine that shares the runs directory (where
the file system may not lock) is told by its heartbeat instead (`refuse_if_running`).

Each invocation of `overnight` is a row of the ledger's `nights`. While it runs, a thread
writes the time to that row every HEARTBEAT_S, and the row names the runner process
(host and `process_identity`). `status` says "running" only while the latest heartbeat is
fresh and, seen from the same host, the runner process still exists; a night killed with
SIGKILL, or one whose disk filled up, reads as stopped, with the time it was last seen.
The heartbeat also ends the running period of an invocation that recorded no end, so the
night's `--hours` (runner.night.limits) and its wall time count what the runner really ran.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import structlog

from runner.core.errors import UserError
from runner.core.ledger import Ledger, LedgerUnavailable, NightRecord, parse_time
from sandbox.processes import identity_alive, process_identity

log = structlog.get_logger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 6 * HEARTBEAT_S  # a slow disk or a long wait for the ledger's lock may delay a beat or two
LOCK_FILE = "runner.lock"  # in the night's directory; names the runner that holds it


class NightRunning(UserError):
    """Another runner runs the night (one sentence: which process, and how to stop it)."""


def this_runner() -> str:
    """`host pid:start` of this process, as a night records its runner."""
    return f"{socket.gethostname()} {process_identity(os.getpid())}"


def _runner_gone(runner: str | None) -> bool:
    """True when the runner named is known to be dead: it ran on this host and its process is gone."""
    host, _, identity = (runner or "").partition(" ")
    return host == socket.gethostname() and bool(identity) and not identity_alive(identity)


@contextmanager
def sole_runner(run_dir: Path, tag: str) -> Iterator[None]:
    """Hold the night's lock while the block runs; NightRunning at once when another runner holds it.

    Where the file system cannot lock at all (some network file systems), the block runs without
    the lock: the heartbeat's check (`refuse_if_running`) is then the only one.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # no child keeps the lock after we die
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip()
            os.close(fd)
            raise NightRunning(_running(tag, holder)) from None
        except OSError as error:
            log.warning("night.no_lock", path=str(path), error=str(error))
            break
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed (with the directory of a start that failed) and made again: lock that one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, this_runner().encode(), 0)
        yield
    finally:
        os.close(fd)


def refuse_if_running(nights: list[NightRecord], tag: str) -> None:
    """NightRunning when an invocation of the night (`nights`, from its ledger) still beats: a runner
    on another machine sharing the runs directory, which the lock may not reach."""
    now = datetime.now(timezone.utc)
    for night in nights:
        if is_running(night, now):
            raise NightRunning(_running(tag, night.runner or "", (now - last_seen(night)).total_seconds()))


def _running(tag: str, runner: str, seen_s: float | None = None) -> str:
    """The refusal's sentence: the runner (`host pid:start`, possibly unknown) and how to stop it."""
    host, _, identity = runner.partition(" ")
    pid = identity.partition(":")[0] or "?"
    if not host:
        return (f"the night {tag} is already running in another process; stop that one first, or start another "
                "night with a new --tag.")
    if host == socket.gethostname():
        return (f"the night {tag} is already running (pid {pid}); stop it with Ctrl-C or `kill {pid}` first, or "
                "start another night with a new --tag.")
    return (f"the night {tag} is running on {host} (pid {pid}, last seen {seen_s or 0:.0f} s ago); stop it there with "
            f"Ctrl-C or `kill {pid}` (a runner killed there counts as stopped {STALE_AFTER_S:.0f} s after it was "
            "last seen), or start another night with a new --tag.")


def last_seen(night: NightRecord) -> datetime:
    """The latest sign of life of one invocation (its start when it recorded no heartbeat)."""
    return parse_time(night.heartbeat_at) or parse_time(night.started_at)


def is_running(night: NightRecord, now: datetime) -> bool:
    """Whether the invocation runs: no end recorded, a fresh heartbeat, and a runner not known to be dead."""
    if night.ended_at:
        return False
    fresh = (now - last_seen(night)).total_seconds() <= STALE_AFTER_S
    return fresh and not _runner_gone(night.runner)


def ran_seconds(night: NightRecord, now: datetime) -> float:
    """How long the invocation ran: to its recorded end, to now while it runs, else to its last heartbeat."""
    end = parse_time(night.ended_at) or (now if is_running(night, now) else last_seen(night))
    return max((end - parse_time(night.started_at)).total_seconds(), 0.0)


class Heartbeat:
    """Renews an invocation's heartbeat from a daemon thread while the `with` block runs.

    A beat that cannot be written (disk full, ledger locked) is logged and tried again at
    the next one: the heartbeat itself never stops a night.
    """

    def __init__(self, ledger: Ledger, night_id: int, every: float = HEARTBEAT_S) -> None:
        self._ledger, self._night_id, self._every = ledger, night_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._ledger.heartbeat(self._night_id)
            except (LedgerUnavailable, OSError) as error:  # the ledger says SQLite's errors in one sentence
                log.warning("night.heartbeat_failed", error=str(error))
