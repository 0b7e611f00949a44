"""The morning commands on nights recorded by the real loop (fake sandbox: no training, fast).

The sandbox is the loop tests' fake, extended to write what the real one writes:
a train.log of steps, the budget trace, an "exported model", and a phase-2 log
ending in the harness's full summary block. `BEHAVIOUR` in the stand-in train.py
picks how a run ends (see `RealisticBackend`).
"""

from __future__ import annotations

import hashlib
import json
import random
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import contract

from runner import report
from runner.ledger import Ledger
from runner.loop import NightError
from runner.morning import COMMANDS, register
from sandbox.spec import Killer, Phase, Status
from tests.test_loop import (SEED_NOISE, FakeBackend, ScriptedAgent, change, fake_result_line, garbage,  # noqa: F401
                             make_night, project)

TRAINING_SECONDS = 1.0


class RealisticBackend(FakeBackend):
    """BEHAVIOUR: "train" (deterministic), "noisy" (another model and val_bpb every run), "crash",
    "timeout", "no_export" (phase 1 writes no model), "probe" (phase 2 finds the model looks ahead)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.specs = []

    def _behave(self, spec, cancel):
        self.specs.append(spec)
        constants: dict = {}
        exec(self.images[spec.image], constants)
        behaviour = constants["BEHAVIOUR"]
        if behaviour == "hang":
            return super()._behave(spec, cancel)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.phase is Phase.TRAIN:
            return self._train(spec, behaviour)
        return self._evaluate(spec, constants)

    def _train(self, spec, behaviour):
        out = spec.out_dir
        replay = out / "replay_trace.json"
        steps = json.loads(replay.read_text())["num_steps"] if replay.exists() else 20
        if behaviour == "noisy" and not replay.exists():
            steps += random.randint(0, 3)
        lines = [f"step {n:05d} | loss {6.0 - n * 0.1:.4f} | lr 0.04" for n in range(1, steps + 1)]
        if behaviour == "crash":
            text = "\n".join(lines[:3] + ["Traceback (most recent call last):", '  File "/app/train.py", line 80',
                                          "RuntimeError: shape mismatch in attention"]) + "\n"
            spec.log_path.write_text(text)
            return self._result(spec, Status.CRASH, 1, log_tail=text)
        if behaviour == "timeout":
            spec.log_path.write_text("\n".join(lines) + "\n[runner] deadline reached, killed\n")
            return self._result(spec, Status.TIMEOUT, 137, killed_by=Killer.DEADLINE, log_tail=lines[-1])
        spec.log_path.write_text("\n".join(lines) + "\nexported model to /out/model.pt2 in 0.1s\n")
        trace = {"time_budget": float(spec.env["AR_TIME_BUDGET"]), "warmup_steps": 3, "num_steps": steps,
                 "progress": [min(1.0, n / steps) for n in range(steps)],
                 "step_seconds": [0.0] * 3 + [TRAINING_SECONDS / 16] * 16 + [0.0] * (steps - 19)}  # 16 timed steps
        (out / "trace.json").write_text(json.dumps(trace))
        (out / "summary.json").write_text(json.dumps({"training_seconds": TRAINING_SECONDS, "num_steps": steps,
                                                      "mfu_percent": 0.0, "total_tokens_M": 0.04, "depth": 2}))
        if behaviour != "no_export":
            weights = self.images[spec.image] + spec.env.get("AR_SEED", "") + str(steps)
            if behaviour == "noisy":
                weights += str(random.random())
            (out / "model.pt2").write_bytes(hashlib.sha256(weights.encode()).digest() * 64)
        return self._result(spec, Status.OK, 0)

    def _evaluate(self, spec, constants):
        if constants["BEHAVIOUR"] == "probe":
            text = "error: causality probe failed: changing tokens after position 0 changed earlier logits\n"
            spec.log_path.write_text(text)
            return self._result(spec, Status.CRASH, 4, log_tail=text)
        seed = spec.env.get("AR_SEED")
        value = 1.0 - constants["LR"] - (constants["LUCK"] if seed is None else 0.0) + SEED_NOISE[seed]
        if constants["BEHAVIOUR"] == "noisy":
            value += random.uniform(-0.01, 0.01)
        line = fake_result_line(spec.env[contract.RESULT_NONCE_ENV], value)
        spec.log_path.write_text(f"loading the exported model\nevaluating 32768 tokens\n{line}\n")
        return self._result(spec, Status.OK, 0)


# The night every morning test reads: two keeps (the second builds on the first), a
# discard, a crash, a rejected proposal, an export failure and a nondeterministic discard.
NIGHT_SCRIPT = (
    change(LR=0.2),  # e0004 keep, 0.8
    change(LR=0.201),  # e0005 discard: better, but not by the threshold
    change(BEHAVIOUR="crash"),  # e0006 crash
    garbage,  # e0007 rejected
    change(LR=0.3),  # e0008 keep, 0.7, child of e0004
    change(BEHAVIOUR="no_export"),  # e0009 export_failed
    change(LR=0.25, BEHAVIOUR="noisy"),  # e0010 discard, never the same twice
)


def cli() -> click.Group:
    @click.group()
    def autoresearch() -> None:
        """autoresearch (the morning commands)."""

    register(autoresearch)
    return autoresearch


def record_night(root, script=NIGHT_SCRIPT, backend=None, **settings):
    """Run the real loop over `script` in project `root`; returns where it wrote and the backend holding its images."""
    data = root.parent / "data"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text(json.dumps({"hash": "datahash", "files": {}}))
    backend = backend or RealisticBackend()
    night, ledger = make_night(root, ScriptedAgent(*script), backend,
                               **{"max_experiments": len(script), "max_diff_retries": 1, **settings})
    try:
        night.run()
    finally:
        ledger.close()
    runs = root.parent / "runs"
    return types.SimpleNamespace(project=root, runs=runs, run_dir=runs / "t", data=data, backend=backend)


def invoke(runs: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(cli(), [*args, "--runs-dir", str(runs)], input=input)


def one_line_error(result) -> str:
    """The output of a command that failed as a user error: exit 1, one line, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture
