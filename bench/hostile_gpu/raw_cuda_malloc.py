"""A train.py that allocates past the host's GPU cap through the CUDA driver itself, bypassing torch's allocator.

    uv run python bench/experiment.py --gpu auto --budget 30 --gpu-memory-cap 40 --train-py bench/hostile_gpu/raw_cuda_malloc.py

Expected: status gpu_oom: the watchdog counts the GPU's whole used memory, not only what torch knows of.
"""
import ctypes
import time

import torch

import prepare

torch.zeros(1, device="cuda")  # makes torch's CUDA context current on this thread
driver = ctypes.CDLL("libcuda.so.1")
for gib in range(1, 80):
    pointer = ctypes.c_uint64()
    assert driver.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(2**30)) == 0, "cuMemAlloc failed"
    driver.cuMemsetD8_v2(pointer, ctypes.c_ubyte(1), ctypes.c_size_t(2**30))
    print(f"holding {gib} GiB outside torch", flush=True)
    time.sleep(0.2)
print("GPU memory NOT CAPPED", flush=True)
