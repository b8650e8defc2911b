"""Time `bnlab report` on a synthetic sweep: N runs x M training steps (default 100 x 10,000).

Each synthetic run is what `bnlab train` writes for a 3-hidden-layer MLP with the default
logging: `.hydra/config.yaml`, `.hydra/overrides.yaml`, `summary.json` and a `scalars.csv` with

  every 50 steps (train.log_every)   train/loss, train/acc, train/lr, perf/steps_per_s   (4 tags)
  every 500 steps (train.eval_every) test/loss, test/acc                                 (2 tags)
  every 100 steps (probe.every)      the default probe's 22 tags per layer x 3 layers   (66 tags)

which is ~7,500 rows per run of 10,000 steps. ``--every-step`` is the worst case: 20 of those
tags (the training and test tags, and the probe tags the report reads) logged at every step,
200,000 rows per run. The runs are 4 norm variants x N/4 seeds.

The time is the wall time of `python -m bnlab report` in a fresh process (imports, reading,
tables, figures), as a user sees it; other processes on the machine slow it down.

    python scripts/bench_report.py                 # 100 runs x 10,000 steps, default logging
    (the same as python -m bnlab.report.synthetic; `bnlab bench` runs it as one of its rows)
    python scripts/bench_report.py --every-step    # worst case: 20 tags at every step
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bnlab.rundir.names import CONFIG, OVERRIDES, SCALARS_CSV, SUMMARY_JSON

NORMS = ("none", "bn", "ln", "brn")
LAYERS = (1, 2, 3)
POINTS = ("pre", "norm", "act")
TRAIN_TAGS = ("train/loss", "train/acc", "train/lr", "perf/steps_per_s")
EVAL_TAGS = ("test/loss", "test/acc")
PROBE_TAGS = tuple(
    [f"act/layer{k}/{p}/{s}" for k in LAYERS for p in POINTS for s in ("mean", "var")]
    + [f"{d}/layer{k}/{p}/{s}" for d in ("drift", "drift0") for k in LAYERS for p in POINTS
       for s in ("mean", "var")]
    + [f"pct/layer{k}/p{q}" for k in LAYERS for q in (15, 50, 85)]
    + [f"sat/layer{k}" for k in LAYERS])
EVERY_STEP_TAGS = (TRAIN_TAGS + EVAL_TAGS
                   + tuple(f"drift/layer{k}/norm/mean" for k in LAYERS)
                   + tuple(f"sat/layer{k}" for k in LAYERS)
                   + tuple(f"pct/layer3/p{q}" for q in (15, 50, 85))
                   + tuple(f"drift0/layer{k}/norm/mean" for k in LAYERS)
                   + ("act/layer3/norm/mean", "act/layer3/norm/var"))


def value(tag: str, steps: np.ndarray, speed: float, rng: np.random.Generator) -> np.ndarray:
    """Plausible curves: accuracy rising, loss falling, positive drift, fractions in [0, 1]."""
    progress = 1 - np.exp(-steps / (2000 * speed))
    noise = rng.normal(0, 0.01, len(steps))
    if tag.endswith("/acc"):
        return np.clip(0.1 + 0.85 * progress + noise, 0, 1)
    if tag.endswith("/loss"):
        return 2.3 * (1 - progress) + 0.05 + np.abs(noise)
    if tag == "train/lr":
        return np.full(len(steps), 0.1)
    if tag.startswith("perf/"):
        return 1000 + 50 * rng.standard_normal(len(steps))
    if tag.startswith("sat/"):
        return np.clip(0.3 * (1 - progress) + np.abs(noise), 0, 1)
    return rng.lognormal(-2, 0.5, len(steps))


def write_run(run_dir: Path, norm: str, seed: int, n_steps: int, every_step: bool) -> int:
    """One synthetic run directory; returns its number of scalars.csv rows."""
    rng = np.random.default_rng(seed * 100 + NORMS.index(norm))
    (run_dir / CONFIG).parent.mkdir(parents=True)
    config = {"seed": seed, "device": "cpu",
              "norm": {"name": norm, "position": "before_act"},
              "activation": {"name": "sigmoid"}, "model": {"name": "mlp", "widths": [100] * 3},
              "train": {"steps": n_steps, "log_every": 50, "eval_every": 500},
              "probe": {"every": 100, "unit": 0}}
    (run_dir / CONFIG).write_text(json.dumps(config))  # JSON is YAML
    (run_dir / OVERRIDES).write_text(json.dumps([f"norm={norm}", f"seed={seed}"]))
    if every_step:
        schedule = [(np.arange(1, n_steps + 1), EVERY_STEP_TAGS)]
    else:
        schedule = [(np.arange(0, n_steps + 1, 100), PROBE_TAGS),
                    (np.arange(50, n_steps + 1, 50), TRAIN_TAGS),
                    (np.arange(500, n_steps + 1, 500), EVAL_TAGS)]
    speed = 1.0 if norm == "none" else 0.3
    rows = []
    for steps, tags in schedule:
        columns = [value(tag, steps, speed, rng).tolist() for tag in tags]
        for i, step in enumerate(steps.tolist()):
            rows.append((step, "".join(f"{step},{tag},{col[i]!r}\n"
                                       for tag, col in zip(tags, columns, strict=True))))
    rows.sort(key=lambda row: row[0])  # stable: one step's blocks stay together, in order
    with open(run_dir / SCALARS_CSV, "w") as f:
        f.write("step,tag,value\n")
        f.writelines(text for _, text in rows)
    summary = {"status": "completed", "steps": n_steps, "total_steps": n_steps,
               "wall_s": n_steps / 1000, "device": "cpu", "final": {}, "best": {}}
    (run_dir / SUMMARY_JSON).write_text(json.dumps(summary))
    per_step = len(EVERY_STEP_TAGS) if every_step else None
    return n_steps * per_step if per_step else sum(len(s) * len(t) for s, t in schedule)


def make_sweep(root: Path, n_runs: int, n_steps: int, every_step: bool = False) -> int:
    """Write ``n_runs`` runs (4 norms x seeds) under ``root``; returns the total row count."""
    rows = 0
    for i in range(n_runs):
        norm, seed = NORMS[i % len(NORMS)], i // len(NORMS)
        rows += write_run(root / f"norm={norm},seed={seed}", norm, seed, n_steps, every_step)
    return rows


def bench_report(n_runs: int = 100, n_steps: int = 10_000, every_step: bool = False,
                 verbose: bool = False) -> float:
    """Seconds `bnlab report` takes on a fresh synthetic sweep of ``n_runs`` x ``n_steps``."""
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-report-") as tmp:
        root = Path(tmp) / "sweep"
        rows = make_sweep(root, n_runs, n_steps, every_step)
        size = sum(p.stat().st_size for p in root.rglob(SCALARS_CSV))
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "bnlab", "report", str(root)],
                                capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"bnlab report failed:\n{result.stderr}")
        if verbose:
            print(f"{n_runs} runs x {n_steps:,} steps: {rows:,} scalars.csv rows "
                  f"({rows / n_runs:,.0f} per run, {size / 2**20:,.0f} MiB)")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every-step", action="store_true",
                        help="worst case: 20 tags logged at every step")
    args = parser.parse_args()
    seconds = bench_report(args.runs, args.steps, args.every_step, verbose=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"bnlab report: {seconds:.2f} s wall ({cores} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end: other processes slow it down)")


if __name__ == "__main__":
    main()
