"""`rerun`: refusals, verdicts and the ledger record on the fake sandbox, then the bit-for-bit
proof on a real CPU experiment through the real sandbox."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dataprep.build import write_manifest
from runner.core.gpus import Gpu
from runner.core.ledger import RERUN, Ledger
from runner.core.settings import Settings
from runner.morning import rerun as reruns
from runner.night.loop import Dataset, Night
from tests.doubles import OneProposal, change, real_project
from tests.recorded_night import NOISE, cli, invoke, one_line_error, record_night, rows_of

ROOT = Path(__file__).resolve().parent.parent


def next_id(night) -> str:
    return f"e{len(rows_of(night)) + 1:04d}"


def test_exact_rerun_of_a_deterministic_experiment_is_bit_identical(night, sandbox):
    best, rerun_id = night.ids["best"], next_id(night)
    result = invoke(night.runs, "rerun", best, "--exact", "--json")
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["identical"] is True and verdict["rerun_id"] == rerun_id
    assert verdict["original"] == verdict["repeated"] == (0.7).hex()
    assert verdict["original_weights"] == verdict["repeated_weights"] is not None
    assert "BIT-IDENTICAL" in verdict["line"]

    spec = sandbox.specs[-2]  # phase 1 of the rerun
    original = json.loads((night.run_dir / best / "out" / "trace.json").read_text())
    assert spec.env["AR_DETERMINISTIC"] == "1" and spec.env["AR_REPLAY"] == "/out/replay_schedule.json"
    schedule = json.loads((night.run_dir / rerun_id / "out" / "replay_schedule.json").read_text())
    assert schedule == {"num_steps": original["num_steps"], "progress": original["progress"]}  # and nothing else
    assert spec.env["AR_TIME_BUDGET"] == repr(original["time_budget"]) and "AR_SEED" not in spec.env
    rows = {r.id: r for r in rows_of(night)}
    row = rows[rerun_id]
    assert (row.kind, row.target_id, row.status, row.val_bpb, row.seed) == (RERUN, best, "done", 0.7, None)
    assert row.description == f"rerun --exact of {best}: bit-identical"
    assert row.image == rows[best].image and row.data_hash == night.data_hash
    # a rerun is morning work: the night's figures do not count it
    assert json.loads(invoke(night.runs, "status", "--json").output)["counts"]["kept"] == 2


def test_the_recorded_seed_is_used(night, sandbox):
    result = invoke(night.runs, "rerun", "e0002", "--exact")
    assert "BIT-IDENTICAL" in result.output and sandbox.specs[-1].env["AR_SEED"] == "1"


def test_a_nondeterministic_experiment_is_reported_not_reproducible(night, sandbox):
    noisy, rerun_id = night.ids["noisy"], next_id(night)
    result = invoke(night.runs, "rerun", noisy, "--exact")
    assert result.exit_code == 0, result.output  # a finding about the experiment, not a failure of the tool
    line = result.stdout.strip()
    assert line.startswith(f"{noisy} (rerun {rerun_id}): NOT REPRODUCIBLE: val_bpb ")
    assert "train.py itself is not deterministic" in line
    assert rows_of(night)[-1].description == f"rerun --exact of {noisy}: not reproducible"


def test_a_timed_rerun_measures_noise_without_replay(night, sandbox):
    best, rerun_id = night.ids["best"], next_id(night)
    verdict = json.loads(invoke(night.runs, "rerun", best, "--json").stdout)
    assert "AR_REPLAY" not in sandbox.specs[-2].env
    assert (verdict["exact"], verdict["difference"], verdict["sigma"]) == (False, 0.0, pytest.approx(NOISE.sigma))
    assert verdict["line"] == f"{best} (rerun {rerun_id}): timed rerun, val_bpb 0.700000 -> 0.700000 (+0, 0.00 sigma)."


def test_a_timed_rerun_on_another_seed_is_recorded_with_it(night, sandbox):
    ledger = Ledger(night.run_dir / "ledger.sqlite")
    try:
        verdict = reruns.rerun(ledger, night.run_dir, night.ids["best"], exact=False, seed=1001, backend=sandbox)
        row = ledger.get(verdict.rerun_id)
        with pytest.raises(reruns.RerunRefused, match="an exact rerun replays the recorded seed"):
            reruns.rerun(ledger, night.run_dir, night.ids["best"], exact=True, seed=1001, backend=sandbox)
    finally:
        ledger.close()
    assert sandbox.specs[-1].env["AR_SEED"] == "1001" and row.seed == 1001
    assert row.description.startswith(f"rerun of {night.ids['best']} on seed 1001: timed")
    assert verdict.repeated_value == pytest.approx(0.701)  # the seed's own noise


def rebuilt_data(night):
    """The data prepared again, differently: a consistent manifest with another hash."""
    (night.data / "train" / "tokens.bin").write_bytes(b"other tokens")
    night.new = write_manifest(night.data, "stand-in", 0, {})["hash"][:12]


def remove_image(night, backend, name):
    backend.remove_image(next(r.image for r in rows_of(night) if r.id == night.ids[name]))


def _add_to_trace(path: Path, **extra) -> None:
    """What a train.py that stores its weights in its trace for a rerun would leave."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))


