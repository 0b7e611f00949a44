"""An agent for `--agent command` that proposes changes known to have no effect (bench/aa_night.py).

    python bench/agents/nudge.py [--repair NAME=LITERAL] [--reinit-every K] < prompt > reply

Each proposal moves one float constant of the current best train.py (an UPPER_CASE
module-level `NAME = <float>`) by one part in a million. Such a change cannot
matter beside the seed's noise, so every keep it earns is a false keep: a night of
nudges measures the keep rule's false-positive rate (an A/A test). Seeds are never
touched and ints never are (they can change shapes); zeros are skipped, since a
relative nudge of 0 is no change and the validator rejects a no-op.

Proposals must all differ (the runner rejects a repeated one), so the n-th nudge
takes the constants in turn and, on each round through them, the next factor of
1 + 1e-6, 1 - 1e-6, 1 + 2e-6, 1 - 2e-6, ... The count n lives in the JSON file
named by AR_BENCH_STATE, because the command is a new process for every proposal.

With --reinit-every K every K-th proposal is instead a new initialisation: a line after the
harness import that draws a few numbers from the seeded generators, so the model starts from
other weights on the same data order. That is effect-free too, but its runs are no longer
coupled to the best's on the same seed: the other null the keep rule must not be fooled by.
Each draws one more number than the last, so they all differ.

With --repair NAME=LITERAL the first proposal instead sets NAME back to LITERAL
(the power test: the bench degraded that constant and wants to see the repair kept).

The train.py to diff against is read from the prompt, not from disk: it is the
night's current best, which changes with every keep.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import sys
from pathlib import Path

# The layout of runner.agents.prompt.full_prompt: the train.py section ends where the dynamic part begins.
_TRAIN_PY = re.compile(r"^# Current best train\.py[^\n]*\n```python\n(.*?)\n```\n\n# Best val_bpb so far", re.S | re.M)


def train_py_of(prompt: str) -> str:
    """The current best train.py shown in the prompt (the prompt strips its final newline; it is put back)."""
    match = _TRAIN_PY.search(prompt)
    if match is None:
        raise SystemExit("nudge: no train.py section in the prompt")
    return match.group(1) + "\n"


def float_constants(source: str) -> dict[str, ast.Constant]:
    """Module-level `NAME = <nonzero float literal>` with an UPPER_CASE name that is not a seed, in file order."""
    found = {}
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and type(node.value.value) is float and node.value.value):
            name = node.targets[0].id
            if name.isupper() and "SEED" not in name:
                found[name] = node.value
    return found


def set_constant(source: str, name: str, literal: str) -> str:
    """`source` with the literal assigned to `name` replaced by `literal`; the rest of the line (comments) kept."""
    node = float_constants(source)[name]
    lines = source.splitlines(keepends=True)
    line = lines[node.lineno - 1]
    lines[node.lineno - 1] = line[: node.col_offset] + literal + line[node.end_col_offset :]
    return "".join(lines)


def nudged(value: float, n: int, count: int) -> float:
    """The n-th nudge of a constant, with `count` constants in rotation: factors 1+1e-6, 1-1e-6, 1+2e-6, ..."""
    round_ = n // count
    step = (round_ // 2 + 1) * 1e-6
    return value * (1 + step if round_ % 2 == 0 else 1 - step)


def literal(value: float) -> str:
    """A short float literal (12 significant digits hold any nudge; 0.04 * (1 + 1e-6) prints as 0.04000004)."""
    return repr(float(f"{value:.12g}"))


def after_harness_import(source: str, line: str) -> str:
    """`source` with `line` inserted after its `from prepare import ...` line."""
    head, sep, tail = source.partition("\nfrom prepare import")
    if not sep:
        raise SystemExit("train.py has no `from prepare import` line")
    end = tail.index("\n") + 1
    return head + sep + tail[:end] + line + "\n" + tail[end:]


def reinitialised(source: str, n: int) -> str:
    """`source` with a line after the harness import that moves the seeded generators on by n + 1 draws."""
    return after_harness_import(source, f"torch.rand({n + 1}); torch.cuda.is_available() and "
                                        f"torch.rand({n + 1}, device='cuda')  # a new initialisation (A/A)")


def reply(old: str, new: str, description: str) -> str:
    """The reply format of runner.agents.prompt: a DESCRIPTION line and one ```diff block."""
    diff = "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        "a/train.py", "b/train.py"))
    return f"DESCRIPTION: {description}\n```diff\n{diff}```\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="effect-free proposals for an A/A night")
    parser.add_argument("--repair", metavar="NAME=LITERAL", help="first propose setting NAME back to LITERAL")
    parser.add_argument("--reinit-every", type=int, default=0, metavar="K",
                        help="every K-th proposal is a new initialisation instead of a nudge")
    args = parser.parse_args()
    state_path = Path(os.environ["AR_BENCH_STATE"])
    state = json.loads(state_path.read_text()) if state_path.exists() else {"nudges": 0, "repaired": False}
    state.setdefault("proposals", 0)
    state.setdefault("reinits", 0)
    source = train_py_of(sys.stdin.read())
    if args.repair and not state["repaired"]:
        name, _, value = args.repair.partition("=")
        state["repaired"] = True
        text = reply(source, set_constant(source, name, value), f"repair: {name} back to {value}")
    elif args.reinit_every and state["proposals"] % args.reinit_every == args.reinit_every - 1:
        n = state["reinits"]
        state["reinits"] = n + 1
        text = reply(source, reinitialised(source, n), f"new initialisation {n + 1} (no effect, runs decoupled)")
    else:
        constants = float_constants(source)
        n = state["nudges"]
        name = list(constants)[n % len(constants)]
        value = literal(nudged(constants[name].value, n, len(constants)))
        state["nudges"] = n + 1
        text = reply(source, set_constant(source, name, value), f"nudge {name} to {value} (no effect)")
    state["proposals"] += 1
    state_path.write_text(json.dumps(state))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
