"""The numbers of ``bnlab report``: runs grouped by the config keys that differ, seeds aggregated.

Shared by the report's text (:mod:`bnlab.report.command`), its figures (:mod:`bnlab.report.figures`)
and its claims (:mod:`bnlab.report.claims`); imports neither. Runs whose config differs only in
``seed`` (and bookkeeping keys) form a group; a group's numbers are the mean and sample standard
deviation over its completed runs (its seeds).

numpy only: ``bnlab report --help`` stays fast.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.errors import UserError
from bnlab.rundir.reader import Run, Series

# Config keys that never make two runs different experiments.
IGNORED_KEYS = {"seed", "device", "resume", "train.progress", "train.threads", "data.root",
                "data.download"}
AUTO = "auto"
MISSING = object()


# ---------------------------------------------------------------- grouping
def comparable_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between ``runs`` and that split them into new groups.

    Keys named in the runs' overrides come first (``norm`` before ``norm.momentum``); a key is
    kept only when it splits some group the keys before it left together, so ``norm.momentum``
    (set by ``norm=bn``, absent under ``norm=none``) does not repeat what ``norm`` says.
    """
    configs = [run.config for run in runs if run.config]
    keys = {k for cfg in configs for k in cfg if k not in IGNORED_KEYS}
    differing = {k for k in keys if len({value_key(cfg.get(k, MISSING)) for cfg in configs}) > 1}
    ordered = [k for k in _override_keys(runs, keys) if k in differing]
    # Then group choices (``X.name``) before the options they bring, then the rest by name.
    ordered += sorted(differing - set(ordered), key=lambda k: (not k.endswith(".name"), k))
    kept: list[str] = []
    partition = 1  # no key: every run in one group
    for key in ordered:
        finer = len({tuple(value_key(cfg.get(k, MISSING)) for k in [*kept, key])
                     for cfg in configs})
        if finer > partition:
            kept.append(key)
            partition = finer
    return kept


def _override_keys(runs: Sequence[Run], keys: set[str]) -> list[str]:
    found: dict[str, None] = {}
    for run in runs:
        for override in run.overrides:
            name = override.split("=", 1)[0].lstrip("+~")
            for key in (name, f"{name}.name"):  # ``norm=bn`` sets the group choice norm.name
                if key in keys:
                    found[key] = None
                    break
    return list(found)


def resolve_keys(names: Sequence[str], runs: Sequence[Run], option: str = "--by") -> list[str]:
    """Names to config keys (``norm`` means ``norm.name``); UserError for unknown ones."""
    known = {k for run in runs for k in run.config}
    keys = []
    for name in names:
        if name in known:
            keys.append(name)
        elif f"{name}.name" in known:
            keys.append(f"{name}.name")
        else:
            differing = ", ".join(display_key(k) for k in comparable_keys(runs)) or "none"
            raise UserError(f"{option} {name}: no run has this config key "
                            f"(keys that differ between these runs: {differing})")
    return keys


def display_key(key: str) -> str:
    """``norm.name`` is written ``norm``, as in the override ``norm=bn`` that chose it."""
    return key[: -len(".name")] if key.endswith(".name") else key


def display_value(value: Any) -> str:
    if value is MISSING:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(display_value(v) for v in value) + "]"
    return str(value)


def value_key(value: Any) -> Any:
    """Hashable and comparable across types, for sets and sorting (MISSING sorts first);
    equal for equal numbers of either type (``1`` and ``1.0``)."""
    if value is MISSING:
        return (0, "")
    if isinstance(value, bool) or value is None:
        return (1, str(value))
    if isinstance(value, (int, float)):
        return (2, float(value))
    return (3, str(value))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- per-run numbers
@dataclass
class RunStats:
    """The numbers of one run, read from its scalars and summary."""

    final_acc: float | None = None
    best_acc: float | None = None
    final_metric: float | None = None  # --metric at the last evaluation
    best_metric: float | None = None  # its best value (highest, or lowest for a loss)
    target_step: int | None = None  # None: the run never reached the target
    eval_interval: int | None = None  # steps between the evaluations of --metric
    final_train_loss: float | None = None
    drift: dict[int, float] = field(default_factory=dict)  # layer -> mean over probes
    saturation: dict[int, float] = field(default_factory=dict)  # layer -> last probe
    wall_s: float | None = None
    steps_per_s: float | None = None


def higher_is_better(metric: str) -> bool:
    return not metric.rsplit("/", 1)[-1].endswith("loss")


def first_step_reaching(series: Series, target: float, up: bool = True) -> int | None:
    """The first logged step where the value is >= ``target`` (``up``) or <= it, else None."""
    hit = series.values >= target if up else series.values <= target
    index = np.flatnonzero(hit)
    return int(series.steps[index[0]]) if len(index) else None


def nonlinearity_point(run: Run) -> str:
    """The probe point that feeds the activation: the norm's output before_act, ``pre`` after."""
    return "pre" if run.config.get("norm.position") == "after_act" else "norm"


