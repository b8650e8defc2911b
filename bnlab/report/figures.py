"""The PNG figures of ``bnlab report``: learning curves, drift, percentiles (Ioffe Fig. 1), ICS,
loss landscape (Santurkar Fig. 4), and a metric against a swept key.

Each curve is a group's mean over its completed runs (seeds) with a band from their minimum to
their maximum. Imported only when a report draws: matplotlib (Agg backend) costs a second.
"""

from __future__ import annotations

import math
import textwrap
from functools import reduce
from pathlib import Path

import numpy as np

from bnlab.report.data import (
    VIEW_NAMES,
    Axis,
    Group,
    Report,
    axis_figure_name,
    best_of,
    display_key,
    display_value,
    higher_is_better,
    layer_tags,
    nonlinearity_point,
)
from bnlab.rundir.reader import Series

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "figure.titlesize": 13,
         "axes.grid": True, "grid.alpha": 0.3, "savefig.dpi": 120}
STEP_LABEL = "training step"
MAX_POINTS = 1000  # per curve


def draw_all(report: Report, out: Path) -> list[tuple[str, str]]:
    """Draw every figure the runs have data for into ``out``; ``[(title, file name)]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in report.groups if g.completed]
    colors = {g.label: plt.get_cmap("tab10" if len(report.groups) <= 10 else "tab20")(i % 20)
              for i, g in enumerate(report.groups)}
    drawn = []
    axis = report.axis
    with plt.rc_context(STYLE):
        for title, name, draw in [
            *([(f"{report.metric} against {display_key(axis.key)}",
                axis_figure_name(report.metric, axis.key),
                lambda: metric_vs_key(axis, report.metric))] if axis else []),
            ("Test accuracy", "test_acc.png",
             lambda: curves(groups, colors, "test/acc", "Test accuracy", "test accuracy")),
            ("Training loss", "train_loss.png",
             lambda: curves(groups, colors, "train/loss", "Training loss",
                            "training loss (mean since the previous log)", log=True)),
            (f"Drift of each layer's nonlinearity input ({VIEW_NAMES[report.view]})", "drift.png",
             lambda: drift(groups, colors, report.view)),
            ("Nonlinearity input percentiles of one unit (Ioffe & Szegedy 2015, Fig. 1)",
             "percentiles.png", lambda: percentiles(groups)),
            ("Gradient-based internal covariate shift (Santurkar et al. 2018)", "ics.png",
             lambda: ics(groups, colors)),
            ("Loss landscape along the gradient (Santurkar et al. 2018, Fig. 4)", "landscape.png",
             lambda: landscape(groups, colors)),
        ]:
            fig = draw()
            if fig is not None:
                fig.savefig(out / name)
                plt.close(fig)
                drawn.append((title, name))
    return drawn


# ---------------------------------------------------------------- helpers
def align(series: list[Series]) -> tuple[np.ndarray, np.ndarray]:
    """The steps every run logged and a (runs x steps) matrix of their values.

    Seeds of one config log at the same steps; runs that do not (a changed log_every) are
    interpolated onto the first run's steps within the range they all cover.
    """
    steps = reduce(np.intersect1d, [s.steps for s in series])
    if len(steps) >= 2 or len(series) == 1:
        return steps, np.stack([s.values[np.searchsorted(s.steps, steps)] for s in series])
    lo, hi = max(s.steps[0] for s in series), min(s.steps[-1] for s in series)
    first = series[0].steps
    steps = first[(first >= lo) & (first <= hi)]
    return steps, np.stack([np.interp(steps, s.steps, s.values) for s in series])


def group_series(group: Group, tag_of) -> list[Series]:
    """The group's completed runs' series of a tag; ``tag_of(run)`` names it (None: skip)."""
    found = []
    for run in group.completed:
        tag = tag_of(run)
        series = run.scalars.get(tag) if tag else None
        if series is not None and len(series.steps):
            found.append(series)
    return found


def thin(steps: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every k-th point, at most MAX_POINTS: a figure is ~1000 pixels wide, and drawing a
    sweep logged at every step point by point takes seconds."""
    stride = max(1, math.ceil(len(steps) / MAX_POINTS))
    return (steps[::stride], *(c[..., ::stride] for c in columns))


