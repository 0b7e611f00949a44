"""Crash safety where it is thinnest: real processes killed with SIGKILL, then resumed.

A night, a review accept and a ledger migration are each killed at a moment that matters
(see tests/crash_driver.py for how the process is held there: it stops itself, the test
kills it), then run again. Each must end in a consistent ledger: no experiment lost or run
twice, every decision made once, the review's record matching git. A night has one runner:
a second one is refused while the first lives, and the lock of a killed one blocks nothing.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, MIGRATIONS, REFERENCE, SCHEMA_VERSION, Ledger
from runner.morning.review import lineage
from sandbox.images import BUILD_PREFIX
from sandbox.processes import process_identity
from tests.corpus import stand_in_data
from tests.crash_driver import PAUSE_NOTE
from tests.doubles import BASE_TRAIN_PY, FakeBackend, ScriptedAgent, change, make_night
from tests.recorded_night import cli
from sandbox.status import Status

ROOT = Path(__file__).resolve().parent.parent
AUTORESEARCH = Path(sys.executable).parent / "autoresearch"
NIGHT = ["overnight", "--tag", "t", "--gpus", "none", "--baseline-runs", "2", "--budget", "1"]
POLLS = 2400  # bound on waiting for a process to reach its pause (x 50 ms)


@pytest.fixture
def env(tmp_path):
    """The environment of the killed commands: prepared (stand-in) data, git without user configuration."""
    cache = tmp_path / "cache"
    (cache / "offline").mkdir(parents=True)
    stand_in_data(cache / "offline")
    return {**os.environ, "AR_CACHE": str(cache), "PYTHONPATH": str(ROOT), "GIT_AUTHOR_NAME": "Morning",
            "GIT_AUTHOR_EMAIL": "m@example.org", "GIT_COMMITTER_NAME": "Morning",
            "GIT_COMMITTER_EMAIL": "m@example.org", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


class Command:
    """One command in its own process, its output in a file."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    @classmethod
    def driven(cls, kind: str, pause: str, args: list[str], cwd: Path, env: dict) -> Command:
        log = cwd.parent / f"{args[0]}-{pause.replace(':', '-')}-{uuid.uuid4().hex[:6]}.log"
        return cls([sys.executable, "-m", "tests.crash_driver", kind, pause, *args], cwd, env, log)

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def state(self) -> str | None:
        try:
            return Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None

    def wait_paused(self) -> None:
        """Until the process has stopped itself at its pause (it fails the test if it ends first)."""
        for _ in range(POLLS):
            if self.process.poll() is not None:
                pytest.fail(f"the command ended (exit {self.process.returncode}) before its pause:\n{self.output()}")
            if self.state() == "T":
                return
            time.sleep(0.05)
        pytest.fail(f"the command never reached its pause:\n{self.output()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self) -> None:
        assert self.process.wait(timeout=POLLS * 0.05) == 0, self.output()


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.endswith("}")]


def assert_consistent(run_dir: Path, experiments: int) -> Ledger:
    """Nothing owed, nothing undecided, every run finished once and every candidate decided once."""
    ledger = Ledger(run_dir / "ledger.sqlite")
    assert ledger.unfinished() == [] and ledger.undecided() == []
    rows = ledger.experiments()
    assert len([r for r in rows if r.kind == EXPERIMENT]) == experiments
    assert all((r.status == Status.DONE or r.status.is_failure()) for r in rows if r.kind in (BASELINE, CONFIRM, REFERENCE))
    log = events(run_dir)
    trained = collections.Counter(e["exp"] for e in log if e["event"] == "experiment.status" and e["status"] == "training")
    assert trained == collections.Counter(r.id for r in rows if r.status != "rejected")  # each run once
    decided = collections.Counter(e["exp"] for e in log if e["event"] == "experiment.decided")
    assert decided == collections.Counter(r.id for r in rows if r.decision)
    assert all(r.decision for r in rows if r.kind == EXPERIMENT and r.status == Status.DONE)
    return ledger


# -- the night -----------------------------------------------------------------------------------


def test_a_night_killed_between_done_and_the_decision_decides_once_on_resume(project, env):
    args = [*NIGHT, "--max-experiments", "2"]
    killed = Command.driven("fake", "done:e0003", args, project, env)
    killed.wait_paused()
    killed.kill()
    run_dir = project / "runs" / "t"
    ledger = Ledger(run_dir / "ledger.sqlite")
    first = ledger.get("e0003")
    assert (first.kind, first.status, first.decision) == (EXPERIMENT, Status.DONE, None)
    ledger.close()
    status = json.loads(CliRunner().invoke(cli(), ["status", "--json", "--runs-dir", str(project / "runs")]).output)
    assert status["state"] == "stopped" and status["state_note"].startswith("(last seen ")

    Command.driven("fake", "none", args, project, env).finish()
    ledger = assert_consistent(run_dir, experiments=2)  # the limit is the night's: 2 in all
    decided = [e for e in events(run_dir) if e["event"] == "experiment.decided" and e["exp"] == "e0003"]
    assert len(decided) == 1 and ledger.get("e0003").decision == decided[0]["decision"]  # by the resume
    assert [n.stop_reason for n in ledger.nights()] == [None, "max-experiments"]
    ledger.close()


