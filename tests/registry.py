"""A registry on this host's loopback that a real Docker engine pulls from (read-only API v2).

No registry is reachable from the test machines and none can be pulled to run one, so
this serves images made here: one gzipped layer of the given files, a config and a
schema-2 manifest, each addressed by its sha256 as the distribution API requires. The
engine treats 127.0.0.0/8 as an insecure registry, so plain HTTP is enough. Every
request is recorded, so a test can tell a pull by tag from a pull by digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """`with Registry() as registry:` serves on 127.0.0.1:`registry.port` until the block ends."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}  # (repository, tag or digest) -> manifest
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]

    def __enter__(self) -> "Registry":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def push(self, repository: str, tag: str, files: dict[str, bytes]) -> str:
        """Serve an image of `files` as `repository:tag` (moving the tag if it exists); its manifest digest."""
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        compressed = gzip.compress(layer.getvalue(), mtime=0)
        config = json.dumps({
            "architecture": ARCH, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha256(layer.getvalue())]},
            "history": [{"created_by": "tests/registry.py"}],
        }).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "size": len(config), "digest": _sha256(config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(compressed), "digest": _sha256(compressed)}],
        }).encode()
        for blob in (config, compressed):
            self.blobs[_sha256(blob)] = blob
        digest = _sha256(manifest)
        self.manifests[(repository, tag)] = self.manifests[(repository, digest)] = manifest
        return digest

    def manifest_requests(self, reference: str) -> int:
        """How many times a manifest was asked for by `reference` (a tag or a digest)."""
        return sum(path.endswith(f"/manifests/{reference}") for _, path in self.requests)

    def image_id(self, digest: str) -> str:
        """The id the engine gives the image of manifest `digest` (its config's digest)."""
        return json.loads(self.manifests[next(key for key in self.manifests if key[1] == digest)])["config"]["digest"]

    def requested(self, digest: str) -> bool:
        """Whether anything addressed by `digest` (a manifest or a blob) was asked for."""
        return any(path.endswith(f"/{digest}") for _, path in self.requests)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                registry.requests.append((self.command, self.path))
                body, content_type = self._lookup()
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                if content_type == MANIFEST_TYPE:
                    self.send_header("Docker-Content-Digest", _sha256(body))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _lookup(self) -> tuple[bytes | None, str]:
                path = self.path.split("?")[0]
                if path in ("/v2", "/v2/"):
                    return b"{}", "application/json"
                parts = path.removeprefix("/v2/").rsplit("/", 2)  # the name may hold slashes
                if len(parts) != 3:
                    return None, ""
                name, kind, reference = parts
                if kind == "manifests":
                    return registry.manifests.get((name, reference)), MANIFEST_TYPE
                if kind == "blobs":
                    return registry.blobs.get(reference), "application/octet-stream"
                return None, ""

            def log_message(self, *args) -> None:  # requests are recorded, not printed
                pass

        return Handler
