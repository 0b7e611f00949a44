"""Building the data (dataprep, `python -m dataprep --source`): sources, split, tokenizer, token files, manifest."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import pickle
import random
import re
import string
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import contract
from dataprep import build as builder, formats, near_duplicates, sources
from tests.corpus import document, write_corpus

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 400


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache directory (AR_CACHE) for one test."""
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def build(*args: str) -> int:
    return builder.main([*args, "--vocab-size", str(VOCAB)])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus dir, data dir) of one local build shared by the read-only tests below."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=300)
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AR_CACHE", str(cache))
        assert build("--source", "local", str(corpus)) == 0
    return corpus, cache / "local"


def load_encoding(data_dir: Path) -> tiktoken.Encoding:
    return tiktoken.Encoding(**pickle.loads((data_dir / "tokenizer/tokenizer.pkl").read_bytes()))


def split_docs(data_dir: Path, split: str) -> list[np.ndarray]:
    tokens = np.fromfile(data_dir / split / "tokens.bin", dtype=np.uint16)
    offsets = np.load(data_dir / split / "docs.npy")
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


# ---- split and document cutting ----------------------------------------------------


def test_split_is_by_hash_deterministic_and_near_the_fraction():
    digests = [hashlib.sha256(f"document {i}".encode()).digest() for i in range(20000)]
    held_out = [builder.is_val(d) for d in digests]
    assert held_out == [builder.is_val(d) for d in digests]
    assert abs(sum(held_out) / len(held_out) - builder.VAL_FRACTION) < 0.01
    assert 0 < sum(held_out) < len(held_out)


def test_long_texts_are_cut_into_documents_of_consecutive_paragraphs():
    paragraphs = [f"Paragraph {i}. " + "word " * (20 + i % 50) for i in range(300)]
    docs = list(formats.cut_text("\n\n".join(paragraphs)))
    assert len(docs) > 10
    assert all(len(d) >= formats.DOC_CHARS for d in docs[:-1])
    assert all(len(d) < formats.DOC_CHARS + 400 for d in docs)
    assert [p.strip() for d in docs for p in d.split("\n\n")] == [p.strip() for p in paragraphs]


def test_gutenberg_header_and_licence_are_stripped():
    text = "The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\nTo be.\n*** END OF IT ***\nLicence"
    assert formats.strip_gutenberg(text).strip() == "To be."
    assert formats.strip_gutenberg("No markers here.") == "No markers here."


# ---- near-duplicates: one split per group ----------------------------------------------------------

WORDS = ["".join(random.Random(i).choices(string.ascii_lowercase, k=3 + i % 7)) for i in range(3000)]


def prose(rng: random.Random, n_words: int = 350) -> str:
    """About 2 KB of random words in lines of twelve."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 12]) + "." for i in range(0, n_words, 12))


def edited(rng: random.Random, text: str) -> str:
    """The text with a few of its words replaced."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), rng.randint(2, 5)):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def driver(rng: random.Random) -> str:
    """A C file of register accessors for one chip, as the kernel's drivers hold many."""
    chip = rng.choice(WORDS)
    return "\n\n".join(f"static int {chip}_{name}(struct {chip}_device *dev, u32 value)\n{{\n"
                        f"\treturn {chip}_write(dev, 0x{rng.randrange(4096):03x}, value << {rng.randrange(32)});\n}}"
                        for name in rng.sample(WORDS, 30))


def renamed(rng: random.Random, code: str) -> str:
    """The code with the identifiers of three lines renamed, as in a copy for another chip."""
    lines = code.split("\n")
    for i in rng.sample([i for i, line in enumerate(lines) if "_" in line], 3):
        lines[i] = re.sub(r"\w+_\w+", lambda _: f"{rng.choice(WORDS)}_{rng.choice(WORDS)}", lines[i])
    return "\n".join(lines)


