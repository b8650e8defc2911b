"""Test helpers: compose configs like `bnlab train` does, train in-process or as a user would.

Imported by the tests as ``from helpers import ...``; fixtures live in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


from bnlab.config import compose  # noqa: E402  (re-exported for the tests)


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
