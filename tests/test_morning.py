"""The morning commands on nights recorded by the real loop (fake sandbox: no training, fast).

The sandbox is tests.doubles' `RealisticBackend`: it writes what the real one writes, and
`BEHAVIOUR` in the stand-in train.py picks how a run ends. The night is tests.recorded_night's.
"""

from __future__ import annotations

import json
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.core import decision, figures
from runner.core.ledger import Ledger
from runner.core.settings import Settings
from runner.morning.commands import COMMANDS
from runner.night.loop import NightError
from tests.doubles import TRAINING_SECONDS, RealisticBackend, ScriptedAgent, change, make_night
from tests.recorded_night import NOISE, cli, flat, invoke, one_line_error, record_night, rows_of


def test_every_command_has_help():
    group = cli()
    for command in COMMANDS:
        names = [[command.name]] + [[command.name, sub] for sub in getattr(command, "commands", {})]
        for name in names:
            result = CliRunner().invoke(group, [*name, "--help"])
            assert result.exit_code == 0 and "--runs-dir" in result.output, name


def test_the_night_keeps_what_replicates(night):
    """The layout every other test reads: each candidate ran seed after seed until it was decided."""
    ids, rows = night.ids, {r.id: r for r in rows_of(night)}
    runs = {name: [r.seed for r in rows.values() if r.id == i or (r.target_id == i and r.kind == "confirm")]
            for name, i in ids.items()}
    assert runs == {"first": [None, 1], "unproven": [None, 1, 2, 3], "crash": [None], "rejected": [None],
                    "best": [None, 1], "no_export": [None], "noisy": [None]}
    # a keep is checked against the best run again on its seeds: the baseline beside `first`, `first` beside `best`
    references = {name: [(r.seed, r.parent_id) for r in rows.values() if r.target_id == i and r.kind == "reference"]
                  for name, i in ids.items()}
    # `unproven` ran on seeds `first` (kept from two runs) had not run: `first` ran there too, as the pairs' partners
    assert references == {"first": [(None, "e0001"), (1, "e0001")], "best": [(None, ids["first"]), (1, ids["first"])],
                          "unproven": [(2, ids["first"]), (3, ids["first"])],
                          **{name: [] for name in ("crash", "rejected", "no_export", "noisy")}}
    decided = {name: (rows[i].decision, rows[i].estimate.get("runs")) for name, i in ids.items()}
    assert decided == {"first": ("keep", 2), "unproven": ("discard", 4), "crash": (None, None),
                       "rejected": (None, None), "best": ("keep", 2), "no_export": (None, None),
                       "noisy": ("discard", 1)}
    unproven = rows[ids["unproven"]].estimate
    assert unproven["gain"] == pytest.approx(0.000875) and unproven["low95"] < 0 < unproven["high95"]
    # paired, it was better on the lucky default seed only
    assert (unproven["pairs"], unproven["paired_gain"]) == (4, pytest.approx(0.0005))
    assert unproven["paired_low95"] < 0 < unproven["paired_high95"]
    best = rows[ids["best"]]
    assert (best.decision_value, best.best_before) == (pytest.approx(0.7005), pytest.approx(0.8005))
    assert best.estimate["gain"] == pytest.approx(0.1) and best.threshold < best.estimate["low95"]


def test_status_reports_the_night(night):
    result = invoke(night.runs, "status", "--json")
    assert result.exit_code == 0, result.output
    fig = json.loads(result.output)
    assert (fig["tag"], fig["state"], fig["best_id"]) == ("t", "ended", night.ids["best"])
    assert fig["best_value"] == pytest.approx(0.7005) and fig["best_estimate"]["gain"] == pytest.approx(0.1)
    assert fig["counts"] == {"kept": 2, "discarded": 2, "failed": 2, "cancelled": 0, "rejected": 1,
                             "pending_review": 2, "baseline_runs": 4, "confirm_runs": 5, "reference_runs": 6,
                             "disturbed": 0}
    assert (fig["sigma"], fig["noise_df"], fig["baseline_runs"]) == (pytest.approx(NOISE.sigma), 3, 4)
    assert fig["threshold"] == pytest.approx(decision.detectable_gain(decision.Rule(), NOISE, 4))
    start, now = fig["detectable"][0], fig["detectable"][-1]
    assert (start["decided"], start["unpaired"]) == (0, pytest.approx(fig["threshold"]))
    assert now["decided"] == 4 and now["unpaired"] is not None
    assert (fig["alpha"], fig["max_runs"], fig["min_delta"]) == (0.005, 4, 0.0)
    assert "k" not in fig and "confirm" not in fig
    # 20 runs trained (4 baselines, 5 confirmations, 6 reference runs, 5 experiments: the one whose export
    # failed trained too)
    assert fig["training_seconds"] == 20 * TRAINING_SECONDS
    assert fig["duty_cycle"] == pytest.approx(fig["training_seconds"] / fig["wall_seconds"])
    assert fig["experiments_per_hour"] == pytest.approx(6 / (fig["wall_seconds"] / 3600))  # rejected never ran

    table = flat(invoke(night.runs, "status").output)
    assert "ended" in table and night.ids["best"] in table and "kept 2" in table
    assert f"noise sigma {NOISE.sigma:.6f} (df 3) from 4 baseline runs" in table
    assert "smallest gain kept with 80 % power now: " in table
    assert f"at the start of the experiments {fig['threshold']:.6f} for a change that decouples the runs" in table
    assert "alpha 0.005" in table and "at most 4 runs per candidate" in table
    assert "gain +0.100000 bpb paired on 2 seeds" in table and "unpaired +0.100000 bpb (95 % interval [+0.097799" in table
    assert "autoresearch verify" in table