def near_copy_corpus(seed: int) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """(documents, families): 300 unrelated texts and 100 unrelated drivers, plus 30 texts and
    10 drivers with two near-copies each, shuffled."""
    rng = random.Random(seed)
    families = [[text, edited(rng, text), edited(rng, text)] for text in (prose(rng) for _ in range(30))]
    families += [[code, renamed(rng, code), renamed(rng, code)] for code in (driver(rng) for _ in range(10))]
    texts = [prose(rng) for _ in range(300)] + [driver(rng) for _ in range(100)] + [t for f in families for t in f]
    rng.shuffle(texts)
    return [("local", text) for text in texts], families


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def test_near_copies_land_in_one_split(tmp_path):
    split_by_their_own_hashes = held_out = 0
    for seed in range(5):
        docs, families = near_copy_corpus(seed)
        folder = tmp_path / str(seed)
        folder.mkdir()
        corpus = builder.spool_documents(docs, folder)
        split_of = {text: split for split, sizes in corpus["sizes"].items()
                    for text in builder.spooled(folder, split, sizes)}
        assert set(split_of) == {text for _, text in docs} and len(split_of) == len(docs)
        moved = 0
        for family in families:
            assert len({split_of[text] for text in family}) == 1
            held_out += split_of[family[0]] == "val"
            split_by_their_own_hashes += len({builder.is_val(digest(text)) for text in family}) > 1
            moved += sum(builder.is_val(digest(text)) != (split_of[text] == "val") for text in family)
        assert corpus["near_duplicates"] == {
            "groups": len(families), "documents_in_groups": 3 * len(families), "largest": 3, "moved": moved,
            "threshold": near_duplicates.THRESHOLD, "num_perm": near_duplicates.NUM_PERM}
    assert split_by_their_own_hashes >= 10  # the old per-document rule would have split these families
    assert held_out < 2 * builder.VAL_FRACTION * 5 * len(families)  # not 1 - 0.95³ as by the smallest hash


def test_unrelated_documents_stay_apart():
    rng = random.Random(0)
    texts = ([document(rng, i) for i in range(1500)] + [prose(rng, rng.randint(5, 400)) for _ in range(1000)]
             + [driver(rng) for _ in range(500)])
    labels = near_duplicates.groups(texts)
    assert len(labels) == len(texts)
    assert sum(count for count in Counter(labels).values() if count > 1) < 0.01 * len(texts)


def test_shingles_ignore_case_and_layout():
    assert near_duplicates.shingles("Hello,  world") == near_duplicates.shingles("hello world") == [b"hello world"]
    assert sorted(near_duplicates.shingles("a b c d e f")) == [b"a b c d e", b"b c d e f"]
    assert near_duplicates.shingles("def f(x):\n    return x") == near_duplicates.shingles("def f(x): return x")


def test_shuffled_input_gives_the_same_split_and_hash(cache):
    docs, _ = near_copy_corpus(0)
    shuffled = random.Random(1).sample(docs, len(docs))
    first, second = (builder.build(d, cache / name, "local", VOCAB) for d, name in ((docs, "a"), (shuffled, "b")))
    assert first["hash"] == second["hash"] and first["stats"]["val"] == second["stats"]["val"]
    assert first["stats"]["near_duplicates"] == second["stats"]["near_duplicates"]


# ---- tokenizer and token files -----------------------------------------------------------------


def test_tokenizer_round_trips_and_has_bos_last(built):
    _, data = built
    enc = load_encoding(data)
    assert enc.n_vocab == VOCAB and enc.encode_single_token(contract.BOS) == VOCAB - 1
    text = "The old sailor builds a red house again. Ünïcödé → 42!\n\n  tabs\tand spaces"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.decode([VOCAB - 1, *enc.encode_ordinary(text)]) == contract.BOS + text
    token_bytes = np.load(data / "tokenizer/token_bytes.npy")
    assert token_bytes.dtype == np.int32 and len(token_bytes) == VOCAB and token_bytes[VOCAB - 1] == 0
    assert all(token_bytes[i] == len(enc.decode_single_token_bytes(i)) for i in range(VOCAB - 1))


