"""A full night in miniature: the real sandbox, real CPU training, a real kill -9 and resume.

The baseline train.py is handicapped (all learning rates 0: it cannot learn), so
restoring the learning rates is a change that must be kept whatever the noise.
The agent is scripted first (a crash-inducing diff, an invalid diff, the good
change), then the offline search agent takes over. A second night under the same
tag is killed with SIGKILL while an experiment trains; a third resumes it.
"""

from __future__ import annotations

import difflib
import json
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.agents.base import Proposal
from runner.agents.config import SearchConfig
from runner.agents.search_agent import SearchAgent
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, REFERENCE, Ledger
from runner.core.settings import Settings, Source
from runner.night.loop import Night
from runner.night.overnight import ensure_data

pytestmark = [pytest.mark.slow, pytest.mark.docker]

ROOT = Path(__file__).resolve().parent.parent
TAG = "mini"
BUDGET_S = 5.0
LEARNING_RATES = ("MATRIX_LR", "EMBEDDING_LR", "UNEMBEDDING_LR")
AUTORESEARCH = Path(sys.executable).parent / "autoresearch"
KILL_WAIT_S = 600  # bound on waiting for the second night to start training
HONEST_ENDS = ("done", "crash", "timeout", "oom", "export_failed", "over_budget")  # of a change nobody has run


def _set(train_py: str, **constants: str) -> str:
    for name, value in constants.items():
        train_py, count = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value} ", train_py, count=1, flags=re.MULTILINE)
        assert count == 1, f"train.py has no constant {name}"
    return train_py


def _diff(old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py"))


class ScriptedThenSearch:
    """Scripted proposals first, then the offline search agent."""

    name = "scripted+search"

    def __init__(self, steps, search: SearchAgent) -> None:
        self.steps = list(steps)
        self.search = search

    def propose(self, context):
        if not self.steps:
            return self.search.propose(context)
        return self.steps.pop(0)(context)


def crash(context):
    new = context.train_py.replace("\nGPU = ", '\nraise SystemExit("induced crash")\nGPU = ', 1)
    return Proposal("crash on purpose", _diff(context.train_py, new))


def invalid(context):
    return Proposal("a diff against a file that does not exist", "--- a/model.py\n+++ b/model.py\n@@ -1 +1 @@\n-a\n+b\n")


def restore_learning_rates(context):
    original = (ROOT / "train.py").read_text()
    values = {name: re.search(rf"^{name} = ([^#\n]*)", original, re.MULTILINE).group(1).strip() for name in LEARNING_RATES}
    return Proposal("restore the learning rates", _diff(context.train_py, _set(context.train_py, **values)))


@pytest.fixture
def project(tmp_path, tiny_cache, monkeypatch):
    """A project directory whose train.py cannot learn, and the tiny data set as the local source."""
    monkeypatch.setenv("AR_CACHE", str(tiny_cache))
    root = tmp_path / "project"
    root.mkdir()
    (root / "prepare.py").write_text((ROOT / "prepare.py").read_text())
    (root / "program.md").write_text((ROOT / "program.md").read_text())
    (root / "train.py").write_text(_set((ROOT / "train.py").read_text(), **{name: "0.0" for name in LEARNING_RATES}))
    return root


def _night_cli(*extra: str) -> list[str]:
    return [str(AUTORESEARCH), "overnight", "--tag", TAG, "--agent", "search", "--sandbox", "auto", "--gpus", "none",
            "--budget", str(BUDGET_S), "--source", "local", "--baseline-runs", "2", *extra]


def _in_training(db_path: Path, after: str) -> str | None:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT id FROM experiments WHERE kind='experiment' AND id > ? AND status='training'",
                         (after,)).fetchone()
    return row[0] if row else None


