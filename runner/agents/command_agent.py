"""The command agent: any program that reads the prompt on stdin and prints a proposal.

This is how a coding agent in headless mode (or a local model behind a script) takes
part in the night. The command runs in its own process group so that on a timeout
the whole tree it started is killed, not only the shell.
"""

from __future__ import annotations

import os
import signal
import subprocess

import structlog

from runner.agents.base import AgentError, Context, Proposal
from runner.agents.factory import AgentConfigError
from runner.agents.prompt import full_prompt, parse_reply

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 900.0
STDERR_TAIL_CHARS = 2000
REAP_TIMEOUT = 5.0  # seconds to collect output after the kill


class CommandAgent:
    """Runs `command` through the shell once per proposal (env AR_AGENT_COMMAND by default)."""

    name = "command"

    def __init__(self, command: str | None = None, timeout: float = DEFAULT_TIMEOUT, cwd: str | None = None) -> None:
        command = command or os.environ.get("AR_AGENT_COMMAND", "")
        if not command.strip():
            raise AgentConfigError("no agent command given; pass one (or set AR_AGENT_COMMAND) for --agent command.")
        self.command = command
        self.timeout = timeout
        self.cwd = cwd

    def propose(self, context: Context) -> Proposal:
        process = subprocess.Popen(
            self.command,
            shell=True,
            cwd=self.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            stdout, stderr = process.communicate(full_prompt(context), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # Not reaped yet, so the group id cannot have been reused by another process.
            _kill_group(process.pid)
            raise AgentError(f"the agent command timed out after {self.timeout:g} s{_tail(_reap(process))}") from None
        if process.returncode != 0:
            raise AgentError(f"the agent command exited with status {process.returncode}{_tail(stderr)}")
        log.debug("command_agent_reply", chars=len(stdout))
        return parse_reply(stdout)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(process: subprocess.Popen[str]) -> str:
    """stderr of a killed command; gives up on pipes that an escaped grandchild holds open."""
    try:
        return process.communicate(timeout=REAP_TIMEOUT)[1]
    except subprocess.TimeoutExpired:
        for pipe in (process.stdout, process.stderr):
            if pipe:
                pipe.close()
        process.wait()
        return ""


def _tail(stderr: str) -> str:
    stderr = stderr.strip()
    if not stderr:
        return ""
    return "; stderr ends with:\n" + stderr[-STDERR_TAIL_CHARS:]
