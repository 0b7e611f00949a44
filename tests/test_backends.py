"""Choosing the isolation backend and building it from its configuration."""

from __future__ import annotations

import pytest

from sandbox import backends
from sandbox.backends import DockerConfig, ProcessConfig, choose_backend, make_backend
from sandbox.process_backend import ProcessBackend
from sandbox.spec import SandboxUnavailable


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "docker_unreachable", lambda: "FileNotFoundError: no socket")


def test_get_backend_picks_process_without_an_engine(no_engine, monkeypatch, tmp_path):
    monkeypatch.setenv("AR_CACHE", str(tmp_path))
    assert choose_backend("auto") == "process" and choose_backend("process") == "process"
    chosen = backends.get_backend("auto")
    assert isinstance(chosen, ProcessBackend) and chosen.snapshots_root == tmp_path / "snapshots"
    assert isinstance(backends.get_backend("process"), ProcessBackend)
    with pytest.raises(SandboxUnavailable, match="no Docker engine answers"):
        backends.get_backend("docker")
    with pytest.raises(SandboxUnavailable, match="unknown sandbox backend"):
        backends.get_backend("bwrap")


def test_the_backend_takes_its_configuration(tmp_path):
    hidden = tmp_path / "runs"
    backend = make_backend(ProcessConfig(snapshots_root=tmp_path / "snapshots", hide=(hidden,)))
    assert isinstance(backend, ProcessBackend) and backend.snapshots_root == tmp_path / "snapshots"
    assert hidden in backend._hide
    docker = make_backend(DockerConfig(base_image="pytorch/pytorch:x"))  # the engine is asked only when used
    assert docker.name == "docker" and docker._base_image == "pytorch/pytorch:x"


def test_a_setting_the_backend_does_not_take_is_an_error():
    with pytest.raises(TypeError, match="base_image"):
        ProcessConfig(base_image="pytorch/pytorch:x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="hide"):
        DockerConfig(hide=())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="no sandbox backend is configured by a dict"):
        make_backend({"hide": ()})  # type: ignore[arg-type]
