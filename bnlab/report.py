"""``bnlab report``: compare runs -- which variant converged faster, by how much, over how many seeds.

Runs are read only through the run directory contract (:mod:`bnlab.runs`). Runs whose config
differs only in ``seed`` (and bookkeeping keys) form a group; each group's numbers are the mean
and sample standard deviation over its completed runs (its seeds). Output: a table on the
terminal, and in the output folder ``report.md`` (tables and figures), ``summary.csv`` (one row
per group) and PNG figures.

matplotlib is imported only when drawing, and torch never: ``bnlab report --help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.errors import UserError
from bnlab.runs import NO_SUMMARY, Run, Series, find_runs, load_scalars

# Config keys that never make two runs different experiments.
IGNORED_KEYS = {"seed", "device", "resume", "train.progress", "train.threads", "data.root",
                "data.download"}
# The tags a report reads; everything else in scalars.csv is skipped unparsed.
REPORT_TAGS = ("test/acc", "test/loss", "train/loss", "perf/steps_per_s",
               "drift/layer*/norm/mean", "drift/layer*/pre/mean", "sat/layer*", "pct/layer*",
               "ics/layer*", "landscape/*", "batchnoise/layer*")
AUTO = "auto"
MISSING = object()

DESCRIPTION = """Compare runs: a table per group of runs that differ only in seed, report.md,
summary.csv and PNG figures.

Groups are formed by the config keys whose values differ between runs (seed, device,
train.threads, train.progress, resume, data.root and data.download are ignored), or by --by.
Numbers are mean ± sample standard deviation over each group's completed runs; diverged,
failed, interrupted, running and damaged runs are counted and listed, never averaged."""

EPILOG = """columns:
  completed/runs  completed runs / all runs of the group, then what happened to the others
  final, best     test accuracy at the last evaluation, and the highest over evaluations
  steps to ...    first evaluated step where --metric reaches --target (>= for accuracies,
                  <= for losses); mean over the seeds that reached it, "k/n" when not all did
  train/loss      final train/loss: the mean over the steps since the log step before the last
  drift Lk        mean over probes of drift/layerK/<point>/mean: RMS over units of the shift of
                  the unit's mean since the previous probe, in previous standard deviations, at
                  the nonlinearity input (<point> = norm for norm.position=before_act, pre after)
  saturation Lk   fraction of saturated nonlinearity inputs at the last probe (sat/layerK)
  wall, steps/s   wall time of the run (summary.json) and mean training speed (perf/steps_per_s)

--target auto: the best --metric value that every completed run reached (the lowest of their
best values), so every variant is timed to the same accuracy, as Ioffe & Szegedy (2015,
Table 2) timed each variant to the best accuracy of the baseline.

