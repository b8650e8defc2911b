"""A preset's claims about its paper, judged on the runs: reproduced, not reproduced, inconclusive
or not judged.

A preset states them under a top-level ``claims:`` list (training ignores it; every run keeps it
in ``.hydra/config.yaml``; docs/report.md has the format). A claim names the runs of its two sides
by their config values, ``better`` and ``than``, and one number per run, a ``statistic`` of a
``metric``. Four kinds:

- a **difference** (the default): ``better``'s numbers are ``direction`` (higher | lower) than
  ``than``'s;
- an **equivalence** (``margin: m``): the two sides' location differs by less than m;
- an **interaction** (``change: {from: {K: v1}, to: {K: v2}}``): per seed, the number at v2 minus
  the one at v1; ``better``'s changes are ``direction`` than ``than``'s;
- a **paired** claim (``than_metric: T``): per run of ``better``, statistic(metric) minus
  statistic(T); the differences are ``direction`` than 0.

Runs that agree on every other key that varies form one comparison (``along: K`` says the claim
is meant at each value of K). The rule, which never assumes a distribution:

1. **One number per run.** Completed and diverged runs are results; failed, interrupted, running
   or damaged ones are listed, never judged. A diverged run, or a non-finite number, is the
   *worst* outcome: -inf for a metric where higher is better (accuracies), +inf where lower is
   (losses); for any other metric, worst in the claim's ``direction``. For ``steps_to_target``
   a run that never reaches the target (a diverged one included) is *censored* at its budget
   (``total_steps``): its steps exceed the budget, whatever its last logged step.
2. **Resolution.** Two numbers closer than the metric's resolution r are tied. Accuracies are
   k/N for N examples: r = 1/N, with N bounded from below by the least common denominator of
   every logged value of the tag (so r is never smaller than one example); steps are known to
   one evaluation interval (the largest gap between logged steps); other metrics have r = 0
   (only equal values tie).
3. **Scores.** For the pooled runs of a comparison, x beats y when x is surely ahead of y in
   ``direction`` by at least r (a censored x, known only to exceed its budget c, is ahead of
   every y <= c); the score of a run is the number it beats minus the number that beat it
   (Gehan's generalization of the Wilcoxon-Mann-Whitney score, valid under censoring and ties).
4. **Exact permutation test.** S = the sum of ``better``'s scores; under the null hypothesis
   that the labels are exchangeable every split of the pooled runs into sides of the same sizes
   is equally likely, and the one-sided p-values P(S' >= S) and P(S' <= S) are counted exactly
   over all C(n_a + n_b, n_a) splits. Ties and zero spread give no certainty: the smallest p
   n_a vs n_b seeds can give is 1 / C(n_a + n_b, n_a) (1/20 for 3 vs 3, 1/252 for 5 vs 5).
   Equivalence: two one-sided tests (TOST) of ``better`` shifted by +m and -m; interaction: the
   same test on the per-seed changes; paired: an exact sign-flip test on the per-run
   differences' signed ranks (Wilcoxon), differences within r dropped; smallest p 2^-n.
5. **A claim's p.** Along several comparisons it must hold at every one: p = the largest of
   their p-values (an intersection-union test); the opposite is shown by any one of k:
   p_not = k x the smallest opposite p (Bonferroni). Every value of ``along`` (those ``where``
   names, or that the runs hold) must have runs on both sides, else the claim is not judged.
6. **The family.** The claims judged together (a preset's) are one family: Holm's step-down
   procedure over their p at :data:`ALPHA`, and separately over their p_not. ``reproduced``
   when Holm rejects the claim's null, ``not reproduced`` when it rejects the claim's
   opposite, ``inconclusive`` otherwise (p-values are strict: p < threshold).

numpy only (no scipy): ``bnlab report --help`` stays fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from bnlab.report.data import (
    MISSING,
    comparable_keys,
    display_key,
    display_value,
    first_step_reaching,
    make_groups,
    value_key,
)
from bnlab.rundir.reader import Run, Series

ALPHA = 0.05
STATISTICS = ("final", "best", "mean", "median", "steps_to_target")
DIRECTIONS = ("higher", "lower")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_JUDGED = (
    "reproduced", "not reproduced", "inconclusive", "not judged")
DIFFERENCE, EQUIVALENCE, INTERACTION, PAIRED = "difference", "equivalence", "interaction", "paired"
# A diverged run is a result (the network failed to train); a failed or killed one is not.
JUDGED_STATUSES = ("completed", "diverged")
REQUIRED = ("id", "text", "source", "metric", "better")
OPTIONAL = ("than", "statistic", "direction", "along", "where", "published", "target", "margin",
            "change", "than_metric")
# Accuracies are k/N: N is looked for up to this denominator (a test split of a million).
MAX_EXAMPLES = 10**6


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
    than: dict[str, Any]  # ... than these (empty for a paired claim)
    statistic: str = "final"  # one number per run: final | best | mean | median | steps_to_target
    direction: str = "higher"  # of the statistic (or change, or difference), for ``better``
    along: str | None = None  # the claim holds at each value of this key
    where: dict[str, Any] = field(default_factory=dict)  # only runs with these values (or lists)
    published: Any = None  # the paper's number(s), shown next to ours
    target: float | None = None  # for steps_to_target
    margin: float | None = None  # equivalence: |difference| < margin
    change: tuple[dict[str, Any], dict[str, Any]] | None = None  # interaction: (from, to)
    than_metric: str | None = None  # paired: metric minus this tag, in the same runs

    @property
    def kind(self) -> str:
        if self.margin is not None:
            return EQUIVALENCE
        if self.change is not None:
            return INTERACTION
        return PAIRED if self.than_metric is not None else DIFFERENCE

    @property
    def metrics(self) -> list[str]:
        return [self.metric, *([self.than_metric] if self.than_metric else [])]


def metric_sense(metric: str) -> str | None:
    """``higher`` for an accuracy tag (``.../acc...``), ``lower`` for a loss, else None."""
    name = metric.rsplit("/", 1)[-1]
    if name.startswith("loss") or name.endswith("loss"):
        return "lower"
    return "higher" if name.startswith("acc") else None


def parse_claim(raw: Any) -> Claim:
    """A :class:`Claim` from a preset's YAML entry; :class:`ClaimError` says what is wrong."""
    if not isinstance(raw, dict):
        raise ClaimError(f"a claim is a mapping of fields, not {raw!r}")
    name = raw.get("id", "?")

    def fail(why: str) -> ClaimError:
        return ClaimError(f"claim {name}: {why}")

    missing = [k for k in REQUIRED if raw.get(k) in (None, "", {})]
    paired = raw.get("than_metric") is not None
    if not paired and raw.get("than") in (None, {}):
        missing.append("than")
    if missing:
        raise fail(f"missing {', '.join(missing)}")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise fail(f"unknown field(s) {', '.join(unknown)}")
    for key in ("better", "than", "where"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise fail(f"{key} must map config keys to values")
    if paired and raw.get("than") not in (None, {}):
        raise fail("a paired claim (than_metric) compares two metrics of the better runs: no than")
    statistic = raw.get("statistic") or "final"
    if statistic not in STATISTICS:
        raise fail(f"statistic {statistic!r} is not one of {', '.join(STATISTICS)}")
    target = raw.get("target")
    if statistic == "steps_to_target" and not _is_number(target):
        raise fail("statistic steps_to_target needs a numeric target")
    margin = raw.get("margin")
    if margin is not None and not (_is_number(margin) and margin > 0):
        raise fail(f"margin must be a positive number, not {margin!r}")
    change = _parse_change(raw.get("change"), fail)
    if sum(x is not None for x in (margin, change, raw.get("than_metric"))) > 1:
        raise fail("margin, change and than_metric are different kinds of claim: use one")
    if statistic == "steps_to_target" and (change or paired):
        raise fail("steps_to_target is censored for runs that never reach the target: a change "
                   "or a paired difference of censored steps is not defined")
    better, than = dict(raw["better"]), dict(raw.get("than") or {})
    if better == than:
        raise fail("better and than name the same runs")
    along = raw.get("along")
    if along is not None and (along in better or along in than or (change and along in change[0])):
        raise fail(f"along {along} is also a key that selects a side")
    if change and set(change[0]) & (set(better) | set(than)):
        raise fail("change's keys must not also select better or than")
    if paired and raw["than_metric"] == raw["metric"]:
        raise fail("than_metric is the metric itself")
    sense = "lower" if statistic == "steps_to_target" else metric_sense(str(raw["metric"]))
    direction = raw.get("direction") or ("lower" if sense == "lower" and not paired else "higher")
    if direction not in DIRECTIONS:
        raise fail(f"direction {direction!r} is not higher or lower")
    return Claim(id=str(raw["id"]), text=str(raw["text"]), source=str(raw["source"]),
                 metric=str(raw["metric"]), better=better, than=than, statistic=statistic,
                 direction=direction, along=along, where=dict(raw.get("where") or {}),
                 published=raw.get("published"),
                 target=float(target) if _is_number(target) else None,
                 margin=float(margin) if margin is not None else None, change=change,
                 than_metric=str(raw["than_metric"]) if paired else None)


def _parse_change(raw: Any, fail) -> tuple[dict, dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"from", "to"} or \
            not all(isinstance(raw[k], dict) and raw[k] for k in ("from", "to")):
        raise fail("change is {from: {KEY: value}, to: {KEY: value}}")
    if set(raw["from"]) != set(raw["to"]) or raw["from"] == raw["to"]:
        raise fail("change's from and to set the same keys to different values")
    return dict(raw["from"]), dict(raw["to"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- one number per run
@dataclass(frozen=True)
class Value:
    """One run's number (or one seed's change, or one run's paired difference) as ranked."""

    x: float  # -inf / +inf: the worst outcome; for a censored value, the budget
    censored: bool = False  # steps_to_target never reached: the true value exceeds x
    note: str = ""  # "diverged" | "not finite" | "never reached" | ""
    seed: Any = None

    def shifted(self, by: float) -> Value:
        return Value(self.x + by, self.censored, self.note, self.seed)


def worst(claim: Claim, metric: str) -> float:
    """The value a diverged run (or a non-finite number) takes: the metric's worst end."""
    sense = metric_sense(metric) or claim.direction
    return -math.inf if sense == "higher" else math.inf


def run_value(run: Run, claim: Claim, metric: str | None = None) -> Value | None:
    """The claim's statistic of ``metric`` for one run; None when the run did not log the tag."""
    metric = metric or claim.metric
    series = run.scalars.get(metric)
    if claim.statistic == "steps_to_target":
        budget = run.summary.get("total_steps")
        if not _is_number(budget):
            budget = float(series.steps[-1]) if series is not None and len(series.steps) else None
        if budget is None:
            return None
        if run.status == "diverged":  # a network that failed to train never reached it
            return Value(float(budget), True, "diverged", run.seed)
        if series is None or len(series.values) == 0:
            return None
        step = first_step_reaching(series, claim.target, metric_sense(metric) != "lower")
        if step is None:
            return Value(float(budget), True, "never reached", run.seed)
        return Value(float(step), seed=run.seed)
    if run.status == "diverged":
        return Value(worst(claim, metric), note="diverged", seed=run.seed)
    if series is None or len(series.values) == 0:
        return None
    x = statistic_of(series, claim.statistic, (metric_sense(metric) or claim.direction) == "higher")
    if x is None or not math.isfinite(x):
        return Value(worst(claim, metric), note="not finite", seed=run.seed)
    return Value(x, seed=run.seed)


def statistic_of(series: Series, statistic: str, up: bool) -> float | None:
    """final | best (highest when ``up``, else lowest) | mean | median over a run's evaluations;
    best, mean and median over the finite values (None when there is none)."""
    if statistic == "final":
        return float(series.values[-1])
    finite = series.values[np.isfinite(series.values)]
    if len(finite) == 0:
        return None
    if statistic == "best":
        return float(finite.max() if up else finite.min())
    return float(finite.mean() if statistic == "mean" else np.median(finite))


def resolution(claim: Claim, runs: Sequence[Run], metric: str | None = None) -> float:
    """The smallest difference of ``metric``'s statistic that counts (module docstring, 2.)."""
    metric = metric or claim.metric
    series = [s for run in runs if (s := run.scalars.get(metric)) is not None and len(s.steps)]
    if claim.statistic == "steps_to_target":
        gaps = [int(np.diff(s.steps).max()) for s in series if len(s.steps) > 1]
        return float(max(gaps)) if gaps else 0.0
    if metric_sense(metric) == "higher" and series:
        examples = least_examples(np.concatenate([s.values for s in series]))
        return 1.0 / examples if examples else 0.0
    return 0.0


def least_examples(values: np.ndarray) -> int | None:
    """The least N (at most MAX_EXAMPLES) such that every finite value is k/N exactly, else None.

    A value k/N's reduced denominator divides N, so their least common multiple divides N too:
    1/lcm is at least one example's share, never less.
    """
    n = 1
    for v in np.unique(values[np.isfinite(values)]):
        fraction = Fraction(float(v)).limit_denominator(MAX_EXAMPLES)
        if float(fraction) != float(v):
            return None
        n = math.lcm(n, fraction.denominator)
        if n > MAX_EXAMPLES:
            return None
    return n


# ---------------------------------------------------------------- exact tests
def order(x: Value, y: Value, r: float) -> int:
    """+1 when x is surely higher than y by at least ``r``, -1 when surely lower, else 0."""
    if x.censored and y.censored:
        return 0
    if x.censored:  # x exceeds its budget: higher than anything observed at or below it
        return 1 if y.x <= x.x else 0
    if y.censored:
        return -1 if x.x <= y.x else 0
    d = x.x - y.x
    # Both worst, equal, or within the resolution (less float rounding: k/N - j/N is not exact).
    if math.isnan(d) or d == 0 or abs(d) < r * (1 - 1e-9):
        return 0
    return 1 if d > 0 else -1


def two_sample_p(a: Sequence[Value], b: Sequence[Value], r: float, higher: bool = True,
                 shift: float = 0.0) -> tuple[float, float]:
    """Exact permutation p-values that ``a`` (shifted by ``shift``) ranks higher than ``b``, and
    that it ranks lower (``higher=False`` swaps the sense), from Gehan scores with resolution r."""
    pooled = [v.shifted(shift) for v in a] + list(b)
    sign = 1 if higher else -1
    scores = [sign * sum(order(x, y, r) for y in pooled) for x in pooled]
    observed = sum(scores[: len(a)])
    return _tails(_subset_sums(scores, len(a)), observed)


def _subset_sums(scores: Sequence[int], k: int) -> dict[int, float]:
    """How many k-subsets of ``scores`` have each sum (a dynamic program over the scores)."""
    counts: list[dict[int, float]] = [{0: 1.0}] + [{} for _ in range(k)]
    for i, s in enumerate(scores):
        for j in range(min(k, i + 1), 0, -1):
            row = counts[j]
            for total, c in counts[j - 1].items():
                row[total + s] = row.get(total + s, 0.0) + c
    return counts[k]


def _tails(counts: dict[int, float], observed: int) -> tuple[float, float]:
    total = sum(counts.values())
    upper = sum(c for s, c in counts.items() if s >= observed)
    lower = sum(c for s, c in counts.items() if s <= observed)
    return upper / total, lower / total


def paired_p(differences: Sequence[Value], r: float, higher: bool = True) -> tuple[float, float]:
    """Exact sign-flip p-values of Wilcoxon's signed-rank statistic: the differences are above 0
    (``higher``), and below it. Differences within ``r`` of 0 drop out; +-inf rank highest."""
    zero = Value(0.0)
    signed = [(order(d, zero, r) * (1 if higher else -1), abs(d.x)) for d in differences]
    signed = [(s, m) for s, m in signed if s]
    if not signed:
        return 1.0, 1.0
    magnitudes = sorted(m for _, m in signed)
    # Twice the mid-rank of each magnitude: integers, ties share their ranks' mean.
    ranks = [sum(2 * i + 2 for i, x in enumerate(magnitudes) if x == m) //
             magnitudes.count(m) for _, m in signed]
    observed = sum(s * rank for (s, _), rank in zip(signed, ranks, strict=True))
    counts: dict[int, float] = {0: 1.0}
    for rank in ranks:  # each sign is +-1 with probability 1/2 under the null
        nxt: dict[int, float] = {}
        for total, c in counts.items():
            for t in (total + rank, total - rank):
                nxt[t] = nxt.get(t, 0.0) + c
        counts = nxt
    return _tails(counts, observed)


def smallest_p(kind: str, n_better: int, n_than: int) -> float:
    """The smallest p-value the test can give these seeds: complete separation."""
    if kind == PAIRED:
        return 2.0**-n_better
    return 1.0 / math.comb(n_better + n_than, n_better)


def holm(ps: Sequence[float], alpha: float = ALPHA) -> list[tuple[bool, float]]:
    """Holm's step-down procedure: per p, (rejected, the threshold alpha/(m - rank) it met)."""
    m = len(ps)
    out: list[tuple[bool, float]] = [(False, alpha)] * m
    going = True
    for rank, i in enumerate(sorted(range(m), key=lambda j: ps[j])):
        threshold = alpha / (m - rank)
        going = going and ps[i] < threshold
        out[i] = (going, threshold)
    return out


# ---------------------------------------------------------------- results
@dataclass
class Side:
    """One side of a comparison: its numbers (per run, per seed's change or per run's paired
    difference), and the runs that are listed but not judged."""

    label: str  # the selector, e.g. "norm=bn"
    values: list[Value] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)  # status -> runs not judged
    no_value: int = 0  # judged runs that did not log the metric
    unpaired: int = 0  # interaction: seeds with a run at only one of from and to

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def finite(self) -> list[float]:
        return [v.x for v in self.values if math.isfinite(v.x) and not v.censored]

    def count(self, note: str) -> int:
        return sum(v.note == note for v in self.values)


@dataclass
class Comparison:
    label: str  # the values of the other varying keys ("optim.lr=1"), "" when nothing else varies
    better: Side
    than: Side | None  # None for a paired claim
    resolution: float
    p_claimed: float = 1.0  # exact one-sided p in the claimed direction (TOST: the larger one)
    p_opposite: float = 1.0  # ... and the other way (equivalence: outside the margin)
    smallest_p: float = 1.0  # what complete separation would give these seeds
    verdict: str = INCONCLUSIVE


@dataclass
class Judgement:
    claim: Claim
    comparisons: list[Comparison]
    verdict: str = INCONCLUSIVE
    reason: str = ""  # why, in a few words
    family: int = 1  # the number of claims judged together (Holm's m)
    threshold: float = ALPHA  # Holm's threshold this claim's p met or missed
    threshold_not: float = ALPHA  # the same for its p_not

    @property
    def p(self) -> float:
        """The claim's p: it must hold at every comparison (intersection-union)."""
        return max(c.p_claimed for c in self.comparisons)

    @property
    def p_not(self) -> float:
        """The opposite's p: any one comparison of k shows it (Bonferroni)."""
        return min(1.0, len(self.comparisons) * min(c.p_opposite for c in self.comparisons))

    @property
    def smallest_p(self) -> float:
        return max(c.smallest_p for c in self.comparisons)


@dataclass
class NotJudged:
    """A claim these runs cannot judge (a side or a value absent), or one that cannot be read."""

    id: str
    text: str
    source: str
    reason: str


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
    tags = set()
    for raw, _ in claims_of(runs):
        if isinstance(raw, dict):
            tags |= {str(raw[k]) for k in ("metric", "than_metric") if raw.get(k)}
    return sorted(tags)


def judge_all(runs: Sequence[Run], group_keys: Sequence[str] = ()
              ) -> tuple[list[Judgement], list[NotJudged]]:
    """Judge every claim the runs carry, Holm over those judged; the others with a reason."""
    judged, not_judged = [], []
    for raw, carriers in claims_of(runs):
        try:
            claim = parse_claim(raw)
        except ClaimError as err:
            fields = raw if isinstance(raw, dict) else {}
            not_judged.append(NotJudged(str(fields.get("id", "?")), str(fields.get("text", "")),
                                        str(fields.get("source", "")), f"unreadable: {err}"))
            continue
        result = judge(claim, carriers, group_keys)
        (judged if isinstance(result, Judgement) else not_judged).append(result)
    decide(judged)
    return judged, not_judged


def decide(judged: list[Judgement], alpha: float = ALPHA) -> None:
    """Each claim's verdict and reason: Holm over the family's p, and over its p_not."""
    for j, (yes, t), (no, t_not) in zip(judged, holm([j.p for j in judged], alpha),
                                        holm([j.p_not for j in judged], alpha), strict=True):
        j.family, j.threshold, j.threshold_not = len(judged), t, t_not
        k = len(j.comparisons)
        for c in j.comparisons:
            c.verdict = (REPRODUCED if c.p_claimed < t else
                         NOT_REPRODUCED if k * c.p_opposite < t_not else INCONCLUSIVE)
        holm_text = f"Holm over {len(judged)} claims" if len(judged) > 1 else "a family of one"
        each = f" at each of {k} values" if k > 1 else ""
        if yes:
            j.verdict, j.reason = REPRODUCED, f"p = {_p(j.p)}{each} < {t:.2g}, {holm_text}"
        elif no:
            other = "outside the margin" if j.claim.kind == EQUIVALENCE else "the other way"
            j.verdict = NOT_REPRODUCED
            j.reason = f"{other}: p = {_p(j.p_not)} < {t_not:.2g}, {holm_text}"
        else:
            j.verdict = INCONCLUSIVE
            if j.smallest_p >= t:
                j.reason = (f"these seeds cannot show it: the smallest p they can give is "
                            f"{_p(j.smallest_p)}, not below {t:.2g}, {holm_text}")
            elif j.p < t:
                j.reason = f"p = {_p(j.p)}, but Holm stopped at a claim with a larger p"
            else:
                short = sum(c.p_claimed >= t for c in j.comparisons)
                at = f" at {short} of {k} values" if k > 1 else ""
                j.reason = f"p = {_p(j.p)}, not below {t:.2g}{at}, {holm_text}"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def judge(claim: Claim, runs: Sequence[Run], group_keys: Sequence[str] = ()
          ) -> Judgement | NotJudged:
    """Judge ``claim`` on ``runs`` (those that carry it); its verdict comes from :func:`decide`."""
    runs = [run for run in runs if run.config]
    known = {k for run in runs for k in run.config}

    def key_of(name: str) -> str | None:  # "norm" means norm.name, as on the command line
        return name if name in known else f"{name}.name" if f"{name}.name" in known else None

    change_from, change_to = claim.change or ({}, {})
    names = [*claim.better, *claim.than, *claim.where, *change_from,
             *([claim.along] if claim.along else [])]
    unknown = [n for n in names if key_of(n) is None]
    if unknown:
        return _not_judged(claim, f"no run has the config key {', '.join(unknown)}")

    def resolve(selector: dict[str, Any]) -> dict[str, Any]:
        return {key_of(n): v for n, v in selector.items()}

    better, than, where = resolve(claim.better), resolve(claim.than), resolve(claim.where)
    change_from, change_to = resolve(change_from), resolve(change_to)
    along = key_of(claim.along) if claim.along else None
    runs = [run for run in runs if _matches(run.config, where)]
    selecting = set(better) | set(than) | set(change_from)
    keys = list(dict.fromkeys([*comparable_keys(runs), *group_keys, *selecting,
                               *([along] if along else [])]))
    others = [k for k in keys if k not in selecting]
    groups = make_groups(runs, keys)
    shown: dict[tuple, tuple] = {}  # a cell's comparable values -> the values as configs hold them

    def cells(selector: dict[str, Any]) -> dict[tuple, list[Run]]:
        """The runs matching ``selector``, by their values of the other keys."""
        found: dict[tuple, list[Run]] = {}
        for g in groups:
            config = dict(zip(keys, g.values, strict=True))
            if _matches(config, selector):
                cell = tuple(value_key(config[k]) for k in others)
                shown.setdefault(cell, tuple(config[k] for k in others))
                found.setdefault(cell, []).extend(g.runs)
        return found

    if claim.kind == INTERACTION:
        parts = {f"{_label(s)} at {_label(c)}": cells({**s, **c})
                 for s in (better, than) for c in (change_from, change_to)}
    else:
        parts = {_label(better): cells(better), **({_label(than): cells(than)} if than else {})}
    for label, found in parts.items():
        if not found:
            return _not_judged(claim, f"no runs with {label}")
    everywhere = sorted(set().union(*parts.values()))
    wanted = where.get(along) if along else None
    for label, found in parts.items():
        for cell in everywhere:
            if cell not in found:
                at = _label(dict(zip(others, shown[cell], strict=True)))
                return _not_judged(claim, f"no runs with {label} at {at}")
        if wanted is not None:  # along the values where names, all of them
            held = {cell[others.index(along)] for cell in found}
            lacking = [v for v in (wanted if isinstance(wanted, list) else [wanted])
                       if value_key(v) not in held]
            if lacking:
                return _not_judged(claim, f"no runs with {label} at {display_key(along)}="
                                          f"{', '.join(display_value(v) for v in lacking)}")
    varying = [i for i in range(len(others)) if len({cell[i] for cell in everywhere}) > 1]
    comparisons = []
    for cell in everywhere:
        label = _label({others[i]: shown[cell][i] for i in varying})
        result = compare(claim, label, [found[cell] for found in parts.values()],
                         list(parts))
        if isinstance(result, str):
            return _not_judged(claim, result)
        comparisons.append(result)
    return Judgement(claim, comparisons)


def compare(claim: Claim, label: str, cells: list[list[Run]], names: list[str]) -> Comparison | str:
    """One comparison from the runs of each part (better, than; or better and than at from and
    to); a string says why it cannot be judged."""
    runs = [run for cell in cells for run in cell]
    r = max(resolution(claim, runs, metric) for metric in claim.metrics)
    higher = claim.direction == "higher"
    if claim.kind == INTERACTION:
        better, than = (changes(claim, names[i], cells[i], cells[i + 1]) for i in (0, 2))
        better.label, than.label = _label(claim.better), _label(claim.than)
    else:
        better = side_of(claim, names[0], cells[0])
        than = side_of(claim, names[1], cells[1]) if len(cells) > 1 else None
    for side in (better, than):
        if side is not None and side.n == 0:
            what = "seed with runs at both from and to" if claim.kind == INTERACTION else \
                f"completed or diverged run with {' and '.join(claim.metrics)}"
            where = f" at {label}" if label else ""
            return f"{side.label}{where}: no {what}{_fmt_excluded(side)}"
    c = Comparison(label, better, than, r)
    if claim.kind == PAIRED:
        c.p_claimed, c.p_opposite = paired_p(better.values, r, higher)
        c.smallest_p = smallest_p(PAIRED, better.n, 0)
        return c
    a, b = better.values, than.values
    if claim.kind == EQUIVALENCE:
        m = claim.margin
        above_low = two_sample_p(a, b, r, True, shift=m)  # a + m vs b: is a - b > -m?
        below_high = two_sample_p(a, b, r, True, shift=-m)  # a - m vs b: is a - b < m?
        c.p_claimed = max(above_low[0], below_high[1])
        c.p_opposite = min(1.0, 2 * min(below_high[0], above_low[1]))
    else:
        c.p_claimed, c.p_opposite = two_sample_p(a, b, r, higher)
    c.smallest_p = smallest_p(claim.kind, better.n, than.n)
    return c


def side_of(claim: Claim, label: str, runs: Sequence[Run]) -> Side:
    """A side's values: one per judged run (a paired claim: the run's metric minus than_metric)."""
    side = Side(label)
    for run in sorted(runs, key=lambda run: (value_key(run.seed), str(run.path))):
        if run.status not in JUDGED_STATUSES:
            side.excluded[run.status] = side.excluded.get(run.status, 0) + 1
            continue
        value = run_value(run, claim)
        if claim.kind == PAIRED and value is not None:
            other = run_value(run, claim, claim.than_metric)
            value = None if other is None else difference(value, other)
        if value is None:
            side.no_value += 1
        else:
            side.values.append(value)
    return side


def changes(claim: Claim, label: str, start: Sequence[Run], end: Sequence[Run]) -> Side:
    """Per seed, the value at ``to`` minus the one at ``from`` (an interaction's side)."""
    ends = [side_of(claim, label, cell) for cell in (start, end)]
    side = Side(label, excluded=ends[0].excluded, no_value=ends[0].no_value + ends[1].no_value)
    for status, n in ends[1].excluded.items():
        side.excluded[status] = side.excluded.get(status, 0) + n
    at_start = {value_key(v.seed): v for v in ends[0].values}
    at_end = {value_key(v.seed): v for v in ends[1].values}
    for seed in sorted(set(at_start) | set(at_end)):
        if seed in at_start and seed in at_end:
            side.values.append(difference(at_end[seed], at_start[seed]))
        else:
            side.unpaired += 1
    return side


def difference(x: Value, y: Value) -> Value:
    """x - y; two worst values (both diverged) differ by nothing."""
    d = x.x - y.x
    notes = " and ".join(dict.fromkeys(n for n in (x.note, y.note) if n))
    return Value(0.0 if math.isnan(d) else d, note=notes, seed=x.seed)


def _fmt_excluded(side: Side) -> str:
    parts = [f"{n} {status}" for status, n in sorted(side.excluded.items())]
    if side.no_value:
        parts.append(f"{side.no_value} without the metric")
    return f" ({', '.join(parts)})" if parts else ""


def _matches(config: dict[str, Any], selector: dict[str, Any]) -> bool:
    """Whether the config has every value of ``selector`` (a list there means any of them)."""
    for key, wanted in selector.items():
        options = wanted if isinstance(wanted, list) else [wanted]
        if value_key(config.get(key, MISSING)) not in {value_key(o) for o in options}:
            return False
    return True


def _label(selector: dict[str, Any]) -> str:
    return ", ".join(f"{display_key(k)}={display_value(v)}" for k, v in selector.items())


def _not_judged(claim: Claim, reason: str) -> NotJudged:
    return NotJudged(claim.id, claim.text, claim.source, reason)