def _link_trace(path: Path) -> None:
    """A trace that is a link (to a file of the host, or one another run wrote) is not read."""
    target = path.with_name("elsewhere.json")
    path.rename(target)
    path.symlink_to(target)


@pytest.mark.parametrize("damage, exp, message", [
    (lambda n, b: (remove_image(n, b, "best"), setattr(b, "recipe", lambda: "another-recipe")), "best",
     "is not on this machine and cannot be rebuilt exactly (this machine builds from other inputs)"),
    (lambda n, b: (remove_image(n, b, "best"), (n.run_dir / n.ids["best"] / "train.py").write_text("# edited\n")),
     "best", "cannot be rebuilt exactly (its train.py is missing or changed)"),
    (lambda n, b: rebuilt_data(n), "best", "the data in {data} changed since {best} ran (manifest {new}, recorded {old})"),
    (lambda n, b: (n.data / "val" / "tokens.bin").write_bytes(b"tampered"), "best",
     "the data of {best} is damaged ({data}/val/tokens.bin does not match the hash in its manifest)"),
    (lambda n, b: (n.data / "manifest.json").unlink(), "best", "the data of {best} is gone"),
    (lambda n, b: (n.run_dir / n.ids["best"] / "out" / "trace.json").unlink(), "best", "--exact needs the recorded budget trace"),
    (lambda n, b: _add_to_trace(n.run_dir / n.ids["best"] / "out" / "trace.json", stash="AAAA"), "best",
     "not a trace the harness writes"),
    (lambda n, b: _link_trace(n.run_dir / n.ids["best"] / "out" / "trace.json"), "best",
     "not a trace the harness writes"),
    (lambda n, b: None, "crash", "{crash} crashed, so there is no val_bpb to reproduce"),
    (lambda n, b: None, "e0099", "no experiment e0099"),
])
def test_refusals_are_one_line_and_run_nothing(night, sandbox, damage, exp, message):
    damage(night, sandbox)
    runs_before, rows_before = len(sandbox.runs), len(rows_of(night))
    error = one_line_error(invoke(night.runs, "rerun", night.ids.get(exp, exp), "--exact"))
    assert message.format(**night.ids, data=night.data, old=night.data_hash[:12], new=getattr(night, "new", "")) in error
    assert (len(sandbox.runs), len(rows_of(night))) == (runs_before, rows_before)


def test_an_image_gone_from_this_machine_is_built_again_from_its_recipe(night, sandbox):
    """A pruned image, or one that ran on a cluster node: the same recipe and train.py make the same image."""
    best = night.ids["best"]
    remove_image(night, sandbox, "best")
    result = invoke(night.runs, "rerun", best, "--exact")
    assert "rebuilt here from its recipe and train.py" in result.output and "BIT-IDENTICAL" in result.output
    assert rows_of(night)[-1].recipe == "fake-recipe"


