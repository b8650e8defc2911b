"""Test helpers: compose configs like `bnlab train` does, train in-process or as a user would,
make run directories by hand and read them back, start and stop real runs.

Imported by the tests as ``from helpers import ...``; fixtures live in conftest.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


import torch  # noqa: E402

from bnlab.config.schema import compose, config_dir  # noqa: E402  (compose is re-exported for the tests)


def train_in_process(run_dir: Path, *overrides: str) -> str:
    """Train in this process (no Hydra run directory set-up); returns the final status."""
    from bnlab.run.trainer import run

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = compose("train.progress=off", "train.threads=1", *overrides)
    return run(cfg, run_dir)


def bnlab(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
          ) -> subprocess.CompletedProcess:
    """Run the `bnlab` command line as a user would (python -m bnlab), capturing its output."""
    full_env = {**os.environ, "BNLAB_DATA": str(cwd / "data"), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "bnlab", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def compose_hydra(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bnlab.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides),
                             return_hydra_config=True)


# ---------------------------------------------------------------- runs made by hand (report, claims)
def csv_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} straight from scalars.csv, complete lines only."""
    text = (run_dir / "scalars.csv").read_text()
    lines = text.splitlines(keepends=True)
    series: dict[str, list[tuple[int, float]]] = {}
    for row in csv.DictReader(line for line in lines if line.endswith("\n")):
        series.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return series


def run_main(argv: list[str]) -> tuple[int, str]:
    from contextlib import redirect_stdout
    from io import StringIO

    from bnlab.report.command import main

    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


_COMPOSED: dict[tuple, dict] = {}


def synthetic_run(root: Path, overrides: list[str], acc: list[float], claims=(),
                  status: str = "completed", every: int = 10) -> Path:
    """A run directory as `bnlab train -m` leaves it, with made-up test/acc values (test/loss is
    1 - acc): the composed config (with the preset's claims), overrides, scalars.csv, summary."""
    import copy

    from omegaconf import OmegaConf

    base = tuple(o for o in overrides if not o.startswith("seed="))
    if base not in _COMPOSED:
        _COMPOSED[base] = OmegaConf.to_container(compose("train.progress=off", *base), resolve=True)
    config = copy.deepcopy(_COMPOSED[base])
    config["seed"] = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
    config["claims"] = list(claims)
    run_dir = root / ",".join(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    rows = ["step,tag,value"]
    for i, value in enumerate(acc, 1):
        rows += [f"{i * every},test/acc,{value!r}", f"{i * every},test/loss,{1 - value!r}"]
    (run_dir / "scalars.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": status, "steps": len(acc) * every, "total_steps": len(acc) * every,
         "wall_s": 1.0}))
    return run_dir


def sweep_of(root: Path, finals: dict[str, list[float]], claims=(), extra=(),
             first: float = 0.5) -> Path:
    """One run per (norm, seed): test/acc goes ``first`` -> the final value given per seed."""
    for norm, values in finals.items():
        for seed, value in enumerate(values):
            synthetic_run(root, [f"norm={norm}", *extra, f"seed={seed}"], [first, value], claims)
    return root


# ---------------------------------------------------------------- real runs (resume, lock, failures)
LONG = ["data=digits", "norm=bn", "train.steps=1200", "train.log_every=20", "train.eval_every=200",
        "train.checkpoint_every=100", "probe.every=100", "probe.batch_size=200", "train.threads=1"]


def scalars(run: Path) -> list[tuple[int, str, float]]:
    rows = [line.split(",") for line in (run / "scalars.csv").read_text().splitlines()[1:]]
    return [(int(s), t, float(v)) for s, t, v in rows if not t.startswith("perf/")]


def start(run: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "BNLAB_DATA": str(cwd / "data"), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bnlab", "train", *LONG, *extra,
                             f"hydra.run.dir={run}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, min_step: int) -> None:
    from bnlab.run.checkpoint import load_checkpoint

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        ckpt = run / "checkpoints" / "last.pt"
        if ckpt.is_file():
            try:
                if load_checkpoint(ckpt)["step"] >= min_step:
                    return
            except Exception:  # being replaced right now
                pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {min_step} (exit {proc.poll()})")


SHORT = ["data=digits", "train.steps=40", "train.log_every=10", "train.eval_every=10",
         "train.checkpoint_every=10", "probe=off", "train.threads=1", "train.progress=off"]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def execute(run: Path, *overrides: str) -> int:
    """`bnlab train` in this process, from the run directory on: its exit code."""
    from bnlab.run.trainer import execute as execute_job

    run.mkdir(parents=True, exist_ok=True)
    return execute_job(compose(*SHORT, *overrides), run, multirun=False)


def fail_on_call(n: int, exc: BaseException, original):
    """``original`` that raises ``exc`` at its n-th call instead (a fault injected where a real
    one could happen); also used inside the subprocesses of test_failures.py."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return original(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------- a known Hessian (landscape, curvature)
class Point(torch.nn.Module):
    """theta itself as the output: with a quadratic loss, L(theta) = 0.5 (theta - c)' H (theta - c)."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def quadratic(hessian: torch.Tensor):
    def loss(theta, c):
        d = theta - c
        return 0.5 * d @ hessian @ d
    return loss
