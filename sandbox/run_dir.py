"""One experiment's directory on the host (`runs/<tag>/<exp_id>`): the one place that names a run's files.

The runner writes the train.py it ran there; the sandbox writes each phase's log and phase 1's
`out/` (contract.py names what the harness leaves in it); a cluster node streams the same files
back; `show`, `report` and `rerun` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import contract
from sandbox.spec import Phase

LOG_FILES = tuple(f"{phase.value}.log" for phase in Phase)  # train.log, eval.log
OUT = "out"  # phase 1's /out


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def train_py(self) -> Path:
        return self.path / "train.py"

    @property
    def diff(self) -> Path:
        return self.path / "diff.patch"

    def log(self, phase: Phase) -> Path:
        return self.path / f"{phase.value}.log"

    @property
    def out(self) -> Path:
        return self.path / OUT

    @property
    def model(self) -> Path:
        return self.out / contract.MODEL_FILE

    @property
    def trace(self) -> Path:
        return self.out / contract.TRACE_FILE

    @property
    def report(self) -> Path:
        return self.out / contract.REPORT_FILE
