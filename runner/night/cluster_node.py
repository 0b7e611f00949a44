"""A cluster node's side of a night run elsewhere: say what the node is, and run one experiment.

The runner (runner.night.cluster) stays the only writer of the ledger; a node only runs. It runs
through its own sandbox (docker or process, chosen here and reported), from the
experiment's train.py text, on a base built from the same pinned inputs as everybody
else's (its `recipe`), on its own copy of the prepared data (same manifest hash), and
streams back what the run writes: the logs as they grow, then the run directory's files
and the outcome. Nothing here imports Ray: the runner wraps these functions as Ray tasks,
so this is the code that a node's own installation of the project runs.
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import structlog

from dataprep.build import read_manifest, verify_manifest
from dataprep.errors import PrepareError
from runner.core import gpus as gpu_inventory
from runner.core.plan import RunPlan
from runner.core.settings import prepared_data
from sandbox.backends import get_backend
from sandbox.experiment import ExperimentOutcome, ExperimentSpec, run_experiment
from sandbox.run_dir import LOG_FILES
from sandbox.spec import Backend, CancelToken

log = structlog.get_logger(__name__)

STREAM_EVERY_S = 0.5  # how often a running experiment's new log bytes go back to the runner
MAX_CHUNK = 4 * 2**20  # a file goes back in pieces of at most this size


class NodeRefused(RuntimeError):
    """This node cannot run the night's experiments as asked (one sentence: why, and what to do)."""


@dataclass(frozen=True)
class Job:
    """One experiment, as the runner hands it to a node (everything a node needs, nothing of the ledger)."""

    plan: RunPlan  # the run as the night planned it; the node applies it to the card it gives the run
    train_py: str
    sandbox: str  # the sandbox the runner resolved --sandbox to here (docker or process): the node uses the same
    recipe: str  # what the night's images are built from; a node whose backend differs refuses
    source: str  # the data source's name under the node's cache
    data_hash: str  # the night's data manifest hash

    @property
    def exp_id(self) -> str:
        return self.plan.exp_id


def describe(sandbox: str, source: str) -> dict[str, Any]:
    """What this node is: host, sandbox and its recipe, data, GPUs, CPUs; `problem` says why it cannot serve."""
    facts: dict[str, Any] = {"host": socket.gethostname(), "gpus": [vars(gpu) for gpu in gpu_inventory.discover()],
                             "problem": None}
    try:
        backend = get_backend(sandbox)
        backend.ensure_ready()
        facts.update(backend=backend.name, recipe=backend.recipe())
        facts["data_hash"] = verify_manifest(prepared_data(source))
    except PrepareError as error:
        facts["problem"] = f"its data for --source {source} does not check out ({error})"
    except Exception as error:  # no sandbox can work here: the node is refused, the night goes on elsewhere
        facts["problem"] = f"its {sandbox} sandbox cannot run ({error})"
    return facts


def remove_image(sandbox: str, image: str) -> None:
    """Remove this experiment image from this node's sandbox, if the node has it."""
    backend = get_backend(sandbox)
    if backend.image_exists(image):
        backend.remove_image(image)


