"""The process backend: runs, logs, limits, kills, snapshots, leftovers; and backend selection."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sandbox import backends
from sandbox.gpu_watchdog import GpuSample
from sandbox.host_support import HostSupport
from sandbox.process_backend import ProcessBackend
from sandbox.processes import process_identity
from sandbox.sealed_root import runtime_needs, seal, under
from sandbox.spec import CancelToken, Killer, Limits, Mount, Phase, RunResult, RunSpec, SandboxUnavailable
from sandbox.status import Status
from tests.hostile_cases import FAKE_SECRET, leftover_processes, make_fake_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> ProcessBackend:
    return ProcessBackend(snapshots_root=tmp_path_factory.mktemp("snapshots"))


def run(backend: ProcessBackend, tmp_path: Path, source: str, cancel: CancelToken | None = None,
        **spec_args) -> tuple[RunResult, str]:
    image = backend.build_image(textwrap.dedent(source), "test")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    spec = RunSpec(**{"run_id": f"test-{tmp_path.name}", "image": image, "phase": Phase.TRAIN,
                      "command": ["python", "train.py"], "log_path": tmp_path / "run.log", "out_dir": out,
                      "deadline_s": 60.0, **spec_args})
    result = backend.run(spec, cancel)
    return result, spec.log_path.read_text()


def wait_for_line(log: Path, line: str) -> None:
    """Until `line` is in the log (bounded: a hung run fails the test instead of hanging it)."""
    for _ in range(600):
        if log.exists() and line in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{line!r} never reached {log}")


def test_an_ok_run_logs_lines_split_on_cr_and_lf(backend, tmp_path):
    result, log = run(backend, tmp_path, r"""
        import sys
        sys.stdout.write("a\rb\r\nc\n")
        sys.stdout.write("no newline at the end")
    """)
    assert (result.status, result.exit_code, result.killed_by) == (Status.OK, 0, Killer.NONE)
    assert log.splitlines() == ["a", "b", "c", "no newline at the end"]
    assert result.isolation == backend.isolation
    assert result.peak_host_memory_bytes and result.peak_host_memory_bytes > 0


def test_the_log_is_written_while_the_run_goes_on(backend, tmp_path):
    outcome: list[RunResult] = []
    runner = threading.Thread(target=lambda: outcome.append(run(backend, tmp_path, """
        import os, time
        print("started", flush=True)
        for _ in range(600):  # until the test answers, which it can only do after reading the log
            if os.path.exists(os.path.join(os.environ["AR_OUT_DIR"], "go")):
                break
            time.sleep(0.1)
        print("released")
    """, env={"AR_OUT_DIR": "/out"})[0]))
    runner.start()
    wait_for_line(tmp_path / "run.log", "started")
    (tmp_path / "out" / "go").touch()
    runner.join()
    assert outcome[0].status is Status.OK
    assert (tmp_path / "run.log").read_text().splitlines() == ["started", "released"]


def test_the_environment_is_the_specs_only(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_SECRET)
    result, log = run(backend, tmp_path, "", command=["env"], env={"AR_PHASE": "train"})
    assert result.status is Status.OK
    keys = {line.split("=", 1)[0] for line in log.splitlines()}
    assert keys == {"AR_PHASE", "PATH", "HOME", "TMPDIR", "USER", "LOGNAME", "CUDA_VISIBLE_DEVICES"}
    assert FAKE_SECRET not in log


def test_the_deadline_kills_everything_the_run_started(backend, tmp_path):
    nonce = f"deadline-{os.getpid()}-{tmp_path.name}"
    result, log = run(backend, tmp_path, f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{nonce}"])
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{nonce}"], start_new_session=True)
        print("started", flush=True)
        time.sleep(600)
    """, deadline_s=3.0)
    assert (result.status, result.killed_by) == (Status.TIMEOUT, Killer.DEADLINE)
    assert "deadline of 3 s reached" in result.log_tail
    assert leftover_processes(nonce) == []


def test_cancel_stops_the_run(backend, tmp_path):
    cancel = CancelToken()

    def cancel_once_started() -> None:
        wait_for_line(tmp_path / "run.log", "started")
        cancel.cancel()

    canceller = threading.Thread(target=cancel_once_started)
    canceller.start()
    result, _ = run(backend, tmp_path, """
        import time
        print("started", flush=True)
        time.sleep(600)
    """, cancel=cancel)
    canceller.join()
    assert (result.status, result.killed_by) == (Status.CANCELLED, Killer.CANCEL)


def test_a_crash_keeps_the_tail_of_the_log(backend, tmp_path):
    result, _ = run(backend, tmp_path, """
        for i in range(100):
            print("line", i)
        raise RuntimeError("boom")
    """)
    assert (result.status, result.exit_code) == (Status.CRASH, 1)
    assert "RuntimeError: boom" in result.log_tail and "line 99" in result.log_tail


