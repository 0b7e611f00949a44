"""Every hostile train.py of tests/hostile_cases.py, run through the process backend."""

from __future__ import annotations

import shutil
import sysconfig
import tempfile
import uuid
from pathlib import Path

import pytest

from sandbox.process_backend import ProcessBackend
from tests.hostile_cases import (CASES, HARNESS, ISOLATION, MEMORY_LIMIT, PIDS_LIMIT, HostileCase, HostState, Listener,
                                 HostEndpoints, assert_case, make_fake_data, run_case, secret_on_host)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> ProcessBackend:
    return ProcessBackend(snapshots_root=tmp_path_factory.mktemp("snapshots"))


@pytest.fixture
def host_area():
    """A host directory outside /tmp (which the sandbox replaces), searchable by anyone, so hiding it is really tested."""
    area = Path(tempfile.mkdtemp(prefix="ar-hostile-", dir="/var/tmp"))
    area.chmod(0o755)
    yield area
    shutil.rmtree(area)


@pytest.fixture
def host_files(host_area):
    """World-readable host files outside the runtime: under /var/tmp and /opt, the project's own, the host's /etc."""
    opt = Path("/opt", f"ar-hostile-{uuid.uuid4().hex[:8]}")
    opt.mkdir(mode=0o755)
    files = (host_area / "host-file", opt / "host-file")
    for path in files:
        path.write_text("a host file")
        path.chmod(0o644)
    yield (*files, ROOT / "README.md", Path("/etc/hostname"))
    shutil.rmtree(opt)


def _host_endpoints(host_area: Path) -> list[Path]:
    """Under /var/tmp, and inside a tree the sandbox does expose (its Python's site-packages)."""
    return [host_area / "host.sock", Path(sysconfig.get_paths()["purelib"], f"ar-hostile-{uuid.uuid4().hex[:8]}.sock")]


def _unmet(backend: ProcessBackend, case: HostileCase) -> list[str]:
    support = backend.support
    offered = {ISOLATION: support.isolated, MEMORY_LIMIT: support.memory_limit, PIDS_LIMIT: support.pids_limit,
               HARNESS: True}
    return sorted(need for need in case.needs if not offered[need])


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name, marks=[pytest.mark.slow] if HARNESS in case.needs else [])
                                  for case in CASES])
def test_hostile_case(case: HostileCase, backend, host_area, host_files, tmp_path, request):
    unmet = _unmet(backend, case)
    if unmet:
        pytest.skip(f"this host's process sandbox lacks {', '.join(unmet)}: {backend.isolation}")
    data = request.getfixturevalue("tiny_data") if HARNESS in case.needs else make_fake_data(host_area / "data")
    with Listener("127.0.0.1") as listener, HostEndpoints(_host_endpoints(host_area)) as endpoints, secret_on_host():
        state = HostState(listener, data, host_area / "host", endpoints, host_files)
        status, log = run_case(backend, case, state, tmp_path)
    assert_case(case, status, log, tmp_path / "out", state)
