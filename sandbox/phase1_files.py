"""Reading what phase 1 left in /out: train.py's process wrote it, so a file there may be a link to a
host file, a FIFO that never ends, or anything at all; only a bounded regular file is read, and the
budget trace only as the harness writes it (contract.parse_trace)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import contract


def read_phase1_file(path: Path, limit: int) -> str | None:
    """A file phase 1 left in /out, as text, or None when it is missing, not a regular file (a link could
    point at a host file, a FIFO would never end), larger than `limit` or not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = f.read(limit + 1)
    try:
        return data.decode("utf-8") if len(data) <= limit else None
    except UnicodeDecodeError:
        return None


def read_trace(path: Path) -> contract.Trace:
    """Phase 1's budget trace, parsed strictly (contract.parse_trace); raises TraceError saying why not."""
    text = read_phase1_file(path, contract.MAX_TRACE_BYTES)
    if text is None:
        raise contract.TraceError("it is missing, not a regular file, not UTF-8 or larger than "
                                  f"{contract.MAX_TRACE_BYTES} bytes")
    return contract.parse_trace(text)
