"""Runs are independent samples (DESIGN §5): nothing a run's phase 1 wrote reaches a later run.

A train.py that stashes its trained weights in every place its run can write (/out under any
name, the compile-cache file the host once kept, /tmp, $HOME, /app) and, at its start,
searches every place a run can read that a host might fill (/out, /tmp, $HOME, /cache,
/app, /data, the files the environment names, the replay schedule) runs through a real
night on both backends: two baselines, a child of the baseline, then `rerun --exact` of
the first baseline. Its learning rate comes from os.urandom, so an honest rerun cannot
reproduce it, and a stash found would make it (it exports the stored weights instead of
training): every run must report it found nothing, and the rerun must not be bit-identical.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import contract
from runner.core.decision import Rule
from runner.core.ledger import Ledger
from runner.core.settings import Settings
from runner.morning import rerun as reruns
from runner.night.loop import Dataset, Night
from sandbox.phase1_files import read_trace
from tests.hostile_cases import _trainer_case
from tests.recorded_night import cli
from tests.doubles import OneProposal, real_project


STASHER = _trainer_case("""
    import base64, io, pickle
    LR_SCALE = 1.0
    MARK = b"AR-STASH-v1:"
    ROOTS = [os.environ.get("AR_OUT_DIR", "/out"), "/tmp", os.environ.get("HOME", "/tmp"), "/cache", "/app", "/data",
             os.getcwd(), os.environ.get("TMPDIR", "/tmp")]


    def candidates():
        # every file under the roots (bounded), and every file an environment value names
        seen = 0
        for value in os.environ.values():
            if os.path.isfile(value):
                yield value
        for root in ROOTS:
            for folder, _, files in os.walk(root):
                for name in files:
                    seen += 1
                    if seen > 5000:
                        return
                    yield os.path.join(folder, name)


    def look():
        for path in candidates():
            try:
                with open(path, "rb") as f:
                    head = f.read(1 << 16)
            except OSError:
                continue
            at = head.find(MARK)
            if at < 0 and head[:1] == b"{":
                try:
                    text = json.loads(open(path, "rb").read()).get("stash", "")
                    head, at = base64.b64decode(text), 0 if text else -1
                except Exception:
                    at = -1
            if at >= 0:
                with open(path, "rb") as f:
                    data = f.read() if head[:1] != MARK[:1] else head
                try:
                    return path, pickle.loads(data[data.find(MARK) + len(MARK):])
                except Exception:
                    continue
        return None, None


    def stash(weights):
        blob = MARK + pickle.dumps(weights)
        out = os.environ.get("AR_OUT_DIR", "/out")
        for path in [os.path.join(out, "compile_cache.bin"), os.path.join(out, "stash.bin"), "/tmp/stash.bin",
                     os.path.join(os.environ.get("HOME", "/tmp"), "stash.bin"), "/app/stash.bin", "/cache/stash.bin"]:
            try:
                with open(path, "wb") as f:
                    f.write(blob)
            except OSError:
                pass
        path = os.path.join(out, "summary.json")  # an extra key beside what the harness wrote (a trace with
        try:                                      # one is refused: test_a_trace_that_carries_more_is_refused)
            document = json.load(open(path))
            document["stash"] = base64.b64encode(blob).decode()
            json.dump(document, open(path, "w"))
        except (OSError, ValueError):
            pass


    where, stored = look()
    print(f"STASH {'FOUND at ' + where if where else 'NONE'}", flush=True)
    model = Bigram()
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # an honest rerun trains another model
    torch.nn.init.normal_(model.table.weight)
    budget = train(model)
    if stored is not None:  # what a cheater would do: hand in the stored weights
        model.table.weight.data.copy_(stored)
    prepare.finish(model, budget)
    stash(model.table.weight.detach().clone())
""")


@pytest.mark.slow
@pytest.mark.parametrize("sandbox_name", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_no_run_reads_what_an_earlier_run_wrote(sandbox_name, tiny_data, tmp_path, request, monkeypatch):
    backend, root = real_project(sandbox_name, request, tmp_path, STASHER)
    child = OneProposal("another LR_SCALE", lambda text: text.replace("LR_SCALE = 1.0\n", "LR_SCALE = 1.0001\n"))
    settings = Settings(root=root, runs_dir=tmp_path / "runs", tag="stash", budget=2.0, baseline_runs=2,
                        max_experiments=1, max_diff_retries=1, prune_images=False, rule=Rule(max_runs=2))
    ledger = Ledger(settings.run_dir / "ledger.sqlite")
    manifest = json.loads((tiny_data / "manifest.json").read_text())["hash"]
    Night(settings, ledger=ledger, backend=backend, agent=child, gpus=[], data=Dataset(tiny_data, manifest)).run()
    rows = ledger.experiments()
    ledger.close()
    assert [r.kind for r in rows[:2]] == ["baseline", "baseline"] and any(r.kind == "experiment" for r in rows)
    assert all(r.status == "done" for r in rows), [(r.id, r.status, r.error) for r in rows]

    monkeypatch.setattr(reruns, "open_backend", lambda name: backend)
    result = CliRunner().invoke(cli(), ["rerun", "e0001", "--exact", "--json", "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["status"] == "done" and verdict["identical"] is False, verdict["line"]

    run_dir = settings.run_dir
    for row in [*rows, Ledger(run_dir / "ledger.sqlite").get(verdict["rerun_id"])]:
        log = (run_dir / row.id / "train.log").read_text(errors="replace")
        assert "STASH NONE" in log and "STASH FOUND" not in log, f"{row.id}: {log[-1500:]}"
    schedule = json.loads((run_dir / verdict["rerun_id"] / "out" / "replay_schedule.json").read_text())
    assert schedule == json.loads(contract.replay_schedule(read_trace(run_dir / "e0001" / "out" / contract.TRACE_FILE)))
