"""The ledger: schema migrations, WAL, the lifecycle, resume bookkeeping, export."""

import io
import re
import sqlite3
import threading

import pytest

from runner.core.ledger import (
    BASELINE, CONFIRM, EXPERIMENT, MIGRATIONS, SCHEMA_VERSION, Ledger, LedgerError, LedgerUnavailable,
    metric_columns, outcome_fields, write_tsv,
)
from sandbox.experiment import ExperimentOutcome
from sandbox.spec import Killer, RunResult
from sandbox.status import Status


def _other_connection(ledger):
    return sqlite3.connect(ledger.path)


def test_new_ledger_is_at_the_latest_schema_in_wal_mode(ledger):
    assert ledger.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    with _other_connection(ledger) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrates_an_older_ledger_and_keeps_its_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    old = Ledger(path, migrations=MIGRATIONS[:1])
    assert old.schema_version == 1
    with _other_connection(old) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(experiments)")}
    assert "seed" not in columns  # really the older schema
    old._db.execute(
        "INSERT INTO experiments (seq, id, kind, status, description, created_at, updated_at) "
        "VALUES (1, 'e0001', 'baseline', 'done', 'old row', 'then', 'then')"
    )
    old.close()

    new = Ledger(path)
    assert new.schema_version == SCHEMA_VERSION
    row = new.get("e0001")
    assert (row.description, row.status, row.seed, row.review_state) == ("old row", "done", None, None)
    new.update("e0001", seed=7)
    assert new.get("e0001").seed == 7
    assert new.add(kind=EXPERIMENT, status="proposed").id == "e0002"
    new.close()


def test_a_run_records_what_its_image_was_built_on(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path, migrations=MIGRATIONS[:4]).close()  # a ledger from before the runtime was recorded
    ledger = Ledger(path)
    row = ledger.add(kind=EXPERIMENT, status="proposed")
    assert row.runtime is None
    runtime = "pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime@sha256:" + "0f" * 32
    run = RunResult(Status.CRASH, 1, Killer.NONE, 1.0, tmp_path / "train.log", isolation="docker", runtime=runtime)
    ledger.update(row.id, **outcome_fields(ExperimentOutcome("crash", None, {}, {}, run, None, {})))
    assert ledger.get(row.id).runtime == runtime
    ledger.close()


