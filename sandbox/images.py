"""Docker images of the sandbox: a runtime, a base and one image per experiment.

Each layer is tagged by the hash of its inputs, so a second build finds it and does nothing:

  autoresearch-runtime:<source>-<hash>  Linux + Python + the pinned torch, numpy, tiktoken.
      offline: images/build_rootfs.sh (debootstrap; needs no registry), then `docker import`;
      online:  images/Dockerfile, FROM an upstream PyTorch image chosen by tag (UPSTREAM_IMAGE,
               or AR_BASE_IMAGE / --base-image) and pinned by the digest its first pull got,
               which images/base.lock keeps for every later build (the user commits it).
      hash of: the runtime requirements (taken from uv.lock) + the builder script or Dockerfile
               (online also: the pinned upstream reference and the locked torch version).
  autoresearch-base:<hash>   runtime + the trusted harness (sandbox.harness: prepare.py, evaluate.py, contract.py),
      user, workdir, env, and a label naming what the runtime was built from (base.Dockerfile).
      hash of: runtime id + the harness files + base.Dockerfile + the container uid.
  autoresearch-exp:<hash>    base + one experiment's train.py (read-only), nothing run to build it.
      hash of: base id + train.py.

Identical train.py files share one experiment image: its `autoresearch.exp` label names
the first experiment that built it. Every image inherits the `autoresearch.runtime` label,
so each run records the runtime it actually ran on (the ledger's `runtime` column).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import docker
import docker.errors
import structlog
from docker.models.images import Image
from docker.utils import parse_repository_tag

from common.errors import UserError
from sandbox.harness import PROJECT_ROOT, harness_files
from sandbox.spec import APP_DIR

log = structlog.get_logger(__name__)

IMAGES_DIR = PROJECT_ROOT / "images"
ROOTFS_BUILDER = IMAGES_DIR / "build_rootfs.sh"
ONLINE_DOCKERFILE = IMAGES_DIR / "Dockerfile"
BASE_DOCKERFILE = IMAGES_DIR / "base.Dockerfile"
BASE_LOCK = IMAGES_DIR / "base.lock"  # the online upstream's digest, written at its first pull
# The upstream of the online runtime: the official image of the locked torch (2.11.0, CUDA 13.0
# like PyPI's wheel). Chosen by tag; the digest comes from the registry at the first pull.
UPSTREAM_IMAGE = "pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime"

CONTAINER_UID = 65534  # `nobody`: every sandboxed process runs as this uid and gid
RUNTIME_REPO, BASE_REPO, EXPERIMENT_REPO = "autoresearch-runtime", "autoresearch-base", "autoresearch-exp"
KIND_LABEL, EXP_LABEL = "autoresearch.kind", "autoresearch.exp"
RUNTIME_LABEL = "autoresearch.runtime"  # what the runtime was built from: upstream@digest or the offline tag
BUILD_PREFIX = "autoresearch-build-"  # + the builder's process identity: reap() removes a dead builder's
UV = os.environ.get("UV", "uv")  # `uv run` names its own binary here, which may not be on PATH
SOURCES = ("offline", "online")
EXPERIMENT_COMMAND = ["python3", "train.py"]  # the experiment image's default command (phase 1)
# The packages the container imports; the online image already brings torch and its CUDA stack.
RUNTIME_ROOTS = {"offline": ("torch", "numpy", "tiktoken"), "online": ("numpy", "tiktoken")}
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9._-]+")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LOCK_BYTES = 64 * 2**10  # a lock is one name and one digest; anything larger is not one


class ImageBuildError(UserError):
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


def _uv_lock() -> dict:
    return tomllib.loads((PROJECT_ROOT / "uv.lock").read_text())


def locked_version(name: str) -> str:
    """The version uv.lock pins for `name`."""
    return next(package["version"] for package in _uv_lock()["package"] if package["name"] == name)


def runtime_requirements(source: str) -> str:
    """A hashed requirements file for the container: the lock's pins of the runtime packages."""
    lock = _uv_lock()
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
# The online upstream, pinned by digest in images/base.lock


@dataclass(frozen=True)
class Pin:
    """An upstream image as chosen (`image`, by tag) and the digest it is built from."""

    image: str
    digest: str

    @property
    def reference(self) -> str:
        """What FROM pulls: the repository at the digest (the tag would follow the registry)."""
        return f"{parse_repository_tag(self.image)[0]}@{self.digest}"

    def __str__(self) -> str:
        return f"{self.image}@{self.digest}"


