"""What the keep rule does on a real night: false keeps (A/A) and the power to keep a real repair.

    uv run python bench/aa_night.py --mode aa    [--budget 300] [--max-experiments 40] [--reinit-every 2] [--sandbox docker] [-- overnight options]
    uv run python bench/aa_night.py --mode power [--budget 300] [--max-experiments 10] [--sandbox docker] [-- overnight options]

Both run `autoresearch overnight --agent command` (this checkout's runner, this interpreter) with bench/agents/nudge.py,
which proposes only effect-free changes (a float constant moved by one part in a
million; with --reinit-every K every K-th is a new initialisation, whose runs are not
coupled to the best's), so each keep of such a change is a false keep. The figures come from the
night's ledger afterwards.

- aa: the night runs in this repository (runs/<tag>); the number that matters is
  `kept`, ideally 0.
- power: the night runs in a copy of the project whose train.py has one learning rate
  multiplied by --factor (default: MATRIX_LR, Muon's rate, 4x too high; on the CPU
  profile, where a few dozen steps are too few for Muon's rate to matter, use
  `--degrade UNEMBEDDING_LR`); the agent's first proposal restores it. The bench reports whether that repair was
  kept, at what value against the degraded baseline, and at what cost in runs,
  and how many effect-free changes were kept after it.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "bench" / "agents" / "nudge.py"
sys.path.insert(0, str(ROOT))

from bench.agents.nudge import float_constants, literal, set_constant  # noqa: E402
from runner.core.heartbeat import ran_seconds  # noqa: E402
from runner.core.ledger import BASELINE, CONFIRM, EXPERIMENT, REFERENCE, Ledger  # noqa: E402
from sandbox.status import Status  # noqa: E402

PROJECT_FILES = ("train.py", "prepare.py", "evaluate.py", "contract.py", "program.md")  # what a night reads from its root


def degraded_project(directory: Path, name: str, factor: float) -> str:
    """Copy the project into `directory` with the constant `name` multiplied by `factor`; return its original literal."""
    for file in PROJECT_FILES:
        shutil.copy2(ROOT / file, directory / file)
    source = (ROOT / "train.py").read_text()
    node = float_constants(source)[name]
    (directory / "train.py").write_text(set_constant(source, name, literal(node.value * factor)))
    return ast.get_source_segment(source, node)


def ran(row) -> bool:
    """The row spent a run (finished or failed; rejected and unfinished rows did not)."""
    return row.status == Status.DONE or row.status.is_failure()


def summary(ledger: Ledger, mode: str) -> list[str]:
    """The night's figures, from its ledger rows only."""
    night = ledger.nights()[-1]
    wall = ran_seconds(night, datetime.now(timezone.utc))  # a night stopped by a kill ends at its last heartbeat
    rows = ledger.experiments(night_id=night.id)
    experiments = [r for r in rows if r.kind == EXPERIMENT]
    decided = [r for r in experiments if r.decision in ("keep", "discard")]
    kept = [r for r in decided if r.decision == "keep"]
    runs = [r for r in rows if r.kind in (EXPERIMENT, CONFIRM, REFERENCE) and ran(r)]
    baseline = [r.val_bpb for r in rows if r.kind == BASELINE and r.status == Status.DONE]
    mean = f"{statistics.fmean(baseline):.6f}" if baseline else "-"
    lines = [
        f"night {night.tag} ({night.stop_reason}): {wall:.0f} s wall, "
        f"{3600 * len(decided) / wall:.1f} experiments/hour" if wall > 0 else "no time recorded",
        f"baseline: {len(baseline)} runs, mean val_bpb {mean}",
        f"proposals: {len(experiments)}, rejected {sum(r.status == Status.REJECTED for r in experiments)}, "
        f"failed {sum(r.status.is_failure() for r in experiments)}",
        f"decided: {len(decided)}, kept {len(kept)}, discarded {len(decided) - len(kept)}",
        f"runs: {len(runs)} (experiment, confirmation and reference rows), "
        + (f"{len(runs) / len(decided):.2f} per decision" if decided else "no decision"),
    ]
    lines += [f"  rejected {r.id}: {r.reject_reason}" for r in experiments if r.status == Status.REJECTED]
    if mode == "aa" or not experiments:
        return lines + [f"  false keep {r.id}: {r.description}" for r in kept]
    repair, nudges = experiments[0], experiments[1:]
    spent = [r for r in runs if r.id == repair.id or r.target_id == repair.id]
    value = "-" if repair.decision_value is None else f"{repair.decision_value:.6f}"
    return lines + [
        f"repair {repair.id} ({repair.description}): {repair.decision or repair.status}, "
        f"decided value {value} vs baseline mean {mean}, {len(spent)} runs",
        f"effect-free after the repair: {sum(r.decision == 'keep' for r in nudges)} kept "
        f"of {sum(r.decision in ('keep', 'discard') for r in nudges)} decided",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("aa", "power"), required=True)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--max-experiments", type=int, default=20)
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--sandbox", default="docker")
    parser.add_argument("--source", default="offline")
    parser.add_argument("--gpus", default="all")
    parser.add_argument("--degrade", default="MATRIX_LR", help="power: the float constant to degrade")
    parser.add_argument("--factor", type=float, default=4.0, help="power: what it is multiplied by")
    parser.add_argument("--reinit-every", type=int, default=0, metavar="K",
                        help="every K-th proposal is a new initialisation (effect-free, runs decoupled)")
    parser.add_argument("--tag", default=None, help="default: bench-<mode>-<date-time>")
    parser.add_argument("extra", nargs="*", help="more `autoresearch overnight` options (after --)")
    args = parser.parse_args()
    tag = args.tag or f"bench-{args.mode}-{datetime.now():%Y%m%d-%H%M%S}"
    work = Path(tempfile.mkdtemp(prefix=f"aa-night-{args.mode}-"))  # agent state; the project copy in power mode
    project, agent = ROOT, [sys.executable, str(AGENT)]
    if args.reinit_every:
        agent += ["--reinit-every", str(args.reinit_every)]
    if args.mode == "power":
        project = work
        agent += ["--repair", f"{args.degrade}={degraded_project(work, args.degrade, args.factor)}"]
    command = [sys.executable, "-c", "from runner.cli import main; main()", "overnight", "--agent", "command",
               "--agent-command", shlex.join(agent), "--sandbox", args.sandbox, "--budget", str(args.budget),
               "--max-experiments", str(args.max_experiments), "--baseline-runs", str(args.baseline_runs),
               "--source", args.source, "--gpus", args.gpus, "--tag", tag, *args.extra]
    print(f"$ cd {shlex.quote(str(project))} && AR_BENCH_STATE={work / 'state.json'} {shlex.join(command)}", flush=True)
    started = time.monotonic()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the runner of this checkout
    done = subprocess.run(command, cwd=project,
                          env={**os.environ, "AR_BENCH_STATE": str(work / "state.json"), "PYTHONPATH": path})
    print(f"\nexit {done.returncode} after {time.monotonic() - started:.0f} s; work dir {work}")
    ledger_path = project / "runs" / tag / "ledger.sqlite"  # the CLI has no runs-dir option: runs/ under its root
    if not ledger_path.exists():
        return done.returncode or 1
    ledger = Ledger(ledger_path)
    print("\n".join([*summary(ledger, args.mode), f"ledger: {ledger_path}"]))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