def assigned_gpu() -> gpu_inventory.Gpu | None:
    """The GPU the cluster gave this process (CUDA_VISIBLE_DEVICES: an index or a UUID), or None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    for gpu in gpu_inventory.discover():
        if visible in (str(gpu.index), gpu.uuid):
            return gpu
    return None


def run(job: Job) -> Iterator[tuple]:
    """Run `job` here; yield what the runner records, in order:

    ("started", facts) once the image is built: backend, isolation, recipe, image, build seconds, GPU;
    ("phase", status) before each phase; ("log", name, bytes) as the logs grow;
    ("file", relative path, offset, bytes) for every other file the run left; ("outcome", ExperimentOutcome).
    A cancel (the runner stopped) cancels the run and waits for the sandbox to clean up."""
    backend = get_backend(job.sandbox)
    backend.ensure_ready()
    _check(job, backend)
    reaped = backend.reap()  # a run of a worker that died with its node left these
    if reaped:
        log.info("node.reaped", leftovers=reaped)
    gpu = assigned_gpu()
    started = time.monotonic()
    image = backend.build_image(job.train_py, job.exp_id)
    yield ("started", {"host": socket.gethostname(), "backend": backend.name, "isolation": backend.isolation,
                       "recipe": job.recipe, "image": image, "build_seconds": time.monotonic() - started,
                       "gpu": vars(gpu) if gpu else None})
    with tempfile.TemporaryDirectory(prefix=f"autoresearch-{job.exp_id}-") as tmp:
        run_dir = Path(tmp)
        spec = job.plan.spec(image, prepared_data(job.source), run_dir / "run", gpu)
        yield from _stream(backend, spec, run_dir)


def _check(job: Job, backend: Backend) -> None:
    """The node's base and data must be the night's: else its val_bpb would not be comparable."""
    host, recipe = socket.gethostname(), backend.recipe()
    if recipe != job.recipe:
        raise NodeRefused(f"node {host} builds its {backend.name} images from other inputs ({recipe}, "
                          f"the night's are {job.recipe}): install the same version of the project there.")
    manifest = read_manifest(prepared_data(job.source))
    if manifest is None or manifest["hash"] != job.data_hash:
        raise NodeRefused(f"node {host} has {'other' if manifest else 'no'} prepared data for --source {job.source} "
                          f"(the night's manifest is {job.data_hash[:12]}): build it there with `python -m dataprep`.")


def _stream(backend: Backend, spec: ExperimentSpec, run_dir: Path) -> Iterator[tuple]:
    """Run the experiment in a thread; meanwhile hand its phases and new log bytes to the runner."""
    spec.run_dir.mkdir()
    events: queue.Queue = queue.Queue()
    cancel = CancelToken()
    ended: list[ExperimentOutcome | BaseException] = []

    def experiment() -> None:
        try:
            ended.append(run_experiment(backend, spec, cancel, on_phase=lambda status: events.put(("phase", status))))
        except BaseException as error:  # handed to the runner as this task's failure
            ended.append(error)

    worker = threading.Thread(target=experiment, name=f"experiment-{spec.exp_id}", daemon=True)
    worker.start()
    sent = dict.fromkeys(LOG_FILES, 0)
    try:
        while True:
            alive = worker.is_alive()  # read before the logs: the last bytes are sent after the end
            while not events.empty():
                yield events.get()
            yield from _new_log_bytes(spec.run_dir, sent)
            if not alive:
                break
            worker.join(STREAM_EVERY_S)
    except BaseException:  # the runner cancelled the task (or went away): stop the run, let the sandbox clean up
        cancel.cancel()
        worker.join()
        raise
    result = ended[0]
    if isinstance(result, BaseException):
        raise result
    yield from _files(spec.run_dir)
    yield ("outcome", result)


def _new_log_bytes(directory: Path, sent: dict[str, int]) -> Iterator[tuple]:
    for name in LOG_FILES:
        try:
            with open(directory / name, "rb") as f:
                f.seek(sent[name])
                while chunk := f.read(MAX_CHUNK):
                    sent[name] += len(chunk)
                    yield ("log", name, chunk)
        except FileNotFoundError:
            continue


def _files(directory: Path) -> Iterator[tuple]:
    """Every regular file of the run directory but the logs, in pieces (the exported model can be large)."""
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if relative in LOG_FILES or path.is_symlink() or not path.is_file():
            continue
        with open(path, "rb") as f:
            offset = 0
            while True:  # an empty file goes back as one empty piece
                chunk = f.read(MAX_CHUNK)
                yield ("file", relative, offset, chunk)
                offset += len(chunk)
                if len(chunk) < MAX_CHUNK:
                    break