def test_token_files_hold_every_document_once_each_starting_with_bos(built):
    corpus, data = built
    enc = load_encoding(data)
    texts = {split: [enc.decode(d[1:].tolist()) for d in split_docs(data, split)] for split in ("train", "val")}
    for split in ("train", "val"):
        docs = split_docs(data, split)
        assert all(d[0] == VOCAB - 1 and (d[1:] != VOCAB - 1).all() for d in docs)
        assert np.load(data / split / "docs.npy").dtype == np.int64
    originals = sorted(p.read_text().strip("\n") for p in corpus.glob("*.txt"))  # short files: one document each
    assert sorted(texts["train"] + texts["val"]) == originals
    stats = builder.read_manifest(data)["stats"]
    assert stats["near_duplicates"]["groups"] == 0  # so each document's own hash decides its split
    assert all(builder.is_val(hashlib.sha256(t.encode()).digest()) for t in texts["val"])
    assert stats["val"]["docs"] == len(texts["val"]) > 0 and stats["train"]["docs"] == len(texts["train"])
    assert stats["train"]["tokens"] == os.path.getsize(data / "train/tokens.bin") // 2


def test_rebuilding_gives_the_same_hash(built, cache):
    corpus, data = built
    assert build("--source", "local", str(corpus), "--name", "again") == 0
    assert builder.verify_manifest(cache / "again") == builder.read_manifest(data)["hash"]


# ---- manifest, idempotency, interrupted builds -------------------------------------


def test_manifest_verifies_and_detects_tampering(cache):
    corpus = write_corpus(cache.parent / "corpus", n_docs=200)
    assert build("--source", "local", str(corpus)) == 0
    data = cache / "local"
    manifest = builder.read_manifest(data)
    assert set(manifest["files"]) == set(contract.DATA_FILES) and manifest["vocab_size"] == VOCAB
    assert builder.verify_manifest(data) == manifest["hash"]
    tokens = bytearray((data / "val/tokens.bin").read_bytes())
    tokens[5] ^= 1
    (data / "val/tokens.bin").write_bytes(bytes(tokens))
    with pytest.raises(builder.PrepareError, match="does not match"):
        builder.verify_manifest(data)
    (data / "val/tokens.bin").unlink()
    with pytest.raises(builder.PrepareError, match="missing"):
        builder.verify_manifest(data)
    manifest["files"]["train/docs.npy"] = "0" * 64  # edited without fixing the combined hash
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert builder.read_manifest(data) is None
    (data / "manifest.json").write_text("{not json")
    assert builder.read_manifest(data) is None
    with pytest.raises(builder.PrepareError, match="no complete manifest"):
        builder.verify_manifest(data)


def test_second_run_does_nothing_and_force_rebuilds(cache, capsys):
    corpus = write_corpus(cache.parent / "corpus", n_docs=200)
    assert build("--source", "local", str(corpus)) == 0
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "local").rglob("*")}
    capsys.readouterr()
    assert build("--source", "local", str(corpus)) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "nothing to do" in out
    assert stamps == {p: p.stat().st_mtime_ns for p in (cache / "local").rglob("*")}
    assert build("--source", "local", str(corpus), "--force") == 0
    assert "building" in capsys.readouterr().out


def test_half_finished_build_is_detected_and_redone(cache):
    corpus = write_corpus(cache.parent / "corpus", n_docs=200)
    assert build("--source", "local", str(corpus)) == 0
    data = cache / "local"
    (data / "manifest.json").unlink()  # killed before the manifest, the last file, was written
    (cache / ".local.partial" / "spool").mkdir(parents=True)  # and a build that was killed midway
    assert build("--source", "local", str(corpus)) == 0
    assert builder.read_manifest(data) is not None and not (cache / ".local.partial").exists()


def test_failed_build_leaves_the_previous_data_alone(cache, monkeypatch):
    corpus = write_corpus(cache.parent / "corpus", n_docs=200)
    assert build("--source", "local", str(corpus)) == 0
    good = builder.verify_manifest(cache / "local")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "tokenize_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build("--source", "local", str(corpus), "--force")
    assert builder.verify_manifest(cache / "local") == good
    assert not (cache / ".local.partial").exists()


# ---- local source ------------------------------------------------------------------------------


