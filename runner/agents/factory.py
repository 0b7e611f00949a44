"""Choosing and configuring an agent by name.

Agent modules are imported only when chosen: the anthropic SDK and optuna take a
while to import and the other agents do not need them.
"""

from __future__ import annotations

import inspect
import os

import structlog

from runner.agents.base import Agent, AgentError
from runner.errors import UserError

log = structlog.get_logger(__name__)

AGENT_NAMES = ("anthropic", "command", "search", "auto")


class AgentConfigError(AgentError, UserError):
    """The agent cannot work with this configuration (retrying will not help)."""


def make_agent(name: str, **settings: object) -> Agent:
    """Build the agent `name`; settings that its constructor does not take are ignored,
    so one settings bag can serve every agent."""
    if name == "auto":
        name = "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "search"
        reason = "ANTHROPIC_API_KEY is set" if name == "anthropic" else "ANTHROPIC_API_KEY is not set, offline"
        log.info("agent_chosen", agent=name, reason=reason)
    agent_class = _agent_class(name)
    accepted = inspect.signature(agent_class).parameters
    return agent_class(**{key: value for key, value in settings.items() if key in accepted})


def _agent_class(name: str) -> type:
    if name == "anthropic":
        from runner.agents.anthropic_agent import AnthropicAgent

        return AnthropicAgent
    if name == "command":
        from runner.agents.command_agent import CommandAgent

        return CommandAgent
    if name == "search":
        from runner.agents.search_agent import SearchAgent

        return SearchAgent
    raise AgentConfigError(f"unknown agent {name!r}; choose one of {', '.join(AGENT_NAMES)}.")
