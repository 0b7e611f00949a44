"""The morning review: kept changes, best first, accepted into train.py or rejected.

A kept change is a diff against its parent's train.py, and parents chain back to
the baseline. Accepting one applies it to the working tree's train.py exactly
(no fuzz, the night's own validator); when train.py still holds an ancestor of
the change, the kept changes in between come along, so the best change of a
chain can be accepted first. Inside a git work tree only train.py is committed,
with a message that carries the description and the numbers.

Accepting is resumable: each step is skipped when it is done already, so an accept
killed at any point (train.py written but not committed, committed but not recorded)
finishes when it is run again, with one commit and the same record as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from runner.core.decision import KEEP
from runner.core.diffs import DiffRejected, validate_and_apply
from runner.core.errors import UserError
from runner.core.figures import baseline_mean
from runner.core.inputs import MAX_TRAIN_PY_BYTES, read_text
from runner.core.ledger import (ACCEPTED, BASELINE, EXPERIMENT, PENDING, REJECTED, Experiment, Ledger, describe,
                           outcome_phrase)

log = structlog.get_logger(__name__)


class ReviewError(UserError):
    """A review step that cannot be done as asked (one sentence for the user)."""


class Conflict(ReviewError):
    """The change does not apply to train.py as it is now."""


def credited(row: Experiment, baseline: float | None) -> float | None:
    """The value a row stands for: the baseline mean, a keep's decided value, else its val_bpb."""
    if row.kind == BASELINE and baseline is not None:
        return baseline
    return row.decision_value if row.decision_value is not None else row.val_bpb


def lineage(ledger: Ledger, row: Experiment) -> list[Experiment]:
    """`row`, its parent, ... up to the baseline it descends from."""
    chain, seen = [row], {row.id}
    while chain[-1].parent_id and chain[-1].parent_id not in seen:
        chain.append(ledger.get(chain[-1].parent_id))
        seen.add(chain[-1].id)
    return chain


@dataclass(frozen=True)
class Item:
    """One experiment with what it is measured against."""

    row: Experiment
    parent: Experiment | None
    value: float | None
    vs_parent: float | None  # value minus the parent's (negative is better)
    vs_baseline: float | None


def item(ledger: Ledger, row: Experiment, baseline: float | None = None) -> Item:
    baseline = baseline_mean(ledger) if baseline is None else baseline
    parent = ledger.get(row.parent_id) if row.parent_id else None
    value = credited(row, baseline)
    parent_value = credited(parent, baseline) if parent else None
    return Item(
        row=row,
        parent=parent,
        value=value,
        vs_parent=value - parent_value if value is not None and parent_value is not None else None,
        vs_baseline=value - baseline if value is not None and baseline is not None else None,
    )


def queue(ledger: Ledger) -> list[Item]:
    """Kept changes still pending review, best first."""
    baseline = baseline_mean(ledger)
    rows = [r for r in ledger.experiments(kinds=[EXPERIMENT]) if r.decision == KEEP and r.review_state == PENDING]
    items = [item(ledger, r, baseline) for r in rows]
    return sorted(items, key=lambda i: (i.value if i.value is not None else float("inf"), i.row.seq))


def reviewable(ledger: Ledger, exp_id: str) -> Experiment:
    row = ledger.get(exp_id)
    if row.kind != EXPERIMENT or row.decision != KEEP:
        raise ReviewError(f"{exp_id} is {describe(row)}; only kept changes are reviewed.")
    return row


def reject(ledger: Ledger, exp_id: str, why: str) -> None:
    reviewable(ledger, exp_id)
    ledger.review(exp_id, REJECTED, why)
    log.info("review.rejected", exp=exp_id, why=why)


@dataclass(frozen=True)
class Accepted:
    exp_id: str
    applied: tuple[str, ...]  # the changes written into train.py, oldest first (empty: already there)
    commit: str | None  # the git commit, when train.py is in a work tree


