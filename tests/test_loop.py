"""The night's logic with a fake sandbox and a scripted agent (no training: fast; the doubles are in
tests.doubles, which says how the stand-in train.py's constants steer the fake)."""

from __future__ import annotations

import collections
import difflib
import hashlib
import io
import json
import statistics
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner
from rich.console import Console

from runner.agents.base import AgentConfigError, Proposal, Usage
from runner.cli import main
from runner.core.gpus import Gpu
from runner.core.ledger import BASELINE, EXPERIMENT, Ledger
from runner.night import loop
from dataprep.build import read_manifest
from runner.core.log_setup import night_log
from runner.core.settings import Settings, Source
from runner.night import overnight
from runner.night.loop import Dataset, Night, NightError
from runner.night.proposals import Best, Proposer
from runner.night.records import Records
from runner.night.overnight import ensure_data
from sandbox.spec import Phase
from sandbox.status import Status
from tests.doubles import (BASE_TRAIN_PY, FakeBackend, ScriptedAgent, SimulatedKill, agent_error, change, garbage,
                           make_night, no_diff)

ROOT = Path(__file__).resolve().parent.parent


def experiments(ledger, kind=EXPERIMENT):
    return ledger.experiments(kinds=[kind])


def runs_of(ledger, row):
    """(seed, val_bpb) of an experiment's runs: the row itself, then its confirmations."""
    return [(r.seed, r.val_bpb) for r in [row, *ledger.confirmations_of(row.id)]]


def test_baseline_measures_the_noise_then_keeps_replicate_and_advance_the_best(project):
    agent = ScriptedAgent(change(LR=0.2), change(LR=0.201), change(LR=0.3))
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=3)
    assert night.run() == "max-experiments"

    baseline = experiments(ledger, BASELINE)
    assert [(r.status, r.seed, r.val_bpb) for r in baseline] == [
        ("done", None, 0.9), ("done", 1, 0.901), ("done", 2, 0.899), ("done", 3, pytest.approx(0.9005))]
    (record,) = ledger.nights()
    base_mean = (0.9 + 0.901 + 0.899 + 0.9005) / 4
    assert record.baseline_mean == pytest.approx(base_mean) and record.noise_df == 3
    assert record.sigma == pytest.approx(statistics.stdev([0.9, 0.901, 0.899, 0.9005]))
    assert record.threshold > 0.004 and record.stop_reason == "max-experiments"

    first, second, third = experiments(ledger)
    # a clear gain passes against the mean of all baselines after two seeds; the baseline then runs again on
    # those seeds beside it, and the keep is credited against the best as measured in its own window
    assert runs_of(ledger, first) == [(None, 0.8), (1, pytest.approx(0.801))]
    references = ledger.references_of(first.id)
    assert [(r.seed, r.val_bpb, r.parent_id) for r in references] == [(None, 0.9, "e0001"), (1, 0.901, "e0001")]
    baseline_py = (night.settings.run_dir / baseline[0].id / "train.py").read_text()
    assert all((night.settings.run_dir / r.id / "train.py").read_text() == baseline_py and r.image == baseline[0].image
               for r in references)
    window = (0.9 + 0.901) / 2
    assert (first.decision, first.decision_value, first.best_before) == ("keep", pytest.approx(0.8005),
                                                                        pytest.approx(window))
    estimate = first.estimate
    assert estimate["gain"] == pytest.approx(window - 0.8005) and estimate["runs"] == 2
    assert estimate["best_runs"] == 2 and estimate["low95"] < estimate["gain"] < estimate["high95"]
    # 0.001 better on every seed is far inside the seed noise, but its runs stay coupled to the best's on the
    # same seeds: the paired test keeps it from three runs. The best (kept from two runs) had no run on the
    # third seed, so it ran there first as the pair's partner, then on the other two beside the candidate
    assert [seed for seed, _ in runs_of(ledger, second)] == [None, 1, 2]
    assert [(r.seed, round(r.val_bpb, 6)) for r in ledger.references_of(second.id)] == [
        (2, 0.799), (None, 0.8), (1, 0.801)]
    assert second.decision == "keep" and second.estimate["pairs"] == 3
    assert second.estimate["paired_gain"] == pytest.approx(0.001) and second.estimate["paired_se"] < 1e-9
    assert second.estimate["gain"] < second.estimate["high95"] and second.estimate["low95"] < 0  # unpaired: unsure
    assert (third.decision, third.parent_id) == ("keep", first.id)
    assert night.best.exp_id == third.id and night.best.value == pytest.approx(0.7005)
    # the parent recorded is the train.py each proposal was made from (prefetched from the best of its moment)
    for row, context in zip((first, second, third), agent.contexts):
        assert (night.settings.run_dir / row.parent_id / "train.py").read_text() == context.train_py
        assert (night.settings.run_dir / row.id / "diff.patch").read_text() == row.diff
    assert "LR = 0.2" in agent.contexts[2].train_py and agent.contexts[2].best_val_bpb == pytest.approx(0.8005)
    assert agent.contexts[2].history[0].status == "keep"
    assert agent.contexts[2].history[0].params["LR"] == 0.2
    assert (first.review_state, second.review_state) == ("pending", "pending")
    assert (first.val_bpb_text, first.num_steps, first.peak_vram_mb) == ("0.800000", 10, 512.0)
    assert (first.input_tokens, first.cost_usd, first.agent, first.attempts) == (10, 0.5, "scripted", 1)
    assert first.train_sha256 == hashlib.sha256((night.settings.run_dir / first.id / "train.py").read_bytes()).hexdigest()
    assert first.image and first.backend == "fake" and first.data_hash == night.data.manifest_hash
    assert json.loads(first.metrics_json)["val_bpb"] == 0.8