def test_local_source_reads_txt_md_jsonl_and_parquet(cache):
    corpus = cache.parent / "mixed"
    write_corpus(corpus / "txt", n_docs=60)
    (corpus / "notes.md").write_text("\n\n".join(f"# Note {i}\n\nSome *markdown* text number {i}." for i in range(400)))
    rows = [document(random.Random(i), i) for i in range(80)]
    (corpus / "rows.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows[:40])))
    pq.write_table(pa.table({"text": rows[40:], "id": list(range(40))}), corpus / "rows.parquet")
    (corpus / "ignored.csv").write_text("text\nnot read\n")
    docs = list(sources.local_docs(corpus))
    texts = [text for _, text in docs]
    assert {group for group, _ in docs} == {"local"}
    assert all(row in texts for row in rows)  # one document per jsonl line and per parquet row
    md_docs = [t for t in texts if t.startswith("# Note")]
    assert len(md_docs) > 1 and "# Note 399" in md_docs[-1]  # a long .md is cut
    assert not any("not read" in t for t in texts)
    assert build("--source", "local", str(corpus)) == 0
    assert builder.read_manifest(cache / "local")["stats"]["train"]["docs"] > 100


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nowhere", "does not exist"),
        (lambda d: d, "holds no .txt, .md, .jsonl or .parquet files"),
        (lambda d: (d / "a.txt").write_text("   \n") and d, "too few"),
        (lambda d: (d / "a.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0") and d, "is not UTF-8 text"),
        (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n') and d, "line 2 of"),
        (lambda d: (d / "a.csv").write_text("x") and d / "a.csv", "is not a .txt, .md, .jsonl or .parquet file"),
        (lambda d: (d / "a.parquet").write_bytes(b"PAR1 not really") and d, "is not a readable parquet file"),
        (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "a.parquet") or d, "has no 'text' column"),
    ],
)
def test_local_source_errors_are_one_sentence(cache, capsys, make, message):
    source = cache.parent / "input"
    source.mkdir()
    assert build("--source", "local", str(make(source))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_unreadable_local_file_is_one_sentence(cache, capsys, monkeypatch):
    source = cache.parent / "input"
    source.mkdir()
    (source / "a.txt").write_text("secret")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", denied)  # as for a file of another user (tests may run as root)
    assert build("--source", "local", str(source)) == 1
    assert capsys.readouterr().err == f"error: cannot read {source / 'a.txt'} (Permission denied)\n"


def test_cli_prints_error_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dataprep", "--source", "local", str(tmp_path / "missing")], cwd=ROOT,
                          env={**os.environ, "AR_CACHE": str(tmp_path)}, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == f"error: {tmp_path / 'missing'} does not exist\n"


# ---- hf source against a local server --------------------------------------------------


@pytest.fixture
def shard_server(tmp_path):
    """Serves shard_00000.parquet and shard_00001.parquet; the first request for shard 0 fails with 500."""
    root = tmp_path / "served"
    (root / "data").mkdir(parents=True)
    for shard in range(2):
        rows = [document(random.Random(shard * 1000 + i), i) for i in range(150)]
        pq.write_table(pa.table({"text": rows}), root / "data" / f"shard_{shard:05d}.parquet", row_group_size=50)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if self.path.endswith("shard_00000.parquet") and requests.count(self.path) == 1:
                self.send_error(500, "busy")
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data", requests
    server.shutdown()
    server.server_close()


def test_hf_source_downloads_shards_with_retries(cache, shard_server, monkeypatch):
    url, requests = shard_server
    monkeypatch.setattr(sources, "RETRY_SECONDS", 0.01)
    assert build("--source", "hf", "--base-url", url, "--num-shards", "2") == 0
    assert requests == ["/data/shard_00000.parquet"] * 2 + ["/data/shard_00001.parquet"]
    stats = builder.read_manifest(cache / "hf")["stats"]
    assert stats["train"]["docs"] + stats["val"]["docs"] == len({
        t for s in range(2) for t in pq.read_table(next(cache.rglob(f"shard_{s:05d}.parquet"))).column("text").to_pylist()})
    assert not list(cache.rglob("*.part"))
    assert build("--source", "hf", "--base-url", url, "--num-shards", "2", "--name", "hf2") == 0
    assert len(requests) == 3  # shards already present are not fetched again


def test_hf_source_missing_shard_is_one_sentence(cache, shard_server, capsys, monkeypatch):
    url, _ = shard_server
    monkeypatch.setattr(sources, "RETRY_SECONDS", 0.01)
    assert build("--source", "hf", "--base-url", url, "--num-shards", "3") == 1
    assert "shard_00002.parquet answered HTTP 404" in capsys.readouterr().err


# ---- parsers of the offline packages, on tiny synthetic files ---------------------------


def r_int(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def r_chars(s: str | None) -> bytes:
    if s is None:
        return r_int(9, -1)
    data = s.encode()
    return r_int(9 | (1 << 15 if not s.isascii() else 1 << 18), len(data)) + data  # UTF8 or ASCII flag


def r_strings(*items: str | None) -> bytes:
    return r_int(16, len(items)) + b"".join(r_chars(s) for s in items)


def r_named(values: list[bytes], names: list[str], symbol: bytes) -> bytes:
    """A generic vector with a names attribute: pairlist(tag=symbol, value=names) after the items."""
    return r_int(19 | 0x200, len(values)) + b"".join(values) + r_int(2 | 0x400) + symbol + r_strings(*names) + r_int(254)


def r_serialize(body: bytes) -> bytes:
    return b"X\n" + r_int(3, 0x40201, 0x30500, 5) + b"UTF-8" + body


def test_r_reader_decodes_character_vectors_names_and_references():
    names_symbol = r_int(1) + r_chars("names")
    names_ref = r_int((1 << 8) | 255)  # the first symbol read so far, again, by reference
    inner = r_named([r_int(13, 2, 7, 9), r_int(10, 1, 1)], ["a", "b"], names_symbol)
    data = r_serialize(r_named([r_strings("Émma", None, "x"), inner, r_int(14, 1) + struct.pack(">d", 0.5)],
                               ["text", "inner", "real"], names_ref))
    assert formats.r_unserialize(data) == {"text": ["Émma", None, "x"], "inner": {"a": [7, 9], "b": [1]}, "real": [0.5]}
    with pytest.raises(builder.PrepareError):
        formats.r_unserialize(b"RDX3\n")


def test_r_lazyload_database(tmp_path):
    novels = {"emma": r_serialize(r_strings("EMMA", "", "Emma Woodhouse, handsome.")),
              "persuasion": r_serialize(r_strings("PERSUASION", "", "Sir Walter Elliot."))}
    blob, offsets = b"", []
    for data in novels.values():
        chunk = struct.pack(">I", len(data)) + zlib.compress(data)
        offsets.append(r_int(13, 2, len(blob), len(chunk)))
        blob += chunk
    names_symbol = r_int(1) + r_chars("names")
    variables = r_named(offsets, list(novels), names_symbol)
    index = r_named([variables, r_int(19, 0), r_int(10, 1, 1)], ["variables", "references", "compressed"],
                    r_int((1 << 8) | 255))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))
    assert formats.read_r_lazyload(tmp_path / "Rdata") == {
        "emma": ["EMMA", "", "Emma Woodhouse, handsome."], "persuasion": ["PERSUASION", "", "Sir Walter Elliot."]}


