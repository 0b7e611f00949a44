"""How the morning commands look: rich panels and tables, and the plain dicts behind `--json`."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from runner.core.decision import DISCARD, KEEP
from runner.core.figures import Figures, code_runs, gain_text, runs_spent, runs_text, seeing_lines
from runner.core.ledger import EXPERIMENT, RERUN, Experiment, Ledger
from runner.morning.report import SELECTION_NOTE, keep_rule_text, log_tail
from runner.morning.review import Item, item, lineage
from runner.morning.verify import Verification
from sandbox.run_dir import LOG_FILES
from sandbox.status import Status

_DECISION_STYLE = {KEEP: "bold green", DISCARD: "dim"}


def _diff(text: str) -> Syntax:
    return Syntax(text, "diff", theme="ansi_dark", word_wrap=True)


def _num(value: float | None, fmt: str = ".6f") -> str:
    return "" if value is None else format(value, fmt)


def _style(row: Experiment) -> str:
    if row.status == Status.DONE:
        return _DECISION_STYLE.get(row.decision or "", "")
    if row.status in (Status.REJECTED, Status.CANCELLED):
        return "yellow"
    return "" if row.status.is_unfinished() else "red"


# -- status ------------------------------------------------------------------------------------


def status_panel(fig: Figures) -> Panel:
    state_style = {"running": "bold green", "ended": "bold", "stopped": "bold yellow"}.get(fig.state, "bold")
    lines = [Text.assemble((fig.state, state_style), f"  {fig.state_note}")]
    if fig.in_flight:
        verb = "now" if fig.state == "running" else "owed"
        lines.append(Text(f"{verb}: " + ", ".join(f"{i} {kind} {status}" for i, kind, status in fig.in_flight)))
    best = f"{_num(fig.best_value)} ({fig.best_id}: {fig.best_description})" if fig.best_value is not None else "-"
    lines.append(Text.assemble(("best ", "bold"), best))
    if fig.best_estimate:
        lines.append(Text(f"  gain {gain_text(fig.best_estimate)} over the best before it"))
        lines.append(Text(f"  {SELECTION_NOTE}", style="dim"))
    counts = fig.counts
    lines.append(Text(
        f"kept {counts['kept']}  discarded {counts['discarded']}  failed {counts['failed']}  "
        f"rejected {counts['rejected']}  cancelled {counts['cancelled']}  "
        f"(pending review {counts['pending_review']}, baseline runs {counts['baseline_runs']}, "
        f"confirmation runs {counts['confirm_runs']}, reference runs {counts['reference_runs']}, "
        f"disturbed {counts['disturbed']})"
    ))
    rate = "-" if fig.experiments_per_hour is None else f"{fig.experiments_per_hour:.2f}"
    duty = "-" if fig.duty_cycle is None else f"{100 * fig.duty_cycle:.1f} %"
    mfu = "" if not fig.mfu_percent else f"   MFU {fig.mfu_percent:.1f} %"
    lines.append(Text(f"{rate} experiments/hour   duty cycle {duty} "
                      f"(training {fig.training_seconds / 60:.1f} min / wall {fig.wall_seconds / 60:.1f} min"
                      f" x {fig.slots} slot{'s' if fig.slots > 1 else ''}){mfu}"))
    budget = f" of ${fig.max_agent_usd:g} (--max-agent-usd)" if fig.max_agent_usd is not None else ""
    lines.append(Text(f"agent cost ${fig.agent_usd:.2f}{budget}"))
    for node in fig.nodes:
        gpus = ", ".join(f"{g['name']} {g['uuid']}" for g in node["gpus"]) or "no GPU (CPU profile)"
        rate = "-" if node["per_hour"] is None else f"{node['per_hour']:.2f}/h"
        running = ", ".join(node["running"]) or "idle"
        lines.append(Text(f"node {node['name']} ({node['backend']}, {node['slots']} slot{'s' if node['slots'] > 1 else ''};"
                          f" {gpus}): {running}; {node['finished']} runs finished, {rate}"))
    for name, why in fig.refused_nodes.items():
        lines.append(Text(f"node {name} left out: {why}", style="yellow"))
    if fig.sigma is None:
        lines.append(Text("noise: not measured yet (baseline runs first)", style="dim"))
    else:
        lines.append(Text(
            f"noise sigma {fig.sigma:.6f} (df {fig.noise_df}) from {fig.baseline_runs} baseline runs "
            f"(mean {_num(fig.baseline_mean)})"
        ))
        lines.extend(Text(line) for line in seeing_lines(fig))
        lines.append(Text(f"keep rule: {keep_rule_text(fig)}"))
    if fig.gpu_memory_cap is not None:
        peak = "-" if fig.peak_gpu_mb is None else f"{fig.peak_gpu_mb / 1024:.1f} GiB"
        lines.append(Text(f"GPU memory cap {fig.gpu_memory_cap} per experiment (NVML watchdog), peak so far {peak}"))
    if fig.allowance:
        a = fig.allowance
        lines.append(Text(
            f"budget {_num(fig.time_budget, 'g')} s, enforced by the host: start-up {a['startup_s']:.0f} s, "
            f"export {a['export_s']:.0f} s" + (f", GPU busy {a['busy_before_s']:.0f} s before / {a['busy_after_s']:.0f} s after"
                                                if fig.profile == "gpu" else "")
            + (" (measured on the baseline)" if a.get("measured") else " (defaults)")))
    return Panel(Group(*lines), title=f"autoresearch {fig.tag}", title_align="left")


# -- list --------------------------------------------------------------------------------------


def row_dict(it: Item) -> dict[str, Any]:
    """One experiment as `list --json` prints it."""
    r = it.row
    return {
        "id": r.id, "kind": r.kind, "parent": r.parent_id, "status": r.status, "decision": r.decision,
        "review": r.review_state, "val_bpb": r.val_bpb, "value": it.value, "vs_parent": it.vs_parent,
        "vs_baseline": it.vs_baseline, "estimate": r.estimate or None, "seed": r.seed, "disturbed": r.disturbed,
        "training_seconds": r.training_seconds, "description": r.description,
    }


def _outcome(row: Experiment) -> str:
    outcome = row.decision or row.status if row.status == Status.DONE else row.status
    return f"{outcome} (disturbed)" if row.disturbed else outcome


def experiments_table(items: list[Item], title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("id", "left"), ("kind", "left"), ("outcome", "left"), ("review", "left"),
                          ("val_bpb", "right"), ("vs parent", "right"), ("train s", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("description", overflow="fold", min_width=24)
    for it in items:
        r = it.row
        table.add_row(r.id, r.kind, _outcome(r), r.review_state or "", _num(r.val_bpb), _num(it.vs_parent, "+.6f"),
                      _num(r.training_seconds, ".1f"), r.description or r.reject_reason or "", style=_style(r))
    if not items:
        table.caption = "no experiments yet"
    return table


# -- show --------------------------------------------------------------------------------------


def show_dict(ledger: Ledger, run_dir: Path, row: Experiment) -> dict[str, Any]:
    """Everything `show` prints, as data."""
    it = item(ledger, row)
    return {
        **row_dict(it),
        "lineage": [f"{r.id}" for r in lineage(ledger, row)],
        "metrics": row.metrics,
        "reported_by_train_py": row.reported,
        "phases": _phases(row),
        "image": row.image, "runtime": row.runtime, "backend": row.backend, "isolation": row.isolation,
        "data_hash": row.data_hash,
        "seed": row.seed, "gpu": row.gpu_name, "gpu_driver": row.gpu_driver,
        "runs": [_run_dict(r) for r in code_runs(ledger, row)] if row.kind != RERUN else [],
        # the best run again beside a candidate about to be kept: what its recorded estimate compares with
        "reference_runs": [_run_dict(r) for r in ledger.references_of(row.id)],
        "reject_reason": row.reject_reason, "error": row.error, "review_note": row.review_note,
        "logs": {name: log_tail(run_dir, row, name) for name in LOG_FILES},
        "diff": row.diff,
    }


def _run_dict(row: Experiment) -> dict[str, Any]:
    return {"id": row.id, "kind": row.kind, "seed": row.seed, "status": row.status, "val_bpb": row.val_bpb,
            "steps": row.num_steps, "counted": row.counts, "disturbed": row.disturbed}


def _runs_table(runs: list[dict[str, Any]], shown: str, title: str = "runs of this train.py (seeds)") -> Table:
    """Runs under their seeds, and which of them the estimates count."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("id", "kind", "seed", "status", "val_bpb", "steps", "counted"):
        table.add_column(name, justify="right" if name in ("val_bpb", "steps") else "left", no_wrap=True)
    table.add_column("disturbed", overflow="fold")
    for r in runs:
        table.add_row(r["id"], r["kind"], "default" if r["seed"] is None else str(r["seed"]), r["status"],
                      _num(r["val_bpb"]), "" if r["steps"] is None else str(r["steps"]),
                      "yes" if r["counted"] else "no", r["disturbed"] or "", style="bold" if r["id"] == shown else "")
    return table


