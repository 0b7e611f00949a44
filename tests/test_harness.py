"""The runtime half of prepare.py: packing, the budget, export, evaluation, the probe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import contract
import evaluate as phase2
import prepare
from tests.conftest import ROOT


@pytest.fixture
def harness(tiny_data, tmp_path, monkeypatch):
    """prepare.py pointed at the tiny dataset, standalone, writing to a temporary /out."""
    monkeypatch.setattr(prepare, "DATA_DIR", tiny_data)
    monkeypatch.setattr(prepare, "OUT_DIR", tmp_path / "out")
    monkeypatch.setattr(prepare, "PHASE", "")
    monkeypatch.setattr(prepare, "_TOKENIZER", None)
    monkeypatch.delenv("AR_REPLAY", raising=False)
    return prepare


class Bigram(torch.nn.Module):
    """A causal model: logits at t depend on token t only."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx):
        return self.table(idx)


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, idx):
        return self.bias.expand(*idx.shape, self.vocab)


class PeeksAhead(Bigram):
    """Adds the embedding of the next token: the leak the probe must catch."""

    def forward(self, idx):
        future = torch.cat([idx[:, 1:], idx[:, :1]], dim=1)
        return self.table(idx) + self.table(future)


def test_tokenizer_round_trip(harness):
    tok = harness.get_tokenizer()
    text = "The old sailor paints the map again. Counting: 3 4 5."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.bos_id == tok.vocab_size - 1
    assert tok.decode(ids[1:]) == text
    assert tok.token_bytes[tok.bos_id] == 0 and tok.token_bytes[:-1].min() >= 1


def test_packed_rows_start_with_bos_and_are_deterministic(harness):
    bos = harness.get_tokenizer().bos_id
    rows = harness._packed_rows("train", 65, seed=7)
    first = [next(rows) for _ in range(50)]
    assert all(len(r) == 65 and r[0] == bos for r in first)
    again = harness._packed_rows("train", 65, seed=7)
    assert all(np.array_equal(a, next(again)) for a in first)
    other = harness._packed_rows("train", 65, seed=8)
    assert not all(np.array_equal(a, next(other)) for a in first)


def test_packing_keeps_documents_whole_when_they_fit(harness):
    tokens, docs = harness._open_split("train")
    bos = harness.get_tokenizer().bos_id
    row_len = int(np.diff(docs).max()) + 1  # every document fits in a row
    row = next(harness._packed_rows("train", row_len, seed=0))
    starts = np.flatnonzero(row == bos)
    known = {tuple(tokens[a:b]) for a, b in zip(docs[:-1], docs[1:])}
    for a, b in zip(starts[:-1], starts[1:]):  # all but the last (possibly cropped) piece are whole documents
        assert tuple(row[a:b]) in known


def test_split_guard(harness, monkeypatch):
    monkeypatch.setattr(harness, "PHASE", "train")
    harness._open_split("train")
    with pytest.raises(PermissionError):
        harness._open_split("val")
    monkeypatch.setattr(harness, "PHASE", "eval")
    with pytest.raises(PermissionError):
        harness._open_split("train")


