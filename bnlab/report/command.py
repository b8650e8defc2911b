"""``bnlab report``: compare runs -- which variant converged faster, by how much, over how many
seeds, and whether the preset's claims hold.

Runs are read only through the run directory contract (:mod:`bnlab.rundir.reader`); their numbers come
from :mod:`bnlab.report.data`, the claims' verdicts from :mod:`bnlab.report.claims`. Output: tables on
the terminal, and in the output folder ``report.md`` (tables and figures), ``summary.csv`` (one
row per group), ``pivot.csv`` (a metric against a swept key), ``claims.csv`` and PNG figures.

matplotlib is imported only when drawing, and torch never: ``bnlab report --help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from bnlab.errors import UserError
from bnlab.report.claims import (
    ALPHA,
    EQUIVALENCE,
    INCONCLUSIVE,
    INTERACTION,
    NOT_JUDGED,
    NOT_REPRODUCED,
    PAIRED,
    REPRODUCED,
    Judgement,
    NotJudged,
    Side,
    claim_metrics,
    judge_all,
)
from bnlab.report.data import (
    AUTO,
    INFERENCE,
    VIEW_NAMES,
    Group,
    Report,
    axis_figure_name,
    build_report,
    display_key,
    display_value,
    higher_is_better,
    mean_std,
    value_key,
)
from bnlab.rundir.lock import KILLED
from bnlab.rundir.reader import NO_SUMMARY, find_runs, load_scalars

# The tags a report reads; everything else in scalars.csv is skipped unparsed.
REPORT_TAGS = ("test/acc", "test/loss", "train/loss", "perf/steps_per_s",
               "drift/layer*/norm/mean", "drift/layer*/pre/mean", "sat/layer*", "pct/layer*",
               "infer/drift/layer*/norm/mean", "infer/drift/layer*/pre/mean", "infer/sat/layer*",
               "ics/layer*", "landscape/*", "batchnoise/layer*")

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
                  Both read the inference network (infer/...) when every run logged it
                  (probe.mode=eval or both), else train mode, and say which. In train mode a
                  batch-statistics norm's output has mean beta and variance gamma^2 by
                  construction: its drift there tracks gamma and beta only.
  wall, steps/s   wall time of the run (summary.json) and mean training speed (perf/steps_per_s)

--target auto: the median over groups of each group's median best --metric (over its seeds):
a group that never learned moves it by one rank, not down to chance. Groups whose mean steps
differ by less than one evaluation interval are reported as a tie.

--x KEY: the final and best --metric against the values of KEY, one line per group of the
other keys (mean over seeds, band min to max; a log axis when the values span 10x or more),
in <metric>_vs_<KEY>.png and a pivot table (report.md, pivot.csv). Drawn without --x when
exactly one group key is numeric.

claims: a preset's claims (its top-level claims: list, kept in each run's .hydra/config.yaml)
are judged on the runs that carry them by exact permutation tests on the per-run values (ties
within the metric's resolution, diverged runs worst, runs that never reach a target censored
at their budget), with Holm's procedure over the claims at 0.05: reproduced, not reproduced,
inconclusive, or not judged (a side or a swept value has no runs). 5 seeds per group let
complete separation pass for up to 12 claims (3 seeds never can: p >= 1/20).

examples:
  bnlab report outputs/multirun/2026-11-26/14-03-11-ab12cd
  bnlab report outputs --by norm,activation --target 0.95
  bnlab report sweep --metric test/loss --target 0.3 --out /tmp/report
  bnlab report sweep --x train.batch_size"""


