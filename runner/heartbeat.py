"""The running night's sign of life: a timestamp in the ledger, renewed while its runner lives.

Each invocation of `overnight` is a row of the ledger's `nights`. While it runs, a thread
writes the time to that row every HEARTBEAT_S, and the row names the runner process
(host and `process_identity`). `status` says "running" only while the latest heartbeat is
fresh and, seen from the same host, the runner process still exists; a night killed with
SIGKILL, or one whose disk filled up, reads as stopped, with the time it was last seen.
The heartbeat also ends the running period of an invocation that recorded no end, so the
night's `--hours` (runner.limits) and its wall time count what the runner really ran.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import datetime
from typing import Any

import structlog

from runner.ledger import Ledger, LedgerUnavailable, parse_time
from sandbox.processes import identity_alive, process_identity

log = structlog.get_logger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 6 * HEARTBEAT_S  # a slow disk or a long wait for the ledger's lock may delay a beat or two


def this_runner() -> str:
    """`host pid:start` of this process, as a night records its runner."""
    return f"{socket.gethostname()} {process_identity(os.getpid())}"


def _runner_gone(runner: str | None) -> bool:
    """True when the runner named is known to be dead: it ran on this host and its process is gone."""
    host, _, identity = (runner or "").partition(" ")
    return host == socket.gethostname() and bool(identity) and not identity_alive(identity)


def last_seen(night: dict[str, Any]) -> datetime:
    """The latest sign of life of one invocation (its start when it recorded no heartbeat)."""
    return parse_time(night.get("heartbeat_at")) or parse_time(night["started_at"])


def is_running(night: dict[str, Any], now: datetime) -> bool:
    """Whether the invocation runs: no end recorded, a fresh heartbeat, and a runner not known to be dead."""
    if night["ended_at"]:
        return False
    fresh = (now - last_seen(night)).total_seconds() <= STALE_AFTER_S
    return fresh and not _runner_gone(night.get("runner"))


def ran_seconds(night: dict[str, Any], now: datetime) -> float:
    """How long the invocation ran: to its recorded end, to now while it runs, else to its last heartbeat."""
    end = parse_time(night["ended_at"]) or (now if is_running(night, now) else last_seen(night))
    return max((end - parse_time(night["started_at"])).total_seconds(), 0.0)


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
