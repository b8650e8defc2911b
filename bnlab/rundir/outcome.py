"""What a run or a sweep ended as, said in a few lines on the terminal, read from summary.json.

After one run: its status, steps, wall time, final and best test metric, its directory and the
commands to look at it. Before and after a sweep (:class:`SweepSummary`, a Hydra callback that
runs in the process that launched the sweep, whatever the launcher): its jobs are checked (no
two write one directory, none writes over a run already there), then counted at the end: how
many completed, diverged or failed, and the report command.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from bnlab.rundir.lock import process_status
from bnlab.rundir.names import CONFIG, SUMMARY_JSON

# Statuses of a run that ended as planned; the sweep's summary names the runs of any other.
ENDED_WELL = ("completed", "diverged")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summary.json`` of ``run_dir``, or None when it is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, quoted for a shell."""
    path = Path(path).absolute()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


def wall_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def metric(summary: dict[str, Any]) -> str:
    """The final test metric and the best one: accuracy, or the loss of a regression."""
    final, best = summary.get("final") or {}, summary.get("best") or {}
    if "test/acc" in final:
        text = f"test/acc {final['test/acc']:.4f}"
        if "test/acc" in best:
            text += f" (best {best['test/acc']:.4f} at step {best.get('test/acc_step', '?')})"
        return text
    if "test/loss" in final:
        text = f"test/loss {final['test/loss']:.4g}"
        return text + (f" (best {best['test/loss']:.4g})" if "test/loss" in best else "")
    return "no evaluation yet"


def headline(summary: dict[str, Any]) -> str:
    """``completed: 100/100 steps in 2.1 s, test/acc 0.9321 (best 0.9321 at step 100)``."""
    status = summary.get("status", "?")
    steps = f"{summary.get('steps', 0)}/{summary.get('total_steps', '?')} steps"
    text = f"{status}: {steps} in {wall_time(float(summary.get('wall_s', 0.0)))}, {metric(summary)}"
    if status == "diverged" and "diverged_step" in summary:
        text += f"; train/loss not finite at step {summary['diverged_step']}"
    return text


def run_report(run_dir: Path, summary: dict[str, Any]) -> str:
    """The lines printed at the end of `bnlab train`."""
    where = shown_path(run_dir)
    return "\n".join([f"bnlab: {headline(summary)}",
                      f"  run directory  {where}",
                      f"  next           tensorboard --logdir {where}",
                      f"                 bnlab report {where}"])


# ---------------------------------------------------------------- sweeps
def sweep_runs(sweep_dir: Path, since: float = 0.0) -> dict[Path, str]:
    """``{run directory: status}`` of the runs under ``sweep_dir`` whose ``.hydra/`` was
    written at or after ``since`` (used when the sweep's jobs could not be listed in advance)."""
    runs: dict[Path, str] = {}
    for config in sorted(Path(sweep_dir).rglob(CONFIG.name)):
        run = config.parent.parent
        if config.parent.name != CONFIG.parent.name or config.stat().st_mtime < since:
            continue
        runs[run] = run_status(run)
    return runs


def run_status(run: Path) -> str:
    """What summary.json says (``killed`` for a run no process holds any more), ``no summary``,
    or ``not started`` for a directory that was never created."""
    if not Path(run).is_dir():
        return "not started"
    summary = read_summary(run)
    status = summary.get("status") if summary else None
    return process_status(run, str(status)) if status else "no summary"


def sweep_report(sweep_dir: Path, runs: dict[Path, str]) -> str:
    """The lines printed at the end of `bnlab train -m`."""
    counts = Counter(runs.values())
    order = ["completed", "diverged", "failed", "interrupted", "running", "no summary", "not started"]
    parts = [f"{counts[s]} {s}" for s in order if counts[s]]
    parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in order]
    where = shown_path(sweep_dir)
    lines = [f"bnlab: sweep of {len(runs)} run(s): {', '.join(parts) or 'none started'}"]
    for run, status in runs.items():
        if status not in ENDED_WELL:
            error = (read_summary(run) or {}).get("error", "")
            lines.append(f"  {status:<15}{_relative(run, sweep_dir)}" + (f"  {error}" if error else ""))
    lines += [f"  sweep directory  {where}",
              f"  next             bnlab report {where}",
              f"                   tensorboard --logdir {where}"]
    return "\n".join(lines)


