"""Word when something happens in a night: a keep, a streak of failures, a stall, a full disk, the end.

Each event goes to every `--notify URL` as a JSON POST whose `text` (Slack's incoming webhooks)
and `content` (Discord's) hold one line, with the event's fields beside them, and to every
`--on-event CMD` as JSON on the command's stdin. One background thread delivers them in order,
trying each target a few times; a failure is logged, never raised, and nothing here waits on a
target: a dead webhook neither stops nor slows the night.
"""

from __future__ import annotations

import json
import queue
import shlex
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from runner.core.settings import webhook_host

log = structlog.get_logger(__name__)

ATTEMPTS = 3  # tries per target and event
RETRY_S = 2.0  # the wait after a first failure, doubled after each next one
TIMEOUT_S = 10.0  # one request or command
DRAIN_S = 15.0  # how long the end of a night waits for the last events to go out
CRASH_STREAK = 3  # experiments failed in a row that make an event (once per streak)


@dataclass(frozen=True)
class Event:
    kind: str  # keep, crash_streak, stall, disk_full, end
    tag: str
    text: str  # one line for a person
    data: dict[str, Any] = field(default_factory=dict)

    def body(self) -> bytes:
        line = f"[autoresearch {self.tag}] {self.text}"
        return json.dumps({"text": line, "content": line, "event": asdict(self)}, default=str).encode()


class Notifier:
    """Delivers events to webhooks and commands from a thread of its own (none without targets)."""

    def __init__(self, urls: tuple[str, ...] = (), commands: tuple[str, ...] = ()) -> None:
        self.urls, self.commands = urls, commands
        self._events: queue.Queue[Event | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if urls or commands:
            self._thread = threading.Thread(target=self._deliver_all, name="notify", daemon=True)
            self._thread.start()

    def send(self, event: Event) -> None:
        if self._thread is not None:
            log.info("notify.event", kind=event.kind, text=event.text)
            self._events.put(event)

    def close(self) -> None:
        """Deliver what is queued, waiting at most DRAIN_S (the night is over; a dead target cannot hold it)."""
        if self._thread is not None:
            self._events.put(None)
            self._thread.join(DRAIN_S)

    def _deliver_all(self) -> None:
        while (event := self._events.get()) is not None:
            for url in self.urls:
                self._try(event, url, lambda: _post(url, event.body()))
            for command in self.commands:
                self._try(event, command, lambda: _run(command, event.body()))

    def _try(self, event: Event, target: str, deliver) -> None:
        wait = RETRY_S
        for attempt in range(1, ATTEMPTS + 1):
            try:
                deliver()
                return
            except Exception as error:  # any failure of a target is logged; the night never sees it
                log.warning("notify.failed", kind=event.kind, target=_redacted(target), attempt=attempt,
                            error=f"{type(error).__name__}: {error}")
            if attempt < ATTEMPTS:
                time.sleep(wait)
                wait *= 2


def _post(url: str, body: bytes) -> None:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        response.read()


def _run(command: str, body: bytes) -> None:
    subprocess.run(shlex.split(command), input=body, timeout=TIMEOUT_S, check=True, capture_output=True)


def _redacted(target: str) -> str:
    """How a target is named in the log: a webhook by its host only, a command by its program."""
    if "://" in target:
        return webhook_host(target)
    return target.split()[0] if target.split() else target


class Watch:
    """What the night tells its notifier: keeps, failure streaks, stalls and its end, each said once."""

    def __init__(self, notifier: Notifier, tag: str, stall_s: float | None) -> None:
        self.notifier, self.tag, self.stall_s = notifier, tag, stall_s
        self._failed_in_a_row = 0
        self._progress = time.monotonic()
        self._stalled = False
        self._lock = threading.Lock()

    def kept(self, exp_id: str, description: str, value: float, gain: str) -> None:
        self._say("keep", f"kept {exp_id} ({description}): val_bpb {value:.6f}, gain {gain}",
                  exp=exp_id, val_bpb=value)

    def ran(self, exp_id: str, experiment: bool, failed: bool, status: str) -> None:
        """A run ended: progress. Experiments failing CRASH_STREAK times in a row is said once per streak."""
        with self._lock:
            self._progress, self._stalled = time.monotonic(), False
            if experiment:
                self._failed_in_a_row = self._failed_in_a_row + 1 if failed else 0
            streak = self._failed_in_a_row if experiment and failed and self._failed_in_a_row == CRASH_STREAK else 0
        if streak:
            self._say("crash_streak", f"{streak} experiments failed in a row (the last, {exp_id}: {status})",
                      exp=exp_id, in_a_row=streak)

    def check_stall(self) -> None:
        """Called now and then: no run ended for `stall_s` seconds is a stall, said once until one ends."""
        with self._lock:
            idle = time.monotonic() - self._progress
            stalled = self.stall_s is not None and idle >= self.stall_s and not self._stalled
            self._stalled = self._stalled or stalled
        if stalled:
            self._say("stall", f"no run has ended for {idle / 60:.0f} min", idle_s=round(idle))

    def disk_full(self, path: str) -> None:
        self._say("disk_full", f"the disk holding {path} is full: the night stops until there is room", path=path)

    def ended(self, reason: str, kept: int, decided: int) -> None:
        self._say("end", f"the night ended ({reason}): {kept} kept of {decided} decided", reason=reason,
                  kept=kept, decided=decided)

    def _say(self, kind: str, text: str, **data: Any) -> None:
        self.notifier.send(Event(kind, self.tag, text, data))