def plot_band(ax, series: list[Series], color, label: str) -> None:
    """Mean over runs as a line, their min..max as a band."""
    steps, values = thin(*align(series))
    if len(steps) == 0:
        return
    with np.errstate(all="ignore"):
        mean = np.nanmean(values, axis=0)
    ax.plot(steps, mean, color=color, lw=1.8, label=f"{label} (n={len(series)})")
    if len(series) > 1:
        ax.fill_between(steps, np.nanmin(values, axis=0), np.nanmax(values, axis=0),
                        color=color, alpha=0.18, lw=0)


def format_axes(ax, log: bool = False, xlabel: bool = True) -> None:
    """Steps with thousands separators; plain numbers on a log axis (0.3, not 3x10^-1)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    if xlabel:
        ax.set_xlabel(STEP_LABEL)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        low, high = ax.get_ylim()
        # Label the 2x and 5x ticks too when the axis spans less than two decades.
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five) if high / low < 100
                                     else NullFormatter())
    else:
        ax.ticklabel_format(axis="y", useOffset=False)


def _two_and_five(y: float, _) -> str:
    if y <= 0:
        return ""
    leading = round(y / 10 ** math.floor(math.log10(y)))
    return f"{y:g}" if leading in (2, 5) else ""


def grid(n: int, max_cols: int = 3, size: tuple[float, float] = (4.6, 3.4), **kwargs):
    import matplotlib.pyplot as plt

    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows + 0.8),
                             squeeze=False, layout="constrained", **kwargs)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def legend_below(fig, axes) -> None:
    handles: dict = {}  # one entry per label, in order of appearance
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 4), frameon=False)


def wrap(text: str, width: int = 40) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def layers_with(groups: list[Group], tag_pattern: str) -> list[int]:
    """Layer numbers K for which some completed run logged ``tag_pattern.format(K=K)``."""
    found = set()
    for g in groups:
        for run in g.completed:
            found.update(layer_tags(run.scalars, tag_pattern))
    return sorted(found)


# ---------------------------------------------------------------- the figures
def curves(groups: list[Group], colors: dict, tag: str, title: str, ylabel: str,
           log: bool = False):
    import matplotlib.pyplot as plt

    drawn = [(g, s) for g in groups if (s := group_series(g, lambda run: tag))]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for g, series in drawn:
        plot_band(ax, series, colors[g.label], g.label)
    ax.set_title(f"{title} (line: mean over seeds; band: min to max)")
    ax.set_ylabel(ylabel)
    format_axes(ax, log=log)
    if len(drawn) <= 6:
        ax.legend(loc="best")
    else:
        legend_below(fig, [ax])
    return fig


def drift(groups: list[Group], colors: dict, view: str):
    """``view``: the probes' tag prefix (the report's, :func:`bnlab.report.data.probe_view`)."""
    layers = layers_with(groups, view + "drift/layer{K}/norm/mean") or layers_with(
        groups, view + "drift/layer{K}/pre/mean")
    if not layers:
        return None
    fig, axes = grid(len(layers))
    for i, (ax, layer) in enumerate(zip(axes, layers, strict=True)):
        positive = True
        for g in groups:
            series = group_series(
                g, lambda run, k=layer: f"{view}drift/layer{k}/{nonlinearity_point(run)}/mean")
            if series:
                plot_band(ax, series, colors[g.label], g.label)
                positive &= all(np.all(s.values[np.isfinite(s.values)] > 0) for s in series)
        ax.set_title(f"layer {layer}")
        if i % 3 == 0:
            ax.set_ylabel("drift of the unit means\n(RMS of Δmean / previous std)")
        format_axes(ax, log=positive and bool(ax.lines))
    fig.suptitle(f"Drift of each layer's nonlinearity input between probes, {VIEW_NAMES[view]} "
                 "(mean over seeds; band: min to max)")
    legend_below(fig, axes)
    return fig


def percentiles(groups: list[Group]):
    """Ioffe & Szegedy Fig. 1(b, c): one panel per group, first seed of each."""
    layers = layers_with(groups, "pct/layer{K}/p50")
    if not layers:
        return None
    layer = layers[-1]  # the last hidden layer, as in the paper
    panels = []
    for g in groups:
        for run in g.completed:  # sorted by seed: the first seed that has the tags
            tags = [f"pct/layer{layer}/p{p}" for p in (15, 50, 85)]
            if all(t in run.scalars for t in tags):
                panels.append((g, run, [run.scalars[t] for t in tags]))
                break
    if not panels:
        return None
    fig, axes = grid(len(panels), max_cols=4, size=(4.2, 3.4), sharey=True)
    for ax, (g, run, quantiles) in zip(axes, panels, strict=True):
        steps, (p15, p50, p85) = thin(*align(quantiles))
        ax.fill_between(steps, p15, p85, color="tab:blue", alpha=0.15, lw=0)
        ax.plot(steps, p85, color="tab:blue", ls="--", lw=1.2, label="85th percentile")
        ax.plot(steps, p50, color="tab:blue", lw=1.8, label="median")
        ax.plot(steps, p15, color="tab:blue", ls=":", lw=1.4, label="15th percentile")
        ax.set_title(wrap(f"{g.label} (seed {run.seed})"))
        format_axes(ax)
    axes[0].set_ylabel("nonlinearity input")
    unit = panels[0][1].config.get("probe.unit", 0)
    fig.suptitle(f"Input to the nonlinearity of unit {unit} in layer {layer} "
                 "(last hidden layer) on the probe batch")
    legend_below(fig, axes[:1])
    return fig


def ics(groups: list[Group], colors: dict):
    """Santurkar et al. (2018), Def. 2.1: gradient change of layer K from the earlier updates."""
    # Layer 1 has no layers below it: its gradient change is 0 by definition.
    layers = [k for k in layers_with(groups, "ics/layer{K}/l2") if k > 1]
    if not layers:
        return None
    import matplotlib.pyplot as plt

    cols = len(layers)
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 7.4), squeeze=False,
                             layout="constrained", sharex=True)
    for j, layer in enumerate(layers):
        for i, (what, ylabel) in enumerate([("l2", "‖G − G′‖₂ (ℓ2 distance)"),
                                            ("cos", "cos(G, G′)")]):
            ax = axes[i][j]
            for g in groups:
                series = group_series(g, lambda run, k=layer, w=what: f"ics/layer{k}/{w}")
                if series:
                    plot_band(ax, series, colors[g.label], g.label)
            ax.set_title(f"layer {layer}")
            if j == 0:
                ax.set_ylabel(ylabel)
            format_axes(ax, xlabel=i == 1)
    fig.suptitle("Gradient change of each layer caused by the update of the layers below "
                 "(Santurkar et al. 2018)")
    legend_below(fig, list(axes.flat))
    return fig


def metric_vs_key(axis: Axis, metric: str):
    """Final and best ``metric`` against the swept key: per line, the mean over seeds with
    markers and the seeds' min..max as a band; a log x axis when the values span 10x or more.

    Diverged runs are not averaged (as in the tables) but shown, as crosses at their last
    evaluation: a learning rate where every seed diverged must not look like a missing point."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained", sharey=True)
    cmap = plt.get_cmap("tab10" if len(axis.lines) <= 10 else "tab20")
    positions = (axis.values if axis.numeric
                 else list(range(len(axis.values))))  # categories: evenly spaced
    drawn = False
    for ax, (name, what) in zip(axes, [("final_metric", "final"), ("best_metric", "best")],
                                strict=True):
        for i, (label, line) in enumerate(axis.lines):
            xs, mean, low, high, n = [], [], [], [], []
            for x, value in zip(positions, axis.values, strict=True):
                g = axis.group(line, value)
                values = g.values_of(name) if g is not None else []
                if values:
                    xs.append(x)
                    mean.append(float(np.mean(values)))
                    low.append(min(values))
                    high.append(max(values))
                    n.append(len(values))
            color = cmap(i % 20)
            crosses = diverged_points(axis, line, positions, metric, what)
            if crosses:
                ax.plot(*zip(*crosses, strict=True), "x", color=color, ms=8, mew=2)
            if not xs:
                continue
            drawn = True
            seeds = f"n={min(n)}" if min(n) == max(n) else f"n={min(n)}-{max(n)}"
            ax.plot(xs, mean, "o-", color=color, lw=1.8, ms=5, label=f"{label} ({seeds})")
            if max(n) > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.18, lw=0)
        if axis.log:
            ax.set_xscale("log")
        ax.set_xticks(positions, [display_value(v) for v in axis.values])
        ax.xaxis.set_minor_locator(NullLocator())  # only the swept values are labelled
        ax.set_xlabel(display_key(axis.key) + (" (log scale)" if axis.log else ""))
        ax.set_title(f"{what} {metric}")
        ax.ticklabel_format(axis="y", useOffset=False)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_ylabel(metric)
    if any(line.get_marker() == "x" for ax in axes for line in ax.lines):
        axes[0].plot([], [], "x", color="0.3", ms=8, mew=2, label="diverged run (last evaluation)")
    fig.suptitle(f"{metric} against {display_key(axis.key)} (line: mean over seeds; "
                 "band: min to max)")
    legend_below(fig, axes[:1])
    return fig


