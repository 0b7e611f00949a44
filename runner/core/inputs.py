"""The text files a user hands to the runner: UTF-8, and no larger than what they are for.

Every command reads such a file through `read_text`, so a binary file, a file in
another encoding, a huge one, or something that is no file at all (a FIFO, a device
such as /dev/zero, a directory) ends in one sentence (an `InputError`) before it is
used, and never fills memory or waits for a writer. The caps are here, in one place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runner.core.errors import InputError, os_error_sentence

MAX_DIFF_BYTES = 64_000  # a diff: one proposal's change to train.py
MAX_TRAIN_PY_BYTES = 2**20  # train.py (and prepare.py): a training script, not a data file
MAX_PROGRAM_BYTES = 256 * 2**10  # program.md: the research directions, sent to the agent with every proposal
MAX_AGENT_REPLY_BYTES = 2**20  # what an agent command prints: a proposal (one diff) and some chatter around it


def read_text(path: Path, what: str, max_bytes: int) -> str:
    """The UTF-8 text of `path` (`what` names it for the user); InputError when it cannot serve as one."""
    try:
        # Non-blocking, so that opening a FIFO does not wait for a writer; only a regular file is then read.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise InputError(f"{what} {path} is {_kind(mode)}, not a regular file; give the path of a file.")
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what}: {os_error_sentence(exc)}") from None
    if len(data) > max_bytes:
        raise InputError(f"{what} {path} is larger than {max_bytes:,} bytes, the most it may be; make it smaller.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                         "save it as UTF-8.") from None


def _kind(mode: int) -> str:
    """What a path that can be opened but is no regular file is, for the sentence."""
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device"
