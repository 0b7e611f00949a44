"""A night on a real multi-node Ray cluster on this machine, one node killed mid-run.

Each node is its own `ray start` (its own raylet, its own process group) with one logical GPU
standing for a slot; the experiments are CPU-profile runs through the docker sandbox. A third
node runs another version of the harness (a copy of the project with a changed prepare.py) and
must be refused. While a run trains on the first node, that node is killed with SIGKILL: the
run goes to the other node once, nothing is lost or duplicated, and the morning commands
(status, show, rerun --exact) work on the results that came back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker.errors
import pytest

from runner.core.ledger import BASELINE, EXPERIMENT, Ledger

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.docker]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TAG = "cluster"
JOIN_WAIT_S = 180
KILL_WAIT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A Ray head and worker nodes on this machine, each node in a process group of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        # a local cluster of the test's own, unauthenticated whatever ~/.ray holds (a token file there turns
        # token authentication on for `ray start`)
        self.env = {**env, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "disabled"}
        self.temp = tempfile.mkdtemp(prefix="ar-ray-", dir="/tmp")  # Ray's socket paths must stay short
        self.address = f"127.0.0.1:{_free_port()}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        # the head runs nothing of the night's (no CPU, no GPU for tasks): the runner's driver connects to it
        self._start("head", ["--head", "--port", self.address.split(":")[1], "--temp-dir", self.temp,
                             "--include-dashboard", "false", "--ray-client-server-port", str(_free_port()),
                             "--num-cpus", "0", "--num-gpus", "0"], self.env)
        host, port = self.address.split(":")
        deadline = time.monotonic() + JOIN_WAIT_S
        while True:  # a driver that connects before the head listens can wait for minutes
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head never listened"
                time.sleep(0.5)
        self.wait_for(1)

    def add(self, name: str, env: dict[str, str] | None = None) -> None:
        """One more node, once it has joined (nodes starting together on two cores time out)."""
        self._start(name, ["--address", self.address, "--num-cpus", "1", "--num-gpus", "1"], env or self.env)
        self.wait_for(len(self.nodes))

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = open(Path(self.temp).parent / f"{Path(self.temp).name}-{name}.log", "w")
        self.nodes[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-name", name, "--object-store-memory", str(80 * 2**20),
             "--disable-usage-stats", *args], env=env, stdout=log, stderr=log, start_new_session=True)

    def wait_for(self, count: int) -> None:
        """Until `count` nodes are alive (asked from a separate driver, so this process never becomes one)."""
        probe = (f"import ray, time\nend = time.time() + {JOIN_WAIT_S}\n"
                 f"while True:\n"  # the head may still be starting: its address does not answer yet
                 f"    try:\n        ray.init(address={self.address!r}, logging_level='error'); break\n"
                 f"    except Exception:\n        assert time.time() < end, 'the head never answered'; time.sleep(1)\n"
                 f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < end: time.sleep(0.5)\n"
                 f"print(sum(n['Alive'] for n in ray.nodes()))\n")
        done = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True,
                              timeout=JOIN_WAIT_S + 60)
        assert done.stdout.strip() == str(count), done.stdout + done.stderr[-2000:]

    def kill(self, name: str) -> None:
        """SIGKILL the node's whole process group: `ray start`, its raylet and its workers."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)

    def stop(self) -> None:
        for process in self.nodes.values():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def _other_harness(tmp_path: Path) -> Path:
    """A copy of the project's code whose prepare.py differs: a node running it builds from other inputs."""
    copy = tmp_path / "other-version"
    for name in ("common", "runner", "sandbox", "dataprep", "images"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("contract.py", "evaluate.py", "uv.lock", "pyproject.toml"):
        shutil.copyfile(ROOT / name, copy / name)
    (copy / "prepare.py").write_text((ROOT / "prepare.py").read_text() + "\n# another version of the harness\n")
    return copy


@pytest.fixture
def cluster(tiny_cache, tmp_path, docker_base_image):
    env = {**os.environ, "AR_CACHE": str(tiny_cache)}
    local = LocalCluster(env)
    try:
        local.start()
        local.add("n1")
        local.add("n2")
        local.add("other", {**local.env, "PYTHONPATH": str(_other_harness(tmp_path))})
        yield local
    finally:
        local.stop()


def _running_on(db: Path, prefix: str, run_dir: Path, after: str) -> str | None:
    """A row after `after` training on the node `prefix` whose log has begun to stream back."""
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT id FROM experiments WHERE status='training' AND node LIKE ? AND id > ?",
                                (f"{prefix}/%", after)).fetchall()
    except sqlite3.Error:  # the night is creating it
        return None
    return next((r[0] for r in rows if (run_dir / r[0] / "train.log").is_file()
                 and (run_dir / r[0] / "train.log").stat().st_size > 0), None)


def _night_until_a_run_on(node: str, command: list[str], project: Path, env: dict[str, str], output: Path,
                          run_dir: Path, after: str = "") -> tuple[subprocess.Popen, str]:
    """Start a night; return it once a row after `after` trains on `node` (the night is killed if none does)."""
    with output.open("w") as out:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + KILL_WAIT_S
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if found := _running_on(run_dir / "ledger.sqlite", node, run_dir, after):
            return process, found
    process.kill()
    process.wait()
    raise AssertionError(f"nothing trained on {node}:\n" + output.read_text()[-3000:])


