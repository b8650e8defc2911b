"""A preset's claims about its paper, judged on the runs: reproduced, not reproduced, inconclusive.

A preset states them under a top-level ``claims:`` list (training ignores it; every run keeps it
in ``.hydra/config.yaml``). A claim names two sets of runs by their config values, ``better``
and ``than``, and one number per run: a ``statistic`` of a ``metric`` (docs/report.md has the
format). Runs of the two sets that agree on every other key that varies form one comparison;
``along: KEY`` says that the claim is meant at each value of KEY (each its own comparison).

The rule, per comparison: the claimed winner's per-seed values ``a`` against the other's ``b``,
Welch's t statistic ``t = (mean(a) - mean(b)) / sqrt(var(a)/n_a + var(b)/n_b)`` (sample
variances; the sign flipped for ``direction: lower``) with Welch-Satterthwaite degrees of
freedom, one-sided. With at least :data:`MIN_SEEDS` seeds on each side:

- ``reproduced``: every comparison significant in the claimed direction, p < :data:`ALPHA`
  (all must hold, so no correction for their number is needed: an intersection-union test);
- ``not reproduced``: some comparison significant in the opposite direction, p < ALPHA / k
  for k comparisons (Bonferroni: any one of k may trigger it);
- ``inconclusive``: anything else, and every claim with fewer than MIN_SEEDS seeds on a side.

numpy here; scipy (the t distribution) only when a claim is judged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnlab.report.data import (
    MISSING,
    Group,
    best_of,
    display_key,
    display_value,
    first_step_reaching,
    higher_is_better,
    make_groups,
    value_key,
)
from bnlab.rundir.reader import Run

ALPHA = 0.05
MIN_SEEDS = 3
STATISTICS = ("final", "best", "mean", "steps_to_target")
DIRECTIONS = ("higher", "lower")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
# A diverged run is a result (the network failed to train); a failed or killed one is not.
JUDGED_STATUSES = ("completed", "diverged")
REQUIRED = ("id", "text", "source", "metric", "better", "than")
OPTIONAL = ("statistic", "direction", "along", "where", "published", "target")


class ClaimError(ValueError):
    """A claim that cannot be read: a missing field or a value out of its choices."""


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, as a preset states it."""

    id: str
    text: str
    source: str
    metric: str  # a tag of scalars.csv
    better: dict[str, Any]  # config values of the runs claimed better ...
    than: dict[str, Any]  # ... than these
    statistic: str = "final"  # one number per run: final | best | mean | steps_to_target
    direction: str = "higher"  # of the statistic, for the claimed winner
    along: str | None = None  # the claim holds at each value of this key
    where: dict[str, Any] = field(default_factory=dict)  # only runs with these values (or lists)
    published: Any = None  # the paper's number(s), shown next to ours
    target: float | None = None  # for steps_to_target

    @property
    def selector_names(self) -> list[str]:
        return list(dict.fromkeys([*self.better, *self.than]))


def parse_claim(raw: Any) -> Claim:
    """A :class:`Claim` from a preset's YAML entry; :class:`ClaimError` says what is wrong."""
    if not isinstance(raw, dict):
        raise ClaimError(f"a claim is a mapping of fields, not {raw!r}")
    name = raw.get("id", "?")
    missing = [k for k in REQUIRED if raw.get(k) in (None, "", {})]
    if missing:
        raise ClaimError(f"claim {name}: missing {', '.join(missing)}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ClaimError(f"claim {name}: unknown field(s) {', '.join(unknown)}")
    for key in ("better", "than", "where"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], dict):
            raise ClaimError(f"claim {name}: {key} must map config keys to values")
    statistic = raw.get("statistic") or "final"
    if statistic not in STATISTICS:
        raise ClaimError(f"claim {name}: statistic {statistic!r} is not one of {', '.join(STATISTICS)}")
    default = "lower" if statistic == "steps_to_target" or not higher_is_better(raw["metric"]) \
        else "higher"
    direction = raw.get("direction") or default
    if direction not in DIRECTIONS:
        raise ClaimError(f"claim {name}: direction {direction!r} is not higher or lower")
    target = raw.get("target")
    if statistic == "steps_to_target" and not isinstance(target, (int, float)):
        raise ClaimError(f"claim {name}: statistic steps_to_target needs a numeric target")
    if raw["better"] == raw["than"]:
        raise ClaimError(f"claim {name}: better and than name the same runs")
    return Claim(id=str(raw["id"]), text=str(raw["text"]), source=str(raw["source"]),
                 metric=str(raw["metric"]), better=dict(raw["better"]), than=dict(raw["than"]),
                 statistic=statistic, direction=direction, along=raw.get("along"),
                 where=dict(raw.get("where") or {}), published=raw.get("published"),
                 target=float(target) if isinstance(target, (int, float)) else None)


