"""The docker isolation backend: every run is one locked-down container (DESIGN §3.4).

The container has no network, a read-only root filesystem with a tmpfs /tmp, /out bound
from the run directory (read-only in phase 2), data mounts read-only, a non-root user
without capabilities, and memory (no swap), pids, CPU and shm limits. Its environment
is the spec's alone (plus the GPU it may see), so no secret of the host can reach it.
The host supervises the container as it does a process run (sandbox.supervision: the
deadline, the cancel token, the budget account and the GPU watchdog kill it; the engine
tells an OOM kill); a `timeout` inside the container is the backstop for a runner that
died. Whatever the container does ends in a `RunResult`, never an exception; an engine
that stops answering is `SandboxUnavailable` (no run can go on, none failed).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
import structlog
from docker.models.containers import Container
from docker.types import DeviceRequest, LogConfig, Mount

from sandbox import images
from sandbox.cgroups import Cgroup, group_of
from sandbox.gpu_watchdog import Reader
from sandbox.processes import identity_alive, process_identity
from sandbox.runlog import LineLog
from sandbox.spec import OUT_DIR, CancelToken, Phase, RunResult, RunSpec, SandboxUnavailable
from sandbox.status import Status
from sandbox.supervision import Ending, Exit, Supervisor

log = structlog.get_logger(__name__)

RUN_LABEL = "autoresearch.run"
OWNER_LABEL = "autoresearch.owner"  # the runner process that supervises the container
CONTAINER_TIMEOUT_AFTER_S = 15  # the in-container `timeout` fires this long after the host deadline
LOG_DRAIN_S = 10.0  # how long the log stream may take to deliver its last lines after the exit
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)
_DOCKER_ERRORS = (*_ENGINE_ERRORS, OSError)


def container_config(spec: RunSpec, owner: str = "") -> dict[str, Any]:
    """Keyword arguments of `containers.create` for `spec`: every isolation setting is here.

    `owner` (a `process_identity`) marks the supervising runner, so that `reap` leaves
    the containers of a live runner alone."""
    limits = spec.limits
    out_read_only = spec.phase is Phase.EVAL
    mounts = [Mount(OUT_DIR, str(spec.out_dir.resolve()), type="bind", read_only=out_read_only)]
    mounts += [Mount(m.target, str(m.source.resolve()), type="bind", read_only=True) for m in spec.mounts]
    config: dict[str, Any] = dict(
        image=spec.image,
        command=["timeout", "-s", "KILL", str(math.ceil(spec.deadline_s + CONTAINER_TIMEOUT_AFTER_S)), *spec.command],
        name=f"autoresearch-{spec.run_id}",
        labels={**spec.labels, RUN_LABEL: spec.run_id, OWNER_LABEL: owner},
        environment=dict(spec.env),
        user=f"{images.CONTAINER_UID}:{images.CONTAINER_UID}",
        network_mode="none",
        read_only=True,
        tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={limits.tmp_bytes}"},
        mounts=mounts,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        init=True,
        mem_limit=limits.memory_bytes,
        memswap_limit=limits.memory_bytes,
        pids_limit=limits.pids,
        shm_size=limits.shm_bytes,
        log_config=LogConfig(type="json-file", config={"max-size": "64m", "max-file": "2"}),
    )
    if limits.cpus:
        config["nano_cpus"] = int(limits.cpus * 1e9)
    # CUDA images say NVIDIA_VISIBLE_DEVICES=all, which an engine whose default runtime is
    # nvidia's honours: the run names its one GPU (or none) itself.
    config["environment"]["NVIDIA_VISIBLE_DEVICES"] = spec.gpu_uuid or "void"
    if spec.gpu_uuid:  # that GPU alone, by UUID (a count would take any)
        config["device_requests"] = [DeviceRequest(device_ids=[spec.gpu_uuid], capabilities=[["gpu"]])]
    return config


def _make_writable(out_dir: Path) -> None:
    """/out is written by the container's uid: hand the directory to it (or open it up)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(out_dir, images.CONTAINER_UID, images.CONTAINER_UID)
    else:
        out_dir.chmod(0o777)


