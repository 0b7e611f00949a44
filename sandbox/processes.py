"""Telling a live process from a dead one later, from another process: its pid plus its start time.

A pid alone is reused by the kernel; with the start time it names one process for good.
The docker backend marks containers with the runner that supervises them, and a night
records the runner it runs in, so leftovers of a killed runner are told apart from a live one's.
"""

from __future__ import annotations

from pathlib import Path


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
