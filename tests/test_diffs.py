"""Diff validation: every way an agent's diff can be wrong is refused with a clear reason."""

from __future__ import annotations

import ast
import difflib
import io
import re
import types

import pytest

from runner.core import diffs
from runner.core.diffs import DiffRejected, changed_lines, validate_and_apply

BASE = '''"""Pretrain a small GPT within a fixed time budget."""
import math
import random

import numpy as np
import torch

from prepare import MAX_SEQ_LEN, TIME_BUDGET

GPU = torch.cuda.is_available()
DEPTH = 8 if GPU else 2
WIDTH = 64 * DEPTH
LEARNING_RATE = 3e-4
WARMUP_STEPS = 100
SEED = 42

random.seed(SEED)
np.random.seed(SEED)
torch.manual_seed(SEED)
torch.cuda.manual_seed_all(SEED)
generator = torch.Generator().manual_seed(SEED)


def lr_at(step: int) -> float:
    """Linear warmup, then cosine decay."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / TIME_BUDGET))


def main() -> None:
    model = torch.nn.Linear(WIDTH, WIDTH)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    for step in range(10):
        x = torch.randn(4, MAX_SEQ_LEN, WIDTH, generator=generator)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"depth: {DEPTH}")


if __name__ == "__main__":
    main()
'''

MARKER = "\\ No newline at end of file\n"


def make_diff(old: str, new: str, n: int = 3, *, fromfile: str = "a/train.py", tofile: str = "b/train.py") -> str:
    """A unified diff as git writes it (difflib plus the no-newline marker)."""
    old_lines, new_lines = io.StringIO(old).readlines(), io.StringIO(new).readlines()
    lines = difflib.unified_diff(old_lines, new_lines, fromfile, tofile, n=n)
    return "".join(line if line.endswith("\n") else line + "\n" + MARKER for line in lines)


def edit(*pairs: tuple[str, str], base: str = BASE) -> str:
    for old, new in pairs:
        assert base.count(old) == 1, old
        base = base.replace(old, new)
    return base


def hunks(diff: str) -> str:
    """The diff without its two file header lines."""
    return diff.split("\n", 2)[2]


DEPTH = "DEPTH = 8 if GPU else 2"
DEEPER = (DEPTH, "DEPTH = 12 if GPU else 2")
LOUDER = ('    print(f"depth: {DEPTH}")', '    print(f"depth: {DEPTH} width: {WIDTH}")')
MAIN_IF_GPU = ('if __name__ == "__main__":', 'if __name__ == "__main__" and GPU:')
WIDER = ("WIDTH = 64 * DEPTH", "WIDTH = 96 * DEPTH")
ONE_HUNK = make_diff(BASE, edit(DEEPER))
TWO_HUNKS = make_diff(BASE, edit(DEEPER, LOUDER))
HEADER = "--- a/train.py\n+++ b/train.py\n"
CRLF_BASE = BASE.replace("\n", "\r\n")
NO_EOL_BASE = BASE.removesuffix("\n")
FORM_FEED_BASE = BASE.replace("\nfrom prepare", "\n\x0cfrom prepare")
LOADER = "    data = make_loader(batch=4, seed=SEED)\n    rng = np.random.default_rng(SEED)\n"
LOADER_BASE = BASE.replace("    opt = torch", LOADER + "    opt = torch")


def shift(diff: str, by: int) -> str:
    """Move every hunk's stated position, as agents that miscount lines do."""
    return re.sub(r"@@ -(\d+)(,\d+)? \+(\d+)", lambda m: f"@@ -{int(m[1]) + by}{m[2] or ''} +{int(m[3]) + by}", diff)


def seed_only(old: str, new: str, base: str = BASE) -> str:
    return make_diff(base, edit((old, new), base=base))


def bad(case_id: str, diff: str, reason: str, base: str = BASE, max_bytes: int = 64_000):
    return pytest.param(diff, base, max_bytes, reason, id=case_id)


