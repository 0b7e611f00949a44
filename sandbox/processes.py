"""The host's process table, read from /proc, and telling a live process from a dead one later.

A pid alone is reused by the kernel; with the start time it names one process for good.
The docker backend marks containers with the runner that supervises them, and a night
records the runner it runs in, so leftovers of a killed runner are told apart from a live one's.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses):
    [0] state, [1] ppid, [3] session, [11:15] CPU ticks, [19] start time; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_identity(pid: int) -> str | None:
    """`pid:start time` of a live process, None if there is none (the start time tells a reused pid apart)."""
    fields = stat_fields(pid)
    return None if fields is None else f"{pid}:{fields[19]}"


def identity_alive(identity: str) -> bool:
    """Whether the process a `process_identity` named still runs on this host."""
    pid = identity.partition(":")[0]
    return pid.isdigit() and process_identity(int(pid)) == identity


def sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class Proc:
    """One row of the host's process table."""

    pid: int
    ppid: int
    sid: int
    uid: int
    start: int  # clock ticks after boot: tells a process from a later one with the same pid
    zombie: bool


def read_proc(pid: int) -> Proc | None:
    fields = stat_fields(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    if fields is None:
        return None
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
    return Proc(pid, int(fields[1]), int(fields[3]), int(uid[1]) if uid else -1, int(fields[19]), fields[0] == "Z")


def cpu_seconds_of(pid: int) -> float:
    """utime + stime + cutime + cstime of a process, in seconds (0 when it is gone)."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else sum(int(tick) for tick in fields[11:15]) / CLOCK_TICKS


def processes() -> list[Proc]:
    found = (read_proc(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return [proc for proc in found if proc is not None]
