"""How many evaluation tokens a comparison needs: the sampling error of a val_bpb difference.

    python bench/eval_noise.py --data DIR --max-tokens 16777216 MODEL.pt2 MODEL.pt2 [...]

Scores each exported model (phase 1's model.pt2, e.g. of runs under different seeds)
on the harness's own evaluation stream (the val split in its fixed order) up to
--max-tokens, batch by batch, without probes. For every pair of models and every
evaluation size N it prints the difference of their val_bpb
on the first N tokens (from 16 batches, doubling) and that difference's standard error over the choice of
evaluation text (ratio estimator over batches: the same text is scored by both, so the
error is that of the paired difference). The error should be small against σ(seed),
the spread of val_bpb between training seeds, which no evaluation size removes.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def batch_sums(model_path: Path, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Nats and bytes of every evaluation batch (BOS excluded), as phase 2 sums them."""
    import torch

    import evaluate
    import prepare

    torch.set_float32_matmul_precision("high")
    model, device, _ = evaluate._load_exported(model_path)
    token_bytes = torch.from_numpy(prepare.get_tokenizer().token_bytes.astype(np.int64)).to(device)
    rows = prepare._packed_rows("val", prepare.MAX_SEQ_LEN + 1, seed=0)
    nats, nbytes = np.zeros(n_batches), np.zeros(n_batches)
    with torch.no_grad():
        for i in range(n_batches):
            batch = torch.from_numpy(np.stack([next(rows) for _ in range(prepare.EVAL_BATCH)]))
            x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
            losses = evaluate._token_losses(evaluate._logits(model, x, prepare.get_tokenizer().vocab_size), y)
            weights = token_bytes[y.reshape(-1)]
            nats[i], nbytes[i] = float((losses * (weights > 0)).sum()), float(weights.sum())
    return nats, nbytes


def paired_difference(a: np.ndarray, b: np.ndarray, nbytes: np.ndarray) -> tuple[float, float]:
    """val_bpb(a) - val_bpb(b) over these batches and its standard error (delta method over batches)."""
    scale = math.log(2) * nbytes.sum()
    diff = (a - b).sum() / scale
    residual = (a - b) - diff * math.log(2) * nbytes  # per-batch deviation from the ratio
    return diff, math.sqrt(len(a) / (len(a) - 1) * (residual ** 2).sum()) / scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the prepared data directory (AR_DATA_DIR)")
    parser.add_argument("--max-tokens", type=int, default=2**24)
    args = parser.parse_args()
    os.environ["AR_DATA_DIR"] = str(args.data)
    import prepare

    per_batch = prepare.EVAL_BATCH * prepare.MAX_SEQ_LEN
    n_batches = args.max_tokens // per_batch
    sums = {path: batch_sums(path, n_batches) for path in args.models}
    nbytes = next(iter(sums.values()))[1]
    print(f"profile {prepare.PROFILE}: {n_batches} batches of {per_batch} tokens")
    for path, (nats, _) in sums.items():
        print(f"{path}: val_bpb {nats.sum() / (math.log(2) * nbytes.sum()):.6f} on {n_batches * per_batch:,} tokens")
    sizes = [per_batch * 2**k for k in range(4, 64) if 2**k <= n_batches]  # from 16 batches (1M tokens on a GPU)
    errors = {size: [] for size in sizes}
    for (pa, (a, _)), (pb, (b, _)) in itertools.combinations(sums.items(), 2):
        for size in sizes:
            n = max(2, size // per_batch)
            diff, se = paired_difference(a[:n], b[:n], nbytes[:n])
            errors[size].append(se)
            print(f"{pa.parent.name} - {pb.parent.name} on {size:>10,} tokens: difference {diff:+.6f}, "
                  f"sampling error {se:.6f}")
    for size in sizes:
        print(f"median sampling error of a difference on {size:>10,} tokens: {statistics.median(errors[size]):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
