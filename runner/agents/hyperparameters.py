"""The hyperparameter constants of a train.py, as agents see them and the ledger records them.

Hyperparameters are module-level UPPER_CASE assignments of a literal
(`MATRIX_LR = 0.04`, `WINDOW_PATTERN = "SSSL"`, `TOTAL_BATCH_SIZE = 2**19`) or of a
literal per profile (`DEPTH = 8 if GPU else 2`, where the branch of the given profile
counts). They are found with `ast`, with the source span of each literal, so that the
search agent can rewrite exactly that span. This module needs neither optuna nor torch
(torch only to tell this machine's profile), so recording them costs nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import contract

Value = int | float | str


@dataclass(frozen=True)
class Constant:
    """One hyperparameter literal and where it sits in the source."""

    name: str
    value: Value
    line: int  # 0-based line index (lines split on "\n")
    start: int  # character offsets of the literal within that line
    end: int

    def text(self, lines: list[str]) -> str:
        return lines[self.line][self.start : self.end]


def default_profile() -> str:
    """The profile the harness would pick on this machine (its rule, contract.profile_name)."""
    import torch

    return contract.profile_name(torch.cuda.is_available())


def hyperparameters(train_py: str, profile: str | None = None) -> dict[str, Value]:
    """The hyperparameter constants of a train.py, with the values of `profile`."""
    return {name: c.value for name, c in find_constants(train_py, profile or default_profile()).items()}


def find_constants(train_py: str, profile: str) -> dict[str, Constant]:
    lines = train_py.split("\n")
    found: dict[str, Constant] = {}
    for node in ast.parse(train_py).body:
        name, value_node = _assignment(node)
        if name is None or not name.isupper():
            continue
        if isinstance(value_node, ast.IfExp):
            if _literal(value_node.body) is None or _literal(value_node.orelse) is None:
                continue
            value_node = value_node.body if _body_is_gpu(value_node.test) == (profile == "gpu") else value_node.orelse
        value = _literal(value_node)
        if value is None or value_node.lineno != value_node.end_lineno:
            continue
        line = lines[value_node.lineno - 1]
        found[name] = Constant(
            name,
            value,
            value_node.lineno - 1,
            _char_offset(line, value_node.col_offset),
            _char_offset(line, value_node.end_col_offset),  # type: ignore[arg-type]
        )
    return found


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return node.target.id, node.value
    return None, None


def _literal(node: ast.expr) -> Value | None:
    """The value of a number or string literal, `-x`, or `2**k`; None for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand)
        if isinstance(inner, (int, float)):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _literal(node.left), _literal(node.right)
        if type(base) is int and type(exponent) is int and 0 <= exponent <= 64:
            return base**exponent
    return None


def _body_is_gpu(test: ast.expr) -> bool:
    """Whether `a if TEST else b` gives `a` on the GPU profile (`GPU`, `PROFILE == "gpu"`,
    `torch.cuda.is_available()`; `not ...`, `!=` and tests naming only the CPU invert it)."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return not _body_is_gpu(test.operand)
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.NotEq):
        return not _body_is_gpu(ast.Compare(test.left, [ast.Eq()], test.comparators))
    text = ast.unparse(test).lower()
    return "gpu" in text or "cuda" in text or "cpu" not in text


def _char_offset(line: str, byte_offset: int) -> int:
    """ast columns count UTF-8 bytes; string slicing counts characters."""
    return len(line.encode()[:byte_offset].decode())