def main(argv: list[str]) -> int:
    """``bnlab report PATH... [--out DIR] [--by KEY,...] [--metric TAG] [--target VALUE] [--x KEY]``."""
    args = parse_args(argv)
    try:
        runs = find_runs(args.paths)
        if not runs:
            where = " ".join(args.paths)
            print(f"bnlab: error: no runs under {where} (a run directory holds .hydra/config.yaml)",
                  file=sys.stderr)
            return 2
        load_scalars(runs, tags=[*REPORT_TAGS, *([args.metric] if args.metric else []),
                                 *claim_metrics(runs)])
        roots = [Path(p).expanduser().resolve() for p in args.paths]
        report = build_report(runs, roots, args.by, args.metric, args.target, args.x)
        claims = judge_all(runs, report.keys)
        out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
        out.mkdir(parents=True, exist_ok=True)
        figures = draw_figures(report, out)
        write_summary_csv(report, out / "summary.csv")
        if report.axis:
            write_pivot_csv(report, out / "pivot.csv")
        if any(claims):
            write_claims_csv(*claims, out / "claims.csv")
        (out / "report.md").write_text(render_markdown(report, figures, claims))
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output folder that cannot be written (a read-only sweep)
        out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
        print(f"bnlab: error: cannot write the report into {out} ({err.strerror or err}); "
              "write it elsewhere with --out DIR", file=sys.stderr)
        return 2
    print_terminal(report, out, figures, claims)
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
    parser.add_argument("--metric", metavar="TAG",
                        help="the tag timed by 'steps to target' (default: test/acc, or "
                             "test/loss for runs without accuracy)")
    parser.add_argument("--target", default=AUTO, type=_target, metavar="VALUE",
                        help="the value of --metric to reach (default: auto, see below)")
    parser.add_argument("--x", metavar="KEY",
                        help="plot the final and best --metric against this swept key")
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
    if abs(value) < 1e-12:  # rounding noise, e.g. the spread of equal values
        value = 0.0
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
    view = f" ({VIEW_NAMES[report.view]})" if report.layers else ""
    header = ["group", "completed/runs", "final test/acc", "best test/acc",
              f"steps to {target_text(report)}", "final train/loss",
              f"drift {layers}".strip() + view, f"saturation {layers}".strip() + view, "wall (s)",
              "steps/s"]
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


def eval_resolution(report: Report) -> int | None:
    """The longest interval between two evaluations of --metric in any run (None: unknown)."""
    intervals = [s.eval_interval for g in report.groups for s in g.stats if s.eval_interval]
    return max(intervals) if intervals else None


def headline(report: Report) -> str:
    """One sentence: which group reached the target first, and by how much.

    Mean step counts closer than one evaluation interval cannot be told apart: a tie.
    """
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
        resolution = eval_resolution(report)
        tied = [t for t in timed[1:] if t[0] - best[0] < (resolution or 1)]
        every = f"one evaluation interval ({resolution:,} steps)" if resolution else "one step"
        if len(timed) > 1 and len(tied) == len(timed) - 1:
            parts.append(f"A tie: all {len(timed)} groups that reached {target_text(report)} did "
                         f"so at {best[0]:,.0f}-{slow[0]:,.0f} steps (means over seeds), within "
                         f"{every} of each other.")
        else:
            parts.append(f"Fastest to {target_text(report)}: {best[1].label}, {best[0]:,.0f} "
                         f"steps (mean over {best[2]}/{best[3]} seeds)")
            if tied:
                parts[-1] += (f", tied within {every} with "
                              + ", ".join(t[1].label for t in tied))
            if len(timed) > 1 and best[0] > 0:
                parts[-1] += (f"; {slow[0] / best[0]:.2g}x fewer than {slow[1].label} "
                              f"({slow[0]:,.0f} steps)")
            parts[-1] += "."
    if never:
        parts.append(f"Never reached it: {', '.join(never)}.")
    return " ".join(parts) or "No group has a completed run."


