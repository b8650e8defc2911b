"""Shared helpers: compose configs like `bnlab train` does, train in-process or as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def compose(*overrides: str):
    """The config `bnlab train <overrides>` would see (Hydra's compose API, same config tree)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bnlab.config import config_dir, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def train_in_process(run_dir: Path, *overrides: str) -> str:
    """Train in this process (no Hydra run directory set-up); returns the final status."""
    from bnlab.train import run

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


@pytest.fixture
def digits_overrides() -> list[str]:
    """A small, fast experiment on scikit-learn's bundled digits."""
    return ["data=digits", "train.steps=60", "train.batch_size=32", "train.eval_every=30",
            "train.log_every=10", "train.checkpoint_every=30", "probe.every=20",
            "probe.batch_size=200"]
