"""Pack a deterministic subset of a large corpus into one compressed file for a GPU box.

    uv run python bench/pack_corpus.py --source linux --max-mib 60 --out .carry/linux.jsonl.xz

GPU machines without network receive only what travels with the job (tens of
MiB), so the large corpus is shipped as xz-compressed JSON lines (one
`{"text": ...}` per document) and prepared there with
`prepare.py --source local linux.jsonl`. Documents are chosen by the hash of
their text (not by position, which would keep only some directories) and
added until the compressed file reaches --max-mib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataprep.sources import linux_source_docs, offline_docs  # noqa: E402

SOURCES = {"linux": linux_source_docs, "offline": offline_docs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=sorted(SOURCES), default="linux")
    parser.add_argument("--max-mib", type=float, default=60.0)
    parser.add_argument("--fraction", type=float, default=0.75, help="share of documents eligible (by hash)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    limit = int(args.max_mib * 2**20)
    docs = text_bytes = 0
    with open(args.out, "wb") as sink:
        xz = subprocess.Popen(["xz", "-6", "-T2", "-c"], stdin=subprocess.PIPE, stdout=sink)
        for _, text in SOURCES[args.source]():
            digest = hashlib.sha256(text.encode()).digest()
            if int.from_bytes(digest[:4], "big") >= args.fraction * 2**32:
                continue
            line = (json.dumps({"text": text}) + "\n").encode()
            xz.stdin.write(line)
            docs, text_bytes = docs + 1, text_bytes + len(line)
            if docs % 5000 == 0:
                print(f"{docs} documents, {text_bytes / 1e6:.0f} MB of text, {args.out.stat().st_size / 2**20:.1f} MiB written", flush=True)
            if args.out.stat().st_size > limit * 0.97:  # xz holds back about one block
                break
        xz.stdin.close()
        xz.wait()
    size = args.out.stat().st_size
    print(f"packed {docs} documents, {text_bytes / 1e6:.0f} MB of text into {args.out} ({size / 2**20:.1f} MiB)")
    return 0 if size <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