def night(project):  # noqa: F811 (the loop tests' project fixture)
    return record_night(project)


def test_every_command_has_help():
    group = cli()
    for command in COMMANDS:
        names = [[command.name]] + [[command.name, sub] for sub in getattr(command, "commands", {})]
        for name in names:
            result = CliRunner().invoke(group, [*name, "--help"])
            assert result.exit_code == 0 and "--runs-dir" in result.output, name


def test_status_reports_the_night(night):
    result = invoke(night.runs, "status", "--json")
    assert result.exit_code == 0, result.output
    fig = json.loads(result.output)
    assert (fig["tag"], fig["state"], fig["best_id"], fig["best_value"]) == ("t", "ended", "e0008", 0.7)
    assert fig["counts"] == {"kept": 2, "discarded": 2, "failed": 2, "cancelled": 0, "rejected": 1,
                             "pending_review": 2, "baseline_runs": 3}
    assert fig["sigma"] == pytest.approx(0.001) and fig["threshold"] == pytest.approx(0.002)
    assert (fig["k"], fig["min_delta"], fig["confirm"]) == (2.0, 0.001, False)
    # eight runs trained (three baselines, five experiments: the one whose export failed trained too), one second each
    assert fig["training_seconds"] == 8 * TRAINING_SECONDS
    assert fig["duty_cycle"] == pytest.approx(fig["training_seconds"] / fig["wall_seconds"])
    assert fig["experiments_per_hour"] == pytest.approx(6 / (fig["wall_seconds"] / 3600))  # rejected never ran

    table = invoke(night.runs, "status").output
    assert "ended" in table and "e0008" in table and "kept 2" in table and "sigma 0.001000" in table


def test_status_while_the_night_runs_and_after_a_kill(project):  # noqa: F811
    seen = {}

    def look(night):
        seen["status"] = json.loads(invoke(project.parent / "runs", "status", "--json").output)
        later = datetime.now(timezone.utc) + timedelta(hours=2)
        ledger = Ledger(project.parent / "runs" / "t" / "ledger.sqlite")
        seen["silent"] = report.figures(ledger, project.parent / "runs" / "t", now=later)
        ledger.close()
        night.interrupt()

    backend = RealisticBackend(on_hang=lambda: look(holder.night))
    holder = types.SimpleNamespace()
    holder.night, ledger = make_night(project, ScriptedAgent(change(BEHAVIOUR="hang")), backend)
    holder.night.run()
    ledger.close()
    assert seen["status"]["state"] == "running"
    assert seen["status"]["in_flight"] == [["e0004", "experiment", "training"]]
    assert seen["silent"].state == "stopped" and "probably killed" in seen["silent"].state_note


def test_list_shows_every_row_in_order(night):
    rows = json.loads(invoke(night.runs, "list", "--json").output)
    assert [r["id"] for r in rows] == [f"e{n:04d}" for n in range(1, 11)]
    by_id = {r["id"]: r for r in rows}
    assert (by_id["e0008"]["parent"], by_id["e0008"]["vs_parent"]) == ("e0004", pytest.approx(-0.1))
    assert by_id["e0004"]["vs_baseline"] == pytest.approx(-0.1)
    assert [by_id[i]["status"] for i in ("e0006", "e0007", "e0009")] == ["crash", "rejected", "export_failed"]
    table = invoke(night.runs, "list").output
    assert "export_failed" in table and "set {'LR': 0.3}" in table