_first, _second = re.split(r"(?m)^(?=@@ )", hunks(TWO_HUNKS))[1:]
BAD = [
    bad("empty", "", "empty"),
    bad("whitespace-only", "\n  \n", "empty"),
    bad("nul-byte", ONE_HUNK.replace("12 if", "12\0if"), "NUL"),
    bad("oversize", ONE_HUNK, "byte limit", max_bytes=100),
    bad("other-file", make_diff(BASE, edit(DEEPER), fromfile="a/model.py", tofile="b/model.py"), "train.py only"),
    bad("rename-by-headers", make_diff(BASE, edit(DEEPER), tofile="b/train2.py"), "train.py only"),
    bad("two-files", ONE_HUNK + make_diff("x = 1\n", "x = 2\n", fromfile="a/util.py", tofile="b/util.py"),
        "train.py only"),
    bad("train-py-twice", ONE_HUNK + make_diff(BASE, edit(LOUDER)), "2 file sections"),
    bad("git-rename", "diff --git a/train.py b/train2.py\nsimilarity index 90%\nrename from train.py\n"
        "rename to train2.py\n" + make_diff(BASE, edit(DEEPER), tofile="b/train2.py"), "renames"),
    bad("git-copy", "diff --git a/train.py b/train.py\ncopy from train.py\ncopy to train.py\n" + ONE_HUNK, "copies"),
    bad("mode-change", "diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n" + ONE_HUNK, "file mode"),
    bad("mode-change-only", "diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n", "file mode"),
    bad("binary-files-differ", "diff --git a/train.py b/train.py\nindex 1111111..2222222 100644\n"
        "Binary files a/train.py and b/train.py differ\n", "binary"),
    bad("git-binary-patch", "diff --git a/train.py b/train.py\nindex 1111111..2222222 100644\nGIT binary patch\n"
        "literal 5\nMcmZ?wbaHcS0RR9100\n\n", "binary"),
    bad("symlink", "diff --git a/train.py b/train.py\nindex 1111111..2222222 120000\n" + ONE_HUNK, "symlink"),
    bad("creation-dev-null", make_diff("", "x = 1\n", fromfile="/dev/null"), "creates or deletes"),
    bad("deletion-dev-null", make_diff(BASE, "", tofile="/dev/null"), "creates or deletes"),
    bad("git-new-file", "diff --git a/train.py b/train.py\nnew file mode 100644\n" + make_diff("", "x = 1\n"),
        "creates or deletes"),
    bad("absolute-path", make_diff(BASE, edit(DEEPER), fromfile="/work/train.py", tofile="/work/train.py"), "absolute"),
    bad("dotdot-path", make_diff(BASE, edit(DEEPER), fromfile="a/../train.py", tofile="b/../train.py"), "'..'"),
    bad("quoted-path", make_diff(BASE, edit(DEEPER), fromfile='"a/train.py"', tofile='"b/train.py"'), "quoted"),
    bad("quoted-git-header", 'diff --git "a/train.py" "b/train.py"\n' + ONE_HUNK, "quoted"),
    bad("no-hunks", HEADER, "no hunks"),
    bad("malformed-hunk-header", ONE_HUNK.replace("@@ -8,7 +8,7 @@", "@@ -8,7 +8,7"), "no hunks"),
    bad("no-file-header", hunks(ONE_HUNK), "lacks its '--- a/train.py'"),
    bad("prose-before", "Here is my change:\n" + ONE_HUNK, "not part of a unified diff"),
    bad("stray-backslash-line", ONE_HUNK + "\\ end of diff\n", "not part of a unified diff"),
    bad("context-mismatch", ONE_HUNK.replace(" WIDTH = 64", " WIDTH = 32"), "line 12 is 'WIDTH = 64 * DEPTH'"),
    bad("removed-line-mismatch", ONE_HUNK.replace("-DEPTH = 8 if", "-DEPTH = 6 if"), "does not match"),
    bad("count-too-large", ONE_HUNK.replace("@@ -8,7 +8,7 @@", "@@ -8,8 +8,8 @@"), "header counts 8 and 8"),
    bad("count-too-small", ONE_HUNK.replace("@@ -8,7 +8,7 @@", "@@ -8,6 +8,6 @@"), "header counts 6 and 6"),
    bad("count-extra-line", ONE_HUNK + "+EXTRA = 1\n", "header counts 7 and 7"),
    bad("crlf-diff-lf-file", ONE_HUNK.replace("\n", "\r\n"), "CRLF line endings but train.py uses LF"),
    bad("lf-diff-crlf-file", ONE_HUNK, "LF line endings but train.py uses CRLF", base=CRLF_BASE),
    bad("hunks-out-of-order", HEADER + _second + _first, "file order"),
    bad("hunks-overlap", HEADER + hunks(ONE_HUNK) + hunks(make_diff(BASE, edit(WIDER))), "overlap"),
    bad("ambiguous-offset", HEADER + "@@ -2,2 +2,3 @@\n \n \n+EXTRA = 1\n", "add context lines"),
    bad("insert-past-end", HEADER + "@@ -90,0 +91 @@\n+EXTRA = 1\n", "has only 44 lines"),
    bad("marker-joins-lines", HEADER + "@@ -1,1 +1,2 @@\n+import os\n" + MARKER +
        ' """Pretrain a small GPT within a fixed time budget."""\n', "join two lines"),
    bad("missing-eol-marker", make_diff(NO_EOL_BASE, edit(MAIN_IF_GPU, base=NO_EOL_BASE)).replace(MARKER, ""),
        "differs only in its line ending", base=NO_EOL_BASE),
    bad("syntax-error", make_diff(BASE, edit((DEPTH, "DEPTH = 8 if GPU else"))), "syntax error at line 11"),
    bad("too-deeply-nested", make_diff(BASE, BASE + "x = " + "1 + " * 10_000 + "1\n"), "too deeply"),
    bad("noop-context-only", HEADER + f"@@ -11,2 +11,2 @@\n {DEPTH}\n WIDTH = 64 * DEPTH\n", "does not change"),
    bad("noop-same-line", HEADER + f"@@ -11 +11 @@\n-{DEPTH}\n+{DEPTH}\n", "does not change"),
    bad("noop-comment", make_diff(BASE, edit((DEPTH, DEPTH + "  # deeper later"))), "comments"),
    bad("noop-final-newline-only", make_diff(NO_EOL_BASE, BASE), "no-op", base=NO_EOL_BASE),
    bad("noop-whitespace", make_diff(BASE, edit(("WIDTH = 64 * DEPTH", "WIDTH = 64*DEPTH\n"))), "no-op"),
    bad("seed-constant", seed_only("SEED = 42", "SEED = 1337"), "seed"),
    bad("seed-torch-manual", seed_only("torch.manual_seed(SEED)", "torch.manual_seed(0)"), "seed"),
    bad("seed-random", seed_only("\nrandom.seed(SEED)", "\nrandom.seed(SEED + 1)"), "seed"),
    bad("seed-numpy", seed_only("np.random.seed(SEED)", "np.random.seed(7)"), "seed"),
    bad("seed-cuda", seed_only("torch.cuda.manual_seed_all(SEED)", "torch.cuda.manual_seed_all(1)"), "seed"),
    bad("seed-generator", seed_only("Generator().manual_seed(SEED)", "Generator().manual_seed(3)"), "seed"),
    bad("seed-keyword", seed_only("seed=SEED", "seed=SEED * 2", LOADER_BASE), "seed", base=LOADER_BASE),
    bad("seed-default-rng", seed_only("default_rng(SEED)", "default_rng(5)", LOADER_BASE), "seed", base=LOADER_BASE),
]


