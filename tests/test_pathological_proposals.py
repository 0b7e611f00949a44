"""No proposal can stop the night: whatever an agent sends, of whichever kind, is applied or
recorded `rejected` with a reason the agent gets back, and the night goes on.

The night runs with the loop tests' fake sandbox and a scripted agent; each agent kind
(command, anthropic, search) is then driven for real through the proposer the night uses.
"""

from __future__ import annotations

import difflib

import pytest

from runner.agents.anthropic_agent import AnthropicAgent
from runner.agents.base import Proposal, Usage
from runner.agents.command_agent import CommandAgent
from runner.agents.config import AnthropicConfig, CommandConfig, SearchConfig
from runner.agents.search_agent import SearchAgent
from runner.core.ledger import EXPERIMENT
from runner.night.proposals import Best, Proposer
from runner.night.records import Records
from tests.messages_server import MessagesServer
from tests.doubles import BASE_TRAIN_PY, FakeBackend, ScriptedAgent, change, make_night

UNARY_MINUS = "X = " + "-" * 10_000 + "1\n"  # CPython's parser raises MemoryError on it


def appending(line: str, description: str = "append a line"):
    """A scripted step: a diff that appends `line` to the train.py the agent is shown."""

    def step(context):
        return Proposal(description, _diff(context.train_py, context.train_py + line), Usage(input_tokens=10))

    return step


def _diff(old: str, new: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py"))


def unreadable(context):
    raise MemoryError()  # as a reply too deep for whatever reads it would


def no_text(context):
    return Proposal("a diff that is no text", None)  # type: ignore[arg-type]


def test_pathological_proposals_are_rejections_fed_back_and_the_night_goes_on(project):
    agent = ScriptedAgent(
        appending(UNARY_MINUS), appending("X = '\ud800'\n", description="a lone \ud800 surrogate"),
        unreadable, no_text,
        appending("X = 1\0\n"), change(LR=0.2),
    )
    night, ledger = make_night(project, agent, FakeBackend(), max_experiments=3, max_diff_retries=2)
    assert night.run() == "max-experiments"

    surrogate, untyped, kept = ledger.experiments(kinds=[EXPERIMENT])
    assert [(r.status, r.attempts) for r in (surrogate, untyped, kept)] == [("rejected", 2), ("rejected", 2),
                                                                            ("done", 2)]
    assert "nests code too deeply to parse" in agent.contexts[1].feedback  # the 10,000 signs
    assert "not valid Unicode (U+D800" in surrogate.reject_reason
    assert agent.contexts[3].feedback == "the proposal could not be read (MemoryError)"
    assert "could not be checked (AttributeError" in untyped.reject_reason
    assert "NUL bytes" in agent.contexts[5].feedback and kept.decision == "keep"
    # what the agent sent is recorded as text the ledger and a UTF-8 file can hold
    assert surrogate.description == "a lone \\ud800 surrogate" and "+X = '\\ud800'" in surrogate.diff
    assert (night.settings.run_dir / surrogate.id / "diff.patch").read_text(encoding="utf-8") == surrogate.diff
    assert untyped.diff == "None"


# -- every agent kind, through the proposer the night uses ------------------------------------------------------

DEEP_DIFF = _diff(BASE_TRAIN_PY, BASE_TRAIN_PY + UNARY_MINUS)
REPLY = f"DESCRIPTION: negate X ten thousand times\n```diff\n{DEEP_DIFF}```\n"


@pytest.fixture
def proposer_for(ledger, project):
    def make(agent) -> Proposer:
        return Proposer(agent, Records(ledger, ledger.path.parent, "cpu"), project, max_tries=1)

    return make


def _rejected_once(proposer: Proposer, train_py: str = BASE_TRAIN_PY) -> str:
    assert proposer.propose(Best("e0001", 0.9, train_py), 0.9) is None
    (row,) = proposer.records.ledger.experiments(kinds=[EXPERIMENT])
    assert row.status == "rejected" and row.image is None
    return row.reject_reason


def test_a_command_agents_pathological_reply_is_a_rejection(proposer_for, tmp_path):
    reply = tmp_path / "reply.txt"
    reply.write_text(REPLY)
    agent = CommandAgent(CommandConfig(command=f"cat {reply}", timeout=60))
    assert "nests code too deeply to parse" in _rejected_once(proposer_for(agent))


def test_an_anthropic_agents_pathological_reply_is_a_rejection(proposer_for):
    with MessagesServer() as server:
        server.reply(REPLY)
        agent = AnthropicAgent(AnthropicConfig(api_key="test-key", base_url=server.url, max_retries=0, timeout=10.0))
        assert "nests code too deeply to parse" in _rejected_once(proposer_for(agent))


def test_a_search_agent_that_fails_on_its_parent_is_a_rejection(proposer_for):
    """The search reads train.py with the parser itself: a parent that defeats it costs a proposal, not the night."""
    reason = _rejected_once(proposer_for(SearchAgent(SearchConfig(profile="cpu"))), BASE_TRAIN_PY + UNARY_MINUS)
    assert reason == "the proposal could not be read (MemoryError)"