examples:
  bnlab report outputs/multirun/2026-11-26/14-03-11-ab12cd
  bnlab report outputs --by norm,activation --target 0.95
  bnlab report sweep --metric test/loss --target 0.3 --out /tmp/report"""


# ---------------------------------------------------------------- grouping
def comparable_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between ``runs`` and that split them into new groups.

    Keys named in the runs' overrides come first (``norm`` before ``norm.momentum``); a key is
    kept only when it splits some group the keys before it left together, so ``norm.momentum``
    (set by ``norm=bn``, absent under ``norm=none``) does not repeat what ``norm`` says.
    """
    configs = [run.config for run in runs if run.config]
    keys = {k for cfg in configs for k in cfg if k not in IGNORED_KEYS}
    differing = {k for k in keys if len({_value_key(cfg.get(k, MISSING)) for cfg in configs}) > 1}
    ordered = [k for k in _override_keys(runs, keys) if k in differing]
    # Then group choices (``X.name``) before the options they bring, then the rest by name.
    ordered += sorted(differing - set(ordered), key=lambda k: (not k.endswith(".name"), k))
    kept: list[str] = []
    partition = 1  # no key: every run in one group
    for key in ordered:
        finer = len({tuple(_value_key(cfg.get(k, MISSING)) for k in [*kept, key])
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


def resolve_keys(names: Sequence[str], runs: Sequence[Run]) -> list[str]:
    """``--by`` names to config keys (``norm`` means ``norm.name``); UserError for unknown ones."""
    known = {k for run in runs for k in run.config}
    keys = []
    for name in names:
        if name in known:
            keys.append(name)
        elif f"{name}.name" in known:
            keys.append(f"{name}.name")
        else:
            differing = ", ".join(display_key(k) for k in comparable_keys(runs)) or "none"
            raise UserError(f"--by {name}: no run has this config key "
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


def _value_key(value: Any) -> Any:
    # Hashable and comparable across types, for sets and sorting (MISSING sorts first).
    if value is MISSING:
        return (0, "")
    if isinstance(value, bool) or value is None:
        return (1, str(value))
    if isinstance(value, (int, float)):
        return (2, float(value))
    return (3, str(value))


# ---------------------------------------------------------------- per-run numbers
@dataclass
class RunStats:
    """The numbers of one run, read from its scalars and summary."""

    final_acc: float | None = None
    best_acc: float | None = None
    target_step: int | None = None  # None: the run never reached the target
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


def run_stats(run: Run, metric: str, target: float) -> RunStats:
    scalars = run.scalars
    acc = scalars.get("test/acc")
    stats = RunStats(final_acc=_last(acc),
                     best_acc=float(np.nanmax(acc.values)) if acc is not None else None,
                     final_train_loss=_last(scalars.get("train/loss")))
    if metric in scalars:
        stats.target_step = first_step_reaching(scalars[metric], target, higher_is_better(metric))
    point = nonlinearity_point(run)
    for layer, tag in layer_tags(scalars, "drift/layer{K}/" + point + "/mean").items():
        mean = _finite_mean(scalars[tag].values)
        if mean is not None:
            stats.drift[layer] = mean
    for layer, tag in layer_tags(scalars, "sat/layer{K}").items():
        stats.saturation[layer] = _last(scalars[tag])
    if "perf/steps_per_s" in scalars:
        stats.steps_per_s = _finite_mean(scalars["perf/steps_per_s"].values)
    wall = run.summary.get("wall_s")
    stats.wall_s = float(wall) if isinstance(wall, (int, float)) else None
    return stats


def auto_target(runs: Sequence[Run], metric: str) -> float | None:
    """The best value of ``metric`` that every run reached: the worst of the runs' best values."""
    up = higher_is_better(metric)
    bests = []
    for run in runs:
        series = run.scalars.get(metric)
        if series is not None and np.isfinite(series.values).any():
            bests.append(np.nanmax(series.values) if up else np.nanmin(series.values))
    if not bests:
        return None
    return float(min(bests) if up else max(bests))


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
                                  key=lambda item: tuple(_value_key(v) for v in item[0])):
        label = ", ".join(f"{display_key(k)}={display_value(v)}" for k, v in zip(keys, values, strict=True))
        members.sort(key=lambda run: (_value_key(run.seed), str(run.path)))
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

    @property
    def excluded(self) -> list[Run]:
        return [run for run in self.runs if run.status != "completed"]


def build_report(runs: list[Run], roots: list[Path], by: Sequence[str] | None = None,
                 metric: str = "test/acc", target: float | str = AUTO) -> Report:
    """Group ``runs``, choose the target, and compute every completed run's numbers."""
    keys = resolve_keys(by, runs) if by else comparable_keys(runs)
    # A run without a readable config belongs to no group; it is listed with the others.
    groups = make_groups([run for run in runs if run.config], keys)
    completed = [run for run in runs if run.status == "completed"]
    if completed and not any(metric in run.scalars for run in completed):
        raise UserError(f"--metric {metric}: no completed run logged this tag "
                        "(for example test/acc, test/loss or train/loss)")
    if target == AUTO:
        value = auto_target(completed, metric)
        better = "highest" if higher_is_better(metric) else "lowest"
        note = (f"auto: the {better} {metric} that every completed run reached"
                if value is not None else f"auto: no completed run logged {metric}")
    else:
        value, note = float(target), "given with --target"
    for group in groups:
        group.stats = [run_stats(run, metric, value if value is not None else math.nan)
                       for run in group.completed]
    layers = sorted({layer for g in groups for s in g.stats
                     for layer in [*s.drift, *s.saturation]})
    return Report(roots, runs, keys, groups, metric, value, note, layers)


def main(argv: list[str]) -> int:
    """``bnlab report PATH... [--out DIR] [--by KEY,...] [--metric TAG] [--target VALUE]``."""
    args = parse_args(argv)
    try:
        runs = find_runs(args.paths)
        if not runs:
            where = " ".join(args.paths)
            print(f"bnlab: error: no runs under {where} (a run directory holds .hydra/config.yaml)",
                  file=sys.stderr)
            return 2
        load_scalars(runs, tags=[*REPORT_TAGS, args.metric])
        roots = [Path(p).expanduser().resolve() for p in args.paths]
        report = build_report(runs, roots, args.by, args.metric, args.target)
        out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
        out.mkdir(parents=True, exist_ok=True)
        figures = draw_figures(report, out)
        write_summary_csv(report, out / "summary.csv")
        (out / "report.md").write_text(render_markdown(report, figures))
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output folder that cannot be written
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2
    print_terminal(report, out, figures)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bnlab report", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run directories, sweep directories or a whole outputs/ tree")
    parser.add_argument("--out", metavar="DIR",
                        help="where report.md, summary.csv and figures go (default: PATH/report)")
    parser.add_argument("--by", metavar="KEY,...", type=_key_list,
                        help="group by these config keys (default: the keys that differ)")
    parser.add_argument("--metric", default="test/acc", metavar="TAG",
                        help="the tag timed by 'steps to target' (default: test/acc)")
    parser.add_argument("--target", default=AUTO, type=_target, metavar="VALUE",
                        help="the value of --metric to reach (default: auto, see below)")
    return parser.parse_args(argv)


def _key_list(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise argparse.ArgumentTypeError("expected config keys separated by commas, e.g. norm,seed")
    return keys


def _target(text: str) -> float | str:
    if text == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# ---------------------------------------------------------------- numbers as text
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.{digits - 1}g}"
    return f"{value:.{digits}f}"


def _fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    return _fmt(mean, digits) if std is None else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _fmt_steps(group: Group) -> str:
    steps, n = group.reached()
    if n == 0:
        return "—"
    if not steps:
        return f"not reached (0/{n})"
    mean, std = mean_std(steps)
    text = f"{mean:,.0f}" if std is None else f"{mean:,.0f} ± {std:,.0f}"
    return text if len(steps) == n else f"{text} ({len(steps)}/{n})"


def _fmt_layers(group: Group, name: str, layers: list[int], fmt: str) -> str:
    """Each layer's mean over seeds, ``L1 / L2 / ...``."""
    values = group.layer_values(name)
    if not values:
        return "—"
    return " / ".join(format(mean_std(values[k])[0], fmt) if k in values else "—"
                      for k in layers)


def _fmt_runs(group: Group) -> str:
    counts = group.counts()
    done = counts.pop("completed", 0)
    others = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{done}/{len(group.runs)}" + (f" ({others})" if others else "")


def _fmt_mean(values: Sequence[float], fmt: str) -> str:
    mean = mean_std(values)[0]
    return "—" if mean is None else format(mean, fmt)


def target_text(report: Report) -> str:
    if report.target is None:
        return f"{report.metric}: no target"
    op = "≥" if higher_is_better(report.metric) else "≤"
    return f"{report.metric} {op} {report.target:.4g}"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the group table, shared by the terminal and report.md."""
    layers = "/".join(f"L{k}" for k in report.layers)
    header = ["group", "completed/runs", "final test/acc", "best test/acc",
              f"steps to {target_text(report)}", "final train/loss",
              f"drift {layers}".strip(), f"saturation {layers}".strip(), "wall (s)", "steps/s"]
    rows = []
    for g in report.groups:
        rows.append([
            g.label, _fmt_runs(g), _fmt_mean_std(g.values_of("final_acc")),
            _fmt_mean_std(g.values_of("best_acc")), _fmt_steps(g),
            _fmt_mean_std(g.values_of("final_train_loss"), 4),
            _fmt_layers(g, "drift", report.layers, ".3g"),
            _fmt_layers(g, "saturation", report.layers, ".3f"),
            _fmt_mean(g.values_of("wall_s"), ",.1f"), _fmt_mean(g.values_of("steps_per_s"), ",.0f"),
        ])
    return header, rows


def headline(report: Report) -> str:
    """One sentence: which group reached the target first, and by how much."""
    if report.target is None:
        return f"No completed run logged {report.metric}."
    timed = []
    never = []
    for g in report.groups:
        steps, n = g.reached()
        if steps:
            timed.append((mean_std(steps)[0], g, len(steps), n))
        elif n:
            never.append(g.label)
    parts = []
    if timed:
        timed.sort(key=lambda item: item[0])
        best, slow = timed[0], timed[-1]
        parts.append(f"Fastest to {target_text(report)}: {best[1].label}, {best[0]:,.0f} steps "
                     f"(mean over {best[2]}/{best[3]} seeds)")
        if len(timed) > 1 and best[0] > 0:
            parts[-1] += (f", {slow[0] / best[0]:.2g}x fewer than {slow[1].label} "
                          f"({slow[0]:,.0f} steps)")
        parts[-1] += "."
    if never:
        parts.append(f"Never reached it: {', '.join(never)}.")
    return " ".join(parts) or "No group has a completed run."


def describe(report: Report) -> str:
    """What was compared: runs, groups and their keys, seeds."""
    seeds = sorted({run.seed for run in report.runs if run.seed is not None}, key=_value_key)
    keys = ", ".join(display_key(k) for k in report.keys) or "nothing (one group)"
    if len(seeds) > 10:
        seed_text = f"{len(seeds)} seeds averaged within each group"
    elif len(seeds) > 1:
        seed_text = f"seeds {', '.join(map(str, seeds))} averaged within each group"
    else:
        seed_text = f"one seed ({seeds[0] if seeds else '—'})"
    return (f"{len(report.runs)} runs in {len(report.groups)} group(s) differing in {keys}; "
            f"{seed_text} (mean ± sample std over completed runs).")


def excluded_rows(report: Report) -> list[list[str]]:
    """Runs not averaged: their status and what happened (error, divergence, damage)."""
    root = report.roots[0] if len(report.roots) == 1 else None
    rows = []
    for run in report.excluded:
        detail = []
        summary = run.summary
        if summary.get("error"):
            detail.append(str(summary["error"]))
        if summary.get("diverged_step") is not None:
            detail.append(f"diverged at step {summary['diverged_step']}")
        if run.status != "failed" and "steps" in summary:
            detail.append(f"{summary['steps']}/{summary.get('total_steps', '?')} steps")
        if run.status == "running" and summary.get("updated"):
            detail.append(f"summary last written {summary['updated']}")  # a stale one: killed
        if run.status == NO_SUMMARY:
            detail.append("no summary.json: the run never started training, or it was removed")
        detail += run.problems
        rows.append([run.name(root), run.status, "; ".join(detail) or "—"])
    return rows


# ---------------------------------------------------------------- outputs
def print_terminal(report: Report, out: Path, figures: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(describe(report))
    console.print(f"Target: {target_text(report)} ({report.target_note}).")
    header, rows = table_rows(report)
    table = Table(*header, title="bnlab report", header_style="bold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(headline(report))
    excluded = excluded_rows(report)
    if excluded:
        listing = Table("run", "status", "what happened", title="Runs not averaged",
                        header_style="bold")
        for row in excluded:
            listing.add_row(*row)
        console.print(listing)
    console.print(f"Wrote {out / 'report.md'}, {out / 'summary.csv'} and {len(figures)} figure(s).",
                  highlight=False)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report, figures: list[tuple[str, str]]) -> str:
    header, rows = table_rows(report)
    roots = ", ".join(f"`{p}`" for p in report.roots)
    parts = [
        "# bnlab report", "",
        f"Runs under {roots}: {describe(report)}", "",
        f"Target: {target_text(report)} ({report.target_note}).", "",
        f"**{headline(report)}**", "",
        _md_table(header, rows), "",
        "Columns: *completed/runs* counts runs by status; *final* and *best test/acc* are the "
        "last and the highest evaluated test accuracy; *steps to* is the first evaluated step "
        "reaching the target, averaged over the seeds that reached it (k/n when not all did); "
        "*drift Lk* is the mean over probes of `drift/layerK/<point>/mean` at each layer's "
        "nonlinearity input (RMS over units of the change of the unit's mean since the previous "
        "probe, in units of its previous standard deviation); *saturation Lk* is `sat/layerK` "
        "at the last probe; *steps/s* is the mean of `perf/steps_per_s`.", "",
    ]
    excluded = excluded_rows(report)
    if excluded:
        parts += ["## Runs not averaged", "",
                  _md_table(["run", "status", "what happened"], excluded), ""]
    if figures:
        parts += ["## Figures", ""]
        for title, name in figures:
            parts += [f"### {title}", "", f"![{title}]({name})", ""]
    parts += ["## All runs", "", _md_table(*run_table(report)), ""]
    return "\n".join(parts)


def run_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per run: group, seed, status and its own numbers."""
    root = report.roots[0] if len(report.roots) == 1 else None
    header = ["run", "group", "seed", "status", "steps", "final test/acc", "best test/acc",
              f"steps to {target_text(report)}", "wall (s)"]
    rows = []
    for g in report.groups:
        stats = dict(zip([id(r) for r in g.completed], g.stats, strict=True))
        for run in g.runs:
            s = stats.get(id(run))
            reached = "—" if s is None else (
                "not reached" if s.target_step is None else f"{s.target_step:,}")
            rows.append([run.name(root), g.label, display_value(run.seed), run.status,
                         str(run.summary.get("steps", "—")),
                         _fmt(s.final_acc) if s else "—", _fmt(s.best_acc) if s else "—",
                         reached, _fmt(s.wall_s, 1) if s else "—"])
    return header, rows


def write_summary_csv(report: Report, path: Path) -> None:
    """One row per group, full precision, for machines: the table's numbers and their spread."""
    key_columns = [display_key(k) for k in report.keys]
    columns = ["group", *key_columns, "runs", "completed", "diverged", "failed", "other",
               "final_test_acc_mean", "final_test_acc_std", "best_test_acc_mean",
               "best_test_acc_std", "metric", "target", "reached", "steps_to_target_mean",
               "steps_to_target_std", "final_train_loss_mean", "final_train_loss_std"]
    columns += [f"drift_layer{k}_mean" for k in report.layers]
    columns += [f"saturation_layer{k}_mean" for k in report.layers]
    columns += ["wall_s_mean", "steps_per_s_mean"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for g in report.groups:
            counts = g.counts()
            steps, n = g.reached()
            drift, sat = g.layer_values("drift"), g.layer_values("saturation")
            row = [g.label, *(display_value(v) for v in g.values), len(g.runs),
                   counts.get("completed", 0), counts.get("diverged", 0), counts.get("failed", 0),
                   len(g.runs) - sum(counts.get(s, 0) for s in ("completed", "diverged", "failed")),
                   *mean_std(g.values_of("final_acc")), *mean_std(g.values_of("best_acc")),
                   report.metric, report.target, f"{len(steps)}/{n}", *mean_std(steps),
                   *mean_std(g.values_of("final_train_loss"))]
            row += [mean_std(drift.get(k, []))[0] for k in report.layers]
            row += [mean_std(sat.get(k, []))[0] for k in report.layers]
            row += [mean_std(g.values_of("wall_s"))[0], mean_std(g.values_of("steps_per_s"))[0]]
            writer.writerow(["" if v is None else v for v in row])


# ---------------------------------------------------------------- figures
def draw_figures(report: Report, out: Path) -> list[tuple[str, str]]:
    """Write the PNG figures; returns ``(title, file name)`` for each one drawn."""
    from bnlab.report_figures import draw_all

    return draw_all(report, out)
