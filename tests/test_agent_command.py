"""The command agent, driven by small Python one-liners."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

from runner.agents.base import AgentConfigError, AgentError, Context
from runner.agents.command_agent import CommandAgent
from runner.agents.config import CommandConfig
from runner.agents.factory import choose_agent, make_agent
from runner.agents.prompt import ReplyFormatError
from runner.core.inputs import MAX_AGENT_REPLY_BYTES

CONTEXT = Context(program="Make it better.", train_py="MATRIX_LR = 0.04\n", harness_api="def finish(model): ...")
DIFF = "--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-MATRIX_LR = 0.04\n+MATRIX_LR = 0.05\n"
PY = shlex.quote(sys.executable)
REPLY = f"DESCRIPTION: raise the matrix learning rate\n```diff\n{DIFF}```\n"


def python(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


def command_agent(command: str, **settings: object) -> CommandAgent:
    return CommandAgent(CommandConfig(command=command, **settings))  # type: ignore[arg-type]


def test_prompt_on_stdin_and_proposal_from_stdout(tmp_path: Path) -> None:
    seen = tmp_path / "prompt.txt"
    reply = f"Thinking...\nDESCRIPTION: raise LR\n```diff\n{DIFF}```\n"
    code = f"import sys; open({str(seen)!r}, 'w').write(sys.stdin.read()); print({reply!r})"
    proposal = command_agent(python(code)).propose(CONTEXT)

    assert proposal.description == "raise LR"
    assert proposal.diff == DIFF
    prompt = seen.read_text()
    assert "Make it better." in prompt and "MATRIX_LR = 0.04" in prompt and "DESCRIPTION:" in prompt


def test_non_zero_exit_reports_stderr_tail() -> None:
    code = "import sys; sys.stderr.write('x' * 5000 + 'model quota exhausted'); sys.exit(3)"
    with pytest.raises(AgentError, match="(?s)exited with status 3.*model quota exhausted") as info:
        command_agent(python(code)).propose(CONTEXT)
    assert len(str(info.value)) < 2500  # only the tail


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        "sys.stderr.write('still thinking'); sys.stderr.flush(); time.sleep(300)"
    )
    with pytest.raises(AgentError, match="(?s)timed out after 1 s.*still thinking"):
        command_agent(python(code), timeout=1).propose(CONTEXT)
    assert _gone(int(pid_file.read_text()))


def _gone(pid: int) -> bool:
    """Dead or a zombie waiting for its new parent to reap it (bounded wait for the kill to land)."""
    for _ in range(100):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_output_without_diff_is_an_agent_error() -> None:
    with pytest.raises(ReplyFormatError, match="no unified diff"):
        command_agent(python("print('I could not decide.')")).propose(CONTEXT)


def test_missing_command_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AR_AGENT_COMMAND", raising=False)
    with pytest.raises(AgentConfigError, match="no agent command given"):
        CommandAgent()


def test_factory_takes_the_command_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AR_AGENT_COMMAND", "cat")
    agent = make_agent(CommandConfig(timeout=5.0))
    assert isinstance(agent, CommandAgent) and agent.command == "cat" and agent.timeout == 5.0
    with pytest.raises(TypeError, match="model"):
        CommandConfig(model="not for this agent")  # type: ignore[call-arg]
    with pytest.raises(AgentConfigError, match="unknown agent 'gpt'; choose one of"):
        choose_agent("gpt")


def test_command_runs_in_cwd(tmp_path: Path) -> None:
    (tmp_path / "reply.txt").write_text(f"DESCRIPTION: from a file\n```diff\n{DIFF}```\n")
    proposal = command_agent("cat reply.txt", cwd=str(tmp_path)).propose(CONTEXT)
    assert proposal.description == "from a file"  # and a command that ignores stdin is fine


def test_a_huge_reply_is_an_agent_error_not_a_full_memory(tmp_path: Path) -> None:
    code = "import sys\nblock = 'x' * 2**16 + '\\n'\nfor _ in range(1024): sys.stdout.write(block)"  # 64 MiB
    with pytest.raises(AgentError, match=f"printed more than {MAX_AGENT_REPLY_BYTES:,} bytes"):
        command_agent(python(code)).propose(CONTEXT)


def test_a_grandchild_that_keeps_the_output_open_does_not_hold_the_reply(tmp_path: Path) -> None:
    """The command exits with its proposal; a process it left behind still holds stdout."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        f"print({REPLY!r})"
    )
    try:
        proposal = command_agent(python(code), timeout=30).propose(CONTEXT)
        assert proposal.description == "raise the matrix learning rate"
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
