"""A short night through the real runner, and where its wall time goes.

    uv run python bench/gpu_night.py --budget 60 --max-experiments 4 [--sandbox process] [-- overnight options]

Runs `autoresearch overnight` (search agent, baseline repeated --baseline-runs
times) and then reads the night's ledger: GPU duty cycle = Σ training seconds /
wall seconds, experiments per hour, and how the rest of the wall time splits
into startup (compile), export, evaluation, image/snapshot builds and the
remainder (agent, ledger, process start-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.ledger import Ledger  # noqa: E402
from sandbox.status import Status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--max-experiments", type=int, default=4)
    parser.add_argument("--baseline-runs", type=int, default=2)
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--source", default="offline")
    parser.add_argument("--tag", default=f"bench-night-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("extra", nargs="*", help="more `autoresearch overnight` options (after --)")
    args = parser.parse_args()
    command = [sys.executable, "-c", "from runner.cli import main; main()", "overnight", "--agent", "search",
               "--budget", str(args.budget), "--max-experiments", str(args.max_experiments),
               "--baseline-runs", str(args.baseline_runs), "--sandbox", args.sandbox, "--source", args.source,
               "--tag", args.tag, *args.extra]
    subprocess.run(command, cwd=ROOT, check=False)
    ledger = Ledger(ROOT / "runs" / args.tag / "ledger.sqlite")
    night = ledger.nights()[-1]
    wall = (datetime.fromisoformat(night["ended_at"]) - datetime.fromisoformat(night["started_at"])).total_seconds()
    rows = [r for r in ledger.experiments() if r.train_seconds]
    metrics = [json.loads(r.metrics_json or "{}") for r in rows]
    training = sum(r.training_seconds or 0 for r in rows)
    startup = sum(m.get("startup_seconds", 0) for m in metrics)
    export = sum(m.get("export_seconds", 0) for m in metrics)
    phase1 = sum(r.train_seconds or 0 for r in rows)
    parts = {
        "training": training,
        "startup (imports, compile, 3 untimed steps)": startup,
        "export": export,
        "phase-1 sandbox overhead": phase1 - training - startup - export,
        "evaluation (phase 2)": sum(r.eval_seconds or 0 for r in rows),
        "image/snapshot builds": sum(r.build_seconds or 0 for r in ledger.experiments()),
    }
    parts["agent, ledger and the rest"] = wall - sum(parts.values())
    done = sum(r.status == Status.DONE for r in rows)
    print(f"\nnight {args.tag}: {len(rows)} experiments run ({done} done) in {wall:.0f} s, budget {args.budget:.0f} s")
    print(f"GPU duty cycle: {100 * training / wall:.1f} %   experiments/hour: {3600 * len(rows) / wall:.1f}")
    for name, seconds in parts.items():
        print(f"  {name:45s} {seconds:8.1f} s  {100 * seconds / wall:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
