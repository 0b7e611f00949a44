"""Choosing an agent and building it from its configuration; agent modules load only when chosen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.agents.base import AgentConfigError
from runner.agents.config import CommandConfig, SearchConfig
from runner.agents.factory import AGENT_NAMES, choose_agent, make_agent

ROOT = Path(__file__).resolve().parent.parent


def test_a_name_is_chosen_as_given_and_auto_by_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert [choose_agent(name) for name in AGENT_NAMES] == ["anthropic", "command", "search", "search"]
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert choose_agent("auto") == "anthropic"
    with pytest.raises(AgentConfigError, match=r"^unknown agent 'gpt'; choose one of anthropic, command, search, auto\.$"):
        choose_agent("gpt")


def test_the_agent_is_the_one_its_configuration_names() -> None:
    assert make_agent(CommandConfig(command="cat")).name == "command"
    assert make_agent(SearchConfig(profile="cpu")).name == "search"
    with pytest.raises(TypeError, match="no agent is configured by a dict"):
        make_agent({"command": "cat"})  # type: ignore[arg-type]


@pytest.mark.parametrize("modules", ["runner.night.records", "runner.cli", "runner.night.overnight"])
def test_importing_the_runner_loads_no_agent_sdk(modules: str) -> None:
    """optuna and the anthropic SDK are slow to import: only the agent that needs one loads it."""
    code = (f"import sys, json, {modules}; "
            "print(json.dumps([m for m in ('optuna', 'anthropic', 'runner.agents.search_agent', "
            "'runner.agents.anthropic_agent') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
