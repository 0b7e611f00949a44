"""The process sandbox's "images": read-only snapshot directories of the harness files and one train.py.

A snapshot is named by the hash of its files, so the same train.py beside the same harness is
one snapshot, built once (a run of the same content made meanwhile wins the race harmlessly).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from contract import cache_dir
from sandbox.harness import HARNESS_FILES
from sandbox.spec import SandboxUnavailable

log = structlog.get_logger(__name__)


def default_snapshots_root() -> Path:
    """`<cache>/snapshots` (contract.cache_dir, the harness's own rule)."""
    return cache_dir() / "snapshots"


def snapshot_id(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):  # length-prefixed: no two sets of files hash alike
        for part in (name.encode(), files[name]):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def _make_writable_tree(path: Path) -> None:
    for folder, _, _ in os.walk(path):
        os.chmod(folder, 0o755)


class SnapshotStore:
    """The snapshots under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def writes(self) -> Iterator[None]:
        """A cache that cannot be written (read-only, full) is a sandbox that cannot work, said in one sentence."""
        try:
            yield
        except OSError as error:
            raise SandboxUnavailable(f"the process sandbox cannot write its snapshots under {self.root} "
                                     f"({error.strerror or error}); AR_CACHE must be a writable directory.") from error

    def build(self, files: dict[str, bytes], exp_id: str) -> str:
        """The snapshot of `files` (made now if it does not exist yet)."""
        path = self.root / snapshot_id(files)
        if not self.exists(str(path)):
            with self.writes():
                self.root.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
                for name, content in files.items():
                    (staging / name).write_bytes(content)
                    (staging / name).chmod(0o444)
                staging.chmod(0o555)
            try:
                staging.rename(path)
            except OSError:  # made meanwhile by another run of the same content
                _make_writable_tree(staging)
                shutil.rmtree(staging)
        log.info("process_backend.snapshot", exp_id=exp_id, image=str(path))
        return str(path)

    def exists(self, image: str) -> bool:
        path = Path(image)
        return path.parent == self.root and all((path / name).is_file() for name in (*HARNESS_FILES, "train.py"))

    def remove(self, image: str) -> None:
        path = Path(image)
        if path.parent == self.root and path.is_dir():
            _make_writable_tree(path)
            shutil.rmtree(path)
