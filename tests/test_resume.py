"""`resume=` (bnlab.run.resume, bnlab.run.checkpoint): a run killed (SIGKILL) or interrupted (SIGINT)
resumes to exactly the scalars of the uninterrupted run, from its own saved config (a config group
of the user's own included); extending it gives the longer run; resume refuses what would change
or shorten the run, and a damaged or incomplete directory; a checkpoint is replaced atomically."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from bnlab.run.checkpoint import load_checkpoint, save_checkpoint

from helpers import LONG, bnlab, scalars, start, train_in_process, wait_for_checkpoint


@pytest.fixture(scope="session")
def reference(tmp_path_factory, worker_id) -> Path:
    """The uninterrupted run, as `bnlab train` writes it: trained once per test session, by the
    first xdist worker to ask (the others wait on the lock, then read the finished run)."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # this session's folder, above each worker's own
    run = shared / "resume-reference" / "run"
    with open(shared / "resume-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "summary.json").exists():
            run.parent.mkdir(exist_ok=True)
            proc = start(run, run.parent)
            assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return run


def test_sigkill_then_resume_gives_exactly_the_uninterrupted_scalars(tmp_path, reference):
    run = tmp_path / "run"
    proc = start(run, tmp_path)
    wait_for_checkpoint(run, proc, 300)
    proc.kill()
    proc.wait()
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    resumed = bnlab("train", f"resume={run}", "train.progress=plain", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert scalars(run) == scalars(reference)  # every step once, every value equal
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["status"] == "completed" and summary["steps"] == 1200
    assert summary["final"]["test/acc"] == expected["final"]["test/acc"]
    assert summary["best"] == expected["best"]
    assert not (run / ".hydra" / "config.yaml.tmp").exists() and len(list(run.glob(".hydra/*"))) == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Scalars("train/loss")
    steps = [e.step for e in board]
    assert steps == sorted(set(steps)) and steps[-1] == 1200  # purge_step removed the killed tail


def test_sigkill_then_resume_is_bit_identical_with_the_grouped_sampler(tmp_path):
    # 128 batches a planned chunk, a checkpoint every 100 steps: resumes start mid-chunk.
    grouped = ["data.sampler=grouped", "data.labels_per_batch=4", "train.batch_size=32",
               "train.steps=600"]
    assert train_in_process(tmp_path / "reference", *LONG, *grouped) == "completed"
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
    wait_for_checkpoint(run, proc, 200)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "bnlab: interrupted; resume with: bnlab train resume=run\n"  # relative to the cwd
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == summary["steps"]
    resumed = bnlab("train", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert scalars(run) == scalars(reference)


# ---------------------------------------------------------------- refused
def test_resume_refuses_changing_the_experiment(tmp_path, reference):
    result = bnlab("train", f"resume={reference}", "optim.lr=0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"bnlab: error: resume={reference}: optim.lr=0.5 would change the run's "
                             "experiment (its .hydra/config.yaml says optim.lr=0.1); only device, "
                             "train.progress, train.threads, data.root, train.steps, train.epochs "
                             "may be given\n")
    same = bnlab("train", f"resume={reference}", "optim.lr=0.1", "norm=bn", "data=digits", cwd=tmp_path)
    assert same.returncode == 2  # agrees with the saved config; the run has nothing left to do
    assert same.stderr == (f"bnlab: error: resume={reference}: the run has completed its 1200 steps; "
                           "give train.steps above 1200 to train it further\n")


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
    # .lock holds the pid of the last process that held the run: bookkeeping, not the run's data
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    result = bnlab("train", f"resume={run}", "train.steps=1300", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("bnlab: error: checkpoint does not match this run's model")
    assert len(result.stderr.strip().splitlines()) == 1
    assert files() == before


# ---------------------------------------------------------------- checkpoints
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


# ---------------------------------------------------------------- the saved config is the run's truth
def test_a_run_resumes_from_its_saved_config_even_when_its_own_config_group_changed(tmp_path):
    """A config group of the user's own (hydra.searchpath): the run resumes from its saved
    .hydra/config.yaml, so a default changed since (here the group's lr) changes nothing; and
    extending it (train.steps above the current step) gives the scalars of the longer run and
    writes the new length into the saved config."""
    mine = tmp_path / "mine" / "optim"
    mine.mkdir(parents=True)
    (mine / "slow.yaml").write_text("defaults:\n  - /schema/optim@_here_\n  - _self_\nname: sgd\nlr: 0.05\n")
    quick = ["data=digits", "train.log_every=10", "train.eval_every=10", "train.checkpoint_every=10",
             "probe=off", "train.threads=1", "train.progress=off",
             f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "optim=slow"]
    assert bnlab("train", *quick, "train.steps=20", "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    assert bnlab("train", *quick, "train.steps=40", "hydra.run.dir=straight", cwd=tmp_path).returncode == 0
    (mine / "slow.yaml").write_text((mine / "slow.yaml").read_text().replace("0.05", "0.5"))
    resumed = bnlab("train", "resume=run", "train.steps=40", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "completed: 40/40 steps" in resumed.stdout
    assert scalars(tmp_path / "run") == scalars(tmp_path / "straight")
    assert {v for _, t, v in scalars(tmp_path / "run") if t == "train/lr"} == {0.05}
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "  steps: 40\n" in saved and "lr: 0.05" in saved
    assert "train.steps=40" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()


def test_resume_refuses_a_shorter_run_and_a_damaged_or_incomplete_directory(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shorter = bnlab("train", "resume=run", "train.steps=1000", cwd=tmp_path)
    assert shorter.returncode == 2
    assert shorter.stderr == ("bnlab: error: train.steps=1000 is below the run's current step (1200); a "
                              "run cannot be shortened: give a length above it, or start a new run\n")
    config = run / ".hydra" / "config.yaml"
    config.write_text(config.read_text()[:700])  # cut short, as a full disk leaves it
    damaged = bnlab("train", "resume=run", "train.steps=1300", cwd=tmp_path)
    assert damaged.returncode == 2
    assert damaged.stderr.startswith("bnlab: error: resume=run: run/.hydra/config.yaml is damaged (")
    assert damaged.stderr.endswith("); the run cannot be resumed\n") and len(damaged.stderr.splitlines()) == 1
    shutil.copy(reference / ".hydra" / "config.yaml", config)
    (run / ".hydra" / "overrides.yaml").unlink()
    incomplete = bnlab("train", "resume=run", "train.steps=1300", cwd=tmp_path)
    assert incomplete.returncode == 2
    assert incomplete.stderr == ("bnlab: error: resume=run: run/.hydra/overrides.yaml is missing: the run "
                                 "directory is not whole (Hydra writes it with config.yaml)\n")
