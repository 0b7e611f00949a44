"""An experiment's record: its ledger row plus its directory `runs/<tag>/<exp_id>/`.

The directory holds what a person (or a rerun) needs besides the row: the exact
train.py, the diff, and the logs and `out/` the sandbox writes there.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import structlog

from runner.agents.hyperparameters import hyperparameters
from runner.core.ledger import Experiment, Ledger
from sandbox.run_dir import RunDir

log = structlog.get_logger(__name__)

# CPython 3.11's ast module is not thread-safe (parallel ast.parse can fail with
# "AST constructor recursion depth mismatch"), and the state is process-wide, so
# every parse of a train.py by the runner's threads (diff validation, agents,
# hyperparameters) happens under this one lock.
PARSE_LOCK = threading.RLock()


class Records:
    def __init__(self, ledger: Ledger, run_dir: Path, profile: str) -> None:
        self.ledger = ledger
        self.run_dir = run_dir
        self.profile = profile  # whose hyperparameter values are recorded ("gpu" or "cpu")
        self.night_id: int | None = None  # stamped on new rows

    def add(self, *, kind: str, status: str, train_py: str | None, **fields) -> Experiment:
        """A new ledger row, with its directory holding train.py and the diff."""
        if train_py is not None:
            fields.update(train_sha256=hashlib.sha256(train_py.encode()).hexdigest(),
                          params_json=json.dumps(self.params(train_py)))
        row = self.ledger.add(kind=kind, status=status, night_id=self.night_id, **fields)
        files = RunDir(self.dir(row.id))
        files.path.mkdir(parents=True, exist_ok=True)
        if train_py is not None:
            files.train_py.write_text(train_py, encoding="utf-8")
        if row.diff:
            files.diff.write_text(row.diff, encoding="utf-8")
        log.info("experiment.added", exp=row.id, kind=kind, status=status, parent=row.parent_id,
                 description=row.description, reason=row.reject_reason)
        return row

    def dir(self, exp_id: str) -> Path:
        return self.run_dir / exp_id

    def train_py(self, row: Experiment) -> str:
        return RunDir(self.dir(row.id)).train_py.read_text(encoding="utf-8")

    def params(self, train_py: str) -> dict:
        """Its hyperparameter constants, shown to agents and never decisive: none when the file does not
        parse, or defeats the parser or a tree walker (the baseline's train.py was never validated)."""
        try:
            with PARSE_LOCK:
                return hyperparameters(train_py, self.profile)
        except SyntaxError:
            return {}
        except Exception as exc:
            log.warning("params.unreadable", error=f"{type(exc).__name__}: {exc}")
            return {}
