"""Removing the images of experiments a night will never run again (`--prune-images`, the default).

What goes: the image of an experiment that was discarded or failed (a failed experiment has
no result to rerun). What stays, because a rerun, `verify` or the night itself may still
run from it: the baseline's, every kept change's (pending review or not), those of
experiments not decided yet or still owed, and any image a row still running needs.
Identical train.py files share one image, also across nights, so an image goes only when
no row of any night under the same runs directory needs it (while one of their ledgers
cannot be read, nothing is pruned). Removing is idempotent: a resumed night first prunes
what a killed invocation left.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from runner.core.decision import DISCARD
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, REFERENCE
from sandbox.status import Status

log = structlog.get_logger(__name__)


class ImageStore(Protocol):
    """Where a night's images are: its backend here, or the nodes of its cluster (runner.night.cluster.NodeImages)."""

    def image_exists(self, image: str) -> bool: ...

    def remove_image(self, image: str) -> None: ...


@dataclass(frozen=True)
class _Row:
    id: str
    kind: str
    status: Status
    decision: str | None
    target_id: str | None
    image: str | None


def _rows(ledger_path: Path) -> list[_Row]:
    """The rows of a ledger, read only (another night's ledger may be in use, or of another version)."""
    with closing(sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)) as db:
        found = db.execute("SELECT id, kind, status, decision, target_id, image FROM experiments").fetchall()
    return [_Row(id_, kind, Status(status), *rest) for id_, kind, status, *rest in found]


def _settled(rows: list[_Row]) -> set[str]:
    """Experiments that will never run again: discarded, or failed."""
    return {r.id for r in rows if r.kind == EXPERIMENT and (r.decision == DISCARD or r.status.is_failure())}


def _needed(rows: list[_Row]) -> set[str]:
    """Images some row of one night may still run from."""
    settled = _settled(rows)

    def needs(row: _Row) -> bool:
        if row.status.is_unfinished() or row.kind == BASELINE:
            return True
        if row.kind == EXPERIMENT:
            return row.id not in settled
        # a confirmation or a reference run of an undecided candidate may run again; a finished rerun needs nothing
        return row.kind in (CONFIRM, REFERENCE) and row.target_id not in settled

    return {r.image for r in rows if r.image and needs(r)}


def prune_images(backend: ImageStore, ledger_path: Path) -> list[str]:
    """Remove the images of the night's settled experiments that no night under its runs directory needs."""
    own = _rows(ledger_path)
    settled = _settled(own)
    candidates = {r.image for r in own if r.id in settled and r.image}
    if not candidates:
        return []
    needed: set[str] = set()
    for path in sorted(ledger_path.parent.parent.glob(f"*/{ledger_path.name}")):
        try:
            needed |= _needed(own if path == ledger_path else _rows(path))
        except (sqlite3.Error, ValueError) as error:  # what it needs cannot be told: prune nothing rather than too much
            log.warning("images.prune_skipped", unreadable_ledger=str(path), error=str(error))
            return []
    removed = []
    for image in sorted(candidates - needed):
        try:
            if not backend.image_exists(image):
                continue
            backend.remove_image(image)
        except Exception as error:  # in use (a rerun), or the engine is busy: the next prune tries again
            log.warning("images.prune_failed", image=image, error=str(error))
            continue
        removed.append(image)
    if removed:
        log.info("images.pruned", images=removed)
    return removed
