"""What a night measured, and the files that show it: the progress chart, exports, the HTML report.

The figures are read from the ledger alone (the night's heartbeat says whether it runs), so
they can be computed while the night runs or long after. A kept change is shown
with the estimate its decision rested on (gain, 95 % interval, runs), and once per
view with `SELECTION_NOTE`: the selection biases that estimate upwards. The chart
follows the teaser of Karpathy's *autoresearch*: every experiment's val_bpb in
order, the discarded ones faint, the kept ones highlighted and labelled, the
running best as a step line.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runner import detectability
from runner.decision import DISCARD, KEEP, Noise, Rule
from runner.errors import UserError
from runner.heartbeat import is_running, last_seen, ran_seconds
from runner.judge import code_key, runs_of
from runner.ledger import BASELINE, CONFIRM, EXPERIMENT, PENDING, REFERENCE, Experiment, Ledger
from runner.review import baseline_mean, item
from sandbox.runlog import tail
from sandbox.status import Status

NIGHT_KINDS = (BASELINE, EXPERIMENT, CONFIRM, REFERENCE)  # reruns are morning work, not the night's
SELECTION_NOTE = ("Gains are estimates at the time of each decision; a change was kept because its estimate "
                  "cleared the bar, so kept gains tend to be overstated: `autoresearch verify` measures the "
                  "night's gain afresh on new seeds.")


def night_settings(ledger: Ledger) -> dict[str, Any]:
    """The settings the latest start of this night ran with."""
    nights = ledger.nights()
    return json.loads(nights[-1]["settings_json"]) if nights else {}


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
    record = next((n for n in reversed(nights) if n["sigma"] is not None), {})
    rule = settings.get("rule") or {}
    return Figures(
        tag=run_dir.name, state=state, state_note=note,
        in_flight=tuple((r.id, r.kind, r.status) for r in rows if r.status.is_unfinished()),
        best_id=best.id if best else _first_baseline(rows),
        best_value=best.decision_value if best else base,
        best_description=best.description if best else "baseline", best_estimate=best.estimate if best else {},
        baseline_mean=base, sigma=record.get("sigma"), noise_df=record.get("noise_df"),
        baseline_runs=record.get("baseline_runs"), threshold=record.get("threshold"),
        detectable=tuple(dataclasses.asdict(point) for point in detectability.course(
            Rule(**rule) if rule else Rule(),
            Noise(record["sigma"], record["noise_df"], record["baseline_runs"]) if record else None,
            record.get("baseline_runs"), [r for r in experiments if r.decision is not None])),
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
        allowance=json.loads(record["allowance_json"]) if record.get("allowance_json") else None,
        nodes=[_node_figures(node, rows, wall) for node in cluster.get("nodes", ())],
        refused_nodes=cluster.get("refused", {}),
    )


def _cluster(nights: list[dict]) -> dict:
    """The inventory of the latest invocation that ran on a cluster ({} for a night on one machine)."""
    recorded = [n["cluster_json"] for n in nights if n.get("cluster_json")]
    return json.loads(recorded[-1]) if recorded else {}


def _node_figures(node: dict, rows: list[Experiment], wall: float) -> dict:
    """One node of a cluster night: its GPUs, what runs on it now, and how many experiments it finished."""
    mine = [r for r in rows if r.node == node["name"]]
    return {**node, "running": [r.id for r in mine if r.status in (Status.TRAINING, Status.EVALUATING)],
            "finished": sum(r.status.is_conclusive() for r in mine),
            "per_hour": sum(r.status.is_conclusive() for r in mine) / (wall / 3600) if wall > 0 else None}


def _first_baseline(rows: list[Experiment]) -> str | None:
    return next((r.id for r in rows if r.kind == BASELINE and r.status == Status.DONE), None)


def _state(nights: list[dict], now: datetime, tag: str) -> tuple[str, str]:
    """Whether the night runs, from the latest invocation's end or heartbeat (runner.heartbeat)."""
    if not nights:
        return "not started", "no night has started under this tag"
    latest = nights[-1]
    if latest["ended_at"]:
        return "ended", f"ended {latest['ended_at'][:19]} ({latest['stop_reason']})"
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


# -- chart ------------------------------------------------------------------------------------


class NothingToPlot(UserError):
    """No experiment of the night has a val_bpb yet."""


@dataclass(frozen=True)
class Series:
    """What the chart draws: (seq, val_bpb) points and the running best as steps."""

    baseline: list[tuple[int, float]]
    discarded: list[tuple[int, float]]  # finished experiments that were not kept
    kept: list[tuple[int, float, str]]  # with their descriptions
    best: list[tuple[int, float]]  # step line: where the best changed, and the last experiment


