"""Test doubles shared by the night and morning tests: a fake sandbox, a scripted agent, a night built on them.

The fake backend reads the constants of the train.py baked into its "image":
`LR` sets the score (val_bpb = 1 - LR), `BEHAVIOUR` makes phase 1 crash or hang,
`LUCK` lowers the score only under the harness's default seed, so a confirmation
run under another seed exposes it; `SLOW` names a seed whose first run trains half the
steps (a disturbed run). Every seed adds the same small noise to every code
(SEED_NOISE), so repeated runs measure a sigma of about 0.001 and codes run on the same
seed stay coupled; `RESEED = k` draws the noise of the seed k further on instead (a new
initialisation: runs no longer coupled to the best's on the same seed).

`RealisticBackend` extends it to write what the real sandbox writes (a train.log of
steps, the budget trace, an "exported model", a phase-2 log ending in the result line),
for the morning commands.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import json
import random
import re
import shutil
import threading
from pathlib import Path

import contract
from runner.agents.base import AgentError, Proposal, Usage
from runner.agents.prompt import ReplyFormatError
from runner.core.ledger import Ledger
from runner.core.settings import Settings
from runner.night.loop import Dataset, Night
from sandbox.spec import Killer, Phase, RunResult
from sandbox.status import Status
from tests.corpus import stand_in_data

ROOT = Path(__file__).resolve().parent.parent

BASE_TRAIN_PY = ('"""A stand-in train.py: its constants steer the fake sandbox."""\nLR = 0.1\nBEHAVIOUR = "train"\n'
                 'LUCK = 0.0\nSLOW = None\nRESEED = None\n')


class _SeedNoise(dict):
    """The noise each harness seed adds (as AR_SEED; None is the default seed), for any seed."""

    def __missing__(self, seed: str) -> float:
        return (0.0, 0.001, -0.001, 0.0005)[int(seed) % 4]


SEED_NOISE = _SeedNoise({None: 0.0})


def fake_result_line(nonce: str, val_bpb: float) -> str:
    """What the harness's phase 2 prints, for a stand-in evaluation."""
    return contract.result_line(nonce, {"val_bpb_hex": val_bpb.hex(), "eval_tokens": 1024, "eval_bytes": 4096,
                                        "num_params": 1000, "probe_seed": "0" * 16, "probe_rows": 12,
                                        "probe_max_change": 0.0})


class SimulatedKill(BaseException):
    """Stands for `kill -9` of the runner: nothing after it runs, nothing catches it."""


