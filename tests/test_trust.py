"""The trust boundary, piece by piece: the result protocol, the host's budget clock, what train.py
reports, the GPU cap setting, and which files make up an image (no Docker, no training)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import contract
from runner.core.settings import GpuMemoryCap, SettingsError
from sandbox.budget_guard import CPU_WALL_STRETCH, Account, Allowance, BudgetRule
from sandbox.experiment import _phase_status, read_reported
from sandbox.harness import HARNESS_FILES, harness_files
from sandbox.images import base_tag
from sandbox.snapshots import snapshot_id
from sandbox.spec import Killer, RunResult
from sandbox.status import Status
from tests.conftest import ROOT

NONCE = "a" * 32
RESULT = {"val_bpb_hex": (0.75).hex(), "eval_tokens": 1024, "eval_bytes": 4000, "num_params": 10,
          "probe_seed": "00ff", "probe_rows": 12, "probe_max_change": 0.0}


# -- the result line ---------------------------------------------------------------------------


def test_the_result_line_round_trips():
    assert contract.parse_result(f"noise\n{contract.result_line(NONCE, RESULT)}\nmore\n", NONCE) == {
        **RESULT, "val_bpb": 0.75}


@pytest.mark.parametrize("log, why", [
    ("---\nval_bpb: 0.100000\n", "0 result lines"),  # the old summary block means nothing
    (contract.result_line("b" * 32, RESULT), "0 result lines"),  # another run's (or a guessed) nonce
    (contract.result_line(NONCE, RESULT) + "\n" + contract.result_line(NONCE, RESULT), "2 result lines"),
    (f"{contract.RESULT_TAG} {NONCE} {{not json", "not JSON"),
    (contract.result_line(NONCE, {**RESULT, "depth": "1\n---\nval_bpb: 0.1"}), "exactly the expected fields"),
    (contract.result_line(NONCE, {k: v for k, v in RESULT.items() if k != "eval_bytes"}), "exactly the expected"),
    (contract.result_line(NONCE, {**RESULT, "probe_max_change": math.nan}), "finite float"),
    (contract.result_line(NONCE, {**RESULT, "eval_tokens": "1024"}), "finite int"),
    (contract.result_line(NONCE, {**RESULT, "eval_tokens": True}), "finite int"),
    (contract.result_line(NONCE, {**RESULT, "val_bpb_hex": "0.1"}), "not a float in hex"),
    (contract.result_line(NONCE, {**RESULT, "val_bpb_hex": (-1.0).hex()}), "positive finite"),
    (contract.result_line(NONCE, {**RESULT, "val_bpb_hex": math.inf.hex()}), "positive finite"),
])
def test_anything_but_one_valid_signed_line_is_refused(log, why):
    with pytest.raises(contract.ResultError, match=why):
        contract.parse_result(log, NONCE)


def test_a_result_line_split_by_carriage_returns_is_still_one_line():
    assert contract.parse_result("step 1\rstep 2\r" + contract.result_line(NONCE, RESULT), NONCE)["val_bpb"] == 0.75


# -- what train.py reports ------------------------------------------------------------------------


def test_reported_figures_keep_finite_numbers_of_known_keys_only(tmp_path):
    (tmp_path / contract.REPORT_FILE).write_text(
        '{"mfu_percent": 31.5, "depth": "1\\n---\\nval_bpb: 0.1", "val_bpb": 0.1, "tokens_per_second": NaN, '
        '"peak_vram_mb": Infinity, "num_params_M": true, "total_tokens_M": 2}')
    (tmp_path / contract.TRACE_FILE).write_text(json.dumps({"time_budget": 1.0, "warmup_steps": 3, "num_steps": 5,
                                                            "progress": [0, 0, 0, 0, 0.5], "step_seconds": [9, 9, 9, 0.5, 0.5]}))
    reported = read_reported(tmp_path)
    assert reported == {"mfu_percent": 31.5, "total_tokens_M": 2.0, "num_steps": 5.0, "training_seconds": 1.0}


def test_unreadable_or_huge_reports_are_ignored(tmp_path):
    (tmp_path / contract.REPORT_FILE).write_text("[1, 2")
    (tmp_path / contract.TRACE_FILE).write_bytes(b"{" + b" " * (2**20 + 1) + b"}")
    assert read_reported(tmp_path) == {}
    (tmp_path / contract.TRACE_FILE).write_text(json.dumps({"warmup_steps": 3, "step_seconds": [1, -5, "x"]}))
    assert read_reported(tmp_path) == {}


def test_the_harness_exit_codes_name_the_status(tmp_path):
    def run(status, code):
        return RunResult(status, code, Killer.NONE, 1.0, tmp_path / "log")

    assert _phase_status(run(Status.CRASH, contract.EXIT_GPU_OOM)) == "gpu_oom"
    assert _phase_status(run(Status.CRASH, contract.EXIT_PROBE_FAILED)) == "probe_failed"
    assert _phase_status(run(Status.CRASH, 1)) == "crash"
    assert _phase_status(run(Status.TIMEOUT, None)) == "timeout"


# -- the host's budget clock ------------------------------------------------------------------------


ALLOW = Allowance(startup_s=30.0, export_s=10.0, busy_before_s=3.0, busy_after_s=2.0, cpu_before_s=30.0,
                  cpu_after_s=15.0)


def account(budget: float = 100.0, **rule) -> Account:
    return Account(BudgetRule(budget, ALLOW, **rule), started=1000.0)


def start(acc: Account, at: float) -> None:
    acc.on_line("step 3 | loss 6.0")
    acc.on_line("  " + contract.BUDGET_START_MARK + "  ")
    acc.budget_started = at  # the host's own time of reading the mark (on_line takes the clock)
    acc.on_line(contract.BUDGET_START_MARK)  # a second announcement moves nothing


def test_the_budget_must_start_within_the_startup_allowance():
    acc = account()
    assert acc.overdue(now=1029.0) is None
    assert "did not start within the start-up allowance of 30 s" in acc.overdue(now=1031.0)


def test_the_run_is_stopped_once_budget_and_export_allowance_are_over():
    acc = account()
    start(acc, 1020.0)
    assert acc.budget_started == 1020.0
    assert acc.overdue(now=1129.0) is None  # 100 s budget + 10 s export
    assert "training past the budget" in acc.overdue(now=1131.0)


def test_a_replayed_rerun_gets_a_little_more_wall_time():
    acc = account(replay=True)
    start(acc, 1020.0)
    assert acc.overdue(now=1140.0) is None


def test_gpu_work_outside_the_budget_is_over_budget():
    acc = account()
    acc.on_gpu_busy(2.0, 1009.5, 1010.0)  # compilation and warm-up: within 3 s
    start(acc, 1020.0)
    acc.on_gpu_busy(99.5, 1020.0, 1120.0)
    acc.on_gpu_busy(1.0, 1120.0, 1121.0)
    acc.on_gpu_busy(0.5, 1124.5, 1125.0)  # export: within 2 s
    assert acc.finish(exited=1126.0) is None
    assert acc.report()["busy_before_s"] == 2.0 and acc.report()["exited_after_s"] == 6.0

    early = account()
    early.on_gpu_busy(20.0, 995.0, 1015.0)  # training before the budget started
    start(early, 1020.0)
    assert "busy 20.0 s before the budget" in early.finish(exited=1100.0)

    late = account()
    start(late, 1020.0)
    late.on_gpu_busy(20.0, 1110.0, 1130.0)  # a sample across the budget's end: half of it after
    assert late.busy["after"] == 10.0
    assert "busy 10.0 s after the budget ended (allowed 2.5 s)" in late.finish(exited=1131.0)  # 2 s + 5 % of 10 s


def test_cpu_time_outside_the_budget_is_over_budget_on_the_cpu_profile():
    acc = account()
    acc.on_cpu_total(0.0, at=1000.5)
    acc.on_cpu_total(2.5, at=1010.0)  # imports
    acc.on_cpu_total(2.5, at=1020.0)  # samples come every half second; here, the one at the budget's start
    start(acc, 1020.0)
    acc.on_cpu_total(200.0, at=1120.0)  # two threads training
    acc.on_cpu_total(201.0, at=1125.0)  # export
    acc.on_cpu_total(200.5, at=1125.5)  # a process gone before it was counted: never negative
    assert acc.finish(exited=1126.0) is None
    assert (acc.report()["cpu_before_s"], acc.report()["cpu_after_s"]) == (2.5, 1.0)

    late = account()
    late.on_cpu_total(0.0, at=1020.0)
    start(late, 1020.0)
    late.on_cpu_total(200.0, at=1120.0)
    late.on_cpu_total(220.0, at=1124.0)  # export, or training on: within 15 s + 5 % of the 200 s of the budget
    assert late.overdue(now=1124.0) is None
    late.on_cpu_total(240.0, at=1128.0)  # training on after the budget, inside the wall allowance
    assert late.overdue(now=1128.0) is None  # its trace may yet excuse a step of up to one more allowance: 15 s
    late.on_cpu_total(270.0, at=1130.0)
    # stopped at once, not at the end of the wall allowance: its compute after the budget only grows
    assert "the run used the CPU 70.0 s after the budget ended (allowed 40.0 s)" in late.overdue(now=1130.0)
    assert "the run used the CPU 70.0 s after the budget ended (allowed 25.0 s)" in late.finish(exited=1130.5)
    spread = account()
    spread.on_cpu_total(0.0, at=1000.0)
    start(spread, 1010.0)
    spread.on_cpu_total(20.0, at=1020.0)  # one sample across the budget's start: shared by time
    assert (spread.cpu["before"], spread.cpu["during"]) == (10.0, 10.0)


def test_compute_before_the_budget_stops_the_run_once_no_budget_could_excuse_it():
    """Start-up compute is held to the allowance plus the share of the most the budget can take."""
    acc = account(cpu_threads=2)  # at most 200 CPU seconds in the budget: a share of 10 s
    acc.on_cpu_total(0.0, at=1000.0)
    acc.on_cpu_total(39.0, at=1010.0)  # 30 s allowed + 10 s share: a large model's start-up may still be honest
    assert acc.overdue(now=1010.0) is None
    acc.on_cpu_total(41.0, at=1011.0)
    assert "the run used the CPU 41.0 s before the budget started (allowed 40.0 s)" in acc.overdue(now=1011.0)

    gpu = account()  # a 100 s budget: at most 100 busy seconds of the GPU, a share of 5 s
    gpu.on_gpu_busy(7.5, 1000.0, 1010.0)
    assert gpu.overdue(now=1010.0) is None
    gpu.on_gpu_busy(1.0, 1010.0, 1011.0)
    assert "the GPU was busy 8.5 s before the budget started (allowed 8.0 s)" in gpu.overdue(now=1011.0)


def test_on_the_cpu_profile_the_budget_is_cpu_time_so_other_load_stretches_it():
    acc = account(cpu_threads=2)  # a 100 s budget of two threads: 200 CPU seconds
    start(acc, 1020.0)
    acc.on_cpu_total(0.0, at=1020.0)
    acc.on_cpu_total(100.0, at=1120.0)  # a loaded machine: half the CPU time in 100 wall seconds
    assert acc.budget_ended is None and acc.overdue(now=1200.0) is None
    acc.on_cpu_total(210.0, at=1230.0)  # its 200 CPU seconds are used up, 10 more after them
    assert (acc.budget_ended, acc.cpu["during"], acc.cpu["after"]) == (1230.0, 200.0, 10.0)
    acc.on_cpu_total(212.0, at=1235.0)  # export
    assert acc.cpu["after"] == 12.0
    # the export allowance (10 s, stretched like every wall bound on the CPU) counts from the budget's end
    assert acc.overdue(now=1230.0 + 10 * CPU_WALL_STRETCH - 1) is None
    assert "training past the budget" in acc.overdue(now=1230.0 + 10 * CPU_WALL_STRETCH + 1)
    assert acc.finish(exited=1236.0) is None and acc.report()["exited_after_s"] == 6.0


def test_a_run_that_gets_a_sixth_of_a_two_core_machine_is_not_taken_for_a_cheat():
    """Three nights on two cores (seen here): a 100 s budget of two threads took six times its wall time.
    Its training must stay inside the budget's window, so its export alone counts after it."""
    acc = account(cpu_threads=2)
    start(acc, 1020.0)
    acc.on_cpu_total(0.0, at=1020.0)
    for second in range(60, 601, 60):  # 200 CPU seconds over 600 wall seconds
        acc.on_cpu_total(second / 3, at=1020.0 + second)
    acc.on_cpu_total(205.0, at=1640.0)  # export
    assert acc.finish(exited=1641.0) is None
    assert (acc.cpu["during"], acc.cpu["after"]) == (200.0, 5.0)


