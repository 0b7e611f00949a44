"""The compile cache: which earlier run a run may start from, how the host takes a run's cache out of
its /out, that the harness really starts from it (torch.compile hits), and that a run gets it read-only
through both sandboxes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import contract
from runner.compile_cache import compile_cache_for, kept_ancestors
from runner.cluster import Node
from runner.ledger import BASELINE, CONFIRM, EXPERIMENT, REFERENCE, RERUN, Ledger
from runner.loop import Dataset, Night
from runner.pruning import prune_compile_caches
from runner.settings import Settings
from sandbox import experiment
from sandbox.experiment import ExperimentSpec, _run_spec, run_experiment, take_compile_cache
from sandbox.spec import CACHE_DIR, Limits, Phase
from sandbox.status import Status
from tests.conftest import ROOT
from tests.corpus import stand_in_data
from tests.hostile_cases import HONEST_TRAINER
from tests.test_loop import BASE_TRAIN_PY, FakeBackend, ScriptedAgent, change

MACHINE = {"backend": "process", "gpu_name": "NVIDIA H200"}


@pytest.fixture
def night(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")

    def add(kind, sha, *, parent=None, status=Status.DONE, decision=None, cache=True, **fields):
        first = Status.PROPOSED if status is Status.PROPOSED else Status.BUILT
        row = ledger.add(kind=kind, status=first, train_sha256=sha, parent_id=parent, **{**MACHINE, **fields})
        for step in {Status.DONE: [Status.TRAINING, Status.EVALUATING, Status.DONE],
                     Status.CRASH: [Status.TRAINING, Status.CRASH]}.get(status, []):
            ledger.transition(row.id, step)
        if decision:
            ledger.update(row.id, decision=decision)
        (tmp_path / row.id).mkdir()
        if cache:
            (tmp_path / row.id / contract.COMPILE_CACHE_FILE).write_bytes(row.id.encode())
        return ledger.get(row.id)

    return ledger, tmp_path, add


def start(night, row):
    ledger, run_dir, _ = night
    found = compile_cache_for(ledger, run_dir, ledger.get(row.id))
    return found and found[0]


def test_a_run_starts_from_its_own_code_then_its_nearest_kept_ancestor(night):
    ledger, _, add = night
    base = add(BASELINE, "a")
    repeat = add(BASELINE, "a", status=Status.PROPOSED, cache=False)
    assert start(night, repeat) == base.id  # baseline repeats: the same train.py
    kept = add(EXPERIMENT, "b", parent=base.id, decision="keep")
    discarded = add(EXPERIMENT, "c", parent=kept.id, decision="discard")
    child = add(EXPERIMENT, "d", parent=kept.id, status=Status.PROPOSED, cache=False)
    assert [r.id for r in kept_ancestors(ledger, child)] == [kept.id, base.id]
    assert start(night, child) == kept.id  # never the discarded sibling's, though it is newer
    grandchild = add(EXPERIMENT, "e", parent=discarded.id, status=Status.PROPOSED, cache=False)
    assert start(night, grandchild) is None  # a discarded parent is no ancestor to start from
    confirm = add(CONFIRM, "b", target_id=kept.id, status=Status.PROPOSED, cache=False)
    assert start(night, confirm) == kept.id


def test_a_rerun_starts_from_what_its_original_left_even_when_the_same_code_ran_later(night):
    _, run_dir, add = night
    original = add(EXPERIMENT, "b")
    add(CONFIRM, "b", target_id=original.id)
    rerun = add(RERUN, "b", target_id=original.id, status=Status.PROPOSED, cache=False)
    assert start(night, rerun) == original.id
    (run_dir / original.id / contract.COMPILE_CACHE_FILE).unlink()
    assert start(night, rerun) != original.id  # then the newest run of the same code


def test_no_cache_from_another_gpu_model_backend_or_an_unfinished_run(night):
    _, _, add = night
    add(BASELINE, "a", gpu_name="NVIDIA H100 80GB HBM3")
    add(BASELINE, "a", backend="docker")
    add(BASELINE, "a", status=Status.CRASH)
    assert start(night, add(BASELINE, "a", status=Status.PROPOSED, cache=False)) is None


class CachingBackend(FakeBackend):
    """The loop tests' stand-in sandbox, whose phase 1 leaves a compile cache in /out as the harness does."""

    def run(self, spec, cancel=None):
        result = super().run(spec, cancel)
        if spec.phase is Phase.TRAIN:
            (spec.out_dir / contract.COMPILE_CACHE_FILE).write_bytes(f"kernels of {spec.image}".encode())
        return result