def test_a_gain_far_inside_the_seed_noise_is_kept_only_where_the_runs_stay_coupled(project):
    """The same true gain, 0.001 (about one sigma of the seed noise): a learning-rate change keeps the runs
    coupled to the best's on each seed and is kept; the same gain with a new initialisation (runs as far
    from the best's as another seed's) is not, because its paired differences spread as the seeds do."""
    agent = ScriptedAgent(change(LR=0.101, RESEED=2), change(LR=0.101))
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=2)
    night.run()
    decoupled, coupled = experiments(ledger)
    assert decoupled.decision == "discard" and decoupled.estimate["runs"] == 4
    assert decoupled.estimate["paired_se"] > 0.0003  # the seeds' spread, not the change's
    assert ledger.references_of(decoupled.id) == []
    assert coupled.decision == "keep" and coupled.estimate["pairs"] == 3
    assert coupled.estimate["paired_gain"] == pytest.approx(0.001)


def effect_free(context):
    """A change that cannot matter: a constant nothing reads."""
    new = context.train_py + "UNUSED = 1\n"
    lines = difflib.unified_diff(context.train_py.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py")
    return Proposal("add a constant nothing reads", "".join(lines), Usage(input_tokens=10))


def test_a_machine_that_drifts_after_the_baselines_keeps_no_effect_free_change(project):
    backend = FakeBackend()
    backend.drift = (4, 0.05)  # after the four baselines, every run scores 0.05 lower (the machine changed)
    night, ledger = make_night(project, ScriptedAgent(effect_free), backend)
    night.run()
    (row,) = experiments(ledger)
    # against the baselines of dusk it looks 0.05 better on both seeds; beside it, the baseline does too
    assert [round(value, 6) for _, value in runs_of(ledger, row)] == [0.85, 0.851]
    references = ledger.references_of(row.id)
    assert [(r.seed, round(r.val_bpb, 6)) for r in references] == [(None, 0.85), (1, 0.851)]
    assert row.decision == "discard" and row.estimate["best_runs"] == 2
    assert abs(row.estimate["gain"]) < 1e-9 and night.best.exp_id == "e0001"


def test_a_clear_loser_costs_one_run(project):
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.05)), FakeBackend())
    night.run()
    (worse,) = experiments(ledger)
    assert (worse.decision, ledger.confirmations_of(worse.id)) == ("discard", [])
    assert worse.estimate["gain"] == pytest.approx(0.9 - 0.95 + 0.000125, abs=1e-9) and worse.estimate["runs"] == 1


