"""The keep rule's false keeps and power, simulated from measured runs and replayed on them.

    uv run python bench/keep_rule_power.py [--pairs bench/pairs_cpu.json] [--sigma-seed 0.0019 0.0044]
                                           [--trials 20000] [--replay]

The noise is not guessed: `--pairs` is what bench/pair_noise.py measured (val_bpb per change
and harness seed, beside the baseline on the same seeds). From it come

- the shape of the seed noise: every code's values about its own mean, in units of its
  spread (a smoothed bootstrap of them, so 4 seeds give a distribution and not 4 points);
- per change, how coupled its runs stay: σ(paired difference) / σ(seed) (the *ratio*), and
  the shape of its paired differences about their mean. A change whose ratio is ≥ 1 is
  simulated as decoupled (its runs are fresh draws of the seed noise, as a new
  initialisation's are).

A simulated candidate of a change's kind is then run through `runner.core.decision` as the
judge runs it (seed by seed against the best's run on the same seed, the check in its
window after a would-be keep), at the GPU's seed noise (`--sigma-seed`, bpb) with the
change's ratio. Where the GPU's pairs were not measured this applies the CPU's ratios to
the GPU's σ(seed), as docs/decisions.md says. `--replay` runs each recorded change through
the rule as it happened. tests/test_decision.py asserts the guarantees from these functions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.core.decision import KEEP, MORE, Rule, estimate, judge, judge_in_window, pooled_noise  # noqa: E402
from runner.core.runs import DISTURBED_MIN_STEPS, DISTURBED_SHORTFALL  # noqa: E402

PAIRS = ROOT / "bench" / "pairs_cpu_matched.json"  # steps matched: a machine of steady speed, as a GPU is
TIMED = ROOT / "bench" / "pairs_cpu.json"  # the CPU profile as it runs: a budget of time, steps that jitter
                                          # (load it with drop_disturbed=True, as a night would judge it)
SMOOTHING = 0.3  # bootstrap kernel width, in units of the spread
RERUN = "nudge"  # the measured change that stands in for a rerun of the same code on the same seed


@dataclass(frozen=True)
class Kind:
    """A kind of change as measured: how coupled its runs stay, and the shape of its differences."""

    name: str
    ratio: float  # σ(paired difference) / σ(seed)
    shape: tuple[float, ...]  # paired differences about their mean, in units of their spread (pooled)

    @property
    def decoupled(self) -> bool:
        return self.ratio >= 1.0


@dataclass(frozen=True)
class Measured:
    seed_shape: tuple[float, ...]  # every code's values about its mean, in units of σ(seed)
    sigma_seed: float  # σ(seed) pooled over every code (bpb)
    kinds: dict[str, Kind]
    values: dict[str, dict[str, float]]  # code -> seed -> val_bpb, as recorded


def standardized(values: list[float]) -> list[float]:
    """Values about their mean in units of their spread, so that a draw of them has unit variance."""
    mean, spread = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mean) / spread for v in values] if spread > 0 else [0.0] * len(values)


def undisturbed(runs: dict[str, dict]) -> dict[str, float]:
    """A code's values by seed, without the runs a night would flag disturbed (runner.core.runs.flag_disturbed:
    far fewer steps than the upper median of the code's runs) and so leave out."""
    done = {s: r for s, r in runs.items() if "val_bpb" in r}
    usual = statistics.median_high(r["num_steps"] for r in done.values()) if done else 0
    return {s: r["val_bpb"] for s, r in done.items()
            if not (usual - r["num_steps"] > DISTURBED_SHORTFALL * usual and usual - r["num_steps"] >= DISTURBED_MIN_STEPS)}


def load(path: Path = PAIRS, basis: str | None = None, *, drop_disturbed: bool = False) -> Measured:
    """The measured runs; ratios against σ(seed) pooled over every code, or with `basis` (a change's name)
    against that change's paired spread / √2: the seed noise of the part of a seed that change redraws
    (`reinit`: the initialisation alone), for a measurement whose seeds also differ in something every
    code shares (the step counts of --match-steps, which follow the machine's speed seed by seed).
    `drop_disturbed` leaves out the runs a night would flag disturbed (a measurement with a budget of
    time; with --match-steps every code trains the steps of the baseline's run on its seed).

    The shape of the differences is pooled over the changes (each standardised by its own spread):
    4 seeds of one change are too few points to draw from, and a draw of the same point 4 times
    would be a spread of nothing."""
    raw = json.loads(path.read_text())
    values = {code: undisturbed(runs) if drop_disturbed else {s: r["val_bpb"] for s, r in runs.items() if "val_bpb" in r}
              for code, runs in raw.items()}
    base = values["baseline"]
    noise = pooled_noise([list(v.values()) for v in values.values()])
    seed_shape = [z for v in values.values() if len(v) > 2 for z in standardized(list(v.values()))]
    spreads = {}
    for code, runs in values.items():
        diffs = [runs[s] - base[s] for s in runs if s in base]
        if code != "baseline" and len(diffs) >= 3:
            spreads[code] = (statistics.stdev(diffs), tuple(standardized(diffs)))
    sigma = noise.sigma if basis is None else spreads[basis][0] / math.sqrt(2)
    shape = tuple(z for _, change in spreads.values() for z in change)
    kinds = {code: Kind(code, spread / sigma, shape) for code, (spread, _) in spreads.items()}
    return Measured(tuple(seed_shape), sigma, kinds, values)


