"""A local stand-in for the Anthropic Messages API, scripted per test.

It speaks enough of `POST /v1/messages` for the real SDK: each request takes the next
scripted response (status, body, headers, optional delay) from a queue, and every
request is recorded so tests can check what was sent. An empty queue answers 500.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Scripted:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def message_body(
    text: str,
    *,
    input_tokens: int = 100,
    output_tokens: int = 50,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
    model: str = "claude-sonnet-5-5",
    stop_reason: str = "end_turn",
) -> dict[str, Any]:
    """A successful Messages API response carrying one text block."""
    return {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_creation_input_tokens,
            "cache_read_input_tokens": cache_read_input_tokens,
        },
    }


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


class MessagesServer:
    """`with MessagesServer() as server:` listens on 127.0.0.1 at a free port."""

    def __init__(self) -> None:
        self.queue: deque[Scripted] = deque()
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def push(
        self,
        status: int = 200,
        body: dict[str, Any] | str | bytes = b"",
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Queue one response; dict bodies are sent as JSON, others as given."""
        headers = dict(headers or {})
        if isinstance(body, dict):
            raw = json.dumps(body).encode()
            headers.setdefault("content-type", "application/json")
        else:
            raw = body.encode() if isinstance(body, str) else body
        with self._lock:
            self.queue.append(Scripted(status, raw, headers, delay))

    def reply(self, text: str, **usage: Any) -> None:
        """Queue a successful message whose text is `text`."""
        self.push(200, message_body(text, **usage))

    def _next(self, request: Recorded) -> Scripted:
        with self._lock:
            self.requests.append(request)
            if self.queue:
                return self.queue.popleft()
        return Scripted(500, json.dumps(error_body("api_error", "no scripted response")).encode())

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"unparsed": raw.decode(errors="replace")}
                scripted = server._next(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(scripted.delay)
                try:
                    self.send_response(scripted.status)
                    for name, value in scripted.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(scripted.body)))
                    self.end_headers()
                    self.wfile.write(scripted.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep test output clean

        return Handler

    def __enter__(self) -> MessagesServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
