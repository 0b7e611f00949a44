"""The offline search agent: constants found by ast, exact edits, real diffs, learning from history."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from runner.agents.base import AgentError, Context, HistoryRow
from runner.agents.config import SearchConfig
from runner.agents.factory import choose_agent, make_agent
from runner.agents.hyperparameters import hyperparameters
from runner.agents.search_agent import SearchAgent, _past_trials, space_for

TRAIN_PY = '''\
"""A small train.py in the style of the reference."""
import torch

GPU = torch.cuda.is_available()

# Model architecture
ASPECT_RATIO = 64       # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128 if GPU else 32  # attention head dimension
WINDOW_PATTERN = 'SSSL' # sliding window pattern

# Optimization
TOTAL_BATCH_SIZE = 2**19 if GPU else 2**13
EMBEDDING_LR = 0.6
MATRIX_LR = 0.04        # Muon
WEIGHT_DECAY: float = 0.2
ADAM_BETA1 = 0.8
WARMDOWN_RATIO = 0.5
DEPTH = 8 if GPU else 2
SEED = 42
USE_COMPILE = True
EVAL_EVERY = 250
LABEL = "é ✓"; LR_MIN = 1e-5
ADAM_BETAS = (0.8, 0.95)
model_dim = DEPTH * ASPECT_RATIO


def main():
    LOCAL = 3
    print(LOCAL)
'''


def context(train_py: str = TRAIN_PY, **kwargs: object) -> Context:
    return Context(program="", train_py=train_py, harness_api="", **kwargs)  # type: ignore[arg-type]


def apply(train_py: str, diff: str, tmp_path: Path) -> str:
    """Apply with git's strict patch tool, which refuses fuzz and malformed diffs."""
    (tmp_path / "train.py").write_text(train_py)
    subprocess.run(["git", "apply", "--whitespace=nowarn", "-"], input=diff, text=True, cwd=tmp_path, check=True)
    return (tmp_path / "train.py").read_text()


def test_hyperparameters_per_profile() -> None:
    gpu, cpu = hyperparameters(TRAIN_PY, "gpu"), hyperparameters(TRAIN_PY, "cpu")
    assert gpu["DEPTH"] == 8 and cpu["DEPTH"] == 2
    assert gpu["TOTAL_BATCH_SIZE"] == 2**19 and cpu["TOTAL_BATCH_SIZE"] == 2**13
    assert gpu["HEAD_DIM"] == 128 and cpu["HEAD_DIM"] == 32
    assert cpu["WINDOW_PATTERN"] == "SSSL" and cpu["WEIGHT_DECAY"] == 0.2 and cpu["SEED"] == 42
    assert cpu["LABEL"] == "é ✓" and cpu["LR_MIN"] == 1e-5
    for absent in ("GPU", "USE_COMPILE", "ADAM_BETAS", "model_dim", "LOCAL"):
        assert absent not in cpu


def test_if_expression_with_inverted_test() -> None:
    source = 'DEPTH = 2 if not GPU else 8\nBATCH = 4 if PROFILE == "cpu" else 64\nWIDTH = 1 if PROFILE != "gpu" else 9\n'
    assert hyperparameters(source, "gpu") == {"DEPTH": 8, "BATCH": 64, "WIDTH": 9}
    assert hyperparameters(source, "cpu") == {"DEPTH": 2, "BATCH": 4, "WIDTH": 1}


def test_proposal_is_a_real_diff_touching_only_literals(tmp_path: Path) -> None:
    agent = SearchAgent(SearchConfig(profile="cpu"))
    for seed in range(12):
        proposal = agent.propose(context(seed=seed))
        new = apply(TRAIN_PY, proposal.diff, tmp_path)
        assert proposal.diff.startswith("--- a/train.py\n+++ b/train.py\n@@ ")
        before, after = hyperparameters(TRAIN_PY, "cpu"), hyperparameters(new, "cpu")
        changed = {name for name in before if before[name] != after[name]}
        assert 1 <= len(changed) <= 2 and "SEED" not in changed
        assert hyperparameters(new, "gpu").keys() == before.keys()
        expected = ", ".join(f"{name} {_text(TRAIN_PY, name)} -> {_text(new, name)}" for name in _ordered(changed))
        assert proposal.description == expected
        for old_line, new_line in zip(TRAIN_PY.split("\n"), new.split("\n"), strict=True):
            if old_line != new_line:  # same line apart from one literal: comments and spacing kept
                assert _skeleton(old_line) == _skeleton(new_line)


