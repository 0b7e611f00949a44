"""What a person watching the night sees: a live status line per worker and a table at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runner.core.decision import KEEP
from runner.core.ledger import Experiment
from sandbox.status import Status


@dataclass(frozen=True)
class WorkerView:
    slot: str  # "gpu0" or "cpu"
    exp_id: str | None
    phase: str  # idle, proposing, building, training, evaluating, retired
    elapsed_s: float


@dataclass(frozen=True)
class NightView:
    workers: tuple[WorkerView, ...]
    best_value: float | None
    best_id: str | None
    finished: int  # experiments that ran to an end this night
    kept: int
    per_hour: float


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render(view: NightView) -> Group:
    best = "-" if view.best_value is None else f"{view.best_value:.6f} ({view.best_id})"
    lines = [
        Text.assemble(
            (f"{w.slot:>6} ", "bold"),
            f"{w.exp_id or '-':>6} {w.phase:<10} {_clock(w.elapsed_s):>8}",
        )
        for w in view.workers
    ]
    lines.append(
        Text(f"  best {best}   done {view.finished}   kept {view.kept}   {view.per_hour:.1f} experiments/hour",
             style="cyan")
    )
    return Group(*lines)


class StatusLine:
    """A rich Live region redrawn from a `NightView` (transient: it vanishes at the end)."""

    def __init__(self, console: Console) -> None:
        self._live = Live(console=console, transient=True, auto_refresh=False)

    def __enter__(self) -> "StatusLine":
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)

    def show(self, view: NightView) -> None:
        self._live.update(render(view), refresh=True)


def summary_table(rows: Sequence[Experiment], baseline_mean: float | None) -> Table:
    """The night's experiments, one line each, for the end of the run."""
    table = Table(title="autoresearch: this night", title_justify="left")
    for name, justify in (("id", "left"), ("kind", "left"), ("status", "left"), ("decision", "left"),
                          ("val_bpb", "right"), ("vs best", "right"), ("gpu", "left"), ("description", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for e in rows:
        val = "" if e.val_bpb is None else f"{e.val_bpb:.6f}"
        delta = "" if e.val_bpb is None or e.best_before is None else f"{e.val_bpb - e.best_before:+.6f}"
        where = e.gpu_name or ("cpu" if e.train_seconds is not None else "")
        table.add_row(e.id, e.kind, e.status, e.decision or "", val, delta, where,
                      e.description or e.reject_reason or "", style=_style(e))
    if baseline_mean is not None:
        table.caption = f"baseline mean val_bpb {baseline_mean:.6f}"
    return table


def _style(e: Experiment) -> str:
    if e.decision == KEEP:
        return "green"
    if e.status in (Status.REJECTED, Status.CANCELLED):
        return "yellow"
    if e.status.is_unfinished():  # left for the next resume
        return "dim"
    return "" if e.status == Status.DONE else "red"
