"""The trusted files every experiment image carries beside train.py.

Only these enter an image: the harness and the facts it shares with the host. The data
builder (dataprep/) and the rest of the project never do, so changing them never
changes an image's hash, and the file train.py is scored by reads in one sitting.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HARNESS_FILES = ("prepare.py", "evaluate.py", "contract.py")


def harness_files(root: Path = PROJECT_ROOT) -> dict[str, bytes]:
    """{file name: content} of the trusted harness under `root`."""
    return {name: (root / name).read_bytes() for name in HARNESS_FILES}