# ---------------------------------------------------------------- results
@dataclass
class Side:
    """One side of a comparison: its runs' values of the claim's statistic."""

    label: str  # the selector, e.g. "norm=bn"
    values: list[float]  # one per judged run with a finite value (its seeds)
    runs: int = 0  # judged runs (completed or diverged)
    diverged: int = 0
    not_finite: int = 0  # judged runs whose value is NaN or infinite (left out of values)
    not_reached: int = 0  # steps_to_target: runs that never reached it (their last step counts)

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass
class Comparison:
    label: str  # the values of the other varying keys ("optim.lr=1"), "" when nothing else varies
    better: Side
    than: Side
    p_claimed: float | None = None  # one-sided Welch p, in the claimed direction
    p_opposite: float | None = None
    verdict: str = INCONCLUSIVE


@dataclass
class Judgement:
    claim: Claim
    comparisons: list[Comparison]
    verdict: str
    reason: str  # why, in a few words


@dataclass
class NotJudged:
    """A claim these runs cannot judge (its groups are absent), or one that cannot be read."""

    id: str
    text: str
    source: str
    reason: str


# ---------------------------------------------------------------- the rule
def welch_p(a: Sequence[float], b: Sequence[float], higher: bool = True) -> tuple[float, float]:
    """One-sided p-values of Welch's t-test: (mean(a) beats mean(b), mean(b) beats mean(a)).

    "Beats" is ``>`` for ``higher``, ``<`` otherwise. Zero spread on both sides makes any
    difference certain (p = 0) and no difference void (p = 1 both ways).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = (a.mean() - b.mean()) * (1 if higher else -1)
    if va + vb == 0:
        return (0.0, 1.0) if diff > 0 else (1.0, 0.0) if diff < 0 else (1.0, 1.0)
    from scipy.stats import t as student_t

    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(student_t.sf(t, df)), float(student_t.cdf(t, df))


def combine(comparisons: list[Comparison]) -> tuple[str, str]:
    """The claim's verdict from its comparisons (module docstring), and the reason."""
    k = len(comparisons)
    few = [c for c in comparisons if min(c.better.n, c.than.n) < MIN_SEEDS]
    judged = [c for c in comparisons if c not in few]
    for c in judged:
        if c.p_claimed < ALPHA:
            c.verdict = REPRODUCED
        elif c.p_opposite < ALPHA / k:
            c.verdict = NOT_REPRODUCED
    if any(c.verdict == NOT_REPRODUCED for c in judged):
        threshold = f"{ALPHA / k:.2g}" if k > 1 else f"{ALPHA:g}"
        return NOT_REPRODUCED, f"significant the other way (p < {threshold})"
    if few:
        return INCONCLUSIVE, f"fewer than {MIN_SEEDS} seeds with a value on a side"
    if all(c.verdict == REPRODUCED for c in judged):
        return REPRODUCED, f"p < {ALPHA:g}" + (f" at each of {k} values" if k > 1 else "")
    missing = sum(c.verdict != REPRODUCED for c in judged)
    return INCONCLUSIVE, ("not significant" if k == 1 else
                          f"not significant at {missing} of {k} values")


# ---------------------------------------------------------------- judging the runs
def claims_of(runs: Sequence[Run]) -> list[tuple[Any, list[Run]]]:
    """Every distinct claim the runs carry, with the runs that carry it, in order of appearance."""
    found: dict[str, tuple[Any, list[Run]]] = {}
    for run in runs:
        for raw in run.claims:
            key = json.dumps(raw, sort_keys=True, default=str)
            found.setdefault(key, (raw, []))[1].append(run)
    return list(found.values())


def claim_metrics(runs: Sequence[Run]) -> list[str]:
    """The tags the runs' claims read (to load them with the report's own)."""
    return sorted({str(raw["metric"]) for raw, _ in claims_of(runs)
                   if isinstance(raw, dict) and raw.get("metric")})


def judge_all(runs: Sequence[Run], group_keys: Sequence[str]) -> tuple[list[Judgement], list[NotJudged]]:
    """Judge every claim the runs carry; the others (absent groups, unreadable) with a reason."""
    judged, not_judged = [], []
    for raw, carriers in claims_of(runs):
        try:
            claim = parse_claim(raw)
        except ClaimError as err:
            name = raw.get("id", "?") if isinstance(raw, dict) else "?"
            text = raw.get("text", "") if isinstance(raw, dict) else ""
            source = raw.get("source", "") if isinstance(raw, dict) else ""
            not_judged.append(NotJudged(str(name), str(text), str(source), f"unreadable: {err}"))
            continue
        result = judge(claim, carriers, group_keys)
        (judged if isinstance(result, Judgement) else not_judged).append(result)
    return judged, not_judged


