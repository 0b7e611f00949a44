"""The night's record: one SQLite database per run tag (DESIGN §3.8).

Every lifecycle transition (§3.3) is committed before the work it announces
starts on the machine, so a runner killed at any point can resume from the
ledger alone: rows left `proposed`, `built`, `training` or `evaluating` are the
work still owed. WAL mode lets `status` and `review` read while the night writes;
one connection guarded by a lock serves all worker threads.

A ledger is never silently replaced: each row's directory (`e0001/`, ...) lies beside
the ledger, so a new ledger where runs already lie, or an empty file in its place,
would hand their ids out again and overwrite their logs and models. Both are refused
in one sentence, and no id whose directory exists is ever handed out.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TextIO

import structlog

from runner.core.errors import MachineError, UserError
from sandbox.status import Status

if TYPE_CHECKING:
    from sandbox.experiment import ExperimentOutcome

log = structlog.get_logger(__name__)

class _Recorded(enum.StrEnum):
    """A word the ledger records. A value this version does not know (written by a newer one) is read as it is,
    a member of no name that equals nothing else, so an old runner can still read and show a newer ledger."""

    @classmethod
    def _missing_(cls, value: object) -> _Recorded | None:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_, member._value_ = value, value
        return member


class Kind(_Recorded):
    """What a row is."""

    BASELINE = "baseline"  # the night's unmodified train.py, on the baseline seeds
    EXPERIMENT = "experiment"  # a proposal
    CONFIRM = "confirm"  # a candidate's train.py again, on its next seed
    # The best's train.py run again beside a candidate about to be kept (target_id: the candidate,
    # parent_id: the best), so that a keep is checked against the best measured in the same window.
    REFERENCE = "reference"
    RERUN = "rerun"  # morning work: `rerun` and `verify`


class Decision(_Recorded):
    """What the keep rule decided about an experiment (runner.core.decision)."""

    KEEP = "keep"
    DISCARD = "discard"


class ReviewState(_Recorded):
    """The morning review of a kept experiment (a keep enters the queue as pending)."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


BASELINE, EXPERIMENT, CONFIRM, REFERENCE, RERUN = Kind
PENDING, ACCEPTED, REJECTED = ReviewState
REVIEW_STATES = tuple(ReviewState)

# How a row reads in a sentence: "e0003 is an experiment that was discarded".
KIND_NOUNS = {BASELINE: "a baseline run", EXPERIMENT: "an experiment", CONFIRM: "a confirmation run",
              REFERENCE: "a reference run of the best",
              RERUN: "a rerun"}
DECISION_PHRASES = {Decision.KEEP: "was kept", Decision.DISCARD: "was discarded", None: "finished"}

# Figure names (as the harness and the host name them) -> ledger columns. A column is filled from the
# trusted figures (phase 2's result, the host's measurements) where they have it, else from what
# train.py reported; reported_json keeps the reported figures apart, so the source stays visible.
SUMMARY_COLUMNS = {
    "val_bpb": "val_bpb",
    "training_seconds": "training_seconds",
    "total_seconds": "total_seconds",
    "peak_vram_mb": "peak_vram_mb",
    "mfu_percent": "mfu_percent",
    "total_tokens_M": "total_tokens_m",
    "num_steps": "num_steps",
    "num_params_M": "num_params_m",
    "depth": "depth",
}

