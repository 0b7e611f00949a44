"""`verify`: the arithmetic on runs a fake rerun records, then the command end to end on the fake sandbox."""

from __future__ import annotations

import json
import types

import pytest

from runner.core.ledger import RERUN, Ledger
from runner.morning import rerun as reruns
from runner.morning import verify as verifies
from sandbox.spec import SandboxUnavailable
from tests.doubles import change
from tests.recorded_night import invoke, one_line_error, record_night, rows_of
from sandbox.status import Status


class FakeRerun:
    """Stands for runner.morning.rerun.rerun: records a rerun row with the val_bpb (and steps) it is given; None crashes."""

    def __init__(self, values: dict[str, list[float]], steps: dict[str, list[int]] | None = None) -> None:
        self.values, self.steps = values, steps or {}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, ledger, run_dir, exp_id, *, exact, seed, backend, on_start):
        assert not exact
        n = sum(target == exp_id for target, _ in self.calls)
        self.calls.append((exp_id, seed))
        row = ledger.add(kind=RERUN, status=Status.BUILT, target_id=exp_id, seed=seed, image=ledger.get(exp_id).image,
                         description=f"rerun of {exp_id} on seed {seed}")
        on_start(f"rerunning {exp_id} as {row.id}")
        for status in (Status.TRAINING, Status.EVALUATING):
            ledger.transition(row.id, status)
        value = self.values[exp_id][n]
        if value is None:
            ledger.transition(row.id, "crash", error="boom")
        else:
            ledger.transition(row.id, Status.DONE, val_bpb=value, num_steps=self.steps.get(exp_id, [20] * 9)[n])
        return types.SimpleNamespace(rerun_id=row.id)


def run_verify(night, fake, **options):
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    heard = []
    try:
        result = verifies.verify(ledger, night.run_dir, backend=night.backend, rerun=fake, on_start=heard.append,
                                 **options)
    finally:
        ledger.close()
    return result, heard


def test_the_gain_and_its_interval_come_from_the_fresh_runs_alone(night):
    best = night.ids["best"]
    fake = FakeRerun({"e0001": [0.90, 0.91, 0.92], best: [0.80, 0.82, 0.84]})
    result, heard = run_verify(night, fake)
    # the same fresh seeds for both, one pair after the other
    assert fake.calls == [("e0001", 1000), (best, 1000), ("e0001", 1001), (best, 1001), ("e0001", 1002), (best, 1002)]
    assert heard[0].startswith("[1/6] rerunning e0001") and heard[5].startswith(f"[6/6] rerunning {best}")
    # gain 0.91 - 0.82; pooled variance (1e-4 + 4e-4) / 2 over 4 df; se sqrt(2.5e-4) * sqrt(1/3 + 1/3); t(0.975, 4)
    se = 2.5e-4 ** 0.5 * (2 / 3) ** 0.5
    assert (result.gain, result.se, result.df) == (pytest.approx(0.09), pytest.approx(se), 4)
    assert (result.low95, result.high95) == (pytest.approx(0.09 - 2.776445 * se), pytest.approx(0.09 + 2.776445 * se))
    assert result.excludes_zero and result.claimed == pytest.approx(0.900125 - 0.7005)  # the night's own figure
    assert result.line() == (f"the night improved val_bpb by 0.090000 (95 % interval [{result.low95:.6f}, "
                             f"{result.high95:.6f}]); the interval excludes 0: the night's best is better than "
                             "the baseline.")
    rows = [r for r in rows_of(night) if r.kind == RERUN]
    assert [(r.id, r.target_id, r.seed) for r in rows] == [(r.rerun_id, r.target_id, r.seed) for r in result.runs]


def test_a_disturbed_fresh_run_is_left_out_and_later_verifies_take_new_seeds(night):
    best = night.ids["best"]
    fake = FakeRerun({"e0001": [0.90, 0.90, 0.90], best: [0.91, 0.89, 0.50]}, steps={best: [20, 20, 10]})
    result, _ = run_verify(night, fake)
    assert [r.left_out for r in result.runs] == [None] * 5 + ["trained 10 steps where the same code usually trains 20"]
    assert result.values(best) == [0.91, 0.89] and result.gain == pytest.approx(0.0)
    assert not result.excludes_zero and "the interval includes 0: these runs cannot tell" in result.line()

    again = FakeRerun({"e0001": [0.9, 0.9], best: [0.8, 0.81]})
    run_verify(night, again, runs=2)
    assert [seed for _, seed in again.calls] == [1003, 1003, 1004, 1004]  # never a seed run before


def test_too_many_failed_runs_are_one_sentence(night):
    best = night.ids["best"]
    fake = FakeRerun({"e0001": [0.9, 0.9], best: [None, None]})
    with pytest.raises(verifies.VerifyFailed, match="2 of the 4 fresh runs failed or were disturbed"):
        run_verify(night, fake, runs=2)


def test_verify_end_to_end(night, sandbox):
    best, before = night.ids["best"], len(rows_of(night))
    result = invoke(night.runs, "verify")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"verify {best} (set {{'LR': 0.3}}) against the baseline e0001 on fresh seeds:"
    assert lines[2].split() == ["1000", "0.900000", "0.700000"] and lines[5].split() == ["mean", "0.900000", "0.700000"]
    assert lines[6] == ("the night improved val_bpb by 0.200000 (95 % interval [0.197733, 0.202267]); "
                        "the interval excludes 0: the night's best is better than the baseline.")
    assert "the night's own decisions claimed 0.199625" in lines[7]
    assert "[6/6] rerunning" in result.stderr  # progress goes to stderr
    assert [(r.kind, r.target_id, r.seed, r.status) for r in rows_of(night)[before:]] == [
        (RERUN, target, seed, Status.DONE) for seed in (1000, 1001, 1002) for target in ("e0001", best)]
    assert [s.env["AR_SEED"] for s in sandbox.specs[-12:]] == [str(s) for s in (1000, 1001, 1002) for _ in range(4)]

    data = json.loads(invoke(night.runs, "verify", "--runs", "2", "--json").stdout)
    assert (data["best_id"], data["excludes_zero"], data["df"]) == (best, True, 2)
    assert [r["seed"] for r in data["runs"]] == [1003, 1003, 1004, 1004]


def test_nothing_kept_is_said_and_not_an_error(project):
    recorded = record_night(project, script=(change(LR=0.05),))  # worse than the baseline: discarded
    result = invoke(recorded.runs, "verify")
    assert (result.exit_code, result.output) == (0, "nothing was kept in night t: there is no gain to verify.\n")


def test_errors_are_one_line_and_run_nothing(night, sandbox, monkeypatch):
    before = (len(sandbox.runs), len(rows_of(night)))
    assert "there is no night 'nope'" in one_line_error(invoke(night.runs, "verify", "--tag", "nope"))
    too_few = invoke(night.runs, "verify", "--runs", "1")  # a usage error, as click reports them
    assert too_few.exit_code == 2 and "Invalid value for '--runs': 1 is not in the range x>=2" in too_few.output
    (night.data / "manifest.json").unlink()
    assert "the data of e0001 is gone" in one_line_error(invoke(night.runs, "verify"))

    def no_docker(name):
        raise SandboxUnavailable("no Docker engine answers; start it or use --sandbox process.")

    monkeypatch.setattr(reruns, "open_backend", no_docker)
    assert "no Docker engine answers" in one_line_error(invoke(night.runs, "verify"))
    assert (len(sandbox.runs), len(rows_of(night))) == before