def judge(claim: Claim, runs: Sequence[Run], group_keys: Sequence[str]) -> Judgement | NotJudged:
    """Judge ``claim`` on ``runs`` (those that carry it), grouped by ``group_keys`` and its own keys."""
    runs = [run for run in runs if run.config]
    known = {k for run in runs for k in run.config}

    def key_of(name: str) -> str | None:  # "norm" means norm.name, as on the command line
        return name if name in known else f"{name}.name" if f"{name}.name" in known else None

    names = [*claim.better, *claim.than, *claim.where, *([claim.along] if claim.along else [])]
    unknown = [n for n in names if key_of(n) is None]
    if unknown:
        return _not_judged(claim, f"no run has the config key {', '.join(unknown)}")
    better = {key_of(n): v for n, v in claim.better.items()}
    than = {key_of(n): v for n, v in claim.than.items()}
    where = {key_of(n): v for n, v in claim.where.items()}
    runs = [run for run in runs if _matches(run.config, where)]
    selectors = list(dict.fromkeys([*better, *than]))
    keys = list(dict.fromkeys([*group_keys, *selectors,
                               *([key_of(claim.along)] if claim.along else [])]))
    groups = make_groups(runs, keys)
    winners = [g for g in groups if _matches(dict(zip(keys, g.values, strict=True)), better)]
    losers = [g for g in groups if _matches(dict(zip(keys, g.values, strict=True)), than)]
    for side, found in ((claim.better, winners), (claim.than, losers)):
        if not found:
            return _not_judged(claim, f"no runs with {_selector_label(side)}")
    others = [i for i, k in enumerate(keys) if k not in selectors]
    comparisons = []
    for gb in winners:
        for gt in losers:
            if gb is gt or any(value_key(gb.values[i]) != value_key(gt.values[i]) for i in others):
                continue
            label = ", ".join(f"{display_key(keys[i])}={display_value(gb.values[i])}"
                              for i in others if _varies(groups, i))
            comparisons.append(Comparison(label, side_of(claim, gb, claim.better),
                                          side_of(claim, gt, claim.than)))
    if not comparisons:
        return _not_judged(claim, f"no runs of {_selector_label(claim.better)} and "
                                  f"{_selector_label(claim.than)} agree on the other keys")
    for c in comparisons:
        if min(c.better.n, c.than.n) >= 2:  # a variance needs two values
            c.p_claimed, c.p_opposite = welch_p(c.better.values, c.than.values,
                                                claim.direction == "higher")
    verdict, reason = combine(comparisons)
    return Judgement(claim, comparisons, verdict, reason)


def side_of(claim: Claim, group: Group, selector: dict[str, Any]) -> Side:
    side = Side(_selector_label(selector), [])
    for run in group.runs:
        if run.status not in JUDGED_STATUSES:
            continue
        side.runs += 1
        side.diverged += run.status == "diverged"
        value, reached = run_value(run, claim)
        side.not_reached += not reached
        if value is None or not math.isfinite(value):
            side.not_finite += 1
        else:
            side.values.append(value)
    return side


def run_value(run: Run, claim: Claim) -> tuple[float | None, bool]:
    """The claim's statistic for one run, and whether it reached the target (steps_to_target).

    A run that never reached the target counts at its last evaluated step: a lower bound on its
    steps, so the claim that it is slower is judged conservatively.
    """
    series = run.scalars.get(claim.metric)
    if series is None or len(series.values) == 0:
        return None, True
    if claim.statistic == "final":
        return float(series.values[-1]), True
    if claim.statistic == "best":
        return best_of(series, claim.direction == "higher"), True
    if claim.statistic == "mean":
        finite = series.values[np.isfinite(series.values)]
        return (float(finite.mean()) if len(finite) else None), True
    step = first_step_reaching(series, claim.target, higher_is_better(claim.metric))
    return (float(series.steps[-1]), False) if step is None else (float(step), True)


def _matches(config: dict[str, Any], selector: dict[str, Any]) -> bool:
    """Whether the config has every value of ``selector`` (a list there means any of them)."""
    for key, wanted in selector.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if value_key(config.get(key, MISSING)) not in {value_key(o) for o in options}:
            return False
    return True


def _varies(groups: Sequence[Group], index: int) -> bool:
    return len({value_key(g.values[index]) for g in groups}) > 1


def _selector_label(selector: dict[str, Any]) -> str:
    return ", ".join(f"{display_key(k)}={display_value(v)}" for k, v in selector.items())


def _not_judged(claim: Claim, reason: str) -> NotJudged:
    return NotJudged(claim.id, claim.text, claim.source, reason)