# The network whose probes the report's drift and saturation read: the inference network
# (probe.mode=eval or both: running statistics, which can drift) where every run logged it, else
# the training network. In train mode a batch-statistics norm's output has per-unit mean beta and
# variance gamma^2 by construction, so its drift there tracks gamma and beta only.
INFERENCE, TRAIN_MODE = "infer/", ""
VIEW_NAMES = {INFERENCE: "inference network", TRAIN_MODE: "train mode"}


def probe_view(runs: Sequence[Run]) -> str:
    """The tag prefix of the view to report: INFERENCE when every completed run that logged
    drift logged the inference network's, else TRAIN_MODE (one view for all: comparable)."""
    probed = [run for run in runs if run.status == "completed"
              and any(tag.startswith(("drift/", "infer/drift/")) for tag in run.scalars)]
    inference = all(any(tag.startswith("infer/drift/") for tag in run.scalars) for run in probed)
    return INFERENCE if probed and inference else TRAIN_MODE


def layer_tags(scalars: dict[str, Series], pattern: str) -> dict[int, str]:
    """``{K: tag}`` for tags matching ``pattern`` with ``{K}`` for the layer number."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{K\}", r"(\d+)") + "$")
    found = {}
    for tag in scalars:
        match = regex.match(tag)
        if match:
            found[int(match.group(1))] = tag
    return dict(sorted(found.items()))


def _last(series: Series | None) -> float | None:
    return float(series.values[-1]) if series is not None and len(series.values) else None


def _finite_mean(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def best_of(series: Series | None, up: bool = True) -> float | None:
    """The highest (``up``) or lowest finite value of a series; None when it has none."""
    if series is None or not np.isfinite(series.values).any():
        return None
    return float(np.nanmax(series.values) if up else np.nanmin(series.values))


def run_stats(run: Run, metric: str, target: float, view: str = TRAIN_MODE) -> RunStats:
    """``view``: the probes' tag prefix that drift and saturation are read from (:func:`probe_view`)."""
    scalars = run.scalars
    acc = scalars.get("test/acc")
    stats = RunStats(final_acc=_last(acc), best_acc=best_of(acc),
                     final_train_loss=_last(scalars.get("train/loss")))
    if metric in scalars:
        series, up = scalars[metric], higher_is_better(metric)
        stats.final_metric, stats.best_metric = _last(series), best_of(series, up)
        stats.target_step = first_step_reaching(series, target, up)
        if len(series.steps) > 1:
            stats.eval_interval = int(np.diff(series.steps).max())
    point = nonlinearity_point(run)
    for layer, tag in layer_tags(scalars, view + "drift/layer{K}/" + point + "/mean").items():
        mean = _finite_mean(scalars[tag].values)
        if mean is not None:
            stats.drift[layer] = mean
    for layer, tag in layer_tags(scalars, view + "sat/layer{K}").items():
        stats.saturation[layer] = _last(scalars[tag])
    if "perf/steps_per_s" in scalars:
        stats.steps_per_s = _finite_mean(scalars["perf/steps_per_s"].values)
    wall = run.summary.get("wall_s")
    stats.wall_s = float(wall) if isinstance(wall, (int, float)) else None
    return stats


def auto_target(groups: Sequence[Group], metric: str) -> float | None:
    """The median over groups of each group's median (over its completed runs) best ``metric``.

    Medians, so that a group that never learned, or one seed stuck at chance, moves the target
    by one rank instead of dragging it to its own level; half of the groups reach it.
    """
    up = higher_is_better(metric)
    medians = []
    for group in groups:
        bests = [b for run in group.completed
                 if (b := best_of(run.scalars.get(metric), up)) is not None]
        if bests:
            medians.append(float(np.median(bests)))
    return float(np.median(medians)) if medians else None


# ---------------------------------------------------------------- groups
@dataclass
class Group:
    """Runs with the same values of the group keys; numbers over the completed ones."""

    values: tuple  # one per group key
    label: str
    runs: list[Run]
    stats: list[RunStats] = field(default_factory=list)  # one per completed run

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.status == "completed"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    def values_of(self, name: str) -> list[float]:
        return [v for s in self.stats if (v := getattr(s, name)) is not None and math.isfinite(v)]

    def layer_values(self, name: str) -> dict[int, list[float]]:
        layers: dict[int, list[float]] = {}
        for s in self.stats:
            for layer, v in getattr(s, name).items():
                if v is not None and math.isfinite(v):
                    layers.setdefault(layer, []).append(v)
        return dict(sorted(layers.items()))

    def reached(self) -> tuple[list[int], int]:
        """Steps of the runs that reached the target, and how many completed runs there are."""
        return [s.target_step for s in self.stats if s.target_step is not None], len(self.stats)


