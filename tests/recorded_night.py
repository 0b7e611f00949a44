"""A night recorded by the real loop over the fake sandbox, and the morning CLI run against it.

Every morning test (list, show, status, report, review, rerun, verify) reads the same
scripted night (NIGHT_SCRIPT); the `night` fixture of conftest.py records it.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import click
from click.testing import CliRunner

from runner.core import decision
from runner.core.ledger import EXPERIMENT, Ledger
from runner.morning.commands import register
from tests.doubles import SEED_NOISE, RealisticBackend, ScriptedAgent, change, garbage, make_night

# The night every morning test reads (after four baseline runs, seeds default, 1, 2, 3): two
# keeps (the second builds on the first), an unproven discard, a crash, a rejected proposal,
# an export failure and a nondeterministic discard. `night.ids` names the experiment rows.
NIGHT_SCRIPT = (
    change(LR=0.2),  # first: kept after 2 runs, 0.8 and 0.801
    change(LR=0.2, LUCK=0.002),  # unproven: better than the first on the default seed only: discarded after 4 runs
    change(BEHAVIOUR="crash"),  # crash
    garbage,  # rejected
    change(LR=0.3),  # best: kept after 2 runs, 0.7 and 0.701, child of the first
    change(BEHAVIOUR="no_export"),  # no_export: export_failed
    change(LR=0.25, BEHAVIOUR="noisy"),  # noisy: discarded after 1 run (worse), never the same twice
)
NAMES = ("first", "unproven", "crash", "rejected", "best", "no_export", "noisy")
BASELINES = [0.9 + SEED_NOISE[seed] for seed in (None, "1", "2", "3")]
NOISE = decision.pooled_noise([BASELINES])  # at the start of the experiments: σ 0.000854, df 3


def cli() -> click.Group:
    @click.group()
    def autoresearch() -> None:
        """autoresearch (the morning commands)."""

    register(autoresearch)
    return autoresearch


def record_night(root, script=NIGHT_SCRIPT, backend=None, **settings):
    """Run the real loop over `script` in project `root`; returns where it wrote and the backend holding its images."""
    backend = backend or RealisticBackend()
    # --keep-images: the morning tests rerun discarded experiments too
    night, ledger = make_night(root, ScriptedAgent(*script), backend,
                               **{"max_experiments": len(script), "max_diff_retries": 1, "prune_images": False,
                                  **settings})
    try:
        night.run()
        experiments = [r.id for r in ledger.experiments(kinds=[EXPERIMENT])]  # in the script's order
    finally:
        ledger.close()
    runs = root.parent / "runs"
    return types.SimpleNamespace(project=root, runs=runs, run_dir=runs / "t", data=night.data.path,
                                 data_hash=night.data.manifest_hash, backend=backend, experiments=experiments)


def invoke(runs: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(cli(), [*args, "--runs-dir", str(runs)], input=input)


def flat(output: str) -> str:
    """Rich output as one line of words: panel borders gone, wrapped lines joined."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def one_line_error(result) -> str:
    """The output of a command that failed as a user error: exit 1, one line, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def rows_of(recorded):
    ledger = Ledger(recorded.run_dir / "ledger.sqlite")
    try:
        return ledger.experiments()
    finally:
        ledger.close()


