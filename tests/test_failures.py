"""A run that diverges, fails or is interrupted: its status in summary.json, one line on stderr
(the traceback in train.log), no partial file and no false record, and it resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.run.checkpoint import load_checkpoint

from helpers import SHORT, bnlab, execute, fail_on_call, scalars, summary_of, train_in_process


# ---------------------------------------------------------------- divergence
def test_divergence_is_a_result_not_a_crash(tmp_path):
    result = bnlab("train", "data=digits", "norm=none", "activation=relu", "optim.lr=1e6",
                   "train.steps=200", "train.log_every=10", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] == summary["steps"] < 200
    rows = (tmp_path / "run" / "scalars.csv").read_text().splitlines()
    assert f"{summary['steps']},train/loss,nan" in rows
    assert sum(r.startswith(f"{summary['steps']},test/acc,") for r in rows) == 1


def test_divergence_can_be_watched_to_the_end(tmp_path):
    status = train_in_process(tmp_path / "run", "data=digits", "norm=none", "activation=relu",
                              "optim.lr=1e6", "train.steps=60", "train.log_every=10",
                              "train.stop_on_divergence=false", "probe=off")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert status == "diverged" and summary["steps"] == 60
    rows = [r.split(",") for r in (tmp_path / "run" / "scalars.csv").read_text().splitlines()[1:]]
    not_finite = [int(step) for step, tag, value in rows if tag == "train/loss" and value in ("nan", "inf")]
    assert summary["diverged_step"] == not_finite[0] < 60  # the first, not the last
    assert [int(step) for step, tag, _ in rows if tag == "test/loss"].count(60) == 1  # one final evaluation


# ---------------------------------------------------------------- exceptions and Ctrl-C
# Runs `bnlab` in a fresh process after a patch of bnlab.run.trainer (a fault injected where a real
# one could happen), so that exit code, stderr and files are what a user would get.
INJECT = """
import sys
sys.path.insert(0, {tests!r})
import bnlab.run.trainer as train
from helpers import fail_on_call
{patch}
from bnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def bnlab_patched(patch: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNLAB_DATA": str(cwd / "data")}
    env.pop("HYDRA_FULL_ERROR", None)
    code = INJECT.format(patch=patch, tests=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_an_exception_in_the_loop_marks_the_run_failed_with_one_line_and_the_traceback_logged(tmp_path):
    result = bnlab_patched("train.evaluate = fail_on_call(2, ValueError('boom'), train.evaluate)",
                           "train", *SHORT, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("bnlab: error: ValueError: boom; run run failed "
                             "(traceback in run/train.log)\n")
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and summary["error"] == "ValueError: boom"
    assert summary["steps"] == 20  # the second evaluation
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and log.rstrip().endswith("ValueError: boom")


@pytest.mark.parametrize("where", ["load_dataset", "versions"])  # before the Trainer; first summary
def test_an_exception_before_training_also_ends_failed(tmp_path, monkeypatch, capsys, where):
    import bnlab.run.trainer

    monkeypatch.chdir(tmp_path)
    trainer = bnlab.run.trainer
    monkeypatch.setattr(trainer, where, fail_on_call(1, ValueError("boom"), getattr(trainer, where)))
    assert execute(tmp_path / "run") == 1
    assert capsys.readouterr().err == ("bnlab: error: ValueError: boom; run run failed "
                                       "(traceback in run/train.log)\n")
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and summary["error"] == "ValueError: boom"
    assert summary["steps"] == 0
    assert "ValueError: boom" in (tmp_path / "run" / "train.log").read_text()


def test_ctrl_c_before_training_keeps_nothing(tmp_path, monkeypatch, capsys):
    import bnlab.run.trainer

    monkeypatch.setattr(bnlab.run.trainer, "load_dataset", fail_on_call(1, KeyboardInterrupt(), None))
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    assert execute(tmp_path / "run") == 130
    assert capsys.readouterr().err == "bnlab: interrupted before training started; nothing kept\n"
    assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_mid_run_says_interrupted_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C raises KeyboardInterrupt wherever the loop is (here: in an evaluation)."""
    import bnlab.run.trainer

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        trainer = bnlab.run.trainer
        patch.setattr(trainer, "evaluate", fail_on_call(3, KeyboardInterrupt(), trainer.evaluate))
        assert execute(tmp_path / "run") == 130
    assert capsys.readouterr().err == "bnlab: interrupted; resume with: bnlab train resume=run\n"
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "interrupted" and summary["steps"] == 30
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 20
    assert execute(tmp_path / "run", f"resume={tmp_path / 'run'}") == 0
    assert execute(tmp_path / "straight") == 0
    assert scalars(tmp_path / "run") == scalars(tmp_path / "straight")
    assert summary_of(tmp_path / "run")["status"] == "completed"


# ---------------------------------------------------------------- write failures
def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob("*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_fails_the_run_in_one_line_keeps_the_last_checkpoint_and_resumes(tmp_path):
    """On a real small file system: the second checkpoint does not fit next to the first."""
    big = [*SHORT, "model.widths=[500,500]", "train.checkpoint_every=20", "train.eval_every=20"]
    assert bnlab("train", *big, "hydra.run.dir=reference", cwd=tmp_path).returncode == 0
    size = (tmp_path / "reference" / "checkpoints" / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    kib = (size + size // 2 + (256 << 10)) >> 10  # one checkpoint and the small files, not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "run"
        full = bnlab("train", *big, f"hydra.run.dir={run}", cwd=tmp_path)
        assert full.returncode == 1
        assert full.stderr == (f"bnlab: error: cannot write {run}/checkpoints/last.pt: No space left on "
                               "device [ENOSPC]; run disk/run failed (traceback in disk/run/train.log); "
                               "once fixed: bnlab train resume=disk/run\n")
        assert leftovers(run) == []
        assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 20
        summary = summary_of(run)
        assert summary["status"] == "failed" and summary["steps"] == 40
        assert summary["error"].endswith("No space left on device [ENOSPC]")
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # the cause is gone
        resumed = bnlab("train", f"resume={run}", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert scalars(run) == scalars(tmp_path / "reference")
        assert summary_of(run)["status"] == "completed"
    finally:
        subprocess.run(["umount", str(disk)])


class FailingFile:
    """A file whose writes start failing with ``error`` after ``good`` of them."""

    def __init__(self, file, good: int, error: OSError) -> None:
        self.file, self.good, self.error = file, good, error

    def write(self, data):
        self.good -= 1
        if self.good < 0:
            self.file.write(data[: len(data) // 2])  # a partial write, as a full disk does
            raise self.error
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("target, good, errno_", [
    ("scalars.csv", 5, 28),          # a step's scalars, after 5 writes of them (and the header)
    ("last.pt.tmp", 2, 13),          # the third checkpoint
    ("summary.json.tmp", 2, 13),     # the summary refreshed at a checkpoint; then in place
    ("events", 3, 28),               # TensorBoard's writer thread
])
def test_write_failures_name_the_file_leave_no_partial_file_and_resume(
        tmp_path, monkeypatch, capsys, target, good, errno_):
    import builtins

    from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

    import bnlab.rundir.writer

    monkeypatch.chdir(tmp_path)
    error = OSError(errno_, os.strerror(errno_))
    countdown = [good]

    def fails_now() -> bool:
        countdown[0] -= 1
        return countdown[0] < 0

    def partial_write(fd, data):  # half of the data reaches the disk, then it is full
        if fails_now():
            os.write(fd, data[: len(data) // 2])
            raise error
        return bnlab.rundir.writer.os.write(fd, data)

    def failing_append(self, filename, content, binary_mode=False):
        if fails_now():
            raise error
        return append(self, filename, content, binary_mode)

    def failing_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        return FailingFile(file, 0, error) if Path(path).name == target and fails_now() else file

    append = LocalFileSystem.append
    with monkeypatch.context() as patch:
        if target == "events":
            patch.setattr(LocalFileSystem, "append", failing_append)
        elif target == "scalars.csv":
            patch.setattr(bnlab.rundir.writer, "_write_all", lambda fd, data: partial_write(fd, data))
        else:
            patch.setattr(bnlab.rundir.writer, "open", failing_open, raising=False)
        assert execute(tmp_path / "run") == 1
    err = capsys.readouterr().err
    name = {"last.pt.tmp": "checkpoints/last.pt", "summary.json.tmp": "summary.json"}.get(target, target)
    code = {28: "ENOSPC", 13: "EACCES"}[errno_]
    assert err.startswith(f"bnlab: error: cannot write {tmp_path / 'run'}/{name}")
    assert f": {os.strerror(errno_)} [{code}]; run run failed (traceback in run/train.log)" in err
    assert len(err.splitlines()) == 1
    assert leftovers(tmp_path / "run") == []
    assert (tmp_path / "run" / "scalars.csv").read_text().endswith("\n")  # whole rows only
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and summary["error"].endswith(f"[{code}]")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] <= summary["steps"]
    assert execute(tmp_path / "run", f"resume={tmp_path / 'run'}") == 0
    assert execute(tmp_path / "straight") == 0
    assert scalars(tmp_path / "run") == scalars(tmp_path / "straight")
