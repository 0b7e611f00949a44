"""The docker backend: isolation settings, log streaming, and every way a run can end."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sandbox import cgroups, docker_backend, images
from docker.models.containers import _create_container_args

from sandbox.docker_backend import OWNER_LABEL, RUN_LABEL, DockerBackend, container_config, process_identity
from sandbox.gpu_watchdog import GpuSample
from sandbox.runlog import LineLog
from sandbox.spec import CancelToken, Killer, Limits, Mount, Phase, RunSpec
from sandbox.status import Status
from tests import hostile_cases as hostile

FAKE_SECRET = "sk-ant-fake-secret-for-the-sandbox-test"
TINY = Limits(memory_bytes=256 * 2**20, pids=128, shm_bytes=16 * 2**20, tmp_bytes=32 * 2**20)


def _spec(tmp_path: Path, image: str, code: str, **overrides) -> RunSpec:
    fields = dict(
        run_id=f"test-{time.time_ns()}",
        image=image,
        phase=Phase.TRAIN,
        command=["python3", "-c", code],
        log_path=tmp_path / "run.log",
        out_dir=tmp_path / "out",
        limits=TINY,
        deadline_s=60.0,
    )
    return RunSpec(**{**fields, **overrides})


def _log_lines(spec: RunSpec) -> list[str]:
    return spec.log_path.read_text().splitlines()


# -----------------------------------------------------------------------------
# Without an engine


def _chunks_to_lines(tmp_path: Path, chunks: list[bytes], **kwargs) -> tuple[list[str], list[str]]:
    line_log = LineLog(tmp_path / "log.txt", **kwargs)
    for chunk in chunks:
        line_log.feed(chunk)
    line_log.close()
    return (tmp_path / "log.txt").read_text().splitlines(), list(line_log.tail)


def test_line_log_splits_on_newline_and_carriage_return(tmp_path):
    chunks = [b"step 1\rstep 2\rst", b"ep 3\r", b"\ndone\r\nna", "\u00efve ".encode()[:1], "\u00efve ".encode()[1:], b"end"]
    lines, tail = _chunks_to_lines(tmp_path, chunks)
    assert lines == ["step 1", "step 2", "step 3", "done", "na\u00efve end"]
    assert tail == lines


def test_line_log_cuts_the_file_but_keeps_the_tail(tmp_path):
    chunks = [f"line {i}\n".encode() for i in range(1000)]
    lines, tail = _chunks_to_lines(tmp_path, chunks, max_bytes=100, tail_lines=5)
    assert lines[0] == "line 0" and lines[-1] == "[log cut at 100 bytes]"
    assert sum(len(line) + 1 for line in lines[:-1]) <= 100
    assert tail == [f"line {i}" for i in range(995, 1000)]


def test_container_config_locks_the_container_down(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_SECRET)
    data = tmp_path / "train"
    data.mkdir()
    spec = _spec(
        tmp_path, "sha256:img", "pass", env={"AR_PHASE": "train"}, mounts=(Mount(data, "/data/train"),),
        limits=Limits(memory_bytes=2**30, pids=64, cpus=1.5, shm_bytes=2**20, tmp_bytes=2**25),
        gpu_uuid="GPU-1234", labels={"autoresearch.exp": "e1"}, deadline_s=10,
    )
    config = container_config(spec, owner="123:456")
    assert config["network_mode"] == "none" and config["read_only"] is True
    assert config["cap_drop"] == ["ALL"] and config["security_opt"] == ["no-new-privileges"] and config["init"]
    assert config["user"] == f"{images.CONTAINER_UID}:{images.CONTAINER_UID}"
    assert config["environment"] == {"AR_PHASE": "train", "NVIDIA_VISIBLE_DEVICES": "GPU-1234"}
    assert config["mem_limit"] == config["memswap_limit"] == 2**30
    assert (config["pids_limit"], config["nano_cpus"], config["shm_size"]) == (64, 1_500_000_000, 2**20)
    assert config["tmpfs"] == {"/tmp": f"rw,exec,nosuid,nodev,size={2**25}"}
    assert config["command"] == ["timeout", "-s", "KILL", "25", "python3", "-c", "pass"]
    assert config["labels"] == {"autoresearch.exp": "e1", RUN_LABEL: spec.run_id, OWNER_LABEL: "123:456"}
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in config["mounts"]}
    assert mounts == {"/out": (str(spec.out_dir.resolve()), False), "/data/train": (str(data), True)}
    (request,) = config["device_requests"]
    assert request["DeviceIDs"] == ["GPU-1234"] and request["Capabilities"] == [["gpu"]]


def test_container_config_makes_out_read_only_in_eval(tmp_path):
    config = container_config(_spec(tmp_path, "sha256:img", "pass", phase=Phase.EVAL))
    assert [m["ReadOnly"] for m in config["mounts"] if m["Target"] == "/out"] == [True]
    assert "device_requests" not in config and "nano_cpus" not in config


GPU = "GPU-5f0c7a2e-9d1b-4c3e-8a6f-2b7d9e1c4a10"
ONLY_THIS_GPU = [{"Driver": "", "Count": 0, "DeviceIDs": [GPU], "Capabilities": [["gpu"]], "Options": {}}]


def test_gpu_request_is_the_experiments_gpu_alone(tmp_path):
    """What the SDK sends the engine: the device request by UUID (a count would take any GPU)."""
    config = container_config(_spec(tmp_path, "sha256:img", "pass", gpu_uuid=GPU))
    create = _create_container_args({**config, "version": "1.41"})
    host_config = create.pop("host_config")
    assert host_config["DeviceRequests"] == ONLY_THIS_GPU
    assert "Devices" not in host_config and "Runtime" not in host_config and not host_config.get("Privileged")
    assert create["environment"]["NVIDIA_VISIBLE_DEVICES"] == GPU  # over a CUDA image's "all"

    cpu = _create_container_args({**container_config(_spec(tmp_path, "sha256:img", "pass")), "version": "1.41"})
    assert "DeviceRequests" not in cpu["host_config"] and cpu["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_a_containers_cgroup_is_found_under_this_hosts_mounts(tmp_path, monkeypatch):
    """The group the budget meter reads: cgroup v1's memory and cpuacct directories (cpuacct mounted with cpu
    here, as systemd does), else the v2 one; none where the mounts do not show it (another cgroup namespace)."""
    scope = "/system.slice/docker-c0ffee.scope"
    for hierarchy in ("memory", "cpu,cpuacct", "unified"):
        (tmp_path / hierarchy / scope.lstrip("/")).mkdir(parents=True)
    v1 = [("/", str(tmp_path / "memory"), "cgroup", {"rw", "memory"}),
          ("/", str(tmp_path / "cpu,cpuacct"), "cgroup", {"rw", "cpu", "cpuacct"})]
    v2 = [("/", str(tmp_path / "unified"), "cgroup2", {"rw"})]
    monkeypatch.setattr(cgroups, "_groups_of", lambda pid: {"memory": scope, "cpu": scope, "cpuacct": scope, "": scope})

    def found(mounts):
        monkeypatch.setattr(cgroups, "_mountinfo", lambda: mounts)
        group = cgroups.group_of(42)
        return group and (group.version, group.dirs)

    assert found(v1 + v2) == (1, {"memory": f"{tmp_path}/memory{scope}", "cpuacct": f"{tmp_path}/cpu,cpuacct{scope}"})
    assert found(v2) == (2, {"memory": f"{tmp_path}/unified{scope}"})
    assert found([("/runner", str(tmp_path / "unified"), "cgroup2", {"rw"})]) is None


# -----------------------------------------------------------------------------
# With a Docker engine


@pytest.fixture(scope="module")
def backend(docker_client, docker_base_image) -> DockerBackend:
    backend = DockerBackend(docker_client)
    backend.ensure_ready()  # finds the session's base image (or builds one for an edited prepare.py)
    return backend


def _gone(docker_client, spec: RunSpec) -> bool:
    return not docker_client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={spec.run_id}"})


def _when_logged(spec: RunSpec, text: str, action) -> threading.Thread:
    """Calls `action` once `text` is in the run's log (polls at most ~60 s)."""

    def watch() -> None:
        for _ in range(600):
            if spec.log_path.exists() and text in spec.log_path.read_text():
                action()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


