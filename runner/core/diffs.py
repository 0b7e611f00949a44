"""Validate an agent's unified diff against train.py and apply it exactly.

A diff must be one plain-text edit of train.py: one `--- a/train.py` / `+++ b/train.py`
section (`a/`/`b/` optional; `diff --git` and `index` lines allowed) and nothing that
creates, deletes, renames, copies, re-modes or binary-patches a file, nor absolute,
`..` or quoted paths. A refusal is a `DiffRejected` whose `reason` is one sentence
saying what is wrong and what to do; the agent gets it back on its retry.

No fuzz: the @@ counts must agree with the hunk body, and every context and removed
line must equal the file's line, line ending included. A hunk applies where its
header says; since agents often miscount lines, one that does not match there
applies at the single other place where all its old lines match, and is rejected
when there is none or more than one. Hunks must be in file order, not overlapping.

The result must parse, nest no deeper than MAX_NESTING levels, and differ from the
parent in what it does: an unchanged syntax tree (comments, blank lines, formatting)
is a no-op, and so is a change of seed values only (values assigned to names
containing "seed", arguments of seeding calls such as `torch.manual_seed`, `seed=`
keywords): run-to-run noise is measured separately, so re-seeding is no experiment.

A missing final newline of the diff text is added, so trimmed agent output parses;
a missing newline at the end of train.py is expressed only by
`\\ No newline at end of file`, on either side of a hunk.

The text is the agent's, so nothing in it may end a night: every error the checks meet
(the parser's MemoryError on deep nesting among them) is a rejection with a reason.
"""

from __future__ import annotations

import ast
import io
import re

import structlog
from unidiff import PatchSet
from unidiff.errors import UnidiffParseError
from unidiff.patch import Hunk

from runner.core.errors import UserError
from runner.core.inputs import MAX_DIFF_BYTES, MAX_TRAIN_PY_BYTES

log = structlog.get_logger(__name__)

TARGET = "train.py"
# Line numbers and counts of a train.py under its size cap have at most 7 digits; longer ones
# (beyond what int() converts) make the line no hunk header.
_HUNK_HEADER = re.compile(r"@@ -(\d{1,9})(?:,(\d{1,9}))? \+(\d{1,9})(?:,(\d{1,9}))? @@")
_INDEX = re.compile(r"index [0-9a-f]+\.\.[0-9a-f]+(?: (\d+))?")
_TEXT_MODES = ("100644", "100755")
_FORBIDDEN = (  # header lines describing something other than a text edit of train.py
    (re.compile(r"Binary files? .* differ|GIT binary patch"), "is a binary patch; send a text diff of train.py"),
    (re.compile(r"(old|new) mode "), "changes the file mode; change only the text of train.py"),
    (re.compile(r"(new|deleted) file mode "), "creates or deletes a file; modify the existing train.py instead"),
    (re.compile(r"rename (from|to) |similarity index "), "renames a file; keep the name train.py"),
    (re.compile(r"copy (from|to) "), "copies a file; modify train.py in place"),
)
_NO_NEWLINE = "\\ No newline at end of file"
_SEEDING_CALLS = ("default_rng", "RandomState")  # seeding callees whose name lacks "seed"
# Syntax levels a train.py may nest. Training code nests under 20 (torch's deepest file, a long elif
# chain, 97); the recursive tree walkers (ast.dump, ast.unparse, NodeTransformer) spend up to 5
# frames a level of the interpreter's 1000, and where the parser itself gives up depends on the Python.
MAX_NESTING = 100