def _estimate_text(ledger: Ledger, row: Experiment) -> str:
    spent = runs_spent(ledger, row)
    text = f"gain {gain_text(row.estimate)} from {runs_text(row.estimate, spent)}, se {row.estimate['se']:.6f}"
    if row.threshold is not None:
        text += f"; a keep needed a gain above {row.threshold:.6f} at this look"
    elif row.decision == DISCARD:
        text += "; discarded before any test could keep it: its estimated gain was not above the rule's minimum"
    return text


def _phases(row: Experiment) -> dict[str, dict[str, Any]]:
    return {
        "train": {"exit_code": row.train_exit_code, "killed_by": row.train_killed_by, "seconds": row.train_seconds},
        "eval": {"exit_code": row.eval_exit_code, "killed_by": row.eval_killed_by, "seconds": row.eval_seconds},
    }


def _phase_text(phase: dict[str, Any]) -> str:
    if phase["exit_code"] is None and phase["seconds"] is None:
        return "did not run"
    killed = f", killed by {phase['killed_by']}" if phase["killed_by"] not in (None, "none") else ""
    return f"exit {phase['exit_code']}{killed}, {_num(phase['seconds'], '.1f')} s"


def show_renderables(ledger: Ledger, run_dir: Path, row: Experiment) -> list[RenderableType]:
    data = show_dict(ledger, run_dir, row)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    chain = lineage(ledger, row)
    fields = [
        ("description", row.description),
        ("lineage", " <- ".join(f"{r.id} ({r.kind})" if r.kind != EXPERIMENT else r.id for r in chain)),
        ("status", f"{row.status}" + (f", {row.decision}" if row.decision else "")
         + (f", review {row.review_state}" if row.review_state else "")),
        ("val_bpb", f"{_num(row.val_bpb) or '-'}  vs parent {_num(data['vs_parent'], '+.6f') or '-'}  "
                    f"vs baseline {_num(data['vs_baseline'], '+.6f') or '-'}"
                    + (f"  (val_bpb_hex {row.val_bpb_hex})" if row.val_bpb_hex else "")),
        ("phase 1 train", _phase_text(data["phases"]["train"])),
        ("peak GPU memory", "-" if row.peak_gpu_memory_bytes is None else f"{row.peak_gpu_memory_bytes / 2**30:.2f} GiB"),
        ("phase 2 eval", _phase_text(data["phases"]["eval"])),
        ("image", row.image or "-"),
        ("built on", row.runtime or "-"),
        ("data manifest", row.data_hash or "-"),
        ("sandbox", f"{row.backend or '-'} ({row.isolation or '-'})"),
        ("hardware", f"{row.gpu_name or 'cpu'}" + (f", driver {row.gpu_driver}" if row.gpu_driver else "")),
        ("seed", "harness default" if row.seed is None else str(row.seed)),
    ]
    if row.estimate:
        fields.insert(4, ("estimate", _estimate_text(ledger, row)))
        if row.decision == KEEP:
            fields.insert(5, ("", SELECTION_NOTE))
    if row.disturbed:
        fields.append(("disturbed", f"{row.disturbed}: left out of every estimate"))
    for key, value in (("rejected because", row.reject_reason), ("error", row.error), ("review note", row.review_note)):
        if value:
            fields.append((key, value))
    for key, value in fields:
        head.add_row(key, value)
    parts: list[RenderableType] = [Panel(head, title=f"{row.id} ({row.kind})", title_align="left")]
    if len(data["runs"]) > 1:
        parts.append(_runs_table(data["runs"], row.id))
    if data["reference_runs"]:
        parts.append(_runs_table(data["reference_runs"], row.id, "runs of the best beside it (seeds)"))
    for title, figures in (("measured (phase 2 and the host)", row.metrics),
                           ("reported by train.py (untrusted)", row.reported)):
        if figures:
            table = Table(title=title, title_justify="left")
            table.add_column("key")
            table.add_column("value", justify="right")
            for key, value in figures.items():
                table.add_row(key, f"{value:g}")
            parts.append(table)
    for name, text in data["logs"].items():
        body = text if text is not None else (row.log_tail if name == LOG_FILES[0] and row.log_tail else "(no log)")
        parts.append(Panel(Text(body or "(empty)"), title=f"{name} (tail)", title_align="left", style="dim"))
    if row.diff:
        parts.append(Panel(_diff(row.diff), title="diff", title_align="left"))
    return parts


