"""Ctrl-C as users press it: SIGINT to the whole process group of `uv run autoresearch overnight` or
`make overnight`, as a terminal sends it, at the moments of a night that matter; SIGTERM and SIGHUP too.

One press reaches the runner more than once (the terminal's copy, and the one `uv run` passes on):
it must still be one press. The night then cancels what runs, leaves no sandbox process or
container behind, records the experiment `cancelled`, says one sentence and exits 130 (143, 129).
A second press stops at once, with one sentence and nothing left running.

The nights resume a copy of one night whose baselines were measured once (real training on the
tiny data, process sandbox), except one pressed while it still prepares its data; the agent is a
real command that answers a fixed change, after a pause where a test presses during the proposal.
A press between an experiment's end and its decision, or during a build on the process sandbox,
is too short to hit from outside: the loop's tests press there (tests/test_loop.py), and a
docker build is pressed here.
"""

from __future__ import annotations

import collections
import difflib
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from dataprep.build import is_built
from sandbox import supervision
from sandbox.docker_backend import OWNER_LABEL
from sandbox.images import BUILD_PREFIX
from sandbox.processes import identity_alive, process_identity
from sandbox.spec import CancelToken, Killer, Phase, RunSpec
from sandbox.status import Status
from sandbox.supervision import Exit, Supervisor, kill_all_runs
from tests.conftest import ledger_held
from tests.corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent
UV = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")  # as the Makefile finds it
AUTORESEARCH = Path(sys.executable).parent / "autoresearch"
TAG = "n"
WAIT_S = 300  # bound on any wait: for a night to reach a moment, or to end
THINK_S = 5  # how long the agent thinks when a test presses during the proposal


# -- what is left running -----------------------------------------------------------------------------


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, those that end meanwhile left out."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(entry.name)] = (int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), command)
        except (OSError, IndexError, ValueError):
            continue
    return found


def sandbox_processes(cache: Path) -> dict[str, str]:
    """The process sandbox's processes under `cache` (its launchers name their plan there) and everything
    they started: process identity -> command line."""
    every = processes()
    children = collections.defaultdict(list)
    for pid, (parent, _) in every.items():
        children[parent].append(pid)
    found, todo = {}, [pid for pid, (_, command) in every.items() if str(cache) in command]
    while todo:
        pid = todo.pop()
        if (identity := process_identity(pid)) is not None and identity not in found:
            found[identity] = every.get(pid, (0, ""))[1]
            todo.extend(children[pid])
    return found


def harness_runs(found: dict[str, str]) -> bool:
    """Whether the sandbox runs a phase already (train.py, or the harness's evaluation), not only its launcher."""
    return any("train.py" in command or "evaluate.py" in command for command in found.values())


# -- a night, as a user starts it ----------------------------------------------------------------------


def _args(runs: Path, agent_command: str) -> list[str]:
    return ["--tag", TAG, "--runs-dir", str(runs), "--agent", "command", "--agent-command", agent_command,
            "--sandbox", "process", "--gpus", "none", "--budget", "1", "--baseline-runs", "2"]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "AR_CACHE": str(cache), "UV_PROJECT": str(ROOT), "UV_FROZEN": "1"}


def write_reply(path: Path, nonce: str = "") -> Path:
    """The agent's reply: a change of train.py that trains (and, with a nonce, whose image no earlier run built)."""
    train_py = (ROOT / "train.py").read_text()
    changed = train_py.replace("\nEMBEDDING_LR = 0.3 ", "\nEMBEDDING_LR = 0.25 ", 1) + (f"NONCE = {nonce!r}\n" if nonce
                                                                                       else "")
    assert changed.count("EMBEDDING_LR = 0.25 ") == 1
    diff = "".join(difflib.unified_diff(train_py.splitlines(True), changed.splitlines(True), "a/train.py", "b/train.py"))
    path.write_text(f"DESCRIPTION: a lower embedding learning rate\n```diff\n{diff}```\n")
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A project, and the agent's reply (reply.txt)."""
    root = tmp_path_factory.mktemp("home")
    (root / "project").mkdir()
    for name in ("train.py", "prepare.py", "program.md"):
        shutil.copyfile(ROOT / name, root / "project" / name)
    write_reply(root / "reply.txt")
    return root