def test_a_cluster_night_survives_a_killed_node(cluster, tiny_cache, tmp_path, docker_client):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("train.py", "prepare.py", "program.md"):
        shutil.copyfile(ROOT / name, project / name)
    runs = tmp_path / "runs"
    env = {**cluster.env, "AR_RUNS_DIR": str(runs)}
    night = [str(BIN / "autoresearch"), "overnight", "--cluster", cluster.address, "--sandbox", "docker",
             "--agent", "search", "--budget", "3", "--source", "local", "--baseline-runs", "2",
             "--max-experiments", "3", "--tag", TAG]
    run_dir, output = runs / TAG, tmp_path / "night.log"
    process, killed = _night_until_a_run_on("n1", night, project, env, output, run_dir)
    try:
        cluster.kill("n1")
        assert process.wait(timeout=KILL_WAIT_S) == 0, output.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    ledger = Ledger(run_dir / "ledger.sqlite")
    rows = ledger.experiments()
    assert ledger.unfinished() == []
    # the killed run went to n2, once: one more attempt, one result
    moved = ledger.get(killed)
    assert moved.status == "done" and moved.node.startswith("n2/") and moved.run_attempt == 2
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "experiment.finished" and e.get("exp") == killed]) == 1
    lost = [e for e in events if e["event"] == "experiment.infrastructure_error"]
    assert lost and all(e["exp"] == killed and e["slot"].startswith("n1/") for e in lost)
    # nothing lost, nothing doubled: two counted baselines, three proposals, every row run where it says
    # (a baseline run that two runs on two cores made slower than the other is run again on its seed, as on one machine)
    assert [r.status for r in rows if r.kind == BASELINE and r.counts] == ["done", "done"]
    assert all(r.disturbed for r in rows if r.kind == BASELINE and not r.counts)
    assert len([r for r in rows if r.kind == EXPERIMENT]) == 3
    assert all(r.node.split("/")[0] in ("n1", "n2") for r in rows if r.status == "done")
    assert all(r.run_attempt == (2 if r.id == killed else 1) for r in rows if r.status == "done")
    # the node with another harness was refused, with the reason; its inputs differ, so its recipe does
    (record,) = [n.cluster for n in ledger.nights()]
    (refused,) = [why for name, why in record["refused"].items() if name.startswith("other/")]
    assert "other inputs" in refused
    assert {n["name"].split("/")[0] for n in record["nodes"]} == {"n1", "n2"}
    ledger.close()
    assert docker_client.containers.list(all=True, filters={"label": f"autoresearch.exp={killed}"}) == []
    # the images of discarded and failed experiments were removed where they were built: on the nodes
    # (they share this machine's engine here; the night itself prunes nothing of its own machine)
    settled = [r for r in rows if r.kind == EXPERIMENT and (r.decision == "discard" or r.status.is_failure()) and r.image]
    assert settled
    for row in settled:
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(row.image)
    pruned = [image for e in events if e["event"] == "images.pruned" for image in e["images"]]
    assert set(pruned) >= {row.image for row in settled} and len(pruned) == len(set(pruned))  # each once

    # the morning reads the cluster's results as any other night's
    def morning(*args: str) -> str:
        done = subprocess.run([str(BIN / "autoresearch"), *args, "--tag", TAG], cwd=project, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    status = morning("status")
    assert "node n2/" in status and "left out" in status
    assert killed in morning("show", killed)
    assert "BIT-IDENTICAL" in morning("rerun", killed, "--exact")

    # the runner itself killed while a run trains on n2, then resumed: the run is done again, once
    again = [*night[:-4], "--max-experiments", "4", "--tag", TAG]
    process, runner_killed = _night_until_a_run_on("n2", again, project, env, output, run_dir, after=rows[-1].id)
    process.kill()
    process.wait()
    done = subprocess.run(again, cwd=project, env=env, capture_output=True, text=True, timeout=KILL_WAIT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ledger = Ledger(run_dir / "ledger.sqlite")
    assert ledger.unfinished() == []
    resumed = ledger.get(runner_killed)
    assert resumed.status.is_finished() and resumed.run_attempt == 2 and resumed.node.startswith("n2/")
    ledger.close()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "experiment.finished" and e.get("exp") == runner_killed]) == 1
    assert docker_client.containers.list(all=True, filters={"label": f"autoresearch.exp={runner_killed}"}) == []


def test_no_cluster_at_the_address_is_one_sentence(tmp_path, tiny_cache):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("train.py", "prepare.py"):
        shutil.copyfile(ROOT / name, project / name)
    env = {**os.environ, "AR_CACHE": str(tiny_cache), "AR_RUNS_DIR": str(tmp_path / "runs"),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    done = subprocess.run([str(BIN / "autoresearch"), "overnight", "--cluster", f"127.0.0.1:{_free_port()}",
                           "--sandbox", "process", "--agent", "search", "--source", "local", "--tag", "nowhere"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "no Ray cluster answers at 127.0.0.1:" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs" / "nowhere").exists()