class OneGpuNode:
    """A cluster of one node with one H200, running each job through the stand-in sandbox as a node
    does: the node learns its GPU only when the run starts there."""

    profile, model, gpu_model, sandbox, address = "gpu", "NVIDIA H200", "NVIDIA H200", "fake", "127.0.0.1:6379"

    def __init__(self, backend, data):
        self.backend, self.data = backend, data
        self.nodes = [Node("f" * 56, "node1", 1, {"num_gpus": 1})]
        self.given = {}  # exp id -> the compile cache its job carried

    def record(self):
        return {"address": self.address}

    def images(self, rows):
        return self.backend

    def run(self, node, job, run_dir, cancel, on_start, on_phase):
        self.given[job.exp_id] = job.compile_cache
        image = self.backend.build_image(job.train_py, job.exp_id)
        on_start({"backend": self.backend.name, "isolation": self.backend.isolation, "image": image,
                  "build_seconds": 0.0, "gpu": {"index": 0, "uuid": "GPU-1", "name": self.model, "driver": "580"}})
        spec = ExperimentSpec(exp_id=job.exp_id, image=image, data_dir=self.data, run_dir=run_dir,
                              time_budget=job.time_budget, gpu_uuid="GPU-1", seed=job.seed, allowance=job.allowance)
        return run_experiment(self.backend, spec, cancel, on_phase=on_phase)


def test_on_a_gpu_cluster_a_baseline_repeat_starts_from_the_first_runs_cache(tmp_path):
    (tmp_path / "train.py").write_text(BASE_TRAIN_PY)
    (tmp_path / "prepare.py").write_text('"""A stand-in harness."""\nTIME_BUDGET = 1.0\n')
    settings = Settings(root=tmp_path, runs_dir=tmp_path / "runs", tag="t", budget=1.0, max_experiments=1,
                        baseline_runs=2)
    data = tmp_path / "data"
    backend = CachingBackend()
    cluster = OneGpuNode(backend, data)
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    night = Night(settings, ledger=ledger, backend=backend, agent=ScriptedAgent(change(LR=0.2)), gpus=[],
                  data=Dataset(data, stand_in_data(data)), cluster=cluster)
    night.run()
    first, repeat = ledger.experiments(kinds=[BASELINE])
    [child] = ledger.experiments(kinds=[EXPERIMENT])
    assert [r.status for r in ledger.experiments()] == [Status.DONE] * len(ledger.experiments())
    assert {r.gpu_name for r in ledger.experiments()} == {"NVIDIA H200"}
    baseline_kernels = f"kernels of {first.image}".encode()
    assert [cluster.given[r.id] for r in (first, repeat, child)] == [None, baseline_kernels, baseline_kernels]
    assert all(cluster.given[r.id] for r in ledger.experiments() if r.id != first.id)  # confirmations too


def test_the_caches_of_discarded_and_failed_experiments_are_pruned_the_others_stay(night):
    ledger, run_dir, add = night
    base = add(BASELINE, "a")
    kept = add(EXPERIMENT, "b", parent=base.id, decision="keep")
    reference = add(REFERENCE, "a", parent=base.id, target_id=kept.id)
    discarded = add(EXPERIMENT, "c", parent=kept.id, decision="discard")
    its_confirmation = add(CONFIRM, "c", target_id=discarded.id)
    failed = add(EXPERIMENT, "d", parent=kept.id, status=Status.CRASH)
    undecided = add(EXPERIMENT, "e", parent=kept.id)
    assert sorted(prune_compile_caches(ledger.path)) == sorted([discarded.id, its_confirmation.id, failed.id])
    left = {p.parent.name for p in run_dir.glob(f"*/{contract.COMPILE_CACHE_FILE}")}
    assert left == {base.id, kept.id, reference.id, undecided.id}
    assert prune_compile_caches(ledger.path) == []


def test_phase_one_alone_is_given_the_cache_read_only(tmp_path):
    spec = ExperimentSpec(exp_id="e1", image="img", data_dir=tmp_path, run_dir=tmp_path, time_budget=1.0,
                          compile_cache=tmp_path / "e0" / contract.COMPILE_CACHE_FILE)
    train, evaluation = _run_spec(spec, Phase.TRAIN, "1", "n"), _run_spec(spec, Phase.EVAL, "1", "n")
    target = f"{CACHE_DIR}/{contract.COMPILE_CACHE_FILE}"
    assert [(m.target, m.read_only) for m in train.mounts if m.source == spec.compile_cache] == [(target, True)]
    assert train.env[contract.COMPILE_CACHE_ENV] == target
    assert contract.COMPILE_CACHE_ENV not in evaluation.env
    assert all(m.source != spec.compile_cache for m in evaluation.mounts)


# -- taking the cache out of /out ---------------------------------------------------------------


def test_a_regular_cache_moves_out_of_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / contract.COMPILE_CACHE_FILE).write_bytes(b"kernels")
    assert take_compile_cache(out, tmp_path) == tmp_path / contract.COMPILE_CACHE_FILE
    assert (tmp_path / contract.COMPILE_CACHE_FILE).read_bytes() == b"kernels"
    assert not (out / contract.COMPILE_CACHE_FILE).exists()


