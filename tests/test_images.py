"""The sandbox images: pinned runtime requirements, the locked upstream, cached base image, per-experiment images."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from runner.cli import main
from runner.night import overnight
from sandbox import images
from tests.registry import Registry

LOCK = tomllib.loads((images.PROJECT_ROOT / "uv.lock").read_text())


def _pins(requirements: str) -> dict[str, str]:
    """name -> version of every requirement line (hash lines are indented)."""
    return {
        line.split("==")[0]: line.split("==")[1].split()[0]
        for line in requirements.splitlines()
        if line and not line[0].isspace()
    }


def test_lock_closure_follows_extras():
    names = images._lock_closure(LOCK, ("torch",))
    assert {"torch", "triton", "sympy", "cuda-toolkit", "nvidia-cublas", "nvidia-cuda-runtime"} <= names
    assert "anthropic" not in names and "numpy" not in names


def test_offline_requirements_pin_the_lock_with_hashes():
    requirements = images.runtime_requirements("offline")
    pins = _pins(requirements)
    locked = {p["name"]: p["version"] for p in LOCK["package"] if p["name"] in ("torch", "tiktoken", "triton")}
    assert {name: pins[name] for name in locked} == locked
    assert "numpy" in pins and "regex" in pins
    assert not {"anthropic", "docker", "optuna", "pytest", "rustbpe"} & pins.keys()
    assert requirements.count("--hash=sha256:") >= len(pins)


def test_online_requirements_leave_torch_to_the_base_image():
    pins = _pins(images.runtime_requirements("online"))
    assert {"numpy", "tiktoken", "regex"} <= pins.keys()
    assert not any(name == "torch" or name.startswith(("nvidia", "cuda", "triton")) for name in pins)


def test_experiment_tag_is_content_addressed():
    tag = images.experiment_tag("sha256:base", "print(1)\n")
    assert tag == images.experiment_tag("sha256:base", "print(1)\n")
    assert tag != images.experiment_tag("sha256:base", "print(2)\n")
    assert tag != images.experiment_tag("sha256:other", "print(1)\n")


def test_unknown_runtime_source_is_one_clear_error():
    with pytest.raises(images.ImageBuildError, match="unknown runtime source"):
        images.ensure_runtime_image(client=None, source="nightly")


def test_the_default_upstream_brings_the_locked_torch_and_cuda():
    torch, cuda = images.locked_version("torch"), images.locked_version("cuda-toolkit")
    assert images.UPSTREAM_IMAGE == f"pytorch/pytorch:{torch}-cuda{'.'.join(cuda.split('.')[:2])}-cudnn9-runtime"


# -----------------------------------------------------------------------------
# The lock of the online upstream (images/base.lock)

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def lock(tmp_path, monkeypatch):
    """images.BASE_LOCK moved into the test's directory (the repository's own is never touched)."""
    path = tmp_path / "base.lock"
    monkeypatch.setattr(images, "BASE_LOCK", path)
    return path


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00not text", b"{", b"[]", b'{"image": "pytorch/pytorch:2"}',
    b'{"image": "pytorch/pytorch:2", "digest": "sha256:abc"}', b'{"image": "", "digest": "' + DIGEST.encode() + b'"}',
    b'{"image": "pytorch/pytorch:2", "digest": "' + DIGEST.encode() + b'"}' + b" " * 2**20,  # huge
])
def test_a_broken_lock_is_one_sentence(lock, content):
    lock.write_bytes(content)
    with pytest.raises(images.ImageBuildError, match=r"base.lock .*delete it to pin the base image again\.$"):
        images.pin_upstream(client=None, image="pytorch/pytorch:2")


def test_a_lock_that_is_a_directory_is_one_sentence(lock):
    lock.mkdir()
    with pytest.raises(images.ImageBuildError, match="cannot be read as a base image lock"):
        images.pin_upstream(client=None, image="pytorch/pytorch:2")


def test_a_lock_that_pins_the_image_is_used_without_the_engine(lock):
    lock.write_text(json.dumps({"image": "pytorch/pytorch:2", "digest": DIGEST}))
    pin = images.pin_upstream(client=None, image="pytorch/pytorch:2")  # no client: nothing is pulled
    assert pin.reference == f"pytorch/pytorch@{DIGEST}" and str(pin) == f"pytorch/pytorch:2@{DIGEST}"


def test_an_image_given_by_digest_is_locked_as_it_is(lock):
    pin = images.pin_upstream(client=None, image=f"localhost:5000/pytorch/pytorch:2@{DIGEST}")
    assert pin.reference == f"localhost:5000/pytorch/pytorch@{DIGEST}"
    assert json.loads(lock.read_text()) == {"image": "localhost:5000/pytorch/pytorch:2", "digest": DIGEST}
    with pytest.raises(images.ImageBuildError, match="names a digest that is not sha256"):
        images.pin_upstream(client=None, image="pytorch/pytorch:2@sha256:short")


@pytest.mark.parametrize("where", ["missing directory", "/proc"])
def test_a_lock_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch, where):
    path = tmp_path / "gone" / "base.lock" if where == "missing directory" else Path("/proc/base.lock")
    monkeypatch.setattr(images, "BASE_LOCK", path)
    with pytest.raises(images.ImageBuildError, match="cannot write the base image lock .*make it writable"):
        images.pin_upstream(client=None, image=f"pytorch/pytorch:2@{DIGEST}")


def test_a_base_image_for_the_offline_runtime_is_one_error():
    with pytest.raises(images.ImageBuildError, match="the offline runtime was asked for"):
        images.ensure_runtime_image(client=None, source="offline", upstream="pytorch/pytorch:2")


# -----------------------------------------------------------------------------
# Choosing the base image on the command line


def _overnight(monkeypatch, *args: str, env: dict[str, str] | None = None):
    """`autoresearch overnight ARGS`, up to the night itself: the settings it would run with."""
    monkeypatch.chdir(images.PROJECT_ROOT)
    seen = []
    monkeypatch.setattr(overnight, "run_overnight", seen.append)
    result = CliRunner().invoke(main, ["overnight", "--gpus", "none", *args], env=env)
    return result, (seen[0] if seen else None)


def fake_tools(bin_dir: Path, policy: str, proxy: str = "") -> Path:
    """apt-cache, apt-config and debootstrap stand-ins: the builder's choice of mirror is all that runs."""
    bin_dir.mkdir()
    tools = {"apt-cache": f"cat <<'EOF'\n{policy}\nEOF",
             "apt-config": f"[ -n '{proxy}' ] && echo \"http_proxy='{proxy}'\"; true",
             "debootstrap": f'echo "debootstrap $* proxy=${{http_proxy:-}}" > {bin_dir}/called; exit 9'}
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


