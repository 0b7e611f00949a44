"""Logging for a night: every event as a JSON line in `runs/<tag>/events.jsonl`,
and a short line on the console.

The JSON lines are the night's event log (DESIGN §3.8): complete, one object per
event, safe to grep and to load. The console shows only what a person watching
wants, printed through the rich console so it does not tear the live status line.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

import structlog
from rich.console import Console

from runner.core.errors import os_error_sentence

_CONSOLE_KEYS_HIDDEN = ("timestamp", "level", "event", "logger")


class _Tee:
    """The last processor: writes the event to the JSON file and the console, then drops it.

    Logging never raises: when the file cannot take an event (a full disk), the console
    says so once and keeps the events; whatever made the write fail stops the night elsewhere.
    """

    def __init__(self, jsonl: TextIO, console: Console, console_level: int) -> None:
        self._jsonl = jsonl
        self._console = console
        self._console_level = console_level
        self._lock = threading.Lock()
        self._failed = False

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> Any:
        line = json.dumps(event, default=str, sort_keys=False)
        with self._lock:
            try:
                self._jsonl.write(line + "\n")
                self._jsonl.flush()
            except OSError as exc:
                if not self._failed:
                    self._failed = True
                    self._console.print(f"events can no longer be written to {self._jsonl.name}: "
                                        f"{os_error_sentence(exc)}", markup=False, highlight=False)
        if logging.getLevelName(event.get("level", "info").upper()) >= self._console_level:
            self._console.print(_concise(event), markup=False, highlight=False, soft_wrap=True)
        raise structlog.DropEvent


def _concise(event: dict[str, Any]) -> str:
    time = str(event.get("timestamp", ""))[11:19]
    level = event.get("level", "info")
    mark = "" if level == "info" else f"{level.upper()} "
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in _CONSOLE_KEYS_HIDDEN)
    return f"{time} {mark}{event.get('event', '')} {details}".rstrip()


@contextmanager
def _closing_quietly(file: TextIO) -> Iterator[TextIO]:
    """The file, closed at the end even when its last buffered write no longer fits on the disk."""
    try:
        yield file
    finally:
        try:
            file.close()
        except OSError:
            pass


@contextmanager
def night_log(jsonl_path: Path, console: Console, console_level: str = "info") -> Iterator[None]:
    """Within the block, all structlog events go to `jsonl_path` and the concise ones to `console`."""
    jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    with _closing_quietly(open(jsonl_path, "a", encoding="utf-8")) as jsonl:
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                _Tee(jsonl, console, logging.getLevelName(console_level.upper())),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=structlog.ReturnLoggerFactory(),
            cache_logger_on_first_use=False,
        )
        try:
            yield
        finally:
            structlog.reset_defaults()
