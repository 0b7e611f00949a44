"""Nights on a Ray cluster (`overnight --cluster ADDRESS`): the runner stays here, experiments run on nodes.

The runner remains the single writer of the ledger on the machine where it runs. Each
experiment (its phase pair) is one Ray task pinned to a node, holding one GPU there (one
CPU slot on the CPU profile), in a worker process that is never reused: a reused worker
would keep the GPU memory of the run before. The task is runner.night.cluster_node.run, from
the node's own installation of the project: it builds the image through the node's own
sandbox, from the same pinned inputs (the recipe) and the same data (the manifest hash),
or the node is refused with one sentence. Its logs stream back while it runs and its
run directory comes back at the end, so the morning commands read it as any other run.

A node that dies or is cut off mid-run fails its task; the night puts the experiment on
another node (runner.night.loop's infrastructure failures, the ledger counting its attempts),
and a node that keeps failing, or is gone, leaves rotation. Results of different GPU
models are never compared: the night runs on one model only (the one most GPUs have).
"""

from __future__ import annotations

import collections
import functools
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from runner.core.errors import MachineError
from runner.core.gpus import Gpu
from runner.core.ledger import Experiment
from runner.night.cluster_node import Job, NodeRefused, describe
from runner.night.cluster_node import remove_image as remove_image_on_node
from runner.night.cluster_node import run as run_on_node
from sandbox.experiment import ExperimentOutcome
from sandbox.run_dir import LOG_FILES, OUT, RunDir
from sandbox.spec import CancelToken, Killer, Phase, RunResult
from sandbox.status import Status

log = structlog.get_logger(__name__)

PROBE_TIMEOUT_S = 1800.0  # a node's first probe may build its base image (an online pull: many minutes)
CONNECT_TIMEOUT_S = 10.0
WAIT_S = 0.5  # how often a waiting worker looks at its cancel token
CPU_PROFILE = "cpu"  # the model name of a slot without a real GPU (a logical GPU, or a node's CPUs)


class ClusterUnavailable(MachineError):
    """No usable cluster: Ray missing, no cluster at the address, or no node that can serve the night."""


class NodeLost(Exception):
    """A run failed because of its node (it died, was cut off, or refused): put the experiment elsewhere."""

    def __init__(self, message: str, *, node_gone: bool = False) -> None:
        super().__init__(message)
        self.node_gone = node_gone


@dataclass
class Node:
    """A node the night runs on: its Ray id and name, what it said of itself, and the Ray resources of one slot."""

    id: str
    ray_name: str  # Ray's name of the node: its IP address unless started with --node-name
    slots: int
    request: dict[str, Any]  # Ray options of one experiment task there: num_gpus / num_cpus
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return node_name(self.ray_name, self.id)


def node_name(ray_name: str, node_id: str) -> str:
    """How the ledger and `status` name a node: Ray's name and the start of its id (unique per start)."""
    return f"{ray_name}/{node_id[:8]}"


def _ray():
    """The ray module, imported only for cluster nights (it is an optional extra)."""
    # A driver started by `uv run` would otherwise make every worker `uv run` the runner's project; a node
    # must run its own installation, so that its recipe says what it really runs.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError:
        raise ClusterUnavailable("a cluster night needs Ray, which is not installed: `uv sync --extra ray`.") from None
    return ray


@functools.cache
def _remote(function: Callable, max_calls: int = 0):
    """`function` as a Ray remote function, made once: Ray exports every new wrapper to the cluster again."""
    return _ray().remote(max_calls=max_calls)(function)