@pytest.fixture(scope="module")
def dusk(home, tiny_cache) -> Path:
    """`home` with a night whose baselines are measured (real training on the tiny data), in `runs/`."""
    done = subprocess.run([str(AUTORESEARCH), "overnight", *_args(home / "runs", "false"), "--source", "local",
                           "--hours", "0.000001"], cwd=home / "project", env=_env(tiny_cache), capture_output=True,
                          text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return home


class Overnight:
    """`uv run autoresearch overnight` or `make overnight` in a process group of its own: the foreground group
    a terminal sends Ctrl-C to. `runs` holds the night when it resumes one."""

    def __init__(self, wrapper: str, home: Path, tmp_path: Path, cache: Path, *extra: str, source: str = "local",
                 think_s: float = 0, reply: Path | None = None) -> None:
        self.runs, self.cache, self.thinking = tmp_path / "runs", cache, tmp_path / "thinking"
        self.exp = f"e{len(self.rows('SELECT id FROM experiments')) + 1:04d}"  # the experiment this night proposes
        agent = f"cat > /dev/null; touch {self.thinking}; sleep {think_s}; cat {reply or home / 'reply.txt'}"
        args = [*_args(self.runs, agent), "--max-experiments", "1", *extra]
        if wrapper == "uv":
            argv = [UV, "run", "autoresearch", "overnight", "--source", source, "--hours", "1", *args]
        else:  # the Makefile's own target; `-o setup`: the environment is installed already (and has the Ray extra)
            argv = ["make", "-o", "setup", "-f", str(ROOT / "Makefile"), "overnight", f"SOURCE={source}", "HOURS=1",
                    f"ARGS={shlex.join(args)}"]
        self.stderr = tmp_path / "stderr.txt"
        with self.stderr.open("w") as err:
            self.process = subprocess.Popen([*AS_A_TERMINAL_STARTS_IT, *argv], cwd=home / "project", env=_env(cache),
                                            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    @classmethod
    def resuming(cls, wrapper: str, dusk: Path, tmp_path: Path, cache: Path, *extra: str, **options) -> Overnight:
        """The night resumes a copy of dusk's."""
        shutil.copytree(dusk / "runs", tmp_path / "runs")
        return cls(wrapper, dusk, tmp_path, cache, *extra, **options)

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")

    def rows(self, query: str, *args: object) -> list[dict]:
        """Rows of the night's ledger (none before it has one), read as `status` reads them, beside the writer."""
        path = self.runs / TAG / "ledger.sqlite"
        if not path.exists():
            return []
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(query, args)]

    def row(self, exp: str) -> dict | None:
        found = self.rows("SELECT * FROM experiments WHERE id=?", exp)
        return found[0] if found else None

    def nights(self) -> list[dict]:
        return self.rows("SELECT * FROM nights ORDER BY id")

    def status(self, exp: str) -> str | None:
        return (self.row(exp) or {}).get("status")

    def reach(self, moment: str) -> dict[str, str]:
        """Wait until the night is at `moment` (on the process sandbox); returns the sandbox's processes then."""
        found: dict[str, str] = {}

        def there() -> bool:
            found.clear()
            found.update(sandbox_processes(self.cache))
            if moment == "data":
                return "data.prepare" in self.output()
            if moment == "proposal":
                return self.thinking.exists()
            return self.status(self.exp) == moment and harness_runs(found)

        self.until(moment, there)
        return found

    def until(self, what: str, there) -> None:
        deadline = time.monotonic() + WAIT_S
        while not there():
            assert self.process.poll() is None, f"it ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"the night never reached {what}:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def press(self, signum: int = signal.SIGINT) -> None:
        os.killpg(self.process.pid, signum)

    def end(self) -> int:
        return self.process.wait(timeout=WAIT_S)


# A shell with job control starts a foreground command with the signals' default dispositions. A test run
# in the background of a shell without it (as CI may be) inherits SIGINT ignored, and make, which keeps an
# ignored signal ignored, would then never end by the press itself: the command is exec'd with them reset.
AS_A_TERMINAL_STARTS_IT = [sys.executable, "-c", "import os, signal, sys\n"
                           "for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):\n"
                           "    signal.signal(s, signal.SIG_DFL)\n"
                           "os.execvp(sys.argv[1], sys.argv[1:])"]


def said_once(output: str, sentence: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert [line for line in output.splitlines() if line.startswith("stopped ")] == [sentence], output[-3000:]


def alive(identity: str) -> bool:
    """Whether the process runs: a zombie (dead, its parent has not collected it yet) does not."""
    pid = int(identity.partition(":")[0])
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return identity_alive(identity) and state != "Z"


def nothing_left(before: dict[str, str], cache: Path) -> None:
    assert [command for identity, command in before.items() if alive(identity)] == []
    assert [command for identity, command in sandbox_processes(cache).items() if alive(identity)] == []


# -- one press ----------------------------------------------------------------------------------------

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


@pytest.mark.slow
@pytest.mark.parametrize("wrapper, signum, moment", [
    ("uv", signal.SIGINT, "training"),
    ("make", signal.SIGINT, "evaluating"),
    ("uv", signal.SIGTERM, "training"),
    ("uv", signal.SIGHUP, "evaluating"),
], ids=["uv-ctrl-c-training", "make-ctrl-c-evaluating", "uv-term-training", "uv-hup-evaluating"])
def test_one_press_while_a_phase_runs_cancels_it_and_leaves_nothing_running(wrapper, signum, moment, dusk, tmp_path,
                                                                             tiny_cache):
    night = Overnight.resuming(wrapper, dusk, tmp_path, tiny_cache)
    sandbox = night.reach(moment)
    night.press(signum)
    code = night.end()
    # make got the SIGINT too: once its child has ended, it ends by it
    assert code == (-signum if wrapper == "make" else 128 + signum), night.output()[-3000:]
    said_once(night.output(), f"stopped by {NAMES[signum]} ({night.exp} cancelled); resume the night with --tag {TAG}.")
    nothing_left(sandbox, tiny_cache)
    phase = "train" if moment == "training" else "eval"
    assert (night.row(night.exp)["status"], night.row(night.exp)[f"{phase}_killed_by"]) == ("cancelled", "cancel")
    assert night.nights()[-1]["stop_reason"] == "interrupted"


@pytest.mark.slow
def test_one_press_while_the_agent_thinks_stops_without_waiting_for_it(dusk, tmp_path, tiny_cache):
    night = Overnight.resuming("uv", dusk, tmp_path, tiny_cache, think_s=THINK_S)
    night.reach("proposal")
    pressed = time.monotonic()
    night.press()
    assert night.end() == 130
    assert time.monotonic() - pressed < THINK_S  # not after the agent's answer
    said_once(night.output(), f"stopped by Ctrl-C (nothing was running); resume the night with --tag {TAG}.")
    assert night.row(night.exp) is None and night.nights()[-1]["stop_reason"] == "interrupted"


def test_one_press_while_the_data_is_prepared_stops_the_start_up(home, tmp_path):
    """The first `make overnight` on a machine builds the data (for minutes, on a real source)."""
    corpus, cache = write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    night = Overnight("make", home, tmp_path, cache, source=f"local:{corpus}")
    night.reach("data")
    night.press()
    assert night.end() == -signal.SIGINT, night.output()[-3000:]
    said_once(night.output(), f"stopped by Ctrl-C before the night began; start it again with --tag {TAG}.")
    assert not (night.runs / TAG).exists() and not is_built(cache / "local")  # no night began, no data looks built
    assert [command for _, command in processes().values() if str(corpus) in command] == []  # prepare.py is gone


# -- a second press ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_press_stops_at_once_even_when_the_first_cannot_finish(dusk, tmp_path, tiny_cache):
    night = Overnight.resuming("uv", dusk, tmp_path, tiny_cache)
    sandbox = night.reach("training")
    # another process writes to the ledger: the graceful stop cannot record the cancel (it would wait 10 s for it)
    with ledger_held(night.runs / TAG / "ledger.sqlite", "BEGIN IMMEDIATE"):
        night.press()
        time.sleep(2)  # a second press, not the same one again
        assert night.process.poll() is None, night.output()[-3000:]  # still stopping gracefully
        pressed = time.monotonic()
        night.press()
        assert night.end() == 130
        assert time.monotonic() - pressed < 5  # at once: not after the ledger's 10 s wait
    said_once(night.output(), f"stopped at once by a second Ctrl-C: whatever ran was killed; resume the night with "
                              f"--tag {TAG}.")
    nothing_left(sandbox, tiny_cache)
    assert night.status(night.exp) == "training"  # owed: a resume runs it again


def test_no_run_starts_once_all_were_killed(tmp_path, monkeypatch):
    """What a second press relies on: every supervised run is killed, and a run about to start does not."""

    class Run:
        def __init__(self):
            self.started, self.killed = 0, 0

        def start(self):
            self.started += 1

        def wait(self, timeout_s):
            time.sleep(timeout_s)
            return self.killed > 0

        def kill(self):
            self.killed += 1

        def pids(self):
            return set()

        def meter(self):
            return None

        def oom_seen(self):
            return False

        def report(self):
            return Exit(137, False)

    monkeypatch.setattr(supervision, "_LIVE", supervision._Live())
    spec = RunSpec(run_id="r", image="i", phase=Phase.TRAIN, command=["true"], log_path=tmp_path / "log",
                   out_dir=tmp_path, deadline_s=60)
    supervised, later = Run(), Run()
    ended = []
    with Supervisor(spec) as supervisor:
        watching = threading.Thread(target=lambda: ended.append(supervisor.supervise(supervised, CancelToken())))
        watching.start()
        while not supervised.started:
            time.sleep(0.01)
        kill_all_runs("stopping at once")
        watching.join(10)
    assert (supervised.killed, ended[0].status, ended[0].killer) == (1, Status.CANCELLED, Killer.CANCEL)
    with Supervisor(spec) as supervisor:
        ending = supervisor.supervise(later, CancelToken())
    assert (later.started, ending.status) == (0, Status.CANCELLED)


# -- docker --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.parametrize("moment", ["proposed", "training"])
def test_one_press_on_the_docker_sandbox_leaves_no_container(moment, dusk, tmp_path, tiny_cache, docker_client,
                                                             docker_base_image):
    night = Overnight.resuming("uv", dusk, tmp_path, tiny_cache, "--sandbox", "docker",
                               reply=write_reply(tmp_path / "reply.txt", nonce=uuid.uuid4().hex))
    night.until("a new night", lambda: len(night.nights()) == 2)
    runner = night.nights()[-1]["runner"].partition(" ")[2]
    mine = {"label": [f"{OWNER_LABEL}={runner}", f"autoresearch.exp={night.exp}"], "status": "running"}
    night.until(moment, lambda: night.status(night.exp) == "proposed" if moment == "proposed"  # its image is built
                else night.status(night.exp) == "training" and docker_client.containers.list(filters=mine))
    night.press()
    assert night.end() == 130, night.output()[-3000:]
    recorded = night.row(night.exp)
    if moment == "training":
        assert (recorded["status"], recorded["train_killed_by"]) == ("cancelled", "cancel")
        said_once(night.output(), f"stopped by Ctrl-C ({night.exp} cancelled); resume the night with --tag {TAG}.")
    else:  # the build ends (it cannot be cancelled), nothing runs: owed to a resume
        assert recorded["status"] in ("proposed", "built")
        said_once(night.output(), f"stopped by Ctrl-C (nothing was running); resume the night with --tag {TAG}.")
    assert docker_client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={runner}"}) == []
    assert docker_client.containers.list(all=True, filters={"name": BUILD_PREFIX + runner.replace(":", "-")}) == []
    if recorded["status"] == "built":  # owed: its image stays for the resume
        docker_client.images.remove(recorded["image"], force=True)