# Ordered migrations; PRAGMA user_version is the number applied. Never edit one
# that has shipped: append a new one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the experiment record and the nights.
    """
    CREATE TABLE nights (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tag TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        stop_reason TEXT,
        settings_json TEXT NOT NULL,
        baseline_mean REAL,
        sigma REAL,
        baseline_runs INTEGER,
        threshold REAL
    );
    CREATE TABLE experiments (
        seq INTEGER NOT NULL UNIQUE,
        id TEXT PRIMARY KEY,
        night_id INTEGER REFERENCES nights(id),
        parent_id TEXT,
        kind TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        diff TEXT NOT NULL DEFAULT '',
        train_sha256 TEXT,
        params_json TEXT,
        image TEXT,
        backend TEXT,
        isolation TEXT,
        data_hash TEXT,
        status TEXT NOT NULL,
        decision TEXT,
        decision_value REAL,
        best_before REAL,
        threshold REAL,
        decided_at TEXT,
        val_bpb REAL,
        val_bpb_text TEXT,
        training_seconds REAL,
        total_seconds REAL,
        peak_vram_mb REAL,
        mfu_percent REAL,
        total_tokens_m REAL,
        num_steps INTEGER,
        num_params_m REAL,
        depth INTEGER,
        metrics_json TEXT,
        build_seconds REAL,
        train_seconds REAL,
        eval_seconds REAL,
        train_exit_code INTEGER,
        eval_exit_code INTEGER,
        train_killed_by TEXT,
        eval_killed_by TEXT,
        peak_host_memory_bytes INTEGER,
        peak_gpu_memory_bytes INTEGER,
        gpu_uuid TEXT,
        gpu_name TEXT,
        gpu_driver TEXT,
        agent TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
        cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        reject_reason TEXT,
        log_tail TEXT,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX experiments_status ON experiments(status);
    """,
    # 2: repeated runs (confirmation under another seed, reruns) and the morning review.
    """
    ALTER TABLE experiments ADD COLUMN target_id TEXT;
    ALTER TABLE experiments ADD COLUMN seed INTEGER;
    ALTER TABLE experiments ADD COLUMN review_state TEXT;
    ALTER TABLE experiments ADD COLUMN review_note TEXT;
    CREATE INDEX experiments_decision ON experiments(decision);
    """,
    # 3: the trust boundary: the exact val_bpb, and train.py's own figures kept apart from measured ones.
    """
    ALTER TABLE experiments ADD COLUMN val_bpb_hex TEXT;
    ALTER TABLE experiments ADD COLUMN reported_json TEXT;
    ALTER TABLE nights ADD COLUMN allowance_json TEXT;
    """,
    # 4: decisions that replicate: runs too disturbed to compare, and the estimate each decision rests on.
    """
    ALTER TABLE experiments ADD COLUMN disturbed TEXT;
    ALTER TABLE experiments ADD COLUMN estimate_json TEXT;
    ALTER TABLE nights ADD COLUMN noise_df INTEGER;
    """,
    # 5: what each run's image was built from (the upstream image at its digest, or the offline runtime).
    """
    ALTER TABLE experiments ADD COLUMN runtime TEXT;
    """,
    # 6: the running night's sign of life (runner.core.heartbeat): `status` and the night's hours read it.
    """
    ALTER TABLE nights ADD COLUMN heartbeat_at TEXT;
    ALTER TABLE nights ADD COLUMN runner TEXT;
    """,
    # 7: where each run ran: the base's machine-independent recipe, the cluster node and the run's attempt.
    """
    ALTER TABLE experiments ADD COLUMN recipe TEXT;
    ALTER TABLE experiments ADD COLUMN node TEXT;
    ALTER TABLE experiments ADD COLUMN run_attempt INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nights ADD COLUMN cluster_json TEXT;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
BUSY_TIMEOUT_S = 10.0  # how long a statement waits for another process's lock before the ledger counts as locked
_RUN_DIR = re.compile(r"e\d{4,}")  # a row's directory beside the ledger (exp_id)


class LedgerError(UserError):
    """The ledger cannot be used as asked (newer schema, illegal transition, unknown id)."""


class LedgerUnavailable(LedgerError, MachineError):
    """The ledger file itself cannot be used: damaged, locked by another process, read-only, or its disk full."""


def _unavailable(path: Path, exc: sqlite3.Error) -> LedgerUnavailable:
    """What an SQLite error means for the user of the ledger at `path`, in one sentence."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        why = f"the ledger {path} is locked by another process (another autoresearch command on this night?)."
    elif name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        why = f"{path} is not a readable ledger ({exc}); move it aside, or start another night with a new --tag."
    elif name.startswith("SQLITE_FULL"):
        why = f"no space is left on the disk holding the ledger {path}."
    elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) and not os.access(path.parent, os.W_OK):
        why = f"the ledger {path} lies in a directory that cannot be written (read-only?); SQLite needs to write there."
    else:
        why = f"the ledger {path} cannot be used ({exc})."
    return LedgerUnavailable(why)