@pytest.mark.parametrize(("diff", "base", "max_bytes", "reason"), BAD)
def test_bad_diff_is_rejected_with_its_cause(diff: str, base: str, max_bytes: int, reason: str) -> None:
    with pytest.raises(DiffRejected) as rejected:
        validate_and_apply(diff, base, max_bytes=max_bytes)
    assert reason in rejected.value.reason
    assert rejected.value.reason.endswith(".") and "\n" not in rejected.value.reason


GOOD = [
    pytest.param(BASE, edit(DEEPER), 3, id="single-hunk"),
    pytest.param(BASE, edit(DEEPER, LOUDER), 3, id="multi-hunk"),
    pytest.param(BASE, edit(DEEPER, LOUDER), 0, id="no-context"),
    pytest.param(BASE, edit(("SEED = 42\n", "SEED = 42\nBATCH = 8\nGRAD_CLIP = 1.0\n")), 3, id="pure-addition"),
    pytest.param(BASE, edit(('    print(f"depth: {DEPTH}")\n', "")), 3, id="pure-deletion"),
    pytest.param(BASE, "from __future__ import annotations\n" + BASE, 3, id="insert-at-start"),
    pytest.param(BASE, "# header\n" + edit(('"""Pretrain a small', '"""Pretrain a tiny')), 0, id="change-first-line"),
    pytest.param(BASE, BASE + 'print("done")\n', 3, id="append-at-end"),
    pytest.param(BASE, edit(("    main()\n", "    main()\n    print(1)")), 3, id="end-remove-final-newline"),
    pytest.param(NO_EOL_BASE, edit(("    main()", "    main()\n    print(1)\n"), base=NO_EOL_BASE), 3,
                 id="add-final-newline"),
    pytest.param(NO_EOL_BASE, edit(("    main()", "    main(); print(1)"), base=NO_EOL_BASE), 3,
                 id="keep-no-final-newline"),
    pytest.param(NO_EOL_BASE, edit(DEEPER, base=NO_EOL_BASE), 3, id="untouched-missing-newline"),
    pytest.param(CRLF_BASE, edit(("DEPTH = 8", "DEPTH = 12"), base=CRLF_BASE), 3, id="crlf-file"),
    pytest.param(BASE, edit(DEEPER, ("SEED = 42", "SEED = 0")), 3, id="seed-plus-real-change"),
    pytest.param(BASE, edit(("generator=generator", "generator=None")), 3, id="generator-is-not-a-seed"),
    pytest.param(LOADER_BASE, edit(("batch=4", "batch=8"), base=LOADER_BASE), 3, id="call-with-seed-keyword"),
    pytest.param(FORM_FEED_BASE, edit(DEEPER, base=FORM_FEED_BASE), 3, id="form-feed-in-source"),
]


