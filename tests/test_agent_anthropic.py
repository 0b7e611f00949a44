"""The anthropic agent, through the real SDK, against a local fake Messages API."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs
from tests.messages_server import MessagesServer, error_body, message_body

from runner.agents.anthropic_agent import DEFAULT_MODEL, AnthropicAgent, estimate_cost
from runner.agents.base import AgentConfigError, AgentError, Context, HistoryRow, Usage
from runner.agents.config import AnthropicConfig, SearchConfig
from runner.agents.factory import choose_agent, make_agent
from runner.agents.prompt import ReplyFormatError

DIFF = """\
--- a/train.py
+++ b/train.py
@@ -1,2 +1,2 @@
-MATRIX_LR = 0.04
+MATRIX_LR = 0.05
 DEPTH = 8
"""
REPLY = f"DESCRIPTION: raise MATRIX_LR\n```diff\n{DIFF}```\n"

CONTEXT = Context(
    program="Research program: tune the optimizer.",
    train_py="MATRIX_LR = 0.04\nDEPTH = 8\n",
    harness_api="class Budget: ...",
    history=(HistoryRow("e0007", "DEPTH 8 -> 12", "discard", 1.7, 0.02),),
    best_val_bpb=1.68,
    last_failure_log="Traceback: boom",
    feedback="the diff touched prepare.py",
)


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "AR_ANTHROPIC_MODEL", "AR_ANTHROPIC_MAX_TOKENS",
                 "AR_ANTHROPIC_TEMPERATURE"):
        monkeypatch.delenv(name, raising=False)


# The SDK waits as long as the server's retry-after says: a millisecond keeps retry tests fast.
RETRY_AT_ONCE = {"retry-after-ms": "1"}


def agent(url: str, **settings: object) -> AnthropicAgent:
    config = {"api_key": "test-key", "base_url": url, "max_retries": 2, "timeout": 10.0, **settings}
    return AnthropicAgent(AnthropicConfig(**config))  # type: ignore[arg-type]


def test_success_sends_cached_static_part_and_dynamic_user_message(server: MessagesServer) -> None:
    server.reply(REPLY)
    proposal = agent(server.url, model="claude-test-model", max_tokens=1234, temperature=0.3).propose(CONTEXT)

    assert proposal.description == "raise MATRIX_LR"
    assert proposal.diff == DIFF
    (request,) = server.requests
    assert request.path == "/v1/messages"
    assert "test-key" in request.headers.get("x-api-key", "") + request.headers.get("authorization", "")
    body = request.body
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("claude-test-model", 1234, 0.3)
    (system,) = body["system"]
    assert system["cache_control"] == {"type": "ephemeral"}
    assert "Research program: tune the optimizer." in system["text"] and "class Budget: ..." in system["text"]
    assert "DESCRIPTION:" in system["text"]
    (message,) = body["messages"]
    assert message["role"] == "user"
    train_block, dynamic_block = message["content"]
    assert "MATRIX_LR = 0.04" in train_block["text"] and train_block["cache_control"] == {"type": "ephemeral"}
    dynamic = dynamic_block["text"]
    assert "| e0007 | discard | 1.7000 | +0.0200 | - | - | - | - | - | - | - | DEPTH 8 -> 12 |" in dynamic
    assert "1.6800" in dynamic and "Traceback: boom" in dynamic
    assert "the diff touched prepare.py" in dynamic
    assert "cache_control" not in dynamic_block


def test_settings_from_env_and_defaults(server: MessagesServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.reply(REPLY)
    server.reply(REPLY)
    AnthropicAgent(AnthropicConfig(api_key="k", base_url=server.url)).propose(CONTEXT)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    monkeypatch.setenv("AR_ANTHROPIC_MODEL", "claude-env-model")
    monkeypatch.setenv("AR_ANTHROPIC_MAX_TOKENS", "777")
    monkeypatch.setenv("AR_ANTHROPIC_TEMPERATURE", "0.5")
    AnthropicAgent().propose(CONTEXT)

    default, from_env = (r.body for r in server.requests)
    assert default["model"] == DEFAULT_MODEL and "temperature" not in default
    assert (from_env["model"], from_env["max_tokens"], from_env["temperature"]) == ("claude-env-model", 777, 0.5)
    assert "env-key" in server.requests[1].headers.get("x-api-key", "") + server.requests[1].headers.get("authorization", "")


def test_usage_counts_cache_tokens_and_estimates_cost(server: MessagesServer) -> None:
    server.reply(REPLY, input_tokens=200, output_tokens=300, cache_creation_input_tokens=4000,
                 cache_read_input_tokens=0)
    server.reply(REPLY, input_tokens=200, output_tokens=300, cache_creation_input_tokens=0,
                 cache_read_input_tokens=4000)
    a = agent(server.url, model="claude-sonnet-5-5")
    first, second = a.propose(CONTEXT).usage, a.propose(CONTEXT).usage

    assert (first.input_tokens, first.output_tokens, first.cache_creation_input_tokens) == (200, 300, 4000)
    assert second.cache_read_input_tokens == 4000 and second.cache_creation_input_tokens == 0
    # $2 / $10 per MTok; cache writes 1.25x and reads 0.1x the input price
    assert first.cost_usd == pytest.approx((200 * 2 + 4000 * 2.5 + 300 * 10) / 1e6)
    assert second.cost_usd == pytest.approx((200 * 2 + 4000 * 0.2 + 300 * 10) / 1e6)
    assert second.cost_usd < first.cost_usd


def test_cost_of_an_unknown_model_is_zero() -> None:
    assert estimate_cost("some-other-model", Usage(input_tokens=10**6, output_tokens=10**6)) == 0.0


def test_rate_limit_is_retried_after_the_servers_retry_after(server: MessagesServer) -> None:
    server.push(429, error_body("rate_limit_error", "slow down"), {"retry-after": "1"})
    server.reply(REPLY)
    started = time.monotonic()
    proposal = agent(server.url).propose(CONTEXT)

    assert proposal.diff == DIFF
    assert time.monotonic() - started >= 1.0  # the server's second, not the SDK's first backoff (at most 0.5 s)
    assert len(server.requests) == 2


def test_repeated_server_errors_end_in_one_sentence(server: MessagesServer) -> None:
    for _ in range(3):
        server.push(500, error_body("api_error", "internal trouble"), RETRY_AT_ONCE)
    with pytest.raises(AgentError, match="failed after 2 retries: HTTP 500: internal trouble") as info:
        agent(server.url, max_retries=2).propose(CONTEXT)
    assert "\n" not in str(info.value)
    assert len(server.requests) == 3  # the first try and two retries


def test_overloaded_529_is_retried_and_logged(server: MessagesServer) -> None:
    server.push(529, error_body("overloaded_error", "Overloaded"))  # no retry-after: the SDK's own backoff
    server.reply(REPLY)
    with capture_logs() as events:
        assert agent(server.url).propose(CONTEXT).diff == DIFF
    assert len(server.requests) == 2
    assert [e["status"] for e in events if e["event"] == "anthropic_http_error"] == [529]


def test_a_body_that_is_no_message_is_one_sentence(server: MessagesServer) -> None:
    server.push(200, b"{not json", {"content-type": "application/json"})
    with pytest.raises(AgentError, match="answered with something that is not a message.*JSONDecodeError"):
        agent(server.url).propose(CONTEXT)
    server.push(200, b"<html>proxy error</html>", {"content-type": "text/html"})
    with pytest.raises(AgentError, match="answered with something that is not a message.*proxy error"):
        agent(server.url).propose(CONTEXT)
    assert len(server.requests) == 2  # nothing to retry: the night asks again later


def test_a_reply_without_a_diff_carries_what_it_cost(server: MessagesServer) -> None:
    server.reply("DESCRIPTION: lower the LR\nI think the learning rate is too high.", input_tokens=10, output_tokens=5)
    with pytest.raises(ReplyFormatError, match="no unified diff") as info:
        agent(server.url, model="claude-sonnet-5-5").propose(CONTEXT)
    assert info.value.description == "lower the LR"
    assert (info.value.usage.input_tokens, info.value.usage.output_tokens) == (10, 5)
    assert info.value.usage.cost_usd == pytest.approx((10 * 2 + 5 * 10) / 1e6)
    server.push(200, {**message_body("x"), "content": []})  # empty reply
    with pytest.raises(ReplyFormatError, match="no unified diff"):
        agent(server.url).propose(CONTEXT)
    assert len(server.requests) == 2  # sent back to the agent by the runner, as an invalid diff is


def test_bad_request_is_not_retried(server: MessagesServer) -> None:
    server.push(400, error_body("invalid_request_error", "max_tokens too large"), RETRY_AT_ONCE)
    with pytest.raises(AgentError, match="rejected the request.*max_tokens too large"):
        agent(server.url).propose(CONTEXT)
    assert len(server.requests) == 1


def test_refused_key_is_a_config_error(server: MessagesServer) -> None:
    server.push(401, error_body("authentication_error", "invalid x-api-key"), RETRY_AT_ONCE)
    with pytest.raises(AgentConfigError, match="refused the key"):
        agent(server.url).propose(CONTEXT)
    assert len(server.requests) == 1


def test_timeout_is_retried_then_fails(server: MessagesServer) -> None:
    server.push(200, message_body(REPLY), delay=3.0)
    server.push(200, message_body(REPLY), delay=3.0)
    with pytest.raises(AgentError, match="could not be reached after 1 retry: APITimeoutError"):
        agent(server.url, max_retries=1, timeout=0.2).propose(CONTEXT)
    assert len(server.requests) == 2


def test_connection_refused_ends_in_agent_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AgentError, match="could not be reached after 1 retry: APIConnectionError"):
        agent(f"http://127.0.0.1:{port}", max_retries=1).propose(CONTEXT)


def test_negative_retries_are_a_config_error() -> None:
    with pytest.raises(AgentConfigError, match="max_retries must not be negative"):
        AnthropicAgent(AnthropicConfig(api_key="k", max_retries=-1))


def test_missing_key_is_one_clear_sentence() -> None:
    with pytest.raises(AgentConfigError, match=r"^ANTHROPIC_API_KEY is not set; .*\.$"):
        AnthropicAgent()


def test_bad_env_number_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AR_ANTHROPIC_MAX_TOKENS", "lots")
    with pytest.raises(AgentConfigError, match="AR_ANTHROPIC_MAX_TOKENS must be a number"):
        AnthropicAgent(AnthropicConfig(api_key="k"))


def test_factory_auto_picks_anthropic_when_the_key_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    assert choose_agent("auto") == "anthropic"
    chosen = make_agent(AnthropicConfig(model="claude-x"))
    assert isinstance(chosen, AnthropicAgent) and chosen.model == "claude-x"
    assert make_agent(AnthropicConfig()).name == "anthropic"


def test_a_setting_the_agent_does_not_take_is_an_error() -> None:
    with pytest.raises(TypeError, match="command"):
        AnthropicConfig(command="meant for the command agent")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="model"):
        SearchConfig(model="claude-x")  # type: ignore[call-arg]