def make_groups(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    by_values: dict[tuple, list[Run]] = {}
    for run in runs:
        values = tuple(run.config.get(k, MISSING) for k in keys)
        by_values.setdefault(values, []).append(run)
    groups = []
    for values, members in sorted(by_values.items(),
                                  key=lambda item: tuple(value_key(v) for v in item[0])):
        label = ", ".join(f"{display_key(k)}={display_value(v)}" for k, v in zip(keys, values, strict=True))
        members.sort(key=lambda run: (value_key(run.seed), str(run.path)))
        groups.append(Group(values=values, label=label or "all runs", runs=members))
    return groups


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


# ---------------------------------------------------------------- the report
@dataclass
class Report:
    roots: list[Path]
    runs: list[Run]
    keys: list[str]
    groups: list[Group]
    metric: str
    target: float | None
    target_note: str
    layers: list[int]
    axis: Axis | None = None  # --metric against one swept key (--x, or the one numeric key)
    view: str = TRAIN_MODE  # the probes' tag prefix of drift and saturation (probe_view)

    @property
    def excluded(self) -> list[Run]:
        return [run for run in self.runs if run.status != "completed"]


def build_report(runs: list[Run], roots: list[Path], by: Sequence[str] | None = None,
                 metric: str | None = None, target: float | str = AUTO,
                 x: str | None = None) -> Report:
    """Group ``runs``, choose the target, and compute every completed run's numbers.

    ``metric`` None: ``test/acc``, or ``test/loss`` for runs without accuracy (a regression).
    ``x`` names a key to plot ``metric`` against (it joins the group keys if it varies but
    does not split the groups further); without it, the one numeric group key, if there is one.
    """
    keys = resolve_keys(by, runs) if by else comparable_keys(runs)
    x_key = None
    if x is not None:
        x_key = resolve_keys([x], runs, "--x")[0]
        if x_key not in keys:
            seen = {value_key(run.config.get(x_key, MISSING)) for run in runs if run.config}
            if len(seen) < 2:
                differing = ", ".join(display_key(k) for k in comparable_keys(runs)) or "none"
                raise UserError(f"--x {x}: every run has the same value of this key "
                                f"(keys that differ between these runs: {differing})")
            keys = [*keys, x_key]
    # A run without a readable config belongs to no group; it is listed with the others.
    groups = make_groups([run for run in runs if run.config], keys)
    completed = [run for run in runs if run.status == "completed"]
    if metric is None:
        regression = completed and not any("test/acc" in run.scalars for run in completed)
        metric = "test/loss" if regression else "test/acc"
    if completed and not any(metric in run.scalars for run in completed):
        raise UserError(f"--metric {metric}: no completed run logged this tag "
                        "(for example test/acc, test/loss or train/loss)")
    if target == AUTO:
        value = auto_target(groups, metric)
        note = (f"auto: the median over groups of each group's median best {metric}"
                if value is not None else f"auto: no completed run logged {metric}")
    else:
        value, note = float(target), "given with --target"
    view = probe_view(runs)
    for group in groups:
        group.stats = [run_stats(run, metric, value if value is not None else math.nan, view)
                       for run in group.completed]
    layers = sorted({layer for g in groups for s in g.stats
                     for layer in [*s.drift, *s.saturation]})
    x_key = x_key or numeric_key(keys, groups)
    axis = sweep_axis(keys, groups, x_key) if x_key else None
    return Report(roots, runs, keys, groups, metric, value, note, layers, axis, view)


# ---------------------------------------------------------------- a metric against a swept key
@dataclass
class Axis:
    """``--metric`` against the values of one swept key: one line per group of the other keys."""

    key: str
    values: list[Any]  # the key's values, in order
    lines: list[tuple[str, dict[Any, Group]]]  # (the other keys' values, {value_key(x): group})

    @property
    def numeric(self) -> bool:
        return all(is_number(v) for v in self.values)

    @property
    def log(self) -> bool:
        """A log axis when the values are positive numbers spanning 10x or more."""
        return (self.numeric and min(self.values) > 0
                and max(self.values) / min(self.values) >= 10)

    def group(self, line: dict[Any, Group], value: Any) -> Group | None:
        return line.get(value_key(value))


def numeric_key(keys: Sequence[str], groups: Sequence[Group]) -> str | None:
    """The group key whose values are all numbers, when exactly one is (else None)."""
    numeric = [k for i, k in enumerate(keys)
               if groups and all(is_number(g.values[i]) for g in groups)]
    return numeric[0] if len(numeric) == 1 else None


def sweep_axis(keys: Sequence[str], groups: Sequence[Group], key: str) -> Axis:
    index = keys.index(key)
    values: dict[Any, Any] = {}
    lines: dict[tuple, tuple[str, dict[Any, Group]]] = {}
    for g in groups:  # sorted by their values: lines and values come out in order
        x = g.values[index]
        values.setdefault(value_key(x), x)
        others = [(k, v) for i, (k, v) in enumerate(zip(keys, g.values, strict=True)) if i != index]
        label = ", ".join(f"{display_key(k)}={display_value(v)}" for k, v in others) or "all runs"
        line = lines.setdefault(tuple(value_key(v) for _, v in others), (label, {}))
        line[1][value_key(x)] = g
    ordered = [values[k] for k in sorted(values)]
    return Axis(key, ordered, list(lines.values()))


def axis_figure_name(metric: str, key: str) -> str:
    """``test_acc_vs_train.batch_size.png``: the metric with ``/`` written ``_``."""
    return f"{metric.replace('/', '_')}_vs_{display_key(key)}.png"
