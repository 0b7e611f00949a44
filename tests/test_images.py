"""The sandbox images: pinned runtime requirements, cached base image, per-experiment images."""

from __future__ import annotations

import tomllib

import pytest

from sandbox import images

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


# -----------------------------------------------------------------------------
# With a Docker engine


def _image_ids(client) -> set[str]:
    return {image.id for image in client.images.list(all=True)}


def _run(client, image: str, code: str) -> str:
    output = client.containers.run(image, ["python3", "-c", code], remove=True, network_mode="none")
    return output.decode()


@pytest.mark.docker
def test_base_image_is_built_once(docker_client, docker_base_image, monkeypatch):
    base = images.ensure_base_image(docker_client)  # the session's, unless prepare.py was edited since
    before = _image_ids(docker_client)

    def no_build(*args, **kwargs):
        raise AssertionError("a cached image was built again")

    monkeypatch.setattr(images, "_build", no_build)
    monkeypatch.setattr(images, "_build_offline_runtime", no_build)
    assert images.ensure_base_image(docker_client) == base
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
    assert image.attrs["Parent"] == docker_base_image

    before = _image_ids(docker_client)
    assert images.build_experiment_image(docker_client, docker_base_image, train_py, "exp-images-2") == image_id
    assert _image_ids(docker_client) == before

    code = "import os; s = os.stat('train.py'); print(oct(s.st_mode & 0o777), s.st_uid); exec(open('train.py').read())"
    assert _run(docker_client, image_id, code).split("\n")[:2] == ["0o444 0", "experiment image test"]
    docker_client.images.remove(image_id)


@pytest.mark.docker
def test_prune_removes_only_experiment_images_not_kept(docker_client, docker_base_image):
    kept = images.build_experiment_image(docker_client, docker_base_image, "print('kept')\n", "exp-prune-kept")
    dropped = images.build_experiment_image(docker_client, docker_base_image, "print('dropped')\n", "exp-prune-dropped")
    # Everything but `dropped` is kept, so that no other experiment image on the engine is touched.
    others = {image.id for image in docker_client.images.list(filters={"label": "autoresearch.kind=experiment"})}
    assert images.prune_experiment_images(others - {dropped}, client=docker_client) == 1
    remaining = _image_ids(docker_client)
    assert kept in remaining and dropped not in remaining and docker_base_image in remaining
    docker_client.images.remove(kept)