def _relative(run: Path, sweep_dir: Path) -> str:
    try:
        return str(Path(run).absolute().relative_to(Path(sweep_dir).absolute()))
    except ValueError:
        return str(run)


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
BATCHED_LAUNCHER = "hydra_plugins.bnlab_batched_launcher.batched_launcher.BatchedLauncher"


def planned_jobs(config: Any) -> list[tuple[str, Path, Any]] | None:
    """``(label, run directory, config)`` of every job of the sweep about to start, composed as
    Hydra's basic sweeper and launchers will compose them; None for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    loader = GlobalHydra.instance().config_loader()
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    jobs = []
    saved = HydraConfig.instance().cfg
    try:
        for idx, job_overrides in enumerate(batch):
            job = loader.load_sweep_config(config, list(job_overrides))
            with open_dict(job):
                job.hydra.job.id = job.hydra.job.num = idx
            HydraConfig.instance().set_config(job)
            run_dir = Path(str(job.hydra.sweep.dir), str(job.hydra.sweep.subdir)).absolute()
            jobs.append((str(job.hydra.job.override_dirname) or f"job {idx}", run_dir, job))
    finally:
        HydraConfig.instance().cfg = saved
    return jobs


def check_sweep(jobs: list[tuple[str, Path, Any]], launcher: str) -> None:
    """Raise UserError when two jobs would write one directory, when a job would write over a
    run already there (except under hydra/launcher=batched, which finishes what a sweep left
    undone), or when ``data.labels_per_batch`` is set while no job samples grouped batches."""
    from bnlab.errors import UserError
    from bnlab.rundir.names import holds_run

    first: dict[Path, str] = {}
    for label, run_dir, _ in jobs:
        if run_dir in first:
            raise UserError(f"two jobs of this sweep would write one directory ({first[run_dir]} and "
                            f"{label}: {shown_path(run_dir)}); give each swept value once")
        first[run_dir] = label
    # A sweep with nothing swept names its one job's directory after nothing: the sweep's own.
    taken = [run_dir for _, run_dir, _ in jobs if holds_run(run_dir) or (
        run_dir.is_dir() and any(holds_run(child) for child in run_dir.iterdir() if child.is_dir()))]
    if taken and launcher != BATCHED_LAUNCHER:
        raise UserError(f"{len(taken)} of this sweep's {len(jobs)} jobs would write over runs already "
                        f"there ({shown_path(taken[0])}{', ...' if len(taken) > 1 else ''}); choose "
                        "another hydra.sweep.dir (or none), continue a run with bnlab train "
                        "resume=<run>, or finish the sweep with hydra/launcher=batched")
    labels = [cfg.data.get("labels_per_batch") for _, _, cfg in jobs if "data" in cfg]
    samplers = {cfg.data.get("sampler") for _, _, cfg in jobs if "data" in cfg}
    given = [k for k in labels if k is not None]
    if given and "grouped" not in samplers:
        raise UserError(f"data.labels_per_batch={given[0]} is not valid without data.sampler=grouped "
                        "(the iid sampler draws any labels): drop it, or add data.sampler=grouped")


class SweepSummary(Callback):
    """Checks a sweep's jobs before the first starts (:func:`check_sweep`), and prints
    :func:`sweep_report` of exactly those jobs when the sweep ends (registered in
    configs/train.yaml; it runs in the process that launched the sweep, whatever the launcher)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.jobs: list[Path] | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        import sys

        from bnlab.errors import UserError

        self.started = time.time() - 1.0  # file times have coarse resolution on some file systems
        jobs = planned_jobs(config)
        if jobs is None:
            return
        try:
            check_sweep(jobs, str(config.hydra.launcher.get("_target_", "")))
        except UserError as err:
            print(f"bnlab: error: {err}", file=sys.stderr)
            sys.exit(2)
        self.jobs = [run_dir for _, run_dir, _ in jobs]

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(os.path.expanduser(str(config.hydra.sweep.dir)))
        if self.jobs is None:
            runs = sweep_runs(sweep_dir, since=self.started)
        else:
            runs = {run: run_status(run) for run in self.jobs}
        print(sweep_report(sweep_dir, runs), flush=True)
