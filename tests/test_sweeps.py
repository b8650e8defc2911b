"""Sweeps (Hydra multirun) through bnlab's command line, with each launcher: run names, and jobs
that fail, diverge or are killed without stopping the others."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.cli import _name_runs_by_swept_keys
from bnlab.config.schema import config_dir

from helpers import bnlab, compose_hydra

# Runs small enough that start-up dominates: a sweep is about what happens around the runs.
TINY = ["data=digits", "train.steps=20", "train.batch_size=32", "train.eval_every=10",
        "train.log_every=10", "train.checkpoint_every=10", "probe=off"]


def _summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def _sweep_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "outputs" / "multirun").rglob("multirun.yaml"))


# ---------------------------------------------------------------- run directories
def test_runs_are_named_after_the_swept_keys_and_sweeps_never_share_a_directory(tmp_path: Path):
    """Two sweeps started together (the same second) get two directories, each holding runs
    named after what varies (norm=bn), not after every override (data=digits,...)."""
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data")}
    env.pop("BNLAB_RUN_ID", None)
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "bnlab", "train", "-m", "norm=none,bn", *TINY,
               "train.progress=off"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    sweeps = _sweep_dirs(tmp_path)
    assert len(sweeps) == 2
    for sweep in sweeps:
        assert re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{6}", sweep.name), sweep.name
        assert sorted(_summaries(sweep)) == ["norm=bn", "norm=none"]
        assert {s["status"] for s in _summaries(sweep).values()} == {"completed"}


def test_fixed_overrides_are_left_out_of_run_names() -> None:
    argv = ["-m", "norm=none,bn", "seed=0,1", "data=digits", "+extra=1", "train.steps=50",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.widths=[10,10]"]
    extended = _name_runs_by_swept_keys(argv, config_dir() / "train.yaml")
    assert extended[:-1] == argv
    key, value = extended[-1].split("=", 1)
    assert key == "hydra.job.config.override_dirname.exclude_keys"
    excluded = value.strip("[]").split(",")
    # train.yaml's own exclusions stay, the fixed keys join them, swept and Hydra keys do not.
    assert {"hydra.launcher.n_jobs", "device", "data", "extra", "train.steps",
            "model.widths"} <= set(excluded)
    assert not {"norm", "seed", "hydra/launcher"} & set(excluded)
    # A user's own list is respected.
    own = ["-m", "norm=none,bn", "data=digits", "hydra.job.config.override_dirname.exclude_keys=[]"]
    assert _name_runs_by_swept_keys(own, config_dir() / "train.yaml") == own


# ---------------------------------------------------------------- launchers and failing jobs
@pytest.mark.parametrize("launcher", ["basic", "joblib", "batched"])
def test_a_failing_and_a_diverging_job_do_not_stop_the_sweep(tmp_path: Path, launcher: str):
    """lr=1e6 without normalization diverges; batch 5000 > the digits training split is a user
    error inside the task. The sweep still runs every job and records what happened to each.
    (batched: the two lr runs of batch 32 share a program; the two of batch 5000 cannot start
    one, so they run one by one and fail as with the basic launcher.)"""
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    done = bnlab("train", "-m", "optim.lr=0.1,1e6", "train.batch_size=32,5000", "norm=none",
                 "activation=relu", *[o for o in TINY if not o.startswith("train.batch_size")],
                 f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = _summaries(sweep)
    status = {name: s["status"] for name, s in summaries.items()}
    assert status == {
        "optim.lr=0.1,train.batch_size=32": "completed",
        "optim.lr=1000000.0,train.batch_size=32": "diverged",
        "optim.lr=0.1,train.batch_size=5000": "failed",
        "optim.lr=1000000.0,train.batch_size=5000": "failed",
    }
    assert "train.batch_size=5000" in summaries["optim.lr=0.1,train.batch_size=5000"]["error"]
    if launcher == "joblib":
        # Each worker takes its share of the cores and prints plain lines named after its run.
        cores = len(os.sched_getaffinity(0))
        assert summaries["optim.lr=0.1,train.batch_size=32"]["threads"] == max(1, cores // 2)
        assert "[optim.lr=0.1,train.batch_size=32] step 20/20" in done.stdout


def test_submitit_local_runs_the_cluster_code_path(tmp_path: Path) -> None:
    """hydra/launcher=submitit_local pickles each job and runs it in its own process, as
    submitit_slurm does on a cluster node; cpus_per_task sets torch's threads."""
    sweep = tmp_path / "sweep"
    done = bnlab("train", "-m", "norm=none,bn", *TINY, "hydra/launcher=submitit_local",
                 "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5",
                 f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = _summaries(sweep)
    assert sorted(summaries) == ["norm=bn", "norm=none"]
    for summary in summaries.values():
        assert summary["status"] == "completed" and summary["steps"] == 20
        assert summary["threads"] == 1
    assert (sweep / ".submitit").is_dir()


def test_the_slurm_example_composes_onto_submitit_slurm() -> None:
    cfg = compose_hydra("hydra/launcher=slurm_example")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min >= 1


# ---------------------------------------------------------------- a killed job
@pytest.mark.slow
def test_a_sweep_survives_a_diverging_and_a_killed_job_and_the_report_lists_all(tmp_path):
    """8 jobs in their own processes (submitit_local): two diverge, one is SIGKILLed mid-run."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data"), "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnlab", "train", "-m", "norm=none,bn", "optim.lr=0.05,0.1,0.2,1e5",
         "activation=relu", "data=digits", "train.steps=6000", "train.checkpoint_every=500",
         "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = sweep / "norm=none,optim.lr=0.2"
    deadline = time.time() + 300
    while time.time() < deadline and not (victim / "checkpoints" / "last.pt").is_file():
        time.sleep(0.2)
    jobs = subprocess.run(["pgrep", "-f", "submitit.core._submit"], capture_output=True, text=True)
    for pid in map(int, jobs.stdout.split()):
        if _runs(pid, victim):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=600)
    statuses = {run.name: json.loads((run / "summary.json").read_text())["status"]
                for run in sweep.glob("norm=*")}
    assert len(statuses) == 8
    assert statuses.pop(victim.name) == "running"
    assert sorted(statuses.values()) == ["completed"] * 5 + ["diverged"] * 2
    result = bnlab("report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "8 runs in 8 group(s)" in result.stdout
    # its summary still says running (a SIGKILL leaves no chance to write); no process holds it
    assert result.stdout.count("diverged") >= 2 and "killed" in result.stdout


def _runs(pid: int, run: Path) -> bool:
    """Whether process ``pid`` holds ``run``'s files open (its TensorBoard or CSV writer)."""
    try:
        return any(str(run) in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False