@pytest.mark.parametrize(("base", "expected", "context"), GOOD)
def test_good_diff_applies_exactly(base: str, expected: str, context: int) -> None:
    assert validate_and_apply(make_diff(base, expected, n=context), base) == expected


@pytest.mark.parametrize("by", [-2, 3, 17], ids=["earlier", "later", "far"])
def test_misnumbered_hunks_apply_at_their_unique_exact_position(by: int) -> None:
    expected = edit(DEEPER, LOUDER)
    assert validate_and_apply(shift(make_diff(BASE, expected), by), BASE) == expected


def test_git_headers_bare_names_and_timestamps_are_accepted() -> None:
    expected = edit(DEEPER)
    git = "diff --git a/train.py b/train.py\nindex 83db48f..bf269f4 100644\n" + ONE_HUNK
    bare = make_diff(BASE, expected, fromfile="train.py", tofile="train.py")
    stamped = ONE_HUNK.replace("a/train.py\n", "a/train.py\t2024-01-01 00:00:00\n", 1)
    for diff in (git, bare, stamped):
        assert validate_and_apply(diff, BASE) == expected


def test_trimmed_agent_output_still_applies() -> None:
    """Agents drop the diff's final newline and the space of empty context lines."""
    expected = edit(("    main()\n", "    main()\n    print(1)\n"))
    diff = make_diff(BASE, expected).rstrip("\n").replace("\n \n", "\n\n")
    assert "\n\n" in diff
    assert validate_and_apply(diff, BASE) == expected


def test_changed_lines_counts_added_and_removed() -> None:
    assert changed_lines(TWO_HUNKS) == (2, 2)
    assert changed_lines(make_diff(BASE, edit(("SEED = 42\n", "SEED = 42\nA = 1\nB = 2\n")))) == (2, 0)
    with pytest.raises(DiffRejected):
        changed_lines(hunks(ONE_HUNK))