def test_a_cpu_budget_that_is_never_used_up_ends_at_the_wall_stretch():
    acc = account(cpu_threads=2)
    start(acc, 1020.0)
    acc.on_cpu_total(0.0, at=1020.0)
    acc.on_cpu_total(1.0, at=1400.0)  # asleep, or starved
    end = 1020.0 + (100 + 10) * CPU_WALL_STRETCH  # budget and export allowance, both stretched
    assert acc.overdue(now=end - 1) is None
    assert "training past the budget" in acc.overdue(now=end + 1)


def test_on_the_cpu_profile_start_up_may_take_longer_on_a_loaded_machine():
    acc = account(cpu_threads=2)
    assert acc.overdue(now=1000.0 + 30 * CPU_WALL_STRETCH - 1) is None  # start-up allowance 30 s, stretched
    assert "did not start within" in acc.overdue(now=1000.0 + 30 * CPU_WALL_STRETCH + 1)


def test_a_larger_model_gets_room_for_its_warm_up_steps():
    """Three untimed warm-up steps of a model 4x the baseline's cost more than the baseline's start-up did."""
    acc = account()
    acc.on_gpu_busy(4.5, 1005.0, 1015.0)  # 3 steps of 1.5 s: more than the 3 s measured on the baseline
    start(acc, 1020.0)
    acc.on_gpu_busy(99.0, 1020.0, 1120.0)
    assert acc.finish(exited=1122.0) is None  # 3 s + 5 % of 99 s


