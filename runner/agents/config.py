"""What each agent can be told: one frozen dataclass per agent.

The caller builds the one for the agent it chose and `runner.agents.factory.make_agent`
turns it into that agent, so a setting an agent does not take cannot be given to it
(a TypeError here, not a value dropped on the way). Settings left at None are taken
from the environment by the agent, as its docstring says.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnthropicConfig:
    """The anthropic agent (runner.agents.anthropic_agent)."""

    api_key: str | None = None  # None: $ANTHROPIC_API_KEY
    model: str | None = None  # None: $AR_ANTHROPIC_MODEL, else the agent's default model
    max_tokens: int | None = None  # None: $AR_ANTHROPIC_MAX_TOKENS, else the agent's default
    temperature: float | None = None  # None: $AR_ANTHROPIC_TEMPERATURE, else not sent
    base_url: str | None = None  # None: $ANTHROPIC_BASE_URL, else the SDK's
    timeout: float = 600.0  # seconds for one request; a long reply takes minutes
    max_retries: int = 4  # the SDK's retries of overload, rate limits, 5xx, timeouts and lost connections


@dataclass(frozen=True)
class CommandConfig:
    """The command agent (runner.agents.command_agent)."""

    command: str | None = None  # a shell command; None: $AR_AGENT_COMMAND
    timeout: float = 900.0  # seconds for one proposal, after which the command's process group is killed
    cwd: str | None = None  # where the command runs; None: the current directory


@dataclass(frozen=True)
class SearchConfig:
    """The search agent (runner.agents.search_agent)."""

    profile: str | None = None  # whose branch of `X if GPU else Y` constants is searched; None: this machine's
    seed: int = 0
    min_trials: int = 8  # finished experiments before the TPE sampler takes over from local perturbation


AgentConfig = AnthropicConfig | CommandConfig | SearchConfig
