"""The command agent: any program that reads the prompt on stdin and prints a proposal.

This is how a coding agent in headless mode (or a local model behind a script) takes
part in the night. The command runs in its own process group so that on a timeout
the whole tree it started is killed, not only the shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from typing import BinaryIO

import structlog

from runner.agents.base import AgentConfigError, AgentError, Context, Proposal
from runner.agents.config import CommandConfig
from runner.agents.prompt import full_prompt, parse_reply
from runner.core.inputs import MAX_AGENT_REPLY_BYTES

log = structlog.get_logger(__name__)

STDERR_TAIL_CHARS = 2000


class CommandAgent:
    """Runs the configured command through the shell once per proposal (env AR_AGENT_COMMAND by default)."""

    name = "command"

    def __init__(self, config: CommandConfig = CommandConfig()) -> None:
        command = config.command or os.environ.get("AR_AGENT_COMMAND", "")
        if not command.strip():
            raise AgentConfigError("no agent command given; pass one (or set AR_AGENT_COMMAND) for --agent command.")
        self.command = command
        self.timeout = config.timeout
        self.cwd = config.cwd

    def propose(self, context: Context) -> Proposal:
        # Output goes to files, not pipes: memory holds at most the cap, and a grandchild that
        # escaped the kill and keeps them open cannot hold the night up.
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                self.command,
                shell=True,
                cwd=self.cwd,
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                process.communicate(full_prompt(context).encode(), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                # Not reaped yet, so the group id cannot have been reused by another process.
                _kill_group(process.pid)
                process.wait()
                raise AgentError(f"the agent command timed out after {self.timeout:g} s{_tail(stderr)}") from None
            if process.returncode != 0:
                raise AgentError(f"the agent command exited with status {process.returncode}{_tail(stderr)}")
            reply = _read_reply(stdout)
        log.debug("command_agent_reply", chars=len(reply))
        return parse_reply(reply)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_reply(stdout: BinaryIO) -> str:
    stdout.seek(0)
    data = stdout.read(MAX_AGENT_REPLY_BYTES + 1)
    if len(data) > MAX_AGENT_REPLY_BYTES:
        raise AgentError(f"the agent command printed more than {MAX_AGENT_REPLY_BYTES:,} bytes; "
                         "a proposal is a description and one diff of train.py")
    return data.decode("utf-8", errors="replace")


def _tail(stderr: BinaryIO) -> str:
    stderr.seek(0, os.SEEK_END)
    stderr.seek(max(0, stderr.tell() - 4 * STDERR_TAIL_CHARS))
    text = stderr.read().decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    return "; stderr ends with:\n" + text[-STDERR_TAIL_CHARS:]