def describe(report: Report) -> str:
    """What was compared: runs, groups and their keys, seeds."""
    seeds = sorted({run.seed for run in report.runs if run.seed is not None}, key=value_key)
    keys = ", ".join(display_key(k) for k in report.keys) or "nothing (one group)"
    if len(seeds) > 10:
        seed_text = f"{len(seeds)} seeds averaged within each group"
    elif len(seeds) > 1:
        seed_text = f"seeds {', '.join(map(str, seeds))} averaged within each group"
    else:
        seed_text = f"one seed ({seeds[0] if seeds else '—'})"
    # A run whose config cannot be read belongs to no group: say how many, never drop them.
    grouped = sum(len(g.runs) for g in report.groups)
    outside = len(report.runs) - grouped
    damaged = f" and {outside} damaged run(s) in no group (listed below)" if outside else ""
    return (f"{grouped} runs in {len(report.groups)} group(s) differing in {keys}{damaged}; "
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
        if run.status in ("running", KILLED) and summary.get("updated"):
            detail.append(f"summary last written {summary['updated']}")
        if run.status == KILLED:
            detail.append("its process ended without a word; bnlab train resume=<run> continues it")
        if run.status == NO_SUMMARY:
            detail.append("no summary.json: the run never started training, or it was removed")
        detail += run.problems
        rows.append([run.name(root), run.status, "; ".join(detail) or "—"])
    return rows


# ---------------------------------------------------------------- a metric against a swept key
def pivot_rows(report: Report, name: str) -> tuple[list[str], list[list[str]]]:
    """Groups x values of the swept key: mean ± std over seeds of ``name`` (final_metric or
    best_metric); ``(k/n, ...)`` when only k of a cell's n runs completed, and what the others did."""
    axis = report.axis
    others = [display_key(k) for k in report.keys if k != axis.key]
    header = [", ".join(others) or "group",
              *(f"{display_key(axis.key)}={display_value(v)}" for v in axis.values)]
    rows = []
    for label, line in axis.lines:
        row = [label]
        for value in axis.values:
            g = axis.group(line, value)
            if g is None:
                row.append("—")
                continue
            text = _fmt_mean_std(g.values_of(name), _digits(report.metric))
            done = len(g.completed)
            others = ", ".join(f"{n} {status}" for status, n in sorted(g.counts().items())
                               if status != "completed")
            row.append(text if not others else f"{text} ({done}/{len(g.runs)}; {others})")
        rows.append(row)
    return header, rows


def _digits(metric: str) -> int:
    return 3 if higher_is_better(metric) else 4


def write_pivot_csv(report: Report, path: Path) -> None:
    """The pivot at full precision: per group of the other keys, one row per statistic
    (final and best --metric, mean and std over seeds, completed runs), one column per value."""
    axis = report.axis
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "statistic", *(display_value(v) for v in axis.values)])
        for label, line in axis.lines:
            cells = [axis.group(line, v) for v in axis.values]
            for name, what in (("final_metric", "final"), ("best_metric", "best")):
                spreads = [mean_std(g.values_of(name)) if g else (None, None) for g in cells]
                writer.writerow([label, f"{what}_{report.metric}_mean", *(m for m, _ in spreads)])
                writer.writerow([label, f"{what}_{report.metric}_std", *(s for _, s in spreads)])
            writer.writerow([label, "completed", *(len(g.completed) if g else 0 for g in cells)])


# ---------------------------------------------------------------- claims
VERDICT_STYLE = {REPRODUCED: "green", NOT_REPRODUCED: "red", INCONCLUSIVE: "yellow"}


