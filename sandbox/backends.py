"""Choosing the isolation backend, and building it from its configuration.

`choose_backend` resolves the user's choice ("auto": docker where an engine answers,
the process backend elsewhere); the caller then builds the configuration of the
backend chosen, so a setting can only go to the backend that takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from sandbox.spec import Backend, SandboxUnavailable

log = structlog.get_logger(__name__)

NAMES = ("auto", "docker", "process")
PING_TIMEOUT_S = 3


@dataclass(frozen=True)
class DockerConfig:
    """The docker backend (sandbox.docker_backend)."""

    base_image: str | None = None  # the online runtime's upstream; None: $AR_BASE_IMAGE, else the pinned tag


@dataclass(frozen=True)
class ProcessConfig:
    """The process backend (sandbox.process_backend)."""

    hide: tuple[Path, ...] = ()  # host directories a run must not see (other nights, the ledger)
    snapshots_root: Path | None = None  # None: <cache>/snapshots


BackendConfig = DockerConfig | ProcessConfig


def docker_unreachable() -> str | None:
    """Why no Docker engine answers here (None when one does)."""
    try:
        import docker

        docker.from_env(timeout=PING_TIMEOUT_S).ping()
    except Exception as error:  # no SDK, no socket, no permission, no answer: all mean "no engine"
        return f"{type(error).__name__}: {error}"
    return None


def choose_backend(name: str = "auto") -> str:
    """"docker" or "process" for the choice `name`; "auto" takes docker when an engine answers."""
    if name not in NAMES:
        raise SandboxUnavailable(f"unknown sandbox backend {name!r}: choose one of {', '.join(NAMES)}.")
    if name == "process":
        return name
    why_not_docker = docker_unreachable()
    if name == "docker" and why_not_docker:
        raise SandboxUnavailable(f"the docker sandbox was asked for but no Docker engine answers ({why_not_docker}).")
    if name == "auto":
        log.info("sandbox.backend", chosen="process" if why_not_docker else "docker",
                 why=f"no Docker engine answers ({why_not_docker})" if why_not_docker else "a Docker engine answers")
    return "process" if why_not_docker else "docker"


def make_backend(config: BackendConfig) -> Backend:
    """The backend that `config` configures (its module, docker's SDK included, is imported only now)."""
    if isinstance(config, DockerConfig):
        from sandbox.docker_backend import DockerBackend

        return DockerBackend(base_image=config.base_image)
    if isinstance(config, ProcessConfig):
        from sandbox.process_backend import ProcessBackend

        return ProcessBackend(snapshots_root=config.snapshots_root, hide=config.hide)
    raise TypeError(f"no sandbox backend is configured by a {type(config).__name__}")


def get_backend(name: str = "auto") -> Backend:
    """The backend `name` stands for, in its default configuration."""
    return make_backend(DockerConfig() if choose_backend(name) == "docker" else ProcessConfig())
