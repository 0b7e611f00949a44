"""Our train.py in both modes and the reference's train.py, on the same data, budget and scoring.

    python3 bench/side_by_side.py --budget 300 [--reference DIR] [--only fast det reference]

Each run is a fresh standalone process on the machine's first GPU: our train.py in fast mode
and in deterministic mode (the night's default), then, given a checkout of the reference project
(karpathy/autoresearch, not part of this repository), its own train.py with
bench/reference_api/prepare.py standing in for its prepare.py. Two edits are made to a copy of the
reference's train.py, and the run stops if either no longer applies: its FlashAttention-3 kernel
download becomes torch's SDPA, and its sliding windows ("SSSL") become full windows ("L"), which
SDPA computes without a mask. Both scripts' val_bpb are measured by evaluate.evaluate (phase 2) on the same
tokens. tokens/s counts timed steps only: ours from the harness's budget account, the
reference's after its 10 untimed warm-up steps (its own accounting). MFU is as each script
counts it (docs/benchmarks.md: ours counts causal attention, the reference's does not halve it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_WARMUP_STEPS = 10  # the reference's train.py starts its clock after this many steps
# (pattern, replacement) edits to the reference's train.py; each must match exactly once
REFERENCE_EDITS = (
    (r"from kernels import get_kernel\n(?:.*\n)*?fa3 = get_kernel\(repo\)\.flash_attn_interface\n",
     "from prepare import fa3  # SDPA standing in for the FlashAttention-3 download\n"),
    (r'^WINDOW_PATTERN = "[SL]+"', 'WINDOW_PATTERN = "L"'),
)
COLUMNS = ("run", "val_bpb", "steps", "tokens/s", "MFU (own count)", "peak VRAM", "training", "start-up", "wall")


def reference_copy(reference: Path, into: Path) -> Path:
    """The reference's train.py with REFERENCE_EDITS applied, beside the stand-in prepare.py."""
    text = (reference / "train.py").read_text()
    for pattern, replacement in REFERENCE_EDITS:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise SystemExit(f"the reference's train.py has changed: {pattern!r} matched {count} times")
    into.mkdir(parents=True)
    (into / "train.py").write_text(text)
    shutil.copyfile(ROOT / "bench/reference_api/prepare.py", into / "prepare.py")
    return into


def summary(output: str) -> dict[str, float]:
    """The `key: value` lines both scripts print after their `---` line."""
    tail = output.rsplit("\n---\n", 1)[-1]
    values = {}
    for line in tail.splitlines():
        key, _, value = line.partition(":")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            pass
    return values


def run(name: str, cwd: Path, env: dict[str, str], log: Path) -> dict[str, float | str]:
    start = time.time()
    done = subprocess.run([sys.executable, "train.py"], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"{name}: exit {done.returncode}; the end of {log}:\n{(done.stdout + done.stderr)[-3000:]}")
        return {"run": name}
    s = summary(done.stdout)
    timed_steps = s["num_steps"] - (REFERENCE_WARMUP_STEPS if name == "reference" else 0)
    tokens_per_s = s.get("tokens_per_second") or s["total_tokens_M"] * 1e6 * timed_steps / s["num_steps"] / s["training_seconds"]
    startup = f"{s['startup_seconds']:.1f} s" if "startup_seconds" in s else "-"  # the reference does not print it
    return {"run": name, "val_bpb": f"{s['val_bpb']:.4f}", "steps": f"{s['num_steps']:.0f}",
            "tokens/s": f"{tokens_per_s / 1e6:.3f} M", "MFU (own count)": f"{s['mfu_percent']:.1f} %",
            "peak VRAM": f"{s['peak_vram_mb'] / 1024:.1f} GB", "training": f"{s['training_seconds']:.1f} s",
            "start-up": startup, "wall": f"{wall:.1f} s"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds of each run")
    parser.add_argument("--reference", type=Path, help="a checkout of karpathy/autoresearch")
    parser.add_argument("--only", nargs="+", choices=("fast", "det", "reference"), default=("fast", "det", "reference"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    base = {**os.environ, "AR_TIME_BUDGET": repr(args.budget), "AR_PROJECT_ROOT": str(ROOT), "PYTHONUNBUFFERED": "1"}
    base.pop("AR_PHASE", None)
    rows = []
    for name in args.only:
        env = {**base, "AR_OUT_DIR": str(work / name / "out"), "AR_DETERMINISTIC": "1" if name == "det" else "0"}
        if name == "reference":
            if args.reference is None:
                continue
            cwd = reference_copy(args.reference, work / name / "code")
        else:
            cwd = ROOT
        (work / name).mkdir(parents=True, exist_ok=True)
        rows.append(run(name, cwd, env, work / name / "train.log"))
        print(" | ".join(str(rows[-1].get(c, "-")) for c in COLUMNS), flush=True)
    print(f"\nbudget {args.budget:g} s; logs in {work}\n")
    print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "-")) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
