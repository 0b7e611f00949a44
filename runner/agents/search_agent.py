"""The search agent: the offline default, a hyperparameter search over train.py's constants.

The constants are found by runner.agents.hyperparameters (for this agent's profile),
and a proposal rewrites exactly the source span of one or two literals, so comments
and formatting stay.

With enough history it asks optuna's TPE sampler, fed with past experiments from the
ledger; before that it perturbs the current best locally. Proposals are reproducible:
the same context and seed give the same diff.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
import structlog
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from runner.agents.base import AgentConfigError, AgentError, Context, HistoryRow, Proposal
from runner.agents.config import SearchConfig
from runner.agents.hyperparameters import Constant, Value, default_profile, find_constants, hyperparameters
from sandbox.status import Status

log = structlog.get_logger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

NEVER_TUNED = frozenset({"SEED"})  # a seed change is not an experiment
KNOWN_WEIGHT = 3  # known hyperparameters are picked this many times as often as unknown constants
MAX_ATTEMPTS = 50  # candidates drawn before giving up on finding an untried configuration


# ------------------------------------------------------------------------ search spaces


@dataclass(frozen=True)
class Space:
    """Where one constant may move: an optuna distribution, and the maps between the
    constant's value and the distribution's value (e.g. a power of two and its exponent)."""

    distribution: BaseDistribution
    encode: Callable[[Value], Any] = lambda value: value
    decode: Callable[[Any], Value] = lambda value: value


def _round3(x: float) -> float:
    return float(f"{x:.3g}")


def _is_number(value: Value) -> bool:
    return isinstance(value, (int, float))


def _log_float(value: Value) -> Space | None:
    if not _is_number(value) or value <= 0:
        return None
    return Space(FloatDistribution(value / 4, value * 4, log=True), float, _round3)


def _log_int(value: Value) -> Space | None:
    if not isinstance(value, int) or value < 1:
        return None
    return Space(IntDistribution(max(1, value // 4), max(4 * value, value + 3), log=True))


def _float_range(low: float, high: float) -> Callable[[Value], Space | None]:
    def build(value: Value) -> Space | None:
        if not _is_number(value):
            return None
        return Space(FloatDistribution(min(low, value), max(high, value)), float, _round3)

    return build


def _int_range(low: int, high: int) -> Callable[[Value], Space | None]:
    def build(value: Value) -> Space | None:
        if not isinstance(value, int):
            return None
        return Space(IntDistribution(min(low, value), max(high, value)))

    return build


def _choices(*options: Value) -> Callable[[Value], Space | None]:
    def build(value: Value) -> Space | None:
        if type(value) is not type(options[0]):
            return None
        return Space(CategoricalDistribution(sorted({*options, value})))

    return build


def _power_of_two(value: Value) -> Space | None:
    """Batch sizes move by factors of two; the search runs over the exponent."""
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        return None
    exponent = value.bit_length() - 1

    def encode(v: Value) -> int:
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"{v!r} is not a power of two")
        return v.bit_length() - 1

    return Space(IntDistribution(max(0, exponent - 3), exponent + 3), encode, lambda e: 2**e)


def _window_pattern(value: Value) -> Space | None:
    """Attention window patterns: S (short, sliding) and L (long, full) per layer, cycled."""
    if not isinstance(value, str) or not value or set(value) - {"S", "L"}:
        return None
    patterns = {"".join(p) for n in range(1, 5) for p in itertools.product("SL", repeat=n)}
    return Space(CategoricalDistribution(sorted(patterns | {value})))


def _generic(value: Value) -> Space | None:
    """Unknown numeric constants move multiplicatively; ints stay ints >= 1."""
    return _log_int(value) if isinstance(value, int) else _log_float(value)


# Search spaces of the hyperparameters of the reference train.py (Karpathy's autoresearch).
KNOWN_SPACES: dict[str, Callable[[Value], Space | None]] = {
    "DEPTH": _int_range(1, 24),
    "ASPECT_RATIO": _log_int,
    "HEAD_DIM": _choices(64, 128),
    "DEVICE_BATCH_SIZE": _power_of_two,
    "TOTAL_BATCH_SIZE": _power_of_two,
    "MATRIX_LR": _log_float,
    "EMBEDDING_LR": _log_float,
    "UNEMBEDDING_LR": _log_float,
    "SCALAR_LR": _log_float,
    "WEIGHT_DECAY": _float_range(0.0, 1.0),
    "WARMUP_RATIO": _float_range(0.0, 1.0),
    "WARMDOWN_RATIO": _float_range(0.0, 1.0),
    "FINAL_LR_FRAC": _float_range(0.0, 1.0),
    "ADAM_BETA1": _float_range(0.5, 0.99),
    "ADAM_BETA2": _float_range(0.8, 0.999),
    "SOFTCAP": _log_float,
    "WINDOW_PATTERN": _window_pattern,
}


def space_for(name: str, value: Value) -> Space | None:
    """The search space of one constant around its current value; None if it is not tuned."""
    if name in NEVER_TUNED:
        return None
    return KNOWN_SPACES.get(name, _generic)(value) or _generic(value)


# ------------------------------------------------------------------------ the agent


class SearchAgent:
    """Changes one or two hyperparameters per proposal; needs no network and no key."""

    name = "search"

    def __init__(self, config: SearchConfig = SearchConfig()) -> None:
        self.profile = config.profile or default_profile()
        if self.profile not in ("gpu", "cpu"):
            raise AgentConfigError(f"profile must be 'gpu' or 'cpu', got {self.profile!r}.")
        self.seed = config.seed
        self.min_trials = config.min_trials  # past trials needed before TPE replaces local perturbation

    def propose(self, context: Context) -> Proposal:
        try:
            constants = find_constants(context.train_py, self.profile)
        except SyntaxError as exc:
            raise AgentError(f"train.py does not parse ({exc.msg}, line {exc.lineno}); nothing to search.") from None
        spaces = {name: s for name, c in constants.items() if (s := space_for(name, c.value)) is not None}
        if not spaces:
            raise AgentError("train.py has no tunable hyperparameter constants (module-level UPPER_CASE literals).")
        current = {name: c.value for name, c in constants.items()}
        tried = {_key(row.params) for row in context.history if row.params} | {_key(current)}
        rng = random.Random(self._seed(context))
        for _ in range(MAX_ATTEMPTS):
            names = self._pick_names(sorted(spaces), rng)
            changes = self._suggest(names, spaces, current, context.history, rng)
            new_train_py = rewrite(context.train_py, constants, changes)
            if _key(hyperparameters(new_train_py, self.profile)) not in tried:
                return Proposal(
                    description=_describe(context.train_py, constants, changes),
                    diff=unified_diff(context.train_py, new_train_py),
                )
        raise AgentError(f"the search found no untried hyperparameter change in {MAX_ATTEMPTS} attempts.")

    def _seed(self, context: Context) -> int:
        """Same context, same seed; a retry (feedback) or a longer history gives another draw."""
        material = json.dumps([self.seed, context.seed, context.feedback, len(context.history), context.train_py])
        return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big")

    def _pick_names(self, names: list[str], rng: random.Random) -> list[str]:
        count = 1 if len(names) == 1 or rng.random() < 0.7 else 2
        picked: list[str] = []
        for _ in range(count):
            pool = [n for n in names if n not in picked]
            picked += rng.choices(pool, weights=[KNOWN_WEIGHT if n in KNOWN_SPACES else 1 for n in pool])
        return picked

    def _suggest(
        self,
        names: list[str],
        spaces: Mapping[str, Space],
        current: Mapping[str, Value],
        history: tuple[HistoryRow, ...],
        rng: random.Random,
    ) -> dict[str, Value]:
        """New values for `names`: TPE over past trials once there are enough, else a local step."""
        distributions = {n: spaces[n].distribution for n in names}
        trials = _past_trials(names, spaces, history)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        log.debug("search_suggest", names=names, past_trials=complete, mode="tpe" if complete >= self.min_trials else "local")
        if complete < self.min_trials:
            return {n: spaces[n].decode(_perturb(distributions[n], spaces[n].encode(current[n]), rng)) for n in names}
        sampler = optuna.samplers.TPESampler(seed=rng.randrange(2**32), n_startup_trials=self.min_trials)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.add_trials(trials)
        trial = study.ask(distributions)
        return {n: spaces[n].decode(trial.params[n]) for n in names}


def _past_trials(
    names: list[str], spaces: Mapping[str, Space], history: tuple[HistoryRow, ...]
) -> list[optuna.trial.FrozenTrial]:
    """Experiments of the ledger as optuna trials over `names`: measured ones complete,
    failed runs failed; rows without these constants or outside the space are left out."""
    trials = []
    for row in history:
        if row.val_bpb is not None:
            state, value = TrialState.COMPLETE, row.val_bpb
        elif row.status in Status.where(Status.is_fault):
            state, value = TrialState.FAIL, None
        else:
            continue
        try:
            params = {n: spaces[n].encode(row.params[n]) for n in names}
            trials.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions={n: spaces[n].distribution for n in names},
                    value=value,
                    state=state,
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return trials


def _perturb(distribution: BaseDistribution, x: Any, rng: random.Random) -> Any:
    """A random step from `x` inside `distribution` (the fallback without enough history)."""
    if isinstance(distribution, CategoricalDistribution):
        return rng.choice([c for c in distribution.choices if c != x] or list(distribution.choices))
    if isinstance(distribution, IntDistribution):
        if distribution.log:
            stepped = round(x * math.exp(rng.gauss(0.0, 0.5)))
        else:
            stepped = x + rng.choice((-2, -1, 1, 2)) * distribution.step
        return min(max(stepped, distribution.low), distribution.high)
    assert isinstance(distribution, FloatDistribution)
    if distribution.log:
        stepped = x * math.exp(rng.gauss(0.0, 0.5))
    else:
        stepped = x + rng.gauss(0.0, 0.15 * (distribution.high - distribution.low))
    return min(max(stepped, distribution.low), distribution.high)


# ----------------------------------------------------------------- editing and diffing


def rewrite(train_py: str, constants: Mapping[str, Constant], changes: Mapping[str, Value]) -> str:
    """train.py with the literals of `changes` replaced, everything else byte for byte."""
    lines = train_py.split("\n")
    for name in reversed(_in_source_order(changes, constants)):
        c = constants[name]
        line = lines[c.line]
        lines[c.line] = line[: c.start] + literal_text(changes[name], c.text(lines)) + line[c.end :]
    return "\n".join(lines)


def literal_text(value: Value, old_text: str) -> str:
    """Source text for `value`, in the style of the literal it replaces."""
    if isinstance(value, str):
        quote = next((ch for ch in old_text if ch in "'\""), '"')
        return f"{quote}{value}{quote}"
    if isinstance(value, int):
        if old_text.replace(" ", "").startswith("2**") and value & (value - 1) == 0 and value > 0:
            return f"2**{value.bit_length() - 1}"
        return str(value)
    return repr(_round3(value))


def _describe(train_py: str, constants: Mapping[str, Constant], changes: Mapping[str, Value]) -> str:
    """`MATRIX_LR 0.04 -> 0.05, DEPTH 8 -> 10`, in source order, changed literals only."""
    lines = train_py.split("\n")
    parts = []
    for name in _in_source_order(changes, constants):
        old_text = constants[name].text(lines)
        new_text = literal_text(changes[name], old_text)
        if new_text != old_text:
            parts.append(f"{name} {old_text} -> {new_text}")
    return ", ".join(parts)


def _in_source_order(names: Iterable[str], constants: Mapping[str, Constant]) -> list[str]:
    return sorted(names, key=lambda n: (constants[n].line, constants[n].start))


def unified_diff(old: str, new: str) -> str:
    """A unified diff of train.py that `patch -p1` and `git apply` accept."""
    diff = difflib.unified_diff(_lines(old), _lines(new), "a/train.py", "b/train.py")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in diff)


def _lines(text: str) -> list[str]:
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _key(params: Mapping[str, Value]) -> tuple[tuple[str, Value], ...]:
    return tuple(sorted(params.items()))
