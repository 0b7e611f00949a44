"""The trusted harness of autoresearch-sandbox. The agent never edits this file.

It does three things:
  1. builds the data once: `python prepare.py [--source offline|linux|local PATH|hf]`
     fetches a corpus, splits whole documents into train/val by hash, trains a BPE
     tokenizer on train, writes token files and a manifest of content hashes;
  2. gives train.py its runtime: constants, the tokenizer, a packing dataloader that
     can only open the split of the current phase, the time budget, and finish();
  3. evaluates an exported model: `python prepare.py evaluate --model PATH` computes
     val_bpb from the model's logits itself, probes causality, prints the summary.

Data layout under DATA_DIR (one directory per source, $AR_CACHE/<source>):
  tokenizer/tokenizer.pkl    {name, pat_str, mergeable_ranks, special_tokens}
  tokenizer/token_bytes.npy  int32 [vocab]: UTF-8 byte length of each token, 0 for specials
  train/tokens.bin, val/tokens.bin   uint16 token ids; every document starts with BOS
  train/docs.npy,   val/docs.npy     int64 [n_docs + 1] document start offsets
  manifest.json              sha256 of every file above plus one combined hash; written last
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import pickle
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Constants. The CPU profile keeps an experiment to about two minutes on a laptop.

PROFILE = os.environ.get("AR_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
VOCAB_SIZE = 8192  # default for building; at runtime use get_tokenizer().vocab_size
BOS = "<|bos|>"  # the only special token: starts every document
VAL_FRACTION = 0.05  # share of documents held out for validation (by hash)
if PROFILE == "gpu":
    MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, EVAL_BATCH = 2048, 300.0, 2**20, 32
else:
    MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, EVAL_BATCH = 256, 60.0, 2**15, 16
TIME_BUDGET = float(os.environ.get("AR_TIME_BUDGET", TIME_BUDGET))
WARMUP_STEPS = 3  # untimed first steps (compilation); the budget starts after them

CACHE_DIR = Path(os.environ.get("AR_CACHE") or Path.home() / ".cache" / "autoresearch-sandbox")
DATA_DIR = Path(os.environ.get("AR_DATA_DIR") or CACHE_DIR / "offline")
OUT_DIR = Path(os.environ.get("AR_OUT_DIR") or "runs/standalone")
PHASE = os.environ.get("AR_PHASE", "")  # "train" or "eval" inside the sandbox; "" standalone


# =============================================================================
# Part 1: building the data (once per source)
# =============================================================================

# PART-1-DATA (data sources, split, tokenizer training, token files, manifest)


# =============================================================================
# Part 2: the runtime API for train.py
# =============================================================================

SEED = int(os.environ.get("AR_SEED", "42"))  # owned by the harness, so a seed change is never "research"
DETERMINISTIC = os.environ.get("AR_DETERMINISTIC") == "1"
DEVICE = torch.device("cuda" if PROFILE == "gpu" else "cpu")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # bf16 dense
_START = time.time()  # the harness is imported first: total_seconds counts from here
_STATS = {"data_wait": 0.0}


def _configure_runtime() -> None:
    """Seeds, determinism and the soft GPU memory cap, set before train.py builds anything."""
    torch.manual_seed(SEED)
    if DETERMINISTIC:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    cap = os.environ.get("AR_GPU_MEMORY_CAP")
    if cap and DEVICE.type == "cuda":
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap) / total), DEVICE)


class Tokenizer:
    """The BPE tokenizer built by Part 1, as a tiktoken Encoding plus the BOS token."""

    def __init__(self, data_dir: Path = DATA_DIR):
        with open(data_dir / "tokenizer" / "tokenizer.pkl", "rb") as f:
            spec = pickle.load(f)
        import tiktoken

        self.enc = tiktoken.Encoding(**spec)
        self.bos_id = spec["special_tokens"][BOS]
        self.vocab_size = self.enc.n_vocab
        self.token_bytes = np.load(data_dir / "tokenizer" / "token_bytes.npy")

    def encode(self, text: str) -> list[int]:
        """BOS followed by the text's tokens (special-token strings are encoded as text)."""
        return [self.bos_id] + self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


_TOKENIZER: Tokenizer | None = None


def get_tokenizer() -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer()
    return _TOKENIZER