def _assignment(source: str, name: str) -> re.Match[str]:
    match = re.search(rf"(?:^|; ){name}(?:: \w+)? = ([^#;\n]+)", source, re.MULTILINE)
    assert match is not None
    return match


def _ordered(names: set[str]) -> list[str]:
    return sorted(names, key=lambda n: _assignment(TRAIN_PY, n).start())


def _text(source: str, name: str) -> str:
    """The literal of `name` for the cpu profile, as written in the source."""
    value = _assignment(source, name).group(1).strip()
    return value.split(" else ")[1] if " else " in value else value


def _skeleton(line: str) -> str:
    return re.sub(r"""2\*\*\d+|'[SL]+'|-?\d+(\.\d*)?(e-?\d+)?""", "#", line)


def test_cpu_profile_edits_only_the_cpu_branch(tmp_path: Path) -> None:
    source = "DEPTH = 8 if GPU else 2  # layers\n"
    for profile, expected in (("cpu", r"^DEPTH = 8 if GPU else \d+  # layers\n$"), ("gpu", r"^DEPTH = \d+ if GPU else 2  # layers\n$")):
        new = apply(source, SearchAgent(SearchConfig(profile=profile)).propose(context(source)).diff, tmp_path)
        assert re.match(expected, new) and new != source


def test_same_context_and_seed_give_the_same_proposal() -> None:
    agent = SearchAgent(SearchConfig(profile="cpu", seed=7))
    assert agent.propose(context(seed=3)) == SearchAgent(SearchConfig(profile="cpu", seed=7)).propose(context(seed=3))
    proposals = {agent.propose(context(seed=s)).diff for s in range(6)}
    assert len(proposals) > 1
    retries = [agent.propose(context(seed=s, feedback="hunk 1 does not apply")).diff for s in range(4)]
    assert retries != [agent.propose(context(seed=s)).diff for s in range(4)]  # a retry draws anew


def test_seed_is_never_changed() -> None:
    source = "SEED = 42\nMATRIX_LR = 0.04\n"
    agent = SearchAgent(SearchConfig(profile="cpu"))
    for seed in range(20):
        assert agent.propose(context(source, seed=seed)).description.startswith("MATRIX_LR 0.04 -> ")


def test_only_seed_is_not_searchable() -> None:
    with pytest.raises(AgentError, match="no tunable hyperparameter"):
        SearchAgent(SearchConfig(profile="cpu")).propose(context("SEED = 1\nNAME = 'x'\n"))


def test_history_configs_are_not_proposed_again() -> None:
    source = "HEAD_DIM = 64\n"  # the only possible change is 64 -> 128
    agent = SearchAgent(SearchConfig(profile="cpu"))
    assert agent.propose(context(source)).description == "HEAD_DIM 64 -> 128"
    tried = (HistoryRow("e1", "HEAD_DIM 64 -> 128", "discard", 1.7, 0.1, {"HEAD_DIM": 128}),)
    with pytest.raises(AgentError, match="no untried hyperparameter change"):
        agent.propose(context(source, history=tried))


def test_generic_ints_stay_positive_ints_and_strings_keep_their_quotes(tmp_path: Path) -> None:
    agent = SearchAgent(SearchConfig(profile="cpu"))
    for seed in range(8):
        new = apply("EVAL_EVERY = 1\n", agent.propose(context("EVAL_EVERY = 1\n", seed=seed)).diff, tmp_path)
        value = hyperparameters(new, "cpu")["EVAL_EVERY"]
        assert isinstance(value, int) and value >= 2
        pattern = apply("WINDOW_PATTERN = 'SSSL'\n", agent.propose(context("WINDOW_PATTERN = 'SSSL'\n", seed=seed)).diff, tmp_path)
        assert re.fullmatch(r"WINDOW_PATTERN = '[SL]{1,4}'\n", pattern) and pattern != "WINDOW_PATTERN = 'SSSL'\n"


