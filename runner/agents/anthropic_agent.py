"""The anthropic agent: asks Claude for the next experiment through the Messages API.

The static part of the prompt (and the current best train.py, which changes only on
a keep) are marked for prompt caching, so a night of proposals pays full price for
them roughly once per keep. Transient API trouble is retried here with exponential
backoff; whatever still fails becomes an `AgentError`, which the runner records
before going on with the night.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import anthropic
import structlog

from runner.agents.base import AgentError, Context, Proposal, Usage
from runner.agents.factory import AgentConfigError
from runner.agents.prompt import ReplyFormatError, dynamic_part, parse_reply, static_part, train_py_part

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "claude-sonnet-5-5"
DEFAULT_MAX_TOKENS = 16_000
DEFAULT_TIMEOUT = 600.0  # seconds for one request; a long reply takes minutes

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
    """Proposes diffs with a Claude model; settings come from arguments, then env."""

    name = "anthropic"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = 5,
        backoff_base: float = 2.0,
        backoff_max: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not api_key:
            raise AgentConfigError(
                "ANTHROPIC_API_KEY is not set; export your API key, or use the offline search agent."
            )
        self.model = model or os.environ.get("AR_ANTHROPIC_MODEL") or DEFAULT_MODEL
        self.max_tokens = max_tokens or _env_number("AR_ANTHROPIC_MAX_TOKENS", int) or DEFAULT_MAX_TOKENS
        # Sent only when set: current models reject non-default sampling parameters.
        self.temperature = temperature if temperature is not None else _env_number("AR_ANTHROPIC_TEMPERATURE", float)
        if max_attempts < 1:
            raise AgentConfigError(f"max_attempts must be at least 1, got {max_attempts}.")
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._client = anthropic.Anthropic(
            api_key=api_key,
            base_url=base_url or os.environ.get("ANTHROPIC_BASE_URL") or None,
            max_retries=0,  # retried here, with our own policy and logging
            timeout=timeout,
        )

    def propose(self, context: Context) -> Proposal:
        request = self._request(context)
        usage = Usage()
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                message = self._client.messages.create(**request)
            except anthropic.APIStatusError as exc:
                _raise_if_permanent(exc)
                error = f"HTTP {exc.status_code}: {exc.api_message or exc.message}"
                retry_after = _retry_after(exc.response.headers)
            except (anthropic.APIConnectionError, anthropic.APIResponseValidationError, json.JSONDecodeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            except anthropic.AnthropicError as exc:  # anything else the SDK raises: not worth a retry
                raise AgentError(f"the Anthropic SDK failed: {type(exc).__name__}: {exc}") from exc
            else:
                usage = _add(usage, self._usage(getattr(message, "usage", None)))
                try:
                    return parse_reply(_reply_text(message), usage)
                except ReplyFormatError as exc:
                    error = f"malformed reply (stop_reason={getattr(message, 'stop_reason', None)}): {exc}"
            if attempt < self.max_attempts:
                delay = self._delay(attempt, retry_after)
                log.warning("anthropic_retry", attempt=attempt, error=error, delay_s=round(delay, 3))
                self._sleep(delay)
        log.error("anthropic_failed", attempts=self.max_attempts, error=error, spent_usd=usage.cost_usd)
        raise AgentError(f"the Anthropic API gave no usable proposal after {self.max_attempts} attempts; last error: {error}")

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
        if raw is None:
            return Usage()
        usage = Usage(
            input_tokens=getattr(raw, "input_tokens", 0) or 0,
            output_tokens=getattr(raw, "output_tokens", 0) or 0,
            cache_creation_input_tokens=getattr(raw, "cache_creation_input_tokens", 0) or 0,
            cache_read_input_tokens=getattr(raw, "cache_read_input_tokens", 0) or 0,
        )
        return dataclasses.replace(usage, cost_usd=estimate_cost(self.model, usage))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """The server's retry-after when it gives one, else exponential backoff with jitter."""
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        return min(self.backoff_base * 2 ** (attempt - 1), self.backoff_max) * random.uniform(0.5, 1.0)


def _raise_if_permanent(exc: anthropic.APIStatusError) -> None:
    """Errors that another attempt cannot fix end the proposal at once."""
    status = exc.status_code
    detail = exc.api_message or exc.message
    if status in (401, 403):
        raise AgentConfigError(f"the Anthropic API refused the key (HTTP {status}: {detail}); check ANTHROPIC_API_KEY.") from exc
    if status < 500 and status not in (408, 409, 429):
        raise AgentError(f"the Anthropic API rejected the request (HTTP {status}: {detail}).") from exc


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            continue
    return None


def _reply_text(message: Any) -> str:
    blocks = getattr(message, "content", None) or []
    return "\n".join(block.text for block in blocks if getattr(block, "type", None) == "text")


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(Usage)})


def _env_number(name: str, kind: type[int] | type[float]) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise AgentConfigError(f"{name} must be a number ({kind.__name__}), got {raw!r}.") from None
