"""The sealed root of a process-backend run: the host's runtime, read-only, and nothing else (DESIGN §3.4).

The root a run sees is a fresh tmpfs that holds only:

- read-only binds, at their host paths, of what the runtime is found to need by asking
  the host (no distro layout is assumed): the Python interpreter, its standard library and
  the sys.path entries that the harness's imports (torch, numpy, ...) come from, and the
  directories of every file the interpreter maps once they are imported (shared libraries,
  CUDA's among them); the dynamic loader's library directories (ld.so.cache) and the loader
  each program names; the programs torch.compile and Triton run (`sh`, `ldconfig`, the C and
  C++ compilers) with the compilers' own search and include directories;
- the symlinks met on the way to those (merged /usr, /etc/alternatives, a venv's python),
  the host's top-level symlinks, and /etc's symlinks that lead into the binds;
- a synthesized /etc: passwd and group that name the run's uid, hosts with localhost, and
  the loader's cache and configuration;
- a minimal /dev: null, zero, full, random, urandom, the NVIDIA device nodes where present,
  and the /proc/self/fd links.

The backend adds the run's /app, /data/..., /out and its own tmpfs /tmp and /dev/shm.

No host unix socket or FIFO is reachable. Outside the binds the root holds nothing of the
host's file system, and abstract sockets belong to the network namespace, which is the
run's own. Inside the binds, where one could live too, the launcher covers every socket
and FIFO it finds when it builds the root (an empty file bound read-only over it:
connect() is refused, and nothing written reaches the host), and device nodes do not open
there (nodev). One made there while the run goes on is not covered; the run's
unprivileged uid, in no group, still needs its write permission for "others" to use it.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import json
import os
import re
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.harness import HARNESS_FILES
from sandbox.spec import APP_DIR, DATA_DIR, OUT_DIR, SandboxUnavailable

# the harness's imports, and where they came from, as the child's Python sees them (run by it)
_PYTHON_PROBE = r"""
import importlib.metadata, json, os, re, sys, sysconfig
harness = os.path.realpath(sys.argv[1])
sys.path.insert(0, harness)
import importlib
for module in sys.argv[2:]:  # the trusted harness: torch, numpy and whatever else it imports
    importlib.import_module(module)
files = [getattr(module, "__file__", None) for module in list(sys.modules.values())]
# and the distributions they require, transitively (torch.compile's triton, sympy, ... are imported later)
owners = importlib.metadata.packages_distributions()
todo = {name for module in list(sys.modules) for name in owners.get(module.partition(".")[0], [])}
seen = set()
while todo:
    name = todo.pop()
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        continue
    seen.add(name)
    files.append(str(dist.locate_file("")) + "/")
    for requirement in dist.requires or []:
        if "extra ==" not in requirement:
            todo.add(re.match(r"[A-Za-z0-9._-]+", requirement)[0])
    todo -= seen
with open("/proc/self/maps") as maps:
    mapped = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
paths = sysconfig.get_paths()
print(json.dumps({
    "executable": sys.executable, "path": [entry for entry in sys.path if entry and os.path.realpath(entry) != harness],
    "files": [name for name in files if isinstance(name, str)],
    "mapped": sorted(mapped), "config": [paths[key] for key in ("stdlib", "platstdlib", "include", "platinclude")],
}))
"""
PROGRAMS = ("sh", "ldconfig")  # run by torch.compile, Triton (ldconfig -p finds libcuda) and subprocess
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++")  # Triton builds its launcher, inductor its CPU kernels
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEVICE_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
                "/dev/stderr": "/proc/self/fd/2"}
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
MADE_BY_THE_SANDBOX = ("/proc", "/sys", "/dev", "/tmp", APP_DIR, DATA_DIR, OUT_DIR, "/etc", "/run")


@dataclass
class SealedRoot:
    """What the launcher builds the run's root from (JSON in the run's plan)."""

    binds: list[str] = field(default_factory=list)  # real host paths, bound read-only at the same path
    links: dict[str, str] = field(default_factory=dict)  # path -> symlink target, as on the host
    devices: list[str] = field(default_factory=list)  # host device nodes, bound read-write
    files: dict[str, str] = field(default_factory=dict)  # path -> content (the synthesized /etc)


@functools.lru_cache(maxsize=None)
def runtime_needs(python: str, harness_root: Path, child_path: str) -> tuple[str, ...]:
    """Host paths (files or directories, symlinks unresolved) the runtime needs; slow (imports torch once)."""
    needs = _python_needs(python, harness_root, child_path)
    needs += _loader_needs(child_path)
    for name in PROGRAMS + COMPILERS:
        program = shutil.which(name, path=child_path)
        if program is not None:
            needs += [program, os.path.dirname(program)]
            needs += _compiler_dirs(program) if name in COMPILERS else []
    interpreters = {_elf_interpreter(os.path.realpath(path)) for path in needs if os.path.isfile(path)}
    return tuple(sorted(set(needs) | (interpreters - {None})))


def _python_needs(python: str, harness_root: Path, child_path: str) -> list[str]:
    try:
        modules = [name.removesuffix(".py") for name in HARNESS_FILES if (harness_root / name).is_file()]
        out = subprocess.run([python, "-c", _PYTHON_PROBE, str(harness_root), *modules], capture_output=True, text=True,
                             check=True, cwd="/", env={"PATH": child_path, "HOME": "/nonexistent"}).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        why = (getattr(error, "stderr", "") or str(error)).strip().splitlines() or ["no output"]
        raise SandboxUnavailable(f"the sandbox's Python {python} cannot import the harness ({why[-1][-300:]}).") from error
    found = json.loads(out.splitlines()[-1])
    needs = [python, found["executable"], *found["config"]]
    for venv_config in (Path(found["executable"]).parent / "pyvenv.cfg", Path(found["executable"]).parent.parent / "pyvenv.cfg"):
        needs += [str(venv_config)] if venv_config.is_file() else []
    entries = sorted(found["path"], key=len, reverse=True)  # the longest entry a module's file lies under holds it
    for name in found["files"]:
        needs += [next((entry for entry in entries if under(name, entry)), os.path.dirname(name))]
    needs += [os.path.dirname(name) for name in found["mapped"]
              if name.startswith("/") and os.path.isfile(name) and not any(under(name, top) for top in MADE_BY_THE_SANDBOX)]
    # never the project holding the harness, nor a folder above it (the harness comes in at /app); a
    # runtime inside it (its .venv) is bound like any other
    harness = os.path.realpath(harness_root)
    return [path for path in needs if os.path.exists(path) and not under(harness, os.path.realpath(path))]


def _loader_needs(child_path: str) -> list[str]:
    """The loader's cache and configuration, and every directory its cache names a library in."""
    needs = [path for path in LOADER_FILES if os.path.exists(path)]
    ldconfig = shutil.which("ldconfig", path=child_path)
    if ldconfig is not None:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
        needs += sorted({os.path.dirname(path) for path in re.findall(r"=> (/\S+)$", listing, re.M)})
    return needs


