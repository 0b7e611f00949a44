"""Choosing the isolation backend: docker where an engine answers, the process backend elsewhere."""

from __future__ import annotations

import inspect

import structlog

from sandbox.spec import Backend, SandboxUnavailable

log = structlog.get_logger(__name__)

NAMES = ("auto", "docker", "process")
PING_TIMEOUT_S = 3


def docker_unreachable() -> str | None:
    """Why no Docker engine answers here (None when one does)."""
    try:
        import docker

        docker.from_env(timeout=PING_TIMEOUT_S).ping()
    except Exception as error:  # no SDK, no socket, no permission, no answer: all mean "no engine"
        return f"{type(error).__name__}: {error}"
    return None


def _make(cls: type, settings: dict) -> Backend:
    """An instance of `cls` with the settings its constructor takes (the others belong to the other backend)."""
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in settings.items() if key in accepted})


def get_backend(name: str = "auto", **settings) -> Backend:
    """The backend called `name`; "auto" takes docker when an engine answers, else process."""
    if name not in NAMES:
        raise SandboxUnavailable(f"unknown sandbox backend {name!r}: choose one of {', '.join(NAMES)}.")
    why_not_docker = docker_unreachable() if name in ("auto", "docker") else None
    if name == "docker" and why_not_docker:
        raise SandboxUnavailable(f"the docker sandbox was asked for but no Docker engine answers ({why_not_docker}).")
    if name == "auto":
        log.info("sandbox.backend", chosen="process" if why_not_docker else "docker",
                 why=f"no Docker engine answers ({why_not_docker})" if why_not_docker else "a Docker engine answers")
    if name == "process" or why_not_docker:
        from sandbox.process_backend import ProcessBackend

        return _make(ProcessBackend, settings)
    from sandbox.docker_backend import DockerBackend

    return _make(DockerBackend, settings)
