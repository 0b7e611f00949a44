"""Where the GPU time of a training step goes: attention kernels, deterministic mode, compile start-up.

    python3 bench/step_profile.py [--budget 10] [--variant fast/auto det/auto ...] [--attention-only]

Two parts, on the machine's first GPU:
1. attention alone at the default shape (fwd+bwd, causal, bf16), per SDPA backend, with and
   without deterministic algorithms: TFLOP/s, or why the backend refused;
2. the default train.py itself, once per variant in a fresh process with an empty inductor cache
   (cold compile), on random tokens (speed does not depend on the text): tokens/s and MFU as the
   harness counts them, start-up seconds, and the ten kernels that took most GPU time over three
   profiled steps. A variant is MODE/ATTENTION: MODE fast or det (the harness's deterministic
   mode), ATTENTION auto (torch's own choice) or one backend forced for the whole run (cudnn, flash, efficient).
   Every run compiles cold, as every run of a night does (no compile cache passes between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(batch=32, heads=4, seq=2048, head_dim=128)  # train.py's GPU profile: width 512 = 4 heads of 128


def attention_table() -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, t, d = SHAPE.values()
    flops = 3.5 * 4 * b * h * t * t * d / 2  # causal forward (2 matmuls) plus a backward of 2.5 forwards
    print(f"attention alone, B {b} H {h} T {t} D {d}, fwd+bwd, causal, bf16")
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            try:
                with sdpa_kernel([backend]):
                    for _ in range(3):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(10):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                    end.record()
                    torch.cuda.synchronize()
                rate = f"{flops * 10 / (start.elapsed_time(end) / 1e3) / 1e12:6.1f} TFLOP/s"
            except Exception as error:  # a backend that refuses this shape or mode says why
                rate = f"refused: {str(error).splitlines()[0][:90]}"
            print(f"  {'deterministic' if deterministic else 'fast':13s} {backend.name:20s} {rate}")
    torch.use_deterministic_algorithms(False)


# Runs inside the child process: train.py on random tokens, an SDPA backend forced if asked, 3 profiled steps.
CHILD = r"""
import json, os, sys, time
import torch
import prepare

V = 8192
class Tokens:
    vocab_size, bos_id = V, 0
prepare.get_tokenizer = lambda: Tokens()
def random_loader(batch_size, seq_len=prepare.MAX_SEQ_LEN, split="train"):
    g = torch.Generator(device=prepare.DEVICE).manual_seed(0)
    while True:
        batch = torch.randint(0, V, (batch_size, seq_len + 1), device=prepare.DEVICE, generator=g)
        yield batch[:, :-1], batch[:, 1:]
prepare.make_dataloader = random_loader

attention = os.environ["BENCH_ATTENTION"]
if attention != "auto":
    wanted = {"efficient": "mem_efficient"}.get(attention, attention)
    def allow(only):
        for name in ("cudnn", "flash", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(only is None or name == only)
    allow(wanted)
    finish = prepare.finish
    def finish_with_every_backend(*args, **kwargs):  # the export may trace attention where the forced backend refuses
        allow(None)
        return finish(*args, **kwargs)
    prepare.finish = finish_with_every_backend

step = prepare.Budget.step
profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
def profiled_step(self, tokens):
    if self.step_count == 8:
        profiler.start()
        profiled_step.started = True
    step(self, tokens)
    if self.step_count == 11:
        profiler.stop()
profiled_step.started = False
prepare.Budget.step = profiled_step

sys.argv = ["train.py"]
exec(compile(open("train.py").read(), "train.py", "exec"), {"__name__": "__main__"})
profiled = profiled_step.started
events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA] if profiled else []
total = sum(e.self_device_time_total for e in events) or 1
top = sorted(events, key=lambda e: -e.self_device_time_total)[:10]
summary = json.load(open(os.path.join(os.environ["AR_OUT_DIR"], "summary.json")))
print("BENCH " + json.dumps({"summary": summary, "top": [(e.key[:100], e.self_device_time_total / total) for e in top]}))
"""


def run_variant(variant: str, budget: float, work: Path) -> dict:
    mode, attention = variant.split("/")
    out = work / variant.replace("/", "-")
    env = {**os.environ, "AR_PROFILE": "gpu", "AR_PHASE": "train", "AR_OUT_DIR": str(out), "AR_TIME_BUDGET": str(budget),
           "BENCH_ATTENTION": attention, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor"), "PYTHONUNBUFFERED": "1"}
    if mode == "det":
        env.update(AR_DETERMINISTIC="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((l for l in done.stdout.splitlines() if l.startswith("BENCH ")), None)
    if line is None:
        print(f"{variant}: failed\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
        return {}
    result = json.loads(line[len("BENCH "):])
    s = result["summary"]
    print(f"\n{variant}: {s['tokens_per_second'] / 1e6:.3f} M tok/s, MFU {s['mfu_percent']:.1f} % (causal), "
          f"{s['num_steps']} steps, start-up {s['startup_seconds']:.1f} s, peak {s['peak_vram_mb'] / 1024:.1f} GiB")
    for name, share in result["top"]:
        print(f"    {100 * share:5.1f} %  {name}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=10.0)
    parser.add_argument("--variant", action="append",
                        help="MODE/ATTENTION (default: fast/auto fast/cudnn det/auto)")
    parser.add_argument("--attention-only", action="store_true")
    args = parser.parse_args()
    attention_table()
    if args.attention_only:
        return 0
    variants = args.variant or ["fast/auto", "fast/cudnn", "det/auto"]
    work = Path(tempfile.mkdtemp(prefix="step-profile-"))
    results = {}
    for variant in variants:
        results[variant] = run_variant(variant, args.budget, work)
    print("\nvariant            M tok/s   MFU %   start-up s")
    for variant, result in results.items():
        if result:
            s = result["summary"]
            print(f"{variant:18s} {s['tokens_per_second'] / 1e6:7.3f}   {s['mfu_percent']:5.1f}   {s['startup_seconds']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
