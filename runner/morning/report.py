"""The files that show what a night measured: the progress chart, the exports, the HTML report.

The figures themselves are runner.core.figures' (read from the ledger alone). A kept change is
shown with the estimate its decision rested on (gain, 95 % interval, runs), and once per
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.core.decision import KEEP
from runner.core.errors import UserError
from runner.core.figures import Figures, baseline_mean, figures, kept_changes, runs_text, seeing_lines
from runner.core.ledger import BASELINE, EXPERIMENT, Experiment, Ledger
from runner.morning.review import item
from sandbox.run_dir import LOG_FILES
from sandbox.runlog import tail
from sandbox.status import Status

SELECTION_NOTE = ("Gains are estimates at the time of each decision; a change was kept because its estimate "
                  "cleared the bar, so kept gains tend to be overstated: `autoresearch verify` measures the "
                  "night's gain afresh on new seeds.")


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
    nights = [n.as_dict() for n in ledger.nights()]
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
        ("agent cost", f"${fig.agent_usd:.2f}" + (f" of ${fig.max_agent_usd:g} (--max-agent-usd)"
                                                  if fig.max_agent_usd is not None else "")),
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
            logs = r.log_tail or log_tail(run_dir, r, LOG_FILES[1]) or log_tail(run_dir, r, LOG_FILES[0]) or r.error or ""
            parts.append(f"<p><b>{r.id}</b> {html.escape(r.description)}</p><pre>{html.escape(logs)}</pre>")
    return "".join(parts)
