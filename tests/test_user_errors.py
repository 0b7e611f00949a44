"""Every failure a user can cause ends in one sentence and a non-zero exit, never a traceback.

Each case goes through the real command line (click's runner, or `autoresearch` in a
subprocess): a damaged or locked ledger, read-only runs and cache directories (real
read-only mounts: as root, file modes stop nothing), files that are not UTF-8 or far
too large, a start that cannot succeed, a full disk and a Docker engine that goes away
in the middle of a night.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.core import ledger as ledgers
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, RERUN, Experiment, Ledger
from tests.conftest import ledger_held
from tests.test_diffs import make_diff
from tests.recorded_night import invoke, one_line_error
from sandbox.status import Status

ROOT = Path(__file__).resolve().parent.parent
AUTORESEARCH = Path(sys.executable).parent / "autoresearch"
LEDGER_READERS = (["status"], ["list"], ["show", "e0001"], ["review"], ["review", "accept", "e0001"],
                  ["review", "reject", "e0001"], ["rerun", "e0001"], ["verify"], ["export"], ["report"], ["plot"])


def ends_in_one_sentence(result) -> str:
    """A command that failed as a user error: exit 1, no traceback, and its last line is the one error."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and lines[-1].startswith("Error: "), result.output
    assert sum(line.startswith("Error: ") for line in lines) == 1, result.output
    return lines[-1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A project directory holding the real harness files, as the current directory."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("train.py", "prepare.py", "program.md"):
        (root / name).write_bytes((ROOT / name).read_bytes())
    monkeypatch.chdir(root)
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "no-data"))  # nothing is prepared unless a test says so
    return root


def overnight(runs: Path | None, *extra: str, env: dict | None = None):
    runs_dir = ["--runs-dir", str(runs)] if runs else []
    return CliRunner().invoke(main, ["overnight", "--tag", "t", *runs_dir, "--gpus", "none", "--agent", "search",
                                     "--source", "local", *extra], env=env)


def morning(runs: Path, *args: str):
    return CliRunner().invoke(main, [*args, "--runs-dir", str(runs)])