def test_a_night_in_miniature(project, docker_client, tmp_path):
    from sandbox.backends import get_backend

    # -- night 1: scripted problems and a good change, then the search agent
    settings = Settings(root=project, tag=TAG, budget=BUDGET_S, source=Source("local"), baseline_runs=2,
                        max_experiments=4, max_diff_retries=2, gpus="none")
    backend = get_backend("auto")
    backend.ensure_ready()
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    search = SearchAgent(SearchConfig(profile="cpu"))
    agent = ScriptedThenSearch([crash, invalid, invalid, restore_learning_rates], search)
    night = Night(settings, ledger=ledger, backend=backend, agent=agent, gpus=[], data=ensure_data(settings))
    assert night.run() == "max-experiments"

    baseline = ledger.experiments(kinds=[BASELINE])
    # two counted baselines, on the first two seeds; a run disturbed by other load was replaced on its seed
    assert [(r.status, r.seed) for r in baseline if r.counts] == [("done", None), ("done", 1)]
    assert all(r.disturbed for r in baseline if not r.counts)
    for row in baseline:
        assert row.val_bpb_text == f"{row.val_bpb:.6f}" and float.fromhex(row.val_bpb_hex) == row.val_bpb
        assert row.image and row.isolation and row.data_hash == night.data.manifest_hash
        assert (settings.run_dir / row.id / "eval.log").exists() and (settings.run_dir / row.id / "out").is_dir()
    crashed, rejected, good, searched = ledger.experiments(kinds=[EXPERIMENT])
    assert (crashed.status, crashed.decision, crashed.train_exit_code) == ("crash", None, 1)
    assert "induced crash" in crashed.log_tail
    assert (rejected.status, rejected.attempts, rejected.image) == ("rejected", 2, None)
    assert "train.py" in rejected.reject_reason
    assert (good.status, good.decision, good.review_state) == ("done", "keep", "pending")
    assert good.val_bpb < baseline[0].val_bpb
    # kept against the baseline run again beside it, on its seeds (the machine may have changed since dusk)
    references = ledger.references_of(good.id)
    assert [r.seed for r in references if r.counts] == [r.seed for r in [good, *ledger.confirmations_of(good.id)]
                                                        if r.counts]
    assert good.best_before == pytest.approx(statistics.fmean(r.val_bpb for r in references if r.counts))
    assert good.num_steps and good.training_seconds and good.total_seconds and good.metrics["val_bpb"] == good.val_bpb
    assert searched.parent_id in (baseline[0].id, good.id) and searched.agent == "scripted+search"
    # the search agent's change is untested: any recorded end will do. over_budget too: at this 5 s budget the
    # slack for a larger model's export (5 % of the budget's compute, sandbox.budget_guard) is half a CPU second
    assert searched.status in HONEST_ENDS and searched.diff
    if searched.status == "done":
        assert searched.decision in ("keep", "discard")
    (record,) = ledger.nights()
    assert record.sigma is not None and record.threshold >= 0.001 and record.stop_reason == "max-experiments"
    assert ledger.unfinished() == []
    ledger.close()
    last = searched.id

    # -- night 2: killed with SIGKILL while an experiment trains (limits are the night's totals: one more)
    output = tmp_path / "night2.log"
    with output.open("w") as out:
        process = subprocess.Popen(_night_cli("--max-experiments", "5"), cwd=project, stdout=out, stderr=out)
    killed = None
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            killed = _in_training(settings.run_dir / "ledger.sqlite", last)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert killed is not None, "the second night never started training:\n" + output.read_text()[-3000:]

    # -- night 3: same tag; the killed experiment runs again, exactly once, and one new one
    done = subprocess.run(_night_cli("--max-experiments", "6"), cwd=project, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    rows = ledger.experiments()
    assert [r.id for r in rows if r.kind == BASELINE] == [r.id for r in baseline]  # not measured again
    assert ledger.unfinished() == []
    resumed = ledger.get(killed)
    assert resumed.status in HONEST_ENDS
    assert resumed.decision in (("keep", "discard") if resumed.status == "done" else (None,))
    newer = [r for r in rows if r.id > killed]
    (added,) = [r for r in newer if r.kind == EXPERIMENT]  # one new proposal: the night's sixth
    assert added.status != "proposed"
    # besides it, only the runs the keep rule asked for: confirmations of the killed experiment or of the new one,
    # or reference runs of the best beside one of them
    assert all(r.kind in (CONFIRM, REFERENCE) and r.target_id in (killed, added.id) for r in newer if r is not added)
    events = [json.loads(line) for line in (settings.run_dir / "events.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "experiment.finished" and e.get("exp") == killed]
    assert len(finished) == 1  # night 2 died before the end, night 3 ran it once
    assert [n.stop_reason for n in ledger.nights()] == ["max-experiments", None, "max-experiments"]
    assert docker_client.containers.list(all=True, filters={"label": f"autoresearch.exp={killed}"}) == []
    ledger.close()
