"""The anthropic agent: asks Claude for the next experiment through the Messages API.

The static part of the prompt (and the current best train.py, which changes only on
a keep) are marked for prompt caching, so a night of proposals pays full price for
them roughly once per keep. Transient API trouble (overload, rate limits, server
errors, timeouts, lost connections) is retried by the SDK itself, with exponential
backoff and the server's retry-after; whatever still fails becomes an `AgentError`,
which the runner records before going on with the night. A reply without a diff is a
`ReplyFormatError` carrying the tokens it cost; the runner sends it back to the agent
like an invalid diff.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import anthropic
import structlog

from runner.agents.base import AgentConfigError, AgentError, Context, Proposal, Usage
from runner.agents.config import AnthropicConfig
from runner.agents.prompt import dynamic_part, parse_reply, static_part, train_py_part

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_TOKENS = 16_000

# Estimated list prices in $ per million tokens (input, output) by model id prefix,
# first match wins. Writing the 5-minute prompt cache costs 1.25x input, reading it
# 0.1x input. An unknown model is recorded at $0 with a warning.
PRICES: tuple[tuple[str, float, float], ...] = (
    ("claude-fable", 10.0, 50.0),
    ("claude-opus-5-5", 4.0, 20.0),
    ("claude-opus", 5.0, 25.0),
    ("claude-sonnet-5", 2.0, 10.0),
    ("claude-sonnet", 3.0, 15.0),
    ("claude-haiku", 1.0, 5.0),
)
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1

_EPHEMERAL = {"type": "ephemeral"}


def estimate_cost(model: str, usage: Usage) -> float:
    """Estimated $ cost of `usage` on `model` from the small price table above."""
    inp, out = _price(model)
    dollars_per_mtok = (
        usage.input_tokens * inp
        + usage.cache_creation_input_tokens * inp * CACHE_WRITE_FACTOR
        + usage.cache_read_input_tokens * inp * CACHE_READ_FACTOR
        + usage.output_tokens * out
    )
    return dollars_per_mtok / 1e6


@functools.cache  # one warning per unknown model, not one per proposal
def _price(model: str) -> tuple[float, float]:
    price = next(((inp, out) for prefix, inp, out in PRICES if model.startswith(prefix)), None)
    if price is None:
        log.warning("anthropic_price_unknown", model=model, note="cost recorded as 0")
        return 0.0, 0.0
    return price


class AnthropicAgent:
    """Proposes diffs with a Claude model; what the configuration leaves at None comes from the environment."""

    name = "anthropic"

    def __init__(self, config: AnthropicConfig = AnthropicConfig()) -> None:
        api_key = config.api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not api_key:
            raise AgentConfigError(
                "ANTHROPIC_API_KEY is not set; export your API key, or use the offline search agent."
            )
        if config.max_retries < 0:
            raise AgentConfigError(f"max_retries must not be negative, got {config.max_retries}.")
        self.model = config.model or os.environ.get("AR_ANTHROPIC_MODEL") or DEFAULT_MODEL
        self.max_tokens = config.max_tokens or _env_number("AR_ANTHROPIC_MAX_TOKENS", int) or DEFAULT_MAX_TOKENS
        # Sent only when set: current models reject non-default sampling parameters.
        self.temperature = (config.temperature if config.temperature is not None
                            else _env_number("AR_ANTHROPIC_TEMPERATURE", float))
        self.max_retries = config.max_retries
        self._client = anthropic.Anthropic(
            api_key=api_key,
            base_url=config.base_url or os.environ.get("ANTHROPIC_BASE_URL") or None,
            max_retries=config.max_retries,
            timeout=config.timeout,
            http_client=anthropic.DefaultHttpxClient(event_hooks={"response": [_log_error_status]}),
        )

    def propose(self, context: Context) -> Proposal:
        try:
            message = self._client.messages.create(**self._request(context))
        except anthropic.APIStatusError as exc:
            raise self._status_error(exc) from exc
        except anthropic.APIConnectionError as exc:  # timeouts included
            raise AgentError(f"the Anthropic API could not be reached after {self._retries}: "
                             f"{type(exc).__name__}: {exc}") from exc
        except (anthropic.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise AgentError(f"the Anthropic API answered with something that is not a message "
                             f"({type(exc).__name__}: {exc}).") from exc
        except anthropic.AnthropicError as exc:  # anything else the SDK raises
            raise AgentError(f"the Anthropic SDK failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(message, anthropic.types.Message):  # a body that is no JSON at all (a proxy's page)
            raise AgentError(f"the Anthropic API answered with something that is not a message: "
                             f"{str(message)[:200]!r}.")
        return parse_reply(_reply_text(message), self._usage(message.usage))

    @property
    def _retries(self) -> str:
        return f"{self.max_retries} {'retry' if self.max_retries == 1 else 'retries'}"

    def _status_error(self, exc: anthropic.APIStatusError) -> AgentError:
        """The error for an HTTP error status (the SDK has retried those that another try can fix)."""
        status = exc.status_code
        detail = exc.api_message or exc.message
        if status in (401, 403):
            return AgentConfigError(f"the Anthropic API refused the key (HTTP {status}: {detail}); "
                                    "check ANTHROPIC_API_KEY.")
        if status < 500 and status not in _RETRIED_STATUSES:
            return AgentError(f"the Anthropic API rejected the request (HTTP {status}: {detail}).")
        return AgentError(f"the Anthropic API failed after {self._retries}: HTTP {status}: {detail}")

    def _request(self, context: Context) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": [{"type": "text", "text": static_part(context), "cache_control": _EPHEMERAL}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": train_py_part(context), "cache_control": _EPHEMERAL},
                        {"type": "text", "text": dynamic_part(context)},
                    ],
                }
            ],
        }
        if self.temperature is not None:  # the SDK has no such parameter any more; older models take it
            request["extra_body"] = {"temperature": self.temperature}
        return request

    def _usage(self, raw: Any) -> Usage:
        usage = Usage(
            input_tokens=getattr(raw, "input_tokens", 0) or 0,
            output_tokens=getattr(raw, "output_tokens", 0) or 0,
            cache_creation_input_tokens=getattr(raw, "cache_creation_input_tokens", 0) or 0,
            cache_read_input_tokens=getattr(raw, "cache_read_input_tokens", 0) or 0,
        )
        return dataclasses.replace(usage, cost_usd=estimate_cost(self.model, usage))


# The 4xx statuses the SDK retries, as every 5xx (anthropic._base_client: _should_retry).
_RETRIED_STATUSES = (408, 409, 429)


def _log_error_status(response: Any) -> None:
    """Every error status the API answers goes to the night's log, the ones the SDK then retries included."""
    if response.status_code >= 400:
        log.warning("anthropic_http_error", status=response.status_code,
                    retry_after=response.headers.get("retry-after-ms") or response.headers.get("retry-after"))


def _reply_text(message: anthropic.types.Message) -> str:
    return "\n".join(block.text for block in message.content if block.type == "text")


def _env_number(name: str, kind: type[int] | type[float]) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise AgentConfigError(f"{name} must be a number ({kind.__name__}), got {raw!r}.") from None