def test_sword_ztext_reader_and_osis_markup(tmp_path):
    books = ['<div osisID="Gen" type="book"/><title type="main">Genesis</title><div sID="p1" type="x-p"/>'
             '<chapter n="1" osisID="Gen.1"/><w lemma="H7225">In</w> the beginning God’s<note placement="foot">'
             'a footnote</note>word &amp; light. <div eID="p1" type="x-p"/><div sID="p2" type="x-p"/>Evening came.',
             '<lg><l sID="l1"/>Praise the Lord,<l eID="l1"/><l sID="l2"/>all you nations!<l eID="l2"/></lg>']
    index, blocks = b"", b""
    for book in ["", *books]:  # an empty record, as real modules have, is skipped
        data = zlib.compress(book.encode())
        index += struct.pack("<III", len(blocks), len(data) if book else 0, len(book.encode()))
        blocks += data if book else b""
    (tmp_path / "ot.bzs").write_bytes(index)
    (tmp_path / "ot.bzz").write_bytes(blocks)
    assert list(formats.read_sword_ztext(tmp_path / "ot")) == books
    assert formats.osis_to_text(books[0]) == "Genesis\n\nIn the beginning God’s word & light.\n\nEvening came."
    assert formats.osis_to_text(books[1]) == "Praise the Lord,\nall you nations!"