def test_gpu_reruns_name_the_hardware(project):
    recorded = record_night(project, script=(change(LR=0.2, BEHAVIOUR="noisy"),),
                            gpus=[Gpu(0, "GPU-a", "Fake H100", "580.1")])
    (exp,) = recorded.experiments
    ledger = Ledger(recorded.run_dir / "ledger.sqlite")
    try:
        with pytest.raises(reruns.RerunRefused, match=r"ran on a GPU \(Fake H100\) and this host has none"):
            reruns.rerun(ledger, recorded.run_dir, exp, exact=True, backend=recorded.backend, inventory=list)
        other = [Gpu(0, "GPU-b", "Fake H200", "590.2")]
        verdict = reruns.rerun(ledger, recorded.run_dir, exp, exact=True, backend=recorded.backend,
                               inventory=lambda: other)
    finally:
        ledger.close()
    assert not verdict.identical
    assert "other GPU or driver: Fake H100 / 580.1 then, Fake H200 / 590.2 now" in verdict.reasons
    assert recorded.backend.specs[-1].gpu_uuid == "GPU-b"


# -- the proof on a real experiment -------------------------------------------------------------------

BUDGET_S = 5.0
# A learning rate drawn from os.urandom: every run trains another model.
UNSEEDED_LR = 'MATRIX_LR = 0.04 * (1 + int.from_bytes(__import__("os").urandom(2), "little") / 2**18)  # Muon'


@pytest.mark.slow
@pytest.mark.parametrize("sandbox_name", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_bit_for_bit_rerun_of_a_real_cpu_experiment(sandbox_name, tiny_data, tmp_path, request, monkeypatch):
    backend, root = real_project(sandbox_name, request, tmp_path, (ROOT / "train.py").read_text())
    unseeded = OneProposal("learning rate from os.urandom",
                           lambda text: re.sub(r"^MATRIX_LR = .*$", UNSEEDED_LR, text, count=1, flags=re.MULTILINE))
    # --keep-images: the experiment is rerun below, discarded or not
    settings = Settings(root=root, runs_dir=tmp_path / "runs", tag="real", budget=BUDGET_S, baseline_runs=2,
                        max_experiments=1, max_diff_retries=1, prune_images=False)
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    manifest = json.loads((tiny_data / "manifest.json").read_text())["hash"]
    Night(settings, ledger=ledger, backend=backend, agent=unseeded, gpus=[], data=Dataset(tiny_data, manifest)).run()
    rows = ledger.experiments()
    ledger.close()
    # baselines first (a disturbed one is run again), then the experiment and any confirmations of it
    exp = next(r for r in rows if r.kind == "experiment")
    assert (rows[0].id, rows[0].kind, rows[0].status, exp.status) == ("e0001", "baseline", "done", "done")
    after = f"e{len(rows) + 2:04d}"  # the second rerun's id

    monkeypatch.setattr(reruns, "open_backend", lambda name: backend)  # the instance that is ready
    runner = CliRunner()
    same = runner.invoke(cli(), ["rerun", "e0001", "--exact", "--json", "--runs-dir", str(tmp_path / "runs")])
    assert same.exit_code == 0, same.output
    verdict = json.loads(same.stdout)
    assert verdict["identical"] is True, verdict["line"]
    assert verdict["original"] == verdict["repeated"] and verdict["original"].startswith("0x1.")
    assert verdict["original_weights"] == verdict["repeated_weights"] is not None

    other = runner.invoke(cli(), ["rerun", exp.id, "--exact", "--runs-dir", str(tmp_path / "runs")])
    assert other.exit_code == 0, other.output
    assert f"{exp.id} (rerun {after}): NOT REPRODUCIBLE" in other.stdout
    assert "train.py itself is not deterministic" in other.stdout