def test_status_while_the_night_runs_and_after_a_kill(project):
    seen = {}

    def look(night):
        seen["status"] = json.loads(invoke(project.parent / "runs", "status", "--json").output)
        later = datetime.now(timezone.utc) + timedelta(hours=2)
        ledger = Ledger(project.parent / "runs" / "t" / "ledger.sqlite")
        seen["silent"] = figures.figures(ledger, project.parent / "runs" / "t", now=later)
        ledger.close()
        night.interrupt()

    backend = RealisticBackend(on_hang=lambda: look(holder.night))
    holder = types.SimpleNamespace()
    holder.night, ledger = make_night(project, ScriptedAgent(change(BEHAVIOUR="hang")), backend)
    holder.night.run()
    ledger.close()
    assert seen["status"]["state"] == "running"
    first_experiment = f"e{Settings.baseline_runs + 1:04d}"
    assert seen["status"]["in_flight"] == [[first_experiment, "experiment", "training"]]
    assert seen["silent"].state == "stopped" and "probably killed" in seen["silent"].state_note


def test_list_shows_every_row_in_order(night):
    ids = night.ids
    rows = json.loads(invoke(night.runs, "list", "--json").output)
    assert [r["id"] for r in rows] == [f"e{n:04d}" for n in range(1, 23)]
    by_id = {r["id"]: r for r in rows}
    assert (by_id[ids["best"]]["parent"], by_id[ids["best"]]["vs_parent"]) == (ids["first"], pytest.approx(-0.1))
    assert by_id[ids["first"]]["vs_baseline"] == pytest.approx(0.8005 - 0.900125)
    assert by_id[ids["first"]]["estimate"]["runs"] == 2 and by_id[ids["crash"]]["estimate"] is None
    assert [by_id[ids[n]]["status"] for n in ("crash", "rejected", "no_export")] == ["crash", "rejected",
                                                                                     "export_failed"]
    table = invoke(night.runs, "list").output
    assert "export_failed" in table and "set {'LR': 0.3}" in table and "confirm" in table


