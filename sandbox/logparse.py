"""Reading the harness's summary block out of a phase-2 log.

Only the phase-2 log is parsed: it is written by the trusted harness alone, so
a `val_bpb:` line printed by train.py in phase 1 can never be mistaken for a result.
"""

from __future__ import annotations

import re

_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): (\S+)$")


def parse_summary(text: str) -> dict[str, str]:
    """The last `---` block of `key: value` lines, values as printed (exact strings)."""
    lines = text.replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---"]
    if not starts:
        return {}
    summary = {}
    for line in lines[starts[-1] + 1 :]:
        match = _LINE.match(line.strip())
        if not match:
            break
        summary[match[1]] = match[2]
    return summary


def numeric(summary: dict[str, str]) -> dict[str, float]:
    """The numeric entries of a summary (hex and other strings left out)."""
    values = {}
    for key, value in summary.items():
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return values


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])