def test_on_a_gpu_the_gpu_time_decides_and_compilation_on_the_cpu_is_free():
    acc = account()
    acc.on_cpu_total(0.0, at=1000.5)
    acc.on_cpu_total(400.0, at=1015.0)  # torch.compile's workers
    acc.on_gpu_busy(1.0, 1014.0, 1015.0)
    start(acc, 1020.0)
    assert acc.finish(exited=1110.0) is None


def test_a_run_that_never_starts_the_budget_is_over_budget():
    assert "never started" in account().finish(exited=1010.0)


def test_allowances_are_measured_from_honest_runs_with_a_margin():
    reports = [{"started_after_s": 20.0, "exited_after_s": 2.0, "busy_before_s": 1.0, "busy_after_s": None},
               {"started_after_s": 30.0, "exited_after_s": 6.0, "busy_before_s": 4.0, "busy_after_s": None}]
    measured = Allowance.measured_from(reports, "gpu")
    # wall: 2x the worst, at least 15 s (liveness only); compute: 1.5x the worst, at least 3 s
    assert (measured.startup_s, measured.export_s) == (60.0, 15.0)
    assert (measured.busy_before_s, measured.busy_after_s, measured.cpu_before_s) == (6.0, 3.0, 3.0)
    assert measured.measured
    assert Allowance.measured_from([{"started_after_s": None}], "cpu") == Allowance.default("cpu")


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [("0.9", (0.9, None)), ("1", (1.0, None)), ("40GiB", (None, 40 * 2**30)),
                                          ("40", (None, 40 * 2**30)), ("none", (None, None))])
