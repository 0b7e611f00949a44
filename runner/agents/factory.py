"""Choosing an agent by name, and building it from its configuration.

Agent modules are imported only when their agent is built: the anthropic SDK and
optuna take a while to import and the other agents do not need them.
"""

from __future__ import annotations

import os

import structlog

from runner.agents.base import Agent, AgentConfigError
from runner.agents.config import AgentConfig, AnthropicConfig, CommandConfig, SearchConfig

log = structlog.get_logger(__name__)

AGENT_NAMES = ("anthropic", "command", "search", "auto")


def choose_agent(name: str) -> str:
    """The agent `name` stands for: "auto" is anthropic when ANTHROPIC_API_KEY is set, else the offline search."""
    if name not in AGENT_NAMES:
        raise AgentConfigError(f"unknown agent {name!r}; choose one of {', '.join(AGENT_NAMES)}.")
    if name != "auto":
        return name
    chosen = "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "search"
    reason = "ANTHROPIC_API_KEY is set" if chosen == "anthropic" else "ANTHROPIC_API_KEY is not set, offline"
    log.info("agent_chosen", agent=chosen, reason=reason)
    return chosen


def make_agent(config: AgentConfig) -> Agent:
    """The agent that `config` configures."""
    if isinstance(config, AnthropicConfig):
        from runner.agents.anthropic_agent import AnthropicAgent

        return AnthropicAgent(config)
    if isinstance(config, CommandConfig):
        from runner.agents.command_agent import CommandAgent

        return CommandAgent(config)
    if isinstance(config, SearchConfig):
        from runner.agents.search_agent import SearchAgent

        return SearchAgent(config)
    raise TypeError(f"no agent is configured by a {type(config).__name__}")