def _compiler_dirs(compiler: str) -> list[str]:
    """A compiler's install, program and library directories, and the include directories of C and C++."""
    run = lambda *args: subprocess.run([compiler, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    search = run("-print-search-dirs").stdout
    dirs = re.findall(r"^install: (.+)$", search, re.M)
    for listed in re.findall(r"^(?:programs|libraries): =?(.+)$", search, re.M):
        dirs += listed.split(":")
    for language in ("c", "c++"):
        verbose = run("-E", "-v", "-x", language, os.devnull).stderr
        block = verbose.partition("#include <...> search starts here:")[2].partition("End of search list.")[0]
        dirs += [line.strip() for line in block.splitlines() if line.strip()]
    return [os.path.normpath(path) for path in dirs if os.path.isdir(path)]


def _elf_interpreter(path: str) -> str | None:
    """The program interpreter (dynamic loader) an ELF executable names, if any."""
    try:
        with open(path, "rb") as elf:
            head = elf.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF":
                return None
            order, wide = "<" if head[5] == 1 else ">", head[4] == 2  # little-endian? 64-bit?
            word = order + ("Q" if wide else "I")
            table = struct.unpack_from(word, head, 32 if wide else 28)[0]
            entry_size, entries = struct.unpack_from(order + "HH", head, 54 if wide else 42)
            for index in range(entries):
                elf.seek(table + index * entry_size)
                entry = elf.read(entry_size)
                if struct.unpack_from(order + "I", entry)[0] == 3:  # PT_INTERP
                    offset = struct.unpack_from(word, entry, 8 if wide else 4)[0]
                    size = struct.unpack_from(word, entry, 32 if wide else 16)[0]
                    elf.seek(offset)
                    return elf.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        pass
    return None


def resolve(path: str, links: dict[str, str], hops: int = 0) -> str:
    """The real path of `path`, recording in `links` every symlink met on the way (its path -> its target)."""
    if hops > 40:
        raise OSError(f"too many levels of symbolic links at {path}")
    real = "/"
    for part in Path(path).parts[1:]:
        if part == "..":
            real = os.path.dirname(real)
            continue
        current = os.path.join(real, part)
        if os.path.islink(current):
            links[current] = os.readlink(current)
            real = resolve(os.path.join(real, links[current]), links, hops + 1)
        else:
            real = current
    return os.path.normpath(real)


def seal(needs: list[str] | tuple[str, ...], uid: int) -> SealedRoot:
    """The root for a run as `uid`: the needed paths bound (no path twice), their symlinks, /etc and /dev."""
    host = _host_part(tuple(needs))
    return SealedRoot(binds=list(host.binds), links=dict(host.links), devices=list(host.devices), files={
        "/etc/passwd": f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{uid}:sandbox:/tmp:/bin/sh\n",
        "/etc/group": f"root:x:0:\nsandbox:x:{uid}:\n",
        "/etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    })


@functools.lru_cache(maxsize=16)
def _host_part(needs: tuple[str, ...]) -> SealedRoot:
    """What of the host a root holds (the same for every run of the same needs; walking /etc takes a while)."""
    root, reals = SealedRoot(), set()
    for path in needs:
        reals.add(resolve(os.path.abspath(path), root.links))
    for real in sorted(reals):
        if os.path.exists(real) and not any(under(real, kept) for kept in root.binds):
            root.binds.append(real)
    for name in os.listdir("/"):  # merged /usr and the like: /bin -> usr/bin, /lib64 -> usr/lib64, ...
        if os.path.islink(f"/{name}"):
            root.links[f"/{name}"] = os.readlink(f"/{name}")
    for folder, _, names in os.walk("/etc"):  # /etc/alternatives and the like, where they lead into the binds
        for link in (os.path.join(folder, name) for name in names):
            found: dict[str, str] = {}
            try:
                if os.path.islink(link) and any(under(resolve(link, found), kept) for kept in root.binds):
                    root.links.update(found)
            except OSError:  # a loop of links
                continue
    root.links = {path: target for path, target in root.links.items() if not any(under(path, kept) for kept in root.binds)}
    root.devices = [path for path in DEVICES if os.path.exists(path)] + sorted(glob.glob("/dev/nvidia*"))
    root.links.update(DEVICE_LINKS)
    return root


def under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies in it (by name: links are not followed)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# -----------------------------------------------------------------------------
# In the launcher (root, in the run's mount namespace)

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC = 32, 4096, 16384


@dataclass
class RunMounts:
    """The run's own part of the root, the same in every run of the backend."""

    binds: list[tuple[str, str, bool]] = field(default_factory=list)  # (host path, path inside, read-only)
    tmpfs: list[tuple[str, int]] = field(default_factory=list)  # (path inside, size)
    hide: list[str] = field(default_factory=list)  # host paths inside the binds, covered by an empty tmpfs
    fresh_proc: bool = False  # a PID namespace of its own: mount a new /proc
    empty_file: str = ""  # an empty host file, bound read-only over the sockets and FIFOs of the binds


def _mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, options: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    encoded = [None if value is None else value.encode() for value in (source, target, fstype, options)]
    if libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3]) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _bind(source: str, target: str, read_only: bool) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):  # a mount point for a file (never opened: it may be a FIFO)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, flags=_MS_BIND | _MS_REC)
    if read_only:  # and no device node: the run's devices are the few bound into /dev
        kept = os.statvfs(source).f_flag & _MS_NOEXEC
        _mount(None, target, flags=_MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept)


def build_root(new_root: str, sealed: SealedRoot, run: RunMounts) -> None:
    """Mount the run's root on the empty directory `new_root`; it ends read-only."""
    _mount("tmpfs", new_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=16m")
    for name in ("proc", "sys", "tmp", "app", "out"):
        os.makedirs(f"{new_root}/{name}", exist_ok=True)
    for path, size in run.tmpfs:  # first, so that a runtime living under /tmp (a venv there) is bound on top
        os.makedirs(new_root + path, exist_ok=True)
        _mount("tmpfs", new_root + path, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={size}")
    for path in sealed.binds:
        _bind(path, new_root + path, read_only=True)
    for path, target in sorted(sealed.links.items()):
        if not os.path.lexists(new_root + path):
            os.makedirs(os.path.dirname(new_root + path), exist_ok=True)
            os.symlink(target, new_root + path)
    for path, content in sealed.files.items():
        os.makedirs(os.path.dirname(new_root + path), exist_ok=True)
        Path(new_root + path).write_text(content)
    for path in sealed.devices:
        _bind(path, new_root + path, read_only=False)
    if run.fresh_proc:
        _mount("proc", f"{new_root}/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    else:
        _bind("/proc", f"{new_root}/proc", read_only=False)
    try:  # a sysfs mounted in the new network namespace lists only its interfaces: lo
        _mount("sysfs", f"{new_root}/sys", "sysfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except OSError:
        _bind("/sys", f"{new_root}/sys", read_only=True)
    for source, target, read_only in run.binds:
        _bind(source, new_root + target, read_only)
    for path in run.hide:
        inside = new_root + path
        if os.path.isdir(inside) and not os.path.islink(inside):
            _mount("tmpfs", inside, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=4k")
        elif os.path.isfile(inside) and not os.path.islink(inside):
            _mount("/dev/null", inside, flags=_MS_BIND)
    for path in [*sealed.binds, *(target for _, target, read_only in run.binds if read_only)]:
        _cover_endpoints(new_root + path, run.empty_file)
    _mount(None, new_root, flags=_MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _cover_endpoints(top: str, empty_file: str) -> None:
    """Bind `empty_file` read-only over every unix socket and FIFO at or under `top` (symlinks not followed).

    Those are the ways to talk to a host process through the file system: connect() on a
    covered socket is refused, and a covered FIFO opens for reading only, empty.
    """
    if _is_endpoint(os.lstat(top).st_mode):
        _bind(empty_file, top, read_only=True)
        return
    stack = [top]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif not entry.is_file(follow_symlinks=False) and not entry.is_symlink() \
                        and _is_endpoint(entry.stat(follow_symlinks=False).st_mode):
                    _bind(empty_file, entry.path, read_only=True)


def _is_endpoint(mode: int) -> bool:
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)
