"""Errors a user can cause or fix, each said in one sentence, never as a traceback.

Every such error derives from `UserError`, and every problem of the machine from
`MachineError` (both in common.errors, so the sandbox's and the data builder's errors are of the same kinds).
Every command runs under `user_errors`, which catches the base once. A night asks
`machine_problem` to tell a problem of the machine it runs on (a full disk, a read-only
directory, a ledger another process holds, a sandbox that went away) from a failure of
one experiment: the first stops the night until the user fixes it, the second is
recorded and the night goes on.
"""

from __future__ import annotations

import errno
import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from common.errors import MachineError, UserError

# Below this much free space under the runs directory no run starts, and one that failed is put down to the disk.
LOW_SPACE_BYTES = 64 * 2**20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_MACHINE_ERRNOS = (*_DISK_FULL, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class InputError(UserError):
    """A file given to a command cannot be used as it is (not text, too large, unreadable)."""


def os_error_sentence(exc: OSError) -> str:
    """An OSError as a sentence that names the path (when the error knows it)."""
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in _DISK_FULL:
        return f"no space is left on the disk{' holding' + where if where else ''}."
    if exc.errno == errno.EROFS:
        return f"{where.strip() or 'a file'} is on a read-only file system."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied for{where or ' a file'}."
    if exc.errno == errno.ENOENT:
        return f"{where.strip() or 'a file'} does not exist."
    reason = (exc.strerror or type(exc).__name__).rstrip(".")
    return f"{reason}{':' + where if where else ''}."


def sentence(exc: BaseException) -> str | None:
    """The one sentence for an error the user can cause or fix; None for anything else (a bug)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_sentence(exc)
    return None


def machine_problem(exc: BaseException) -> str | None:
    """The sentence for a problem of the machine that no experiment caused (None: it is not one)."""
    if isinstance(exc, MachineError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _MACHINE_ERRNOS:
        return os_error_sentence(exc)
    return None


def low_on_space(path: Path) -> bool:
    """Whether the disk holding `path` has less than LOW_SPACE_BYTES free (False when it cannot tell)."""
    try:
        return shutil.disk_usage(path).free < LOW_SPACE_BYTES
    except OSError:
        return False


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a click command so that an error the user can cause or fix ends in one line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            said = sentence(exc)
            if said is None:
                raise
            raise click.ClickException(said) from None

    return wrapper
