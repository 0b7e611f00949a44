"""Where the nights are: the one rule every command follows (`--runs-dir`, else $AR_RUNS_DIR, else ./runs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

RUNS_DIR_ENV = "AR_RUNS_DIR"
DEFAULT_RUNS_DIR = Path("runs")  # under the project directory the command runs in


def runs_dir_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--runs-dir` (or $AR_RUNS_DIR); None when neither is given, meaning DEFAULT_RUNS_DIR."""
    return click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        envvar=RUNS_DIR_ENV, show_envvar=True,
                        help=f"Where the nights are (default: ./{DEFAULT_RUNS_DIR}).")(command)
