"""The settings of a night: everything `overnight` can be told, checked once.

A bad value is a `SettingsError` with one sentence for the user. The settings in
force are stored with the night in the ledger, so a morning reader knows which
thresholds, budget and agent produced each decision.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from contract import PROFILES, cache_dir
from runner.core.decision import Rule
from runner.core.errors import UserError
from runner.core.inputs import MAX_PROGRAM_BYTES, MAX_TRAIN_PY_BYTES, read_text
from runner.core.options import DEFAULT_RUNS_DIR

SOURCES = ("offline", "linux", "local", "hf")
SANDBOXES = ("auto", "docker", "process")
DEFAULT_GPU_MEMORY_CAP = "0.9"  # of each card: what one experiment may hold on its GPU


# The project's files a night reads, and the most each may hold; program.md may be missing.
PROJECT_FILES = {"train.py": MAX_TRAIN_PY_BYTES, "prepare.py": MAX_TRAIN_PY_BYTES, "program.md": MAX_PROGRAM_BYTES}


class SettingsError(UserError):
    """A setting the user gave cannot work (one sentence)."""


def webhook_host(url: str) -> str:
    """A webhook URL as records and logs may show it: its path is its secret, so only the host is kept."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/')[0]}/..."


def default_tag() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class GpuMemoryCap:
    """`--gpu-memory-cap`: a share of the card (`0.9`, at most 1), GiB (`40GiB`, `40`) or no cap (`none`),
    parsed once and turned into bytes for whatever card a run is given."""

    share: float | None = None
    absolute: int | None = None  # bytes

    @classmethod
    def parse(cls, text: str) -> GpuMemoryCap:
        value = text.strip().lower()
        if value in ("none", "off", "0"):
            return cls()
        number = value.removesuffix("gib").removesuffix("g").strip()
        try:
            amount = float(number)
        except ValueError:
            raise SettingsError(f"--gpu-memory-cap takes a share of the card such as 0.9, GiB such as 40GiB, or "
                                f"none; not {text!r}.") from None
        if not (amount > 0 and amount == amount):
            raise SettingsError("--gpu-memory-cap must be positive (or none).")
        if amount <= 1 and number == value:
            return cls(share=amount)
        return cls(absolute=int(amount * 2**30))

    def bytes_for(self, card_bytes: int) -> int | None:
        """The GPU memory one experiment may hold on a card of `card_bytes` (None: no cap)."""
        if self.share is not None:
            return int(self.share * card_bytes) if card_bytes else None
        return self.absolute


def prepared_data(source_name: str) -> Path:
    """Where prepare.py put the data of a source: $AR_CACHE/<name> (contract.cache_dir)."""
    return cache_dir() / source_name


