"""A host-side GPU memory cap for one run, enforced by polling NVML (DESIGN §3.4).

CUDA has no per-process memory limit that the process cannot lift itself, so the
host watches what the run's processes hold on their GPU and reports the first
sample above the cap; the backend then kills the run (status gpu_oom). The
harness also sets a soft in-process limit (AR_GPU_MEMORY_CAP) so that a
well-behaved train.py fails with a clear CUDA OOM before it gets here.
"""

from __future__ import annotations

import threading
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

Reader = Callable[[str], dict[int, int]]  # gpu uuid -> {host pid: bytes used on that GPU}


def nvml_reader() -> Reader | None:
    """A reader backed by NVML, or None (with the reason logged) where NVML does not work."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no library, no driver, no GPU: all mean "cannot watch"
        log.info("gpu_watchdog.off", reason=f"NVML unavailable: {error}")
        return None
    handles: dict[str, object] = {}

    def read(gpu_uuid: str) -> dict[int, int]:
        if gpu_uuid not in handles:
            handles[gpu_uuid] = pynvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handles[gpu_uuid])
        return {p.pid: p.usedGpuMemory or 0 for p in processes}  # None where the driver hides it

    return read


class GpuWatchdog:
    """Polls the GPU memory of one run's processes, tracks the peak, reports the cap once.

    `pids` maps the run to its host PIDs at each poll (processes come and go);
    processes of other runs on the same GPU are ignored. `cap_bytes=None` tracks the
    peak only. Without NVML the watchdog does nothing and `peak_bytes` stays None.
    """

    def __init__(
        self,
        gpu_uuid: str,
        cap_bytes: int | None,
        pids: Callable[[], set[int]],
        on_exceed: Callable[[int], None],
        reader: Reader | None = None,
        interval_s: float = 0.5,
    ) -> None:
        self.gpu_uuid = gpu_uuid
        self.cap_bytes = cap_bytes
        self._pids = pids
        self._on_exceed = on_exceed
        self._reader = reader
        self._interval_s = interval_s
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
            usage = self._reader(self.gpu_uuid)
        except Exception as error:  # a transient NVML error must not end the run
            if not self._read_failed:
                log.warning("gpu_watchdog.read_failed", gpu=self.gpu_uuid, error=str(error))
                self._read_failed = True
            return None
        mine = self._pids()
        used = sum(size for pid, size in usage.items() if pid in mine)
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