def _open_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split; phase 1 may only read train and phase 2 only val."""
    allowed = {"train": {"train"}, "eval": {"val"}}.get(PHASE, {"train", "val"})
    if split not in allowed:
        raise PermissionError(f"the {split!r} split is not readable in the {PHASE!r} phase")
    tokens = np.memmap(DATA_DIR / split / "tokens.bin", dtype=np.uint16, mode="r")
    docs = np.load(DATA_DIR / split / "docs.npy")
    return tokens, docs


def _pieces(docs: np.ndarray, row_len: int) -> np.ndarray:
    """Cut documents longer than a row into row-sized pieces: [n, 2] of (start, length)."""
    starts, ends = docs[:-1], docs[1:]
    counts = np.maximum(1, -(-(ends - starts) // row_len))
    piece_start = np.repeat(starts, counts) + row_len * (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    piece_end = np.minimum(piece_start + row_len, np.repeat(ends, counts))
    return np.stack([piece_start, piece_end - piece_start], axis=1)


def _packed_rows(split: str, row_len: int, seed: int, buffer_size: int = 1024):
    """Yield rows of `row_len` tokens packed best-fit from shuffled documents, forever.

    Every row starts at a document (BOS). Each slot is filled with the longest
    buffered piece that fits; when none fits, the shortest is cropped to fill the
    row. Pieces after the first of a long document get a BOS too. Order depends
    only on (split, seed, epoch), so runs are reproducible.
    """
    tokens, docs = _open_split(split)
    bos = get_tokenizer().bos_id
    pieces = _pieces(docs, row_len)
    is_first = np.isin(pieces[:, 0], docs[:-1])
    lengths = pieces[:, 1] + ~is_first  # a continuation piece costs one more slot for its BOS
    for epoch in range(sys.maxsize):
        order = iter(np.random.default_rng([seed, epoch]).permutation(len(pieces)).tolist())
        buffer: list[tuple[int, int]] = []  # (cost, piece index), sorted by cost
        exhausted = False
        while True:
            while not exhausted and len(buffer) < buffer_size:
                i = next(order, None)
                if i is None:
                    exhausted = True
                else:
                    bisect.insort(buffer, (int(min(lengths[i], row_len)), i))
            if not buffer:
                break
            row, space = np.empty(row_len, dtype=np.int64), row_len
            while space > 0 and buffer:
                k = bisect.bisect_right(buffer, (space, sys.maxsize)) - 1
                cost, i = buffer.pop(max(k, 0))
                take = min(cost, space)
                pos = row_len - space
                start, n = int(pieces[i, 0]), take
                if not is_first[i]:
                    row[pos], pos, n = bos, pos + 1, take - 1
                row[pos : pos + n] = tokens[start : start + n]
                space -= take
            if space == 0:
                yield row


class DataLoader:
    """Batches of (inputs, targets) on the device, packed ahead by a background thread.

    Rows are packed in a thread into pinned memory and copied with non_blocking,
    so the GPU never waits on Python; the time next() blocks is counted as data wait.
    """

    def __init__(self, batch_size: int, seq_len: int = MAX_SEQ_LEN, split: str = "train", seed: int = SEED, device=DEVICE, prefetch: int = 4):
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, torch.device(device)
        self._rows = _packed_rows(split, seq_len + 1, seed)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        threading.Thread(target=self._fill, daemon=True).start()

    def _fill(self) -> None:
        pin = self.device.type == "cuda"
        try:
            while True:
                batch = torch.from_numpy(np.stack([next(self._rows) for _ in range(self.batch_size)]))
                self._queue.put(batch.pin_memory() if pin else batch)
        except BaseException as e:  # surface loader errors in the training thread
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        batch = self._queue.get()
        _STATS["data_wait"] += time.perf_counter() - t0
        if isinstance(batch, BaseException):
            raise batch
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def make_dataloader(batch_size: int, seq_len: int = MAX_SEQ_LEN, split: str = "train") -> DataLoader:
    """Infinite loader of (x, y) int64 [batch_size, seq_len] on DEVICE; y is x shifted by one."""
    return DataLoader(batch_size, seq_len, split)


class Budget:
    """The training time budget: `progress` drives the schedule, `done` ends the loop.

    Call `step(tokens)` once after every optimizer step. The first WARMUP_STEPS
    (compilation) are not timed. Each step's progress and seconds are recorded and
    written to OUT_DIR/trace.json by finish(); with AR_REPLAY=<trace> the recorded
    progress values and step count are replayed, so a rerun follows the exact same
    schedule and stops at the same step whatever the speed of the machine.
    """

    def __init__(self, seconds: float = TIME_BUDGET):
        self.seconds = seconds
        self.step_count = 0
        self.tokens = 0
        self.training_seconds = 0.0
        self.step_seconds: list[float] = []
        self.progress_log: list[float] = []
        replay = os.environ.get("AR_REPLAY")
        self.replay = json.loads(Path(replay).read_text()) if replay else None
        self._last = time.perf_counter()
        self.first_step_at: float | None = None  # time.time() when the first timed step began

    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]."""
        if self.replay is not None:
            recorded = self.replay["progress"]
            return recorded[self.step_count] if self.step_count < len(recorded) else 1.0
        return min(1.0, self.training_seconds / self.seconds)

    @property
    def done(self) -> bool:
        if self.replay is not None:
            return self.step_count >= self.replay["num_steps"]
        return self.training_seconds >= self.seconds

    def step(self, tokens: int) -> None:
        self.progress_log.append(self.progress)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.step_count += 1
        self.step_seconds.append(dt)
        if self.step_count > WARMUP_STEPS:
            self.training_seconds += dt
            self.tokens += tokens
        elif self.step_count == WARMUP_STEPS:
            self.first_step_at = time.time()

    def trace(self) -> dict:
        return {"time_budget": self.seconds, "warmup_steps": WARMUP_STEPS, "num_steps": self.step_count,
                "progress": self.progress_log, "step_seconds": self.step_seconds}


