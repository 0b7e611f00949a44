"""Rerunning a recorded experiment: bit for bit (`--exact`) or as a fresh timed run.

`--exact` runs the recorded image on the recorded data with the recorded seed,
deterministic, and replays the phase-1 budget trace, so the schedule and the step
count are those of the original whatever the speed of the machine. The rerun is
bit-identical when phase 2 printed the same `val_bpb_hex` and the exported models
have the same sha256.

A rerun starts from nothing the original wrote but its schedule: the trace, which
train.py's process could have written anything into, is parsed strictly and the
host writes the rerun a schedule of its own, the step count and the progress values
on the harness's grid (contract.replay_schedule, under 6 KiB of information), so a
train.py cannot store its weights in one run and "reproduce" them in the next. A timed rerun (no replay) measures run-to-run noise instead;
given another seed, it is a fresh sample of the code (what `autoresearch verify` runs).

A rerun that differs is a finding about the experiment, not a failure of the
tool: the verdict says so and lists what it can see that differs. What would make
the comparison meaningless (the image or the recorded trace gone, other data) is
refused before anything runs.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import structlog

import contract
from dataprep.build import read_manifest, verify_manifest
from dataprep.errors import PrepareError
from runner.core import gpus as gpu_inventory
from runner.core.errors import UserError
from runner.core.ledger import RERUN, Experiment, Ledger, LedgerError, outcome_fields, outcome_phrase
from runner.core.plan import RunPlan
from runner.core.settings import DEFAULT_GPU_MEMORY_CAP, GpuMemoryCap
from sandbox.budget_guard import Allowance
from sandbox.experiment import ExperimentOutcome, run_experiment
from sandbox.phase1_files import read_trace
from sandbox.run_dir import RunDir
from sandbox.spec import Backend
from sandbox.status import Status

log = structlog.get_logger(__name__)



class RerunRefused(UserError):
    """The rerun cannot be compared with the original (one sentence for the user)."""


def open_backend(name: str) -> Backend:
    """The isolation backend the experiment ran on (imported late: docker is slow to import)."""
    from sandbox.backends import get_backend

    return get_backend(name)


@dataclass(frozen=True)
class Verdict:
    exp_id: str
    rerun_id: str
    exact: bool
    status: str  # how the rerun ended (done or a failure status)
    original: str | None  # val_bpb_hex as the ledger recorded it from phase 2
    repeated: str | None
    original_value: float | None
    repeated_value: float | None
    original_weights: str | None  # sha256 of the exported model
    repeated_weights: str | None
    sigma: float | None  # the night's noise, to read a timed rerun's difference against
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def identical(self) -> bool:
        weights_agree = None in (self.original_weights, self.repeated_weights) or \
            self.original_weights == self.repeated_weights
        return self.status == Status.DONE and self.original is not None and self.original == self.repeated and weights_agree

    @property
    def difference(self) -> float | None:
        if self.original_value is None or self.repeated_value is None:
            return None
        return self.repeated_value - self.original_value

    def line(self) -> str:
        """The one line a person reads."""
        head = f"{self.exp_id} (rerun {self.rerun_id})"
        if self.status != Status.DONE:
            return f"{head}: NOT REPRODUCED: the rerun ended in {self.status}, the original finished."
        numbers = f"val_bpb {_value(self.original_value)} -> {_value(self.repeated_value)}"
        if self.difference is not None:
            numbers += f" ({self.difference:+.3g}"
            numbers += f", {abs(self.difference) / self.sigma:.2f} sigma)" if self.sigma else ")"
        if not self.exact:
            return f"{head}: timed rerun, {numbers}."
        if self.identical:
            weights = " and the exported weights" if self.original_weights else ""
            return f"{head}: BIT-IDENTICAL: val_bpb {self.original}{weights} match exactly."
        return f"{head}: NOT REPRODUCIBLE: {numbers}; {'; '.join(self.reasons)}."

    def as_dict(self) -> dict:
        return {**asdict(self), "identical": self.identical, "difference": self.difference, "line": self.line()}


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


@dataclass(frozen=True)
class _RerunPlan:
    """Everything checked before the rerun starts."""

    row: Experiment
    settings: dict
    data_dir: Path
    gpu: gpu_inventory.Gpu | None
    schedule: str | None  # rerun --exact: the host-written schedule to replay
    time_budget: float
    seed: int | None  # the harness seed the rerun runs under
    allowance: Allowance | None  # what the night measured on its baselines

    def run_plan(self, rerun_id: str) -> RunPlan:
        """The rerun as the night ran the row: its budget, seed, allowances and GPU memory cap (on this host's card)."""
        cap = GpuMemoryCap.parse(self.settings.get("gpu_memory_cap", DEFAULT_GPU_MEMORY_CAP))
        return RunPlan(exp_id=rerun_id, time_budget=self.time_budget, seed=self.seed, deterministic=True,
                       gpu_memory_cap=cap, allowance=self.allowance, replay_schedule=self.schedule)


def rerun(ledger: Ledger, run_dir: Path, exp_id: str, *, exact: bool, seed: int | None = None,
          backend: Backend | None = None, inventory: Callable[[], list[gpu_inventory.Gpu]] = gpu_inventory.discover,
          on_start: Callable[[str], None] = lambda message: None) -> Verdict:
    """Rerun `exp_id` from its image, record the rerun in the ledger, return the verdict.

    `seed` runs a timed rerun under another harness seed than the recorded one. `on_start`
    hears one line once every check has passed and the run begins.
    """
    if exact and seed is not None:
        raise RerunRefused("an exact rerun replays the recorded seed; another seed needs a timed rerun.")
    plan = _plan(ledger, run_dir, ledger.get(exp_id), exact, inventory, seed)
    backend = backend or open_backend(plan.row.backend or "auto")
    image, rebuilt = _image(plan.row, backend, run_dir, build=True)
    rerun_row = _add_row(ledger, run_dir, plan, exact, backend, image)
    how = "replaying its recorded schedule" if exact else "as a fresh timed run"
    if seed is not None:
        how += f" on seed {seed}"
    source = " (rebuilt here from its recipe and train.py)" if rebuilt else ""
    on_start(f"rerunning {exp_id} as {rerun_row.id} from {image}{source}, {how} ({backend.name} sandbox) ...")
    outcome = _run(ledger, backend, plan, rerun_row, run_dir / rerun_row.id, image)
    verdict = _verdict(ledger, run_dir, plan, rerun_row.id, outcome, exact, backend)
    ledger.update(rerun_row.id, description=f"{rerun_row.description}: {_short(verdict)}")
    log.info("rerun.verdict", exp=exp_id, rerun=rerun_row.id, identical=verdict.identical, status=verdict.status)
    return verdict


def check(ledger: Ledger, run_dir: Path, exp_id: str, backend: Backend,
          inventory: Callable[[], list[gpu_inventory.Gpu]] = gpu_inventory.discover) -> None:
    """Refuse a timed rerun of `exp_id` for what `rerun` would refuse it, before anything runs
    (a caller about to rerun several rows checks them all first)."""
    plan = _plan(ledger, run_dir, ledger.get(exp_id), False, inventory, None)
    _image(plan.row, backend, run_dir, build=False)


def _image(row: Experiment, backend: Backend, run_dir: Path, *, build: bool) -> tuple[str, bool]:
    """The image the rerun runs: the recorded one where this machine has it, else the same image built
    again here, when this machine's recipe is the recorded one (a run on a cluster node, or a pruned
    image) and the recorded train.py is intact. `build=False` only checks that it could be.
    Returns the image and whether it was built again."""
    if row.image and backend.image_exists(row.image):
        return row.image, False
    train_py = RunDir(run_dir / row.id).train_py
    intact = train_py.is_file() and hashlib.sha256(train_py.read_bytes()).hexdigest() == row.train_sha256
    if row.recipe and intact and backend.recipe() == row.recipe:
        return (backend.build_image(train_py.read_text(), row.id) if build else row.image), True
    why = ("this machine builds from other inputs" if row.recipe and intact else
           "its train.py is missing or changed" if row.recipe else "no recipe was recorded to build it again")
    raise RerunRefused(f"the image of {row.id} ({row.image or 'none recorded'}) is not on this machine and cannot "
                       f"be rebuilt exactly ({why}); a night removes the images of discarded experiments unless "
                       "it runs with --keep-images.")


def _plan(ledger: Ledger, run_dir: Path, row: Experiment, exact: bool,
          inventory: Callable[[], list[gpu_inventory.Gpu]], seed: int | None) -> _RerunPlan:
    """Check what needs no sandbox: a finished run, the same data, the recorded trace, a GPU."""
    if row.status != Status.DONE:
        raise RerunRefused(f"{row.id} {outcome_phrase(row)}, so there is no val_bpb to reproduce.")
    night = next((n for n in ledger.nights() if n.id == row.night_id), None)
    settings = night.settings if night else {}
    data_dir = Path(settings.get("data_dir", ""))
    _check_data(row, data_dir)
    budget, schedule = settings.get("time_budget"), None
    if exact:
        try:
            trace = read_trace(RunDir(run_dir / row.id).trace)
        except contract.TraceError as error:
            raise RerunRefused(f"--exact needs the recorded budget trace {RunDir(run_dir / row.id).trace}, which is not "
                               f"a trace the harness writes ({error}).") from None
        budget = trace.time_budget if budget is None else budget  # the night's own figure wins over train.py's
        schedule = contract.replay_schedule(trace)
    if budget is None:
        raise RerunRefused(f"the night of {row.id} recorded no time budget; rerun it with --exact.")
    allowance = night.allowance if night else None
    return _RerunPlan(row, settings, data_dir, _gpu(row, inventory), schedule, float(budget),
                      row.seed if seed is None else seed, Allowance(**allowance) if allowance else None)


def _check_data(row: Experiment, data_dir: Path) -> None:
    if read_manifest(data_dir) is None:
        raise RerunRefused(f"the data of {row.id} is gone: {data_dir / 'manifest.json'} is missing or unreadable; "
                           "prepare the same source again.")
    try:
        current = verify_manifest(data_dir)
    except PrepareError as error:
        raise RerunRefused(f"the data of {row.id} is damaged ({error}); prepare the same source again.") from None
    if current != row.data_hash:
        raise RerunRefused(f"the data in {data_dir} changed since {row.id} ran (manifest {current[:12]}, "
                           f"recorded {str(row.data_hash)[:12]}); a rerun would not be comparable.")


def _gpu(row: Experiment, inventory: Callable[[], list[gpu_inventory.Gpu]]) -> gpu_inventory.Gpu | None:
    """The recorded GPU when this host has it, else the first one; None for a CPU experiment."""
    if not row.gpu_uuid:
        return None
    found = inventory()
    if not found:
        raise RerunRefused(f"{row.id} ran on a GPU ({row.gpu_name}) and this host has none.")
    return next((g for g in found if g.uuid == row.gpu_uuid), found[0])


def _add_row(ledger: Ledger, run_dir: Path, plan: _RerunPlan, exact: bool, backend: Backend, image: str) -> Experiment:
    row, gpu = plan.row, plan.gpu
    on_seed = f" on seed {plan.seed}" if plan.seed != row.seed else ""
    new = ledger.add(
        kind=RERUN, status=Status.BUILT, night_id=row.night_id, target_id=row.id, parent_id=row.parent_id,
        description=f"rerun {'--exact ' if exact else ''}of {row.id}{on_seed}", diff=row.diff,
        train_sha256=row.train_sha256, params_json=row.params_json, image=image, seed=plan.seed,
        recipe=row.recipe, backend=backend.name, isolation=backend.isolation, data_hash=row.data_hash,
        gpu_uuid=gpu.uuid if gpu else None, gpu_name=gpu.name if gpu else None, gpu_driver=gpu.driver if gpu else None,
    )
    directory = run_dir / new.id
    directory.mkdir(parents=True, exist_ok=True)
    recorded = RunDir(run_dir / row.id).train_py
    if recorded.is_file():
        shutil.copyfile(recorded, RunDir(directory).train_py)
    return new


def _run(ledger: Ledger, backend: Backend, plan: _RerunPlan, rerun_row: Experiment,
         directory: Path, image: str) -> ExperimentOutcome:
    spec = plan.run_plan(rerun_row.id).spec(image, plan.data_dir, directory, plan.gpu)
    try:
        outcome = run_experiment(backend, spec, on_phase=lambda phase: ledger.transition(rerun_row.id, phase))
    except BaseException as exc:  # Ctrl-C or a broken backend: never leave work owed to a resumed night
        _end(ledger, rerun_row.id, Status.CANCELLED if isinstance(exc, KeyboardInterrupt) else Status.CRASH, str(exc))
        raise
    ledger.transition(rerun_row.id, outcome.status, **outcome_fields(outcome))
    return outcome


def _end(ledger: Ledger, exp_id: str, status: str, error: str) -> None:
    try:
        if ledger.get(exp_id).status == Status.BUILT:
            ledger.transition(exp_id, Status.TRAINING)
        ledger.transition(exp_id, status, error=error or status)
    except LedgerError:  # it had ended already
        pass


def _verdict(ledger: Ledger, run_dir: Path, plan: _RerunPlan, rerun_id: str, outcome: ExperimentOutcome, exact: bool,
             backend: Backend) -> Verdict:
    original_dir, repeated_dir = run_dir / plan.row.id, run_dir / rerun_id
    sigmas = [n.sigma for n in ledger.nights() if n.id == plan.row.night_id]
    verdict = Verdict(
        exp_id=plan.row.id, rerun_id=rerun_id, exact=exact, status=outcome.status,
        original=plan.row.val_bpb_hex, repeated=outcome.result.get("val_bpb_hex"),
        original_value=plan.row.val_bpb, repeated_value=outcome.val_bpb,
        original_weights=_sha256(RunDir(original_dir).model), repeated_weights=_sha256(RunDir(repeated_dir).model),
        sigma=sigmas[0] if sigmas else None,
    )
    if not exact or verdict.identical:
        return verdict
    reasons = tuple(_reasons(plan, verdict, backend, original_dir, repeated_dir))
    return replace(verdict, reasons=reasons)


def _reasons(plan: _RerunPlan, verdict: Verdict, backend: Backend, original_dir: Path, repeated_dir: Path) -> list[str]:
    """What differs between the two runs, as far as the records show."""
    row, gpu = plan.row, plan.gpu
    reasons = []
    if verdict.original is None:
        reasons.append("the original's record has no exact val_bpb (val_bpb_hex) to compare bit for bit")
    if plan.settings.get("deterministic") is False:
        reasons.append("the original night did not run deterministically")
    if gpu and (gpu.name, gpu.driver) != (row.gpu_name, row.gpu_driver):
        reasons.append(f"other GPU or driver: {row.gpu_name} / {row.gpu_driver} then, {gpu.name} / {gpu.driver} now")
    if row.isolation and backend.isolation != row.isolation:
        reasons.append(f"other sandbox: {row.isolation} then, {backend.isolation} now")
    steps = [_steps(RunDir(d).trace) for d in (original_dir, repeated_dir)]
    if None not in steps and steps[0] != steps[1]:
        reasons.append(f"the step count differs ({steps[0]} then, {steps[1]} now): train.py does not follow the budget")
    if verdict.original_weights and verdict.original_weights == verdict.repeated_weights:
        reasons.append("the exported weights are identical, so the evaluation itself differed")
    if not reasons:
        reasons.append("same image, data, seed, schedule and hardware: train.py itself is not deterministic "
                       "(e.g. it seeds from the clock or os.urandom, or uses nondeterministic kernels)")
    return reasons


def _steps(path: Path) -> int | None:
    try:
        return read_trace(path).num_steps
    except contract.TraceError:
        return None


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(verdict: Verdict) -> str:
    if verdict.status != Status.DONE:
        return f"ended in {verdict.status}"
    if not verdict.exact:
        return "timed" if verdict.difference is None else f"timed, {verdict.difference:+.3g}"
    return "bit-identical" if verdict.identical else "not reproducible"
