"""What a night measured, as figures read from the ledger alone (the night's heartbeat says whether it runs).

They can be computed while the night runs or long after; the night's own end-of-night lines
and every morning view (status, report, the exports) read them from here, and present them
as they like (runner.morning.report, runner.morning.views).
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runner.core import detectability
from runner.core.decision import DISCARD, KEEP, Noise, Rule
from runner.core.heartbeat import is_running, last_seen, ran_seconds
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, PENDING, REFERENCE, Experiment, Ledger, NightRecord
from runner.core.runs import code_key, runs_of
from sandbox.status import Status

NIGHT_KINDS = (BASELINE, EXPERIMENT, CONFIRM, REFERENCE)  # reruns are morning work, not the night's


def baseline_mean(ledger: Ledger) -> float | None:
    """The night's measured baseline (the latest record of it: a resumed night re-measures)."""
    means = [n.baseline_mean for n in ledger.nights() if n.baseline_mean is not None]
    return means[-1] if means else None


def agent_usd(ledger: Ledger) -> float:
    """What the agent's proposals have cost in the night (what `--max-agent-usd` counts)."""
    return sum(row.cost_usd for row in ledger.experiments(kinds=[EXPERIMENT]))


def night_settings(ledger: Ledger) -> dict[str, Any]:
    """The settings the latest start of this night ran with."""
    nights = ledger.nights()
    return nights[-1].settings if nights else {}


