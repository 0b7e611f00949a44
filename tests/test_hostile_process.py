"""Every hostile train.py of tests/hostile_cases.py, run through the process backend."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox.process_backend import ProcessBackend
from tests.hostile_cases import (CASES, HARNESS, ISOLATION, MEMORY_LIMIT, PIDS_LIMIT, HostileCase, HostState, Listener,
                                 assert_case, make_fake_data, run_case, secret_on_host)


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> ProcessBackend:
    return ProcessBackend(snapshots_root=tmp_path_factory.mktemp("snapshots"))


@pytest.fixture
def host_area():
    """A host directory outside /tmp (which the sandbox replaces), so hiding it is really tested."""
    area = Path(tempfile.mkdtemp(prefix="ar-hostile-", dir="/var/tmp"))
    yield area
    shutil.rmtree(area)


def _unmet(backend: ProcessBackend, case: HostileCase) -> list[str]:
    support = backend.support
    offered = {ISOLATION: support.isolated, MEMORY_LIMIT: support.memory_limit, PIDS_LIMIT: support.pids_limit,
               HARNESS: True}
    return sorted(need for need in case.needs if not offered[need])


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name, marks=[pytest.mark.slow] if HARNESS in case.needs else [])
                                  for case in CASES])
def test_hostile_case(case: HostileCase, backend, host_area, tmp_path, request):
    unmet = _unmet(backend, case)
    if unmet:
        pytest.skip(f"this host's process sandbox lacks {', '.join(unmet)}: {backend.isolation}")
    data = request.getfixturevalue("tiny_data") if HARNESS in case.needs else make_fake_data(host_area / "data")
    with Listener("127.0.0.1") as listener, secret_on_host():
        state = HostState(listener, data, host_area / "host")
        status, log = run_case(backend, case, state, tmp_path)
    assert_case(case, status, log, tmp_path / "out", state)
