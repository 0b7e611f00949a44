"""One complete experiment through the real sandbox, and where its wall time goes.

    uv run python bench/experiment.py [--sandbox auto] [--budget 60] [--source offline] [--repeat 1] [--gpu auto]

Builds the experiment image from the repository's train.py, runs phase 1
(training + export) and phase 2 (evaluation) and prints val_bpb, throughput,
MFU, peak VRAM, steps, startup/export/eval seconds and the total wall time.
With `--gpu auto` the first GPU found through NVML runs the GPU profile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.backends import get_backend  # noqa: E402
from sandbox.experiment import ExperimentSpec, run_experiment  # noqa: E402
from sandbox.spec import Limits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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
    args = parser.parse_args()
    cache = args.cache or Path.home() / ".cache" / "autoresearch-sandbox"
    gpu = first_gpu_uuid() if args.gpu == "auto" else args.gpu
    backend = get_backend(args.sandbox)
    t0 = time.monotonic()
    backend.ensure_ready()
    print(f"backend {backend.name} ({backend.isolation}) ready in {time.monotonic() - t0:.1f}s")
    rows = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            image = backend.build_image((ROOT / "train.py").read_text() + f"\n# bench run {i} {time.time_ns()}\n", f"bench{i}")
            build_s = time.monotonic() - t0
            spec = ExperimentSpec(exp_id=f"bench{i}", image=image, data_dir=cache / args.source, run_dir=Path(tmp),
                                  time_budget=args.budget, gpu_uuid=gpu, limits=Limits())
            outcome = run_experiment(backend, spec)
            total = time.monotonic() - t0
            backend.remove_image(image)
        m = outcome.metrics
        row = {"status": outcome.status, "val_bpb": outcome.val_bpb, "image_build_s": build_s,
               "phase1_s": outcome.phase_seconds.get("train", 0.0), "training_s": m.get("training_seconds", 0.0),
               "phase2_s": outcome.phase_seconds.get("eval", 0.0), "total_s": total, "num_steps": m.get("num_steps", 0),
               "mfu_percent": m.get("mfu_percent", 0.0), "tokens_per_second": m.get("tokens_per_second", 0.0),
               "peak_vram_mb": m.get("peak_vram_mb", 0.0), "startup_s": m.get("startup_seconds", 0.0),
               "export_s": m.get("export_seconds", 0.0), "data_wait_percent": m.get("data_wait_percent", 0.0)}
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        if outcome.status != "done":
            print(outcome.failure_log)
    if len(rows) > 1:
        for key in ("total_s", "phase1_s", "phase2_s", "image_build_s"):
            print(f"median {key}: {statistics.median(r[key] for r in rows):.2f}")
    overhead = [r["total_s"] - r["training_s"] for r in rows]
    print(f"seconds per experiment: {statistics.median(r['total_s'] for r in rows):.1f} "
          f"(of which outside training: {statistics.median(overhead):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