@dataclass(frozen=True)
class Figures:
    tag: str
    state: str  # running, ended, stopped (no end recorded), not started
    state_note: str
    in_flight: tuple[tuple[str, str, str], ...]  # (id, kind, status) of rows under way or owed
    best_id: str | None
    best_value: float | None
    best_description: str
    best_estimate: dict  # the best's gain over the best before it, at its decision ({} for the baseline)
    baseline_mean: float | None
    sigma: float | None  # seed noise pooled at the start of the experiments (the baselines)
    noise_df: int | None  # its degrees of freedom
    baseline_runs: int | None
    threshold: float | None  # the smallest gain kept with 80 % power at the start (unpaired, the baselines)
    detectable: tuple[dict, ...]  # the detectable gains at the start and after each decision (detectability)
    alpha: float | None
    max_runs: int | None
    min_delta: float | None
    counts: dict[str, int]
    experiments_per_hour: float | None
    duty_cycle: float | None  # training seconds / (wall seconds x slots)
    mfu_percent: float | None  # median over finished runs (0 on the CPU profile)
    wall_seconds: float
    training_seconds: float
    slots: int
    profile: str | None
    time_budget: float | None
    gpu_memory_cap: str | None  # as the night was told (a share of the card, GiB or none)
    peak_gpu_mb: float | None  # the largest GPU memory any run of the night held (host-measured)
    allowance: dict | None  # what phase 1 may spend beside its budget (measured on the baselines)
    agent_usd: float  # what the agent's proposals cost (as recorded with each)
    max_agent_usd: float | None  # --max-agent-usd as the night last ran with it
    nodes: list[dict]  # a cluster night: each node, its GPUs, what it runs and its experiments per hour
    refused_nodes: dict[str, str]  # a cluster night: the nodes left out, and why

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def figures(ledger: Ledger, run_dir: Path, now: datetime | None = None) -> Figures:
    now = now or datetime.now(timezone.utc)
    nights = ledger.nights()
    settings = night_settings(ledger)
    rows = [r for r in ledger.experiments() if r.kind in NIGHT_KINDS]
    experiments = [r for r in rows if r.kind == EXPERIMENT]
    budget = settings.get("time_budget")
    state, note = _state(nights, now, run_dir.name)
    wall = sum(ran_seconds(night, now) for night in nights)
    cluster = _cluster(nights)
    slots = sum(n["slots"] for n in cluster.get("nodes", ())) or max(len(settings.get("gpus") or ()), 1)
    training = sum(r.training_seconds or 0.0 for r in rows)
    finished = [r for r in experiments if r.status.is_conclusive()]
    mfu = [r.mfu_percent for r in rows if r.status == Status.DONE and r.mfu_percent is not None]
    best = ledger.best_kept()
    base = baseline_mean(ledger)
    record = next((n for n in reversed(nights) if n.sigma is not None), None)
    rule = settings.get("rule") or {}
    return Figures(
        tag=run_dir.name, state=state, state_note=note,
        in_flight=tuple((r.id, r.kind, r.status) for r in rows if r.status.is_unfinished()),
        best_id=best.id if best else _first_baseline(rows),
        best_value=best.decision_value if best else base,
        best_description=best.description if best else "baseline", best_estimate=best.estimate if best else {},
        baseline_mean=base, sigma=record.sigma if record else None, noise_df=record.noise_df if record else None,
        baseline_runs=record.baseline_runs if record else None, threshold=record.threshold if record else None,
        detectable=tuple(dataclasses.asdict(point) for point in detectability.course(
            Rule(**rule) if rule else Rule(),
            Noise(record.sigma, record.noise_df, record.baseline_runs) if record else None,
            record.baseline_runs if record else None, [r for r in experiments if r.decision is not None])),
        alpha=rule.get("alpha"), max_runs=rule.get("max_runs"), min_delta=rule.get("min_delta"),
        counts={
            "kept": sum(r.decision == KEEP for r in experiments),
            "discarded": sum(r.decision == DISCARD for r in experiments),
            "failed": sum(r.status.is_fault() for r in rows if r.kind not in (CONFIRM, REFERENCE)),
            "cancelled": sum(r.status == Status.CANCELLED for r in experiments),
            "rejected": sum(r.status == Status.REJECTED for r in experiments),
            "pending_review": sum(r.review_state == PENDING for r in experiments),
            "baseline_runs": sum(r.kind == BASELINE and r.status == Status.DONE for r in rows),
            "confirm_runs": sum(r.kind == CONFIRM and not r.status.is_unfinished() for r in rows),
            "reference_runs": sum(r.kind == REFERENCE and not r.status.is_unfinished() for r in rows),
            "disturbed": sum(r.disturbed is not None for r in rows),
        },
        experiments_per_hour=len(finished) / (wall / 3600) if wall > 0 else None,
        duty_cycle=training / (wall * slots) if wall > 0 else None,
        mfu_percent=statistics.median(mfu) if mfu else None,
        wall_seconds=wall, training_seconds=training, slots=slots,
        profile=settings.get("profile"), time_budget=budget,
        gpu_memory_cap=settings.get("gpu_memory_cap") if settings.get("gpus") else None,
        peak_gpu_mb=max((r.peak_gpu_memory_bytes / 2**20 for r in rows if r.peak_gpu_memory_bytes), default=None),
        allowance=record.allowance if record else None,
        agent_usd=sum(r.cost_usd for r in experiments), max_agent_usd=settings.get("max_agent_usd"),
        nodes=[_node_figures(node, rows, wall) for node in cluster.get("nodes", ())],
        refused_nodes=cluster.get("refused", {}),
    )


def _cluster(nights: list[NightRecord]) -> dict:
    """The inventory of the latest invocation that ran on a cluster ({} for a night on one machine)."""
    recorded = [n.cluster for n in nights if n.cluster]
    return recorded[-1] if recorded else {}


def _node_figures(node: dict, rows: list[Experiment], wall: float) -> dict:
    """One node of a cluster night: its GPUs, what runs on it now, and how many experiments it finished."""
    mine = [r for r in rows if r.node == node["name"]]
    return {**node, "running": [r.id for r in mine if r.status in (Status.TRAINING, Status.EVALUATING)],
            "finished": sum(r.status.is_conclusive() for r in mine),
            "per_hour": sum(r.status.is_conclusive() for r in mine) / (wall / 3600) if wall > 0 else None}


def _first_baseline(rows: list[Experiment]) -> str | None:
    return next((r.id for r in rows if r.kind == BASELINE and r.status == Status.DONE), None)