def test_dataloader_shapes(harness):
    x, y = next(harness.make_dataloader(4, 32))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def spin(seconds: float) -> None:
    """Work on the CPU for `seconds` of this thread's CPU time (the CPU budget's clock)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_budget_record_and_replay(harness, tmp_path, monkeypatch):
    budget, seen = harness.Budget(seconds=0.3), []
    while not budget.done:
        seen.append(budget.progress)
        spin(0.01 * (1 + len(seen) % 3))
        budget.step(tokens=10)
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(budget.trace()))
    assert budget.step_count > harness.WARMUP_STEPS and seen == budget.progress_log
    assert all(round(p * contract.PROGRESS_GRID) / contract.PROGRESS_GRID == p for p in seen)  # on the grid

    trace.write_text(contract.replay_schedule(contract.parse_trace(trace.read_text())))  # as the host writes it
    monkeypatch.setenv("AR_REPLAY", str(trace))
    replay, replayed = harness.Budget(seconds=0.3), []
    while not replay.done:
        replayed.append(replay.progress)
        replay.step(tokens=10)  # no sleeping: replay ignores the clock
    assert replayed == seen and replay.step_count == budget.step_count


def test_on_the_cpu_the_budget_counts_cpu_time_per_thread_and_not_waiting(harness, monkeypatch):
    monkeypatch.setattr(harness, "CPU_THREADS", 2)
    budget = harness.Budget(seconds=0.2)  # 0.4 CPU seconds of two threads
    for _ in range(harness.WARMUP_STEPS):
        budget.step(tokens=1)
    time.sleep(0.5)  # waiting (for a CPU another process holds) costs no budget
    budget.step(tokens=1)
    assert budget.training_seconds < 0.1 and not budget.done
    spin(0.45)
    budget.step(tokens=1)
    assert budget.done and 0.2 <= budget.training_seconds < 0.3


def test_on_the_cpu_the_budget_starts_before_the_first_step(harness, monkeypatch, capsys):
    """Nothing compiles on the CPU, so no step is untimed: a larger model's first steps are training, not start-up."""
    monkeypatch.setattr(harness, "CPU_THREADS", 1)
    budget = harness.Budget(seconds=0.05)
    assert capsys.readouterr().out.strip() == contract.BUDGET_START_MARK
    spin(0.06)
    budget.step(tokens=1)
    assert budget.done and budget.step_count == 1 and budget.tokens == 1 and budget.training_seconds >= 0.05


