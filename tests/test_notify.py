"""Word of a night's events: webhooks (a real local HTTP receiver) and commands, never in the night's way."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import structlog

from runner.core.settings import Settings, SettingsError
from runner.night import notify
from runner.night.notify import Event, Notifier, Watch
from tests.doubles import FakeBackend, ScriptedAgent, change, make_night


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body it is sent (or answers 500 `failures` times)."""

    def __init__(self, failures: int = 0) -> None:
        self.bodies: list[dict] = []
        self.failures = failures
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.failures > 0:
                    outer.failures -= 1
                    self.send_response(500)
                else:
                    outer.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/SECRET-PATH"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(notify, "RETRY_S", 0.01)


def test_a_night_posts_its_keep_and_its_end_and_runs_the_event_command(project, receiver, tmp_path):
    events_file = tmp_path / "events.jsonl"
    command = f"{sys.executable} -c \"import sys; open({str(events_file)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')\""
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend(), notify=(receiver.url,),
                               on_event=(command,))
    assert night.run() == "max-experiments"
    ledger.close()
    kinds = [body["event"]["kind"] for body in receiver.bodies]
    assert kinds == ["keep", "end"]
    keep, end = receiver.bodies
    assert keep["text"] == keep["content"] and keep["text"].startswith("[autoresearch t] kept e0005 (set {'LR': 0.2})")
    assert "gain +0.1" in keep["text"] and keep["event"]["data"]["exp"] == "e0005"
    assert end["text"] == "[autoresearch t] the night ended (max-experiments): 1 kept of 1 decided"
    commanded = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [c["event"]["kind"] for c in commanded] == ["keep", "end"]


def test_a_streak_of_failures_is_said_once(project, receiver):
    crashes = [change(BEHAVIOUR="crash") for _ in range(4)]
    night, ledger = make_night(project, ScriptedAgent(*crashes), FakeBackend(), notify=(receiver.url,), max_experiments=4)
    night.run()
    ledger.close()
    streaks = [body for body in receiver.bodies if body["event"]["kind"] == "crash_streak"]
    assert len(streaks) == 1 and "3 experiments failed in a row" in streaks[0]["text"]


def test_a_dead_webhook_neither_stops_nor_changes_the_night(project, tmp_path):
    """Nothing listens on the port: every delivery fails, is retried and logged, and the night runs as without it."""
    dead = Receiver()
    url = dead.url
    dead.close()
    with structlog.testing.capture_logs() as logs:
        night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend(), notify=(url,))
        assert night.run() == "max-experiments"
    assert [r.decision for r in ledger.experiments(kinds=["experiment"])] == ["keep"]
    ledger.close()
    failed = [entry for entry in logs if entry["event"] == "notify.failed"]
    assert len(failed) == 2 * notify.ATTEMPTS  # keep and end, each tried ATTEMPTS times
    assert all("SECRET-PATH" not in entry["target"] for entry in failed)  # a webhook's path is its secret


def test_a_failing_receiver_gets_the_event_on_a_later_try(receiver):
    receiver.failures = notify.ATTEMPTS - 1
    notifier = Notifier((receiver.url,))
    notifier.send(Event("keep", "t", "kept e0005"))
    notifier.close()
    assert [body["event"]["text"] for body in receiver.bodies] == ["kept e0005"]


def test_a_stall_is_said_once_until_a_run_ends_and_a_full_disk_is_said(receiver):
    notifier = Notifier((receiver.url,))
    watch = Watch(notifier, "t", stall_s=0.0)
    watch.check_stall()
    watch.check_stall()  # still the same stall: said once
    watch.ran("e0002", experiment=True, failed=False, status="done")
    watch.check_stall()  # a new stall after progress
    watch.disk_full("/runs/t")
    notifier.close()
    kinds = [body["event"]["kind"] for body in receiver.bodies]
    assert kinds == ["stall", "stall", "disk_full"]
    assert "the disk holding /runs/t is full" in receiver.bodies[-1]["text"]


def test_without_targets_no_thread_runs_and_nothing_is_sent():
    notifier = Notifier()
    notifier.send(Event("end", "t", "the night ended"))
    notifier.close()
    assert notifier._thread is None


def test_the_record_keeps_a_webhooks_host_not_its_secret_path(project):
    settings = Settings(root=project, notify=("https://hooks.slack.com/services/T000/B000/XXXX",))
    assert settings.record()["notify"] == ["https://hooks.slack.com/..."]
    with pytest.raises(SettingsError, match="--notify takes http"):
        Settings(root=project, notify=("hooks.slack.com/services/T000",))