@contextlib.contextmanager
def mounted(where: Path, *options: str, source: str = "tmpfs"):
    """A real mount at `where` for the test's duration; skips when mounting is not permitted here."""
    where.mkdir(parents=True, exist_ok=True)
    kind = ["-t", "tmpfs"] if source == "tmpfs" else ["--bind"]
    done = subprocess.run(["mount", *kind, *(["-o", ",".join(options)] if options and source == "tmpfs" else []),
                           source, str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    try:
        if source != "tmpfs" and options:
            subprocess.run(["mount", "-o", ",".join(("remount", "bind", *options)), str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# -- the ledger ------------------------------------------------------------------------------------


def test_a_damaged_ledger_is_one_sentence_for_overnight_and_every_command(tmp_path, workdir):
    runs = tmp_path / "runs"
    (runs / "t").mkdir(parents=True)
    (runs / "t" / "ledger.sqlite").write_bytes(b"not a database at all " * 200)
    error = ends_in_one_sentence(overnight(runs))
    assert "is not a readable ledger" in error and "another night with a new --tag" in error
    for args in LEDGER_READERS:
        assert "is not a readable ledger" in one_line_error(morning(runs, *args)), args


def _earlier_runs(run_dir: Path) -> dict[Path, bytes]:
    """The run directories e0001-e0004 of an earlier night, with what they hold."""
    files = {run_dir / f"e{seq:04d}" / name: f"{seq} {name}".encode() for seq in range(1, 5)
             for name in ("train.log", "train.py")}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_an_empty_ledger_beside_earlier_runs_is_refused_and_nothing_is_overwritten(tmp_path, workdir):
    runs = tmp_path / "runs"
    files = _earlier_runs(runs / "t")
    ledger = runs / "t" / "ledger.sqlite"
    ledger.touch()
    error = ends_in_one_sentence(overnight(runs))
    assert error == (f"Error: the ledger {ledger} is an empty file, but {runs / 't'} holds the runs e0001 to e0004 of "
                     "an earlier night; restore the ledger from a backup, or start another night with a new --tag.")
    for args in LEDGER_READERS:
        assert "is an empty file" in one_line_error(morning(runs, *args)), args
    ledger.unlink()  # moved aside: no new ledger over the earlier runs either
    error = ends_in_one_sentence(overnight(runs))
    assert error == (f"Error: the ledger {ledger} is missing, but {runs / 't'} holds the runs e0001 to e0004 of an "
                     "earlier night; restore the ledger from a backup, or start another night with a new --tag.")
    assert not ledger.exists() and {path: path.read_bytes() for path in files} == files


def test_an_empty_ledger_alone_is_refused_too(tmp_path, workdir):
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "ledger.sqlite").touch()
    assert "is an empty file, not a ledger; remove it to start the night afresh" in ends_in_one_sentence(
        overnight(tmp_path / "runs"))
    assert (tmp_path / "runs" / "t" / "ledger.sqlite").stat().st_size == 0


@pytest.fixture
def locked_ledger(tmp_path, monkeypatch):
    """A real ledger that another process holds with an exclusive lock (a short wait makes it count as locked)."""
    path = tmp_path / "runs" / "t" / "ledger.sqlite"
    Ledger(path).close()
    with ledger_held(path, "PRAGMA locking_mode=EXCLUSIVE", "BEGIN EXCLUSIVE"):
        monkeypatch.setattr(ledgers, "BUSY_TIMEOUT_S", 0.2)
        yield path.parent.parent


def test_a_locked_ledger_is_one_sentence_for_overnight_and_every_command(locked_ledger, workdir):
    assert "is locked by another process" in ends_in_one_sentence(overnight(locked_ledger))
    for args in LEDGER_READERS:
        assert "is locked by another process" in one_line_error(morning(locked_ledger, *args)), args


# -- where the nights are ---------------------------------------------------------------------------


def test_overnight_honours_AR_RUNS_DIR(tmp_path, workdir):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "t").mkdir(parents=True)
    (elsewhere / "t" / "ledger.sqlite").write_bytes(b"garbage " * 500)
    error = ends_in_one_sentence(overnight(None, env={"AR_RUNS_DIR": str(elsewhere)}))
    assert str(elsewhere / "t" / "ledger.sqlite") in error
    assert not (workdir / "runs").exists()


def test_a_failed_start_leaves_no_run_directory(tmp_path, workdir):
    runs = tmp_path / "runs"
    result = overnight(runs, "--sandbox", "docker", env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"})
    assert "no Docker engine answers" in ends_in_one_sentence(result)
    assert not (runs / "t").exists()


def test_a_read_only_runs_directory(tmp_path, workdir):
    runs = tmp_path / "runs"
    Ledger(runs / "t" / "ledger.sqlite").close()
    with mounted(runs, "ro", source=str(runs)):
        error = ends_in_one_sentence(overnight(runs, "--tag", "new"))
        assert error == f"Error: {runs / 'new'} is on a read-only file system."
        assert "cannot be written" in one_line_error(morning(runs, "status"))
    with mounted(tmp_path / "ro", "ro", "size=1m"):
        assert "read-only file system" in one_line_error(
            morning(runs, "export", "--out", str(tmp_path / "ro" / "results.tsv")))


# -- a read-only cache --------------------------------------------------------------------------------


def test_prepare_into_a_read_only_cache_says_one_line_only(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n\nmore text\n" * 100)
    with mounted(tmp_path / "cache", "ro", "size=1m") as cache:
        done = subprocess.run([sys.executable, "-m", "dataprep", "--source", "local", str(corpus)],
                              capture_output=True, text=True, env={**os.environ, "AR_CACHE": str(cache)}, cwd=ROOT)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: cannot write") and "Read-only file system" in line and "AR_CACHE" in line


def test_the_process_sandbox_on_a_read_only_cache(tmp_path, workdir, tiny_data):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_data, prepared / "local")  # a cache holding only the data: no snapshots yet
    with mounted(tmp_path / "cache", "ro", source=str(prepared)) as cache:
        result = overnight(tmp_path / "runs", "--sandbox", "process", env={"AR_CACHE": str(cache)})
    error = ends_in_one_sentence(result)
    assert "the process sandbox cannot write its snapshots under" in error and "AR_CACHE" in error
    assert not (tmp_path / "runs" / "t").exists()


# -- files that are not text, or far too large --------------------------------------------------------


def _huge(path: Path) -> Path:
    with open(path, "wb") as f:  # sparse: 4 GiB of nothing, instantly
        f.truncate(4 * 2**30)
    return path


NOT_UTF8 = b"--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-x = 1\n+x = '\xff\xfe caf\xe9'\n"


def test_check_diff_on_files_that_are_not_text_or_too_large(tmp_path, workdir):
    bad = tmp_path / "bad.diff"
    bad.write_bytes(NOT_UTF8)
    error = ends_in_one_sentence(CliRunner().invoke(main, ["check-diff", str(bad)]))
    assert error == f"Error: the diff {bad} is not UTF-8 text (byte 55 cannot be decoded); save it as UTF-8."
    error = ends_in_one_sentence(CliRunner().invoke(main, ["check-diff", str(_huge(tmp_path / "huge.diff"))]))
    assert "is larger than 64,000 bytes" in error
    good = tmp_path / "good.diff"
    good.write_text("--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-x\n+y\n")
    base = tmp_path / "base.py"
    base.write_bytes(b"x = '\xe9'\n")
    error = ends_in_one_sentence(CliRunner().invoke(main, ["check-diff", str(good), "--base", str(base)]))
    assert "the base train.py" in error and "is not UTF-8 text" in error


def test_check_diff_rejects_a_diff_that_defeats_the_parser_in_one_line(tmp_path, workdir):
    """10,000 unary minus signs make CPython's parser raise MemoryError: a rejection like any other."""
    train_py = (workdir / "train.py").read_text()
    deep = tmp_path / "deep.diff"
    deep.write_text(make_diff(train_py, train_py + "x = " + "-" * 10_000 + "1\n"))
    done = subprocess.run([str(AUTORESEARCH), "check-diff", str(deep)], cwd=workdir, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.stdout.strip() == ("rejected: The patched train.py nests code too deeply to parse (at most 100 levels "
                                   "are allowed); write flatter code."), done.stdout
    assert done.stderr == ""


def _good_diff(tmp_path: Path) -> Path:
    diff = tmp_path / "good.diff"
    diff.write_text("--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-x\n+y\n")
    return diff


@pytest.mark.parametrize("argument", ["diff", "base"])
def test_check_diff_on_a_fifo_is_one_sentence_at_once(tmp_path, workdir, argument):
    """A FIFO nobody writes to would make a plain open() wait forever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = [str(fifo)] if argument == "diff" else [str(_good_diff(tmp_path)), "--base", str(fifo)]
    done = subprocess.run([str(AUTORESEARCH), "check-diff", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=120)
    what = "the diff" if argument == "diff" else "the base train.py"
    assert (done.returncode, done.stdout) == (1, ""), done.stdout + done.stderr
    assert done.stderr == f"Error: {what} {fifo} is a FIFO (named pipe), not a regular file; give the path of a file.\n"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_check_diff_on_a_device_is_one_sentence(tmp_path, workdir, device):
    """Neither read without end nor taken for an empty file, as the diff or as the base."""
    for args, what in (([device], "the diff"), ([str(_good_diff(tmp_path)), "--base", device], "the base train.py")):
        error = ends_in_one_sentence(CliRunner().invoke(main, ["check-diff", *args]))
        assert error == f"Error: {what} {device} is a device, not a regular file; give the path of a file."


def test_check_diff_on_a_directory_is_one_sentence(tmp_path, workdir):
    result = CliRunner().invoke(main, ["check-diff", str(tmp_path)])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert lines[-1] == f"Error: Invalid value for 'DIFF_FILE': File '{tmp_path}' is a directory."


@pytest.mark.parametrize("name, damage, message", [
    ("program.md", lambda p: p.write_bytes(b"Lower val_bpb \xff\n"), "is not UTF-8 text"),
    ("program.md", _huge, "is larger than 262,144 bytes"),
    ("train.py", lambda p: p.write_bytes(p.read_bytes() + b"# \xc3\x28\n"), "is not UTF-8 text"),
    ("train.py", _huge, "is larger than 1,048,576 bytes"),
])
def test_overnight_on_project_files_that_are_not_text_or_too_large(tmp_path, workdir, name, damage, message):
    damage(workdir / name)
    error = ends_in_one_sentence(overnight(tmp_path / "runs"))
    assert f"{name} {workdir / name} {message}" in error
    assert not (tmp_path / "runs").exists()


def test_review_accept_into_a_train_py_that_is_not_text(night, tmp_path):
    target = tmp_path / "train.py"
    target.write_bytes(b"\x89PNG\r\n\x1a\n")
    error = one_line_error(invoke(night.runs, "review", "accept", night.ids["best"], "--train-py", str(target)))
    assert f"train.py {target} is not UTF-8 text" in error


# -- one base for every error a user can cause ---------------------------------------------------------

# The project's exceptions that are not the user's to fix, and why: anything else must derive from UserError.
NOT_THE_USERS = {
    "runner.agents.base.AgentError": "an agent outage: recorded, waited out, the night goes on",
    "runner.agents.prompt.ReplyFormatError": "a reply without a diff: sent back to the agent",
    "contract.ResultError": "phase 2 printed no valid result: the experiment's failure",
    "contract.TraceError": "phase 1 left a trace that is not the harness's: no figures from it, no exact rerun",
    "runner.night.cluster.NodeLost": "one cluster node failed a run: the run goes to another node, the night goes on",
    "runner.night.cluster_node.NodeRefused": "raised on a node, reaches the runner as a NodeLost",
}


def _project_exceptions() -> dict[str, type]:
    import importlib
    import inspect
    import pkgutil

    import common
    import contract
    import dataprep
    import runner
    import sandbox

    modules = [contract] + [importlib.import_module(info.name) for package in (common, runner, sandbox, dataprep)
                            for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                            if not info.name.endswith(".__main__")]  # an entry point runs when imported
    return {f"{cls.__module__}.{cls.__qualname__}": cls for module in modules
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__}


def test_every_error_a_user_can_cause_derives_from_the_one_base():
    from common.errors import MachineError, UserError
    from sandbox.images import ImageBuildError
    from sandbox.spec import SandboxUnavailable

    found = _project_exceptions()
    assert len(found) > 15  # the walk saw the project
    not_user_errors = sorted(name for name, cls in found.items() if not issubclass(cls, UserError))
    assert not_user_errors == sorted(NOT_THE_USERS)
    assert issubclass(SandboxUnavailable, MachineError) and issubclass(ledgers.LedgerUnavailable, MachineError)
    assert issubclass(ImageBuildError, UserError) and not issubclass(ImageBuildError, MachineError)


def test_user_errors_says_the_base_in_one_sentence_and_lets_a_bug_through():
    import click

    from runner.core.errors import UserError, user_errors
    from sandbox.spec import SandboxUnavailable

    @user_errors
    def command(error: Exception) -> None:
        raise error

    for error in (UserError("the flag is wrong."), SandboxUnavailable("no engine answers."),
                  PermissionError(13, "Permission denied", "/runs")):
        with pytest.raises(click.ClickException) as said:
            command(error)
        assert said.value.message in ("the flag is wrong.", "no engine answers.", "permission denied for /runs.")
    with pytest.raises(KeyError):
        command(KeyError("a bug"))


@pytest.mark.parametrize("auth_mode", [None, "token"])
def test_a_cluster_that_refuses_the_runner_names_token_authentication(auth_mode, monkeypatch):
    """Ray refuses a driver without the cluster's token with a bare ConnectionError (after retries that take
    ~20 s against a real token-auth head); the sentence says what to set, unless it is set already."""
    ray = pytest.importorskip("ray")
    from runner.night.cluster import Cluster, ClusterUnavailable

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379.")

    monkeypatch.setattr(ray, "init", refused)
    if auth_mode:
        monkeypatch.setenv("RAY_AUTH_MODE", auth_mode)
    else:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with socket.socket() as listener:  # something answers at the address: the check before Ray passes
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ClusterUnavailable) as said:
            Cluster(address, sandbox="docker", source="local", data_hash="h", recipe="r").connect()
    sentence = str(said.value)
    assert sentence.startswith(f"no Ray cluster answers at {address} (ConnectionError: Failed to connect")
    assert ("RAY_AUTH_MODE=token" in sentence) == (auth_mode is None) and sentence.endswith(".")
    assert sentence.count(". ") == 0  # one sentence


# -- sentences about rows -----------------------------------------------------------------------------


def test_rows_are_described_in_plain_english():
    statuses = [s for s in Status if s not in (Status.DONE, Status.OK)]
    for kind in (BASELINE, EXPERIMENT, CONFIRM, RERUN):
        rows = [_row(kind, status) for status in statuses] + [_row(kind, Status.DONE, d) for d in ("keep", "discard", None)]
        for row in rows:
            text = ledgers.describe(row)
            assert re.fullmatch(r"an? [a-z ]+ that [A-Za-z ()]+", text), text
            assert "_" not in text and not re.search(r"\b(crash|timeout|oom|keep|discard)\b", text), text
    assert ledgers.describe(_row(EXPERIMENT, Status.DONE, "discard")) == "an experiment that was discarded"
    assert ledgers.describe(_row(BASELINE, "crash")) == "a baseline run that crashed"


def test_reviewing_a_discarded_experiment_reads_right(night):
    unproven = night.ids["unproven"]
    error = one_line_error(invoke(night.runs, "review", "reject", unproven))
    assert error == f"Error: {unproven} is an experiment that was discarded; only kept changes are reviewed."


def _row(kind: str, status: str, decision: str | None = None) -> Experiment:
    fields = {name: None for name in Experiment.__dataclass_fields__}
    return Experiment(**{**fields, "kind": kind, "status": status, "decision": decision})


# -- a night that loses its disk or its Docker engine (real containers, real training) --------------------


def _night_cli(runs: Path, *extra: str) -> list[str]:
    return [str(AUTORESEARCH), "overnight", "--tag", "n", "--runs-dir", str(runs), "--agent", "search",
            "--sandbox", "docker", "--gpus", "none", "--budget", "2", "--source", "local", "--baseline-runs", "2",
            *extra]


def _wait_for_training(ledger_path: Path, process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        with contextlib.suppress(sqlite3.Error):
            with contextlib.closing(sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT id FROM experiments WHERE status='training'").fetchone()
            if row:
                return row[0]
    process.kill()
    pytest.fail("the night never started training:\n" + log.read_text()[-3000:])


def _resume_completes_the_baselines(runs: Path, env: dict, owed: str, project_dir: Path) -> None:
    done = subprocess.run(_night_cli(runs, "--max-experiments", "1"), cwd=project_dir, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = Ledger(runs / "n" / "ledger.sqlite")
    try:
        assert ledger.unfinished() == []
        assert ledger.get(owed).status == Status.DONE
        assert [n.stop_reason for n in ledger.nights()][-1] == "max-experiments"
    finally:
        ledger.close()


def _fill(path: Path, leave: int) -> Path:
    """Fill the file system of `path` until `leave` bytes are free."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        while (free := os.statvfs(path).f_bavail * os.statvfs(path).f_frsize) > leave:
            f.write(b"\0" * min(2**24, free - leave))
            f.flush()
    return filler


@pytest.mark.slow
@pytest.mark.docker
def test_a_full_disk_stops_the_night_in_one_sentence_and_the_night_resumes(tmp_path, workdir, tiny_cache,
                                                                              docker_base_image):
    env = {**os.environ, "AR_CACHE": str(tiny_cache)}
    with mounted(tmp_path / "runs", "size=512m") as runs:
        log = tmp_path / "night.log"
        with log.open("w") as out:
            process = subprocess.Popen(_night_cli(runs), cwd=workdir, env=env, stdout=out, stderr=out)
        owed = _wait_for_training(runs / "n" / "ledger.sqlite", process, log)
        filler = _fill(runs, leave=2**20)
        assert process.wait(timeout=600) == 1, log.read_text()[-3000:]
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert text.strip().splitlines()[-1] == (f"Error: the night stopped: no space is left on the disk holding "
                                                 f"{runs / 'n'}; resume it with --tag n once that is fixed.")
        ledger = Ledger(runs / "n" / "ledger.sqlite")
        try:
            (night_record,) = ledger.nights()
            assert night_record.stop_reason == "error" and night_record.ended_at, text[-3000:]
            assert ledger.get(owed).status in (Status.DONE, *Status.where(Status.is_unfinished))  # never a failure the disk caused
        finally:
            ledger.close()
        filler.unlink()
        _resume_completes_the_baselines(runs, env, owed, workdir)


class _EngineProxy:
    """A unix socket in front of the real Docker engine's, which the test can take away."""

    def __init__(self, path: Path, engine: str = "/var/run/docker.sock") -> None:
        self.path, self.engine = path, engine
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(64)
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._server.accept()
                engine = socket.socket(socket.AF_UNIX)
                engine.connect(self.engine)
                self._open += [client, engine]
                for a, b in ((client, engine), (engine, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """The engine is gone: no more connections, and the open ones cut."""
        self._server.close()
        self.path.unlink()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()


@pytest.mark.slow
@pytest.mark.docker
def test_a_docker_engine_that_goes_away_stops_the_night_in_one_sentence(tmp_path, workdir, tiny_cache,
                                                                          docker_client, docker_base_image):
    proxy = _EngineProxy(tmp_path / "docker.sock")
    env = {**os.environ, "AR_CACHE": str(tiny_cache), "DOCKER_HOST": f"unix://{proxy.path}"}
    runs = tmp_path / "runs"
    log = tmp_path / "night.log"
    with log.open("w") as out:
        process = subprocess.Popen(_night_cli(runs), cwd=workdir, env=env, stdout=out, stderr=out)
    owed = _wait_for_training(runs / "n" / "ledger.sqlite", process, log)
    proxy.stop()
    assert process.wait(timeout=300) == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("Error: the night stopped: the Docker engine stopped answering"), last
    assert last.endswith("; resume it with --tag n once that is fixed."), last
    ledger = Ledger(runs / "n" / "ledger.sqlite")
    try:
        assert ledger.get(owed).status.is_unfinished()  # owed, not a crash of train.py
        assert ledger.nights()[-1].stop_reason == "error"
    finally:
        ledger.close()
    del env["DOCKER_HOST"]  # the engine is back
    _resume_completes_the_baselines(runs, env, owed, workdir)
    leftovers = docker_client.containers.list(all=True, filters={"label": f"autoresearch.exp={owed}"})
    assert leftovers == []
