"""Text helpers and the file formats of the offline packages (R lazy-load data, SWORD ztext, dictd, WordNet)."""

from __future__ import annotations

import html
import re
import struct
import unicodedata
import zlib
import gzip
from collections.abc import Iterable, Iterator
from pathlib import Path

from dataprep.errors import PrepareError

DOC_CHARS = 4096  # long works are cut into documents of about this many characters


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

