"""The real `autoresearch` command line in a process that a crash-safety test kills with SIGKILL.

    python -m tests.crash_driver SANDBOX PAUSE [ARGS...]    (ARGS as for `autoresearch`)

Everything runs as a user's command would, except what would make the test slow or
unreachable: the night's agent is scripted (LR 0.2, then 0.3, ...), and SANDBOX is the loop
tests' fake (`fake`) or real Docker images with fake runs (`docker-builds`). PAUSE is where
the process stops itself (SIGSTOP) so that the test can kill it there, at a moment it could
otherwise never hit reliably:

  none                  run to the end
  done:EXP              EXP's run was recorded `done`; its decision is not made yet
  build:before-commit   a docker image build: the container is made, the image not yet
  build:after-commit    ... the image is made, the ledger does not know it yet
  git:before-commit     a review accept: train.py is written, `git commit` has not run
  git:after-commit      ... committed, the ledger does not know it yet
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import docker.models.containers

import runner.night.overnight
from runner.cli import main
from runner.core.ledger import Ledger
from sandbox.docker_backend import DockerBackend
from tests.doubles import FakeBackend, ScriptedAgent, change
from sandbox.status import Status


PAUSE_NOTE = "pause.note"


def stop_here() -> None:
    """Stop the whole process before this thread runs another line. A stop sent to the process is taken by
    whichever thread the kernel picks, and on a busy machine the caller could run on for milliseconds (a
    build's container was removed that way before the test could look); sent to this thread, it stops at once."""
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def around(owner: Any, name: str, when: str, matches: Callable[..., bool] = lambda *a, **k: True,
           note: Callable[..., str] | None = None) -> None:
    """Stop before or after `owner.name` runs (when its arguments match); `note` says what it ran on,
    written to the file PAUSE_NOTE (in the working directory) before the stop."""
    original = getattr(owner, name)

    def pause(*args: Any, **kwargs: Any) -> None:
        if note is not None:
            Path(PAUSE_NOTE).write_text(note(*args, **kwargs))
        stop_here()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        hit = matches(*args, **kwargs)
        if hit and when == "before-commit":
            pause(*args, **kwargs)
        result = original(*args, **kwargs)
        if hit and when == "after-commit":
            pause(*args, **kwargs)
        return result

    setattr(owner, name, wrapped)


class DockerBuilds(DockerBackend):
    """Real experiment images on the engine; runs as the fake sandbox does them, from the row's train.py."""

    def run(self, spec, cancel=None):
        fake = FakeBackend()
        fake.images[spec.image] = (spec.log_path.parent / "train.py").read_text()
        return fake.run(spec, cancel)


def main_with(kind: str, pause: str, args: list[str]) -> None:
    backend = FakeBackend() if kind == "fake" else DockerBuilds()
    runner.night.overnight.make_backend = lambda *a, **k: backend
    agent = ScriptedAgent(*(change(LR=round(0.2 + 0.05 * n, 2)) for n in range(20)))
    runner.night.overnight.make_agent = lambda *a, **k: agent
    point, _, detail = pause.partition(":")
    if point == "done":
        around(Ledger, "transition", "after-commit", lambda self, exp, status, **_: (exp, status) == (detail, Status.DONE))
    elif point == "build":
        around(docker.models.containers.Container, "commit", detail, note=lambda container, **_: container.name)
    elif point == "git":
        around(subprocess, "run", detail, lambda command, *a, **k: list(command[:2]) == ["git", "commit"])
    main(args)


if __name__ == "__main__":
    main_with(sys.argv[1], sys.argv[2], sys.argv[3:])