def test_memory_past_the_limit_is_an_oom(backend, tmp_path):
    if not backend.support.memory_limit:
        pytest.skip(f"no memory limit can be enforced on this host: {backend.isolation}")
    result, _ = run(backend, tmp_path, """
        chunks = [b"x" * (32 * 2**20) for _ in range(32)]  # 1 GiB, written
    """, limits=Limits(memory_bytes=256 * 2**20))
    assert (result.status, result.killed_by) == (Status.OOM, Killer.OOM_KILLER)
    assert result.peak_host_memory_bytes is not None and result.peak_host_memory_bytes <= 256 * 2**20


def test_a_missing_snapshot_is_a_crash(backend, tmp_path):
    spec = RunSpec(run_id="missing", image=str(tmp_path / "nothing"), phase=Phase.TRAIN, command=["python", "train.py"],
                   log_path=tmp_path / "run.log", out_dir=tmp_path)
    result = backend.run(spec)
    assert result.status is Status.CRASH and "does not exist" in result.log_tail


def test_snapshots_are_content_addressed_and_read_only(backend):
    first = backend.build_image("print('a')\n", "exp-1")
    assert backend.build_image("print('a')\n", "exp-2") == first
    second = backend.build_image("print('b')\n", "exp-3")
    assert second != first
    snapshot = Path(first)
    assert sorted(p.name for p in snapshot.iterdir()) == ["contract.py", "evaluate.py", "prepare.py", "train.py"]
    assert (snapshot / "prepare.py").read_bytes() == (ROOT / "prepare.py").read_bytes()
    assert (snapshot / "train.py").stat().st_mode & 0o777 == 0o444
    assert backend.image_exists(first)
    backend.remove_image(first)
    assert not backend.image_exists(first) and not snapshot.exists()
    assert backend.image_exists(second)


