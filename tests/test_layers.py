"""The rules of what never imports what (docs/architecture.md), read from every module's source.

Imports inside functions count too: a rule holds for everything a module can ever load.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("common", "contract", "dataprep", "evaluate", "prepare", "runner", "sandbox", "train")

# (modules the rule is about, project modules they must never import, why)
RULES = [
    (("prepare", "evaluate", "contract", "train"), ("common", "dataprep", "runner", "sandbox"),
     "the files baked into every image stand alone: nothing of the host enters an image"),
    (("common",), ("contract", "dataprep", "evaluate", "prepare", "runner", "sandbox"),
     "what every host part imports leans on nothing"),
    (("dataprep",), ("evaluate", "prepare", "runner", "sandbox"), "data building leans on neither the runner nor isolation"),
    (("sandbox",), ("dataprep", "evaluate", "prepare", "runner"), "isolation knows nothing of the runner or of data building"),
    (("runner.core",), ("runner.agents", "runner.cli", "runner.morning", "runner.night"),
     "the core stands under every wing"),
    (("runner.agents",), ("runner.cli", "runner.morning", "runner.night"), "agents only propose"),
    (("runner.night",), ("runner.cli", "runner.morning"), "the night never leans on a morning view"),
    (("runner.morning",), ("runner.cli", "runner.night"), "the morning reads the record, never the night's internals"),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    files = [ROOT / f"{name}.py" for name in ("prepare", "evaluate", "contract", "train")]
    for package in ("common", "dataprep", "sandbox", "runner"):
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(f): f for f in files}


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, anywhere in it (relative imports resolved, `from a import b` as a.b too)."""
    found = set()
    name = module_name(path, root).split(".")
    package = name if path.name == "__init__.py" else name[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PROJECT}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_package_is_covered_by_the_rules():
    covered = [m for m in sources() if any(within(m, p) for who, _, _ in RULES for p in who)]
    assert set(sources()) - set(covered) <= {"runner", "runner.cli"}  # the top: the CLI may import every wing


@pytest.mark.parametrize("who,never,why", RULES, ids=[r[0][0] for r in RULES])
def test_layer_rule(who, never, why):
    broken = sorted(f"{module} imports {name}" for module, path in sources().items()
                    if any(within(module, p) for p in who)
                    for name in imports(path) if any(within(name, p) for p in never))
    assert broken == [], f"{why}: " + "; ".join(broken)


def test_the_rules_can_fail(tmp_path):
    """The reader sees an import inside a function and a relative one (a rule that never fails guards nothing)."""
    sample = tmp_path / "runner" / "night" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("def f():\n    from ..morning import views\n    import sandbox.images\n")
    assert imports(sample, tmp_path) >= {"runner.morning", "runner.morning.views", "sandbox.images"}