def test_a_disturbed_run_is_left_out_and_its_seed_run_again(project):
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2, SLOW="1")), FakeBackend())
    night.run()
    (row,) = experiments(ledger)
    confirms = ledger.confirmations_of(row.id)
    assert [(c.seed, c.num_steps, c.disturbed is not None) for c in confirms] == [(1, 5, True), (1, 10, False)]
    assert "trained 5 steps where the same code usually trains 10" in confirms[0].disturbed
    assert (row.decision, row.estimate["runs"]) == ("keep", 2)


def test_a_disturbed_baseline_is_replaced_before_the_noise_is_measured(project):
    (project / "train.py").write_text(BASE_TRAIN_PY.replace("SLOW = None", "SLOW = '2'"))
    night, ledger = make_night(project, ScriptedAgent(), FakeBackend(), max_experiments=None, hours=1e-9)
    night.run()
    rows = experiments(ledger, BASELINE)
    assert [(r.seed, r.disturbed is not None) for r in rows] == [(None, False), (1, False), (2, True), (3, False),
                                                                 (2, False)]
    assert ledger.nights()[0].baseline_runs == 4


def test_invalid_diff_is_fed_back_then_recorded_rejected(project):
    agent = ScriptedAgent(garbage, garbage, garbage, garbage, change(LR=0.2))
    backend = FakeBackend()
    night, ledger = make_night(project, agent, backend, max_experiments=2, max_diff_retries=3)
    night.run()
    rejected, accepted = experiments(ledger)
    assert (rejected.status, rejected.attempts, rejected.input_tokens) == ("rejected", 3, 30)
    assert rejected.reject_reason and rejected.image is None and rejected.id not in backend.builds
    assert [c.feedback for c in agent.contexts[:3]] == ["", rejected.reject_reason, rejected.reject_reason]
    # the next proposal starts fresh; its second try succeeds
    assert agent.contexts[3].feedback == "" and agent.contexts[4].feedback == rejected.reject_reason
    assert (accepted.status, accepted.attempts, accepted.decision) == ("done", 2, "keep")


def test_a_reply_without_a_diff_is_fed_back_and_its_cost_counted(project):
    agent = ScriptedAgent(no_diff, change(LR=0.2))
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=1, max_diff_retries=3)
    night.run()
    (row,) = experiments(ledger)
    assert agent.contexts[1].feedback == "the reply contains no unified diff of train.py"
    assert (row.status, row.attempts, row.input_tokens, row.output_tokens) == ("done", 2, 20, 5)  # both replies


def test_replies_without_a_diff_end_rejected(project):
    agent = ScriptedAgent(no_diff, no_diff)
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=1, max_diff_retries=2)
    night.run()
    (row,) = experiments(ledger)
    assert (row.status, row.attempts, row.input_tokens, row.description) == ("rejected", 2, 20, "think harder")
    assert row.reject_reason == "the reply contains no unified diff of train.py"


def test_a_crash_is_recorded_with_its_log_tail_and_shown_to_the_agent(project):
    agent = ScriptedAgent(change(BEHAVIOUR="crash"), change(LR=0.2), change(LR=0.3))
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=3)
    night.run()
    crashed = experiments(ledger)[0]
    assert (crashed.status, crashed.train_exit_code, crashed.decision, crashed.val_bpb) == ("crash", 1, None, None)
    assert "RuntimeError: boom" in crashed.log_tail
    # the third proposal was prepared after the crash was recorded
    assert "RuntimeError: boom" in agent.contexts[2].last_failure_log
    assert agent.contexts[2].history[0].status == "crash"
    assert night.best.exp_id != crashed.id


# -- interrupts (Ctrl-C, as runner.night.overnight.Presses turns it into Night.interrupt; tests/test_interrupts.py
# presses it on real processes) ----------------------------------------------------------------------


def test_an_interrupt_cancels_the_running_experiment_and_records_it(project):
    backend = FakeBackend(on_hang=lambda: night.interrupt())
    night, ledger = make_night(project, ScriptedAgent(change(BEHAVIOUR="hang")), backend)
    assert night.run() == "interrupted"
    (row,) = experiments(ledger)
    assert (row.status, row.train_killed_by, row.decision) == ("cancelled", "cancel", None)
    assert ledger.nights()[0].stop_reason == "interrupted"