class DiffRejected(UserError):
    """A diff that must not be applied; `reason` says what is wrong and what to do.

    A user's error when the user gave the diff (check-diff, review); a night sends the
    agent's own back to the agent instead."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate_and_apply(diff: str, base: str, *, max_bytes: int = MAX_DIFF_BYTES) -> str:
    """Return the patched train.py text or raise DiffRejected, and nothing else, whatever the diff holds."""
    try:
        return _validate_and_apply(diff, base, max_bytes)
    except DiffRejected:
        raise
    except Exception as exc:  # a check that failed on untrusted text in a way no rule foresaw
        error = error_text(exc)
        log.warning("diff.check_failed", error=error)
        raise DiffRejected(f"The diff could not be checked ({error}); "
                           "send a smaller, plainer unified diff of train.py.") from None


def _validate_and_apply(diff: str, base: str, max_bytes: int) -> str:
    _check_text(diff, base, max_bytes)
    diff = _terminated(diff)
    outside, hunk_count = _scan(_lines(diff))
    _check_headers(outside, hunk_count)
    patch = _patchset(diff)
    if len(patch) != 1:
        raise DiffRejected(f"The diff has {len(patch)} file sections; put all hunks under one train.py header.")
    patched = _apply(list(patch[0]), _lines(base))
    _check_result(base, patched)
    log.info("diff.accepted", added=patch.added, removed=patch.removed, hunks=hunk_count)
    return patched


def changed_lines(diff: str) -> tuple[int, int]:
    """(added, removed) line counts, for display; DiffRejected if the text is no diff."""
    patch = _patchset(_terminated(diff))
    return patch.added, patch.removed


def error_text(exc: BaseException) -> str:
    """An error met on the agent's text as "Class: message" on one line, clipped, for a reason sent back to it."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {_clip(message)}" if message else type(exc).__name__


def _lines(text: str) -> list[str]:
    """Split on "\\n" only, keeping endings (str.splitlines also splits on form feeds)."""
    return io.StringIO(text).readlines()


def _terminated(diff: str) -> str:
    return diff if diff.endswith("\n") else diff + "\n"


def _clip(text: str) -> str:
    """At most 80 characters of the agent's text, for a reason that goes back to the agent."""
    return text if len(text) <= 80 else text[:77] + "..."


def _show(line: str) -> str:
    return repr(_clip(line.rstrip("\r\n")))


