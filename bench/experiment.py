"""One complete experiment through the real sandbox, and where its wall time goes.

    uv run python bench/experiment.py [--sandbox auto] [--budget 60] [--source offline] [--repeat 1] [--gpu auto]
                                      [--gpu-memory-cap GIB] [--train-py PATH] [--measure-allowance] [--load N]

Builds the experiment image from the repository's train.py (or --train-py), runs
phase 1 (training + export) and phase 2 (evaluation) and prints val_bpb,
throughput, MFU, peak VRAM, steps, startup/export/eval seconds, the host's budget
account (GPU-busy seconds before and after the budget) and the total wall time.
With `--gpu auto` the first GPU found through NVML runs the GPU profile; with
`--measure-allowance` the runs after the first use allowances measured on it, as a
night does after its baseline. Figures marked (reported) come from train.py itself.
With `--load N` every second run has N busy processes beside it, to show how much other
load on the machine moves the step count of identical code (the CPU budget's clock).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract import cache_dir  # noqa: E402
from sandbox.backends import get_backend  # noqa: E402
from sandbox.budget_guard import Allowance  # noqa: E402
from sandbox.experiment import ExperimentSpec, run_experiment  # noqa: E402
from sandbox.spec import Limits  # noqa: E402
from sandbox.status import Status

ROOT = Path(__file__).resolve().parent.parent
SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"  # a busy process that ends with the bench


def first_gpu_uuid() -> str:
    import pynvml

    pynvml.nvmlInit()
    uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
    return uuid.decode() if isinstance(uuid, bytes) else uuid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--source", default="offline")
    parser.add_argument("--cache", type=Path, default=None, help="AR_CACHE (default ~/.cache/autoresearch-sandbox)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--gpu", default=None, help="GPU UUID, or 'auto' for the first GPU (GPU profile)")
    parser.add_argument("--gpu-memory-cap", type=float, default=None, help="GiB: the host's GPU memory cap")
    parser.add_argument("--train-py", type=Path, action="append",
                        help="the train.py to run (default: the repository's); given several times, run i uses the i-th")
    parser.add_argument("--measure-allowance", action="store_true")
    parser.add_argument("--load", type=int, default=0, help="busy processes beside every second run")
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's directory under this folder")
    args = parser.parse_args()
    cache = args.cache or cache_dir()
    train_pys = args.train_py or [ROOT / "train.py"]
    limits = Limits(gpu_memory_bytes=int(args.gpu_memory_cap * 2**30) if args.gpu_memory_cap else None)
    allowance = None
    gpu = first_gpu_uuid() if args.gpu == "auto" else args.gpu
    backend = get_backend(args.sandbox)
    t0 = time.monotonic()
    backend.ensure_ready()
    print(f"backend {backend.name} ({backend.isolation}) ready in {time.monotonic() - t0:.1f}s")
    rows = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = args.keep / f"bench{i}" if args.keep else Path(tmp)
            t0 = time.monotonic()
            source = train_pys[i % len(train_pys)].read_text()
            image = backend.build_image(source + f"\n# bench run {i} {time.time_ns()}\n", f"bench{i}")
            build_s = time.monotonic() - t0
            spec = ExperimentSpec(exp_id=f"bench{i}", image=image, data_dir=cache / args.source, run_dir=run_dir,
                                  time_budget=args.budget, gpu_uuid=gpu, limits=limits, allowance=allowance)
            loaded = bool(args.load) and i % 2 == 1
            load = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.load if loaded else 0)]
            try:
                outcome = run_experiment(backend, spec)
            finally:
                for process in load:
                    process.kill()
            total = time.monotonic() - t0
            backend.remove_image(image)
        if args.measure_allowance and allowance is None and outcome.train.budget:
            allowance = Allowance.measured_from([outcome.train.budget], "gpu" if gpu else "cpu")
            print(f"allowance measured on run {i}: {allowance}")
        m = {**outcome.reported, **outcome.metrics}
        row = {"load": args.load if loaded else 0, "status": outcome.status, "val_bpb": outcome.val_bpb, "image_build_s": build_s,
               "phase1_s": outcome.phase_seconds.get("train", 0.0), "training_s": m.get("training_seconds", 0.0),
               "phase2_s": outcome.phase_seconds.get("eval", 0.0), "total_s": total, "num_steps": m.get("num_steps", 0),
               "mfu_percent": m.get("mfu_percent", 0.0), "tokens_per_second": m.get("tokens_per_second", 0.0),
               "peak_vram_mb": m.get("peak_vram_mb", 0.0), "startup_s": m.get("startup_seconds", 0.0),
               "export_s": m.get("export_seconds", 0.0), "data_wait_percent": m.get("data_wait_percent", 0.0),
               "eval_tokens": m.get("eval_tokens", 0), "probe_rows": m.get("probe_rows", 0),
               **{k: v for k, v in (outcome.train.budget or {}).items() if k != "allowance"}}
        rows.append(row)
        print(f"{train_pys[i % len(train_pys)].name}:",
              " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if outcome.status != Status.DONE:
            print(outcome.failure_log[-2000:])
    if len(rows) > 1:
        for key in ("total_s", "phase1_s", "phase2_s", "image_build_s"):
            print(f"median {key}: {statistics.median(r[key] for r in rows):.2f}")
    if args.load and len(rows) > 1:
        steps = {loaded: [r["num_steps"] for r in rows if bool(r["load"]) == loaded] for loaded in (False, True)}
        idle, busy = statistics.median(steps[False]), statistics.median(steps[True])
        print(f"steps without load {steps[False]}, with {args.load} busy processes {steps[True]}: "
              f"medians differ by {100 * (busy - idle) / idle:+.1f} %")
    overhead = [r["total_s"] - r["training_s"] for r in rows]
    print(f"seconds per experiment: {statistics.median(r['total_s'] for r in rows):.1f} "
          f"(of which outside training: {statistics.median(overhead):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