def _fmt_side(side: Side, steps: bool, digits: int) -> str:
    """A side's numbers: mean ± std over its finite values, or for steps the median (censored
    runs above their budget); then how many seeds, and which runs ranked worst or were censored."""
    if steps:
        ranked = sorted(math.inf if v.censored else v.x for v in side.values)
        median = ranked[len(ranked) // 2] if len(ranked) % 2 else \
            (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
        budget = max((v.x for v in side.values if v.censored), default=None)
        text = "—" if not ranked else f"median {median:,.0f}" if math.isfinite(median) else \
            f"median > {budget:,.0f}"
    else:
        text = _fmt_mean_std(side.finite, digits)
    notes = [f"n={side.n}"]
    diverged = sum("diverged" in v.note for v in side.values)
    if diverged:
        notes.append(f"{diverged} diverged: worst" if not steps else f"{diverged} diverged")
    if side.count("not finite"):
        notes.append(f"{side.count('not finite')} not finite: worst")
    censored = sum(v.censored for v in side.values)
    if censored:
        budgets = sorted({v.x for v in side.values if v.censored})
        notes.append(f"{censored} never reached: censored at {'/'.join(f'{b:,.0f}' for b in budgets)}")
    for status, n in sorted(side.excluded.items()):
        notes.append(f"{n} {status}: not judged")
    if side.no_value:
        notes.append(f"{side.no_value} without the metric")
    if side.unpaired:
        notes.append(f"{side.unpaired} seeds unpaired")
    return f"{side.label} {text} ({', '.join(notes)})"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "p —"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def measured_text(j: Judgement) -> str:
    """Each comparison: both sides' numbers and seeds, and the exact one-sided p."""
    steps = j.claim.statistic == "steps_to_target"
    digits = _digits(j.claim.metric)
    parts = []
    for c in j.comparisons:
        prefix = f"{c.label}: " if c.label else ""
        what = _fmt_side(c.better, steps, digits)
        if c.than is not None:
            what += f" vs {_fmt_side(c.than, steps, digits)}"
        parts.append(f"{prefix}{what}, {_fmt_p(c.p_claimed)}")
    return "; ".join(parts)


def claim_what(j: Judgement) -> str:
    """What is compared: the statistic of the metric, and the kind of claim."""
    c = j.claim
    stat = c.statistic.replace("_", " ") + (f" {c.target:g}" if c.target is not None else "")
    if c.kind == EQUIVALENCE:
        return f"{c.metric}, {stat}, the two sides within ±{c.margin:g}"
    if c.kind == INTERACTION:
        start, end = c.change
        return (f"{c.metric}, {stat}: its change per seed from {_selector(start)} to "
                f"{_selector(end)}, {c.direction} for the first side")
    if c.kind == PAIRED:
        return f"{stat} {c.metric} minus {stat} {c.than_metric} in the same runs, {c.direction} than 0"
    return f"{c.metric}, {stat}, {c.direction} is better"


def _selector(selector: dict) -> str:
    return ", ".join(f"{display_key(k)}={display_value(v)}" for k, v in selector.items())


def detectable_text(j: Judgement) -> str:
    """The smallest effect these seeds could show: complete separation's p against the
    strictest Holm threshold, and the difference under which values tie."""
    strictest = ALPHA / j.family
    c = max(j.comparisons, key=lambda c: c.smallest_p)
    seeds = f"{c.better.n}" + (f" vs {c.than.n}" if c.than is not None else "") + " seeds"
    reach = "reaches" if j.smallest_p < strictest else "does not reach"
    text = (f"complete separation of {seeds} gives p = {j.smallest_p:.2g}, which {reach} "
            f"{strictest:.2g} (ALPHA/{j.family})")
    r = max(c.resolution for c in j.comparisons)
    if j.claim.statistic == "steps_to_target":
        text += f"; steps are known to {r:,.0f} (one evaluation interval)"
    elif r > 0:
        text += f"; differences under {r:.2g} (one example of {round(1 / r):,}) are ties"
    else:
        text += "; only equal values tie"
    if j.claim.kind == EQUIVALENCE:
        text += f"; margin ±{j.claim.margin:g}"
    return text


def claim_rows(judged: list[Judgement]) -> tuple[list[str], list[list[str]]]:
    header = ["claim", "source", "published", "measured here", "what these seeds could show",
              "verdict"]
    rows = [[f"{j.claim.id}: {j.claim.text} ({claim_what(j)})", j.claim.source,
             "—" if j.claim.published is None else str(j.claim.published),
             measured_text(j), detectable_text(j), f"{j.verdict} ({j.reason})"] for j in judged]
    return header, rows


def rule_text(judged: list[Judgement]) -> str:
    m = len(judged)
    return (f"Verdicts (docs/report.md): per comparison an exact permutation test on the per-run "
            f"values, one-sided, on Gehan-Wilcoxon scores: values closer than the metric's "
            f"resolution tie, a diverged run ranks worst, a run that never reached a target is "
            f"censored at its budget; failed and interrupted runs are listed, not judged. A claim "
            f"must hold at every comparison (its p is the largest). The {m} claim(s) judged here "
            f"are one family: Holm's procedure at ALPHA = {ALPHA:g}, once for `reproduced` and "
            f"once for `not reproduced`; each verdict gives the threshold its p met or missed.")


CLAIM_COLUMNS = ["claim", "text", "source", "kind", "metric", "than_metric", "statistic",
                 "direction", "margin", "published", "comparison",
                 "better", "better_mean", "better_std", "better_n", "better_diverged",
                 "better_censored", "better_not_judged",
                 "than", "than_mean", "than_std", "than_n", "than_diverged", "than_censored",
                 "than_not_judged", "resolution", "p_claimed", "p_opposite", "smallest_p",
                 "comparison_verdict", "claim_p", "claim_p_not", "family", "holm_threshold",
                 "holm_threshold_not", "verdict", "reason"]


def write_claims_csv(judged: list[Judgement], not_judged: list[NotJudged], path: Path) -> None:
    """One row per comparison of each judged claim, then one per claim not judged. A side's
    mean and std are over its finite values (neither diverged nor censored ones)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CLAIM_COLUMNS)
        for j in judged:
            c = j.claim
            for comp in j.comparisons:
                row = [c.id, c.text, c.source, c.kind, c.metric, c.than_metric, c.statistic,
                       c.direction, c.margin, c.published, comp.label]
                for side in (comp.better, comp.than):
                    if side is None:
                        row += [""] * 8
                        continue
                    row += [side.label, *mean_std(side.finite), side.n,
                            sum("diverged" in v.note for v in side.values),
                            sum(v.censored for v in side.values), sum(side.excluded.values())]
                row += [comp.resolution, comp.p_claimed, comp.p_opposite, comp.smallest_p,
                        comp.verdict, j.p, j.p_not, j.family, j.threshold, j.threshold_not,
                        j.verdict, j.reason]
                writer.writerow(["" if v is None else v for v in row])
        for nj in not_judged:
            row = [nj.id, nj.text, nj.source] + [""] * (len(CLAIM_COLUMNS) - 5)
            writer.writerow(row + [NOT_JUDGED, nj.reason])


# ---------------------------------------------------------------- outputs
def print_terminal(report: Report, out: Path, figures: list[tuple[str, str]],
                   claims: tuple[list[Judgement], list[NotJudged]] = ([], [])) -> None:
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
    judged, not_judged = claims
    if judged:
        header, rows = claim_rows(judged)
        listing = Table(*header, title="Claims", header_style="bold")
        for j, row in zip(judged, rows, strict=True):
            listing.add_row(*row[:-1], f"[{VERDICT_STYLE[j.verdict]}]{row[-1]}[/]")
        console.print(listing)
    for nj in not_judged:
        console.print(f"Claim {nj.id} not judged: {nj.reason}.", highlight=False)
    if report.axis:
        header, rows = pivot_rows(report, "final_metric")
        listing = Table(*header, title=f"final {report.metric} (mean ± std over seeds)",
                        header_style="bold")
        for row in rows:
            listing.add_row(*row)
        console.print(listing)
    excluded = excluded_rows(report)
    if excluded:
        listing = Table("run", "status", "what happened", title="Runs not averaged",
                        header_style="bold")
        for row in excluded:
            listing.add_row(*row)
        console.print(listing)
    written = ", ".join(str(out / name) for name in ["report.md", "summary.csv",
                        *(["pivot.csv"] if report.axis else []),
                        *(["claims.csv"] if any(claims) else [])])
    console.print(f"Wrote {written} and {len(figures)} figure(s).", highlight=False)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report, figures: list[tuple[str, str]],
                    claims: tuple[list[Judgement], list[NotJudged]] = ([], [])) -> str:
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
        "at the last probe; both are read in the network the header names: the inference "
        "network (`infer/`, probe.mode=eval or both) when every run logged it, else train mode, "
        "where a batch-statistics norm's output has mean beta and variance gamma^2 by "
        "construction and its drift tracks gamma and beta only; *steps/s* is the mean of "
        "`perf/steps_per_s`.", "",
    ]
    judged, not_judged = claims
    if judged or not_judged:
        parts += ["## Claims", ""]
        if judged:
            parts += [_md_table(*claim_rows(judged)), "", rule_text(judged), ""]
        if not_judged:
            parts += ["Not judged on these runs:", ""]
            parts += [f"- {nj.id} ({nj.source}): {nj.reason}" for nj in not_judged] + [""]
    axis_figure = axis_figure_name(report.metric, report.axis.key) if report.axis else None
    if report.axis:
        key = display_key(report.axis.key)
        parts += [f"## {report.metric} against {key}", ""]
        if any(name == axis_figure for _, name in figures):
            parts += [f"![{report.metric} against {key}]({axis_figure})", ""]
        for name, what in (("final_metric", "final"), ("best_metric", "best")):
            parts += [f"{what.capitalize()} {report.metric}, mean ± std over seeds:", "",
                      _md_table(*pivot_rows(report, name)), ""]
    excluded = excluded_rows(report)
    if excluded:
        parts += ["## Runs not averaged", "",
                  _md_table(["run", "status", "what happened"], excluded), ""]
    others = [(title, name) for title, name in figures if name != axis_figure]
    if others:
        parts += ["## Figures", ""]
        for title, name in others:
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
    view = "infer_" if report.view == INFERENCE else ""  # the network the probes read
    columns += [f"{view}drift_layer{k}_mean" for k in report.layers]
    columns += [f"{view}saturation_layer{k}_mean" for k in report.layers]
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
    from bnlab.report.figures import draw_all

    return draw_all(report, out)