def draw(rng: random.Random, shape: tuple[float, ...]) -> float:
    """One draw of unit spread from a measured shape (smoothed bootstrap)."""
    return (rng.choice(shape) + SMOOTHING * rng.gauss(0.0, 1.0)) / math.sqrt(1 + SMOOTHING**2)


def simulate(rule: Rule, measured: Measured, kind: Kind, gain: float, sigma_seed: float, trials: int, seed: int,
             *, drift: float = 0.0, baseline_runs: int = 4, extra_df: int = 0,
             rerun: Kind | None = None, in_window: bool = True) -> tuple[float, float]:
    """Keep rate and mean runs (candidate and reference runs) of candidates `gain` bpb better than the best.

    The best has `baseline_runs` runs on seeds 0, 1, ... (partners for the candidate's first
    runs); the noise is pooled from them, the candidate's repeats and `extra_df` more degrees of
    freedom (later in a night). `drift` (bpb) lowers every run made after the baselines, the
    references included. A reference repeats the best's run on its seed, off by what `rerun`
    says (default: the measured 1e-6 nudge, `nudge`: a change that changes nothing but the
    rounding is what running the same code again on the same seed is). `in_window=False`
    leaves the check in the window out (what the drift protection is worth).
    """
    rng = random.Random(seed)
    rerun = rerun or measured.kinds.get(RERUN) or min(measured.kinds.values(), key=lambda k: k.ratio)
    keeps = runs = 0
    for _ in range(trials):
        seeds = [sigma_seed * draw(rng, measured.seed_shape) for _ in range(max(baseline_runs, rule.max_runs))]
        best = seeds[:baseline_runs]
        others = [[sigma_seed * draw(rng, measured.seed_shape) for _ in range(2)] for _ in range(extra_df)]
        candidate: list[float] = []
        verdict = MORE
        while verdict == MORE:
            i = len(candidate)
            own = (sigma_seed * draw(rng, measured.seed_shape) if kind.decoupled
                   else seeds[i] + kind.ratio * sigma_seed * draw(rng, kind.shape))
            candidate.append(own - gain - drift)
            differences = [best[j] - candidate[j] for j in range(min(len(candidate), baseline_runs))]
            verdict = judge(rule, estimate(candidate, best, pooled_noise([best, candidate, *others]), differences))
        runs += len(candidate)
        if verdict == KEEP and in_window:
            window = [seeds[j] - drift + rerun.ratio * sigma_seed * draw(rng, rerun.shape) for j in range(len(candidate))]
            runs += len(window)
            est = estimate(candidate, window, pooled_noise([best, candidate, window, *others]),
                           [w - c for w, c in zip(window, candidate)])
            verdict = judge_in_window(rule, est)
        keeps += verdict == KEEP
    return keeps / trials, runs / trials


def replay(rule: Rule, measured: Measured) -> dict[str, tuple[str, int]]:
    """Each recorded change judged against the recorded baseline as a night would have judged it:
    seed by seed, stopping at the rule's verdict (the recorded baseline runs stand in for the window)."""
    base = measured.values["baseline"]
    order = sorted(base, key=int)
    out = {}
    for code, runs in measured.values.items():
        if code == "baseline":
            continue
        candidate: list[float] = []
        verdict = MORE
        for s in order:
            if verdict != MORE or s not in runs:
                break
            candidate.append(runs[s])
            seeds = order[:len(candidate)]
            differences = [base[t] - runs[t] for t in seeds]
            verdict = judge(rule, estimate(candidate, list(base.values()),
                                           pooled_noise([list(base.values()), candidate]), differences))
        out[code] = (verdict if verdict != MORE else "discard (seeds ran out)", len(candidate))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    parser.add_argument("--basis", help="a change whose paired spread / sqrt(2) stands for sigma(seed), e.g. reinit")
    parser.add_argument("--sigma-seed", type=float, nargs="+", default=[0.0019, 0.0044],
                        help="the GPU's σ(seed) at 300 s, bpb (docs/benchmarks.md)")
    parser.add_argument("--gains", type=float, nargs="+", default=[0.0, 0.001, 0.002, 0.004])
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--replay", action="store_true")
    args = parser.parse_args()
    measured = load(args.pairs, args.basis)
    rule = Rule()
    print(f"measured: σ(seed) {measured.sigma_seed:.6f} bpb on the CPU ({args.basis or 'pooled'}); ratios σ(paired)/σ(seed): "
          + ", ".join(f"{k.name} {k.ratio:.3f}" for k in measured.kinds.values()))
    for sigma in args.sigma_seed:
        print(f"\nσ(seed) {sigma} bpb, {rule}: keep rate / runs per candidate (candidate + reference runs)")
        print(f"{'change':16s} {'ratio':>6s} " + " ".join(f"{'+' + format(g, 'g'):>14s}" for g in args.gains))
        for kind in measured.kinds.values():
            cells = []
            for j, gain in enumerate(args.gains):
                rate, runs = simulate(rule, measured, kind, gain, sigma, args.trials if gain == 0 else args.trials // 5,
                                      seed=j)
                cells.append(f"{rate:7.4f}/{runs:4.2f}")
            print(f"{kind.name:16s} {kind.ratio:6.3f} " + " ".join(f"{c:>14s}" for c in cells))
    if args.replay:
        print("\nreplay of the recorded runs (each change against the recorded baseline):")
        for code, (verdict, n) in replay(rule, measured).items():
            print(f"  {code:16s} {verdict} after {n} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
