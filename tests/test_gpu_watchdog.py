"""The GPU memory watchdog, driven by an injected reader (no GPU needed)."""

from __future__ import annotations

import sys
import threading
import time

from sandbox.gpu_watchdog import GpuSample, GpuWatchdog

GPU = "GPU-00000000-0000-0000-0000-000000000000"
MiB = 2**20


class Readings:
    """A reader that returns the next of a list of samples (the last one repeats)."""

    def __init__(self, *samples: dict[int, int] | GpuSample) -> None:
        self.samples = [s if isinstance(s, GpuSample) else GpuSample(processes=s) for s in samples]
        self.gpus: list[str] = []

    def __call__(self, gpu_uuid: str) -> GpuSample:
        self.gpus.append(gpu_uuid)
        return self.samples.pop(0) if len(self.samples) > 1 else self.samples[0]


def make(reader, cap=1000 * MiB, pids=frozenset({10, 11})):
    exceeded: list[int] = []
    watchdog = GpuWatchdog(GPU, cap, pids=lambda: set(pids), on_exceed=exceeded.append, reader=reader)
    return watchdog, exceeded


def test_below_the_cap_it_only_tracks_the_peak():
    watchdog, exceeded = make(Readings({10: 300 * MiB, 11: 200 * MiB}, {10: 100 * MiB}))
    assert watchdog.sample() == 500 * MiB
    assert watchdog.sample() == 100 * MiB
    assert watchdog.peak_bytes == 500 * MiB
    assert not watchdog.exceeded and exceeded == []


def test_above_the_cap_it_reports_once():
    watchdog, exceeded = make(Readings({10: 600 * MiB, 11: 600 * MiB}, {10: 2000 * MiB}))
    watchdog.sample()
    watchdog.sample()
    assert watchdog.exceeded
    assert exceeded == [1200 * MiB]
    assert watchdog.peak_bytes == 2000 * MiB


def test_processes_of_other_runs_are_ignored():
    reader = Readings({10: 100 * MiB, 99: 50_000 * MiB})
    watchdog, exceeded = make(reader)
    assert watchdog.sample() == 100 * MiB
    assert exceeded == [] and reader.gpus == [GPU]


def test_without_a_cap_it_tracks_the_peak_only():
    watchdog, exceeded = make(Readings({10: 50_000 * MiB}), cap=None)
    watchdog.sample()
    assert watchdog.peak_bytes == 50_000 * MiB and exceeded == [] and not watchdog.exceeded


def test_a_failing_read_is_skipped():
    def broken(gpu_uuid: str) -> GpuSample:
        raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

    watchdog, exceeded = make(broken)
    assert watchdog.sample() is None
    assert watchdog.peak_bytes is None and exceeded == []


def test_the_polling_thread_reports_and_stops():
    fired = threading.Event()
    watchdog = GpuWatchdog(GPU, 1000 * MiB, pids=lambda: {10}, on_exceed=lambda used: fired.set(),
                           reader=Readings({10: 10}, {10: 2000 * MiB}), interval_s=0.01)
    watchdog.start()
    assert fired.wait(30)
    watchdog.stop()
    assert watchdog.exceeded and watchdog.peak_bytes == 2000 * MiB


def test_without_nvml_it_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    watchdog = GpuWatchdog(GPU, 1, pids=lambda: {10}, on_exceed=lambda used: None)
    watchdog.start()
    watchdog.stop()
    assert watchdog.peak_bytes is None and not watchdog.exceeded


def test_memory_of_any_allocator_counts_through_the_whole_gpu():
    """A run whose memory NVML lists under no process of its own still hits the cap."""
    watchdog, exceeded = make(Readings(GpuSample({}, device_used=500 * MiB),  # the idle GPU at the start
                                       GpuSample({10: 100 * MiB}, device_used=1900 * MiB)))
    assert watchdog.sample() == 0
    assert watchdog.sample() == 1400 * MiB
    assert exceeded == [1400 * MiB]


def test_busy_time_is_reported_per_sample():
    busy: list[float] = []
    watchdog = GpuWatchdog(GPU, None, pids=lambda: set(), on_exceed=lambda used: None,
                           reader=Readings(GpuSample(utilization=1.0)), on_busy=lambda seconds, start, end: busy.append(seconds))
    watchdog.sample()
    time.sleep(0.05)
    watchdog.sample()
    assert len(busy) == 1 and 0.04 < busy[0] < 5