def project_text(root: Path, name: str) -> str:
    """The text of the project file `name` ("" for a missing program.md); InputError when it is no usable text."""
    path = root / name
    if name == "program.md" and not path.exists():
        return ""
    return read_text(path, name, PROJECT_FILES[name])


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
    hours: float | None = None  # the night's total over its invocations (runner.night.limits); None: as last time
    max_experiments: int | None = None  # proposals of the night, resumes included; None: as last time
    max_agent_usd: float | None = None  # what the agent may cost in the night, resumes included; None: as last time
    agent: str = "auto"
    agent_command: str | None = None
    sandbox: str = "auto"
    gpus: str = "all"  # "all", "none" or comma-separated indices
    budget: float | None = None  # None: the profile's TIME_BUDGET
    source: Source = Source()
    baseline_runs: int = 4  # the noise's first degrees of freedom (docs/decisions.md)
    rule: Rule = Rule()
    max_diff_retries: int = 3
    gpu_failures: int = 3  # infrastructure failures in a row that take a GPU out of rotation
    deterministic: bool = True  # bit-for-bit reruns, at a cost in GPU throughput (docs/benchmarks.md)
    runs_dir: Path | None = None  # None: root / DEFAULT_RUNS_DIR
    gpu_memory_cap: str = DEFAULT_GPU_MEMORY_CAP  # as the user said it (recorded); parsed: `memory_cap`
    base_image: str | None = None  # the docker runtime's upstream (name:tag); None: the pinned default
    prune_images: bool = True  # remove discarded and failed experiments' images (runner.night.pruning)
    cluster: str | None = None  # a Ray cluster's address (runner.night.cluster); None: this machine's GPUs
    notify: tuple[str, ...] = ()  # webhook URLs told of keeps, failure streaks, stalls, a full disk, the end
    on_event: tuple[str, ...] = ()  # commands given each such event as JSON on stdin
    stall_minutes: float | None = 30.0  # no run ending for this long is a stall worth a word (None: never)

    def __post_init__(self) -> None:
        checks = [
            (self.hours is None or self.hours > 0, "--hours must be positive"),
            (self.max_experiments is None or self.max_experiments > 0, "--max-experiments must be positive"),
            (self.max_agent_usd is None or self.max_agent_usd > 0, "--max-agent-usd must be a positive amount"),
            (self.budget is None or self.budget > 0, "--budget must be a positive number of seconds"),
            (self.baseline_runs >= 2, "--baseline-runs must be at least 2 (the noise needs repeated runs)"),
            (0 < self.rule.alpha < 1, "--alpha must be between 0 and 1"),
            (self.rule.max_runs >= 2, "--max-runs must be at least 2 (a keep needs a second run)"),
            (self.rule.min_delta >= 0, "--min-delta must not be negative"),
            (0 <= self.rule.paired_share <= 1, "--paired-share must be between 0 and 1"),
            (self.max_diff_retries >= 1, "--max-diff-retries must be at least 1"),
            (self.gpu_failures >= 1, "the GPU failure limit must be at least 1"),
            (self.sandbox in SANDBOXES, f"--sandbox must be one of {', '.join(SANDBOXES)}"),
            (self.agent_command is None or self.agent == "command", "--agent-command is for --agent command only"),
            (not any(c in self.tag for c in "/\\") and self.tag not in ("", ".", ".."), "--tag must be a plain name"),
            (self.base_image is None or (self.base_image and not any(c.isspace() for c in self.base_image)),
             "--base-image must be an image reference such as pytorch/pytorch:TAG"),
            (self.base_image is None or self.sandbox != "process",
             "--base-image is for the docker sandbox, not process"),
            (self.cluster is None or (self.cluster.strip() and not any(c.isspace() for c in self.cluster)),
             "--cluster takes a Ray address such as ray://HOST:10001, HOST:6379 or auto"),
            (all(url.startswith(("http://", "https://")) for url in self.notify),
             "--notify takes http:// or https:// webhook URLs"),
            (self.stall_minutes is None or self.stall_minutes > 0, "--stall-minutes must be positive"),
            (self.cluster is None or self.gpus in ("all", "none"),
             "--gpus on a cluster is all or none: the nodes give each run its GPU"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message + ".")
        self.memory_cap  # a cap that cannot be parsed is one sentence now
        for name in PROJECT_FILES:
            if name != "program.md" and not (self.root / name).is_file():
                raise SettingsError(f"no {name} in {self.root}; run autoresearch from the project directory.")
            project_text(self.root, name)  # text the night can use, or one sentence now

    @functools.cached_property
    def memory_cap(self) -> GpuMemoryCap:
        return GpuMemoryCap.parse(self.gpu_memory_cap)

    @property
    def run_dir(self) -> Path:
        return (self.runs_dir or self.root / DEFAULT_RUNS_DIR) / self.tag

    def time_budget(self, profile: str) -> float:
        return self.budget if self.budget is not None else PROFILES[profile].time_budget


    def record(self) -> dict[str, Any]:
        """The settings as stored with the night."""
        data = dataclasses.asdict(self)
        data["source"] = str(self.source)
        data["notify"] = [webhook_host(url) for url in self.notify]
        return data