# -- one runner per night -------------------------------------------------------------------------


def files_of(run_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.suffix != ".lock"
            and "ledger.sqlite" not in path.name}


def test_a_second_runner_of_a_live_night_is_refused_and_a_killed_ones_lock_blocks_nothing(project, env):
    args = [*NIGHT, "--max-experiments", "2"]
    first = Command.driven("fake", "done:e0003", args, project, env)
    first.wait_paused()  # alive and holding the night: e0003 is done, its decision not made yet
    run_dir = project / "runs" / "t"
    before = files_of(run_dir)
    second = Command.driven("fake", "none", args, project, env)
    assert second.process.wait(timeout=POLLS * 0.05) == 1, second.output()
    pid = first.process.pid
    assert second.output().splitlines() == [
        f"Error: the night t is already running (pid {pid}); stop it with Ctrl-C or `kill {pid}` first, or start "
        "another night with a new --tag."]
    assert files_of(run_dir) == before  # its logs, models and events untouched
    ledger = Ledger(run_dir / "ledger.sqlite")
    assert len(ledger.nights()) == 1 and (ledger.get("e0003").status, ledger.get("e0003").decision) == ("done", None)
    ledger.close()

    first.kill()  # its lock goes with it; its heartbeat is fresh, but it names a process that is gone
    Command.driven("fake", "none", args, project, env).finish()
    ledger = assert_consistent(run_dir, experiments=2)
    assert [n.stop_reason for n in ledger.nights()] == [None, "max-experiments"]
    ledger.close()


def test_a_runner_on_another_machine_is_refused_while_its_heartbeat_is_fresh(tmp_path):
    runs = tmp_path / "runs"
    ledger = Ledger(runs / "t" / "ledger.sqlite")
    ledger.start_night("t", {}, runner="other-host 4242:77")  # a runner elsewhere, on a shared runs directory
    ledger.close()
    night = ["overnight", "--tag", "t", "--runs-dir", str(runs), "--gpus", "none", "--agent", "search",
             "--sandbox", "docker"]
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}  # past the check, the start fails cheaply here
    refused = CliRunner().invoke(main, night, env=env)
    assert refused.exit_code == 1 and refused.output.startswith(
        "Error: the night t is running on other-host (pid 4242, last seen 0 s ago); stop it there with Ctrl-C or "
        "`kill 4242`"), refused.output
    with closing(sqlite3.connect(runs / "t" / "ledger.sqlite")) as db, db:  # a minute and more without a beat
        db.execute("UPDATE nights SET heartbeat_at='2026-01-01T00:00:00.000+00:00'")
    started = CliRunner().invoke(main, night, env=env)
    assert started.exit_code == 1 and "no Docker engine answers" in started.output, started.output


# -- an image build (real Docker) ------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("moment", ["before-commit", "after-commit"])
def test_a_night_killed_during_an_image_build_builds_it_once_and_leaves_nothing(project, env, docker_client,
                                                                              docker_base_image, moment):
    # a train.py of its own, so that no earlier build already holds its image
    (project / "train.py").write_text(BASE_TRAIN_PY + f"NONCE = {uuid.uuid4().hex!r}\n")
    args = [*NIGHT, "--max-experiments", "1", "--sandbox", "docker"]
    killed = Command.driven("docker-builds", f"build:{moment}", args, project, env)
    killed.wait_paused()
    paused_on = (project / PAUSE_NOTE).read_text()  # the build container the runner stopped at
    builds = {"name": BUILD_PREFIX + process_identity(killed.process.pid).replace(":", "-") + "-"}
    left = [c.name for c in docker_client.containers.list(all=True, filters=builds)]
    everything = [c.name for c in docker_client.containers.list(all=True)]
    killed.kill()
    run_dir = project / "runs" / "t"
    try:
        # the build's container, named after the killed runner
        assert left == [paused_on], f"paused on {paused_on}; the engine holds {everything}\n{killed.output()}"
        Command.driven("docker-builds", "none", args, project, env).finish()
        ledger = assert_consistent(run_dir, experiments=1)
        baseline = ledger.get("e0001").image
        assert ledger.get("e0002").image == baseline  # one image for the baselines' train.py
        ledger.close()
        assert docker_client.images.get(baseline).labels["autoresearch.exp"] == "e0001"
        assert docker_client.containers.list(all=True, filters=builds) == []  # reaped by the resume
    finally:
        for container in docker_client.containers.list(all=True, filters=builds):
            container.remove(force=True)
        ledger = Ledger(run_dir / "ledger.sqlite")
        for image in {r.image for r in ledger.experiments() if r.image}:
            try:
                docker_client.images.remove(image, force=True)
            except Exception:  # pruned by the night already
                pass
        ledger.close()