POLICY = """Package files:
 100 /var/lib/dpkg/status
 500 http://mirror.internal/debian-security bookworm-security/main amd64 Packages
 500 http://mirror.internal/debian bookworm/main amd64 Packages
 500 http://other.internal/debian trixie/main amd64 Packages"""


@pytest.mark.parametrize("policy, environment, mirror", [
    (POLICY, {}, "http://mirror.internal/debian"),  # what this host's apt uses for the suite
    (POLICY, {"AR_DEBIAN_MIRROR": "http://chosen.internal/debian"}, "http://chosen.internal/debian"),
])
def test_the_rootfs_builder_takes_the_hosts_debian_source(tmp_path, policy, environment, mirror):
    tools = fake_tools(tmp_path / "bin", policy, proxy="http://proxy.internal:3128")
    env = {"PATH": f"{tools}:/usr/bin:/bin", **environment}
    done = subprocess.run(["bash", str(images.ROOTFS_BUILDER), str(tmp_path / "rootfs"), "reqs.txt"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 9  # the stand-in debootstrap's own exit: the builder got that far
    called = (tools / "called").read_text().split()
    assert called[-3:] == [str(tmp_path / "rootfs"), mirror, "proxy=http://proxy.internal:3128"]
    assert "bookworm" in called


def test_the_rootfs_builder_without_a_debian_source_says_what_to_set(tmp_path):
    tools = fake_tools(tmp_path / "bin", POLICY.replace("bookworm/", "jammy/"))
    done = subprocess.run(["bash", str(images.ROOTFS_BUILDER), str(tmp_path / "rootfs"), "reqs.txt"],
                          env={"PATH": f"{tools}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.returncode == 1 and not (tools / "called").exists()
    assert done.stderr.strip().splitlines() == [
        "this host's apt has no Debian bookworm source; set AR_DEBIAN_MIRROR to a Debian mirror URL"]


def test_base_image_comes_from_the_option_or_the_environment(monkeypatch):
    mirror = "mirror.example/pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime"
    _, settings = _overnight(monkeypatch, "--base-image", mirror)
    assert settings.base_image == mirror
    assert settings.record()["base_image"] == settings.base_image  # stored with the night
    _, settings = _overnight(monkeypatch, env={"AR_BASE_IMAGE": "pytorch/pytorch:other"})
    assert settings.base_image == "pytorch/pytorch:other"
    _, settings = _overnight(monkeypatch, env={"AR_BASE_IMAGE": None})
    assert settings.base_image is None


@pytest.mark.parametrize("args, message", [
    (["--base-image", "pytorch/pytorch: 2"], "--base-image must be an image reference"),
    (["--base-image", ""], "--base-image must be an image reference"),
    (["--base-image", "pytorch/pytorch:2", "--sandbox", "process"], "--base-image is for the docker sandbox"),
])
def test_a_bad_base_image_is_one_sentence(monkeypatch, args, message):
    result, settings = _overnight(monkeypatch, *args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and settings is None
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}")


# -----------------------------------------------------------------------------
# With a Docker engine


def _image_ids(client) -> set[str]:
    return {image.id for image in client.images.list(all=True)}


def _run(client, image: str, code: str) -> str:
    output = client.containers.run(image, ["python3", "-c", code], remove=True, network_mode="none")
    return output.decode()


@pytest.mark.docker
def test_base_image_is_built_once(docker_client, docker_base_image, monkeypatch):
    base = images.ensure_base_image(docker_client).id  # the session's, unless prepare.py was edited since
    before = _image_ids(docker_client)

    def no_build(*args, **kwargs):
        raise AssertionError("a cached image was built again")

    monkeypatch.setattr(images, "_build", no_build)
    monkeypatch.setattr(images, "_build_offline_runtime", no_build)
    assert images.ensure_base_image(docker_client).id == base
    assert _image_ids(docker_client) == before


@pytest.mark.docker
def test_base_image_holds_the_pinned_runtime_and_a_read_only_harness(docker_client, docker_base_image):
    torch_version = next(p["version"] for p in LOCK["package"] if p["name"] == "torch")
    code = (
        "import os, sys, torch, numpy, tiktoken; s = os.stat('/app/prepare.py'); "
        "print(torch.__version__.split('+')[0], sys.version_info[:2] == (3, 11), os.getuid(), os.getcwd(), "
        "os.environ['HOME'], oct(s.st_mode & 0o777), s.st_uid)"
    )
    output = _run(docker_client, docker_base_image, code).split()
    assert output == [torch_version, "True", str(images.CONTAINER_UID), "/app", "/tmp", "0o444", "0"]
    prepare = (images.PROJECT_ROOT / "prepare.py").read_text()
    assert _run(docker_client, docker_base_image, "print(open('/app/prepare.py').read(), end='')") == prepare


@pytest.mark.docker
def test_experiment_image_is_labelled_content_addressed_and_read_only(docker_client, docker_base_image):
    train_py = "print('experiment image test')\n"
    image_id = images.build_experiment_image(docker_client, docker_base_image, train_py, "exp-images-1")
    image = docker_client.images.get(image_id)
    assert images.experiment_tag(docker_base_image, train_py) in image.tags
    assert image.labels[images.KIND_LABEL] == "experiment"
    assert image.labels[images.EXP_LABEL] == "exp-images-1"
    # What its runtime was built from (here the offline builder), inherited from the base image.
    assert image.labels[images.RUNTIME_LABEL] == images.ensure_runtime_image(docker_client, "offline").origin
    assert image.labels[images.RUNTIME_LABEL].startswith(f"{images.RUNTIME_REPO}:offline-")
    assert image.attrs["Parent"] == docker_base_image

    before = _image_ids(docker_client)
    assert images.build_experiment_image(docker_client, docker_base_image, train_py, "exp-images-2") == image_id
    assert _image_ids(docker_client) == before

    code = "import os; s = os.stat('train.py'); print(oct(s.st_mode & 0o777), s.st_uid); exec(open('train.py').read())"
    assert _run(docker_client, image_id, code).split("\n")[:2] == ["0o444 0", "experiment image test"]
    docker_client.images.remove(image_id)


# -----------------------------------------------------------------------------
# The online upstream, pulled from a registry on this host (tests/registry.py)

UPSTREAM_TAG = images.UPSTREAM_IMAGE.partition(":")[2]


@pytest.fixture
def registry(docker_client):
    """A registry serving the upstream's repository; removes what the engine pulled from it
    and what a failed build left on top of that (its cached steps)."""
    with Registry() as served:
        served.repository = f"localhost:{served.port}/pytorch/pytorch"
        yield served
    doomed = [image.id for image in docker_client.images.list(name=served.repository)]
    every = docker_client.images.list(all=True)
    while children := [i.id for i in every if i.attrs.get("Parent") in doomed and i.id not in doomed]:
        doomed += children
    for image_id in reversed(doomed):
        docker_client.images.remove(image_id, force=True)


def _pulled(docker_client, reference: str) -> str | None:
    """The id of the local image `reference` names, None when the engine has none."""
    image = images._find(docker_client, reference)
    return image.id if image else None


@pytest.mark.docker
def test_the_first_online_build_pulls_the_tag_and_locks_the_digest_pulled(docker_client, registry, lock):
    served = registry.push("pytorch/pytorch", UPSTREAM_TAG, {"etc/upstream": b"first\n"})
    image = f"{registry.repository}:{UPSTREAM_TAG}"
    with capture_logs() as events:
        pin = images.pin_upstream(docker_client, image)
    assert json.loads(lock.read_text()) == {"image": image, "digest": served}
    assert pin.reference == f"{registry.repository}@{served}" and registry.manifest_requests(UPSTREAM_TAG) == 1
    assert _pulled(docker_client, pin.reference) is not None
    assert [e["base"] for e in events if e["event"] == "image.base_pinned"] == [f"{image}@{served}"]


@pytest.mark.docker
def test_later_builds_come_from_the_locked_digest_after_the_tag_moved(docker_client, registry, lock):
    first = registry.push("pytorch/pytorch", UPSTREAM_TAG, {"etc/upstream": b"first\n"})
    image = f"{registry.repository}:{UPSTREAM_TAG}"
    pin = images.pin_upstream(docker_client, image)
    first_id = _pulled(docker_client, pin.reference)
    docker_client.images.remove(first_id, force=True)  # a fresh machine: nothing of it is local
    moved = registry.push("pytorch/pytorch", UPSTREAM_TAG, {"etc/upstream": b"republished\n"})
    assert moved != first

    # The real build: FROM the locked digest, which the engine pulls again, never the tag. Its RUN
    # steps need the internet (apt, PyPI) and a real PyTorch image, so here it ends at the first one.
    with pytest.raises(images.ImageBuildError, match=r"building autoresearch-runtime:online-\w+ failed"):
        images.ensure_runtime_image(docker_client, "online", upstream=image)
    assert registry.manifest_requests(UPSTREAM_TAG) == 1  # the first pull's, nothing since
    assert not registry.requested(moved) and not registry.requested(registry.image_id(moved))
    assert _pulled(docker_client, pin.reference) == first_id == registry.image_id(first)  # bit for bit the first
    assert json.loads(lock.read_text())["digest"] == first


@pytest.mark.docker
def test_another_base_image_replaces_the_lock_and_says_so(docker_client, registry, lock):
    registry.push("pytorch/pytorch", UPSTREAM_TAG, {"etc/upstream": b"default\n"})
    other = registry.push("pytorch/pytorch", "2.11.0-cuda12.8-cudnn9-runtime", {"etc/upstream": b"cuda 12.8\n"})
    default = images.pin_upstream(docker_client, f"{registry.repository}:{UPSTREAM_TAG}")
    with capture_logs() as events:
        chosen = images.pin_upstream(docker_client, f"{registry.repository}:2.11.0-cuda12.8-cudnn9-runtime")
    assert chosen.digest == other and json.loads(lock.read_text())["digest"] == other
    (changed,) = [e for e in events if e["event"] == "image.base_changed"]
    assert (changed["log_level"], changed["was"], changed["now"]) == ("warning", str(default), str(chosen))


@pytest.mark.docker
def test_a_base_image_that_cannot_be_pulled_is_one_sentence(docker_client, registry, lock):
    with pytest.raises(images.ImageBuildError, match=r"^cannot pull the base image .*another with --base-image\.$"):
        images.pin_upstream(docker_client, f"{registry.repository}:no-such-tag")
    assert not lock.exists()
