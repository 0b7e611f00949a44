"""What every agent sees and returns.

An agent turns a `Context` (research directions, the current best train.py, the
harness API, the history) into a `Proposal` (a one-line description and a unified
diff against train.py). The runner validates the diff; when it is invalid the
agent is asked again with `Context.feedback` set to the validator's reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from runner.core.errors import UserError


@dataclass(frozen=True)
class HistoryRow:
    """One past experiment, as the agent sees it."""

    exp_id: str
    description: str
    status: str  # lifecycle status or decision: keep, discard, crash, rejected, ...
    val_bpb: float | None
    delta: float | None  # val_bpb minus the parent's val_bpb (negative is better)
    params: dict[str, float | int | str] = field(default_factory=dict)  # constants of its train.py
    measured: dict[str, float] = field(default_factory=dict)  # by the host and the harness: train_s, eval_s, peak_gpu_gib
    reported: dict[str, float] = field(default_factory=dict)  # by its train.py itself: steps, tokens_per_s, mfu_percent
    verdict: str = ""  # the keep rule's: its estimate and interval, and what a keep needed
    error: str = ""  # why it failed (over budget, out of memory, a crash), in a few words


@dataclass(frozen=True)
class Context:
    program: str  # program.md
    train_py: str  # the current best train.py (the parent of the proposal)
    harness_api: str  # prepare.py's public API, as text
    history: tuple[HistoryRow, ...] = ()
    best_val_bpb: float | None = None
    last_failure_log: str = ""  # tail of the last failed experiment's log (written by its train.py: untrusted)
    parent_log: str = ""  # tail of the training log of the train.py shown (written by it: untrusted)
    machine: str = ""  # where runs run (GPU model and memory, or the CPU) and the time budget of each
    feedback: str = ""  # why the previous proposal was rejected (retry), else ""
    seed: int = 0  # for reproducible proposers


@dataclass(frozen=True)
class Usage:
    """Token usage and estimated cost of producing one proposal."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class Proposal:
    description: str
    diff: str
    usage: Usage = Usage()


class AgentError(Exception):
    """The agent could not produce a proposal this time (the night goes on)."""


class AgentConfigError(AgentError, UserError):
    """The agent cannot work with this configuration (retrying will not help)."""


class Agent(Protocol):
    name: str

    def propose(self, context: Context) -> Proposal: ...
