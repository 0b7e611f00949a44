"""The trusted runtime of autoresearch-sandbox: everything train.py may use, and nothing it may change.

The agent never edits this file; it is baked read-only into every experiment image
with evaluate.py (phase 2, the scorer) and contract.py (the facts both share with the
host). It holds, in reading order:
  1. constants and the runtime set-up (seed, determinism, threads, the soft GPU memory cap);
  2. the API train.py uses: the tokenizer, a packing dataloader that opens only the
     split of the current phase, the time `Budget`, and `finish()`, which exports the
     model with torch.export (and, run by hand outside the sandbox, scores it too).
Building the data is not the harness's job: the host-only package `dataprep` does it
(`python -m dataprep --source ...`) and never enters an image.
"""

from __future__ import annotations

import bisect
import ctypes
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

import contract

# The runtime API train.py may use.
__all__ = ["PROFILE", "DEVICE", "MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "EVAL_BATCH", "SEED", "Tokenizer",
           "get_tokenizer", "make_dataloader", "Budget", "finish"]

# -----------------------------------------------------------------------------
# 1. Constants and the runtime set-up

PROFILE = contract.profile_name(torch.cuda.is_available())
_profile = contract.PROFILES[PROFILE]
MAX_SEQ_LEN, EVAL_TOKENS, EVAL_BATCH = _profile.max_seq_len, _profile.eval_tokens, _profile.eval_batch
TIME_BUDGET = float(os.environ.get(contract.TIME_BUDGET_ENV, _profile.time_budget))
# Untimed first steps, for torch.compile on the GPU; nothing compiles on the CPU profile, so its
# budget starts at once (a larger model's warm-up would otherwise look like training off the budget).
WARMUP_STEPS = 3 if PROFILE == "gpu" else 0
DATA_DIR = Path(os.environ.get(contract.DATA_DIR_ENV) or contract.cache_dir() / "offline")
OUT_DIR = Path(os.environ.get(contract.OUT_DIR_ENV) or "runs/standalone")
PHASE = os.environ.get(contract.PHASE_ENV, "")  # "train" or "eval" inside the sandbox; "" standalone
SEED = int(os.environ.get(contract.SEED_ENV, "42"))  # owned by the harness, so a seed change is never "research"
DETERMINISTIC = os.environ.get(contract.DETERMINISTIC_ENV) == "1"
DEVICE = torch.device("cuda" if PROFILE == "gpu" else "cpu")
CPU_THREADS = int(os.environ.get(contract.CPU_THREADS_ENV) or os.cpu_count() or 1)  # CPU profile (contract.py)
# The precision a model is exported, and so scored, in: bf16 autocast on the GPU, the precision train.py
# trains in (it also makes phase 2 faster), full precision on the CPU. A model that needs float32
# somewhere disables autocast inside its own forward; the export keeps that.
EXPORT_AUTOCAST = torch.bfloat16 if PROFILE == "gpu" else None
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # bf16 dense
_START = time.time()  # the harness is imported first: total_seconds counts from here
_STATS = {"data_wait": 0.0}


def _soft_gpu_cap() -> None:
    """Cap the caching allocator at AR_GPU_MEMORY_CAP bytes; the host's NVML watchdog is the hard cap."""
    cap = os.environ.get(contract.GPU_MEMORY_CAP_ENV)
    if cap and DEVICE.type == "cuda":
        index = torch.cuda.current_device()  # the call needs an index: torch.device("cuda") has none
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap) / total), index)


def _exit_on_gpu_oom(kind, error, trace) -> None:
    """An uncaught CUDA out-of-memory error ends the process with EXIT_GPU_OOM (status gpu_oom)."""
    sys.__excepthook__(kind, error, trace)
    if isinstance(error, torch.OutOfMemoryError):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(contract.EXIT_GPU_OOM)


def _configure_runtime() -> None:
    """Seeds, determinism and the soft GPU memory cap, set before train.py builds anything."""
    torch.manual_seed(SEED)
    if DETERMINISTIC or PHASE == "eval":
        # Phase 2 always scores deterministically: its probes and its repeat check compare calls in bf16 on
        # the GPU, where one sum added in another order can move a log-probability past their tolerance.
        # Without AR_DETERMINISTIC an operator that has no deterministic kernel still runs there (warn_only).
        os.environ.setdefault(*contract.CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True, warn_only=not DETERMINISTIC)
        torch.backends.cudnn.benchmark = False
        # A bit-for-bit rerun needs deterministic kernels, not new tensors filled with NaN (which only
        # matters to code that reads memory no kernel wrote, and costs about 2 % of the GPU's tokens/s).
        # Phase 2 fills them: memory a call leaves behind must not reach the next call's empty tensors.
        torch.utils.deterministic.fill_uninitialized_memory = PHASE == "eval"
    if DEVICE.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
        # glibc hands every large freed tensor back to the kernel and faults it in again on the next step, which
        # costs a CPU run about half its time; keep freed memory in the heap instead (M_MMAP_MAX 0, M_TRIM_THRESHOLD).
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only
        if mallopt is not None:
            mallopt(-4, 0)  # M_MMAP_MAX: no large block gets its own mapping
            mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: freed memory stays
    _soft_gpu_cap()
    sys.excepthook = _exit_on_gpu_oom


# -----------------------------------------------------------------------------
# 2. The API for train.py

