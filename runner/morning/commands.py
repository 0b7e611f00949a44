"""The morning commands: status, list, show, review, rerun, verify, plot, export, report.

Each command finds the night (`--runs-dir`, `--tag`; the latest night by default),
opens its ledger and hands over to the module that does the work. A problem the
user can fix (no such night, an unreadable ledger, a change that no longer applies)
ends in one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import structlog
from rich.console import Console

from runner.core import figures
from runner.core import ledger as ledgers
from runner.core.errors import UserError, user_errors
from runner.core.ledger import PENDING, Ledger, write_tsv
from runner.core.options import DEFAULT_RUNS_DIR, RUNS_DIR_ENV, runs_dir_option
from runner.morning import report as reports
from runner.morning import rerun as reruns
from runner.morning import review as reviews
from runner.morning import verify as verifies
from runner.morning import views

LEDGER_FILE = "ledger.sqlite"


class NightNotFound(UserError):
    """No usable night where the user pointed (one sentence)."""


@dataclass
class RecordedNight:
    """A night on disk, as the morning commands read it: its run directory and its open ledger."""

    run_dir: Path
    ledger: Ledger

    @property
    def tag(self) -> str:
        return self.run_dir.name


def _started(ledger_path: Path) -> str:
    """When a night first started, read without writing (an unreadable one sorts first)."""
    try:
        with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=ledgers.BUSY_TIMEOUT_S) as db:
            return db.execute("SELECT COALESCE(MIN(started_at), '') FROM nights").fetchone()[0]
    except sqlite3.Error:
        return ""


def find_night(runs_dir: Path, tag: str | None) -> Path:
    """The run directory of `tag`, or of the night that started last."""
    if tag:
        if not (runs_dir / tag / LEDGER_FILE).is_file():
            raise NightNotFound(f"there is no night {tag!r} under {runs_dir} (no {LEDGER_FILE}).")
        return runs_dir / tag
    nights = [d for d in runs_dir.iterdir() if (d / LEDGER_FILE).is_file()] if runs_dir.is_dir() else []
    if not nights:
        raise NightNotFound(f"there is no night under {runs_dir}; run `autoresearch overnight` first, "
                            f"or point --runs-dir (or {RUNS_DIR_ENV}) at the runs directory.")
    return max(nights, key=lambda d: (_started(d / LEDGER_FILE), d.name))


@contextmanager
def open_night(runs_dir: Path | None, tag: str | None) -> Iterator[RecordedNight]:
    run_dir = find_night(runs_dir or DEFAULT_RUNS_DIR, tag)
    ledger = Ledger(run_dir / LEDGER_FILE)  # a damaged or locked file fails here, in one sentence
    try:
        yield RecordedNight(run_dir, ledger)
    finally:
        ledger.close()


@contextmanager
def _warnings_only() -> Iterator[None]:
    """Log only warnings, to stderr: standard output carries the tables, JSON and TSV."""
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


def morning_command(command: Callable[..., Any]) -> Callable[..., Any]:
    """A morning command: warnings only on stderr, and a user's error in one line with exit status 1."""

    @functools.wraps(command)
    def quiet(*args: Any, **kwargs: Any) -> Any:
        with _warnings_only():
            return command(*args, **kwargs)

    return user_errors(quiet)


def night_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--tag", default=None, help="The night: a directory under the runs directory "
                                                       "(default: the night that started last).")(command)
    return runs_dir_option(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(command)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def console() -> Console:
    """Rich output; piped output gets room for wide tables instead of a terminal's 80 columns."""
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=140)


# -- status, list, show ----------------------------------------------------------------------------


@click.command()
@night_options
@json_option
@morning_command
def status(runs_dir: Path | None, tag: str | None, as_json: bool) -> None:
    """Is the night running, and how it goes.

    What runs now, the best so far, kept/discarded/failed counts, experiments per
    hour, duty cycle, and the noise and thresholds the decisions use.
    """
    with open_night(runs_dir, tag) as night:
        fig = figures.figures(night.ledger, night.run_dir)
    if as_json:
        echo_json(fig.as_dict())
    else:
        console().print(views.status_panel(fig))


@click.command("list")
@night_options
@json_option
@morning_command
def list_(runs_dir: Path | None, tag: str | None, as_json: bool) -> None:
    """Every experiment of the night, in order."""
    with open_night(runs_dir, tag) as night:
        base = figures.baseline_mean(night.ledger)
        items = [reviews.item(night.ledger, r, base) for r in night.ledger.experiments()]
    if as_json:
        echo_json([views.row_dict(it) for it in items])
    else:
        console().print(views.experiments_table(items, f"autoresearch {night.tag}"))