class _Connection(sqlite3.Connection):
    """A connection whose errors say, in one sentence, what is wrong with the ledger file."""

    path: Path

    def execute(self, *args: Any) -> sqlite3.Cursor:
        try:
            return super().execute(*args)
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from exc

    def executescript(self, script: str) -> sqlite3.Cursor:
        try:
            return super().executescript(script)
        except sqlite3.Error as exc:
            raise _unavailable(self.path, exc) from exc


@dataclass(frozen=True)
class NightRecord:
    """One invocation of a night, as the `nights` table keeps it, its JSON columns decoded here and nowhere else."""

    id: int
    tag: str
    started_at: str
    ended_at: str | None
    stop_reason: str | None
    settings: dict[str, Any]  # what the invocation ran with (Settings.record() plus what the night resolved)
    baseline_mean: float | None  # the noise at the start of its experiments (set_noise) ...
    sigma: float | None
    noise_df: int | None
    baseline_runs: int | None
    threshold: float | None  # ... and the smallest gain a keep needed then
    allowance: dict[str, Any] | None  # what phase 1 may spend beside its budget, measured on the baselines
    heartbeat_at: str | None
    runner: str | None  # `host pid:start` of the process that ran it (runner.core.heartbeat)
    cluster: dict[str, Any]  # the cluster's inventory ({} for a night on one machine)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> NightRecord:
        return cls(id=row["id"], tag=row["tag"], started_at=row["started_at"], ended_at=row["ended_at"],
                   stop_reason=row["stop_reason"], settings=json.loads(row["settings_json"]),
                   baseline_mean=row["baseline_mean"], sigma=row["sigma"], noise_df=row["noise_df"],
                   baseline_runs=row["baseline_runs"], threshold=row["threshold"],
                   allowance=json.loads(row["allowance_json"]) if row["allowance_json"] else None,
                   heartbeat_at=row["heartbeat_at"], runner=row["runner"],
                   cluster=json.loads(row["cluster_json"]) if row["cluster_json"] else {})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Experiment:
    """One ledger row (mirrors the latest schema)."""

    seq: int
    id: str
    night_id: int | None
    parent_id: str | None
    kind: Kind
    description: str
    diff: str
    train_sha256: str | None
    params_json: str | None
    image: str | None
    backend: str | None
    isolation: str | None
    data_hash: str | None
    status: Status
    decision: Decision | None
    decision_value: float | None
    best_before: float | None
    threshold: float | None
    decided_at: str | None
    val_bpb: float | None
    val_bpb_text: str | None
    training_seconds: float | None
    total_seconds: float | None
    peak_vram_mb: float | None
    mfu_percent: float | None
    total_tokens_m: float | None
    num_steps: int | None
    num_params_m: float | None
    depth: int | None
    metrics_json: str | None
    build_seconds: float | None
    train_seconds: float | None
    eval_seconds: float | None
    train_exit_code: int | None
    eval_exit_code: int | None
    train_killed_by: str | None
    eval_killed_by: str | None
    peak_host_memory_bytes: int | None
    peak_gpu_memory_bytes: int | None
    gpu_uuid: str | None
    gpu_name: str | None
    gpu_driver: str | None
    agent: str | None
    attempts: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float
    reject_reason: str | None
    log_tail: str | None
    error: str | None
    created_at: str
    updated_at: str
    target_id: str | None
    seed: int | None
    review_state: ReviewState | None
    review_note: str | None
    val_bpb_hex: str | None
    reported_json: str | None
    disturbed: str | None  # why this run is not comparable with the same code's other runs (None: it is)
    estimate_json: str | None  # decided rows: the gain estimate the decision rests on (runner.core.decision.Estimate)
    runtime: str | None  # what the image's runtime was built from: upstream image@digest, or the offline runtime's tag
    recipe: str | None  # the backend's recipe (Backend.recipe): equal wherever the image is built from the same inputs
    node: str | None  # the cluster node the run ran on ("host/node id"); None: the runner's own machine
    run_attempt: int  # how many times the run was started (a node lost mid-run, a resumed night)

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json) if self.params_json else {}

    def __post_init__(self) -> None:  # sqlite hands back text
        self.status = Status(self.status)
        self.kind = Kind(self.kind)
        self.decision = None if self.decision is None else Decision(self.decision)
        self.review_state = None if self.review_state is None else ReviewState(self.review_state)

    @property
    def metrics(self) -> dict[str, float]:
        """Measured figures: phase 2's result and the host's own measurements."""
        return json.loads(self.metrics_json) if self.metrics_json else {}

    @property
    def reported(self) -> dict[str, float]:
        """What train.py's process reported about itself (untrusted, never decisive)."""
        return json.loads(self.reported_json) if self.reported_json else {}

    @property
    def estimate(self) -> dict[str, float]:
        """gain, se, df, runs, best_runs, low95, high95 of the decision (empty before one)."""
        return json.loads(self.estimate_json) if self.estimate_json else {}

    @property
    def counts(self) -> bool:
        """A finished run whose val_bpb enters estimates."""
        return self.status is Status.DONE and self.disturbed is None and self.val_bpb is not None