def _peak_flops() -> float | None:
    if DEVICE.type != "cuda":
        return None
    name = torch.cuda.get_device_name(DEVICE)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def finish(model: torch.nn.Module, budget: Budget, *, depth: int | None = None, flops_per_token: float | None = None) -> dict:
    """End of training: export the model for phase 2 and write the training summary.

    The model is exported with torch.export at the evaluation shape
    [EVAL_BATCH, MAX_SEQ_LEN] -> logits [EVAL_BATCH, MAX_SEQ_LEN, vocab]; it must be
    causal and must not need train.py to run. Standalone (outside the sandbox) the
    model is also evaluated here and the summary block printed.
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model.eval()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "trace.json").write_text(json.dumps(budget.trace()))
    t0 = time.time()
    example = torch.zeros(EVAL_BATCH, MAX_SEQ_LEN, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        program = torch.export.export(model, (example,))
    torch.export.save(program, OUT_DIR / "model.pt2")
    num_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token or 6 * num_params
    peak = _peak_flops()
    train_s = max(budget.training_seconds, 1e-9)
    summary = {
        "training_seconds": budget.training_seconds,
        "total_seconds": time.time() - _START,
        "startup_seconds": (budget.first_step_at or time.time()) - _START,
        "export_seconds": time.time() - t0,
        "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else 0.0,
        "mfu_percent": 100 * flops * budget.tokens / train_s / peak if peak else 0.0,
        "tokens_per_second": budget.tokens / train_s,
        "total_tokens_M": budget.tokens / 1e6,
        "num_steps": budget.step_count,
        "num_params_M": num_params / 1e6,
        "depth": depth if depth is not None else 0,
        "data_wait_percent": 100 * _STATS["data_wait"] / max(time.time() - (budget.first_step_at or _START), 1e-9),
    }
    (OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nexported model to {OUT_DIR / 'model.pt2'} in {summary['export_seconds']:.1f}s", flush=True)
    if not PHASE:
        print_summary({**evaluate(OUT_DIR / "model.pt2"), **summary})
    return summary


class EvaluationError(Exception):
    """The exported model cannot be evaluated; `.exit_code` tells the runner which status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_EXPORT_FAILED, EXIT_PROBE_FAILED = 3, 4


def _load_exported(path: Path):
    try:
        module = torch.export.load(path).module()
    except Exception as e:
        raise EvaluationError(f"cannot load the exported model {path}: {type(e).__name__}: {e}", EXIT_EXPORT_FAILED)
    tensors = list(module.parameters()) + list(module.buffers())
    return module, (tensors[0].device if tensors else torch.device("cpu"))