class FakeBackend:
    name = "fake"
    isolation = "fake (none)"

    def __init__(self, fail_gpus=(), kill_at=None, on_hang=None, on_build=None):
        self.fail_gpus = set(fail_gpus)
        self.kill_at = kill_at  # (exp_id, Phase): die there, like a killed runner
        self.on_hang = on_hang
        self.on_build = on_build  # called with the exp_id of every build, before it is recorded
        self.images: dict[str, str] = {}
        self.slowed: set[tuple[str, str | None]] = set()  # (image, seed) whose run was disturbed once
        self.drift: tuple[int, float] | None = None  # (evaluations, d): every later one scores d lower
        self.evaluations = 0
        self.runs: list[tuple[str, Phase, str | None]] = []
        self.builds: list[str] = []
        self._active: collections.Counter[str] = collections.Counter()
        self.max_active: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def ensure_ready(self):
        pass

    def recipe(self):
        return "fake-recipe"

    def reap(self):
        return 0

    def build_image(self, train_py, exp_id):
        image = "img-" + hashlib.sha256(train_py.encode()).hexdigest()[:12]
        self.images[image] = train_py
        self.builds.append(exp_id)
        if self.on_build is not None:
            self.on_build(exp_id)
        return image

    def image_exists(self, image):
        return image in self.images

    def remove_image(self, image):
        self.images.pop(image, None)

    def run(self, spec, cancel=None):
        exp_id, gpu = spec.labels["autoresearch.exp"], spec.gpu_uuid or "cpu"
        with self._lock:
            self.runs.append((exp_id, spec.phase, spec.gpu_uuid))
            self._active[gpu] += 1
            self.max_active[gpu] = max(self.max_active[gpu], self._active[gpu])
        try:
            if (exp_id, spec.phase) == self.kill_at:
                raise SimulatedKill()
            if spec.gpu_uuid in self.fail_gpus:
                raise RuntimeError("the GPU has fallen off the bus")
            return self._behave(spec, cancel)
        finally:
            with self._lock:
                self._active[gpu] -= 1

    def _behave(self, spec, cancel):
        constants: dict = {}
        exec(self.images[spec.image], constants)  # the test's own stand-in file
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.phase is Phase.TRAIN:
            if constants["BEHAVIOUR"] == "crash":
                text = "step 1\nTraceback (most recent call last):\nRuntimeError: boom\n"
                spec.log_path.write_text(text)
                return self._result(spec, Status.CRASH, 1, log_tail=text)
            if constants["BEHAVIOUR"] == "hang":
                self.on_hang()
                assert cancel.wait(30), "the runner never cancelled the hanging run"
                return self._result(spec, Status.CANCELLED, 137, killed_by=Killer.CANCEL)
            spec.log_path.write_text("step 1\n")
            (spec.out_dir / "model.pt2").write_text("model")
            seed = spec.env.get("AR_SEED")
            slow = constants["SLOW"] is not None and constants["SLOW"] == seed and (spec.image, seed) not in self.slowed
            if slow:
                self.slowed.add((spec.image, seed))
            (spec.out_dir / "summary.json").write_text(json.dumps({"peak_vram_mb": 512.0, "num_steps": 5 if slow else 10}))
            return self._result(spec, Status.OK, 0)
        seed = spec.env.get("AR_SEED")
        drawn = seed if constants.get("RESEED") is None else str(int(seed or 0) + constants["RESEED"])
        value = 1.0 - constants["LR"] - (constants["LUCK"] if seed is None else 0.0) + SEED_NOISE[drawn]
        with self._lock:
            self.evaluations += 1
            if self.drift and self.evaluations > self.drift[0]:
                value -= self.drift[1]
        spec.log_path.write_text(f"evaluating\n{fake_result_line(spec.env[contract.RESULT_NONCE_ENV], value)}\n")
        return self._result(spec, Status.OK, 0)

    @staticmethod
    def _result(spec, status, code, killed_by=Killer.NONE, log_tail=""):
        return RunResult(status, code, killed_by, 0.01, spec.log_path, isolation="fake (none)", log_tail=log_tail)