def test_show_tells_the_whole_story_of_one_experiment(night):
    ids = night.ids
    result = invoke(night.runs, "show", ids["best"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert f"{ids['best']} <- {ids['first']} <- e0001 (baseline)" in out
    assert "vs parent -0.100000" in out and "vs baseline -0.199625" in out
    assert ("gain +0.100000 bpb paired on 2 seeds (95 % interval [+0.100000, +0.100000]); unpaired +0.100000 bpb "
            "(95 % interval [+0.097799, +0.102201]) from 2 runs against 2 of the best") in out
    assert "a keep needed a gain above 0.00" in out and "autoresearch verify" in out  # kept: the selection note
    assert "runs of this train.py (seeds)" in out  # the experiment and its confirmation
    assert "runs of the best beside it (seeds)" in out  # what its estimate compares with
    assert night.data_hash[:12] in out and "img-" in out and "exit 0" in out
    assert "num_params_M" in out and "val_bpb_hex" in out  # metrics table and the eval.log tail
    assert "step 00020" in out  # train.log tail
    assert "+LR = 0.3" in out and "-LR = 0.2" in out  # the diff

    data = json.loads(invoke(night.runs, "show", ids["unproven"], "--json").output)
    assert [(r["seed"], r["counted"], r["disturbed"]) for r in data["runs"]] == [
        (None, True, None), (1, True, None), (2, True, None), (3, True, None)]
    assert data["estimate"]["runs"] == 4 and data["estimate"]["low95"] < 0
    assert [(r["seed"], r["kind"]) for r in data["reference_runs"]] == [(2, "reference"), (3, "reference")]
    discarded = flat(invoke(night.runs, "show", ids["unproven"]).output)
    assert "from 4 runs against 2 of the best" in discarded and "autoresearch verify" not in discarded

    data = json.loads(invoke(night.runs, "show", ids["crash"], "--json").output)
    assert data["lineage"][-1] == "e0001" and data["status"] == "crash" and data["estimate"] is None
    assert "RuntimeError: shape mismatch" in data["logs"]["train.log"] and data["logs"]["eval.log"] is None
    assert data["phases"]["train"]["exit_code"] == 1 and data["phases"]["eval"]["exit_code"] is None


def test_a_disturbed_run_is_shown_and_left_out(project):
    recorded = record_night(project, script=(change(LR=0.2, SLOW="1"),))
    (exp,) = recorded.experiments
    data = json.loads(invoke(recorded.runs, "show", exp, "--json").output)
    assert [(r["seed"], r["counted"]) for r in data["runs"]] == [(None, True), (1, False), (1, True)]
    assert data["runs"][1]["disturbed"] == "trained 10 steps where the same code usually trains 20"
    assert (data["decision"], data["estimate"]["runs"]) == ("keep", 2)
    out = flat(invoke(recorded.runs, "show", exp).output)
    assert "from 2 runs (3 spent) against 2 of the best" in out and "trained 10 steps where" in out
    assert json.loads(invoke(recorded.runs, "status", "--json").output)["counts"]["disturbed"] == 1
    disturbed = data["runs"][1]["id"]
    assert "done (disturbed)" in invoke(recorded.runs, "list").output
    assert "left out of every estimate" in flat(invoke(recorded.runs, "show", disturbed).output)


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
    assert older["best_id"] == night.ids["best"]


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


def test_a_night_of_only_failures(project):
    (project / "train.py").write_text((project / "train.py").read_text().replace('"train"', '"crash"'))
    with pytest.raises(NightError, match="the baseline train.py ended in crash"):
        record_night(project, script=(change(LR=0.2),))
    runs = project.parent / "runs"
    crashed = len(rows_of(types.SimpleNamespace(run_dir=runs / "t")))  # every baseline run
    fig = json.loads(invoke(runs, "status", "--json").output)
    assert (fig["state"], fig["best_id"], fig["counts"]["failed"], fig["sigma"]) == ("ended", None, crashed, None)
    assert "noise: not measured yet" in invoke(runs, "status").output
    assert "nothing to plot yet" in one_line_error(invoke(runs, "plot"))
    assert invoke(runs, "review").output.startswith("nothing to review")
    assert invoke(runs, "report").exit_code == 0
    page = (runs / "t" / "report.html").read_text()
    assert f"crash ({crashed})" in page and "RuntimeError: shape mismatch" in page


def test_a_damaged_ledger_is_one_line(tmp_path):
    path = tmp_path / "runs" / "t" / "ledger.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite" * 100)
    for args in (["status"], ["list"], ["show", "e0001"], ["review"], ["plot"], ["export"], ["report"]):
        assert "is not a readable ledger" in one_line_error(invoke(tmp_path / "runs", *args)), args


def test_half_written_experiment_directories(night):
    run_dir, ids = night.run_dir, night.ids
    (run_dir / ids["first"] / "eval.log").write_bytes(b"\x00\xff garbage \x89PNG")
    (run_dir / ids["best"] / "out" / "trace.json").write_text('{"time_budget": 1.0, "num_st')
    for path in sorted((run_dir / ids["unproven"]).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (run_dir / ids["unproven"]).rmdir()
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"timestamp": "2026-')  # the runner died mid-line

    assert invoke(night.runs, "show", ids["first"]).exit_code == 0
    shown = invoke(night.runs, "show", ids["unproven"])
    assert shown.exit_code == 0 and "(no log)" in shown.output
    assert invoke(night.runs, "status").exit_code == 0
    assert invoke(night.runs, "report").exit_code == 0
    refused = one_line_error(invoke(night.runs, "rerun", ids["best"], "--exact"))
    assert "--exact needs the recorded budget trace" in refused and "not a trace the harness writes" in refused
