"""A short night through the real runner, and where its wall time goes.

    uv run python bench/gpu_night.py --budget 60 --max-experiments 4 [--agent nudge] [--sandbox process] [-- overnight options]
    uv run python bench/gpu_night.py --report TAG      # the same figures for a night that already ran

Runs `autoresearch overnight` (the search agent, or with `--agent nudge` the effect-free agent
of bench/agents/nudge.py, which needs no agent library) with the baseline repeated
--baseline-runs times, then reads the night's ledger: GPU duty cycle = Σ training seconds /
wall seconds, experiments per hour, how the rest of the wall time splits into startup
(compile), export, evaluation, image/snapshot builds and the remainder (agent, ledger,
process start-up), and per run its start-up.
Reruns (`rerun` after the night) are left out: they ran outside the night's wall time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.core.heartbeat import ran_seconds  # noqa: E402
from runner.core.ledger import RERUN, Ledger  # noqa: E402
from sandbox.status import Status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--max-experiments", type=int, default=4)
    parser.add_argument("--baseline-runs", type=int, default=2)
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--source", default="offline")
    parser.add_argument("--tag", default=f"bench-night-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--agent", choices=("search", "nudge"), default="search")
    parser.add_argument("--report", metavar="TAG", help="only report the night TAG (already run)")
    parser.add_argument("extra", nargs="*", help="more `autoresearch overnight` options (after --)")
    args = parser.parse_args()
    tag = args.report or args.tag
    if not args.report:
        agent = ["--agent", "search"] if args.agent == "search" else [
            "--agent", "command", "--agent-command", shlex.join([sys.executable, str(ROOT / "bench/agents/nudge.py")])]
        command = [sys.executable, "-c", "from runner.cli import main; main()", "overnight", *agent,
                   "--budget", str(args.budget), "--max-experiments", str(args.max_experiments),
                   "--baseline-runs", str(args.baseline_runs), "--sandbox", args.sandbox, "--source", args.source,
                   "--tag", tag, *args.extra]
        state = Path(tempfile.mkdtemp(prefix="gpu-night-")) / "state.json"  # the nudge agent's memory
        subprocess.run(command, cwd=ROOT, check=False, env={**os.environ, "AR_BENCH_STATE": str(state)})
    report(ROOT / "runs" / tag, args.budget)
    return 0


def report(run_dir: Path, budget: float) -> None:
    ledger = Ledger(run_dir / "ledger.sqlite")
    night = ledger.nights()[-1]
    wall = ran_seconds(night, datetime.now(timezone.utc))
    rows = [r for r in ledger.experiments() if r.train_seconds and r.kind != RERUN]  # reruns come after the night
    print(f"{'run':6s} {'kind':10s} {'status':10s} {'val_bpb':>9s} {'steps':>6s} {'start-up s':>10s} "
          f"{'phase 1 s':>9s} {'phase 2 s':>9s}")
    for r in rows:
        print(f"{r.id:6s} {r.kind:10s} {r.status.value:10s} {r.val_bpb or 0:9.6f} {r.num_steps or 0:6d} "
              f"{r.reported.get('startup_seconds', 0):10.1f} {r.train_seconds or 0:9.1f} {r.eval_seconds or 0:9.1f}")
    metrics = [r.reported for r in rows]  # start-up and export: as train.py reported them (untrusted)
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
    print(f"\nnight {night.tag}: {len(rows)} experiments run ({done} done) in {wall:.0f} s, budget {budget:.0f} s")
    print(f"GPU duty cycle: {100 * training / wall:.1f} %   experiments/hour: {3600 * len(rows) / wall:.1f}")
    for name, seconds in parts.items():
        print(f"  {name:45s} {seconds:8.1f} s  {100 * seconds / wall:5.1f} %")


if __name__ == "__main__":
    sys.exit(main())