@pytest.mark.parametrize("plant", ["link", "fifo", "directory", "huge"])
def test_anything_but_a_bounded_regular_file_is_not_taken(tmp_path, monkeypatch, plant):
    out, host_file = tmp_path / "out", tmp_path / "host-secret"
    out.mkdir()
    host_file.write_text("secret")
    (tmp_path / contract.COMPILE_CACHE_FILE).write_text("an older run's")  # never left behind
    planted = out / contract.COMPILE_CACHE_FILE
    if plant == "link":
        planted.symlink_to(host_file)
    elif plant == "fifo":
        os.mkfifo(planted)
    elif plant == "directory":
        planted.mkdir()
    else:
        monkeypatch.setattr(experiment, "MAX_COMPILE_CACHE_BYTES", 3)
        planted.write_bytes(b"four")
    assert take_compile_cache(out, tmp_path) is None
    assert not (tmp_path / contract.COMPILE_CACHE_FILE).exists()
    assert host_file.read_text() == "secret"
    assert list(tmp_path.glob("*.partial")) == []


# -- the harness starts from the cache ------------------------------------------------------------

PROBE = """
import torch, prepare
from torch._dynamo.utils import counters
f = torch.compile(lambda x: (x.sin() * 2).sum())
assert float(f(torch.ones(4, 8))) > 0
print("fxgraph", counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
prepare.OUT_DIR.mkdir(parents=True, exist_ok=True)
prepare._save_compile_cache()
"""


def _probe(tmp_path: Path, name: str, cache: Path | None) -> str:
    env = {**os.environ, "AR_OUT_DIR": str(tmp_path / name), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"{name}-local"),
           "PYTHONPATH": str(ROOT)}
    env.pop(contract.COMPILE_CACHE_ENV, None)
    if cache is not None:
        env[contract.COMPILE_CACHE_ENV] = str(cache)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_a_second_process_compiles_nothing_from_the_first_ones_cache(tmp_path):
    """Each process has an empty local inductor cache: a hit can only come from the file."""
    assert "fxgraph 0 1" in _probe(tmp_path, "first", None)
    cache = tmp_path / "first" / contract.COMPILE_CACHE_FILE
    second = _probe(tmp_path, "second", cache)
    assert "compile cache: " in second and "fxgraph 1 0" in second
    (tmp_path / "damaged").write_bytes(b"not a cache")
    third = _probe(tmp_path, "third", tmp_path / "damaged")  # a bad cache costs a compile, not the run
    assert "compile cache not loaded" in third and "fxgraph 0 1" in third


# -- through a sandbox ------------------------------------------------------------------------------

READS_THE_CACHE = HONEST_TRAINER + textwrap.dedent("""
    path = os.environ["AR_COMPILE_CACHE"]
    print("cache holds", open(path, "rb").read().decode(), flush=True)
    try:
        open(path, "ab").write(b"poison")
        print("cache written", flush=True)
    except OSError:
        print("cache is read-only", flush=True)
""")
LEAVES_A_CACHE = HONEST_TRAINER + textwrap.dedent("""
    with open(os.path.join(os.environ["AR_OUT_DIR"], "compile_cache.bin"), "wb") as f:
        f.write(b"kernels of run one")
""")


@pytest.fixture(params=["process", "docker"])
def backend(request, tmp_path_factory):
    if request.param == "process":
        from sandbox.process_backend import ProcessBackend

        return ProcessBackend(snapshots_root=tmp_path_factory.mktemp("snapshots"))
    from sandbox.docker_backend import DockerBackend

    docker = DockerBackend(request.getfixturevalue("docker_client"))
    docker.ensure_ready()
    return docker


@pytest.mark.slow
def test_a_run_leaves_its_cache_to_the_host_and_the_next_gets_it_read_only(backend, tiny_data, tmp_path):
    outcomes = []
    for name, source, cache in (("one", LEAVES_A_CACHE, None),
                                ("two", READS_THE_CACHE, tmp_path / "one" / contract.COMPILE_CACHE_FILE)):
        image = backend.build_image(source, f"cache-{name}")
        try:
            outcomes.append(run_experiment(backend, ExperimentSpec(
                exp_id=f"cache-{name}-{tmp_path.name[-8:]}", image=image, data_dir=tiny_data, run_dir=tmp_path / name,
                time_budget=1.0, limits=Limits(), compile_cache=cache)))
        finally:
            backend.remove_image(image)
    assert [o.status for o in outcomes] == [Status.DONE, Status.DONE], [o.failure_log for o in outcomes]
    assert not (tmp_path / "one" / "out" / contract.COMPILE_CACHE_FILE).exists()  # phase 2 never sees it
    log = outcomes[1].train.log_path.read_text()
    assert "cache holds kernels of run one" in log and "cache is read-only" in log
    assert "compile cache not loaded" in log  # the harness tried: these bytes are no torch cache
    assert (tmp_path / "one" / contract.COMPILE_CACHE_FILE).read_bytes() == b"kernels of run one"