def _state(nights: list[NightRecord], now: datetime, tag: str) -> tuple[str, str]:
    """Whether the night runs, from the latest invocation's end or heartbeat (runner.core.heartbeat)."""
    if not nights:
        return "not started", "no night has started under this tag"
    latest = nights[-1]
    if latest.ended_at:
        return "ended", f"ended {latest.ended_at[:19]} ({latest.stop_reason})"
    seen = last_seen(latest)
    ago = (now - seen).total_seconds()
    if is_running(latest, now):
        return "running", f"alive {ago:.0f} s ago (heartbeat)"
    return "stopped", (f"(last seen {seen:%Y-%m-%d %H:%M:%S} UTC, {_ago(ago)} ago) no end recorded: the runner was "
                       f"probably killed; resume with `autoresearch overnight --tag {tag}`")


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# -- estimates --------------------------------------------------------------------------------


def code_runs(ledger: Ledger, row: Experiment) -> list[Experiment]:
    """Every run of `row`'s train.py in the night: all baselines, or an experiment and its confirmations."""
    return runs_of(ledger, code_key(row))


def runs_spent(ledger: Ledger, row: Experiment) -> int:
    """The runs a code has taken so far, failed and disturbed ones too."""
    return sum(not run.status.is_unfinished() for run in code_runs(ledger, row))


def gain_text(estimate: dict) -> str:
    """'+0.099625 bpb (95 % interval [+0.097654, +0.101596])', led by the paired gain and its interval
    when every run had a partner; '-' before a decision."""
    if not estimate:
        return "-"
    unpaired = f"{estimate['gain']:+.6f} bpb (95 % interval [{estimate['low95']:+.6f}, {estimate['high95']:+.6f}])"
    if estimate.get("paired_low95") is None or estimate.get("pairs") != estimate["runs"]:
        return unpaired
    return (f"{estimate['paired_gain']:+.6f} bpb paired on {estimate['pairs']} seeds (95 % interval "
            f"[{estimate['paired_low95']:+.6f}, {estimate['paired_high95']:+.6f}]); unpaired {unpaired}")


def runs_text(estimate: dict, spent: int | None = None) -> str:
    """How many runs the estimate counts on each side, and what the candidate spent when that differs."""
    extra = f" ({spent} spent)" if spent is not None and spent != estimate["runs"] else ""
    return f"{estimate['runs']} runs{extra} against {estimate['best_runs']} of the best"


def seeing_lines(fig: Figures) -> list[str]:
    """What the night could see: the detectable gain now and at the start, and what "kept 0" means."""
    if not fig.detectable:
        return []
    now, start = detectability.Detectable(**fig.detectable[-1]), fig.detectable[0]
    lines = [f"smallest gain kept with 80 % power now: {now.text()}"]
    if len(fig.detectable) > 1 and start["unpaired"] is not None:
        lines.append(f"  at the start of the experiments {start['unpaired']:.6f} for a change that decouples the runs; "
                     f"after {now.decided} decisions as above")
    if fig.counts.get("kept") == 0 and now.decided:
        floor = min(g for g in (now.paired, now.unpaired) if g is not None)
        lines.append(f"kept nothing: no change of this night was shown to gain more than the noise allows to see "
                     f"(about {floor:.6f} bpb at best); smaller true gains may have gone unseen, larger ones "
                     f"would most likely have been kept")
    return lines


@dataclass(frozen=True)
class Kept:
    """A kept change, the estimate its decision rested on, and the runs it took (disturbed ones too)."""

    row: Experiment
    spent: int

    def as_dict(self) -> dict[str, Any]:
        est = self.row.estimate
        return {"id": self.row.id, "description": self.row.description, "val_bpb": self.row.decision_value,
                "best_before": self.row.best_before, **{k: est.get(k) for k in ("gain", "low95", "high95")},
                "runs": est.get("runs"), "best_runs": est.get("best_runs"), "runs_spent": self.spent,
                "review": self.row.review_state}


def kept_changes(ledger: Ledger) -> list[Kept]:
    rows = [r for r in ledger.experiments(kinds=[EXPERIMENT]) if r.decision == KEEP]
    return [Kept(r, runs_spent(ledger, r)) for r in rows]


def verify_hint(tag: str) -> str:
    """The line that offers verify at the end of a night."""
    return (f"kept gains are estimates from the night's own selection; measure the night's gain afresh with "
            f"`autoresearch verify --tag {tag}`")