STREAMING = """
import os, time
print("first", flush=True)
for _ in range(300):
    if os.path.exists("/out/go"):
        break
    time.sleep(0.1)
else:
    raise SystemExit("the host never saw the first line")
print("a\\rb\\rc")
open("/out/result.txt", "w").write("written")
"""


@pytest.mark.docker
def test_run_streams_the_log_and_writes_out(backend, docker_client, tmp_path):
    spec = _spec(tmp_path, backend.base_id, STREAMING)
    # The container waits for a file the host creates only once it has seen "first" in the log.
    watcher = _when_logged(spec, "first", lambda: (spec.out_dir / "go").touch())
    result = backend.run(spec)
    watcher.join(timeout=5)
    assert (result.status, result.exit_code, result.killed_by) == (Status.OK, 0, Killer.NONE)
    assert _log_lines(spec) == ["first", "a", "b", "c"]
    assert (spec.out_dir / "result.txt").read_text() == "written"
    assert result.isolation == backend.isolation and result.wall_seconds > 0
    assert result.runtime == docker_client.images.get(backend.base_id).labels[images.RUNTIME_LABEL] != ""
    assert _gone(docker_client, spec)


PROBE = """
import json, os, re, socket
status = open("/proc/self/status").read()

def writable(path):
    try:
        open(path, "w").close()
        return True
    except OSError:
        return False

def connect():
    try:
        socket.create_connection((os.environ["PROBE_HOST"], int(os.environ["PROBE_PORT"])), timeout=3).close()
        return "connected"
    except OSError as error:
        return type(error).__name__

def resolve():
    try:
        socket.getaddrinfo(PROBE_NAME, 80)
        return "resolved"
    except socket.gaierror as error:
        return "no-server" if error.errno == socket.EAI_AGAIN else f"answered ({error})"

print("PROBE " + json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "cap_eff": int(re.search(r"CapEff:\\s+(\\w+)", status)[1], 16),
    "no_new_privs": int(re.search(r"NoNewPrivs:\\s+(\\d+)", status)[1]),
    "writable": {p: writable(p) for p in ("/etc/probe", "/app/probe", "/usr/probe", "/tmp/probe", "/out/probe")},
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "secret_seen": any(SECRET in value for value in os.environ.values()),
    "env": sorted(os.environ),
    "connect": connect(),
    "resolve": resolve(),
}))
"""


