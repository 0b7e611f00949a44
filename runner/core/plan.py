"""What one run is asked to do, wherever it runs, and the one place it becomes the sandbox's ExperimentSpec.

The night makes a plan for every run (its seed, the budget, determinism, the GPU memory cap, the
allowances measured on the baselines), and so does `rerun` (with the schedule to replay). Whoever
gives the run a place — a local slot, a cluster node, the rerun's host — turns the plan into an
ExperimentSpec with `spec`, for the image, data, run directory and card it has there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.core.gpus import Gpu
from runner.core.settings import GpuMemoryCap
from sandbox.budget_guard import Allowance
from sandbox.experiment import ExperimentSpec
from sandbox.spec import Limits


@dataclass(frozen=True)
class RunPlan:
    exp_id: str
    time_budget: float
    seed: int | None
    deterministic: bool
    gpu_memory_cap: GpuMemoryCap
    allowance: Allowance | None = None  # None: the profile's defaults
    replay_schedule: str | None = None  # rerun --exact: the host-written schedule to replay

    def spec(self, image: str, data_dir: Path, run_dir: Path, gpu: Gpu | None) -> ExperimentSpec:
        """The run as the sandbox takes it, on `gpu` (None: the CPU) with the cap applied to that card."""
        return ExperimentSpec(
            exp_id=self.exp_id, image=image, data_dir=data_dir, run_dir=run_dir, time_budget=self.time_budget,
            gpu_uuid=gpu.uuid if gpu else None, seed=self.seed, deterministic=self.deterministic,
            allowance=self.allowance, replay_schedule=self.replay_schedule,
            limits=Limits(gpu_memory_bytes=self.gpu_memory_cap.bytes_for(gpu.memory_bytes) if gpu else None),
        )