# -- pathological text: whatever a diff holds, it is applied or rejected with a reason, never an error ---------


def appended(line: str, base: str = BASE) -> str:
    """A diff that adds `line` at the end of train.py."""
    return make_diff(base, base + line)


def nested_ifs(levels: int) -> str:
    return "".join(" " * i + "if GPU:\n" for i in range(levels)) + " " * levels + "pass\n"


TOO_DEEP = "too deeply"
DEEPER_THAN_ALLOWED = "levels, more than the 100 allowed"
SYNTAX = "syntax error"
PATHOLOGICAL = [
    # deep nesting that CPython's parser itself fails on (MemoryError, RecursionError, SyntaxError)
    pytest.param(appended("x = " + "-" * 10_000 + "1\n"), TOO_DEEP, id="unary-minus-10000"),
    pytest.param(appended("x = " + "-" * 5_000 + "1\n"), TOO_DEEP, id="unary-minus-5000"),
    pytest.param(appended("x = " + "not " * 10_000 + "1\n"), TOO_DEEP, id="unary-not-10000"),
    pytest.param(appended("x = " + "lambda: " * 6_000 + "1\n"), TOO_DEEP, id="nested-lambdas"),
    pytest.param(appended("x = " + "1 if 1 else " * 5_000 + "1\n"), TOO_DEEP, id="nested-conditional-expressions"),
    pytest.param(appended("x = 2" + "**2" * 10_000 + "\n"), TOO_DEEP, id="power-chain"),
    pytest.param(appended("x = a" + ".b" * 30_000 + "\n"), TOO_DEEP, id="attribute-chain-on-one-huge-line"),
    pytest.param(appended("x = 1" + "+1" * 30_000 + "\n"), TOO_DEEP, id="binary-operator-chain-on-one-huge-line"),
    pytest.param(appended("x = f" + "()" * 30_000 + "\n"), TOO_DEEP, id="call-chain"),
    pytest.param(appended("x = a" + "[0]" * 20_000 + "\n"), TOO_DEEP, id="subscript-chain"),
    pytest.param(appended("x = " + "(" * 300 + "1" + ")" * 300 + "\n"), SYNTAX, id="parentheses"),
    pytest.param(appended("x = " + "[" * 300 + "]" * 300 + "\n"), SYNTAX, id="brackets"),
    pytest.param(appended("x = " + "{1: " * 300 + "1" + "}" * 300 + "\n"), SYNTAX, id="braces"),
    pytest.param(appended(nested_ifs(150)), SYNTAX, id="nested-if-statements"),
    pytest.param(appended("x = " + "f'{" * 300 + "1" + "}'" * 300 + "\n"), (SYNTAX, TOO_DEEP), id="nested-f-strings"),
    # nesting the parser takes but the tree walkers (here and in the agents) would not
    pytest.param(appended("x = " + "-" * 150 + "1\n"), DEEPER_THAN_ALLOWED, id="unary-minus-150"),
    pytest.param(appended("x = 1" + " + 1" * 150 + "\n"), DEEPER_THAN_ALLOWED, id="binary-operator-chain-150"),
    pytest.param(appended("if GPU:\n    x = 0\n" + "elif GPU:\n    x = 1\n" * 150), DEEPER_THAN_ALLOWED,
                 id="elif-chain-150"),
    pytest.param(appended("x = " + "[" * 150 + "]" * 150 + "\n"), DEEPER_THAN_ALLOWED, id="brackets-150"),
    # sizes and numbers
    pytest.param(appended("x = " + "9" * 5_000 + "\n"), "Exceeds the limit", id="integer-literal-of-5000-digits"),
    pytest.param(HEADER + "@@ -1," + "9" * 5_000 + " +1 @@\n-x\n", "no hunks", id="hunk-count-of-5000-digits"),
    pytest.param(HEADER + "@@ -" + "9" * 5_000 + " +1 @@\n-x\n", "no hunks", id="hunk-start-of-5000-digits"),
    # odd encodings and line endings
    pytest.param(appended("x = 1\0\n"), "NUL", id="nul-byte"),
    pytest.param(appended("x = 1\n").encode("utf-16").decode("latin-1"), "NUL", id="utf-16-read-as-latin-1"),
    pytest.param("\ufeff" + ONE_HUNK, "not part of a unified diff", id="bom-before-the-diff"),
    pytest.param(appended("\ufeffx = 1\n"), SYNTAX, id="bom-inside-an-added-line"),
    pytest.param(appended("x = '\ud800'\n"), "not valid Unicode (U+D800", id="lone-surrogate"),
    pytest.param(appended(b"x = caf\xe9\n".decode("utf-8", "replace")), "U+FFFD",
                 id="invalid-utf-8-decoded-with-replacement-characters"),
    pytest.param(ONE_HUNK.replace("\n", "\r"), "no hunks", id="cr-line-endings"),
    pytest.param(ONE_HUNK.replace("\n", "\r\n"), "CRLF line endings but train.py uses LF", id="crlf-line-endings"),
    # what nothing checks for by name
    pytest.param(None, "could not be checked (AttributeError", id="no-text-at-all"),
]