def read_lock(path: Path) -> Pin | None:
    """The pin in `path`; None when there is none yet."""
    try:
        with path.open("rb") as file:
            raw = file.read(_LOCK_BYTES + 1)
        data = json.loads(raw) if len(raw) <= _LOCK_BYTES else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ImageBuildError(f"{path} cannot be read as a base image lock ({error}); "
                              "restore it from git or delete it to pin the base image again.") from None
    if not (isinstance(data, dict) and isinstance(data.get("image"), str) and data["image"].strip()
            and isinstance(data.get("digest"), str) and _DIGEST.fullmatch(data["digest"])):
        raise ImageBuildError(f"{path} is not a base image lock (a JSON object with an image and a sha256 digest); "
                              "restore it from git or delete it to pin the base image again.")
    return Pin(data["image"], data["digest"])


def _write_lock(path: Path, pin: Pin) -> None:
    """Replace the lock in one step, so a killed build leaves the old lock or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps({"image": pin.image, "digest": pin.digest}, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ImageBuildError(f"cannot write the base image lock {path} ({error.strerror or error}); "
                              "make it writable, the build needs it to pin the base image.") from None


def _pull_digest(client: docker.DockerClient, image: str) -> str:
    """Pull `image` by its tag; the digest the registry served."""
    repository, tag = parse_repository_tag(image)
    digest = None
    try:
        for event in client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if "error" in event:
                raise docker.errors.APIError(event["error"])
            status = event.get("status", "")
            if status.startswith("Digest: "):
                digest = status.removeprefix("Digest: ").strip()
    except docker.errors.APIError as error:
        raise ImageBuildError(f"cannot pull the base image {image} ({error.explanation or error}); check its name and "
                              "this host's access to its registry, or choose another with --base-image.") from None
    if digest is None or not _DIGEST.fullmatch(digest):
        raise ImageBuildError(f"the Docker engine pulled {image} without reporting its digest, so it cannot be pinned.")
    return digest


def pin_upstream(client: docker.DockerClient, image: str) -> Pin:
    """`image` pinned by digest: the lock's when it pins this image, else the one pulled now (then locked).

    Another image than the lock's replaces the lock with a warning naming both; an
    `image` given with its digest is taken as it is."""
    lock = BASE_LOCK
    locked = read_lock(lock)
    name, _, digest = image.partition("@")
    if digest:
        if not _DIGEST.fullmatch(digest):
            raise ImageBuildError(f"the base image {image} names a digest that is not sha256:<64 hex digits>.")
        pin = Pin(name, digest)
    elif locked is not None and locked.image == image:
        return locked
    else:
        log.info("image.step", step=f"pulling {image} to pin its digest in {lock.name}", image=image)
        pin = Pin(image, _pull_digest(client, image))
    if locked != pin:
        _write_lock(lock, pin)
        if locked is None:
            log.info("image.base_pinned", base=str(pin), lock=str(lock), note="commit the lock file")
        else:
            log.warning("image.base_changed", was=str(locked), now=str(pin), lock=str(lock),
                        note="experiment images built from now on differ from earlier ones; commit the lock file")
    return pin


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


def _build_online_runtime(client: docker.DockerClient, tag: str, requirements: str, pin: Pin) -> None:
    files = {"Dockerfile": (ONLINE_DOCKERFILE.read_bytes(), 0o644), "requirements.txt": (requirements.encode(), 0o644)}
    _build(client, files, tag, labels={KIND_LABEL: "runtime"},
           buildargs={"UPSTREAM": pin.reference, "TORCH_VERSION": locked_version("torch")})


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """One base build at a time on this host: a second caller waits, then finds the image built."""
    fd = os.open(Path(tempfile.gettempdir()) / "autoresearch-images.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Runtime:
    """A runtime image: its id, its tag (the hash of its inputs) and what it was built from (the
    RUNTIME_LABEL of every image above it)."""

    id: str
    tag: str
    origin: str


def ensure_runtime_image(client: docker.DockerClient, source: str, upstream: str | None = None) -> Runtime:
    """The runtime image for `source` ("offline" or "online", FROM `upstream`), built once."""
    if source not in SOURCES:
        raise ImageBuildError(f"unknown runtime source {source!r}; choose one of {', '.join(SOURCES)}")
    if upstream and source != "online":
        raise ImageBuildError(f"a base image ({upstream}) is what the online runtime is built from, "
                              f"but the {source} runtime was asked for (AR_RUNTIME); drop one of the two.")
    requirements = runtime_requirements(source)
    if source == "offline":
        tag = f"{RUNTIME_REPO}:offline-{_digest(requirements, ROOTFS_BUILDER.read_bytes())}"
        origin, build = tag, lambda: _build_offline_runtime(client, tag, requirements)
    else:
        pin = pin_upstream(client, upstream or UPSTREAM_IMAGE)
        recipe = (requirements, ONLINE_DOCKERFILE.read_bytes(), pin.reference, locked_version("torch"))
        tag = f"{RUNTIME_REPO}:online-{_digest(*recipe)}"
        origin, build = str(pin), lambda: _build_online_runtime(client, tag, requirements, pin)
    if image := _find(client, tag):
        return Runtime(image.id, tag, origin)
    log.info("image.step", step=f"building the {source} runtime image (minutes, once)", tag=tag, origin=origin)
    started = time.monotonic()
    build()
    if (image := _find(client, tag)) is None:
        raise ImageBuildError(f"the {source} runtime build finished without producing {tag}")
    log.info("image.built", tag=tag, seconds=round(time.monotonic() - started, 1), size_mb=image.attrs["Size"] // 2**20)
    return Runtime(image.id, tag, origin)


@dataclass(frozen=True)
class BaseImage:
    """The base image here (its local id) and its recipe: what it is built from, the same on every machine."""

    id: str
    recipe: str


def ensure_base_image(client: docker.DockerClient, source: str | None = None, upstream: str | None = None) -> BaseImage:
    """The base image (runtime + the harness, user, workdir, env), built once per input.

    `source` defaults to $AR_RUNTIME, `upstream` to $AR_BASE_IMAGE; a base image given
    means the online runtime, else the offline one."""
    with _host_lock():
        return _ensure_base_image(client, *_runtime_choice(source, upstream))


def _runtime_choice(source: str | None, upstream: str | None) -> tuple[str, str | None]:
    """(source, upstream) with the defaults filled in: $AR_BASE_IMAGE, then $AR_RUNTIME, else offline."""
    upstream = upstream or os.environ.get("AR_BASE_IMAGE") or None
    return source or os.environ.get("AR_RUNTIME") or ("online" if upstream else "offline"), upstream


def _base_inputs(root: Path) -> list[str | bytes]:
    """What the base image adds to its runtime: the harness files, base.Dockerfile and the container uid."""
    harness = harness_files(root)
    parts: list[str | bytes] = [part for name in sorted(harness) for part in (name, harness[name])]
    return [*parts, (root / "images" / "base.Dockerfile").read_bytes(), str(CONTAINER_UID)]


def base_tag(runtime_id: str, root: Path = PROJECT_ROOT) -> str:
    """The base image's tag: a hash of everything that goes into it (never of the data builder).

    The runtime's origin label is not hashed: the runtime id already tells origins apart."""
    return f"{BASE_REPO}:{_digest(runtime_id, *_base_inputs(root))}"