def test_refuses_a_ledger_from_a_newer_version(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    with pytest.raises(LedgerError, match="newer version"):
        Ledger(path, migrations=MIGRATIONS[:1])


def test_lifecycle_transitions_are_committed_at_once_and_checked(ledger):
    row = ledger.add(kind=EXPERIMENT, status="proposed", description="x", diff="d")
    assert row.id == "e0001" and row.status == "proposed"
    for status in ("built", "training", "evaluating", "done"):
        ledger.transition(row.id, status)
        with _other_connection(ledger) as db:  # visible to another reader: committed, not buffered
            assert db.execute("SELECT status FROM experiments WHERE id='e0001'").fetchone()[0] == status
    with pytest.raises(LedgerError, match="cannot go from done to training"):
        ledger.transition(row.id, "training")
    with pytest.raises(LedgerError, match="transition"):
        ledger.update(row.id, status="crash")
    with pytest.raises(LedgerError, match="unknown ledger columns"):
        ledger.update(row.id, no_such_column=1)
    with pytest.raises(LedgerError, match="cannot start"):
        ledger.add(kind=EXPERIMENT, status="training")
    with pytest.raises(LedgerError, match="no experiment"):
        ledger.transition("e9999", "built")


def test_a_resumed_run_may_start_training_again_and_fail(ledger):
    row = ledger.add(kind=EXPERIMENT, status="built", image="img")
    ledger.transition(row.id, "training")
    ledger.transition(row.id, "evaluating")
    ledger.transition(row.id, "training")  # killed during phase 2: the whole experiment reruns
    ledger.transition(row.id, "cancelled")
    assert ledger.get(row.id).status == "cancelled"


def test_ids_stay_unique_with_many_writer_threads(ledger):
    def add_many():
        for _ in range(20):
            ledger.add(kind=EXPERIMENT, status="proposed")

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [row.id for row in ledger.experiments()]
    assert ids == [f"e{n:04d}" for n in range(1, 81)]


def test_an_empty_file_is_no_ledger_and_stays_as_it_is(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.touch()
    with pytest.raises(LedgerUnavailable, match="is an empty file, not a ledger"):
        Ledger(path)
    assert path.stat().st_size == 0


@pytest.mark.parametrize("ledger_file", ["missing", "empty"])
def test_no_ledger_is_made_beside_the_runs_of_another(tmp_path, ledger_file):
    path = tmp_path / "ledger.sqlite"
    for seq in (1, 2, 3, 4, 10_000):
        (tmp_path / f"e{seq:04d}").mkdir()
    if ledger_file == "empty":
        path.touch()
    with pytest.raises(LedgerUnavailable, match=re.escape(f"{tmp_path} holds the runs e0001 to e10000")):
        Ledger(path)
    left = {"e0001", "e0002", "e0003", "e0004", "e10000"} | ({"ledger.sqlite"} if ledger_file == "empty" else set())
    assert {p.name for p in tmp_path.iterdir()} == left  # no ledger made, nothing written


def test_no_id_is_handed_out_whose_run_directory_exists(ledger):
    """A ledger restored from before its last runs: the next id is taken already, and refused."""
    ledger.add(kind=EXPERIMENT, status="proposed")
    (ledger.path.parent / "e0002").mkdir()
    (ledger.path.parent / "e0002" / "train.log").write_text("an earlier run")
    with pytest.raises(LedgerUnavailable, match="e0002 already exists but the ledger .* has no e0002"):
        ledger.add(kind=EXPERIMENT, status="proposed")
    assert [row.id for row in ledger.experiments()] == ["e0001"]
    assert (ledger.path.parent / "e0002" / "train.log").read_text() == "an earlier run"


def test_resume_bookkeeping(ledger):
    statuses = ["proposed", "built", "done", "rejected", "crash", "cancelled"]
    rows = [ledger.add(kind=EXPERIMENT, status="built" if s != "proposed" and s != "rejected" else s)
            for s in statuses]
    for status in ("training", "evaluating"):
        ledger.transition(rows[2].id, status)
    ledger.transition(rows[2].id, "done", val_bpb=1.0)
    for row, status in zip(rows[4:], statuses[4:]):
        ledger.transition(row.id, "training")
        ledger.transition(row.id, status)
    training = ledger.add(kind=BASELINE, status="built")
    ledger.transition(training.id, "training")
    evaluating = ledger.add(kind=EXPERIMENT, status="built")
    ledger.transition(evaluating.id, "training")
    ledger.transition(evaluating.id, "evaluating")

    assert [r.id for r in ledger.unfinished()] == [rows[0].id, rows[1].id, training.id, evaluating.id]
    assert [r.id for r in ledger.undecided()] == [rows[2].id]
    ledger.decide(rows[2].id, "discard", value=1.0, best_before=0.9, threshold=0.01, estimate={})
    assert ledger.undecided() == []


def test_best_kept_is_the_lowest_kept_value_and_keeps_enter_review(ledger):
    assert ledger.best_kept() is None
    a, b, c = (ledger.add(kind=EXPERIMENT, status="built") for _ in range(3))
    ledger.decide(a.id, "keep", value=0.9, best_before=1.0, threshold=0.01, estimate={})
    ledger.decide(b.id, "keep", value=0.8, best_before=0.9, threshold=0.01, estimate={})
    ledger.decide(c.id, "discard", value=0.7, best_before=0.8, threshold=0.01, estimate={})  # a discard never counts
    assert ledger.best_kept().id == b.id
    assert ledger.get(b.id).review_state == "pending" and ledger.get(c.id).review_state is None
    ledger.review(b.id, "accepted", "looks right")
    assert (ledger.get(b.id).review_state, ledger.get(b.id).review_note) == ("accepted", "looks right")
    with pytest.raises(LedgerError):
        ledger.review(b.id, "maybe")


def test_confirmation_rows_point_at_their_target_in_order(ledger):
    target = ledger.add(kind=EXPERIMENT, status="built")
    other = ledger.add(kind=EXPERIMENT, status="built")
    assert ledger.confirmations_of(target.id) == []
    first = ledger.add(kind=CONFIRM, status="built", target_id=target.id, seed=1)
    ledger.add(kind=CONFIRM, status="built", target_id=other.id, seed=1)
    second = ledger.add(kind=CONFIRM, status="built", target_id=target.id, seed=2)
    assert [r.id for r in ledger.confirmations_of(target.id)] == [first.id, second.id]


def test_a_decision_keeps_its_estimate_and_a_disturbed_run_does_not_count(ledger):
    row = ledger.add(kind=EXPERIMENT, status="built")
    ledger.transition(row.id, "training")
    ledger.transition(row.id, "evaluating")
    ledger.transition(row.id, "done", val_bpb=0.9)
    assert ledger.get(row.id).counts
    ledger.decide(row.id, "keep", value=0.9, best_before=1.0, threshold=0.05,
                  estimate={"gain": 0.1, "low95": 0.02, "high95": 0.18})
    assert ledger.get(row.id).estimate == {"gain": 0.1, "low95": 0.02, "high95": 0.18}
    ledger.update(row.id, disturbed="trained 5 steps where the same code usually trains 10")
    assert not ledger.get(row.id).counts


def test_nights_store_settings_and_noise(ledger):
    night = ledger.start_night("tag1", {"k": 2.0, "path": ledger.path})
    ledger.set_noise(night, mean=1.0, sigma=0.002, df=2, runs=3, threshold=0.004)
    ledger.end_night(night, "max-experiments")
    (record,) = ledger.nights()
    assert record.tag == "tag1" and record.sigma == 0.002 and record.threshold == 0.004
    assert record.noise_df == 2
    assert record.stop_reason == "max-experiments" and record.settings["k"] == 2.0


def test_metric_columns_map_the_summary_names():
    metrics = {"val_bpb": 1.25, "total_tokens_M": 3.5, "num_params_M": 1.0, "data_wait_percent": 2.0}
    assert metric_columns(metrics) == {"val_bpb": 1.25, "total_tokens_m": 3.5, "num_params_m": 1.0}


def test_tsv_export_in_the_reference_format(ledger):
    base = ledger.add(kind=BASELINE, status="built", description="baseline")
    kept = ledger.add(kind=EXPERIMENT, status="built", description="raise\tLR")
    crashed = ledger.add(kind=EXPERIMENT, status="built", description="bigger model")
    ledger.add(kind=EXPERIMENT, status="rejected", description="bad diff")
    for row in (base, kept, crashed):
        ledger.transition(row.id, "training")
    for row in (base, kept):
        ledger.transition(row.id, "evaluating")
    ledger.transition(base.id, "done", val_bpb=1.0, peak_vram_mb=2048.0)
    ledger.transition(kept.id, "done", val_bpb=0.9876543, peak_vram_mb=1536.0)
    ledger.decide(kept.id, "keep", value=0.9876543, best_before=1.0, threshold=0.001, estimate={})
    ledger.transition(crashed.id, "oom")
    out = io.StringIO()
    assert write_tsv(ledger, out) == 3
    assert out.getvalue().splitlines() == [
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription",
        "e0001\t1.000000\t2.0\tkeep\tbaseline",
        "e0002\t0.987654\t1.5\tkeep\traise LR",
        "e0003\t0.000000\t0.0\tcrash\tbigger model",
    ]