def test_missing_package_is_one_sentence(cache):
    with pytest.raises(builder.PrepareError, match=r"could not fetch the Debian package no-such-package-here \(E: "):
        sources.fetch_deb("no-such-package-here")


def test_missing_apt_get_is_one_sentence(cache, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(cache))  # an empty directory: no apt-get, no dpkg-deb
    assert build() == 1
    assert capsys.readouterr().err == ("error: apt-get is not available to fetch the Debian package r-cran-janeaustenr; "
                                       "build from your own text with --source local PATH\n")


def fake_package(monkeypatch, tmp_path, files: dict[str, bytes]) -> None:
    """Makes fetch_deb return a folder holding `files` instead of downloading a package."""
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    monkeypatch.setattr(sources, "fetch_deb", lambda package: tmp_path)


def test_fortunes_split_on_percent_lines(tmp_path, monkeypatch):
    folder = "usr/share/games/fortunes/"
    fake_package(monkeypatch, tmp_path, {folder + "wisdom": b"Be _\bb_\bo_\bl_\bd.\n%\nTwo\nlines.\n%\n",
                                         folder + "wisdom.dat": b"\0\0\0\x02binary index"})
    (tmp_path / folder / "wisdom.u8").symlink_to("wisdom")
    assert list(sources.fortune_docs()) == ["Be bold.", "Two\nlines."]


def dictd_digits(n: int) -> str:
    """dictd's base-64 numbers (the inverse of formats.dictd_number)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return (dictd_digits(n // 64) if n >= 64 else "") + alphabet[n % 64]


def test_gcide_entries_are_cleaned(tmp_path, monkeypatch):
    entries = ["00-database-info\n   GPL licence text\n",
               "Equip \\E*quip\"\\, v. t. [F. ['e]quiper.]\n   To furnish; to {fit out}.\n   [1913 Webster]\n",
               "Feasible (f[=e]\"z[i^]*b'l) a.\n   Practicable. [Obs.] [PJC]\n"]
    data, index = b"", ""
    for word, entry in zip(["00-database-info", "Equip", "Feasible"], entries):
        index += f"{word}\t{dictd_digits(len(data))}\t{dictd_digits(len(entry))}\n"
        data += entry.encode()
    fake_package(monkeypatch, tmp_path, {"usr/share/dictd/gcide.dict.dz": gzip.compress(data),
                                         "usr/share/dictd/gcide.index": index.encode()})
    assert list(sources.gcide_docs()) == ["Equip, v. t. [F. équiper.]\nTo furnish; to fit out.\n\n"
                                          "Feasible a.\nPracticable. [Obs.]"]


def test_wordnet_glosses(tmp_path, monkeypatch):
    lines = ("  1 This software and database is being provided\n"
             "01035217 32 v 03 browbeat 0 bully 0 swagger 1 002 @ 00768796 v 0000 | discourage with threats  \n"
             "00001740 03 a 02 galore(ip) 0 in_plenty 0 000 | in abundance; \"there were flowers galore\"  \n")
    fake_package(monkeypatch, tmp_path, {f"usr/share/wordnet/data.{pos}": lines.encode() if pos == "verb" else b""
                                         for pos in ("noun", "verb", "adj", "adv")})
    assert list(sources.wordnet_docs()) == [
        "browbeat, bully, swagger: discourage with threats\ngalore, in plenty: in abundance; \"there were flowers galore\""]


# ---- the real thing ----------------------------------------------------------------------


@pytest.mark.slow
def test_real_offline_build_uses_every_package(tmp_path):
    env = {**os.environ, "AR_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "dataprep"], cwd=ROOT, env=env, check=True, timeout=1200)
    data = tmp_path / "offline"
    manifest = builder.read_manifest(data)
    assert builder.verify_manifest(data) == manifest["hash"]
    assert set(manifest["stats"]["sources"]) == set(sources.OFFLINE_CORPORA)
    assert all(nbytes > 1_000_000 for nbytes in manifest["stats"]["sources"].values())
    assert manifest["stats"]["train"]["tokens"] > 10_000_000 and manifest["stats"]["val"]["tokens"] > 500_000