# -- a review accept -------------------------------------------------------------------------------


def git(repo: Path, env: dict, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("moment", ["before-commit", "after-commit"])
def test_a_review_accept_killed_around_its_commit_is_finished_by_the_next(project, env, moment, monkeypatch):
    night, ledger = make_night(project, ScriptedAgent(change(LR=0.2)), FakeBackend())
    night.run()
    (kept,) = [r for r in ledger.experiments(kinds=[EXPERIMENT]) if r.decision == "keep"]
    runs = project.parent / "runs"
    ledger.close()
    git(project, env, "init", "--quiet")
    git(project, env, "add", "train.py")
    git(project, env, "commit", "--quiet", "-m", "start")
    accept = ["review", "--runs-dir", str(runs), "--train-py", str(project / "train.py"), "accept", kept.id]

    killed = Command.driven("fake", f"git:{moment}", accept, project, env)
    killed.wait_paused()
    killed.kill()
    monkeypatch.setattr(os, "environ", env)
    again = CliRunner().invoke(cli(), accept, env=env)
    assert again.exit_code == 0 and again.output.startswith(f"accepted {kept.id}"), again.output

    wanted = (runs / "t" / kept.id / "train.py").read_text()
    assert git(project, env, "rev-list", "--count", "HEAD").strip() == "2"  # one commit, not two, not none
    assert git(project, env, "show", "HEAD:train.py") == wanted == (project / "train.py").read_text()
    assert git(project, env, "status", "--porcelain", "--", "train.py") == ""
    assert git(project, env, "log", "-1", "--format=%s").startswith(kept.description)
    ledger = Ledger(runs / "t" / "ledger.sqlite")
    head = git(project, env, "rev-parse", "HEAD").strip()
    assert (ledger.get(kept.id).review_state, ledger.get(kept.id).review_note) == ("accepted", f"commit {head}")
    assert [r.id for r in lineage(ledger, ledger.get(kept.id))][-1] == "e0001"
    ledger.close()


# -- a ledger migration ------------------------------------------------------------------------------

OLD_ROWS = 200_000  # enough that migration 2's index takes long to build (it spills into the WAL)


def old_ledger(path: Path) -> None:
    """A ledger of schema 1 holding a long night."""
    Ledger(path, migrations=MIGRATIONS[:1]).close()
    stamp = "2026-01-01T00:00:00.000+00:00"
    rows = ((n, f"e{n:07d}", "experiment", "done", f"discard {n:0>200}", stamp, stamp) for n in range(1, OLD_ROWS + 1))
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO nights (tag, started_at, ended_at, settings_json) VALUES ('t', ?, ?, '{}')",
                   (stamp, stamp))
        db.executemany("INSERT INTO experiments (seq, id, kind, status, decision, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def committed_version(path: Path) -> int:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


@pytest.mark.slow
def test_a_ledger_migration_killed_midway_is_rolled_back_and_done_again(tmp_path, env):
    path = tmp_path / "runs" / "t" / "ledger.sqlite"
    path.parent.mkdir(parents=True)
    old_ledger(path)
    wal = path.with_name(path.name + "-wal")
    status = ["status", "--runs-dir", str(tmp_path / "runs")]
    migrating = Command([str(AUTORESEARCH), *status], tmp_path, env, tmp_path / "status-killed.log")
    # real progress: migration 2 is writing its index into the WAL, and nothing of it is committed
    for _ in range(POLLS * 10):
        if wal.exists() and wal.stat().st_size > 4 * 2**20:
            break
        assert migrating.process.poll() is None, migrating.output()
        time.sleep(0.005)
    migrating.kill()
    assert committed_version(path) == 1  # killed inside migration 2: none of it stands

    again = CliRunner().invoke(cli(), status, env=env)
    assert again.exit_code == 0, again.output
    ledger = Ledger(path)
    assert ledger.schema_version == SCHEMA_VERSION
    assert len(ledger.experiments()) == OLD_ROWS and ledger.get("e0000001").decision.startswith("discard")
    assert ledger.nights()[0].heartbeat_at is None  # the latest migration's columns are there
    ledger.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