def test_bits_per_byte_of_a_uniform_model(harness, tmp_path):
    """A uniform model costs log2(V) bits per scored token: val_bpb = log2(V) * tokens / bytes."""
    tok = harness.get_tokenizer()
    model = Uniform(tok.vocab_size)
    program = torch.export.export(model, (torch.zeros(harness.EVAL_BATCH, harness.MAX_SEQ_LEN, dtype=torch.long),))
    torch.export.save(program, tmp_path / "model.pt2")
    result = phase2.evaluate(tmp_path / "model.pt2")
    val_bpb = float.fromhex(result["val_bpb_hex"])

    rows = harness._packed_rows("val", harness.MAX_SEQ_LEN + 1, seed=0)
    n_rows = max(1, harness.EVAL_TOKENS // (harness.EVAL_BATCH * harness.MAX_SEQ_LEN)) * harness.EVAL_BATCH
    targets = np.stack([next(rows) for _ in range(n_rows)])[:, 1:]
    nbytes = tok.token_bytes[targets]
    expected = math.log2(tok.vocab_size) * np.count_nonzero(nbytes) / nbytes.sum()
    assert val_bpb == pytest.approx(expected, rel=1e-5)
    assert result["eval_tokens"] == n_rows * harness.MAX_SEQ_LEN and result["eval_bytes"] == nbytes.sum()
    assert result["num_params"] == tok.vocab_size


def test_causality_probe(harness):
    vocab = harness.get_tokenizer().vocab_size
    generator = torch.Generator().manual_seed(0)
    x, donors = (torch.randint(0, vocab, (8, 48), generator=generator) for _ in range(2))
    probe, model = phase2.Probe(seed=1, vocab_size=vocab), Bigram(vocab)
    assert torch.equal(probe.scored_logits(model, x, donors), model(x))  # the scored call's logits, unchanged
    assert probe.max_change == 0.0 and probe.rows > 0
    with pytest.raises(phase2.EvaluationError) as leak:
        phase2.Probe(seed=1, vocab_size=vocab).scored_logits(PeeksAhead(vocab), x, donors)
    assert leak.value.exit_code == contract.EXIT_PROBE_FAILED


def test_a_huge_constant_logit_cannot_hide_a_look_ahead(harness):
    """Adding the same large number to every logit changes no probability; it must not widen the tolerance."""
    vocab = harness.get_tokenizer().vocab_size

    class Offset(Bigram):
        def forward(self, idx):
            ahead = torch.nn.functional.one_hot(torch.roll(idx, -1, 1), vocab).float()
            return self.table(idx) + 30 * ahead + 1e6

    generator = torch.Generator().manual_seed(0)
    x, donors = (torch.randint(0, vocab, (8, 48), generator=generator) for _ in range(2))
    with pytest.raises(phase2.EvaluationError, match="causality probe failed"):
        phase2.Probe(seed=3, vocab_size=vocab).scored_logits(Offset(vocab), x, donors)


def test_the_probed_batches_are_drawn_afresh_and_all_when_few(harness):
    a, b = phase2.Probe(1, 10).choose(100), phase2.Probe(2, 10).choose(100)
    assert len(a) == len(b) == phase2.PROBED_BATCHES and a != b and max(a | b) < 100
    assert phase2.Probe(3, 10).choose(5) == set(range(5))


def test_probe_positions_come_from_fresh_entropy(harness):
    """Two evaluations of the same model draw different probes: nothing about them is fixed in the code."""
    vocab = harness.get_tokenizer().vocab_size
    program = torch.export.export(Bigram(vocab), (torch.zeros(harness.EVAL_BATCH, harness.MAX_SEQ_LEN, dtype=torch.long),))
    path = harness.OUT_DIR / "model.pt2"
    path.parent.mkdir(parents=True)
    torch.export.save(program, path)
    first, second = phase2.evaluate(path), phase2.evaluate(path)
    assert first["probe_seed"] != second["probe_seed"]
    assert first["val_bpb_hex"] == second["val_bpb_hex"]  # the scored tokens are the same every time
    assert first["probe_rows"] >= phase2.PROBES_PER_BATCH * harness.EVAL_BATCH // 2


def test_phase_2_always_scores_with_deterministic_algorithms(tiny_data):
    """Phase 2 compares calls of the model bit for bit (probes, the repeat check), so it runs deterministic
    algorithms even in a night without AR_DETERMINISTIC, where a kernel without a deterministic version warns."""
    show = ("import prepare, torch; print(torch.are_deterministic_algorithms_enabled(), "
            "torch.is_deterministic_algorithms_warn_only_enabled())")
    seen = {}
    for phase, deterministic in (("eval", ""), ("eval", "1"), ("train", ""), ("train", "1")):
        env = {**os.environ, "AR_DATA_DIR": str(tiny_data), "AR_PROFILE": "cpu", "AR_PHASE": phase,
               "AR_DETERMINISTIC": deterministic}
        run = subprocess.run([sys.executable, "-c", show], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        seen[phase, deterministic] = run.stdout.split()
    assert seen == {("eval", ""): ["True", "True"], ("eval", "1"): ["True", "False"],
                    ("train", ""): ["False", "False"], ("train", "1"): ["True", "False"]}


def test_soft_gpu_cap_names_a_device_index(harness, monkeypatch):
    """set_per_process_memory_fraction rejects torch.device("cuda") (no index): the cap must pass an index."""
    calls = []

    def set_fraction(fraction, device):
        torch.cuda._utils._get_device_index(device, optional=False)  # what torch does first; raises without an index
        calls.append((fraction, device))

    monkeypatch.setattr(harness, "DEVICE", torch.device("cuda"))
    monkeypatch.setenv("AR_GPU_MEMORY_CAP", str(40 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 80 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    harness._soft_gpu_cap()
    assert calls == [(0.5, 0)]


def test_finish_exports_and_evaluate_reads_it(harness, capsys):
    vocab = harness.get_tokenizer().vocab_size
    budget = harness.Budget(seconds=0.05)
    while not budget.done:
        budget.step(tokens=1)
    summary = harness.finish(Bigram(vocab), budget, depth=1)
    out = harness.OUT_DIR
    assert {"model.pt2", "trace.json", "summary.json"} <= {p.name for p in out.iterdir()}
    assert summary["num_steps"] == budget.step_count
    printed = capsys.readouterr().out
    assert "\n---\nval_bpb: " in printed  # standalone: finish also evaluates, for the person at the terminal
    assert contract.BUDGET_START_MARK in printed  # the host's budget clock starts on this line
    assert phase2.evaluate_main(["--model", str(out / "model.pt2")]) == 0
    result = contract.parse_result(capsys.readouterr().out, "standalone")
    assert result["val_bpb"] > 0 and "depth" not in result  # phase 2 prints its own figures only


class Factored(torch.nn.Module):
    """A bigram through a narrow matmul, so that the precision it runs in shows in its logits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab, bias=False)

    def forward(self, idx):
        return self.head(self.table(idx)).float()


def test_the_model_is_exported_and_scored_in_the_precision_it_trains_in(harness, monkeypatch):
    """On the GPU the model is exported under bf16 autocast (EXPORT_AUTOCAST) and phase 2 runs it so; the same
    mechanism is exercised here on the CPU. The region survives the export, and the probes still see no change."""
    vocab = harness.get_tokenizer().vocab_size
    torch.manual_seed(0)
    model = Factored(vocab)
    budget = harness.Budget(seconds=0.0)
    results, regions = {}, {}
    for dtype in (None, torch.bfloat16):
        monkeypatch.setattr(harness, "EXPORT_AUTOCAST", dtype)
        harness.finish(model, budget)
        program = torch.export.load(harness.OUT_DIR / "model.pt2")
        regions[dtype] = [node.args[:2] for node in program.graph.nodes
                          if node.target is torch.ops.higher_order.wrap_with_autocast]
        results[dtype] = phase2.evaluate(harness.OUT_DIR / "model.pt2")
    assert regions == {None: [], torch.bfloat16: [("cpu", torch.bfloat16)]}
    full, half = (float.fromhex(results[d]["val_bpb_hex"]) for d in (None, torch.bfloat16))
    assert full != half and abs(full - half) < 0.01 * full  # the bf16 matmul ran, and scores about the same
    assert results[torch.bfloat16]["probe_max_change"] == 0.0  # rows stay independent of each other in bf16


class CountsCalls(Bigram):
    """Writes a buffer on every call: state that could tell probes from scored calls."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, idx):
        self.calls += 1
        return self.table(idx) * self.calls


class WritesItsInput(Bigram):
    def forward(self, idx):
        idx.clamp_(0, self.table.num_embeddings - 1)
        return self.table(idx)


def test_the_autocast_region_hides_no_state(harness, monkeypatch):
    """The bf16 export puts the whole model inside a wrap_with_autocast region; a model that writes its buffers
    or its input there is refused as it is without the region."""
    monkeypatch.setattr(harness, "EXPORT_AUTOCAST", torch.bfloat16)
    vocab = harness.get_tokenizer().vocab_size
    for model in (CountsCalls(vocab), WritesItsInput(vocab)):
        with pytest.raises(phase2.EvaluationError, match="not a pure function") as refused:
            harness.finish(model, harness.Budget(seconds=0.0))  # standalone: finish exports, then evaluates
        assert refused.value.exit_code == contract.EXIT_EXPORT_FAILED
        program = torch.export.load(harness.OUT_DIR / "model.pt2")
        assert any(node.target is torch.ops.higher_order.wrap_with_autocast for node in program.graph.nodes)


def test_evaluate_main_statuses(harness, tmp_path):
    assert phase2.evaluate_main(["--model", str(tmp_path / "missing.pt2")]) == contract.EXIT_EXPORT_FAILED
    (tmp_path / "junk.pt2").write_bytes(b"not a model")
    assert phase2.evaluate_main(["--model", str(tmp_path / "junk.pt2")]) == contract.EXIT_EXPORT_FAILED
    vocab = harness.get_tokenizer().vocab_size
    shape = (harness.EVAL_BATCH, harness.MAX_SEQ_LEN)
    torch.export.save(torch.export.export(PeeksAhead(vocab), (torch.zeros(shape, dtype=torch.long),)), tmp_path / "leak.pt2")
    assert phase2.evaluate_main(["--model", str(tmp_path / "leak.pt2")]) == contract.EXIT_PROBE_FAILED


@pytest.mark.slow
def test_train_py_learns_below_the_unigram_baseline(tiny_data, tmp_path):
    """The real train.py on the CPU profile, standalone, for a few seconds."""
    env = {**os.environ, "AR_DATA_DIR": str(tiny_data), "AR_OUT_DIR": str(tmp_path), "AR_TIME_BUDGET": "8",
           "AR_PROFILE": "cpu", "AR_PHASE": ""}
    run = subprocess.run([sys.executable, "train.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = dict(line.split(": ", 1) for line in run.stdout.split("\n---\n")[-1].splitlines() if ": " in line)
    val_bpb = float(summary["val_bpb"])

    train = np.fromfile(tiny_data / "train" / "tokens.bin", dtype=np.uint16)
    token_bytes = np.load(tiny_data / "tokenizer" / "token_bytes.npy")
    counts = np.bincount(train, minlength=len(token_bytes)).astype(float) + 1
    val = np.fromfile(tiny_data / "val" / "tokens.bin", dtype=np.uint16)
    scored = val[token_bytes[val] > 0]
    unigram_bpb = -np.log2(counts[scored] / counts.sum()).sum() / token_bytes[scored].sum()
    assert val_bpb < unigram_bpb, (val_bpb, unigram_bpb)


def test_an_archive_with_code_in_it_is_refused_unrun(harness, tmp_path, capsys):
    """torch.export.load evaluates symbolic sizes with sympy (Python eval) and .module() executes guards_code:
    an archive carrying either is refused before torch reads it."""
    import zipfile

    vocab = harness.get_tokenizer().vocab_size
    shape = (harness.EVAL_BATCH, harness.MAX_SEQ_LEN)
    torch.export.save(torch.export.export(Bigram(vocab), (torch.zeros(shape, dtype=torch.long),)), tmp_path / "m.pt2")
    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in files if n.endswith("models/model.json"))
    payload = "__import__('builtins').print('PAYLOAD-RAN') or 1"
    for key, edit in (("sympy", lambda p: p["graph_module"]["graph"]["tensor_values"][next(iter(
                          p["graph_module"]["graph"]["tensor_values"]))]["sizes"].__setitem__(
                          0, {"as_expr": {"expr_str": payload, "hint": {"as_int": 1}}})),
                      ("guards", lambda p: p.__setitem__("guards_code", [payload]))):
        program = json.loads(files[name])
        edit(program)
        with zipfile.ZipFile(tmp_path / f"{key}.pt2", "w") as archive:
            for member, data in {**files, name: json.dumps(program).encode()}.items():
                archive.writestr(member, data)
        assert phase2.evaluate_main(["--model", str(tmp_path / f"{key}.pt2")]) == contract.EXIT_EXPORT_FAILED
        printed = capsys.readouterr()
        assert "PAYLOAD-RAN" not in printed.out + printed.err and "guard code" in printed.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_soft_gpu_cap_is_set_on_a_real_gpu(tiny_data):
    """Importing the harness with a cap set used to crash every capped run before training."""
    env = {**os.environ, "AR_DATA_DIR": str(tiny_data), "AR_PROFILE": "gpu", "AR_GPU_MEMORY_CAP": str(2**30)}
    probe = "import prepare, torch; torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')"
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == contract.EXIT_GPU_OOM, run.stderr[-2000:]  # refused by the soft cap, not a crash
    assert "OutOfMemoryError" in run.stderr


def test_programs_that_reach_outside_their_tensors_are_refused(harness, tmp_path):
    """A graph that reads a file (the val split is mounted in phase 2) or calls a non-ATen operator is refused,
    however it got into the archive (torch.export cannot trace from_file; a hand-made archive can hold it)."""
    vocab = harness.get_tokenizer().vocab_size
    shape = (harness.EVAL_BATCH, harness.MAX_SEQ_LEN)
    for target, args in ((torch.ops.aten.from_file.default, ("/data/val/tokens.bin", False, 16)),
                         (torch.ops.aten._print.default, ("hello",)),
                         (torch.ops.profiler._record_function_enter.default, ("x", None))):
        program = torch.export.export(Bigram(vocab), (torch.zeros(shape, dtype=torch.long),))
        output = next(node for node in program.graph.nodes if node.op == "output")
        with program.graph.inserting_before(output):
            program.graph.call_function(target, args)
        with pytest.raises(phase2.EvaluationError, match="reaches outside") as refused:
            phase2._check_pure(program)
        assert refused.value.exit_code == contract.EXIT_EXPORT_FAILED
    phase2._check_pure(torch.export.export(Bigram(vocab), (torch.zeros(shape, dtype=torch.long),)))


# -- no call of the scored model sees what an earlier call did -----------------------------------------------

class Remembers(Bigram):
    """Keeps the last batch it was shown in its own tensors and, where a row's prefix is one it has seen,
    puts a large logit on the token that followed there: with memory across calls the probe variants and
    the repeat check hand it the answers. `write` is how it stores the batch, one alias route per case."""

    def __init__(self, vocab: int, rows: int, length: int, write):
        super().__init__(vocab)
        self.mem = torch.nn.Parameter(torch.full((rows, length), -1.0), requires_grad=False)
        self.register_buffer("scratch", torch.full((rows, length), -1.0), persistent=False)
        self.lifted = torch.full((rows, length), -1.0)  # a plain tensor attribute: a lifted constant
        self.write = write

    def memory(self) -> torch.Tensor:
        return torch.maximum(torch.maximum(self.mem, self.scratch), self.lifted)

    def forward(self, idx):
        seen = self.memory().long()
        same = (idx == seen).long().cumprod(dim=1)  # the row agrees with the remembered one up to here
        follows = torch.roll(seen, -1, 1).clamp(min=0)
        boost = torch.nn.functional.one_hot(follows, self.table.num_embeddings).float() * same[..., None] * 30.0
        if self.write is not None:
            self.write(self, idx.float())
        return self.table(idx) + boost


def _aliased_add_out(m, x):
    torch.ops.aten.add.out(x, torch.zeros_like(x), out=m.mem[:])


MEMORY_WRITES = {
    "parameter through a view": lambda m, x: m.mem[:].copy_(x),
    "parameter through a flat view": lambda m, x: m.mem.view(-1).copy_(x.view(-1)),
    "parameter through as_strided": lambda m, x: m.mem.as_strided(m.mem.shape, m.mem.stride()).copy_(x),
    "parameter as an out= argument": _aliased_add_out,
    "non-persistent buffer through a slice": lambda m, x: m.scratch[0:].index_copy_(0, torch.arange(x.shape[0]), x),
    "lifted constant through a view": lambda m, x: m.lifted.view(m.lifted.shape).copy_(x),
}


@pytest.mark.parametrize("route", list(MEMORY_WRITES))
def test_a_model_that_writes_its_tensors_scores_as_if_it_had_not(harness, route):
    """Every call runs on fresh copies of the program's tensors: a model that stores what it is shown, through
    whatever alias, scores bit for bit what the same model without the write scores."""
    vocab = harness.get_tokenizer().vocab_size
    shape = (harness.EVAL_BATCH, harness.MAX_SEQ_LEN)
    example = torch.zeros(shape, dtype=torch.long)
    torch.manual_seed(0)
    cheat = Remembers(vocab, *shape, MEMORY_WRITES[route]).eval()
    twin = Remembers(vocab, *shape, None).eval()
    twin.load_state_dict(cheat.state_dict())
    scores = {}
    for name, model in (("cheat", cheat), ("twin", twin)):
        with torch.no_grad():
            program = torch.export.export(model, (example,))
        if name == "cheat":  # the write is real: the plain module of the program remembers across calls
            module, batch = program.module(), torch.randint(0, vocab, shape)
            assert not torch.equal(module(batch), module(batch)), f"{route}: the cheat does not remember"
        torch.export.save(program, harness.OUT_DIR.parent / f"{name}.pt2")
        scores[name] = phase2.evaluate(harness.OUT_DIR.parent / f"{name}.pt2")
    assert scores["cheat"]["val_bpb_hex"] == scores["twin"]["val_bpb_hex"]
    assert scores["cheat"]["probe_max_change"] == 0.0


def test_every_call_starts_from_the_same_random_state(harness):
    """A model that draws random numbers sees the same draws at every call: the generator's state carries
    nothing from one call to the next (here: a model that could count its calls by its draws)."""
    vocab = harness.get_tokenizer().vocab_size
    shape = (harness.EVAL_BATCH, harness.MAX_SEQ_LEN)

    class Draws(Bigram):
        def forward(self, idx):
            return self.table(idx) + torch.rand(()) * 100

    with torch.no_grad():
        program = torch.export.export(Draws(vocab), (torch.zeros(shape, dtype=torch.long),))
    pure, batch = phase2._PureProgram(program), torch.randint(0, vocab, shape)
    assert torch.equal(pure(batch), pure(batch))


def test_phase_2_fills_new_memory(tiny_data):
    """Memory a call frees must not reach a later call's empty tensors: phase 2 fills new tensors (NaN), so a
    model that reads them scores non-finite logits, a crash, never a memory of an earlier call."""
    show = "import prepare, torch; print(torch.empty(4).isnan().all().item())"
    seen = {}
    for phase in ("eval", "train"):
        env = {**os.environ, "AR_DATA_DIR": str(tiny_data), "AR_PROFILE": "cpu", "AR_PHASE": phase, "AR_DETERMINISTIC": ""}
        run = subprocess.run([sys.executable, "-c", show], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        seen[phase] = run.stdout.strip()
    assert seen["eval"] == "True"


def test_programs_with_python_state_or_extra_outputs_are_refused(harness):
    """Only ATen operators, the pure higher-order regions and indexing of their results are run; a graph
    that calls a Python function, reads a tensor attribute of its own (state the fresh copies would not
    cover) or returns more than the logits is refused."""
    vocab = harness.get_tokenizer().vocab_size
    shape = (harness.EVAL_BATCH, harness.MAX_SEQ_LEN)
    for edit, message in ((lambda g: g.call_function(print, ("hello",)), "calls the Python function print"),
                          (lambda g: g.get_attr("stash"), "reads the attribute stash")):
        program = torch.export.export(Bigram(vocab), (torch.zeros(shape, dtype=torch.long),))
        program.graph_module.register_buffer("stash", torch.zeros(1))
        output = next(node for node in program.graph.nodes if node.op == "output")
        with program.graph.inserting_before(output):
            edit(program.graph)
        with pytest.raises(phase2.EvaluationError, match=message):
            phase2._check_pure(program)

    class Pair(Bigram):
        def forward(self, idx):
            return self.table(idx), idx

    with pytest.raises(phase2.EvaluationError, match="return the logits and nothing else"):
        phase2._check_pure(torch.export.export(Pair(vocab), (torch.zeros(shape, dtype=torch.long),)))
