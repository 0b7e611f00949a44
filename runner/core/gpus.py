"""Which GPUs a night may use: discovered through NVML, chosen with `--gpus`.

Each experiment gets one whole GPU, addressed by UUID (indices can change
between processes and containers; UUIDs do not). A host without a driver has no
GPUs, and the night runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from runner.core.settings import SettingsError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    driver: str
    memory_bytes: int = 0  # the card's memory (0: unknown)


def discover() -> list[Gpu]:
    """The GPUs NVML sees, or none when there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver: a CPU host
        log.debug("gpus.none", reason=str(exc))
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(Gpu(index, _text(pynvml.nvmlDeviceGetUUID(handle)), _text(pynvml.nvmlDeviceGetName(handle)), driver,
                            int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def select(inventory: list[Gpu], choice: str) -> list[Gpu]:
    """Apply `--gpus`: "all", "none" or comma-separated indices of the inventory."""
    choice = choice.strip().lower()
    if choice == "all":
        return list(inventory)
    if choice == "none":
        return []
    try:
        indices = [int(part) for part in choice.split(",") if part.strip()]
    except ValueError:
        raise SettingsError(f"--gpus takes all, none or indices such as 0,1, not {choice!r}.") from None
    by_index = {gpu.index: gpu for gpu in inventory}
    missing = [i for i in indices if i not in by_index]
    if missing:
        seen = ", ".join(str(g.index) for g in inventory) or "none"
        raise SettingsError(f"--gpus asks for GPU {missing[0]}, but this host has GPUs: {seen}.")
    if len(set(indices)) != len(indices):
        raise SettingsError("--gpus names a GPU twice; one experiment runs per GPU.")
    return [by_index[i] for i in indices]