def test_gpu_memory_cap_is_a_share_or_gib(text, parsed):
    assert GpuMemoryCap.parse(text) == GpuMemoryCap(*parsed)


@pytest.mark.parametrize("text", ["lots", "-1", "nan"])
def test_a_bad_gpu_memory_cap_is_one_sentence(text):
    with pytest.raises(SettingsError, match="gpu-memory-cap"):
        GpuMemoryCap.parse(text)


# -- what goes into an image ------------------------------------------------------------------------


def test_the_data_builder_never_changes_an_image(tmp_path):
    """Only the harness files (and the base recipe) make an image: a corpus reader can change freely."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", ".carry", ".whl", "__pycache__"))
    before = (base_tag("runtime-id", copy), snapshot_id(harness_files(copy)))
    with open(copy / "dataprep" / "sources.py", "a") as f:
        f.write("\n# a change to a corpus reader\n")
    assert (base_tag("runtime-id", copy), snapshot_id(harness_files(copy))) == before
    for name in ("prepare.py", "evaluate.py"):
        with open(copy / name, "a") as f:
            f.write("\n# a change to the harness\n")
        assert base_tag("runtime-id", copy) != before[0] and snapshot_id(harness_files(copy)) != before[1]
        before = (base_tag("runtime-id", copy), snapshot_id(harness_files(copy)))
    assert set(HARNESS_FILES) == {"prepare.py", "evaluate.py", "contract.py"}


def test_the_harness_reads_no_data_building_code():
    for name in ("prepare.py", "evaluate.py"):
        source = (ROOT / name).read_text()
        assert "import dataprep" not in source and "from dataprep" not in source  # no hand-off to the host's builder
        assert all(word not in source for word in ("urllib", "subprocess", "tarfile", "rustbpe"))
    done = subprocess.run([sys.executable, "prepare.py", "--source", "offline"], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (2, "") and "python -m dataprep" in done.stderr


# -- the budget trace: the one thing of phase 1 a later run (rerun --exact) is given --------------------------

def _trace(**changes) -> dict:
    trace = {"time_budget": 5.0, "warmup_steps": 0, "num_steps": 3, "progress": [0.0, 0.25, 0.5],
             "step_seconds": [1.25, 1.25, 1.25]}
    return {**trace, **changes}


def test_a_trace_the_harness_wrote_is_read_and_replayed_as_steps_and_progress_only():
    trace = contract.parse_trace(json.dumps(_trace()))
    assert (trace.num_steps, trace.progress, trace.training_seconds) == (3, (0.0, 0.25, 0.5), 3.75)
    assert json.loads(contract.replay_schedule(trace)) == {"num_steps": 3, "progress": [0.0, 0.25, 0.5]}


@pytest.mark.parametrize("changes, why", [
    ({"stash": "AAAA"}, "exactly the keys"),  # anything beside the harness's keys
    ({"progress": [0.0, 0.25, 0.123456789]}, "grid"),  # free digits could hold weights
    ({"progress": [0.0, 0.5, 0.25]}, "backwards"),
    ({"progress": [0.0, 0.25, 1.5]}, "grid"),
    ({"progress": [0.0, 0.25]}, "num_steps values"),
    ({"num_steps": contract.MAX_TRACE_STEPS + 1}, "whole numbers"),
    ({"num_steps": 3.0}, "whole numbers"),
    ({"num_steps": True}, "whole numbers"),
    ({"step_seconds": [1.0, float("nan"), 1.0]}, "finite"),
    ({"step_seconds": [1.0, -1.0, 1.0]}, "finite"),
    ({"time_budget": "5"}, "time_budget"),
])
def test_a_trace_that_carries_more_is_refused(changes, why):
    with pytest.raises(contract.TraceError, match=why):
        contract.parse_trace(json.dumps(_trace(**changes)))


def test_a_trace_that_is_not_json_or_too_large_is_refused():
    for text in ("[" * 100_000, "not json", "x" * (contract.MAX_TRACE_BYTES + 1), "[]"):
        with pytest.raises(contract.TraceError):
            contract.parse_trace(text)


def test_what_a_replayed_schedule_can_hold_is_bounded():
    """A schedule is a non-decreasing sequence on the progress grid of at most MAX_TRACE_STEPS values: its
    information, whatever train.py wrote, is under 6 KiB, far below any model worth scoring."""
    bits = math.log2(math.comb(contract.MAX_TRACE_STEPS + contract.PROGRESS_GRID, contract.PROGRESS_GRID))
    assert bits + math.log2(contract.MAX_TRACE_STEPS + 1) < 6 * 1024 * 8