def test_an_interrupt_during_a_build_runs_nothing_more_and_leaves_the_row_owed(project, monkeypatch):
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend(kill_at=("e0005", Phase.TRAIN)))
    night.run()
    assert died == [SimulatedKill]
    ledger.close()
    # the resume builds e0005's image again (a fresh process: no images survive); pressed then, nothing more runs
    backend = FakeBackend(on_build=lambda exp_id: night.interrupt())
    night, ledger = make_night(project, ScriptedAgent(), backend)
    assert night.run() == "interrupted"
    assert (backend.builds, backend.runs, ledger.get("e0005").status) == (["e0005"], [], "training")


def test_an_interrupt_while_the_agent_thinks_stops_without_waiting_for_it(project):
    thinking, answer, answered = threading.Event(), threading.Event(), threading.Event()

    def slow(context):
        thinking.set()
        answer.wait(30)
        try:
            return change(LR=0.2)(context)
        finally:
            answered.set()

    def interrupt_once_thinking():
        assert thinking.wait(30)
        night.interrupt()

    night, ledger = make_night(project, ScriptedAgent(slow), FakeBackend())
    threading.Thread(target=interrupt_once_thinking, daemon=True).start()
    assert night.run() == "interrupted" and not answered.is_set()  # the agent still thinks
    answer.set()
    assert answered.wait(30)
    # what it proposed meanwhile is recorded, owed to a resume (when the runner has not exited by then)
    for _ in range(100):
        if experiments(ledger):
            break
        time.sleep(0.05)
    assert [(r.status, r.decision) for r in experiments(ledger)] == [("proposed", None)]


def test_an_interrupt_between_done_and_the_decision_leaves_it_to_the_resume_once(project, monkeypatch):
    transition = Ledger.transition

    def interrupting(self, exp, status, **fields):
        transition(self, exp, status, **fields)
        if (exp, status) == ("e0005", Status.DONE):
            night.interrupt()

    monkeypatch.setattr(Ledger, "transition", interrupting)
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend())
    assert night.run() == "interrupted"
    assert (ledger.get("e0005").status, ledger.confirmations_of("e0005")) == ("done", [])
    assert ledger.get("e0005").decision is None  # it needs a second seed: not asked for once stopped
    monkeypatch.setattr(Ledger, "transition", transition)
    ledger.close()
    night, ledger = make_night(project, ScriptedAgent(), FakeBackend())
    night.run()
    assert ledger.get("e0005").decision == "keep" and len(ledger.confirmations_of("e0005")) == 1


def test_resume_after_a_kill_reruns_the_experiment_in_flight_exactly_once(project, monkeypatch):
    # night 1 dies in phase 2 of its experiment
    agent = ScriptedAgent(change(LR=0.2))
    killer = FakeBackend(kill_at=("e0005", Phase.EVAL))
    night, ledger = make_night(project, agent, killer, max_experiments=1)
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    night.run()
    assert died == [SimulatedKill]
    ledger.close()
    ledger = Ledger(night.settings.run_dir / "ledger.sqlite")
    assert ledger.get("e0005").status == "evaluating"
    # ... and a proposal was recorded but not yet built when it died
    built = change(LR=0.15)(agent.contexts[0])
    orphan = ledger.add(kind=EXPERIMENT, status="proposed", parent_id="e0001", diff=built.diff, description="orphan")
    (night.settings.run_dir / orphan.id / "train.py").parent.mkdir()
    (night.settings.run_dir / orphan.id / "train.py").write_text(BASE_TRAIN_PY.replace("LR = 0.1", "LR = 0.15"))
    ledger.close()

    # night 2, same tag, a fresh process (no images survive); the limit is the night's total: e0005, the orphan, one new
    backend = FakeBackend()
    night2, ledger = make_night(project, ScriptedAgent(change(LR=0.35)), backend, max_experiments=3)
    night2.run()
    trained = collections.Counter(exp for exp, phase, _ in backend.runs if phase is Phase.TRAIN)
    assert not any(r.id in trained for r in experiments(ledger, BASELINE))  # baseline not repeated
    assert set(trained.values()) == {1}  # every owed run once, none twice
    rows = {r.id: r for r in experiments(ledger)}
    new = max(rows)
    assert len(rows) == 3 and {"e0005", orphan.id, new} <= set(trained)
    assert ledger.unfinished() == [] and ledger.undecided() == []
    assert rows["e0005"].decision == "keep"
    assert (rows[orphan.id].decision, rows[orphan.id].estimate["runs"]) == ("discard", 1)  # 0.85: one run
    assert rows[new].parent_id == "e0005"  # the resumed keep became the parent
    assert len(ledger.nights()) == 2