def _bridge_gateway(docker_client) -> str:
    """The host's address on the Docker bridge: where the test's own listeners go (DESIGN §5).

    Binding a listener to it proves it is this host's own, so nothing here can aim elsewhere."""
    (ipam,) = docker_client.networks.get("bridge").attrs["IPAM"]["Config"]
    return ipam.get("Gateway") or str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))


@pytest.fixture(scope="module")
def listener(docker_client):
    """A TCP listener of the test's own on the Docker bridge gateway."""
    server = socket.socket()
    server.bind((_bridge_gateway(docker_client), 0))
    server.listen(8)
    socket.create_connection(server.getsockname(), timeout=3).close()  # reachable from the host
    yield server.getsockname()
    server.close()


@pytest.fixture(scope="module")
def probe(backend, listener, tmp_path_factory):
    """What a process sees from inside a phase-1 container (one run for all isolation tests)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_SECRET)
    host, port = listener
    code = PROBE.replace("SECRET", repr(FAKE_SECRET)).replace("PROBE_NAME", repr(hostile.PROBE_NAME))
    spec = _spec(tmp_path_factory.mktemp("probe"), backend.base_id, code, env={"PROBE_HOST": host, "PROBE_PORT": str(port)})
    result = backend.run(spec)
    monkeypatch.undo()
    assert result.status is Status.OK, result.log_tail
    (line,) = [line for line in _log_lines(spec) if line.startswith("PROBE ")]
    return json.loads(line.removeprefix("PROBE "))


@pytest.mark.docker
def test_runs_as_non_root_without_capabilities(probe):
    assert (probe["uid"], probe["gid"]) == (images.CONTAINER_UID, images.CONTAINER_UID)
    assert probe["cap_eff"] == 0 and probe["no_new_privs"] == 1


@pytest.mark.docker
def test_root_filesystem_is_read_only_except_tmp_and_out(probe):
    assert probe["writable"] == {"/etc/probe": False, "/app/probe": False, "/usr/probe": False,
                                 "/tmp/probe": True, "/out/probe": True}


@pytest.mark.docker
def test_environment_holds_no_host_secret(probe):
    assert not probe["secret_seen"]
    assert "ANTHROPIC_API_KEY" not in probe["env"]


@pytest.mark.docker
def test_no_network(probe):
    assert probe["interfaces"] == ["lo"]
    assert probe["connect"] != "connected"
    assert probe["resolve"] == "no-server"  # no name server reachable (hostile_cases.PROBE_NAME)


MOUNTS = """
import os
assert open("/out/model.txt").read() == "model"
assert open("/data/train/tokens.txt").read() == "tokens"
for path in ("/out/new.txt", "/data/train/new.txt"):
    try:
        open(path, "w").close()
    except OSError:
        print("read-only", path)
