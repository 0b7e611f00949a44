"""A host-side GPU memory cap and GPU-time meter for one run, by polling NVML (DESIGN §3.4).

CUDA has no per-process memory limit that the process cannot lift itself, so the
host watches what the run holds on its GPU and reports the first sample above the
cap; the supervisor then kills the run (status gpu_oom). What the run holds is the
larger of its processes' own figures and the growth of the whole GPU's used memory
since the run started: every experiment has its GPU to itself, so memory taken by
any allocator (the caching allocator, cudaMalloc, cuBLAS workspaces, a process NVML
does not list) counts. The harness also sets a soft in-process limit
(AR_GPU_MEMORY_CAP) so that a well-behaved train.py fails with a clear CUDA OOM first.

Each sample also reports how long the GPU was busy running kernels, which the budget
guard uses to see training outside the budget.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class GpuSample:
    processes: dict[int, int] = field(default_factory=dict)  # host pid -> bytes it holds on the GPU
    device_used: int | None = None  # bytes used on the whole GPU, None where unknown
    utilization: float | None = None  # share of the last sampling period in which a kernel ran, 0..1


Reader = Callable[[str], GpuSample]  # gpu uuid -> one sample


def nvml_reader() -> Reader | None:
    """A reader backed by NVML, or None (with the reason logged) where NVML does not work."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no library, no driver, no GPU: all mean "cannot watch"
        log.info("gpu_watchdog.off", reason=f"NVML unavailable: {error}")
        return None
    handles: dict[str, object] = {}

    def read(gpu_uuid: str) -> GpuSample:
        if gpu_uuid not in handles:
            handles[gpu_uuid] = pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
        handle = handles[gpu_uuid]
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return GpuSample(processes={p.pid: p.usedGpuMemory or 0 for p in processes},  # None where the driver hides it
                         device_used=int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
                         utilization=pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)

    return read


class GpuWatchdog:
    """Polls the GPU memory of one run's processes, tracks the peak, reports the cap once.

    `pids` maps the run to its host PIDs at each poll (processes come and go);
    processes of other runs on the same GPU are ignored. `cap_bytes=None` tracks the
    peak only. `on_busy(seconds, start, end)` receives the GPU's busy time per sample. Without
    NVML the watchdog does nothing and `peak_bytes` stays None.
    """

    def __init__(
        self,
        gpu_uuid: str,
        cap_bytes: int | None,
        pids: Callable[[], set[int]],
        on_exceed: Callable[[int], None],
        reader: Reader | None = None,
        interval_s: float = 0.5,
        on_busy: Callable[[float, float, float], None] | None = None,
    ) -> None:
        self.gpu_uuid = gpu_uuid
        self.cap_bytes = cap_bytes
        self._pids = pids
        self._on_exceed = on_exceed
        self._reader = reader
        self._interval_s = interval_s
        self._on_busy = on_busy
        self._idle_used: int | None = None  # the GPU's used memory when the run started
        self._last_sample_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_failed = False
        self.peak_bytes: int | None = None
        self.exceeded = False

    def start(self) -> None:
        if self._reader is None:
            self._reader = nvml_reader()
        if self._reader is None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"gpu-watchdog-{self.gpu_uuid}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self) -> int | None:
        """One poll: the bytes the run holds now (None if the GPU could not be read)."""
        assert self._reader is not None, "start() the watchdog or pass a reader"
        try:
            sample = self._reader(self.gpu_uuid)
        except Exception as error:  # a transient NVML error must not end the run
            if not self._read_failed:
                log.warning("gpu_watchdog.read_failed", gpu=self.gpu_uuid, error=str(error))
                self._read_failed = True
            return None
        now = time.monotonic()
        if sample.utilization is not None and self._on_busy is not None and self._last_sample_at is not None:
            self._on_busy(sample.utilization * (now - self._last_sample_at), self._last_sample_at, now)
        self._last_sample_at = now
        mine = self._pids()
        used = sum(size for pid, size in sample.processes.items() if pid in mine)
        if sample.device_used is not None:
            if self._idle_used is None:
                self._idle_used = sample.device_used
            used = max(used, sample.device_used - self._idle_used)
        self.peak_bytes = max(self.peak_bytes or 0, used)
        if self.cap_bytes is not None and used > self.cap_bytes and not self.exceeded:
            self.exceeded = True
            log.warning("gpu_watchdog.exceeded", gpu=self.gpu_uuid, used=used, cap=self.cap_bytes)
            self._on_exceed(used)
        return used

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval_s):
                return
