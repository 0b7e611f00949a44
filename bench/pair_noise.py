"""The noise of a difference: each change beside the baseline on the same harness seeds.

    python3 bench/pair_noise.py --data DIR --budget 45 --seeds 0 1 2 --out pairs.json \
        --change lr:MATRIX_LR=0.05 --change head:HEAD_DIM=64 --change reinit:+=torch.rand(1) ...

A change `NAME:CONSTANT=VALUE` sets one constant; `NAME:+=LINE` inserts LINE after train.py's
import of the harness (`reinit:+=torch.rand(1)` moves the seeded generator on: the same
training with a new initialisation, an effect-free change whose runs are not coupled).

Every run is the default train.py (or a copy with one constant changed), standalone, in a
fresh process, deterministic, under AR_SEED=seed: the harness scores it with
`evaluate.evaluate` at the end of the run. Runs go seed by seed (the baseline and every
change on seed 0, then on seed 1, ...), so a run cut short leaves whole pairs. After each
run the JSON file holds {code: {seed: {val_bpb, num_steps}}}, and at the end the script
prints, per change, the paired differences d(seed) = val_bpb(change) - val_bpb(baseline),
their mean and standard deviation, against the baseline's seed-to-seed deviation
(docs/decisions.md reads these figures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import contract  # noqa: E402
from bench.agents.nudge import after_harness_import  # noqa: E402
from sandbox.harness import HARNESS_FILES  # noqa: E402


def edited(constant: str, value: str) -> str:
    """train.py with `CONSTANT = ...` set to `value` (its first assignment at the start of a line)."""
    text = (ROOT / "train.py").read_text()
    if constant == "+":  # a line inserted after the harness import, e.g. one that draws from the seeded generator
        return after_harness_import(text, value)
    new, count = re.subn(rf"^{constant} = .*$", f"{constant} = {value}", text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(f"train.py has no line `{constant} = ...`")
    return new


def run(source: str, seed: int, budget: float, data: Path, work: Path, schedule: Path | None = None) -> dict:
    """One standalone run; with `schedule` it replays that step schedule (as `rerun --exact` does) instead of
    training for the budget's time."""
    work.mkdir(parents=True, exist_ok=True)
    for name in HARNESS_FILES:
        shutil.copyfile(ROOT / name, work / name)
    (work / "train.py").write_text(source)
    name, value = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env = {**os.environ, "AR_DATA_DIR": str(data), "AR_OUT_DIR": str(work / "out"), "AR_TIME_BUDGET": repr(budget),
           "AR_SEED": str(seed), "AR_DETERMINISTIC": "1", name: value, "AR_PHASE": "", "PYTHONUNBUFFERED": "1",
           **({contract.REPLAY_ENV: str(schedule)} if schedule else {})}
    done = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True, text=True)
    block = done.stdout.split("\n---\n")[-1]
    summary = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
    if done.returncode != 0 or "val_bpb" not in summary:
        print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
        return {"failed": done.returncode}
    return {"val_bpb": float(summary["val_bpb"]), "num_steps": int(summary["num_steps"]),
            "startup_seconds": float(summary["startup_seconds"])}


def report(results: dict) -> None:
    base = results.get("baseline", {})
    values = [r["val_bpb"] for r in base.values() if "val_bpb" in r]
    sigma_seed = statistics.stdev(values) if len(values) > 1 else float("nan")
    print(f"\nbaseline: {len(values)} seeds, mean {statistics.fmean(values):.6f}, sigma(seed) {sigma_seed:.6f}")
    print(f"{'change':24s} {'pairs':>5s} {'mean d':>10s} {'sigma(d)':>10s} {'ratio':>6s}  d per seed")
    for code, runs in results.items():
        if code == "baseline":
            continue
        pairs = [runs[s]["val_bpb"] - base[s]["val_bpb"] for s in runs
                 if "val_bpb" in runs[s] and "val_bpb" in base.get(s, {})]
        sigma = statistics.stdev(pairs) if len(pairs) > 1 else float("nan")
        print(f"{code:24s} {len(pairs):5d} {statistics.fmean(pairs) if pairs else float('nan'):+10.6f} "
              f"{sigma:10.6f} {sigma / sigma_seed:6.2f}  " + " ".join(f"{d:+.5f}" for d in pairs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=45.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--change", action="append", default=[], help="NAME:CONSTANT=VALUE")
    parser.add_argument("--out", type=Path, default=Path("pairs.json"))
    parser.add_argument("--work", type=Path, help="where the runs are kept (default: a new temporary folder)")
    parser.add_argument("--report", action="store_true", help="only print the table of an existing --out")
    parser.add_argument("--match-steps", action="store_true",
                        help="every change replays the step schedule of the baseline's run on the same seed, as a "
                             "machine of steady speed (a GPU in deterministic mode) trains the same steps each run")
    parser.add_argument("--only", action="append", default=[], metavar="CODE",
                        help="run only these codes (`baseline` or a change's NAME), e.g. to redo a disturbed run")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.report:
        codes = {"baseline": (ROOT / "train.py").read_text()}
        for change in args.change:
            name, assignment = change.split(":", 1)
            codes[name] = edited(*assignment.split("=", 1))
        work = args.work or Path(tempfile.mkdtemp(prefix="pair-noise-"))
        if args.only:
            codes = {code: source for code, source in codes.items() if code in args.only}
        for seed in args.seeds:
            schedule = None
            for code, source in codes.items():
                result = run(source, seed, args.budget, args.data, work / f"{code}-{seed}", schedule)
                if args.match_steps and code == "baseline" and "val_bpb" in result:
                    trace = contract.parse_trace((work / f"{code}-{seed}" / "out" / contract.TRACE_FILE).read_text())
                    schedule = work / f"schedule-{seed}.json"
                    schedule.write_text(contract.replay_schedule(trace))
                results.setdefault(code, {})[str(seed)] = result
                args.out.write_text(json.dumps(results, indent=1))
                print(f"{code} seed {seed}: {result}", flush=True)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