class DockerBackend:
    """Runs each `RunSpec` in a fresh container of the engine `client` talks to."""

    name = "docker"
    isolation = "docker (no network, read-only rootfs, non-root, no capabilities)"

    def __init__(
        self, client: docker.DockerClient | None = None, runtime_source: str | None = None,
        gpu_reader: Reader | None = None, base_image: str | None = None,
    ) -> None:
        self._client = client
        self._runtime_source = runtime_source  # "offline" or "online"; None: $AR_RUNTIME, else offline
        self._base_image = base_image  # the online runtime's upstream; None: $AR_BASE_IMAGE, else the pinned tag
        self._gpu_reader = gpu_reader  # None: NVML
        self.base_id: str | None = None
        self._recipe: str | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=120)
                self._client.ping()
            except docker.errors.DockerException as error:
                self._client = None
                raise SandboxUnavailable(f"no Docker engine answers ({error})") from error
        return self._client

    def ensure_ready(self) -> None:
        try:
            base = images.ensure_base_image(self.client, self._runtime_source, self._base_image)
            self.base_id, self._recipe = base.id, base.recipe
        except images.ImageBuildError as error:
            raise SandboxUnavailable(str(error)) from error

    def recipe(self) -> str:
        if self._recipe is None:
            self.ensure_ready()
        return self._recipe

    @contextmanager
    def _engine_errors(self) -> Iterator[None]:
        """An engine error while the engine no longer answers is SandboxUnavailable: no run can work now."""
        try:
            yield
        except _ENGINE_ERRORS as error:
            if not self._answers():
                raise _engine_gone(error) from error
            raise

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except (*_ENGINE_ERRORS, SandboxUnavailable):
            return False

    def build_image(self, train_py: str, exp_id: str) -> str:
        if self.base_id is None:
            self.ensure_ready()
        with self._engine_errors():
            return images.build_experiment_image(self.client, self.base_id, train_py, exp_id,
                                                 owner=process_identity(os.getpid()) or "")

    def image_exists(self, image: str) -> bool:
        return self._runtime_of(image) is not None

    def _runtime_of(self, image: str) -> str | None:
        """What `image`'s runtime was built from ("" for images older than the label); None: no such image."""
        with self._engine_errors():
            try:
                return self.client.images.get(image).labels.get(images.RUNTIME_LABEL, "")
            except docker.errors.ImageNotFound:
                return None

    def remove_image(self, image: str) -> None:
        try:
            self.client.images.remove(image)
        except docker.errors.ImageNotFound:
            pass

    def reap(self) -> int:
        """Remove the containers of runs and image builds whose runner is gone; a live runner's are left alone."""
        with self._engine_errors():
            labelled = self.client.containers.list(all=True, filters={"label": RUN_LABEL})
            builds = self.client.containers.list(all=True, filters={"name": images.BUILD_PREFIX})
        leftovers = [c for c in labelled if not identity_alive(c.labels.get(OWNER_LABEL, ""))]
        leftovers += [c for c in builds if c.name.startswith(images.BUILD_PREFIX)
                      and not identity_alive(images.build_owner(c.name))]
        for container in leftovers:
            container.remove(force=True)
        if leftovers:
            log.info("docker.reaped", containers=len(leftovers))
        return len(leftovers)

    def run(self, spec: RunSpec, cancel: CancelToken | None = None) -> RunResult:
        container: Container | None = None
        runtime: str | None = None
        with Supervisor(spec) as supervisor:
            try:
                runtime = self._runtime_of(spec.image)
                if runtime is None:  # never pull: images are built here
                    supervisor.log.note(f"image {spec.image} does not exist on this engine")
                    return supervisor.result(Ending(Status.CRASH), self.isolation)
                if spec.phase is Phase.TRAIN:
                    _make_writable(spec.out_dir)
                container = self.client.containers.create(**container_config(spec, process_identity(os.getpid()) or ""))
                ending = supervisor.supervise(_ContainerRun(container, supervisor.log), cancel, self._gpu_reader)
                return supervisor.result(ending, self.isolation, runtime)
            except _DOCKER_ERRORS as error:
                supervisor.log.note(f"docker error: {error}")
                log.warning("docker.run_error", run_id=spec.run_id, error=str(error))
                if isinstance(error, _ENGINE_ERRORS) and not self._answers():  # the run did not fail: it cannot go on
                    raise _engine_gone(error) from error
                return supervisor.result(Ending(Status.CRASH), self.isolation, runtime or "")
            finally:
                if container is not None:
                    try:
                        container.remove(force=True)
                    except _DOCKER_ERRORS as error:  # reap() will get it
                        log.warning("docker.remove_failed", run_id=spec.run_id, error=str(error))