def test_a_confirmation_killed_in_flight_is_run_again_and_then_decides(project, monkeypatch):
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    agent = ScriptedAgent(change(LR=0.2))
    night, ledger = make_night(project, agent, FakeBackend(kill_at=("e0006", Phase.TRAIN)))
    night.run()
    assert died == [SimulatedKill]
    assert (ledger.get("e0005").decision, ledger.get("e0006").kind, ledger.get("e0006").status) == \
        (None, "confirm", "training")
    ledger.close()

    backend = FakeBackend()
    night2, ledger = make_night(project, ScriptedAgent(change(LR=0.3)), backend)
    night2.run()
    assert [(exp, phase) for exp, phase, _ in backend.runs[:2]] == [("e0006", Phase.TRAIN), ("e0006", Phase.EVAL)]
    assert sum(exp == "e0006" for exp, _, _ in backend.runs) == 2  # once per phase, once only
    candidate = ledger.get("e0005")
    assert (candidate.decision, candidate.decision_value) == ("keep", pytest.approx(0.8005))
    assert [c.id for c in ledger.confirmations_of("e0005")] == ["e0006"]  # no second confirmation for seed 1
    assert ledger.unfinished() == [] and ledger.undecided() == []


def test_after_the_deadline_the_baseline_still_completes_but_no_experiment_starts(project):
    agent = ScriptedAgent(change(LR=0.2))
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=None, hours=1e-9)
    assert night.run() == "hours"
    assert [r.status for r in experiments(ledger, BASELINE)] == ["done"] * 4
    assert experiments(ledger) == [] and agent.contexts == []


def test_workers_never_share_a_gpu_and_a_failing_gpu_leaves_rotation(project):
    gpus = [Gpu(0, "GPU-a", "Fake H100", "580.1"), Gpu(1, "GPU-bad", "Fake H100", "580.1"),
            Gpu(2, "GPU-c", "Fake H100", "580.1")]
    agent = ScriptedAgent(*(change(LR=round(0.1 + 0.02 * n, 3)) for n in range(1, 9)))
    backend = FakeBackend(fail_gpus={"GPU-bad"})
    night, ledger = make_night(project, agent, backend, gpus=gpus, max_experiments=8, gpu_failures=2)
    night.run()
    assert max(backend.max_active.values()) == 1
    assert {s.name: s.retired for s in night.slots} == {"gpu0": False, "gpu1": True, "gpu2": False}
    assert sum(gpu == "GPU-bad" for _, _, gpu in backend.runs) == 2  # two strikes, then out
    rows = ledger.experiments()
    assert len(experiments(ledger)) == 8 and {r.status for r in rows} == {"done"}  # nothing lost: requeued runs finished elsewhere
    assert {r.gpu_uuid for r in rows} <= {"GPU-a", "GPU-c"}
    assert {r.gpu_name for r in rows} == {"Fake H100"}


def test_all_gpus_failing_ends_the_night_with_one_sentence(project):
    night, _ = make_night(project, ScriptedAgent(), FakeBackend(fail_gpus={"GPU-a"}),
                          gpus=[Gpu(0, "GPU-a", "Fake", "1")], gpu_failures=2)
    with pytest.raises(NightError, match="every GPU failed 2 times in a row"):
        night.run()


def test_luck_under_one_seed_is_exposed_by_the_next(project):
    agent = ScriptedAgent(change(LUCK=0.15))
    night, ledger = make_night(project, agent, FakeBackend())
    night.run()
    (lucky,) = experiments(ledger)
    # 0.75 under the default seed, 0.901 under the next: the mean's gain is inside the noise
    assert runs_of(ledger, lucky)[:2] == [(None, 0.75), (1, pytest.approx(0.901))]
    assert lucky.decision == "discard" and night.best.exp_id == "e0001"


def test_an_agent_error_is_waited_out_and_the_night_goes_on(project, monkeypatch):
    monkeypatch.setattr(loop, "AGENT_BACKOFF_S", (0.0, 0.0))
    agent = ScriptedAgent(agent_error, change(LR=0.2))
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=1)
    night.run()
    assert len(agent.contexts) == 2
    assert [(r.status, r.decision) for r in experiments(ledger)] == [("done", "keep")]