def test_powers_of_two_stay_powers_of_two_in_their_notation() -> None:
    agent = SearchAgent(SearchConfig(profile="gpu"))
    for seed in range(6):
        description = agent.propose(context("TOTAL_BATCH_SIZE = 2**19\nDEVICE_BATCH_SIZE = 128\n", seed=seed)).description
        for name, _old, new in re.findall(r"(\w+) ([^ ,]+) -> ([^ ,]+)", description):
            if name == "TOTAL_BATCH_SIZE":
                assert re.fullmatch(r"2\*\*\d+", new)
            else:
                assert int(new) & (int(new) - 1) == 0


def test_file_without_final_newline(tmp_path: Path) -> None:
    source = "import torch\nMATRIX_LR = 0.04"
    proposal = SearchAgent(SearchConfig(profile="cpu")).propose(context(source))
    assert "\\ No newline at end of file" in proposal.diff
    assert apply(source, proposal.diff, tmp_path).startswith("import torch\nMATRIX_LR = ")


def test_failed_and_unmeasured_rows_become_trials_or_are_left_out() -> None:
    spaces = {"MATRIX_LR": space_for("MATRIX_LR", 0.04)}
    history = (
        HistoryRow("e1", "a", "discard", 1.7, 0.1, {"MATRIX_LR": 0.05}),
        HistoryRow("e2", "b", "crash", None, None, {"MATRIX_LR": 0.1}),
        HistoryRow("e3", "c", "rejected", None, None, {"MATRIX_LR": 0.02}),
        HistoryRow("e4", "d", "keep", 1.6, -0.1, {"DEPTH": 4}),  # no such constant
        HistoryRow("e5", "e", "discard", 1.9, 0.3, {"MATRIX_LR": 5.0}),  # outside the space
    )
    trials = _past_trials(["MATRIX_LR"], spaces, history)  # type: ignore[arg-type]
    assert [(t.state.name, t.params["MATRIX_LR"], t.value) for t in trials] == [
        ("COMPLETE", 0.05, 1.7),
        ("FAIL", 0.1, None),
    ]


def test_tpe_learns_from_history() -> None:
    """With a history where larger MATRIX_LR was clearly better, TPE proposals move up
    more than the local perturbation used without history."""
    source = "MATRIX_LR = 0.04\n"
    history = tuple(
        HistoryRow(f"e{i}", "", "discard", 1.5 + (math.log(lr) - math.log(0.15)) ** 2, None, {"MATRIX_LR": lr})
        for i, lr in enumerate([0.011, 0.013, 0.016, 0.02, 0.025, 0.03, 0.035, 0.05, 0.06, 0.08, 0.1, 0.12, 0.14, 0.155])
    )

    def mean_log_lr(agent: SearchAgent, rows: tuple[HistoryRow, ...]) -> float:
        values = [hyperparameters(_applied(source, agent, rows, seed), "cpu")["MATRIX_LR"] for seed in range(10)]
        return sum(math.log(v) for v in values) / len(values)

    learned = mean_log_lr(SearchAgent(SearchConfig(profile="cpu", min_trials=8)), history)
    local = mean_log_lr(SearchAgent(SearchConfig(profile="cpu", min_trials=1000)), history)
    assert learned > local
    assert learned > math.log(0.08)


def _applied(source: str, agent: SearchAgent, rows: tuple[HistoryRow, ...], seed: int) -> str:
    description = agent.propose(context(source, history=rows, seed=seed)).description
    return "MATRIX_LR = " + description.rsplit(" -> ", 1)[1] + "\n"


def test_factory_auto_without_key_is_search_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with capture_logs() as logs:
        chosen = choose_agent("auto")
    assert chosen == "search"
    assert [(e["event"], e["agent"]) for e in logs] == [("agent_chosen", "search")]
    agent = make_agent(SearchConfig(profile="cpu", seed=5))
    assert isinstance(agent, SearchAgent) and agent.seed == 5 and agent.profile == "cpu"