def progress_series(ledger: Ledger) -> Series:
    rows = [r for r in ledger.experiments(kinds=[BASELINE, EXPERIMENT]) if r.status == Status.DONE and r.val_bpb is not None]
    if not rows:
        raise NothingToPlot("nothing to plot yet: no experiment of this night has a val_bpb.")
    base = baseline_mean(ledger)
    kept = [r for r in rows if r.decision == KEEP]
    best = [(rows[0].seq, base if base is not None else rows[0].val_bpb)]
    best += [(r.seq, r.decision_value if r.decision_value is not None else r.val_bpb) for r in kept]
    best.append((rows[-1].seq, best[-1][1]))
    return Series(
        baseline=[(r.seq, r.val_bpb) for r in rows if r.kind == BASELINE],
        discarded=[(r.seq, r.val_bpb) for r in rows if r.kind == EXPERIMENT and r.decision != KEEP],
        kept=[(r.seq, r.val_bpb, r.description) for r in kept],
        best=best,
    )


def plot_png(ledger: Ledger, title: str = "") -> bytes:
    """The progress chart as PNG bytes."""
    series = progress_series(ledger)
    import matplotlib  # here: it takes a second to import and only the chart needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 6), dpi=110)
    try:
        layers = (
            (series.discarded, dict(s=14, color="#9e9e9e", alpha=0.45, label="discarded", zorder=2)),
            (series.baseline, dict(s=30, marker="s", color="#1f77b4", label="baseline runs", zorder=3)),
            (series.kept, dict(s=46, color="#2ca02c", edgecolor="black", linewidth=0.5, label="kept", zorder=4)),
        )
        for points, style in layers:
            ax.scatter([p[0] for p in points], [p[1] for p in points], **style)
        for seq, value, description in series.kept:
            ax.annotate(_clip(description, 42), (seq, value), xytext=(6, 8), textcoords="offset points",
                        fontsize=7.5, rotation=22, color="#1b5e20")
        ax.step([p[0] for p in series.best], [p[1] for p in series.best], where="post", color="#2ca02c",
                linewidth=1.6, alpha=0.8, label="running best", zorder=1)
        ax.set_xlabel("experiment")
        ax.set_ylabel("val_bpb (lower is better)")
        counts = f"{len(series.discarded) + len(series.kept)} experiments, {len(series.kept)} kept"
        ax.set_title(f"{title}: {counts}" if title else counts, loc="left")
        ax.grid(alpha=0.25)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- exports ----------------------------------------------------------------------------------


def export_json(ledger: Ledger, tag: str) -> dict[str, Any]:
    """The whole ledger of a night as plain JSON (settings parsed, every column kept), and the kept
    changes with their gain, 95 % interval and runs (results.tsv, the reference's format, has no room)."""
    nights = [{**{k: v for k, v in n.items() if k != "settings_json"}, "settings": json.loads(n["settings_json"])}
              for n in ledger.nights()]
    return {"tag": tag, "nights": nights, "kept": [k.as_dict() for k in kept_changes(ledger)],
            "kept_note": SELECTION_NOTE, "experiments": [dataclasses.asdict(r) for r in ledger.experiments()]}


def log_tail(run_dir: Path, row: Experiment, name: str, lines: int = 20) -> str | None:
    """The end of one of an experiment's logs, None when the file is not there."""
    try:
        return tail((run_dir / row.id / name).read_text(errors="replace"), lines)
    except OSError:
        return None