def diverged_points(axis: Axis, line: dict, positions: list, metric: str,
                    what: str) -> list[tuple[float, float]]:
    """(x, final or best ``metric``) of each diverged run of a line."""
    points = []
    for x, value in zip(positions, axis.values, strict=True):
        g = axis.group(line, value)
        for run in g.runs if g is not None else []:
            series = run.scalars.get(metric) if run.status == "diverged" else None
            if series is None or not len(series.values):
                continue
            y = series.values[-1] if what == "final" else best_of(series, higher_is_better(metric))
            if y is not None and np.isfinite(y):
                points.append((x, float(y)))
    return points


def landscape(groups: list[Group], colors: dict):
    """Santurkar et al. (2018), Fig. 4: loss range, gradient change and effective beta along the
    gradient over training; per group the mean over seeds, bands from their minimum to maximum
    (the loss panel shades between the seeds' mean loss_min and mean loss_max, as their 4(a))."""
    drawn = [g for g in groups if group_series(g, lambda run: "landscape/beta")]
    if not drawn:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14.5, 4.8), layout="constrained")
    positive = {0: True, 1: True, 2: True}
    for g in drawn:
        lows = group_series(g, lambda run: "landscape/loss_min")
        highs = group_series(g, lambda run: "landscape/loss_max")
        if lows and len(lows) == len(highs):
            steps, values = align(lows + highs)
            with np.errstate(all="ignore"):
                low, high = np.nanmean(values[:len(lows)], 0), np.nanmean(values[len(lows):], 0)
            steps, low, high = thin(steps, low, high)
            axes[0].fill_between(steps, low, high, color=colors[g.label], alpha=0.3, lw=0,
                                 label=f"{g.label} (n={len(lows)})")
            for edge in (low, high):
                axes[0].plot(steps, edge, color=colors[g.label], lw=0.8)
            positive[0] &= bool(np.all(low[np.isfinite(low)] > 0))
        for i, tag in ((1, "landscape/grad_change"), (2, "landscape/beta")):
            series = group_series(g, lambda run, t=tag: t)
            if series:
                plot_band(axes[i], series, colors[g.label], g.label)
                positive[i] &= all(np.all(s.values[np.isfinite(s.values)] > 0) for s in series)
    for i, (title, ylabel) in enumerate([
            ("(a) loss landscape", "loss along the gradient (min to max)"),
            ("(b) gradient predictiveness", "max ‖∇L(θ − ηg) − g‖₂"),
            ("(c) effective β-smoothness", "max ‖∇L(θ − ηg) − g‖₂ / ‖ηg‖₂")]):
        axes[i].set_title(title)
        axes[i].set_ylabel(ylabel)
        format_axes(axes[i], log=positive[i] and bool(axes[i].collections or axes[i].lines))
    fig.suptitle("Along the gradient at each measured step, η from 1/2 to 4 learning rates "
                 "(Santurkar et al. 2018, Fig. 4; lines: mean over seeds, bands: min to max)")
    legend_below(fig, list(axes))
    return fig