def _on_node(function: Callable, node_id: str, *, max_calls: int = 0, **options):
    """`function` as a task that runs on node `node_id` alone and that Ray never retries (the night does)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return _remote(function, max_calls).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), max_retries=0, **options)


class Cluster:
    """A connection to a Ray cluster, the inventory of its nodes, and experiments run on them."""

    def __init__(self, address: str, *, sandbox: str, source: str, data_hash: str, recipe: str,
                 cpu_profile: bool = False) -> None:
        self.address = address
        self.sandbox, self.source, self.data_hash, self.recipe = sandbox, source, data_hash, recipe
        self.cpu_profile = cpu_profile  # --gpus none: run the CPU profile even where nodes have GPUs
        self.nodes: list[Node] = []
        self.refused: dict[str, str] = {}  # node name -> why
        self.model = CPU_PROFILE
        self.pruned: set[str] = set()  # images this invocation removed from the nodes (runner.night.pruning)
        self._gone: set[str] = set()

    # -- connecting and the inventory -------------------------------------------------------------

    def connect(self) -> None:
        ray = _ray()
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, namespace="autoresearch", log_to_driver=False,
                     logging_level="warning", configure_logging=False)
        except Exception as error:  # ConnectionError, a bad address, a version mismatch: all one sentence
            said = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            # Something listens there (checked above) but Ray could not join: a cluster with token authentication
            # turned on answers a runner without its token so, and Ray's own error does not say why.
            hint = ("; if its nodes were started with RAY_AUTH_MODE=token, the runner needs RAY_AUTH_MODE=token "
                    "and the cluster's token too" if os.environ.get("RAY_AUTH_MODE", "disabled") != "token" else "")
            raise ClusterUnavailable(f"no Ray cluster answers at {self.address} ({said}){hint}.") from None
        log.info("cluster.connected", address=self.address, nodes=len(ray.nodes()))

    def take_inventory(self) -> None:
        """Ask every live node what it is; keep those that can serve the night, say why of the others."""
        ray = _ray()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        probes = {n["NodeID"]: _on_node(describe, n["NodeID"], num_cpus=0).remote(self.sandbox, self.source)
                  for n in alive}
        facts: dict[str, dict] = {}
        for info in alive:
            node_id = info["NodeID"]
            try:
                facts[node_id] = ray.get(probes[node_id], timeout=PROBE_TIMEOUT_S)
            except Exception as error:  # died, too slow, or its installation cannot run the probe
                cause = getattr(error, "cause", None) or error
                said = str(cause).strip().splitlines()[-1][:200] if str(cause).strip() else ""
                self.refused[node_name(info.get("NodeName", ""), node_id)] = (
                    f"it could not say what it is ({type(cause).__name__}{': ' + said if said else ''})")
        self.model = self._pick_model(facts)
        for info in alive:
            if info["NodeID"] in facts:
                self._admit(info, facts[info["NodeID"]])
        for name, why in self.refused.items():
            log.warning("cluster.node_refused", node=name, why=why)
        if not self.nodes:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.refused.items()) or "it has no live node"
            raise ClusterUnavailable(f"no node of the cluster at {self.address} can run the night ({reasons}).")
        log.info("cluster.inventory", model=self.model, nodes=[n.name for n in self.nodes],
                 slots=sum(n.slots for n in self.nodes))

    def _pick_model(self, facts: dict[str, dict]) -> str:
        """The GPU model the night runs on: the one most usable GPUs have (the CPU profile if none has one)."""
        if self.cpu_profile:
            return CPU_PROFILE
        models = collections.Counter(g["name"] for f in facts.values() if not f["problem"] for g in f["gpus"])
        return min(models, key=lambda m: (-models[m], m)) if models else CPU_PROFILE

    def _admit(self, info: dict, facts: dict) -> None:
        name = node_name(info.get("NodeName", ""), info["NodeID"])
        resources = info.get("Resources", {})
        why = facts["problem"]
        if why is None and facts.get("data_hash") != self.data_hash:
            why = f"its data for --source {self.source} differs from the runner's (manifest {facts['data_hash'][:12]})"
        if why is None and facts["recipe"] != self.recipe:
            why = (f"its {facts['backend']} sandbox builds from other inputs ({facts['recipe']}, the runner's: "
                   f"{self.recipe}); install the same version of the project there, or choose --sandbox")
        gpus = [g for g in facts["gpus"] if g["name"] == self.model]
        if why is None and self.model != CPU_PROFILE and not gpus:
            seen = ", ".join(sorted({g["name"] for g in facts["gpus"]})) or "none"
            why = f"its GPUs ({seen}) are not the night's model ({self.model}); runs on two models are not compared"
        if why is not None:
            self.refused[name] = why
            return
        logical = int(resources.get("GPU", 0))
        if self.model != CPU_PROFILE:
            slots, request = min(len(gpus), logical), {"num_gpus": 1, "num_cpus": 0}
        elif logical:  # GPU resources without a usable GPU (or --gpus none): each stands for one CPU slot
            slots, request = logical, {"num_gpus": 1, "num_cpus": 0}
        else:  # one run at a time, with all the CPUs Ray offers there
            cpus = int(resources.get("CPU", 0))
            slots, request = min(cpus, 1), {"num_cpus": cpus}
        if slots < 1:
            self.refused[name] = "Ray offers no GPU and no CPU of it to tasks (see ray start --num-gpus, --num-cpus)"
            return
        self.nodes.append(Node(info["NodeID"], info.get("NodeName", ""), slots, request, facts))

    @property
    def profile(self) -> str:
        return "cpu" if self.model == CPU_PROFILE else "gpu"

    @property
    def gpu_model(self) -> str | None:
        """The GPU model every run of the night gets (None on the CPU profile)."""
        return None if self.model == CPU_PROFILE else self.model

    def record(self) -> dict[str, Any]:
        """The inventory as the ledger keeps it (status shows it)."""
        return {"address": self.address, "model": self.model, "recipe": self.recipe,
                "nodes": [{"id": n.id, "name": n.name, "host": n.facts["host"], "slots": n.slots, "backend": n.facts["backend"],
                           "gpus": [{"uuid": g["uuid"], "name": g["name"]} for g in n.facts["gpus"]]}
                          for n in self.nodes],
                "refused": self.refused}

    def gone(self, node: Node) -> bool:
        """Whether Ray counts `node` dead (it stays dead: a node that comes back joins with a new id)."""
        if node.id not in self._gone:
            alive = {n["NodeID"] for n in _ray().nodes() if n.get("Alive")}
            if node.id not in alive:
                self._gone.add(node.id)
        return node.id in self._gone

    def images(self, rows: list[Experiment]) -> "NodeImages":
        """The night's experiment images where they are, on the nodes (for runner.night.pruning)."""
        return NodeImages(self, rows)

    # -- one experiment ---------------------------------------------------------------------------

    def run(self, node: Node, job: Job, run_dir: Path, cancel: CancelToken,
            on_start: Callable[[dict], None], on_phase: Callable[[Status], None]) -> ExperimentOutcome:
        """Run `job` on `node`, writing its logs into `run_dir` as they come and its files at the end."""
        ray = _ray()
        _clear(run_dir)

        def started(facts: dict) -> None:
            self.pruned.discard(facts["image"])  # the same train.py built again: its image may be pruned again
            on_start(facts)

        stream = _on_node(run_on_node, node.id, max_calls=1, **node.request).remote(job)
        outcome: ExperimentOutcome | None = None
        asked_to_stop = False
        try:
            while True:
                if cancel.cancelled and not asked_to_stop:
                    ray.cancel(stream)
                    asked_to_stop = True
                ready, _ = ray.wait([stream], timeout=WAIT_S)
                if not ready:
                    continue
                try:
                    event = ray.get(next(stream))
                except StopIteration:
                    break
                outcome = _take(event, run_dir, started, on_phase) or outcome
        except ray.exceptions.TaskCancelledError:
            return _cancelled(run_dir)
        except ray.exceptions.RayTaskError as error:
            if cancel.cancelled:
                return _cancelled(run_dir)
            cause = error.cause if isinstance(error.cause, BaseException) else error
            if isinstance(cause, NodeRefused):
                raise NodeLost(str(cause)) from None
            raise NodeLost(f"the run on {node.name} failed there: {type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayError as error:  # the node or its worker died, or the node was cut off
            if cancel.cancelled:
                return _cancelled(run_dir)
            # a dead node is said so before Ray's node table knows it; one a task cannot be placed on is gone too
            gone = isinstance(error, (ray.exceptions.NodeDiedError, ray.exceptions.TaskUnschedulableError))
            if gone:
                self._gone.add(node.id)
            raise NodeLost(f"{node.name} was lost mid-run ({type(error).__name__})",
                           node_gone=gone or self.gone(node)) from None
        if outcome is None:
            raise NodeLost(f"the run on {node.name} ended without an outcome")
        return outcome


def _check_reachable(address: str) -> None:
    """Refuse in seconds an address where nothing listens (Ray itself would retry for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except ValueError:
        raise ClusterUnavailable(f"--cluster {address} is not a Ray address (HOST:PORT, ray://HOST:PORT or auto).") from None
    except OSError as error:
        raise ClusterUnavailable(f"no Ray cluster answers at {address} ({error.strerror or error}).") from None


class NodeImages:
    """The images of a cluster night's runs, on the nodes that built them: what runner.night.pruning removes from.
    An image goes from every node of this invocation that ran a row with it; a node gone keeps its own."""

    def __init__(self, cluster: Cluster, rows: list[Experiment]) -> None:
        self.cluster = cluster
        self._where: dict[str, set[str]] = collections.defaultdict(set)
        for row in rows:
            if row.image and row.node:
                self._where[row.image].add(row.node)

    def image_exists(self, image: str) -> bool:
        return bool(self._where.get(image)) and image not in self.cluster.pruned

    def remove_image(self, image: str) -> None:
        for node in self.cluster.nodes:
            if node.name in self._where.get(image, ()) and not self.cluster.gone(node):
                _ray().get(_on_node(remove_image_on_node, node.id, num_cpus=0).remote(self.cluster.sandbox, image),
                           timeout=PROBE_TIMEOUT_S)
        self.cluster.pruned.add(image)


def _take(event: tuple, run_dir: Path, on_start: Callable[[dict], None],
          on_phase: Callable[[Status], None]) -> ExperimentOutcome | None:
    """Record one event of a node's run; the outcome (with its paths made local) when it is the last."""
    kind = event[0]
    if kind == "started":
        on_start(event[1])
    elif kind == "phase":
        on_phase(event[1])
    elif kind == "log":
        with open(run_dir / event[1], "ab") as f:
            f.write(event[2])
    elif kind == "file":
        _, relative, offset, chunk = event
        target = _inside(run_dir, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(chunk)
    elif kind == "outcome":
        outcome: ExperimentOutcome = event[1]
        for result in (outcome.train, outcome.eval):
            if result is not None:
                result.log_path = run_dir / result.log_path.name
        return outcome
    return None


def _inside(run_dir: Path, relative: str) -> Path:
    """`relative` under `run_dir`, refusing a path that leaves it."""
    target = (run_dir / relative).resolve()
    if not target.is_relative_to(run_dir.resolve()):
        raise NodeLost(f"a node sent a file outside its run directory ({relative!r})")
    return target


def _clear(run_dir: Path) -> None:
    """Start an attempt from nothing: what an attempt on a lost node left goes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (*LOG_FILES, OUT):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _cancelled(run_dir: Path) -> ExperimentOutcome:
    result = RunResult(Status.CANCELLED, None, Killer.CANCEL, 0.0, RunDir(run_dir).log(Phase.TRAIN))
    return ExperimentOutcome(Status.CANCELLED, None, {}, {}, result, None, {})


def slot_gpu(started: dict) -> Gpu | None:
    """The GPU a node gave a run, as the ledger records it."""
    return Gpu(**started["gpu"]) if started.get("gpu") else None