def test_a_misconfigured_agent_ends_the_night(project):
    def misconfigured(context):
        raise AgentConfigError("no agent command given.")

    night, _ = make_night(project, ScriptedAgent(misconfigured), FakeBackend())
    with pytest.raises(NightError, match="no agent command given"):
        night.run()


def test_other_data_under_the_same_tag_is_refused(project):
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend())
    night.run()
    ledger.close()
    settings = night.settings
    other = Night(settings, ledger=Ledger(settings.run_dir / "ledger.sqlite"), backend=FakeBackend(),
                  agent=ScriptedAgent(), gpus=[], data=Dataset(project.parent / "data", "otherhash"))
    with pytest.raises(NightError, match="measured on other data"):
        other.run()


# -- setup and command line ------------------------------------------------------------


def test_data_is_prepared_only_when_missing_and_checked_before_every_night(project, tmp_path, monkeypatch):
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    builder = tmp_path / "builder.py"
    monkeypatch.setattr(overnight, "DATA_BUILDER", (sys.executable, str(builder)))
    builder.write_text(
        "import os, pathlib, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from tests.corpus import stand_in_data\n"
        "out = pathlib.Path(os.environ['AR_CACHE']) / sys.argv[2]\n"
        "out.mkdir(parents=True)\n"
        "stand_in_data(out)\n"
    )
    settings = Settings(root=project, source=Source.parse(f"local:{tmp_path}"))
    prepared = tmp_path / "cache" / "local"
    assert ensure_data(settings).manifest_hash == read_manifest(prepared)["hash"]
    builder.write_text("raise SystemExit(5)\n")
    assert ensure_data(settings).manifest_hash == read_manifest(prepared)["hash"]  # already there: not run again
    with pytest.raises(NightError, match="the data builder could not build it"):
        ensure_data(Settings(root=project, source=Source.parse("linux")))
    (prepared / "val" / "tokens.bin").write_bytes(b"changed by hand")
    with pytest.raises(NightError) as damaged:
        ensure_data(settings)
    assert str(damaged.value) == (
        f"the prepared data does not check out ({prepared}/val/tokens.bin does not match the hash in its manifest); "
        f"rebuild it with `uv run python -m dataprep --source local {tmp_path} --force`.")


