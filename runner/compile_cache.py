"""Which earlier run's compile cache a run may start from, so that torch.compile is not cold every time.

Phase 1 leaves the kernels it compiled or loaded (torch's portable compile cache) in its
/out; the host moves that file into the run's directory (sandbox.experiment) and may later
mount it read-only into another run's phase 1. No cache is ever shared for writing, and a
run reads only what was written by:
  1. a run of its own train.py (the experiment it reruns first, then the newest of the
     others: baseline repeats, confirmation and reference runs), or
  2. its kept ancestors, nearest first (most children change constants only, so the
     compiled graph is the parent's),
on the same backend and GPU model. torch checks every entry against the graph,
its own and Triton's versions and the device, so a stale entry is a miss, never a wrong
kernel; what a cache can carry from one run to the next is therefore limited to code that
the reading run's own lineage ran.
"""

from __future__ import annotations

from pathlib import Path

import structlog

import contract
from runner.ledger import BASELINE, Experiment, Ledger
from sandbox.status import Status

log = structlog.get_logger(__name__)


def _same_machine(a: Experiment, b: Experiment) -> bool:
    return (a.backend, a.gpu_name) == (b.backend, b.gpu_name)


def kept_ancestors(ledger: Ledger, row: Experiment) -> list[Experiment]:
    """The row's parent chain while it runs through kept experiments and the baseline, nearest first."""
    chain, parent_id = [], row.parent_id
    while parent_id and len(chain) < 10_000:
        parent = ledger.get(parent_id)
        if parent.decision != "keep" and parent.kind != BASELINE:
            break
        chain.append(parent)
        parent_id = parent.parent_id
    return chain


def compile_cache_for(ledger: Ledger, run_dir: Path, row: Experiment) -> tuple[str, Path] | None:
    """(id of the run that wrote it, path) of the cache `row` may start from, or None: compile cold."""
    done = [r for r in ledger.experiments(statuses=[Status.DONE]) if r.id != row.id and _same_machine(r, row)]
    done.sort(key=lambda r: r.seq, reverse=True)
    first = [r for r in done if r.id == row.target_id]  # a rerun starts from what its original used
    candidates = first + [r for r in done if r.train_sha256 == row.train_sha256]
    for ancestor in kept_ancestors(ledger, row):
        candidates += [r for r in done if r.train_sha256 == ancestor.train_sha256]
    for candidate in candidates:
        path = run_dir / candidate.id / contract.COMPILE_CACHE_FILE
        if candidate.train_sha256 and path.is_file():
            return candidate.id, path
    return None


def start_from(ledger: Ledger, run_dir: Path, row: Experiment) -> Path | None:
    """The cache file `row`'s phase 1 is given (logged with the run that wrote it), or None."""
    found = compile_cache_for(ledger, run_dir, row)
    log.info("experiment.compile_cache", exp=row.id, start_from=found[0] if found else None)
    return found[1] if found else None
