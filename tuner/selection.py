"""Which trial a study's answer is: the best distinct config, ties broken by a documented rule.

One function, `choose`, serves `tune run`, `tune show`, `tune export` and `tune audit`, so they
all name the same trial.

Single objective. Trials are grouped by config (the `config_hash` user attribute); a trial
marked `repeat_of` re-used an earlier trial's value and is not a config of its own. The
configs whose value equals the best (within a relative 1e-9) are *tied*. A tie is broken by:
1. the study's tie-break objective, when its spec names one (`tie_break: NAME`): every trial
   also stored that objective's mean as `tie_break_value`; the highest wins;
2. otherwise, or where that too ties, the mean per-image rank: on each tuning image the tied
   configs are ranked by their objective value there (average ranks for equal values) and the
   ranks are averaged over images; the highest mean rank (the config that wins on most images)
   wins;
3. the lowest trial number (the first config that reached the value).

Several objectives (`directions` of a multi-objective study). The candidates are the Pareto
front (`study.best_trials`). Each complete trial is ranked per objective among the distinct
configs (1 = worst, average ranks for ties, minimised objectives reversed); the Pareto config
with the highest mean rank over the objectives wins, then the lowest trial number. This picks
the front's most balanced member, not an extreme of one objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from scipy.stats import rankdata

#: values within this relative distance of the best count as tied
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Choice:
    """A study's answer and how it was reached."""

    trial: FrozenTrial
    #: how the answer was singled out: "only" (no tie), "tie_break", "per_image_rank", "first"
    #: or "pareto_mean_rank"
    rule: str
    tied: tuple[FrozenTrial, ...] = ()  # the distinct configs tied at the best value, choice first
    candidates: tuple[FrozenTrial, ...] = field(default=())  # multi-objective: the Pareto front

    @property
    def tie_count(self) -> int:
        return max(len(self.tied), 1)

    def tied_miou(self) -> tuple[float, float] | None:
        """(lowest, highest) mIoU among the tied configs, when the study recorded mIoU for them."""
        values = [t.user_attrs.get("miou") for t in self.tied]
        values = [v for v in values if v is not None]
        return (min(values), max(values)) if len(values) > 1 else None

    def describe(self) -> str:
        """One line for a person: how many configs tie, how the tie was broken, their mIoU spread."""
        if self.rule == "pareto_mean_rank":
            if len(self.candidates) == 1:
                return f"trial #{self.trial.number}: the only Pareto-optimal config"
            return (f"trial #{self.trial.number}: of the {len(self.candidates)} Pareto-optimal configs, "
                    "the one with the highest mean rank over the objectives")
        if self.tie_count == 1:
            return f"trial #{self.trial.number}: the only config with the best objective value"
        how = {"tie_break": "the tie-break objective", "per_image_rank": "the mean per-image rank",
               "first": "the lowest trial number (nothing else separated them)"}[self.rule]
        line = f"{self.tie_count} distinct configs tie at the best objective value; chosen by {how}"
        spread = self.tied_miou()
        if spread is not None:
            line += f"; their mIoU ranges {spread[0]:.4f}-{spread[1]:.4f}"
        return line

    def summary(self) -> dict:
        """What a study or an export records of the choice."""
        out = {"trial": self.trial.number, "rule": self.rule, "tied_configs": self.tie_count,
               "tied_trials": [t.number for t in self.tied]}
        spread = self.tied_miou()
        if spread is not None:
            out["tied_miou_range"] = list(spread)
        if self.candidates:
            out["pareto_trials"] = [t.number for t in self.candidates]
        return out


def distinct_complete(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, one per config (the first that ran it), by trial number; repeats left out."""
    seen, out = set(), []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if t.user_attrs.get("repeat_of") is not None or t.values is None:
            continue
        key = t.user_attrs.get("config_hash") or ("trial", t.number)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def choose(study: optuna.Study) -> Choice:
    """The study's answer (see the module docstring); a ValueError when nothing has completed."""
    trials = distinct_complete(study)
    if not trials:
        raise ValueError(f"study {study.study_name!r} has no completed trial yet: run it first")
    if len(study.directions) > 1:
        return _choose_pareto(study, trials)
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    values = np.array([sign * t.value for t in trials])
    best = values.max()
    tied_idx = np.flatnonzero(np.abs(values - best) <= TIE_TOLERANCE * max(abs(best), 1.0))
    tied = [trials[i] for i in tied_idx]
    if len(tied) == 1:
        return Choice(tied[0], "only", tuple(tied))
    rule, pool = "first", tied
    secondary = [t.user_attrs.get("tie_break_value") for t in pool]
    if all(v is not None for v in secondary):
        top = max(secondary)
        narrowed = [t for t, v in zip(pool, secondary)
                    if abs(v - top) <= TIE_TOLERANCE * max(abs(top), 1.0)]
        if len(narrowed) < len(pool):
            rule, pool = "tie_break", narrowed
    if len(pool) > 1:
        ranks = _mean_image_rank(pool, sign)
        if ranks is not None and np.ptp(ranks) > 0:
            rule, pool = "per_image_rank", [t for t, r in zip(pool, ranks) if r == ranks.max()]
    chosen = min(pool, key=lambda t: t.number)
    return Choice(chosen, rule, (chosen, *[t for t in tied if t is not chosen]))


def _mean_image_rank(trials: list[FrozenTrial], sign: float) -> np.ndarray | None:
    """Mean over images of each trial's rank among `trials` by per-image value (None if unknown)."""
    rows = [t.user_attrs.get("objective_per_image") for t in trials]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1 or not rows[0]:
        return None
    values = sign * np.asarray(rows, dtype=np.float64)  # [trials, images]
    if not np.all(np.isfinite(values)):
        return None
    return rankdata(values, axis=0).mean(axis=1)


def _choose_pareto(study: optuna.Study, trials: list[FrozenTrial]) -> Choice:
    front_numbers = {t.number for t in study.best_trials}
    front = [t for t in trials if t.number in front_numbers] or trials
    signs = np.array([1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions])
    values = np.asarray([t.values for t in trials], dtype=np.float64) * signs  # [trials, objectives]
    ranks = rankdata(values, axis=0).mean(axis=1)  # higher = better on average
    by_number = {t.number: r for t, r in zip(trials, ranks)}
    chosen = max(front, key=lambda t: (by_number[t.number], -t.number))
    return Choice(chosen, "pareto_mean_rank", (chosen,), tuple(front))