def _check_text(diff: str, base: str, max_bytes: int) -> None:
    try:
        size = len(diff.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate, as a JSON "\\ud800" escape decodes to
        raise DiffRejected(f"The diff contains a character that is not valid Unicode (U+{ord(diff[exc.start]):04X} "
                           f"at character {exc.start}); send UTF-8 text.") from None
    if size > max_bytes:
        raise DiffRejected(f"The diff is {size} bytes, over the {max_bytes}-byte limit; propose a smaller change.")
    if "\0" in diff:
        raise DiffRejected("The diff contains NUL bytes; send a plain-text unified diff.")
    if not diff.strip():
        raise DiffRejected("The diff is empty; send a unified diff that changes train.py.")
    if ("\r\n" in diff) != ("\r\n" in base):
        diff_ending, file_ending = ("CRLF", "LF") if "\r\n" in diff else ("LF", "CRLF")
        raise DiffRejected(
            f"The diff has {diff_ending} line endings but train.py uses {file_ending}; "
            f"write the diff's lines with {file_ending} endings like the file."
        )


def _scan(lines: list[str]) -> tuple[list[tuple[int, str]], int]:
    """Check each hunk body against its @@ counts; return the other lines (numbered) and the hunk count.

    unidiff stops reading a hunk once its counts are reached and ignores what follows,
    so the counts are checked here on the raw text.
    """
    outside: list[tuple[int, str]] = []
    hunks = i = 0
    while i < len(lines):
        header = _HUNK_HEADER.match(lines[i])
        i += 1
        if not header:
            outside.append((i, lines[i - 1]))
            continue
        hunks += 1
        old = new = 0
        while i < len(lines) and _is_body(lines, i):
            old += lines[i][0] in " -\r\n"
            new += lines[i][0] in " +\r\n"
            i += 1
        want = tuple(1 if count is None else int(count) for count in (header[2], header[4]))
        if (old, new) != want:
            raise DiffRejected(
                f"Hunk {hunks} ({header[0]}) has {old} old and {new} new lines but its header counts "
                f"{want[0]} and {want[1]}; make the @@ line counts match the hunk body."
            )
    return outside, hunks


def _is_body(lines: list[str], i: int) -> bool:
    """A hunk body line: context, removed, added, a no-newline marker, or an empty context line."""
    line = lines[i]
    next_line = lines[i + 1] if i + 1 < len(lines) else ""
    starts_file = line.startswith("--- ") and next_line.startswith("+++ ")
    return (line[0] in " +-\r\n" or line.startswith(_NO_NEWLINE)) and not starts_file


def _check_headers(outside: list[tuple[int, str]], hunk_count: int) -> None:
    for _, line in outside:
        for pattern, problem in _FORBIDDEN:
            if pattern.match(line):
                raise DiffRejected(f"The diff {problem}.")
    if hunk_count == 0:
        raise DiffRejected("The diff has no hunks (no valid '@@ -a,b +c,d @@' line); send at least one hunk.")
    for number, raw in outside:
        line = raw.rstrip("\r\n")
        if line.startswith(("--- ", "+++ ")):
            _check_path(line[4:].split("\t")[0])
        elif line.startswith("diff --git "):
            for path in line.removeprefix("diff --git ").split(" "):
                _check_path(path)
        elif index := _INDEX.fullmatch(line):
            if index[1] is not None and index[1] not in _TEXT_MODES:
                mode = _clip(index[1])
                raise DiffRejected(f"The diff makes train.py a symlink or submodule (mode {mode}); edit its text only.")
        else:
            raise DiffRejected(
                f"Line {number} of the diff ({_show(line)}) is not part of a unified diff; "
                "send only the diff of train.py, without prose or code fences."
            )
    if not {line[:4] for _, line in outside} >= {"--- ", "+++ "}:
        raise DiffRejected("The diff lacks its '--- a/train.py' / '+++ b/train.py' lines; add them above the first @@.")


def _check_path(path: str) -> None:
    path = path.rstrip()
    if path == "/dev/null":
        raise DiffRejected("The diff creates or deletes a file (/dev/null); modify the existing train.py instead.")
    kind = "a quoted" if path.startswith('"') else "an absolute" if path.startswith("/") else None
    kind = kind or ("a '..'" if ".." in path.split("/") else None)
    if kind:
        raise DiffRejected(f"The diff uses {kind} path ({_clip(path)}); "
                           "write the paths as plain a/train.py and b/train.py.")
    if re.sub(r"^[ab]/", "", path) != TARGET:
        raise DiffRejected(f"The diff may change train.py only, but it names {_clip(path)!r}; "
                           "send a diff of train.py alone.")


def _patchset(diff: str) -> PatchSet:
    try:
        return PatchSet(diff)
    except UnidiffParseError as e:
        problem = _clip(str(e).strip())
        raise DiffRejected(f"The diff cannot be parsed ({problem}); send a plain unified diff of train.py.") from None


def _sides(hunk: Hunk) -> tuple[list[str], list[str]]:
    """The hunk's old and new lines with their endings; a no-newline marker strips the previous line's."""
    old: list[str] = []
    new: list[str] = []
    previous: tuple[list[str], ...] = ()
    for line in hunk:
        if line.line_type == "\\":  # after no line at all it has nothing to strip
            for side in previous:
                side[-1] = side[-1].removesuffix("\n").removesuffix("\r")
            continue
        previous = {"-": (old,), "+": (new,)}.get(line.line_type, (old, new))
        for side in previous:
            side.append(line.value)
    return old, new


def _apply(hunks: list[Hunk], base: list[str]) -> str:
    out: list[str] = []
    cursor = 0  # base lines before this index are done
    for number, hunk in enumerate(hunks, 1):
        old, new = _sides(hunk)
        start = _position(number, hunk, old, base)
        if start < cursor:
            raise DiffRejected(
                f"Hunk {number} applies at line {start + 1}, before hunk {number - 1} ends (line {cursor}); "
                "list hunks in file order and do not let them overlap."
            )
        out += base[cursor:start] + new
        cursor = start + len(old)
    out += base[cursor:]
    if any(not line.endswith("\n") for line in out[:-1]):
        raise DiffRejected(
            f"The diff would join two lines because a '{_NO_NEWLINE}' marker is not on the "
            "file's last line; use the marker only there."
        )
    return "".join(out)


def _position(number: int, hunk: Hunk, old: list[str], base: list[str]) -> int:
    """Where the hunk's old lines start in base: the stated line, else the one exact match elsewhere."""
    stated = hunk.source_start - 1 if hunk.source_length else hunk.source_start
    if _matches(old, base, stated):
        return stated
    found = [i for i in range(len(base) - len(old) + 1) if old and _matches(old, base, i)]
    if len(found) == 1:
        log.info("diff.hunk_offset", hunk=number, stated_line=stated + 1, found_line=found[0] + 1)
        return found[0]
    if found:
        lines = ", ".join(str(i + 1) for i in found)
        raise DiffRejected(
            f"Hunk {number} does not match at line {stated + 1} as its header says but matches at lines {lines}; "
            "add context lines so that its position is unique, or fix the @@ line numbers."
        )
    raise DiffRejected(_mismatch(number, old, base, max(stated, 0)))


def _matches(old: list[str], base: list[str], start: int) -> bool:
    return 0 <= start <= len(base) and base[start : start + len(old)] == old


def _mismatch(number: int, old: list[str], base: list[str], start: int) -> str:
    fix = "copy context and removed lines exactly from the current train.py."
    if not old:
        return f"Hunk {number} inserts after line {start}, but train.py has only {len(base)} lines; fix the @@ numbers."
    row, expected = next(
        (start + j, line) for j, line in enumerate(old) if start + j >= len(base) or base[start + j] != line
    )
    where = f"Hunk {number} does not match train.py at its stated position or anywhere else: line {row + 1}"
    actual = _show(base[row]) if row < len(base) else "past the end of the file"
    if row < len(base) and base[row].rstrip("\r\n") == expected.rstrip("\r\n"):
        return f"{where} differs only in its line ending or the newline at end of file; {fix}"
    return f"{where} is {actual} but the hunk expects {_show(expected)}; {fix}"


def _check_result(base: str, patched: str) -> None:
    if patched == base:
        raise DiffRejected("The diff does not change train.py; propose an actual change.")
    size = len(patched.encode("utf-8"))
    if size > MAX_TRAIN_PY_BYTES:  # also what bounds the parser's memory
        raise DiffRejected(f"The patched train.py would be {size} bytes, over the {MAX_TRAIN_PY_BYTES}-byte limit; "
                           "make train.py smaller.")
    after = _parse(patched)
    try:
        before = _parse(base)
    except DiffRejected:
        return  # a parent that does not parse leaves nothing to compare with
    if ast.dump(before) == ast.dump(after):
        raise DiffRejected("The diff only changes comments, blank lines or formatting (a no-op); change the code.")
    if ast.dump(_BlankSeeds().visit(before)) == ast.dump(_BlankSeeds().visit(after)):
        raise DiffRejected(
            "The diff only changes seed values, which is not an experiment (run-to-run noise is measured "
            "separately); propose a change to the model, optimizer or training loop."
        )


def _parse(source: str) -> ast.Module:
    """The patched train.py's syntax tree, shallow enough for every recursive walker; else DiffRejected."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:  # too many nested parentheses or indentation levels among them
        raise DiffRejected(
            f"The patched train.py has a syntax error at line {e.lineno}: {_clip(e.msg)}; "
            "fix the diff so that train.py stays valid Python."
        ) from None
    except (RecursionError, MemoryError):  # what CPython's parser raises for deep nesting, memory to spare or not
        raise DiffRejected(f"The patched train.py nests code too deeply to parse (at most {MAX_NESTING} levels are "
                           "allowed); write flatter code.") from None
    levels = _depth(tree)
    if levels > MAX_NESTING:
        raise DiffRejected(f"The patched train.py nests code too deeply ({levels} levels, more than the {MAX_NESTING} "
                           "allowed); write flatter code (split long chains and expressions).")
    return tree


def _depth(tree: ast.AST) -> int:
    """How many levels the tree nests, counted without recursion (it must not fail on what it measures)."""
    deepest, todo = 0, [(tree, 1)]
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _is_seed(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "seed" in name.lower() or name in _SEEDING_CALLS


def _blank() -> ast.expr:
    return ast.Name(id="__seed__", ctx=ast.Load())


class _BlankSeeds(ast.NodeTransformer):
    """Replace every seed value by one placeholder, so trees that differ only in seeds compare equal."""

    def _assignment(self, node: ast.Assign | ast.AnnAssign | ast.AugAssign) -> ast.AST:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is not None and any(_is_seed(target) for target in targets):
            node.value = _blank()
        return self.generic_visit(node)

    visit_Assign = visit_AnnAssign = visit_AugAssign = _assignment

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _is_seed(node.func):
            node.args, node.keywords = [_blank()], []
        return self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        if node.arg is not None and "seed" in node.arg.lower():
            node.value = _blank()
        return self.generic_visit(node)
