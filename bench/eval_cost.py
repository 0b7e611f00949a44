"""What phase 2's checks cost: one exported model scored with and without the probes.

    AR_PHASE=eval AR_DATA_DIR=DATA python bench/eval_cost.py MODEL.pt2 [--repeat 3]

Prints the seconds of `prepare.evaluate` (load, purity check, scoring, probes, the
repeat check) with PROBES_PER_BATCH probe batches per scored batch and with none.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    default = prepare.PROBES_PER_BATCH
    for per_batch in (default, 0):
        prepare.PROBES_PER_BATCH = per_batch
        seconds = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = prepare.evaluate(args.model)
            if prepare.DEVICE.type == "cuda":
                prepare.torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        print(f"probes per batch {per_batch}: evaluate {statistics.median(seconds):.2f} s (median of {args.repeat}), "
              f"eval_tokens {result['eval_tokens']}, probe_rows {result['probe_rows']}, "
              f"val_bpb {float.fromhex(result['val_bpb_hex']):.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
