"""Grouping near-duplicate documents, so that the split can hold out whole groups.

Copies of one text with small edits (a driver copied for another chip, two versions of a file, a
licence with another name in it) would otherwise fall on both sides of a split by their own hashes,
and val_bpb would partly measure memorisation. Each document's MinHash signature goes into an LSH
index (datasketch); the candidates it returns whose signatures agree on at least THRESHOLD of their
values are joined, and the groups are the connected components.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import zlib
from collections.abc import Iterable
from itertools import islice

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

SHINGLE_WORDS = 5  # documents are compared as sets of word 5-grams
NUM_PERM = 128  # MinHash values per document: estimates the Jaccard similarity to about ±0.04
THRESHOLD = 0.7  # joins copies with up to about one word in 30 edited; unrelated texts share far fewer 5-grams
LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative): a missed copy leaks, a false candidate is only checked
SEED = 1  # fixed permutations: the same documents always give the same groups
WORKERS = min(os.cpu_count() or 1, 16)  # processes computing signatures, enough to keep pace with reading
BATCH = 512  # documents handed to the workers at a time: memory stays flat however long the input
WORD = re.compile(r"\w+")
EMPTY = MinHash(num_perm=NUM_PERM, seed=SEED, hashfunc=zlib.crc32)


def shingles(text: str) -> list[bytes]:
    """The distinct word 5-grams of the lower-cased text. Words (runs of letters, digits and _) work
    for prose and code alike and ignore layout, so re-indented code and re-wrapped prose still match,
    while a renamed identifier changes only the 5-grams around it; character 5-grams would make
    unrelated texts of one language look alike. A text of fewer than 5 words is one shingle (its
    words, or the text itself when it has none)."""
    words = WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        return [" ".join(words or text.split()).encode()]
    return list(map(str.encode, set(map(" ".join, zip(*(words[i:] for i in range(SHINGLE_WORDS)))))))


def signature(text: str) -> np.ndarray:
    """The MinHash values (uint32 [NUM_PERM]) of the text's shingles. CRC-32 hashes the shingles:
    about three times faster than datasketch's default SHA-1, and datasketch's affine32 scheme
    mixes the input hash (MurmurHash3's finalizer) before permuting it."""
    minhash = EMPTY.copy()  # shares the permutations, which take longer to draw than most texts to hash
    minhash.update_batch(shingles(text))
    return minhash.hashvalues


def groups(texts: Iterable[str]) -> list[int]:
    """For each text, in order, a label shared by exactly the texts of its group: the connected
    components (union-find) of the pairs that LSH offers as candidates and whose estimated Jaccard
    similarity (the share of equal MinHash values) reaches THRESHOLD. The groups depend only on the
    set of texts, not on their order; the texts themselves are not kept."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=LSH_WEIGHTS)
    signatures: list[np.ndarray] = []
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    texts = iter(texts)
    # fork: workers start in milliseconds and need nothing pickled but the texts
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        while batch := list(islice(texts, BATCH)):
            for hashvalues in pool.map(signature, batch, chunksize=8):
                i = len(parent)
                parent.append(i)
                minhash = LeanMinHash(seed=SEED, hashvalues=hashvalues, scheme="affine32")
                for j in lsh.query(minhash):  # the earlier texts that share a band with this one
                    if np.mean(signatures[j] == hashvalues) >= THRESHOLD:
                        parent[root(j)] = root(i)
                lsh.insert(i, minhash, check_duplication=False)
                signatures.append(hashvalues)
    return [root(i) for i in range(len(parent))]
