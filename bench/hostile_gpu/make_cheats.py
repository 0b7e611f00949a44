"""Write two off-budget variants of the repository's train.py, for measuring the host's budget account on a GPU.

    python bench/hostile_gpu/make_cheats.py OUT_DIR
    python bench/experiment.py --gpu auto --budget 60 --measure-allowance --repeat 3 \\
        --train-py train.py --train-py OUT_DIR/trains_after.py --train-py OUT_DIR/trains_before.py

trains_after.py ignores `budget.done` and trains a quarter of the budget longer;
trains_before.py trains 15 s (after its first, compiling step) before it starts the budget. Both must end over_budget.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXTRA = """
t_pre = None
while t_pre is None or time.time() - t_pre < 15:  # 15 s of training the budget never sees, after compiling
    for _ in range(grad_accum):
        x, y = next(loader)
        (step_loss(x, y) / grad_accum).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    t_pre = t_pre or time.time()
"""


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    source = (ROOT / "train.py").read_text()
    loop, start = "while not budget.done:", "budget = Budget()\n"
    assert loop in source and start in source, "train.py changed: update the cheats"
    (out / "trains_after.py").write_text(source.replace(loop, "while budget.training_seconds < 1.25 * budget.seconds:"))
    (out / "trains_before.py").write_text(source.replace(start, EXTRA + start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