def accept(ledger: Ledger, exp_id: str, train_py: Path, tag: str) -> Accepted:
    """Apply the change (and the kept ancestors train.py lacks) to `train_py`, commit it, record it."""
    row = reviewable(ledger, exp_id)
    if not train_py.is_file():
        raise ReviewError(f"there is no train.py at {train_py}; pass --train-py PATH.")
    current = read_text(train_py, "train.py", MAX_TRAIN_PY_BYTES)
    chain = _changes_missing(ledger, row, _sha256(current))
    text = current
    for change in chain:
        try:
            text = validate_and_apply(change.diff, text)
        except DiffRejected as exc:
            raise Conflict(
                f"{change.id} does not apply to {train_py}, which has changed since the night "
                f"({exc.reason.rstrip('.')}); port it by hand from `autoresearch show {change.id}`."
            ) from None
    if chain:
        _write_atomically(train_py, text)
    try:
        commit, committed = _commit(ledger, row, train_py, tag)
    except ReviewError as exc:
        _record(ledger, chain or [row], exp_id, "applied; git commit failed")
        raise ReviewError(f"{exp_id} was applied to {train_py}, but {exc}") from None
    _record(ledger, committed or chain or [row], exp_id, f"commit {commit}" if commit else "")
    log.info("review.accepted", exp=exp_id, applied=[c.id for c in chain], commit=commit)
    return Accepted(exp_id, tuple(c.id for c in chain), commit)


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file in one step: a kill leaves the old train.py or the new one, never half of one."""
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(staging, path.stat().st_mode & 0o7777)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _record(ledger: Ledger, chain: list[Experiment], exp_id: str, note: str) -> None:
    for change in chain:
        extra = f"with {exp_id}" if change.id != exp_id else ""
        ledger.review(change.id, ACCEPTED, "; ".join(part for part in (note, extra) if part))


def _changes_missing(ledger: Ledger, row: Experiment, current_sha: str) -> list[Experiment]:
    """The changes to apply, oldest first: up from `row` to the ancestor train.py holds.

    When train.py holds none of the ancestors (it moved on), only the change itself
    is tried; it may still apply when the edits do not touch the same lines.
    """
    missing = _since(ledger, row, current_sha)
    refused = [r for r in missing if r.review_state == REJECTED or r.decision != KEEP]
    if refused:
        r = refused[0]
        why = "you rejected it" if r.review_state == REJECTED else f"it {outcome_phrase(r)}"
        raise Conflict(f"{row.id} builds on {r.id}, which train.py lacks and {why}; it cannot be accepted on its own.")
    return missing


def _since(ledger: Ledger, row: Experiment, sha: str | None) -> list[Experiment]:
    """The changes from the ancestor of `row` whose train.py has hash `sha` up to `row`, oldest first
    (just `row` when no ancestor has it)."""
    chain = lineage(ledger, row)
    holds = next((i for i, r in enumerate(chain) if r.train_sha256 == sha), None)
    return [row] if holds is None else list(reversed(chain[:holds]))


def commit_message(ledger: Ledger, chain: list[Experiment], tag: str) -> str:
    """Subject: the description; body: the numbers, so `git log` tells the story."""
    baseline = baseline_mean(ledger)
    head = chain[-1]
    lines = [f"{head.description} ({head.id})", ""]
    for change in reversed(chain):
        it = item(ledger, change, baseline)
        numbers = [f"val_bpb {it.value:.6f}" if it.value is not None else "val_bpb -"]
        if it.vs_parent is not None and it.parent is not None:
            numbers.append(f"{it.vs_parent:+.6f} vs parent {it.parent.id}")
        if it.vs_baseline is not None:
            numbers.append(f"{it.vs_baseline:+.6f} vs baseline {baseline:.6f}")
        lines.append(f"{change.id}: {change.description}")
        lines.append(f"  {', '.join(numbers)}")
        lines.append(f"  image {change.image or '-'}, data manifest {change.data_hash or '-'}")
    lines.append("")
    lines.append(f"Accepted from autoresearch night {tag}.")
    return "\n".join(lines) + "\n"


def _commit(ledger: Ledger, row: Experiment, train_py: Path, tag: str) -> tuple[str | None, list[Experiment]]:
    """Commit train.py (holding `row`'s change) in its git work tree, unless a commit holds it already.

    Returns the commit and the changes it brought (None and [] outside git). The changes are
    read from git itself (the train.py before the commit), so an accept run again after a kill
    commits and records what the killed one would have.
    """
    git = _Git(train_py)
    if not git.inside():
        return None, []
    if git.changed():
        committed = _since(ledger, row, _sha256_or_none(git.show("HEAD")))
        return git.commit(commit_message(ledger, committed, tag)), committed
    commit = git.last_commit()
    return commit, _since(ledger, row, _sha256_or_none(git.show(f"{commit}^") if commit else None))


class _Git:
    """git, asked about one file in its work tree."""

    def __init__(self, path: Path) -> None:
        self.folder, self.name = path.resolve().parent, path.name

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=self.folder, capture_output=True, text=True)

    def inside(self) -> bool:
        try:
            done = self._run("rev-parse", "--is-inside-work-tree")
        except FileNotFoundError:  # no git installed: nothing to commit into
            return False
        return done.returncode == 0 and done.stdout.strip() == "true"

    def changed(self) -> bool:
        """Whether the file differs from HEAD (modified, staged or untracked)."""
        return bool(self._checked("status", "--porcelain", "--", self.name).strip())

    def show(self, revision: str) -> str | None:
        """The file as `revision` holds it (None when it has none, or there is no such revision)."""
        done = self._run("show", f"{revision}:./{self.name}")
        return done.stdout if done.returncode == 0 else None

    def last_commit(self) -> str | None:
        """The latest commit that changed the file."""
        return self._checked("log", "-1", "--format=%H", "--", self.name).strip() or None

    def commit(self, message: str) -> str:
        """Commit only this file; returns the new commit."""
        self._checked("add", "--", self.name)
        self._checked("commit", "--quiet", "--only", "-m", message, "--", self.name)
        return self._checked("rev-parse", "HEAD").strip()

    def _checked(self, *args: str) -> str:
        done = self._run(*args)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise ReviewError(f"git {args[0]} failed: {lines[-1] if lines else f'exit {done.returncode}'}.")
        return done.stdout


def _sha256_or_none(text: str | None) -> str | None:
    return None if text is None else _sha256(text)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