@pytest.mark.parametrize(("diff", "reason"), PATHOLOGICAL)
def test_pathological_diffs_are_rejected_with_a_reason(diff, reason) -> None:
    with pytest.raises(DiffRejected) as rejected:
        validate_and_apply(diff, BASE)
    said = rejected.value.reason
    assert any(part in said for part in ((reason,) if isinstance(reason, str) else reason)), said
    assert said.endswith(".") and "\n" not in said and len(said) < 400, said


def test_flat_huge_lines_are_valid_python() -> None:
    """A 40 KB line of a chained comparison or a long list nests nothing: it is no reason for refusal."""
    for line in ("x = 1" + " < 1" * 10_000 + "\n", "x = [" + "1, " * 13_000 + "]\n"):
        assert validate_and_apply(appended(line), BASE) == BASE + line


def test_a_long_path_or_prose_line_is_clipped_in_the_reason() -> None:
    for diff in (make_diff(BASE, edit(DEEPER), fromfile="a/" + "x" * 60_000), "y" * 60_000 + "\n" + ONE_HUNK):
        with pytest.raises(DiffRejected) as rejected:
            validate_and_apply(diff, BASE)
        assert len(rejected.value.reason) < 300


def test_a_patched_train_py_over_its_size_cap_is_rejected() -> None:
    base = "# " + "x" * (2**20 - len(BASE) - 10) + "\n" + BASE
    with pytest.raises(DiffRejected, match="over the 1048576-byte limit"):
        validate_and_apply(appended("LONGER = 'x'\n", base), base)


PARSER_ERRORS = [
    (MemoryError(), "too deeply to parse"),
    (RecursionError("maximum recursion depth exceeded during ast construction"), "too deeply to parse"),
    (SystemError("error return\nwithout exception set"), "could not be checked (SystemError: error return without"),
    (OverflowError("Python int too large"), "could not be checked (OverflowError"),
    (ValueError("source code string cannot contain null bytes"), "could not be checked (ValueError"),
    (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), "could not be checked (UnicodeEncodeError"),
]


@pytest.mark.parametrize(("error", "reason"), PARSER_ERRORS, ids=[type(error).__name__ for error, _ in PARSER_ERRORS])
def test_any_error_of_the_parser_is_a_rejection(error, reason, monkeypatch) -> None:
    """Whatever the parser raises, of any class, becomes a rejection with a reason."""

    def parse(source, *args, **kwargs):
        raise error

    monkeypatch.setattr(diffs, "ast", types.SimpleNamespace(**{**vars(ast), "parse": parse}))  # the validator's parser only
    with pytest.raises(DiffRejected) as rejected:
        validate_and_apply(ONE_HUNK, BASE)
    said = rejected.value.reason
    assert reason in said and said.endswith(".") and "\n" not in said, said