"""


@pytest.mark.docker
def test_eval_phase_sees_out_and_data_read_only(backend, tmp_path):
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "tokens.txt").write_text("tokens")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.txt").write_text("model")
    spec = _spec(tmp_path, backend.base_id, MOUNTS, phase=Phase.EVAL, mounts=(Mount(data, "/data/train"),))
    result = backend.run(spec)
    assert result.status is Status.OK, result.log_tail
    assert _log_lines(spec) == ["read-only /out/new.txt", "read-only /data/train/new.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.txt"]


@pytest.mark.docker
def test_deadline_kills_and_removes_the_container(backend, docker_client, tmp_path):
    spec = _spec(tmp_path, backend.base_id, "import time; print('sleeping', flush=True); time.sleep(120)", deadline_s=3)
    result = backend.run(spec)
    assert (result.status, result.killed_by) == (Status.TIMEOUT, Killer.DEADLINE)
    assert "sleeping" in result.log_tail and "deadline" in result.log_tail
    assert _gone(docker_client, spec)


@pytest.mark.docker
def test_memory_limit_is_oom(backend, tmp_path):
    spec = _spec(tmp_path, backend.base_id, "x = b'x' * (512 * 2**20)", limits=Limits(memory_bytes=64 * 2**20))
    result = backend.run(spec)
    assert (result.status, result.killed_by) == (Status.OOM, Killer.OOM_KILLER)
    assert result.exit_code != 0


@pytest.mark.docker
@pytest.mark.parametrize("group_in_sight", [True, False])
def test_the_meter_reads_the_containers_cgroup_else_the_engines_stats(backend, tmp_path, monkeypatch, group_in_sight):
    """On this host the runner sees the container's cgroup; where it cannot (an engine in a VM), the engine's
    stats stand in. Either gives the peak memory."""
    real_group_of, found = docker_backend.group_of, []

    def group_of(pid: int):
        found.append(real_group_of(pid))
        return found[-1] if group_in_sight else None

    monkeypatch.setattr(docker_backend, "group_of", group_of)
    result = backend.run(_spec(tmp_path, backend.base_id, "import time; x = b'x' * (64 * 2**20); time.sleep(3)"))
    assert result.status is Status.OK, result.log_tail
    assert result.peak_host_memory_bytes >= 64 * 2**20
    assert len(found) == 1 and found[0] is not None  # this host shows it


@pytest.mark.docker
def test_crash_reports_exit_code_and_log_tail(backend, tmp_path):
    code = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(3)"
    result = backend.run(_spec(tmp_path, backend.base_id, code))
    assert (result.status, result.exit_code, result.killed_by) == (Status.CRASH, 3, Killer.NONE)
    assert result.log_tail.splitlines() == [f"line {i}" for i in range(60, 100)]


@pytest.mark.docker
def test_cancel_stops_the_run(backend, docker_client, tmp_path):
    cancel = CancelToken()
    spec = _spec(tmp_path, backend.base_id, "import time; print('started', flush=True); time.sleep(120)")
    _when_logged(spec, "started", cancel.cancel)
    result = backend.run(spec, cancel)
    assert (result.status, result.killed_by) == (Status.CANCELLED, Killer.CANCEL)
    assert _gone(docker_client, spec)


@pytest.mark.docker
def test_missing_image_is_a_crash_with_a_clear_line(backend, tmp_path):
    spec = _spec(tmp_path, "sha256:" + "0" * 64, "pass")
    result = backend.run(spec)
    assert (result.status, result.exit_code) == (Status.CRASH, None)
    assert "does not exist" in result.log_tail


@pytest.mark.docker
def test_gpu_watchdog_kill_is_gpu_oom(docker_client, backend, tmp_path, monkeypatch):
    """The watchdog's wiring, with a fake NVML reader in which every host process holds 1 GiB:
    only the container's own processes (found through the engine) count against the cap."""
    config = docker_backend.container_config  # no GPU here: everything as for a GPU run but the device
    monkeypatch.setattr(docker_backend, "container_config",
                        lambda spec, owner: {k: v for k, v in config(spec, owner).items() if k != "device_requests"})

    def every_process_holds_a_gib(gpu_uuid: str) -> GpuSample:
        return GpuSample({int(pid): 2**30 for pid in os.listdir("/proc") if pid.isdigit()})

    gpu_backend = DockerBackend(docker_client, gpu_reader=every_process_holds_a_gib)
    spec = _spec(tmp_path, backend.base_id, "import time; time.sleep(120)", gpu_uuid="GPU-fake", deadline_s=30,
                 limits=Limits(memory_bytes=2**28, gpu_memory_bytes=2**29))
    result = gpu_backend.run(spec)
    assert (result.status, result.killed_by) == (Status.GPU_OOM, Killer.WATCHDOG)
    assert result.peak_gpu_memory_bytes >= 2**30