def _logits(model, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    try:
        logits = model(x)
    except Exception as e:
        raise EvaluationError(f"the exported model failed on the evaluation batch: {type(e).__name__}: {e}", EXIT_EXPORT_FAILED)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (*x.shape, vocab_size):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvaluationError(f"the model must return logits of shape {(*x.shape, vocab_size)}, got {shape}", EXIT_EXPORT_FAILED)
    return logits.float()


def causality_probe(model, x: torch.Tensor, vocab_size: int, tolerance: float = 1e-4) -> float:
    """Change every token after position t and check logits up to t do not move.

    Returns the largest change seen (relative to the logits' scale); raises
    EvaluationError when it exceeds `tolerance`, i.e. the model looks ahead.
    """
    base = _logits(model, x, vocab_size)
    scale = base.abs().max().clamp_min(1.0)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in (0, x.shape[1] // 3, 2 * x.shape[1] // 3):
        changed = x.clone()
        noise = torch.randint(0, vocab_size - 1, (x.shape[0], x.shape[1] - t - 1), generator=generator)
        changed[:, t + 1 :] = noise.to(x.device)
        moved = (_logits(model, changed, vocab_size)[:, : t + 1] - base[:, : t + 1]).abs().max() / scale
        worst = max(worst, float(moved))
        if worst > tolerance:
            raise EvaluationError(f"causality probe failed: changing tokens after position {t} changed earlier logits by {worst:.2e} (relative)", EXIT_PROBE_FAILED)
    return worst


@torch.no_grad()
def evaluate(model_path: Path) -> dict:
    """val_bpb of an exported model on the first EVAL_TOKENS of the val split.

    Cross-entropy is computed here from the model's logits; bits per byte divide
    the summed nats by ln(2) times the UTF-8 bytes of the target tokens, with
    special tokens (BOS) excluded from both sums, so the number does not depend
    on the tokenizer's vocabulary size.
    """
    model, device = _load_exported(Path(model_path))
    tokenizer = get_tokenizer()
    token_bytes = torch.from_numpy(tokenizer.token_bytes.astype(np.int64)).to(device)
    rows = _packed_rows("val", MAX_SEQ_LEN + 1, seed=0)  # fixed order: every experiment sees the same tokens
    n_batches = max(1, EVAL_TOKENS // (EVAL_BATCH * MAX_SEQ_LEN))
    nats, nbytes, probe = 0.0, 0, None
    for _ in range(n_batches):
        batch = torch.from_numpy(np.stack([next(rows) for _ in range(EVAL_BATCH)])).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        if probe is None:
            probe = causality_probe(model, x, tokenizer.vocab_size)
        logits = _logits(model, x, tokenizer.vocab_size)
        if not torch.isfinite(logits).all():
            raise EvaluationError("the model produced non-finite logits", 2)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        weights = token_bytes[y.reshape(-1)]
        nats += float((loss * (weights > 0)).sum())
        nbytes += int(weights.sum())
    val_bpb = nats / (math.log(2) * nbytes)
    return {"val_bpb": val_bpb, "val_bpb_hex": val_bpb.hex(), "eval_tokens": n_batches * EVAL_BATCH * MAX_SEQ_LEN, "probe_max_change": probe}


SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "data_wait_percent", "val_bpb_hex")


def print_summary(summary: dict) -> None:
    """The block the runner parses: `---` then one `key: value` per line."""
    print("---")
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:.6f}" if key == "val_bpb" else f"{value:.2f}"
        print(f"{key}: {value}")
    sys.stdout.flush()


def evaluate_main(argv: list[str]) -> int:
    """Phase 2: `prepare.py evaluate --model PATH`; exit 0, or 2 crash, 3 export failed, 4 probe failed."""
    parser = argparse.ArgumentParser(prog="prepare.py evaluate", description=evaluate_main.__doc__)
    parser.add_argument("--model", type=Path, default=OUT_DIR / "model.pt2")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"error: no exported model at {args.model} (train.py must call finish(model, budget))", file=sys.stderr)
        return EXIT_EXPORT_FAILED
    try:
        result = evaluate(args.model)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    summary_path = args.model.parent / "summary.json"
    training = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    print_summary({**training, **result})
    return 0


_configure_runtime()


# =============================================================================
# Part 3: command line
# =============================================================================


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    return build_main(argv)


if __name__ == "__main__":
    sys.exit(main())
