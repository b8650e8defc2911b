"""Resume after a crash, interrupts, divergence and bad input: nothing already written is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab.checkpoint import load_checkpoint, save_checkpoint
from bnlab.record import truncate_scalars

from conftest import bnlab, train_in_process

LONG = ["data=digits", "norm=bn", "train.steps=2400", "train.log_every=20", "train.eval_every=200",
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    proc = start(cwd / "run", cwd)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return cwd / "run"


def test_sigkill_then_resume_gives_exactly_the_uninterrupted_scalars(tmp_path, reference):
    run = tmp_path / "run"
    proc = start(run, tmp_path)
    wait_for_checkpoint(run, proc, 600)
    proc.kill()
    proc.wait()
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    resumed = bnlab("train", f"resume={run}", "train.progress=plain", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert scalars(run) == scalars(reference)  # every step once, every value equal
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["status"] == "completed" and summary["steps"] == 2400
    assert summary["final"]["test/acc"] == expected["final"]["test/acc"]
    assert summary["best"] == expected["best"]
    assert not (run / ".hydra" / "config.yaml.tmp").exists() and len(list(run.glob(".hydra/*"))) == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars("train/loss")
    steps = [e.step for e in board]
    assert steps == sorted(set(steps)) and steps[-1] == 2400  # purge_step removed the killed tail


def test_sigkill_then_resume_is_bit_identical_with_the_grouped_sampler(tmp_path):
    # 128 batches a planned chunk, a checkpoint every 100 steps: resumes start mid-chunk.
    grouped = ["data.sampler=grouped", "data.labels_per_batch=4", "train.batch_size=32",
               "train.steps=600"]
    reference = start(tmp_path / "reference", tmp_path, *grouped)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    run = tmp_path / "run"
    proc = start(run, tmp_path, *grouped)
    wait_for_checkpoint(run, proc, 200)
    proc.kill()
    proc.wait()
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    resumed = bnlab("train", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = scalars(tmp_path / "reference")
    assert any(t == "test/acc_train_mode" for _, t, _ in expected)
    assert scalars(run) == expected


def test_sigint_checkpoints_marks_interrupted_and_resumes(tmp_path, reference):
    run = tmp_path / "run"
    proc = start(run, tmp_path)
    wait_for_checkpoint(run, proc, 300)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"resume with: bnlab train resume={run}" in err and "Traceback" not in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == summary["steps"]
    resumed = bnlab("train", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert scalars(run) == scalars(reference)


def test_resume_refuses_changing_the_experiment(tmp_path, reference):
    result = bnlab("train", f"resume={reference}", "optim.lr=0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("bnlab: error: resume=: cannot change the experiment of a run "
                                    "(optim.lr=0.5)")


def test_resume_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "junk").mkdir()
    result = bnlab("train", f"resume={tmp_path / 'junk'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"bnlab: error: resume={tmp_path / 'junk'}: not a bnlab run "
                                     "directory (no .hydra/config.yaml)")


def test_checkpoint_from_a_different_model_is_refused_and_nothing_lost(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    other = tmp_path / "other"
    train_in_process(other, "data=digits", "model.widths=[30,30]", "train.steps=5", "probe=off")
    shutil.copy(other / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = bnlab("train", f"resume={run}", "train.steps=2500", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("bnlab: error: checkpoint does not match this run's model")
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert load_checkpoint(path)["step"] == 1  # the previous checkpoint survives


def test_divergence_is_a_result_not_a_crash(tmp_path):
    result = bnlab("train", "data=digits", "norm=none", "activation=relu", "optim.lr=1e6",
                   "train.steps=200", "train.log_every=10", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == summary["steps"] < 200
    rows = (tmp_path / "run" / "scalars.csv").read_text().splitlines()
    assert f"{summary['steps']},train/loss,nan" in rows
    assert any(r.startswith(f"{summary['steps']},test/acc,") for r in rows)


def test_divergence_can_be_watched_to_the_end(tmp_path):
    status = train_in_process(tmp_path / "run", "data=digits", "norm=none", "activation=relu",
                              "optim.lr=1e6", "train.steps=60", "train.log_every=10",
                              "train.stop_on_divergence=false", "probe=off")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert status == "diverged" and summary["steps"] == 60 and summary["diverged_step"] <= 60


def test_partial_last_csv_row_is_never_data(tmp_path):
    path = tmp_path / "scalars.csv"
    path.write_text("step,tag,value\n10,train/loss,0.5\n20,train/loss,0.4\n30,train/lo")
    truncate_scalars(path, after_step=100)
    assert path.read_text() == "step,tag,value\n10,train/loss,0.5\n20,train/loss,0.4\n"
    truncate_scalars(path, after_step=10)
    assert path.read_text() == "step,tag,value\n10,train/loss,0.5\n"


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
    assert result.stdout.count("diverged") >= 2 and "running" in result.stdout


def _runs(pid: int, run: Path) -> bool:
    """Whether process ``pid`` holds ``run``'s files open (its TensorBoard or CSV writer)."""
    try:
        return any(str(run) in os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False