# -- the HTML report -------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: .25em .8em; text-align: left; border-bottom: 1px solid #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: .7em; overflow-x: auto; font-size: 12px; }
.add { color: #1b5e20; background: #e8f5e9; } .del { color: #b71c1c; background: #ffebee; } .hunk { color: #0d47a1; }
img { max-width: 100%; }
"""


def html_report(ledger: Ledger, run_dir: Path, now: datetime | None = None) -> str:
    """One self-contained HTML page: figures, chart, kept changes with diffs, failures with log tails."""
    fig = figures(ledger, run_dir, now)
    try:
        chart = f'<img alt="progress" src="data:image/png;base64,{base64.b64encode(plot_png(ledger)).decode()}">'
    except NothingToPlot as exc:
        chart = f"<p>{html.escape(str(exc))}</p>"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>autoresearch {html.escape(fig.tag)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>autoresearch night {html.escape(fig.tag)}</h1>",
        f"<p>{html.escape(fig.state)}: {html.escape(fig.state_note)}</p>",
        _figures_table(fig), "<h2>Progress</h2>", chart, _kept_section(ledger), _failures_section(ledger, run_dir),
        "</body></html>",
    ]
    return "\n".join(parts)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _figures_table(fig: Figures) -> str:
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in fig.counts.items())
    rows = [
        ("best val_bpb", f"{_num(fig.best_value, '.6f')} ({fig.best_id or '-'}: {fig.best_description})"),
        ("baseline mean", f"{_num(fig.baseline_mean, '.6f')} over {fig.baseline_runs or 0} runs"),
        ("noise σ", f"{_num(fig.sigma, '.6f')} (df {fig.noise_df or '-'}, pooled over codes run more than once)"),
        ("keep rule", keep_rule_text(fig)),
        ("what the night could see", " ".join(seeing_lines(fig)) or "-"),
        ("experiments", counts),
        ("experiments / hour", _num(fig.experiments_per_hour, ".2f")),
        ("duty cycle", f"{_num(fig.duty_cycle and 100 * fig.duty_cycle, '.1f')} % (training "
                       f"{fig.training_seconds / 3600:.2f} h of {fig.wall_seconds / 3600:.2f} h × {fig.slots})"),
        ("MFU (median)", f"{_num(fig.mfu_percent, '.1f')} %"),
        ("profile / budget", f"{fig.profile or '-'} / {_num(fig.time_budget, 'g')} s"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<h2>Figures</h2><table>{body}</table>"


def keep_rule_text(fig: Figures) -> str:
    """The rule in one sentence (status and the report)."""
    if fig.alpha is None:
        return "-"
    return (f"alpha {fig.alpha:g} (the chance that an effect-free change is kept), at most {fig.max_runs} runs "
            f"per candidate, min_delta {fig.min_delta:g}: kept once either test's one-sided Student-t bound is "
            f"above 0: paired on matched seeds (own spread, from 3 runs) or unpaired (pooled noise, from 2 runs); "
            f"alpha is split between the tests and their looks, and a keep must hold again in its own window")


def diff_html(diff: str) -> str:
    """A diff as <pre> with added, removed and hunk lines coloured."""
    styles = {"+": "add", "-": "del", "@": "hunk"}
    lines = []
    for line in diff.splitlines():
        css = "" if line.startswith(("+++", "---")) else styles.get(line[:1], "")
        text = html.escape(line)
        lines.append(f'<span class="{css}">{text}</span>' if css else text)
    return "<pre>" + "\n".join(lines) + "</pre>"


def _kept_section(ledger: Ledger) -> str:
    kept = kept_changes(ledger)
    if not kept:
        return "<h2>Kept changes</h2><p>none</p>"
    base = baseline_mean(ledger)
    parts = ["<h2>Kept changes</h2><table><tr><th>id</th><th>val_bpb</th><th>gain over the best before</th>"
             "<th>95 % interval</th><th>runs</th><th>vs baseline</th><th>review</th><th>description</th></tr>"]
    details = []
    for k in kept:
        r, est = k.row, k.row.estimate
        it = item(ledger, r, base)
        interval = f"[{est['low95']:+.6f}, {est['high95']:+.6f}]" if est else "-"
        parts.append(
            f"<tr><td>{r.id}</td><td class=n>{_num(it.value, '.6f')}</td><td class=n>{_num(est.get('gain'), '+.6f')}"
            f"</td><td class=n>{interval}</td><td>{html.escape(runs_text(est, k.spent) if est else '-')}</td>"
            f"<td class=n>{_num(it.vs_baseline, '+.6f')}</td><td>{html.escape(r.review_state or '')}</td>"
            f"<td>{html.escape(r.description)}</td></tr>"
        )
        details.append(f"<h3>{r.id}: {html.escape(r.description)}</h3>{diff_html(r.diff)}")
    parts.append(f"</table><p>{html.escape(SELECTION_NOTE)}</p>")
    return "".join(parts) + "".join(details)


def _failures_section(ledger: Ledger, run_dir: Path) -> str:
    failed = [r for r in ledger.experiments() if r.status.is_failure()]
    if not failed:
        return "<h2>Failures</h2><p>none</p>"
    parts = ["<h2>Failures</h2>"]
    for status in sorted({r.status for r in failed}):
        group = [r for r in failed if r.status == status]
        parts.append(f"<h3>{html.escape(status)} ({len(group)})</h3>")
        for r in group:
            logs = r.log_tail or log_tail(run_dir, r, "eval.log") or log_tail(run_dir, r, "train.log") or r.error or ""
            parts.append(f"<p><b>{r.id}</b> {html.escape(r.description)}</p><pre>{html.escape(logs)}</pre>")
    return "".join(parts)