def change(**constants):
    """A scripted step: set constants in whatever train.py the agent is shown."""

    def step(context):
        new = context.train_py
        for name, value in constants.items():
            new = re.sub(rf"^{name} = .*$", f"{name} = {value!r}", new, count=1, flags=re.MULTILINE)
        lines = difflib.unified_diff(context.train_py.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py")
        return Proposal(f"set {constants}", "".join(lines), Usage(input_tokens=10, cost_usd=0.5))

    return step


def garbage(context):
    return Proposal("not a diff", "this is not a diff\n", Usage(input_tokens=10))


def agent_error(context):
    raise AgentError("the model is overloaded")


def no_diff(context):
    raise ReplyFormatError("the reply contains no unified diff of train.py", description="think harder",
                           usage=Usage(input_tokens=10, output_tokens=5))


class ScriptedAgent:
    name = "scripted"

    def __init__(self, *steps):
        self.steps = list(steps)
        self.contexts = []

    def propose(self, context):
        self.contexts.append(context)
        if not self.steps:
            raise AgentError("the script is over")
        return self.steps.pop(0)(context)


def make_night(project, agent, backend, gpus=(), **overrides):
    settings = Settings(root=project, runs_dir=project.parent / "runs", tag="t", budget=1.0,
                        **{"max_experiments": 1, **overrides})
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    data = project.parent / "data"
    night = Night(settings, ledger=ledger, backend=backend, agent=agent, gpus=list(gpus),
                  data=Dataset(data, stand_in_data(data)))
    return night, ledger



TRAINING_SECONDS = 1.0


class RealisticBackend(FakeBackend):
    """BEHAVIOUR: "train" (deterministic), "noisy" (another model and val_bpb every run), "crash",
    "timeout", "no_export" (phase 1 writes no model), "probe" (phase 2 finds the model looks ahead).
    SLOW, as in the loop's fake: the first run under that seed trains half the steps (disturbed)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.specs = []

    def _behave(self, spec, cancel):
        self.specs.append(spec)
        constants: dict = {}
        exec(self.images[spec.image], constants)
        behaviour = constants["BEHAVIOUR"]
        if behaviour == "hang":
            return super()._behave(spec, cancel)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.phase is Phase.TRAIN:
            return self._train(spec, behaviour, constants["SLOW"])
        return self._evaluate(spec, constants)

    def _train(self, spec, behaviour, slow_seed):
        out = spec.out_dir
        replay = out / "replay_schedule.json"
        steps = json.loads(replay.read_text())["num_steps"] if replay.exists() else 20
        if behaviour == "noisy" and not replay.exists():
            steps += random.randint(0, 3)
        seed = spec.env.get("AR_SEED")
        if slow_seed is not None and seed == slow_seed and (spec.image, seed) not in self.slowed:
            self.slowed.add((spec.image, seed))
            steps //= 2
        lines = [f"step {n:05d} | loss {6.0 - n * 0.1:.4f} | lr 0.04" for n in range(1, steps + 1)]
        if behaviour == "crash":
            text = "\n".join(lines[:3] + ["Traceback (most recent call last):", '  File "/app/train.py", line 80',
                                          "RuntimeError: shape mismatch in attention"]) + "\n"
            spec.log_path.write_text(text)
            return self._result(spec, Status.CRASH, 1, log_tail=text)
        if behaviour == "timeout":
            spec.log_path.write_text("\n".join(lines) + "\n[runner] deadline reached, killed\n")
            return self._result(spec, Status.TIMEOUT, 137, killed_by=Killer.DEADLINE, log_tail=lines[-1])
        spec.log_path.write_text("\n".join(lines) + "\nexported model to /out/model.pt2 in 0.1s\n")
        timed = min(16, steps - 3)  # 16 timed steps, fewer for a disturbed run
        trace = {"time_budget": float(spec.env["AR_TIME_BUDGET"]), "warmup_steps": 3, "num_steps": steps,
                 "progress": [n * 100 // steps / 100 for n in range(steps)],
                 "step_seconds": [0.0] * 3 + [TRAINING_SECONDS / timed] * timed + [0.0] * (steps - 3 - timed)}
        (out / "trace.json").write_text(json.dumps(trace))
        (out / "summary.json").write_text(json.dumps({"training_seconds": TRAINING_SECONDS, "num_steps": steps,
                                                      "mfu_percent": 0.0, "total_tokens_M": 0.04, "depth": 2}))
        if behaviour != "no_export":
            weights = self.images[spec.image] + spec.env.get("AR_SEED", "") + str(steps)
            if behaviour == "noisy":
                weights += str(random.random())
            (out / "model.pt2").write_bytes(hashlib.sha256(weights.encode()).digest() * 64)
        return self._result(spec, Status.OK, 0)

    def _evaluate(self, spec, constants):
        if constants["BEHAVIOUR"] == "probe":
            text = "error: causality probe failed: changing tokens after position 0 changed earlier logits\n"
            spec.log_path.write_text(text)
            return self._result(spec, Status.CRASH, 4, log_tail=text)
        seed = spec.env.get("AR_SEED")
        value = 1.0 - constants["LR"] - (constants["LUCK"] if seed is None else 0.0) + SEED_NOISE[seed]
        if constants["BEHAVIOUR"] == "noisy":
            value += random.uniform(-0.01, 0.01)
        line = fake_result_line(spec.env[contract.RESULT_NONCE_ENV], value)
        spec.log_path.write_text(f"loading the exported model\nevaluating 32768 tokens\n{line}\n")
        return self._result(spec, Status.OK, 0)


class OneProposal:
    name = "scripted"

    def __init__(self, description: str, edit) -> None:
        self.proposal = (description, edit)

    def propose(self, context):
        description, edit = self.proposal
        new = edit(context.train_py)
        diff = "".join(difflib.unified_diff(context.train_py.splitlines(True), new.splitlines(True),
                                            "a/train.py", "b/train.py"))
        return Proposal(description, diff)


def real_project(sandbox_name: str, request, tmp_path: Path, train_py: str):
    """A real backend, ready, and a project directory holding `train_py` beside the real harness."""
    if sandbox_name == "docker":
        request.getfixturevalue("docker_client")  # skips without an engine (fails under AR_REQUIRE_DOCKER)
    from sandbox.backends import get_backend

    backend = get_backend(sandbox_name)
    backend.ensure_ready()
    root = tmp_path / "project"
    root.mkdir()
    for name in ("prepare.py", "program.md"):
        shutil.copyfile(ROOT / name, root / name)
    (root / "train.py").write_text(train_py)
    return backend, root
