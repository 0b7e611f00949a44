"""The trusted harness of autoresearch-sandbox: the runtime train.py uses and the evaluation that scores it.

The agent never edits this file; it is baked read-only into every experiment image
(with contract.py, the facts it shares with the host). It holds, in reading order:
  1. constants and the runtime set-up (seed, determinism, the soft GPU memory cap);
  2. the API train.py uses: the tokenizer, a packing dataloader that opens only the
     split of the current phase, the time `Budget`, and `finish()`, which exports the
     model with torch.export;
  3. phase 2, `python prepare.py evaluate`: load the exported program without running
     any code from the archive, refuse programs that reach outside their tensors, call
     it on fresh copies of its state every time (no call sees what another did), score
     val_bpb from the model's own logits, and probe scored
     batches, positions and rows drawn from fresh entropy (a model that knows this
     file cannot know where it is probed). It prints one result line that only it
     can sign (contract.py).
Building the data is not the harness's job: the host-only package `dataprep` does it
(`python -m dataprep --source ...`) and never enters an image.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import math
import operator
import os
import pickle
import queue
import secrets
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
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
PROBE_TOLERANCE = 1e-4  # largest change (nats) of a probed log-probability allowed
PROBES_PER_BATCH = 4  # probe batches checked against every probed scored batch
PROBED_BATCHES = 16  # scored batches that are probed, drawn from fresh entropy (all of them when fewer)
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
    if not PHASE:  # standalone: score it here too, for the person at the terminal
        result = evaluate(OUT_DIR / contract.MODEL_FILE)
        print_summary({"val_bpb": float.fromhex(result["val_bpb_hex"]), **summary, **result})
    return summary


# -----------------------------------------------------------------------------
# 3. Phase 2: scoring the exported model


class EvaluationError(Exception):
    """The exported model cannot be scored; `.exit_code` tells the runner which status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Higher-order operators a plain model exports with; any other one (effects, side-effectful
# wrappers, control flow holding its own state) is refused.
_PURE_HIGHER_ORDER_OPS = {"wrap_with_autocast", "wrap_with_set_grad_enabled"}
# Operators of ATen that reach outside the tensors: reading a file (the val split is mounted
# in phase 2, so a lookup would score perfectly and still be causal) and printing.
_OUTSIDE_OPS = {"aten::from_file", "aten::_print"}
_STATE_KINDS = {"PARAMETER", "BUFFER", "CONSTANT_TENSOR"}  # what a program owns, given to it afresh at each call


def _check_pure(program) -> None:
    """Refuse exported programs that are not functions of (weights, tokens) made of ATen operators.

    What a call could leave for the next one is removed by construction (_PureProgram: every
    call runs on fresh copies of the program's tensors from a freshly seeded generator; phase 2
    fills new memory). What is refused here is what that cannot cover: a graph that reads files
    (the val split is mounted), threads effect tokens, holds non-tensor objects, or reaches
    Python beyond indexing an operator's outputs.
    Programs that declare writes to their buffers or their input are refused too, with a
    plainer reason than the scores an honest model would get without the writes.
    """
    def refuse(why: str):
        raise EvaluationError(f"the exported model is not a pure function of its input: {why}", contract.EXIT_EXPORT_FAILED)

    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        refuse(f"it writes {sorted({**signature.buffers_to_mutate, **signature.user_inputs_to_mutate}.values())}")
    if getattr(signature, "input_tokens", None) or getattr(signature, "output_tokens", None):
        refuse("it has side effects (effect tokens)")
    if any(not isinstance(value, torch.Tensor) for value in program.constants.values()):
        refuse("it holds non-tensor constants (custom objects)")
    inputs = [spec.kind.name for spec in signature.input_specs]
    if inputs.count("USER_INPUT") != 1 or any(kind not in _STATE_KINDS | {"USER_INPUT"} for kind in inputs):
        refuse(f"it must take the token batch and its own tensors only, not {inputs}")
    if [spec.kind.name for spec in signature.output_specs] != ["USER_OUTPUT"]:
        refuse("it must return the logits and nothing else")
    owners = [m for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    for owner, node in ((owner, node) for owner in owners for node in owner.graph.nodes):  # subgraphs of HOPs too
        target = node.target
        if node.op in ("call_module", "call_method"):
            refuse(f"it calls {node.op.split('_')[1]} {target}")
        if node.op == "get_attr" and not isinstance(_attribute(owner, target), torch.fx.GraphModule):
            refuse(f"it reads the attribute {target}, which is not one of its lifted tensors")
        if node.op != "call_function":
            continue
        if isinstance(target, torch._ops.HigherOrderOperator):
            if target.name() not in _PURE_HIGHER_ORDER_OPS:
                refuse(f"it calls the higher-order operator {target.name()}")
        elif not isinstance(target, torch._ops.OpOverload):
            if target is not operator.getitem:
                refuse(f"it calls the Python function {getattr(target, '__qualname__', target)}")
        elif target.namespace not in ("aten", "prims") or target._schema.name in _OUTSIDE_OPS:
            refuse(f"it calls {target}, which reaches outside its input and weights")
        elif target._schema.is_mutable:
            written = [arg.name for arg, schema in zip(node.args, target._schema.arguments)
                       if schema.alias_info is not None and schema.alias_info.is_write
                       and isinstance(arg, torch.fx.Node) and arg.op == "placeholder"]
            if written:
                refuse(f"{target} writes its input {written[0]}")


def _attribute(module: torch.nn.Module, dotted: str) -> object:
    for name in dotted.split("."):
        module = getattr(module, name, None)
    return module


class _PureProgram:
    """An exported program called as a pure function: each call gets fresh copies of the tensors the
    program owns (parameters, buffers, constants) and of its input, and whatever it writes into
    them, through any alias, view or out= argument, is dropped with the copies. The random
    generators start from the same seed at every call, so their state carries nothing either.
    No call can see what an earlier call did, whatever the graph holds. The copies cost one
    pass over the weights per call, small beside the forward pass they feed."""

    def __init__(self, program):
        owned = {**program.state_dict, **program.constants}
        self.graph = program.graph_module
        self.tensors = [None if spec.kind.name == "USER_INPUT" else owned[spec.target]
                        for spec in program.graph_signature.input_specs]
        self.device = next((t.device for t in self.tensors if t is not None), torch.device("cpu"))

    def __call__(self, x: torch.Tensor):
        torch.manual_seed(0)
        (logits,) = self.graph(*(x.clone() if t is None else t.clone() for t in self.tensors))
        return logits


def _json_keys(value) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_keys(item)


def _check_archive(path: Path) -> None:
    """Refuse archives that would make torch.export.load or .module() run code from them.

    The loader hands symbolic shape expressions to sympy, which evaluates them as Python,
    and turns `guards_code` into Python it executes. A model exported at the fixed
    evaluation shape has neither, so any archive that carries one is refused unread.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            documents = {name: json.loads(archive.read(name)) for name in archive.namelist() if name.endswith(".json")}
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as e:
        raise EvaluationError(f"cannot load the exported model {path}: {type(e).__name__}: {e}", contract.EXIT_EXPORT_FAILED)
    for name, document in documents.items():
        code = isinstance(document, dict) and (document.get("guards_code") or document.get("range_constraints"))
        if code or "expr_str" in set(_json_keys(document)):
            raise EvaluationError(f"the exported model carries symbolic shapes or guard code ({name}): export it at "
                                  "the fixed evaluation shape", contract.EXIT_EXPORT_FAILED)


def _load_exported(path: Path):
    """The exported program as a pure function, loaded without running anything from the archive.

    torch.export.load falls back to a full pickle load for some payloads, which would run
    code from the archive; TORCH_FORCE_WEIGHTS_ONLY_LOAD makes every torch.load inside it
    refuse anything but tensors and plain containers, and _check_archive refuses the
    parts it would hand to sympy or exec.
    """
    _check_archive(path)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with warnings.catch_warnings():  # loading warns that its read-only buffers are shared
            warnings.simplefilter("ignore", UserWarning)
            program = torch.export.load(path)
    except Exception as e:
        raise EvaluationError(f"cannot load the exported model {path}: {type(e).__name__}: {e}", contract.EXIT_EXPORT_FAILED)
    _check_pure(program)
    model = _PureProgram(program)
    return model, model.device, sum(t.numel() for t in program.state_dict.values())


def _logits(model, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    try:
        logits = model(x)
    except Exception as e:
        raise EvaluationError(f"the exported model failed on the evaluation batch: {type(e).__name__}: {e}", contract.EXIT_EXPORT_FAILED)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (*x.shape, vocab_size):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvaluationError(f"the model must return logits of shape {(*x.shape, vocab_size)}, got {shape}", contract.EXIT_EXPORT_FAILED)
    logits = logits.float()
    if not torch.isfinite(logits).all():
        raise EvaluationError("the model produced non-finite logits", contract.EXIT_CRASH)
    return logits


class Probe:
    """Checks, on PROBED_BATCHES scored batches, that a row's logits depend on nothing but its own past.

    Which batches are probed is drawn from fresh entropy; a model cannot keep state
    between calls (_PureProgram), so it cannot tell a probed batch from another. Around
    the scored call, PROBES_PER_BATCH probe batches are built from it with draws
    from fresh entropy: each row is either *causal* (it keeps its tokens up to a random
    cut and gets another real text after it: its logits up to the cut must not move) or
    *replaced* (swapped for another real row). Every compared logit must stay where the
    scored call put it, which catches looking ahead at the cut and reading other rows.
    The scored call's place among the calls is drawn too, so call order tells a model
    nothing. A model that looks ahead at a share f of positions escapes one probed row
    with probability 1 - f, and every probed batch probes about 3/4 of its rows PROBES_PER_BATCH times.
    """

    def __init__(self, seed: int, vocab_size: int):
        self.seed, self.vocab_size, self.per_batch = seed, vocab_size, PROBES_PER_BATCH
        self.rows = 0
        self.max_change = 0.0
        self._generator = torch.Generator().manual_seed(seed)

    def choose(self, n_batches: int) -> set[int]:
        """The scored batches to probe."""
        return set(torch.randperm(n_batches, generator=self._generator)[:PROBED_BATCHES].tolist())

    def _variant(self, x: torch.Tensor, donors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A probe batch built from x and real rows, and the mask of logits that must not move."""
        g, (batch, length) = self._generator, x.shape
        replaced = torch.rand(batch, generator=g) < 0.25
        if bool(replaced.all()):
            replaced[0] = False
        cut = torch.randint(0, length - 1, (batch, 1), generator=g)  # compare positions <= cut
        after = torch.arange(length)[None, :] > cut
        change = (replaced[:, None] | after).to(x.device)
        donor_rows = donors[torch.randperm(batch, generator=g)].to(x.device)
        self.rows += int((~replaced).sum())
        return torch.where(change, donor_rows, x), (~replaced[:, None] & ~after).to(x.device)

    def _compare(self, scored: torch.Tensor, probed: torch.Tensor, compare: torch.Tensor) -> None:
        """Compare log-probabilities, not logits: they are what is scored, and a constant added to every
        logit of a position (which changes nothing) cannot inflate the scale a change is judged against."""
        moved = ((torch.log_softmax(probed, dim=-1) - scored).abs().amax(dim=-1) * compare).amax()
        self.max_change = max(self.max_change, float(moved.detach()))
        if self.max_change > PROBE_TOLERANCE:
            raise EvaluationError(f"causality probe failed: changing later tokens or other rows moved log-probabilities "
                                  f"by {self.max_change:.2e} nats; a model may only read its own row's past",
                                  contract.EXIT_PROBE_FAILED)

    def scored_logits(self, model, x: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
        """The logits of batch x, checked against probe batches built from x and the real rows `donors`."""
        scored_at = int(torch.randint(0, self.per_batch + 1, (1,), generator=self._generator))
        early, logits, scored = [], None, None
        for call in range(self.per_batch + 1):
            if call == scored_at:
                logits = _logits(model, x, self.vocab_size)
                scored = torch.log_softmax(logits, dim=-1)
                for probed, compare in early:
                    self._compare(scored, probed, compare)
                early.clear()
                continue
            probe_x, compare = self._variant(x, donors)
            probed = _logits(model, probe_x, self.vocab_size)
            if scored is None:
                early.append((probed, compare))
            else:
                self._compare(scored, probed, compare)
        return logits


def _token_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")


@torch.no_grad()
def evaluate(model_path: Path) -> dict:
    """Score an exported model on the first EVAL_TOKENS of the val split; the result fields of contract.py.

    Cross-entropy is computed here from the model's logits; bits per byte divide the
    summed nats by ln(2) times the UTF-8 bytes of the target tokens, with special
    tokens (BOS) excluded from both sums, so the number does not depend on the
    tokenizer's vocabulary size. The scored tokens are the same for every experiment;
    the probes are not (fresh entropy, recorded in the result).
    """
    torch.set_float32_matmul_precision("high")  # TF32 matmuls: an exported fp32 model scores ~4x faster on a GPU
    model, device, num_params = _load_exported(Path(model_path))
    tokenizer = get_tokenizer()
    token_bytes = torch.from_numpy(tokenizer.token_bytes.astype(np.int64)).to(device)
    rows = _packed_rows("val", MAX_SEQ_LEN + 1, seed=0)  # fixed order: every experiment sees the same tokens
    n_batches = max(1, EVAL_TOKENS // (EVAL_BATCH * MAX_SEQ_LEN))
    batches = [torch.from_numpy(np.stack([next(rows) for _ in range(EVAL_BATCH)])) for _ in range(n_batches)]
    probe = Probe(secrets.randbits(63), tokenizer.vocab_size)
    probed = probe.choose(n_batches)
    donors = {i: torch.from_numpy(np.stack([next(rows) for _ in range(EVAL_BATCH)]))[:, :-1] for i in sorted(probed)}
    nats, nbytes, first_losses = 0.0, 0, None
    for i, batch in enumerate(batches):
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        logits = probe.scored_logits(model, x, donors[i]) if i in probed else _logits(model, x, tokenizer.vocab_size)
        losses = _token_losses(logits, y)
        weights = token_bytes[y.reshape(-1)]
        nats += float((losses * (weights > 0)).sum())
        nbytes += int(weights.sum())
        first_losses = losses if first_losses is None else first_losses
    x, y = batches[0][:, :-1].to(device), batches[0][:, 1:].to(device)  # the same batch again must score the same
    drift = float((_token_losses(_logits(model, x, tokenizer.vocab_size), y) - first_losses).abs().max())
    if drift > PROBE_TOLERANCE * max(1.0, float(first_losses.abs().max())):
        raise EvaluationError(f"the model scored the same batch differently on a later call (by {drift:.2e} nats): "
                              "it keeps state between calls", contract.EXIT_PROBE_FAILED)
    val_bpb = nats / (math.log(2) * nbytes)
    return {"val_bpb_hex": val_bpb.hex(), "eval_tokens": n_batches * EVAL_BATCH * MAX_SEQ_LEN, "eval_bytes": nbytes,
            "num_params": num_params, "probe_seed": f"{probe.seed:016x}", "probe_rows": probe.rows,
            "probe_max_change": probe.max_change}


def print_summary(summary: dict) -> None:
    """For a person at a terminal (standalone runs): `---` then `key: value` lines. Never parsed."""
    print("---")
    for key, value in summary.items():
        print(f"{key}: {value:.6f}" if isinstance(value, float) else f"{key}: {value}")
    sys.stdout.flush()


def evaluate_main(argv: list[str]) -> int:
    """Phase 2: `prepare.py evaluate [--model PATH]`; prints the result line, exits 0 or with an EXIT_* code."""
    parser = argparse.ArgumentParser(prog="prepare.py evaluate", description=evaluate_main.__doc__)
    parser.add_argument("--model", type=Path, default=OUT_DIR / contract.MODEL_FILE)
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"error: no exported model at {args.model} (train.py must call finish(model, budget))", file=sys.stderr)
        return contract.EXIT_EXPORT_FAILED
    try:
        result = evaluate(args.model)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(contract.result_line(os.environ.get(contract.RESULT_NONCE_ENV, "standalone"), result), flush=True)
    return 0


_configure_runtime()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    print("error: prepare.py is the experiment harness (`prepare.py evaluate`); build data on the host with "
          "`uv run python -m dataprep --source ...`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