_COLUMNS = tuple(f.name for f in dataclasses.fields(Experiment))


def outcome_phrase(row: Experiment) -> str:
    """How `row` ended, as the verb of a sentence: "was discarded", "crashed", "has not run yet"."""
    if row.status is Status.DONE:
        return DECISION_PHRASES.get(row.decision, f"was decided {row.decision}")
    return row.status.phrase


def describe(row: Experiment) -> str:
    """What `row` is, for a sentence: "an experiment that was discarded", "a baseline run that crashed"."""
    return f"{KIND_NOUNS.get(row.kind, f'a {row.kind} row')} that {outcome_phrase(row)}"


def metric_columns(metrics: dict[str, float]) -> dict[str, float]:
    """The summary metrics that have a column of their own (all of them stay in metrics_json)."""
    return {column: metrics[key] for key, column in SUMMARY_COLUMNS.items() if key in metrics}


def outcome_fields(outcome: ExperimentOutcome) -> dict[str, Any]:
    """The columns an experiment's outcome fills; one mapping for nights and reruns."""
    runs = [r for r in (outcome.train, outcome.eval) if r is not None]
    metrics = outcome.metrics
    fields = {
        "train_seconds": outcome.phase_seconds.get("train"),
        "eval_seconds": outcome.phase_seconds.get("eval"),
        "train_exit_code": outcome.train.exit_code,
        "train_killed_by": outcome.train.killed_by.value,
        "eval_exit_code": outcome.eval.exit_code if outcome.eval else None,
        "eval_killed_by": outcome.eval.killed_by.value if outcome.eval else None,
        "peak_host_memory_bytes": _peak(r.peak_host_memory_bytes for r in runs),
        "peak_gpu_memory_bytes": _peak(r.peak_gpu_memory_bytes for r in runs),
        "log_tail": outcome.failure_log or None,
        "metrics_json": json.dumps(metrics),
        "reported_json": json.dumps(outcome.reported),
        "val_bpb_hex": outcome.result.get("val_bpb_hex"),
        "val_bpb_text": f"{outcome.val_bpb:.6f}" if outcome.val_bpb is not None else None,
        **metric_columns(outcome.reported),
        **metric_columns(metrics),  # measured figures win where both have one
    }
    if outcome.train.isolation:  # the level the backend actually reached for this run
        fields["isolation"] = outcome.train.isolation
    if outcome.train.runtime:  # read from the image that ran
        fields["runtime"] = outcome.train.runtime
    return fields


