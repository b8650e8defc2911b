"""What a run or a sweep ended as, said in a few lines on the terminal, read from summary.json.

After one run: its status, steps, wall time, final and best test metric, its directory and the
commands to look at it. After a sweep (:class:`SweepSummary`, a Hydra callback that runs in
the process that launched the sweep, whatever the launcher): how many runs completed,
diverged or failed, and the report command.
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
    written at or after ``since`` (a sweep into a reused directory counts its own runs only)."""
    runs: dict[Path, str] = {}
    for config in sorted(Path(sweep_dir).rglob(CONFIG.name)):
        run = config.parent.parent
        if config.parent.name != CONFIG.parent.name or config.stat().st_mtime < since:
            continue
        summary = read_summary(run)
        status = summary.get("status") if summary else None
        runs[run] = process_status(run, str(status)) if status else "no summary"
    return runs


def sweep_report(sweep_dir: Path, runs: dict[Path, str]) -> str:
    """The lines printed at the end of `bnlab train -m`."""
    counts = Counter(runs.values())
    order = ["completed", "diverged", "failed", "interrupted", "running", "no summary"]
    parts = [f"{counts[s]} {s}" for s in order if counts[s]]
    parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in order]
    where = shown_path(sweep_dir)
    lines = [f"bnlab: sweep of {len(runs)} run(s): {', '.join(parts) or 'none started'}"]
    for run, status in runs.items():
        if status not in ENDED_WELL:
            error = (read_summary(run) or {}).get("error", "")
            lines.append(f"  {status:<15}{run.relative_to(sweep_dir)}" + (f"  {error}" if error else ""))
    lines += [f"  sweep directory  {where}",
              f"  next             bnlab report {where}",
              f"                   tensorboard --logdir {where}"]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints :func:`sweep_report` when a sweep ends (registered in configs/train.yaml)."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have coarse resolution on some file systems

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(os.path.expanduser(str(config.hydra.sweep.dir)))
        print(sweep_report(sweep_dir, sweep_runs(sweep_dir, since=self.started)), flush=True)