@click.command()
@click.argument("exp_id")
@night_options
@json_option
@morning_command
def show(exp_id: str, runs_dir: Path | None, tag: str | None, as_json: bool) -> None:
    """One experiment in full.

    Description, lineage back to the baseline, metrics, both phases, image, data
    manifest, the tails of its logs and its diff.
    """
    with open_night(runs_dir, tag) as night:
        row = night.ledger.get(exp_id)
        if as_json:
            echo_json(views.show_dict(night.ledger, night.run_dir, row))
        else:
            console().print(*views.show_renderables(night.ledger, night.run_dir, row))


# -- review -----------------------------------------------------------------------------------------

TRAIN_PY_OPTION = click.option("--train-py", type=click.Path(dir_okay=False, path_type=Path), default=None,
                               help="The train.py to apply accepted changes to (default: ./train.py).")


@dataclass(frozen=True)
class ReviewTarget:
    runs_dir: Path | None
    tag: str | None
    train_py: Path | None

    def merged(self, runs_dir: Path | None, tag: str | None, train_py: Path | None) -> ReviewTarget:
        """A subcommand's own options win over the group's."""
        return ReviewTarget(runs_dir or self.runs_dir, tag or self.tag, train_py or self.train_py)

    @property
    def path(self) -> Path:
        return self.train_py or Path("train.py")


@click.group(invoke_without_command=True)
@night_options
@TRAIN_PY_OPTION
@json_option
@click.pass_context
@morning_command
def review(ctx: click.Context, runs_dir: Path | None, tag: str | None, train_py: Path | None, as_json: bool) -> None:
    """Accept or reject the kept changes.

    Walks the pending kept changes best first: [a]ccept applies it to train.py
    and commits that file (inside a git work tree), [r]eject records why,
    [s]kip leaves it pending, [q]uit stops.
    """
    ctx.obj = ReviewTarget(runs_dir, tag, train_py)
    if ctx.invoked_subcommand is not None:
        return
    with open_night(runs_dir, tag) as night:
        items = reviews.queue(night.ledger)
        if as_json:
            echo_json([views.row_dict(it) for it in items])
            return
        if not items:
            click.echo("nothing to review: no kept change is pending.")
            return
        _walk(night, items, ctx.obj.path)


def _walk(night: RecordedNight, items: list[reviews.Item], train_py: Path) -> None:
    out = console()
    for position, it in enumerate(items, 1):
        if night.ledger.get(it.row.id).review_state != PENDING:
            continue  # accepted along with a change reviewed before it
        out.print(*views.review_card(it, position, len(items)))
        key = click.prompt("[a]ccept, [r]eject, [s]kip, [q]uit", type=click.Choice(["a", "r", "s", "q"]),
                           show_choices=False)
        if key == "q":
            return
        if key == "r":
            why = click.prompt("why (optional)", default="", show_default=False)
            reviews.reject(night.ledger, it.row.id, why)
            click.echo(f"rejected {it.row.id}")
        elif key == "a":
            try:
                click.echo(_accepted_line(reviews.accept(night.ledger, it.row.id, train_py, night.tag), train_py))
            except reviews.Conflict as exc:
                click.echo(f"conflict: {exc}")
    click.echo("end of the review queue.")


def _accepted_line(done: reviews.Accepted, train_py: Path) -> str:
    if not done.applied:
        return f"accepted {done.exp_id}: {train_py} already holds this change."
    brought = [e for e in done.applied if e != done.exp_id]
    along = f" (with {', '.join(brought)})" if brought else ""
    where = f"committed {done.commit[:12]}" if done.commit else "not a git work tree, nothing committed"
    return f"accepted {done.exp_id}{along}: {train_py} updated, {where}."


@review.command("accept")
@click.argument("exp_id")
@night_options
@TRAIN_PY_OPTION
@click.pass_obj
@morning_command
def review_accept(target: ReviewTarget, exp_id: str, runs_dir: Path | None, tag: str | None,
                  train_py: Path | None) -> None:
    """Apply EXP_ID's change to train.py and commit it (inside a git work tree)."""
    target = target.merged(runs_dir, tag, train_py)
    with open_night(target.runs_dir, target.tag) as night:
        click.echo(_accepted_line(reviews.accept(night.ledger, exp_id, target.path, night.tag), target.path))


