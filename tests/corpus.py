"""A small synthetic corpus with learnable structure, generated deterministically.

Tests need text that a tiny model can learn in seconds and that is the same on
every machine; grammatical sentences over a small vocabulary give both.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old sailor", "my neighbour", "the small robot", "every student", "the queen", "a farmer"]
VERBS = ["sees", "likes", "builds", "follows", "paints", "remembers", "carries", "answers"]
OBJECTS = ["the river", "a red house", "the letter", "seven apples", "the morning train", "a quiet song", "the map", "an idea"]
ENDINGS = ["today", "again", "in the garden", "before dinner", "with great care", "at night", "without a word", "slowly"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
    return s[0].upper() + s[1:]


def document(rng: random.Random, index: int) -> str:
    paragraphs = []
    for p in range(rng.randint(1, 4)):
        count = " ".join(str(n) for n in range(index % 7, index % 7 + rng.randint(3, 9)))
        paragraphs.append(" ".join(sentence(rng) for _ in range(rng.randint(2, 6))) + f" Counting: {count}.")
    return f"Chapter {index}\n\n" + "\n\n".join(paragraphs) + "\n"


def write_corpus(directory: Path, n_docs: int = 600, seed: int = 0) -> Path:
    """Write `n_docs` .txt documents into `directory` and return it."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (directory / f"doc{i:04d}.txt").write_text(document(rng, i))
    return directory


def stand_in_data(directory: Path) -> str:
    """A data directory whose files are placeholders but whose manifest vouches for them (as a night and
    a rerun check): for tests whose sandbox never reads the data. Returns the manifest's hash."""
    from contract import DATA_FILES
    from dataprep.build import write_manifest

    for rel in DATA_FILES:
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(f"stand-in {rel}\n".encode())
    return write_manifest(directory, "stand-in", 0, {})["hash"]