class _ContainerRun:
    """One container, as the supervisor drives it (sandbox.supervision.Supervised)."""

    def __init__(self, container: Container, line_log: LineLog) -> None:
        self._container = container
        self._exited = threading.Event()
        self._pump = threading.Thread(target=_pump_logs, args=(container, line_log), daemon=True)
        self._peak_memory = 0
        self._group: Cgroup | None = None

    def start(self) -> None:
        self._container.start()
        threading.Thread(target=_wait, args=(self._container, self._exited), daemon=True).start()
        self._pump.start()
        self._group = self._find_group()

    def _find_group(self) -> Cgroup | None:
        """The container's cgroup on this host (its path names the container, so a reused pid finds nothing);
        None where the runner cannot see it (an engine on another machine or in a VM)."""
        try:
            self._container.reload()
        except _DOCKER_ERRORS:
            return None
        pid = self._container.attrs["State"].get("Pid")
        group = group_of(pid) if pid else None
        if group is None or not all(self._container.id in folder for folder in group.dirs.values()):
            return None
        return group

    def wait(self, timeout_s: float) -> bool:
        return self._exited.wait(timeout_s)

    def kill(self) -> None:
        try:
            self._container.kill()
        except docker.errors.APIError:  # it has just exited by itself
            pass

    def pids(self) -> set[int]:
        try:
            top = self._container.top()
            column = top["Titles"].index("PID")
            return {int(row[column]) for row in top.get("Processes") or []}
        except (*_DOCKER_ERRORS, KeyError, ValueError):
            return set()

    def meter(self) -> float | None:
        """CPU seconds from the container's cgroup, read on the host: cheap enough for every poll, so the last
        reading before the engine removes the group at the exit misses at most a poll of the run. Where the
        group is out of sight, from the engine's stats, which take a second each and have no figures after
        the exit: the budget account then misses the run's last second or two. Either gives the memory peak."""
        if self._group is not None:
            cpu, memory = self._group.cpu_seconds(), self._group.peak_bytes() or self._group.memory_bytes()
        elif self._exited.is_set():
            return None
        else:
            try:
                stats = self._container.stats(stream=False, one_shot=True)
            except _DOCKER_ERRORS:
                return None
            memory_stats = stats.get("memory_stats") or {}
            memory = memory_stats.get("max_usage") or memory_stats.get("usage")
            usage = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
            cpu = usage / 1e9 if usage else None
        self._peak_memory = max(self._peak_memory, int(memory or 0))
        return cpu

    def oom_seen(self) -> bool:
        return False  # the engine tells an OOM kill only at the exit (State.OOMKilled)

    def report(self) -> Exit:
        self._pump.join(timeout=LOG_DRAIN_S)
        self._container.reload()
        state = self._container.attrs["State"]
        exit_code = None if state.get("Running") else state.get("ExitCode")  # still running: it survived the kill
        return Exit(exit_code, bool(state.get("OOMKilled")), self._peak_memory or None)


def _engine_gone(error: Exception) -> SandboxUnavailable:
    return SandboxUnavailable(f"the Docker engine stopped answering ({error}).")


def _wait(container: Container, exited: threading.Event) -> None:
    try:
        container.wait()
    except _DOCKER_ERRORS:  # the engine lost it: the supervisor reads the state and reports
        pass
    exited.set()


def _pump_logs(container: Container, line_log: LineLog) -> None:
    try:
        for chunk in container.logs(stream=True, follow=True):
            line_log.feed(chunk)
    except (*_DOCKER_ERRORS, ValueError):  # the container is gone, or the log was closed
        pass