@review.command("reject")
@click.argument("exp_id")
@click.option("--why", default="", help="The reason, kept in the ledger.")
@night_options
@click.pass_obj
@morning_command
def review_reject(target: ReviewTarget, exp_id: str, why: str, runs_dir: Path | None, tag: str | None) -> None:
    """Reject EXP_ID's change (recorded with the reason)."""
    target = target.merged(runs_dir, tag, None)
    with open_night(target.runs_dir, target.tag) as night:
        reviews.reject(night.ledger, exp_id, why)
    click.echo(f"rejected {exp_id}")


# -- rerun --------------------------------------------------------------------------------------------


@click.command()
@click.argument("exp_id")
@click.option("--exact", is_flag=True,
              help="Replay the recorded schedule and compare bit for bit (default: a fresh timed run, for noise).")
@night_options
@json_option
@morning_command
def rerun(exp_id: str, exact: bool, runs_dir: Path | None, tag: str | None, as_json: bool) -> None:
    """Rerun an experiment from its image.

    Uses the recorded image, data and seed. With --exact the recorded schedule is
    replayed and the verdict says whether val_bpb and the exported weights are
    bit-identical; without it, a fresh timed run measures the noise.
    """
    with open_night(runs_dir, tag) as night:
        verdict = reruns.rerun(night.ledger, night.run_dir, exp_id, exact=exact,
                               on_start=lambda line: click.echo(line, err=True))
    if as_json:
        echo_json(verdict.as_dict())
    else:
        click.echo(verdict.line())


@click.command()
@click.option("--runs", type=click.IntRange(min=2), default=3, show_default=True,
              help="Fresh seeds to run the best and the baseline on (each).")
@night_options
@json_option
@morning_command
def verify(runs: int, runs_dir: Path | None, tag: str | None, as_json: bool) -> None:
    """Measure the night's total gain afresh, free of the selection that kept it.

    Reruns the night's best (its last kept change) and the baseline on RUNS seeds
    the night never used, the same seeds for both, and prints mean(baseline) -
    mean(best) with a 95 % Student-t interval from the spread of these runs.
    """
    with open_night(runs_dir, tag) as night:
        result = verifies.verify(night.ledger, night.run_dir, runs=runs,
                                 on_start=lambda line: click.echo(line, err=True))
    if result is None:
        if as_json:
            echo_json(None)
        else:
            click.echo(f"nothing was kept in night {night.tag}: there is no gain to verify.")
    elif as_json:
        echo_json(result.as_dict())
    else:
        click.echo("\n".join(views.verify_lines(result)))


# -- plot, export, report --------------------------------------------------------------------------


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The PNG to write (default: <run dir>/progress.png).")
@night_options
@morning_command
def plot(out: Path | None, runs_dir: Path | None, tag: str | None) -> None:
    """The progress chart (PNG).

    val_bpb per experiment in order: discarded ones faint, kept ones labelled,
    the running best as a step line.
    """
    with open_night(runs_dir, tag) as night:
        png = reports.plot_png(night.ledger, f"autoresearch {night.tag}")
        out = out or night.run_dir / "progress.png"
    out.write_bytes(png)
    click.echo(f"wrote {out}")


@click.command()
@click.option("--tsv", "fmt", flag_value="tsv", default=True,
              help="results.tsv of the reference: commit val_bpb memory_gb status description (default).")
@click.option("--json", "fmt", flag_value="json",
              help="Every ledger column of every experiment, the nights, and the kept changes with their "
                   "gain, 95 % interval and runs.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The file to write (default: standard output).")
@night_options
@morning_command
def export(fmt: str, out: Path | None, runs_dir: Path | None, tag: str | None) -> None:
    """Export the night's results as TSV or JSON."""
    with open_night(runs_dir, tag) as night:
        if fmt == "json":
            text = json.dumps(reports.export_json(night.ledger, night.tag), indent=2, default=str) + "\n"
        else:
            buffer = io.StringIO()
            write_tsv(night.ledger, buffer)
            text = buffer.getvalue()
    if out:
        out.write_text(text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (default: <run dir>/report.html).")
@night_options
@morning_command
def report(out: Path | None, runs_dir: Path | None, tag: str | None) -> None:
    """One self-contained HTML report.

    The chart, the kept changes with their diffs, the failures with their log
    tails, the noise and the throughput figures.
    """
    with open_night(runs_dir, tag) as night:
        page = reports.html_report(night.ledger, night.run_dir)
        out = out or night.run_dir / "report.html"
    out.write_text(page)
    click.echo(f"wrote {out}")


COMMANDS = (status, list_, show, review, rerun, verify, plot, export, report)


def register(group: click.Group) -> None:
    """Add the morning commands to the `autoresearch` group."""
    for command in COMMANDS:
        group.add_command(command)