def budget_account(row: Experiment) -> dict[str, float]:
    """The host's budget account of a row's phase 1 (sandbox.budget_guard.Account.report), from its metrics."""
    return {key.removeprefix("budget_"): value for key, value in row.metrics.items() if key.startswith("budget_")}


def _peak(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def parse_time(text: str | None) -> datetime | None:
    """A timestamp as the ledger writes it (`now`), None for none."""
    if not text:
        return None
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def exp_id(seq: int) -> str:
    return f"e{seq:04d}"


def _refuse_replacing(path: Path) -> None:
    """Refuse an empty file as a ledger, and a new ledger beside the runs of another: both would reuse their ids."""
    runs = sorted((entry.name for entry in os.scandir(path.parent) if _RUN_DIR.fullmatch(entry.name)),
                  key=lambda name: (len(name), name))
    empty = path.is_file() and path.stat().st_size == 0
    if empty and not runs:
        raise LedgerUnavailable(f"the ledger {path} is an empty file, not a ledger; remove it to start the night "
                                "afresh, or start another night with a new --tag.")
    if runs and (empty or not path.exists()):
        raise LedgerUnavailable(f"the ledger {path} is {'an empty file' if empty else 'missing'}, but {path.parent} "
                                f"holds the runs {runs[0]} to {runs[-1]} of an earlier night; restore the ledger "
                                "from a backup, or start another night with a new --tag.")


class Ledger:
    """The SQLite ledger at `path` (created and migrated on open)."""

    def __init__(self, path: Path, migrations: tuple[str, ...] = MIGRATIONS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_replacing(path)
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=_Connection,
                                       timeout=BUSY_TIMEOUT_S)
        except sqlite3.Error as exc:
            raise _unavailable(path, exc) from exc
        self._db.path = path
        self._db.row_factory = sqlite3.Row
        try:  # a damaged or locked file fails here, before any command relies on it
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate(migrations)
        except BaseException:
            self._db.close()
            raise

    def _migrate(self, migrations: tuple[str, ...]) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(migrations):
                raise LedgerError(
                    f"{self.path} was written by a newer version (schema {version}); upgrade autoresearch-sandbox."
                )
            for number, script in enumerate(migrations[version:], start=version + 1):
                # executescript commits first; BEGIN makes the script and the version bump one step.
                self._db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- nights ---------------------------------------------------------------

    def start_night(self, tag: str, settings: dict[str, Any], runner: str | None = None) -> int:
        """A new invocation of the night; `runner` names the process that runs it (runner.core.heartbeat)."""
        stamp = now()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO nights (tag, started_at, heartbeat_at, runner, settings_json) VALUES (?, ?, ?, ?, ?)",
                (tag, stamp, stamp, runner, json.dumps(settings, sort_keys=True, default=str)),
            )
            return int(cur.lastrowid)

    def heartbeat(self, night_id: int) -> None:
        """The invocation is alive now."""
        with self._lock:
            self._db.execute("UPDATE nights SET heartbeat_at=? WHERE id=?", (now(), night_id))

    def set_noise(self, night_id: int, *, mean: float, sigma: float, df: int, runs: int, threshold: float) -> None:
        """The noise at the start of the night's experiments, and the smallest gain a keep needed then."""
        with self._lock:
            self._db.execute(
                "UPDATE nights SET baseline_mean=?, sigma=?, noise_df=?, baseline_runs=?, threshold=? WHERE id=?",
                (mean, sigma, df, runs, threshold, night_id),
            )

    def set_cluster(self, night_id: int, inventory: dict[str, Any]) -> None:
        """The cluster the night runs on: its nodes, their GPUs and slots, and the nodes refused (runner.night.cluster)."""
        with self._lock:
            self._db.execute("UPDATE nights SET cluster_json=? WHERE id=?",
                             (json.dumps(inventory, sort_keys=True), night_id))

    def set_allowance(self, night_id: int, allowance: dict[str, Any]) -> None:
        """What phase 1 may spend beside its budget, as measured on the night's baselines."""
        with self._lock:
            self._db.execute("UPDATE nights SET allowance_json=? WHERE id=?", (json.dumps(allowance), night_id))

    def end_night(self, night_id: int, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE nights SET ended_at=?, stop_reason=? WHERE id=?", (now(), reason, night_id)
            )

    def nights(self) -> list[NightRecord]:
        """Every invocation of the night, oldest first."""
        with self._lock:
            return [NightRecord.from_row(dict(r)) for r in self._db.execute("SELECT * FROM nights ORDER BY id")]

    # -- experiments ------------------------------------------------------------

    def add(self, *, kind: str, status: Status, **fields: Any) -> Experiment:
        """Insert a new row with the next id (e0001, e0002, ...) and return it."""
        if status not in (Status.PROPOSED, Status.REJECTED, Status.BUILT):
            raise LedgerError(f"a new experiment cannot start as {status!r}")
        self._check_columns(fields)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM experiments").fetchone()[0]
                if (directory := self.path.parent / exp_id(seq)).exists():
                    raise LedgerUnavailable(
                        f"{directory} already exists but the ledger {self.path} has no {exp_id(seq)}, so it is "
                        "not the ledger its runs were recorded in; restore that one, or start another night "
                        "with a new --tag."
                    )
                stamp = now()
                row = {"seq": seq, "id": exp_id(seq), "kind": kind, "status": status,
                       "created_at": stamp, "updated_at": stamp, **fields}
                names = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                self._db.execute(f"INSERT INTO experiments ({names}) VALUES ({marks})", tuple(row.values()))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite has already rolled back after some errors (a full disk)
                    self._db.execute("ROLLBACK")
                raise
            return self.get(exp_id(seq))

    def update(self, exp: str, **fields: Any) -> None:
        """Set columns of one row (no status change; use `transition` for that)."""
        if "status" in fields:
            raise LedgerError("use transition() to change a status")
        self._write(exp, fields)

    def transition(self, exp: str, status: Status, **fields: Any) -> None:
        """Move a row along the lifecycle, refusing moves §3.3 does not allow."""
        with self._lock:
            current = self.get(exp).status
            if not current.can_move_to(Status(status)):
                raise LedgerError(f"{exp}: cannot go from {current} to {status}")
            self._write(exp, {**fields, "status": status})
        log.debug("experiment.status", exp=exp, status=status, previous=current)

    def decide(self, exp: str, decision: str, *, value: float, best_before: float, threshold: float,
               estimate: dict[str, float]) -> None:
        """Record keep/discard with its estimate; a keep enters the morning review queue."""
        self._write(exp, {
            "decision": decision, "decision_value": value, "best_before": best_before,
            "threshold": threshold, "decided_at": now(), "estimate_json": json.dumps(estimate),
            "review_state": PENDING if decision == Decision.KEEP else None,
        })

    def review(self, exp: str, state: str, note: str = "") -> None:
        if state not in REVIEW_STATES:
            raise LedgerError(f"unknown review state {state!r}")
        self._write(exp, {"review_state": state, "review_note": note})

    def _write(self, exp: str, fields: dict[str, Any]) -> None:
        self._check_columns(fields)
        fields = {**fields, "updated_at": now()}
        sets = ", ".join(f"{name}=?" for name in fields)
        with self._lock:
            cur = self._db.execute(f"UPDATE experiments SET {sets} WHERE id=?", (*fields.values(), exp))
            if cur.rowcount != 1:
                raise LedgerError(f"no experiment {exp}")

    @staticmethod
    def _check_columns(fields: dict[str, Any]) -> None:
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise LedgerError(f"unknown ledger columns: {sorted(unknown)}")

    # -- queries ------------------------------------------------------------------

    def get(self, exp: str) -> Experiment:
        with self._lock:
            row = self._db.execute("SELECT * FROM experiments WHERE id=?", (exp,)).fetchone()
        if row is None:
            raise LedgerError(f"no experiment {exp}")
        return Experiment(**dict(row))

    def experiments(
        self,
        *,
        kinds: Iterable[str] | None = None,
        statuses: Iterable[Status] | None = None,
        night_id: int | None = None,
    ) -> list[Experiment]:
        """Rows in creation order, optionally filtered."""
        where, args = [], []
        for column, values in (("kind", kinds), ("status", statuses)):
            if values is not None:
                values = list(values)
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                args.extend(values)
        if night_id is not None:
            where.append("night_id=?")
            args.append(night_id)
        sql = "SELECT * FROM experiments" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY seq"
        with self._lock:
            return [Experiment(**dict(r)) for r in self._db.execute(sql, args)]

    def unfinished(self) -> list[Experiment]:
        """Work owed by an earlier runner that stopped mid-way (resume)."""
        return self.experiments(statuses=Status.where(Status.is_unfinished))

    def undecided(self) -> list[Experiment]:
        """Experiments that finished but were never decided (the runner stopped in between)."""
        return [e for e in self.experiments(kinds=[EXPERIMENT], statuses=[Status.DONE]) if e.decision is None]

    def best_kept(self) -> Experiment | None:
        """The current best kept change. Keeps only ever lower the best, so it is the lowest."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM experiments WHERE decision='keep' ORDER BY decision_value, seq LIMIT 1"
            ).fetchone()
        return Experiment(**dict(row)) if row else None

    def confirmations_of(self, exp: str) -> list[Experiment]:
        """The repeat runs of an experiment under further seeds, in order."""
        return self._runs_for(CONFIRM, exp)

    def references_of(self, exp: str) -> list[Experiment]:
        """The runs of the best made beside a candidate about to be kept, in order."""
        return self._runs_for(REFERENCE, exp)

    def _runs_for(self, kind: str, exp: str) -> list[Experiment]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM experiments WHERE kind=? AND target_id=? ORDER BY seq",
                                    (kind, exp)).fetchall()
        return [Experiment(**dict(r)) for r in rows]


def write_tsv(ledger: Ledger, out: TextIO) -> int:
    """Write the reference's results.tsv (Karpathy's autoresearch); return the row count.

    Columns `commit val_bpb memory_gb status description`; the experiment id
    stands in for the commit. Baseline runs are `keep` (the starting point, as in
    the reference), decided experiments `keep`/`discard`, failures `crash`.
    Rejected proposals, confirmations and unfinished work never ran as an
    experiment of their own and are left out.
    """
    out.write("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    count = 0
    for e in ledger.experiments(kinds=[BASELINE, EXPERIMENT]):
        if e.status is Status.DONE and (e.kind == BASELINE or e.decision):
            status = Decision.KEEP if e.kind == BASELINE else e.decision
        elif e.status.is_fault():
            status = "crash"
        else:
            continue
        val = e.val_bpb if status != "crash" and e.val_bpb is not None else 0.0
        memory_gb = (e.peak_vram_mb or 0.0) / 1024 if status != "crash" else 0.0
        description = " ".join((e.description or e.kind).split())
        out.write(f"{e.id}\t{val:.6f}\t{memory_gb:.1f}\t{status}\t{description}\n")
        count += 1
    return count
