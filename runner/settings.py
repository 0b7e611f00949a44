"""The settings of a night: everything `overnight` can be told, checked once.

A bad value is a `SettingsError` with one sentence for the user. The settings in
force are stored with the night in the ledger, so a morning reader knows which
thresholds, budget and agent produced each decision.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.decision import Rule

SOURCES = ("offline", "linux", "local", "hf")
SANDBOXES = ("auto", "docker", "process")
# prepare.py's TIME_BUDGET per profile; the runner passes the budget explicitly so
# the deadlines it sets and the budget the harness uses always agree.
PROFILE_BUDGET = {"gpu": 300.0, "cpu": 60.0}


class SettingsError(Exception):
    """A setting the user gave cannot work (one sentence)."""


def default_tag() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def cache_dir() -> Path:
    """Where prepare.py keeps prepared data (same rule as the harness: $AR_CACHE)."""
    return Path(os.environ.get("AR_CACHE") or Path.home() / ".cache" / "autoresearch-sandbox")


def data_hash(data_dir: Path) -> str | None:
    """The combined hash of prepared data (manifest.json, written last), None when missing or unreadable."""
    try:
        return json.loads((data_dir / "manifest.json").read_text())["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Source:
    """A data source for prepare.py: a name and, for `local`, the directory of text files."""

    name: str = "offline"
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "Source":
        """`offline`, `linux`, `hf`, `local` (already prepared) or `local:PATH`."""
        name, _, path = text.partition(":")
        if name not in SOURCES:
            raise SettingsError(f"unknown data source {text!r}; use one of offline, linux, hf, local or local:PATH.")
        if path and name != "local":
            raise SettingsError(f"only the local source takes a path (local:PATH), not {text!r}.")
        return cls(name, Path(path).expanduser() if path else None)

    def prepare_args(self) -> list[str]:
        return ["--source", self.name, *([str(self.path)] if self.path else [])]

    def __str__(self) -> str:
        return f"{self.name}:{self.path}" if self.path else self.name


@dataclass(frozen=True)
class Settings:
    root: Path = field(default_factory=Path.cwd)  # holds train.py, prepare.py, program.md
    tag: str = field(default_factory=default_tag)
    hours: float | None = None  # None: until Ctrl-C (or max_experiments)
    max_experiments: int | None = None
    agent: str = "auto"
    agent_command: str | None = None
    sandbox: str = "auto"
    gpus: str = "all"  # "all", "none" or comma-separated indices
    budget: float | None = None  # None: the profile's TIME_BUDGET
    source: Source = Source()
    baseline_runs: int = 3
    rule: Rule = Rule()
    max_diff_retries: int = 3
    gpu_failures: int = 3  # infrastructure failures in a row that take a GPU out of rotation
    deterministic: bool = True  # bit-for-bit reruns; costs ~19 % of GPU throughput (docs/benchmarks.md)
    runs_dir: Path | None = None  # None: root / "runs"

    def __post_init__(self) -> None:
        checks = [
            (self.hours is None or self.hours > 0, "--hours must be positive"),
            (self.max_experiments is None or self.max_experiments > 0, "--max-experiments must be positive"),
            (self.budget is None or self.budget > 0, "--budget must be a positive number of seconds"),
            (self.baseline_runs >= 1, "--baseline-runs must be at least 1 (the noise needs a baseline)"),
            (self.rule.k >= 0, "--k must not be negative"),
            (self.rule.min_delta >= 0, "--min-delta must not be negative"),
            (self.max_diff_retries >= 1, "--max-diff-retries must be at least 1"),
            (self.gpu_failures >= 1, "the GPU failure limit must be at least 1"),
            (self.sandbox in SANDBOXES, f"--sandbox must be one of {', '.join(SANDBOXES)}"),
            (not any(c in self.tag for c in "/\\") and self.tag not in ("", ".", ".."), "--tag must be a plain name"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message + ".")
        for name in ("train.py", "prepare.py"):
            if not (self.root / name).is_file():
                raise SettingsError(f"no {name} in {self.root}; run autoresearch from the project directory.")

    @property
    def run_dir(self) -> Path:
        return (self.runs_dir or self.root / "runs") / self.tag

    def time_budget(self, profile: str) -> float:
        return self.budget if self.budget is not None else PROFILE_BUDGET[profile]

    def record(self) -> dict[str, Any]:
        """The settings as stored with the night."""
        data = dataclasses.asdict(self)
        data["source"] = str(self.source)
        return data