class Tokenizer:
    """The BPE tokenizer the data was built with (dataprep), as a tiktoken Encoding plus the BOS token."""

    def __init__(self, data_dir: Path | None = None):
        data_dir = data_dir or DATA_DIR
        with open(data_dir / contract.DATA_FILES[0], "rb") as f:
            spec = pickle.load(f)
        import tiktoken

        self.enc = tiktoken.Encoding(**spec)
        self.bos_id = spec["special_tokens"][contract.BOS]
        self.vocab_size = self.enc.n_vocab
        self.token_bytes = np.load(data_dir / contract.DATA_FILES[1])

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


def _budget_clock() -> float:
    """Seconds as the budget counts them: wall time on a GPU; on the CPU, this process's CPU time
    per thread it runs (contract.CPU_THREADS_ENV), which other load on the machine does not eat."""
    if DEVICE.type == "cuda":
        return time.perf_counter()
    return time.process_time() / CPU_THREADS


class Budget:
    """The training time budget: `progress` drives the schedule, `done` ends the loop.

    Call `step(tokens)` once after every optimizer step. The first WARMUP_STEPS
    (compilation) are not timed; when they are done (on the CPU profile: when the
    budget is created) the budget announces its start,
    and from then on the host keeps its own clock: a run still going once the budget
    and the export allowance are over is stopped (sandbox/budget_guard.py). Each
    step's progress and seconds are recorded and written to OUT_DIR/trace.json by
    finish(); with AR_REPLAY=<schedule> the recorded progress values and step count are
    replayed, so a rerun follows the exact same schedule and stops at the same step.
    Progress moves on a grid of 1/contract.PROGRESS_GRID, which is what keeps a replayed
    schedule too small to carry anything else from the run that wrote it (contract.py).
    """

    def __init__(self, seconds: float = TIME_BUDGET):
        self.seconds = seconds
        self.step_count = 0
        self.tokens = 0
        self.training_seconds = 0.0
        self.step_seconds: list[float] = []
        self.progress_log: list[float] = []
        replay = os.environ.get(contract.REPLAY_ENV)
        self.replay = json.loads(Path(replay).read_text()) if replay else None
        self._last = _budget_clock()
        self.first_step_at: float | None = None  # time.time() when the first timed step began
        if WARMUP_STEPS == 0:
            self._start()

    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]."""
        if self.replay is not None:
            recorded = self.replay["progress"]
            return recorded[self.step_count] if self.step_count < len(recorded) else 1.0
        used = math.floor(self.training_seconds / self.seconds * contract.PROGRESS_GRID)
        return min(used, contract.PROGRESS_GRID) / contract.PROGRESS_GRID

    @property
    def done(self) -> bool:
        if self.replay is not None:
            return self.step_count >= self.replay["num_steps"]
        return self.training_seconds >= self.seconds

    def step(self, tokens: int) -> None:
        self.progress_log.append(self.progress)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        now = _budget_clock()
        dt, self._last = now - self._last, now
        self.step_count += 1
        self.step_seconds.append(dt)
        if self.step_count > WARMUP_STEPS:
            self.training_seconds += dt
            self.tokens += tokens
        elif self.step_count == WARMUP_STEPS:
            self._start()

    def _start(self) -> None:
        self.first_step_at = time.time()
        print(f"\n{contract.BUDGET_START_MARK}", flush=True)  # the host starts its own budget clock here

    def trace(self) -> dict:
        return {"time_budget": self.seconds, "warmup_steps": WARMUP_STEPS, "num_steps": self.step_count,
                "progress": self.progress_log, "step_seconds": self.step_seconds}


def _peak_flops() -> float | None:
    if DEVICE.type != "cuda":
        return None
    name = torch.cuda.get_device_name(DEVICE)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class _Autocast(torch.nn.Module):
    """A model run under autocast. torch.export keeps autocast only where forward enters it
    (as a wrap_with_autocast region); around the export call it would trace dtypes it cannot replay."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, idx):
        with torch.autocast(idx.device.type, dtype=self.dtype):
            return self.model(idx)


def finish(model: torch.nn.Module, budget: Budget, *, depth: int | None = None, flops_per_token: float | None = None) -> dict:
    """End of training: export the model for phase 2 and write the training summary.

    The model is exported with torch.export at the evaluation shape
    [EVAL_BATCH, MAX_SEQ_LEN] -> logits [EVAL_BATCH, MAX_SEQ_LEN, vocab], under
    EXPORT_AUTOCAST; it must be causal and must not need train.py to run. Standalone
    (outside the sandbox) the model is also evaluated here and the summary block printed.
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model.eval()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / contract.TRACE_FILE).write_text(json.dumps(budget.trace()))
    t0 = time.time()
    example = torch.zeros(EVAL_BATCH, MAX_SEQ_LEN, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        program = torch.export.export(_Autocast(model, EXPORT_AUTOCAST) if EXPORT_AUTOCAST else model, (example,))
    torch.export.save(program, OUT_DIR / contract.MODEL_FILE)
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
    (OUT_DIR / contract.REPORT_FILE).write_text(json.dumps(summary, indent=1))
    print(f"\nexported model to {OUT_DIR / contract.MODEL_FILE} in {summary['export_seconds']:.1f}s", flush=True)
    if not PHASE:  # standalone: score it here too (evaluate.py, phase 2's scorer), for the person at the terminal
        import evaluate

        result = evaluate.evaluate(OUT_DIR / contract.MODEL_FILE)
        evaluate.print_summary({"val_bpb": float.fromhex(result["val_bpb_hex"]), **summary, **result})
    return summary


_configure_runtime()


def main() -> int:
    print("error: prepare.py is the runtime train.py imports; phase 2 is `python evaluate.py`, and data is built on "
          "the host with `uv run python -m dataprep --source ...`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
