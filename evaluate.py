"""Phase 2 of the trusted harness: `python evaluate.py` scores the model phase 1 exported.

It loads the exported program without running any code from the archive, refuses programs
that reach outside their tensors, calls it on fresh copies of its state every time (no call
sees what another did), scores val_bpb from the model's own logits, and probes scored
batches, positions and rows drawn from fresh entropy (a model that knows this file cannot
know where it is probed). It prints one result line that only it can sign (contract.py).
The runtime (profile, data, determinism) is prepare.py's, imported first.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import secrets
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

import contract
import prepare
from prepare import EVAL_BATCH, EVAL_TOKENS, MAX_SEQ_LEN

PROBE_TOLERANCE = 1e-4  # largest change (nats) of a probed log-probability allowed
PROBES_PER_BATCH = 4  # probe batches checked against every probed scored batch
PROBED_BATCHES = 16  # scored batches that are probed, drawn from fresh entropy (all of them when fewer)


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
    tokenizer = prepare.get_tokenizer()
    token_bytes = torch.from_numpy(tokenizer.token_bytes.astype(np.int64)).to(device)
    rows = prepare._packed_rows("val", MAX_SEQ_LEN + 1, seed=0)  # fixed order: every experiment sees the same tokens
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
    """Phase 2: `python evaluate.py [--model PATH]`; prints the result line, exits 0 or with an EXIT_* code."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description=evaluate_main.__doc__)
    parser.add_argument("--model", type=Path, default=prepare.OUT_DIR / contract.MODEL_FILE)
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


if __name__ == "__main__":
    sys.exit(evaluate_main(sys.argv[1:]))