def test_show_tells_the_whole_story_of_one_experiment(night):
    result = invoke(night.runs, "show", "e0008")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "e0008 <- e0004 <- e0001 (baseline)" in out
    assert "vs parent -0.100000" in out and "vs baseline -0.200000" in out
    assert "datahash" in out and "img-" in out and "exit 0" in out
    assert "num_params_M" in out and "val_bpb_hex" in out  # metrics table and the eval.log tail
    assert "step 00020" in out  # train.log tail
    assert "+LR = 0.3" in out and "-LR = 0.2" in out  # the diff

    data = json.loads(invoke(night.runs, "show", "e0006", "--json").output)
    assert data["lineage"][-1] == "e0001" and data["status"] == "crash"
    assert "RuntimeError: shape mismatch" in data["logs"]["train.log"] and data["logs"]["eval.log"] is None
    assert data["phases"]["train"]["exit_code"] == 1 and data["phases"]["eval"]["exit_code"] is None


def test_unknown_experiment_and_missing_night_are_one_line(night, tmp_path):
    assert "no experiment e0999" in one_line_error(invoke(night.runs, "show", "e0999"))
    assert "there is no night under" in one_line_error(invoke(tmp_path / "nowhere", "status"))
    assert "there is no night 'nope'" in one_line_error(invoke(night.runs, "list", "--tag", "nope"))


def test_the_latest_night_is_the_default_and_env_names_the_runs_dir(night, tmp_path):
    second = record_night(_copy_project(night.project, tmp_path / "other"), script=(change(LR=0.5),))
    newer = night.runs / "u"
    second.run_dir.rename(newer)  # the second night, started later, under tag "u"
    latest = CliRunner().invoke(cli(), ["status", "--json"], env={"AR_RUNS_DIR": str(night.runs)})
    assert json.loads(latest.output)["tag"] == "u"
    older = json.loads(invoke(night.runs, "status", "--json", "--tag", "t").output)
    assert older["best_id"] == "e0008"


def _copy_project(source: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    root = where / "project"
    root.mkdir()
    for name in ("train.py", "prepare.py", "program.md"):
        (root / name).write_text((source / name).read_text())
    return root


def test_an_empty_ledger(tmp_path):
    Ledger(tmp_path / "runs" / "empty" / "ledger.sqlite").close()
    runs = tmp_path / "runs"
    status = invoke(runs, "status", "--json")
    assert json.loads(status.output)["state"] == "not started"
    assert "not started" in invoke(runs, "status").output
    assert "no experiments yet" in invoke(runs, "list").output
    assert invoke(runs, "review").output == "nothing to review: no kept change is pending.\n"
    assert "nothing to plot yet" in one_line_error(invoke(runs, "plot"))
    assert invoke(runs, "export", "--tsv").output == "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
    assert json.loads(invoke(runs, "export", "--json").output)["experiments"] == []
    assert invoke(runs, "report").exit_code == 0
    assert "nothing to plot yet" in (runs / "empty" / "report.html").read_text()


def test_a_night_of_only_failures(project):  # noqa: F811
    (project / "train.py").write_text((project / "train.py").read_text().replace('"train"', '"crash"'))
    with pytest.raises(NightError, match="the baseline train.py ended in crash"):
        record_night(project, script=(change(LR=0.2),))
    runs = project.parent / "runs"
    fig = json.loads(invoke(runs, "status", "--json").output)
    assert (fig["state"], fig["best_id"], fig["counts"]["failed"], fig["sigma"]) == ("ended", None, 3, None)
    assert "noise: not measured yet" in invoke(runs, "status").output
    assert "nothing to plot yet" in one_line_error(invoke(runs, "plot"))
    assert invoke(runs, "review").output.startswith("nothing to review")
    assert invoke(runs, "report").exit_code == 0
    page = (runs / "t" / "report.html").read_text()
    assert "crash (3)" in page and "RuntimeError: shape mismatch" in page


def test_a_damaged_ledger_is_one_line(tmp_path):
    path = tmp_path / "runs" / "t" / "ledger.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite" * 100)
    for args in (["status"], ["list"], ["show", "e0001"], ["review"], ["plot"], ["export"], ["report"]):
        assert "is not a readable ledger" in one_line_error(invoke(tmp_path / "runs", *args)), args


def test_half_written_experiment_directories(night):
    run_dir = night.run_dir
    (run_dir / "e0004" / "eval.log").write_bytes(b"\x00\xff garbage \x89PNG")
    (run_dir / "e0008" / "out" / "trace.json").write_text('{"time_budget": 1.0, "num_st')
    for path in sorted((run_dir / "e0005").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (run_dir / "e0005").rmdir()
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"timestamp": "2026-')  # the runner died mid-line

    assert invoke(night.runs, "show", "e0004").exit_code == 0
    shown = invoke(night.runs, "show", "e0005")
    assert shown.exit_code == 0 and "(no log)" in shown.output
    assert invoke(night.runs, "status").exit_code == 0
    assert invoke(night.runs, "report").exit_code == 0
    refused = one_line_error(invoke(night.runs, "rerun", "e0008", "--exact"))
    assert "--exact needs the recorded budget trace" in refused and "missing or unreadable" in refused
