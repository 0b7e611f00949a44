"""A train.py that lifts the harness's soft GPU cap and allocates past the host's cap through torch.

    uv run python bench/experiment.py --gpu auto --budget 30 --gpu-memory-cap 40 --train-py bench/hostile_gpu/lifts_soft_cap.py

Expected: status gpu_oom (the host's NVML watchdog kills it), whatever the process did to its own limits.
"""
import time

import torch

import prepare

torch.cuda.set_per_process_memory_fraction(1.0, 0)  # undo the soft cap
held = []
for gib in range(1, 80):
    held.append(torch.empty(2**30, dtype=torch.uint8, device="cuda").fill_(1))
    print(f"holding {gib} GiB", flush=True)
    time.sleep(0.2)
print("GPU memory NOT CAPPED", flush=True)