# -- verify ------------------------------------------------------------------------------------


def verify_lines(v: Verification) -> list[str]:
    """The fresh runs side by side, seed by seed, the means the gain is taken from, and the verdict."""
    def cell(run) -> str:
        return _num(run.val_bpb) if run.left_out is None else f"({run.left_out})"

    lines = [f"verify {v.best_id} ({v.best_description}) against the baseline {v.baseline_id} on fresh seeds:",
             f"  {'seed':>6}  {'baseline':>10}  {'best':>10}"]
    lines += [f"  {base.seed:>6}  {cell(base):>10}  {cell(best):>10}" for base, best in zip(v.runs[::2], v.runs[1::2])]
    means = [_num(statistics.fmean(v.values(i))) for i in (v.baseline_id, v.best_id)]
    lines.append(f"  {'mean':>6}  {means[0]:>10}  {means[1]:>10}")
    lines.append(v.line())
    claimed = "" if v.claimed is None else f"; the night's own decisions claimed {v.claimed:.6f}"
    lines.append(f"(se {v.se:.6f}, df {v.df}, from these fresh runs alone{claimed})")
    return lines


# -- review ------------------------------------------------------------------------------------


def review_card(it: Item, position: int, total: int) -> list[RenderableType]:
    r = it.row
    numbers = Text.assemble(
        ("val_bpb ", "bold"), _num(it.value) or "-",
        f"   vs parent {it.parent.id if it.parent else '-'} ", (_num(it.vs_parent, "+.6f") or "-", "green"),
        "   vs baseline ", (_num(it.vs_baseline, "+.6f") or "-", "green"),
    )
    lines = [Text(r.description, style="bold"), numbers]
    if r.estimate:
        lines.append(Text.assemble(("gain ", "bold"), f"{gain_text(r.estimate)} over the best before it, "
                                   f"{runs_text(r.estimate)}"))
        lines.append(Text(SELECTION_NOTE, style="dim"))
    head = Group(*lines)
    return [
        Panel(head, title=f"[{position}/{total}] {r.id}", title_align="left"),
        _diff(r.diff),
    ]