@pytest.mark.docker
def test_the_engine_is_asked_for_the_experiments_gpu_alone(backend, docker_client, tmp_path):
    """The engine's own record of a GPU run's container. On an engine without the NVIDIA
    runtime (this one) it cannot start: the run is a crash that says why."""
    spec = _spec(tmp_path, backend.base_id, "pass", gpu_uuid=GPU)
    spec.out_dir.mkdir()
    container = docker_client.containers.create(**container_config(spec))
    try:
        container.reload()
        assert container.attrs["HostConfig"]["DeviceRequests"] == ONLY_THIS_GPU
        assert not container.attrs["HostConfig"]["Devices"] and not container.attrs["HostConfig"]["Privileged"]
        assert f"NVIDIA_VISIBLE_DEVICES={GPU}" in container.attrs["Config"]["Env"]
    finally:
        container.remove(force=True)
    if "nvidia" not in docker_client.info().get("Runtimes", {}):
        result = backend.run(spec)
        assert result.status is Status.CRASH and "docker error" in result.log_tail and "gpu" in result.log_tail
        assert _gone(docker_client, spec)


def test_process_identity_tells_a_dead_process_apart():
    child = subprocess.Popen(["sleep", "60"])
    identity = process_identity(child.pid)
    assert identity is not None and identity.startswith(f"{child.pid}:")
    assert process_identity(child.pid) == identity
    child.kill()
    child.wait()
    assert process_identity(child.pid) is None


@pytest.mark.docker
def test_reap_removes_leftovers_of_dead_runners_only(backend, docker_client):
    dead_runner = subprocess.Popen(["sleep", "60"])
    dead_owner = process_identity(dead_runner.pid)
    dead_runner.kill()
    dead_runner.wait()

    def leftover(owner: str):
        return docker_client.containers.create(backend.base_id, ["true"], labels={RUN_LABEL: "leftover", OWNER_LABEL: owner})

    orphans = [leftover(dead_owner), leftover("")]
    live = leftover(process_identity(os.getpid()))  # supervised by a runner that is still running
    try:
        assert backend.reap() >= 2
        assert not docker_client.containers.list(all=True, filters={"id": [c.id for c in orphans]})
        assert docker_client.containers.list(all=True, filters={"id": live.id})
    finally:
        live.remove(force=True)


@pytest.mark.docker
@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.name, marks=[pytest.mark.slow] if hostile.HARNESS in case.needs else [])
    for case in hostile.CASES
])
def test_hostile_case(case: hostile.HostileCase, backend, docker_client, tmp_path, request):
    """Every hostile train.py of tests/hostile_cases.py ends as expected under docker."""
    data = request.getfixturevalue("tiny_data") if hostile.HARNESS in case.needs else hostile.make_fake_data(tmp_path / "data")
    host_file = tmp_path / "host-file"
    host_file.write_text("a host file")
    with hostile.Listener(_bridge_gateway(docker_client)) as listener, \
            hostile.HostEndpoints([tmp_path / "host.sock"]) as endpoints, hostile.secret_on_host():
        state = hostile.HostState(listener, data, tmp_path / "host", endpoints, (host_file,))
        status, log = hostile.run_case(backend, case, state, tmp_path / "work")
    hostile.assert_case(case, status, log, tmp_path / "work" / "out", state)