def base_recipe(runtime_tag: str, root: Path = PROJECT_ROOT) -> str:
    """The same hash over what the base is built *from* rather than over the runtime's local id: equal on
    every machine that builds it from the same pinned inputs (a cluster node's base is checked by it)."""
    return f"docker-{_digest(runtime_tag, *_base_inputs(root))}"


def _ensure_base_image(client: docker.DockerClient, source: str, upstream: str | None) -> BaseImage:
    runtime = ensure_runtime_image(client, source, upstream)
    tag, recipe = base_tag(runtime.id), base_recipe(runtime.tag)
    if image := _find(client, tag):
        return BaseImage(image.id, recipe)
    log.info("image.step", step="building the base image (runtime + harness)", tag=tag)
    files = {"Dockerfile": (BASE_DOCKERFILE.read_bytes(), 0o644),
             **{name: (content, 0o444) for name, content in harness_files().items()}}
    image = _build(client, files, tag,
                   buildargs={"RUNTIME": runtime.id, "RUNTIME_ORIGIN": runtime.origin, "UID": str(CONTAINER_UID)})
    log.info("image.built", tag=tag)
    return BaseImage(image.id, recipe)


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
        container.put_archive(APP_DIR, _tar({"train.py": (train_py.encode(), 0o444)}))
        repository, _, version = tag.partition(":")
        return container.commit(repository=repository, tag=version).id
    finally:
        container.remove(force=True)


if __name__ == "__main__":
    try:
        print(ensure_base_image(docker.from_env(timeout=600)).id)
    except ImageBuildError as error:
        raise SystemExit(str(error)) from None
