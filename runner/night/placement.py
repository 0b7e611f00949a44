"""Where a night's experiments run: this machine (a slot per GPU, or one for the CPU) or the nodes of a Ray cluster.

The loop asks its placement for the slots and the profile, and hands it each experiment to build
and run (as a `RunPlan`, the same wherever it runs); `Local` and `OnCluster` are the only code
that knows which kind of night it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import contract
from runner.core.gpus import Gpu
from runner.core.ledger import Experiment, Ledger
from runner.core.plan import RunPlan
from runner.night.cluster import Cluster, Node, NodeLost, slot_gpu
from runner.night.cluster_node import Job
from runner.night.records import Records
from sandbox.experiment import ExperimentOutcome, run_experiment
from sandbox.spec import Backend, CancelToken
from sandbox.status import Status

RunFn = Callable[..., ExperimentOutcome]
OnPhase = Callable[[Status], None]


@dataclass
class Slot:
    """A place to run one experiment at a time: one GPU, or the CPU; here or on a cluster node."""

    gpu: Gpu | None
    node: Node | None = None  # a cluster night: the node, which gives the run a GPU (or CPU slot) of its own
    index: int = 0  # which of the node's slots
    strikes: int = 0  # infrastructure failures in a row
    retired: bool = False
    exp_id: str | None = None
    phase: str = "idle"
    since: float = field(default_factory=time.monotonic)

    @property
    def place(self) -> str:
        """Where a failure belongs: the node on a cluster (its other slots share its faults), else the slot."""
        return self.node.name if self.node is not None else self.name

    @property
    def name(self) -> str:
        if self.node is not None:
            return f"{self.node.name}#{self.index}"
        return f"gpu{self.gpu.index}" if self.gpu else "cpu"

    def show(self, exp_id: str | None, phase: str) -> None:
        self.exp_id, self.phase, self.since = exp_id, phase, time.monotonic()


class ImageStore(Protocol):
    def image_exists(self, image: str) -> bool: ...
    def remove_image(self, image: str) -> None: ...


class Placement(Protocol):
    profile: str  # "gpu" or "cpu": what the slots give a run
    every: str  # what "every slot" is to the user: "every GPU", "the CPU worker", "every node"

    def slots(self) -> list[Slot]: ...

    def record(self) -> dict[str, Any]:
        """What the night's settings record keeps of where it ran."""

    def record_inventory(self, ledger: Ledger, night_id: int) -> None:
        """Keep what the night runs on beside its record (a cluster's nodes; `status` shows them)."""

    def build(self, records: Records, row: Experiment) -> Experiment:
        """The row, built where it will run (the caller holds the night's image lock)."""

    def images(self, records: Records) -> ImageStore:
        """The night's images where they are (for runner.night.pruning)."""

    def gpu_name(self, slot: Slot) -> str | None:
        """The GPU a run on `slot` gets, as far as it is known before it starts."""

    def run(self, slot: Slot, records: Records, row: Experiment, plan: RunPlan, data_path, data_hash: str,
            cancel: CancelToken, on_phase: OnPhase) -> ExperimentOutcome: ...

    def lost(self, error: Exception) -> bool:
        """Whether `error` means the slot's place is gone for good (its slots leave rotation at once)."""


class Local:
    """This machine: one slot per GPU given to the night, or one for the CPU; images built by its backend."""

    def __init__(self, backend: Backend, gpus: list[Gpu], run: RunFn = run_experiment) -> None:
        self.backend = backend
        self.gpus = gpus
        self._run = run
        self.profile = contract.profile_of(bool(gpus))
        self.every = "every GPU" if gpus else "the CPU worker"

    def slots(self) -> list[Slot]:
        return [Slot(gpu) for gpu in self.gpus] or [Slot(None)]

    def record(self) -> dict[str, Any]:
        return {"cluster": None}

    def record_inventory(self, ledger: Ledger, night_id: int) -> None:
        pass  # this machine's GPUs are in the settings record

    def build(self, records: Records, row: Experiment) -> Experiment:
        """Bake the row's train.py into an image (again, if the recorded one is gone)."""
        if row.status != Status.PROPOSED and row.image and self.backend.image_exists(row.image):
            return row
        started = time.monotonic()
        image = self.backend.build_image(records.train_py(row), row.id)
        fields = {"image": image, "build_seconds": time.monotonic() - started}
        if row.status == Status.PROPOSED:
            records.ledger.transition(row.id, Status.BUILT, **fields)
        else:
            records.ledger.update(row.id, **fields)
        return records.ledger.get(row.id)

    def images(self, records: Records) -> ImageStore:
        return self.backend

    def gpu_name(self, slot: Slot) -> str | None:
        return slot.gpu.name if slot.gpu else None

    def run(self, slot, records, row, plan, data_path, data_hash, cancel, on_phase) -> ExperimentOutcome:
        spec = plan.spec(row.image, data_path, records.dir(row.id), slot.gpu)
        return self._run(self.backend, spec, cancel, on_phase=on_phase)

    def lost(self, error: Exception) -> bool:
        return False


class OnCluster:
    """The nodes of a Ray cluster: each node builds the image of what it runs and gives each run its own GPU."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.profile = cluster.profile
        self.every = "every node"

    def slots(self) -> list[Slot]:
        return [Slot(None, node, k) for node in self.cluster.nodes for k in range(node.slots)]

    def record(self) -> dict[str, Any]:
        return {"cluster": self.cluster.address}

    def record_inventory(self, ledger: Ledger, night_id: int) -> None:
        ledger.set_cluster(night_id, self.cluster.record())

    def build(self, records: Records, row: Experiment) -> Experiment:
        """The node that runs the row builds it: here it is only marked built."""
        if row.status == Status.PROPOSED:
            records.ledger.transition(row.id, Status.BUILT)
        return records.ledger.get(row.id)

    def images(self, records: Records) -> ImageStore:
        return self.cluster.images(records.ledger.experiments())

    def gpu_name(self, slot: Slot) -> str | None:
        return self.cluster.gpu_model  # the node records its GPU once the run starts there

    def run(self, slot, records, row, plan, data_path, data_hash, cancel, on_phase) -> ExperimentOutcome:
        """The experiment as a task on the slot's node, which records what it ran on once it starts."""
        job = Job(plan=plan, train_py=records.train_py(row), sandbox=self.cluster.sandbox, recipe=self.cluster.recipe,
                  source=data_path.name, data_hash=data_hash)

        def on_start(started: dict) -> None:
            gpu = slot_gpu(started)
            records.ledger.update(row.id, backend=started["backend"], isolation=started["isolation"],
                                  image=started["image"], build_seconds=started["build_seconds"],
                                  gpu_uuid=gpu.uuid if gpu else None, gpu_name=gpu.name if gpu else None,
                                  gpu_driver=gpu.driver if gpu else None)

        return self.cluster.run(slot.node, job, records.dir(row.id), cancel, on_start, on_phase)

    def lost(self, error: Exception) -> bool:
        return isinstance(error, NodeLost) and error.node_gone