def test_check_diff_reports_ok_or_the_reason(tmp_path):
    base = tmp_path / "train.py"
    base.write_text(BASE_TRAIN_PY)
    good = tmp_path / "good.patch"
    good.write_text(change(LR=0.2)(types.SimpleNamespace(train_py=BASE_TRAIN_PY)).diff)
    bad = tmp_path / "bad.patch"
    bad.write_text("nonsense\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["check-diff", str(good), "--base", str(base)])
    assert (ok.exit_code, ok.output) == (0, "ok: +1 -1 lines\n")
    rejected = runner.invoke(main, ["check-diff", str(bad), "--base", str(base)])
    assert rejected.exit_code == 1 and rejected.output.startswith("rejected: ")


@pytest.mark.parametrize("args, message", [
    (["--baseline-runs", "1"], "--baseline-runs must be at least 2"),
    (["--alpha", "0"], "--alpha must be between 0 and 1"),
    (["--max-runs", "1"], "--max-runs must be at least 2"),
    (["--paired-share", "1.5"], "--paired-share must be between 0 and 1"),
    (["--gpus", "7"], "--gpus asks for GPU 7"),
    (["--source", "nowhere"], "unknown data source 'nowhere'"),
    (["--tag", "a/b"], "--tag must be a plain name"),
])
def test_overnight_bad_flags_are_one_sentence(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(main, ["overnight", "--gpus", "none", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ")
    assert message in lines[0]


def test_events_go_to_the_json_lines_file_and_concisely_to_the_console(project):
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend())
    screen = io.StringIO()
    events_path = night.settings.run_dir / "events.jsonl"
    with night_log(events_path, Console(file=screen, width=200)):
        night.run()
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "night.start" and names[-1] == "night.end"
    decided = next(e for e in events if e["event"] == "experiment.decided")
    assert (decided["exp"], decided["decision"], decided["level"]) == ("e0005", "keep", "info") and decided["timestamp"]
    assert "experiment.decided exp=e0005 decision=keep" in screen.getvalue()
    assert structlog.get_config()["processors"] != []  # back to the defaults after the block


@pytest.mark.parametrize("agent, message", [
    ("command", "no agent command given"),
    ("anthropic", "ANTHROPIC_API_KEY is not set"),
])
@pytest.mark.parametrize("where", [[], ["--cluster", "127.0.0.1:9"]], ids=["here", "cluster"])
def test_an_agent_that_cannot_work_is_one_line_before_anything_runs(agent, message, where, project, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("AR_AGENT_COMMAND", raising=False)
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["overnight", "--gpus", "none", "--agent", agent, "--tag", "t", *where])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: ") and message in last
    assert "Traceback" not in result.output
    assert not (project / "runs" / "t" / "ledger.sqlite").exists()  # nothing was started


@pytest.mark.parametrize("args, message", [
    (["--agent", "search", "--agent-command", "cat"], "--agent-command is for --agent command only"),
    (["--sandbox", "auto", "--base-image", "pytorch/pytorch:x"], "--base-image is for the docker sandbox, but no "
                                                                 "Docker engine answers here"),
])
def test_a_setting_that_the_chosen_part_does_not_take_is_one_line(args, message, project, monkeypatch):
    monkeypatch.setattr("sandbox.backends.docker_unreachable", lambda: "FileNotFoundError: no socket")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["overnight", "--gpus", "none", "--agent", "search", "--tag", "t", *args])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: ") and message in last
    assert not (project / "runs" / "t").exists()  # nothing was started


def test_asking_for_docker_without_an_engine_is_one_line(project, monkeypatch):
    monkeypatch.setattr("sandbox.backends.docker_unreachable", lambda: "FileNotFoundError: no socket")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["overnight", "--gpus", "none", "--agent", "search", "--sandbox", "docker"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1 and last.startswith("Error: the docker sandbox was asked for")
    assert "Traceback" not in result.output


def test_the_agent_sees_what_each_run_measured_and_the_keep_rules_verdict(night):
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    try:
        records = Records(ledger, night.run_dir, "cpu")
        proposer = Proposer(ScriptedAgent(), records, night.project, 1, machine="the CPU (no GPU); training stops after 1 s")
        best = ledger.get(night.ids["best"])
        context = proposer.context(Best(best.id, best.decision_value, records.train_py(best)), baseline_mean=0.9)
    finally:
        ledger.close()
    rows = {row.exp_id: row for row in context.history}
    kept, unproven = rows[night.ids["best"]], rows[night.ids["unproven"]]
    assert kept.verdict.startswith("keep: gain +0.1") and "95 % interval" in kept.verdict
    assert unproven.verdict.startswith("discard: gain") and "a keep needed >" in unproven.verdict
    assert kept.measured["train_s"] > 0 and kept.reported["steps"] == 20  # the fake's trace: reported, not measured
    assert rows[night.ids["crash"]].status == "crash" and rows[night.ids["crash"]].verdict == ""
    assert "step 00020 | loss" in context.parent_log  # the best's own training log
    assert context.machine == "the CPU (no GPU); training stops after 1 s"


@pytest.mark.parametrize("gpus, cap, told", [
    ([], "0.9", "the CPU (no GPU); training stops after 1 s (the harness's time budget)"),
    ([Gpu(0, "GPU-a", "NVIDIA H200", "580.1", memory_bytes=140 * 2**30)], "0.9",
     "NVIDIA H200 with 140 GiB of GPU memory, of which a run may hold 126 GiB; training stops after 1 s"),
    ([Gpu(0, "GPU-a", "NVIDIA H200", "580.1", memory_bytes=140 * 2**30)], "none",
     "NVIDIA H200 with 140 GiB of GPU memory; training stops after 1 s"),
])
def test_the_agent_is_told_the_card_its_memory_and_the_budget(project, gpus, cap, told):
    agent = ScriptedAgent(change(LR=0.2))
    night, ledger = make_night(project, agent, FakeBackend(), gpus=gpus, gpu_memory_cap=cap)
    night.run()
    ledger.close()
    assert agent.contexts[0].machine.startswith(told)
