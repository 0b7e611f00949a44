"""Docker images of the sandbox: a runtime, a base and one image per experiment.

Each layer is tagged by the hash of its inputs, so a second build finds it and does nothing:

  autoresearch-runtime:<source>-<hash>  Linux + Python + the pinned torch, numpy, tiktoken.
      offline: images/build_rootfs.sh (debootstrap; needs no registry), then `docker import`;
      online:  images/Dockerfile, from a pinned official PyTorch image.
      hash of: the runtime requirements (taken from uv.lock) + the builder script or Dockerfile.
  autoresearch-base:<hash>   runtime + the trusted harness (sandbox.harness: prepare.py, contract.py),
      user, workdir, env (base.Dockerfile).
      hash of: runtime id + the harness files + base.Dockerfile + the container uid.
  autoresearch-exp:<hash>    base + one experiment's train.py (read-only), nothing run to build it.
      hash of: base id + train.py.

Identical train.py files share one experiment image: its `autoresearch.exp` label names
the first experiment that built it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Iterator

import docker
import docker.errors
import structlog
from docker.models.images import Image

from sandbox.harness import PROJECT_ROOT, harness_files

log = structlog.get_logger(__name__)

IMAGES_DIR = PROJECT_ROOT / "images"
ROOTFS_BUILDER = IMAGES_DIR / "build_rootfs.sh"
ONLINE_DOCKERFILE = IMAGES_DIR / "Dockerfile"
BASE_DOCKERFILE = IMAGES_DIR / "base.Dockerfile"

CONTAINER_UID = 65534  # `nobody`: every sandboxed process runs as this uid and gid
RUNTIME_REPO, BASE_REPO, EXPERIMENT_REPO = "autoresearch-runtime", "autoresearch-base", "autoresearch-exp"
KIND_LABEL, EXP_LABEL = "autoresearch.kind", "autoresearch.exp"
BUILD_PREFIX = "autoresearch-build-"  # + the builder's process identity: reap() removes a dead builder's
UV = os.environ.get("UV", "uv")  # `uv run` names its own binary here, which may not be on PATH
SOURCES = ("offline", "online")
EXPERIMENT_COMMAND = ["python3", "train.py"]  # the experiment image's default command (phase 1)
# The packages the container imports; the online image already brings torch and its CUDA stack.
RUNTIME_ROOTS = {"offline": ("torch", "numpy", "tiktoken"), "online": ("numpy", "tiktoken")}
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9._-]+")


class ImageBuildError(Exception):
    """An image could not be built (one clear sentence; the build output says why)."""


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# Pinned requirements from uv.lock


def _lock_closure(lock: dict, roots: tuple[str, ...]) -> set[str]:
    """Names of `roots` and everything they depend on in the lock, extras included."""
    by_name: dict[str, list[dict]] = {}
    for package in lock["package"]:
        by_name.setdefault(package["name"], []).append(package)
    visited: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(name, ()) for name in roots]
    while todo:
        key = todo.pop()
        if key in visited:
            continue
        visited.add(key)
        name, extras = key
        for package in by_name[name]:
            deps = list(package.get("dependencies", []))
            for extra in extras:
                deps += package.get("optional-dependencies", {}).get(extra, [])
            todo += [(dep["name"], tuple(dep.get("extra", ()))) for dep in deps]
    return {name for name, _ in visited}


def runtime_requirements(source: str) -> str:
    """A hashed requirements file for the container: the lock's pins of the runtime packages."""
    lock = tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())
    wanted = _lock_closure(lock, RUNTIME_ROOTS[source])
    exported = subprocess.run(
        [UV, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-header", "--no-annotate"],
        cwd=PROJECT_ROOT, check=True, capture_output=True, text=True,
    ).stdout
    blocks: list[list[str]] = []
    for line in exported.splitlines():
        if line and not line[0].isspace():  # a new requirement; its hash lines are indented
            blocks.append([])
        if blocks and line:
            blocks[-1].append(line)
    kept = [block for block in blocks if _REQUIREMENT_NAME.match(block[0])[0] in wanted]
    return "".join("\n".join(block) + "\n" for block in kept)


# -----------------------------------------------------------------------------
# Building


def _find(client: docker.DockerClient, ref: str) -> Image | None:
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def _tar(files: dict[str, tuple[bytes, int]]) -> io.BytesIO:
    """An in-memory build context; files are root-owned with the given mode (COPY keeps it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _build(client: docker.DockerClient, files: dict[str, tuple[bytes, int]], tag: str, **kwargs) -> Image:
    try:
        image, _ = client.images.build(
            fileobj=_tar(files), custom_context=True, tag=tag, rm=True, forcerm=True, pull=False, **kwargs
        )
    except docker.errors.BuildError as error:
        output = "".join(chunk.get("stream", "") for chunk in error.build_log)
        log.error("image.build_failed", tag=tag, output=output[-4000:])
        raise ImageBuildError(f"building {tag} failed: {error.msg}") from error
    return image


def _build_offline_runtime(client: docker.DockerClient, tag: str, requirements: str) -> None:
    """debootstrap a root filesystem with the packages installed from the host, then import it."""
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the offline runtime image needs root (debootstrap); run as root or set AR_RUNTIME=online"
        )
    # About 5 GB: /var/tmp rather than a /tmp that may live in memory.
    work = Path(tempfile.mkdtemp(prefix="autoresearch-rootfs-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    try:
        (work / "requirements.txt").write_text(requirements)
        rootfs = work / "rootfs"
        result = subprocess.run(["bash", str(ROOTFS_BUILDER), str(rootfs), str(work / "requirements.txt")])
        if result.returncode:
            raise ImageBuildError(f"{ROOTFS_BUILDER.name} failed with exit code {result.returncode} (output above)")
        log.info("image.step", step="docker import of the root filesystem", tag=tag)
        repository, _, version = tag.partition(":")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        try:
            client.api.import_image_from_data(
                tar.stdout, repository=repository, tag=version, changes=[f"LABEL {KIND_LABEL}=runtime"]
            )
        finally:
            tar.stdout.close()
            if tar.wait():
                raise ImageBuildError(f"archiving the root filesystem failed with exit code {tar.returncode}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_online_runtime(client: docker.DockerClient, tag: str, requirements: str) -> None:
    files = {"Dockerfile": (ONLINE_DOCKERFILE.read_bytes(), 0o644), "requirements.txt": (requirements.encode(), 0o644)}
    _build(client, files, tag, labels={KIND_LABEL: "runtime"})


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """One base build at a time on this host: a second caller waits, then finds the image built."""
    fd = os.open(Path(tempfile.gettempdir()) / "autoresearch-images.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_runtime_image(client: docker.DockerClient, source: str) -> str:
    """The runtime image id for `source` ("offline" or "online"), built once."""
    if source not in SOURCES:
        raise ImageBuildError(f"unknown runtime source {source!r}; choose one of {', '.join(SOURCES)}")
    requirements = runtime_requirements(source)
    recipe = ROOTFS_BUILDER if source == "offline" else ONLINE_DOCKERFILE
    tag = f"{RUNTIME_REPO}:{source}-{_digest(requirements, recipe.read_bytes())}"
    if image := _find(client, tag):
        return image.id
    log.info("image.step", step=f"building the {source} runtime image (minutes, once)", tag=tag)
    started = time.monotonic()
    (_build_offline_runtime if source == "offline" else _build_online_runtime)(client, tag, requirements)
    if (image := _find(client, tag)) is None:
        raise ImageBuildError(f"the {source} runtime build finished without producing {tag}")
    log.info("image.built", tag=tag, seconds=round(time.monotonic() - started, 1), size_mb=image.attrs["Size"] // 2**20)
    return image.id


def ensure_base_image(client: docker.DockerClient, source: str | None = None) -> str:
    """The base image id (runtime + the harness, user, workdir, env), built once per input."""
    with _host_lock():
        return _ensure_base_image(client, source or os.environ.get("AR_RUNTIME", "offline"))


def base_tag(runtime_id: str, root: Path = PROJECT_ROOT) -> str:
    """The base image's tag: a hash of everything that goes into it (never of the data builder)."""
    harness = harness_files(root)
    parts = [part for name in sorted(harness) for part in (name, harness[name])]
    return f"{BASE_REPO}:{_digest(runtime_id, *parts, (root / 'images' / 'base.Dockerfile').read_bytes(), str(CONTAINER_UID))}"


def _ensure_base_image(client: docker.DockerClient, source: str) -> str:
    runtime_id = ensure_runtime_image(client, source)
    tag = base_tag(runtime_id)
    if image := _find(client, tag):
        return image.id
    log.info("image.step", step="building the base image (runtime + harness)", tag=tag)
    files = {"Dockerfile": (BASE_DOCKERFILE.read_bytes(), 0o644),
             **{name: (content, 0o444) for name, content in harness_files().items()}}
    image = _build(client, files, tag, buildargs={"RUNTIME": runtime_id, "UID": str(CONTAINER_UID)})
    log.info("image.built", tag=tag)
    return image.id


def experiment_tag(base_id: str, train_py: str) -> str:
    return f"{EXPERIMENT_REPO}:{_digest(base_id, train_py)}"


def build_container_name(owner: str, exp_id: str) -> str:
    """The name of a build's container: it tells which process built it (a `process_identity`)."""
    return f"{BUILD_PREFIX}{owner.replace(':', '-')}-{exp_id}-{os.urandom(3).hex()}"


def build_owner(container_name: str) -> str:
    """The `process_identity` in a `build_container_name`."""
    pid, start = container_name.removeprefix("/").removeprefix(BUILD_PREFIX).split("-")[:2]
    return f"{pid}:{start}"


def build_experiment_image(client: docker.DockerClient, base_id: str, train_py: str, exp_id: str,
                           owner: str = "") -> str:
    """Bake train.py (root-owned, read-only) into an image on top of the base; return its id.

    The same as `FROM base` + `COPY train.py /app/train.py`, done as one commit of a
    container that never starts (and has no network): a single layer step, where a
    Dockerfile build needs one for COPY and one for the labels. `owner` (the builder's
    `process_identity`) names the container, so that a build killed halfway is reaped.
    """
    tag = experiment_tag(base_id, train_py)
    if image := _find(client, tag):
        return image.id
    labels = {KIND_LABEL: "experiment", EXP_LABEL: exp_id}
    container = client.containers.create(base_id, command=EXPERIMENT_COMMAND, labels=labels, network_mode="none",
                                         name=build_container_name(owner, exp_id) if owner else None)
    try:
        container.put_archive("/app", _tar({"train.py": (train_py.encode(), 0o444)}))
        repository, _, version = tag.partition(":")
        return container.commit(repository=repository, tag=version).id
    finally:
        container.remove(force=True)


def prune_experiment_images(keep_ids: set[str], client: docker.DockerClient | None = None) -> int:
    """Remove experiment images not in `keep_ids` (kept and pending ones are needed for reruns)."""
    client = client or docker.from_env()
    removed = 0
    for image in client.images.list(filters={"label": f"{KIND_LABEL}=experiment"}):
        if image.id in keep_ids:
            continue
        try:
            client.images.remove(image.id)
            removed += 1
        except docker.errors.APIError as error:  # in use by a running container: next time
            log.warning("image.prune_skipped", image=image.id, error=str(error))
    return removed


if __name__ == "__main__":
    print(ensure_base_image(docker.from_env(timeout=600)))
