"""Shared fixtures: an empty ledger, a stand-in project and its recorded night, a tiny prepared dataset and the
Docker engine (when there is one)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.core.ledger import Ledger
from tests.corpus import write_corpus
from tests.doubles import BASE_TRAIN_PY
from tests.recorded_night import NAMES, record_night

ROOT = Path(__file__).resolve().parent.parent
TINY_VOCAB = 512


@pytest.fixture
def ledger(tmp_path):
    """An empty ledger of the test's own."""
    db = Ledger(tmp_path / "ledger.sqlite")
    yield db
    db.close()


@pytest.fixture
def project(tmp_path):
    """A project whose train.py is the fake sandbox's stand-in (tests.doubles)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "train.py").write_text(BASE_TRAIN_PY)
    (root / "prepare.py").write_text('"""A stand-in harness."""\nTIME_BUDGET = 1.0\n')
    (root / "program.md").write_text("Lower val_bpb.\n")
    return root


@pytest.fixture
def night(project):
    """The scripted night every morning test reads (tests.recorded_night); `ids` names its experiments."""
    recorded = record_night(project)
    recorded.ids = dict(zip(NAMES, recorded.experiments))
    return recorded


@pytest.fixture
def sandbox(night, monkeypatch):
    """The night's own fake sandbox, which `rerun` and `verify` find (it holds the night's images)."""
    from runner.morning import rerun

    monkeypatch.setattr(rerun, "open_backend", lambda name: night.backend)
    return night.backend


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """An AR_CACHE holding `local/`: the synthetic corpus prepared by the real data builder."""
    cache = tmp_path_factory.mktemp("ar_cache")
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    env = {**os.environ, "AR_CACHE": str(cache)}
    subprocess.run([sys.executable, "-m", "dataprep", "--source", "local", str(corpus), "--vocab-size", str(TINY_VOCAB)],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    return cache


@pytest.fixture(scope="session")
def tiny_data(tiny_cache) -> Path:
    """The prepared data directory (tokenizer, train/, val/, manifest.json)."""
    return tiny_cache / "local"


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_client():
    """A Docker client; skips without an engine unless AR_REQUIRE_DOCKER is set (then fails)."""
    if not docker_available():
        if os.environ.get("AR_REQUIRE_DOCKER"):
            pytest.fail("AR_REQUIRE_DOCKER is set but no Docker engine answers")
        pytest.skip("no Docker engine reachable")
    import docker

    return docker.from_env(timeout=120)


@pytest.fixture(scope="session")
def docker_base_image(docker_client) -> str:
    """The sandbox base image id: built once (minutes the first time), then found by its tag."""
    from sandbox.images import ensure_base_image

    return ensure_base_image(docker_client).id


@contextlib.contextmanager
def ledger_held(path: Path, *statements: str) -> Iterator[None]:
    """Another process holds the SQLite file at `path`, having run `statements`, until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys\n"
         f"db = sqlite3.connect({str(path)!r}, isolation_level=None, timeout=30)\n"
         + "".join(f"db.execute({statement!r})\n" for statement in statements)
         + "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