def test_reap_kills_what_an_earlier_runner_left(backend, tmp_path):
    nonce = f"leftover-{os.getpid()}-{tmp_path.name}"
    outcome: list[RunResult] = []
    runner = threading.Thread(target=lambda: outcome.append(run(backend, tmp_path, f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{nonce}"], start_new_session=True)
        print("started", flush=True)
        time.sleep(600)
    """, deadline_s=600.0)[0]))
    runner.start()
    wait_for_line(tmp_path / "run.log", "started")
    another_runner = ProcessBackend(snapshots_root=backend.snapshots_root)
    assert another_runner.reap() == 0  # its runner lives (here, this process): its run is left alone
    (record,) = backend.state_root.glob(f"test-{tmp_path.name}/run.json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "owner": dead_runner()}))  # as if it were killed
    assert another_runner.reap() == 1
    assert leftover_processes(nonce) == []
    runner.join()
    assert outcome and outcome[0].killed_by is not Killer.DEADLINE
    assert another_runner.reap() == 0


def dead_runner() -> str:
    """The identity (`pid:start`) of a process that has ended."""
    ended = subprocess.Popen(["sleep", "0.1"])
    identity = process_identity(ended.pid)
    ended.wait()
    return identity


def test_a_live_runners_run_outlives_another_runners_reap(backend, tmp_path):
    """Two nights on one host share the snapshots: each one's start reaps leftovers, never the other's live runs."""
    outcome: list[RunResult] = []
    runner = threading.Thread(target=lambda: outcome.append(run(backend, tmp_path, """
        import time
        print("started", flush=True)
        time.sleep(3)
        print("finished", flush=True)
    """)[0]))
    runner.start()
    wait_for_line(tmp_path / "run.log", "started")
    assert ProcessBackend(snapshots_root=backend.snapshots_root).reap() == 0
    runner.join()
    assert outcome[0].status is Status.OK and "finished" in (tmp_path / "run.log").read_text()


def test_ensure_ready_runs_a_child_through_the_sandbox(backend):
    backend.ensure_ready()


def test_without_isolation_it_says_so_and_still_runs(tmp_path):
    plain = ProcessBackend(snapshots_root=tmp_path / "snapshots", support=HostSupport((), None, "not root"))
    assert plain.isolation == "process (no isolation: not root)"
    data = make_fake_data(tmp_path / "data")
    result, log = run(plain, tmp_path, """
        import os
        print("train:", open(os.path.join(os.environ["AR_DATA_DIR"], "train", "tokens.bin")).read())
        open(os.path.join(os.environ["AR_OUT_DIR"], "model"), "w").write("m")
        print("cwd files:", sorted(os.listdir(".")))
    """, mounts=(Mount(data / "train", "/data/train"),), env={"AR_DATA_DIR": "/data", "AR_OUT_DIR": "/out"})
    assert result.status is Status.OK, log
    assert "train: train/tokens.bin" in log and "cwd files: ['contract.py', 'evaluate.py', 'prepare.py', 'train.py']" in log
    assert (tmp_path / "out" / "model").read_text() == "m"
    assert result.isolation == "process (no isolation: not root)"


def first_gpu_uuid() -> str:
    import pynvml

    pynvml.nvmlInit()
    gpu = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
    return gpu.decode() if isinstance(gpu, bytes) else gpu


needs_gpu = pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA GPU")


def test_gpu_watchdog_kill_is_gpu_oom(backend, tmp_path):
    """The watchdog's wiring, with a fake NVML reader in which every host process holds 1 GiB:
    only the run's own processes count against the cap."""

    def every_process_holds_a_gib(gpu_uuid: str) -> GpuSample:
        return GpuSample({int(pid): 2**30 for pid in os.listdir("/proc") if pid.isdigit()})

    gpu_backend = ProcessBackend(snapshots_root=backend.snapshots_root, gpu_reader=every_process_holds_a_gib)
    result, log = run(gpu_backend, tmp_path, """
        import time
        print("started", flush=True)
        time.sleep(600)
    """, gpu_uuid="GPU-fake", limits=Limits(gpu_memory_bytes=2**29), deadline_s=30.0)
    assert (result.status, result.killed_by) == (Status.GPU_OOM, Killer.WATCHDOG), log
    assert result.peak_gpu_memory_bytes >= 2**30 and "above the cap" in result.log_tail


@needs_gpu
def test_gpu_memory_above_the_cap_is_killed_by_the_watchdog(backend, tmp_path):
    gpu = first_gpu_uuid()
    result, log = run(backend, tmp_path, """
        import time, torch
        x = torch.ones(2 * 2**30, dtype=torch.uint8, device="cuda")  # 2 GiB
        print("allocated", flush=True)
        time.sleep(600)
    """, gpu_uuid=gpu, limits=Limits(gpu_memory_bytes=512 * 2**20), deadline_s=300.0)
    assert (result.status, result.killed_by) == (Status.GPU_OOM, Killer.WATCHDOG), log
    assert result.peak_gpu_memory_bytes is not None and result.peak_gpu_memory_bytes > 512 * 2**20


def test_a_run_without_an_enforceable_memory_limit_refuses_to_start(tmp_path):
    no_cgroups = ProcessBackend(snapshots_root=tmp_path / "snapshots",
                                support=HostSupport(("net", "mount", "pid"), None))
    assert "no memory limit can be enforced" in no_cgroups.isolation
    with pytest.raises(SandboxUnavailable, match="^the process sandbox cannot enforce a memory limit on this host: .*\\.$"):
        run(no_cgroups, tmp_path, "print('ran without a memory limit')")
    with pytest.raises(SandboxUnavailable, match="cannot enforce a memory limit"):
        no_cgroups.ensure_ready()
    assert not (tmp_path / "run.log").exists() or "ran without" not in (tmp_path / "run.log").read_text()


def test_a_child_process_past_the_memory_limit_ends_the_whole_run_as_oom(backend, tmp_path):
    """cgroup v1's OOM killer kills one process; the run must still end, as an OOM, not at its deadline."""
    if not backend.support.memory_limit:
        pytest.skip(f"no memory limit can be enforced on this host: {backend.isolation}")
    result, log = run(backend, tmp_path, """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "chunks = [b'x' * (32 * 2**20) for _ in range(32)]"])
        print("waiting", flush=True)
        time.sleep(600)
    """, limits=Limits(memory_bytes=256 * 2**20), deadline_s=120.0)
    assert (result.status, result.killed_by) == (Status.OOM, Killer.OOM_KILLER), log


def test_the_root_holds_the_runtime_and_nothing_else_of_the_host(backend, tmp_path):
    if not backend.support.isolated:
        pytest.skip(f"no sealed root without isolation: {backend.isolation}")
    sealed = seal(runtime_needs(backend.python, backend.harness_root.resolve(), backend.child_path), 0)
    made = ["/proc", "/sys", "/dev", "/tmp", "/app", "/out", *sealed.files, *sealed.links]
    result, log = run(backend, tmp_path, """
        import json, os, sys
        allowed = json.loads(os.environ["AR_TEST_ALLOWED"])
        inside = lambda path, top: path == top or path.startswith(top.rstrip("/") + "/")
        found = 0
        for folder, dirs, files in os.walk("/"):
            dirs[:] = [name for name in dirs if not any(inside(os.path.join(folder, name), top) for top in allowed)]
            for name in files + [name for name in dirs if os.path.islink(os.path.join(folder, name))]:
                path = os.path.join(folder, name)
                if not any(inside(path, top) for top in allowed):
                    print("OUTSIDE", path)
            found += len(files)
        print("walked", found)
    """, env={"AR_TEST_ALLOWED": json.dumps([*sealed.binds, *made])})
    assert result.status is Status.OK, log
    assert "OUTSIDE" not in log and "walked" in log, log[-3000:]
    assert not any(str(ROOT) == bound or str(ROOT).startswith(bound + "/") for bound in sealed.binds)  # the project is not runtime
    # Outside /usr, only the interpreter's own installation may be bound (a venv in /opt/... is a runtime; /opt,
    # /home, /run or /var themselves, or anything else in them, are not).
    prefixes = subprocess.run([backend.python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                              capture_output=True, text=True, check=True).stdout.split()
    within = lambda path, top: path == top or path.startswith(top.rstrip("/") + "/")
    elsewhere = [bound for bound in sealed.binds if bound.split("/")[1] in ("home", "var", "opt", "run", "srv", "mnt", "media")
                 and not any(within(bound, prefix) and prefix.count("/") >= 2 for prefix in prefixes)]
    assert not elsewhere, f"binds outside the runtime's own installation: {elsewhere}"


def test_torch_dataloader_workers_share_tensors_in_the_sealed_root(backend, tmp_path):
    """Workers hand tensors back over an AF_UNIX socket in the run's own /tmp: that must still work."""
    result, log = run(backend, tmp_path, """
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=8, num_workers=2)
        print("sum:", sum(float(batch.sum()) for (batch,) in loader))
    """, deadline_s=120.0)
    assert result.status is Status.OK, log
    assert "sum: 2016.0" in log, log


@pytest.mark.slow
def test_torch_compile_builds_its_kernels_in_the_sealed_root(backend, tmp_path):
    """Inductor runs the C++ compiler on the CPU (Triton runs the C compiler and ldconfig on a GPU): they must be there."""
    result, log = run(backend, tmp_path, """
        import torch
        double_sin = torch.compile(lambda x: (2 * x).sin().sum())
        print("compiled:", round(float(double_sin(torch.zeros(8))), 6))
    """, deadline_s=300.0)
    assert result.status is Status.OK, log
    assert "compiled: 0.0" in log, log


@needs_gpu
def test_triton_compiles_gpu_kernels_in_the_sealed_root(backend, tmp_path):
    """Triton finds libcuda with ldconfig and builds its launcher with the C compiler: both inside the root."""
    result, log = run(backend, tmp_path, """
        import torch
        double_sin = torch.compile(lambda x: (2 * x).sin().sum())
        print("compiled:", round(float(double_sin(torch.zeros(8, device="cuda"))), 6), torch.cuda.get_device_name())
    """, gpu_uuid=first_gpu_uuid(), deadline_s=300.0)
    assert result.status is Status.OK, log
    assert "compiled: 0.0" in log, log


def test_reap_takes_the_record_of_a_runner_from_before_cgroup_v1(backend, tmp_path):
    state = backend.state_root / "old-record"
    state.mkdir(parents=True)
    (state / "run.json").write_text(json.dumps({"run_id": "old-record", "uid": None, "cgroup": str(tmp_path / "ar-gone")}))
    assert ProcessBackend(snapshots_root=backend.snapshots_root).reap() == 1
    assert not state.exists()


def test_a_runtime_inside_the_project_is_bound_but_never_the_project(tmp_path):
    """A checkout with its .venv inside (uv's default): the venv's pure-Python packages come in; the project
    holding the harness (its runs, anything beside it) does not, nor a folder above it."""
    import subprocess
    import sys

    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(project / ".venv")], check=True)
    site_dir = next((project / ".venv").glob("lib/python*/site-packages"))
    (site_dir / "ar_pure_dependency.py").write_text("VALUE = 1\n")  # no shared library: only its file tells
    (project / "prepare.py").write_text("import ar_pure_dependency\n")
    needs = runtime_needs(str(project / ".venv" / "bin" / "python"), project, "/usr/bin:/bin")
    assert str(site_dir) in needs
    assert not any(under(str(project), os.path.realpath(path)) for path in needs)


def test_a_runtime_that_lives_under_tmp_is_still_seen(tmp_path):
    """A venv under /tmp: the run's own /tmp covers the host's, so the runtime is bound on top of it."""
    import shutil
    import site
    import subprocess
    import sys
    import tempfile

    venv_dir = Path(tempfile.mkdtemp(prefix="ar-venv-", dir="/tmp"))
    try:
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
        site_dir = next(venv_dir.glob("lib/python*/site-packages"))
        (site_dir / "project.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # torch and the rest
        backend = ProcessBackend(snapshots_root=tmp_path / "snapshots", python=str(venv_dir / "bin" / "python"))
        backend.ensure_ready()  # a child through the whole sandbox, importing torch
        result, log = run(backend, tmp_path, """
            import sys
            print("python:", sys.executable)
        """)
        assert result.status is Status.OK and f"python: {venv_dir}/bin/python" in log, log
    finally:
        shutil.rmtree(venv_dir)
