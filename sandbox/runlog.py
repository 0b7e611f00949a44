"""What both backends do with a run's output: a log of lines, written as they come, and its tail."""

from __future__ import annotations

import codecs
import re
import threading
from collections import deque
from pathlib import Path
from typing import Callable

LOG_TAIL_LINES = 40
MAX_LOG_BYTES = 64 * 2**20  # a run that prints more is cut there on disk; its tail is still kept
_NEWLINE = re.compile(r"\r\n|\r|\n")


class LineLog:
    """A byte stream written to a file as lines split on `\\n` and `\\r`, each flushed.

    Progress bars redraw with `\\r`: splitting on it makes every redraw a line that can
    be tailed live. The file is cut at `max_bytes`; the last lines are always kept.
    """

    def __init__(self, path: Path, max_bytes: int = MAX_LOG_BYTES, tail_lines: int = LOG_TAIL_LINES,
                 on_line: Callable[[str], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", encoding="utf-8")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._written = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # the stream and the sandbox's notes come from different threads
        self._on_line = on_line  # sees every line of the run as it arrives (not the sandbox's notes)
        self.tail: deque[str] = deque(maxlen=tail_lines)

    def feed(self, chunk: bytes) -> None:
        text = self._pending + self._decoder.decode(chunk)
        held = "\r" if text.endswith("\r") else ""  # maybe the first half of "\r\n"
        *lines, rest = _NEWLINE.split(text[: len(text) - len(held)])
        self._pending = rest + held
        for line in lines:
            if self._on_line is not None:
                self._on_line(line)
            self._write(line)

    def close(self) -> None:
        """Write what is left of the last line and close the file (again: nothing)."""
        if self._file.closed:
            return
        rest = (self._pending + self._decoder.decode(b"", final=True)).rstrip("\r")
        if rest:
            self._write(rest)
        self._file.close()

    def note(self, line: str) -> None:
        """A line from the sandbox itself (why a run was stopped, an engine error)."""
        self._write(f"[sandbox] {line}")

    def _write(self, line: str) -> None:
        with self._lock:
            self.tail.append(line)
            if self._written > self._max_bytes:
                return
            self._written += len(line) + 1
            self._file.write(line + "\n" if self._written <= self._max_bytes else f"[log cut at {self._max_bytes} bytes]\n")
            self._file.flush()


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log text (lines split on `\\n` and `\\r`, as LineLog writes them)."""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])
