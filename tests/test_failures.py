"""A run that diverges, fails or is interrupted, at any moment from start-up on, or whose disk
fills up: its status in summary.json, one line on stderr (the traceback in train.log), no
partial file and no false record, and it resumes (or leaves no directory at all)."""

from __future__ import annotations

import json
import os
import re
import signal
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
    assert train_in_process(tmp_path / "reference", *big) == "completed"
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


# ---------------------------------------------------------------- an interrupt at any moment of start-up
# A real signal sent by the process to itself at one moment of start-up, through the real
# command line: torch is not imported before `bnlab train` starts (unlike INJECT's patches).
STARTUP = """
import os, signal, sys
sys.path.insert(0, {tests!r})
{patch}
from bnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""
MOMENTS = {
    # bnlab's checks on the command line, before Hydra
    "checks": "import bnlab.run.preflight as p\n"
              "check = p.check_output_dir\n"
              "def interrupted(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    return check(*a, **k)\n"
              "p.check_output_dir = interrupted",
    # Hydra has made the run directory and written .hydra/config.yaml
    "hydra_files": "import hydra.core.utils as u\n"
                   "save = u._save_config\n"
                   "def interrupted(cfg, name, where):\n"
                   "    save(cfg, name, where)\n"
                   "    if name == 'config.yaml':\n"
                   "        os.kill(os.getpid(), signal.SIGINT)\n"
                   "u._save_config = interrupted",
    # in the middle of torch's import (SIGTERM, as a scheduler's)
    "torch_import": "class Finder:\n"
                    "    def find_spec(self, name, path=None, target=None):\n"
                    "        if name == 'torch':\n"
                    "            sys.meta_path.remove(self)\n"
                    "            os.kill(os.getpid(), signal.SIGTERM)\n"
                    "sys.meta_path.insert(0, Finder())",
    # the trainer's handlers are in place, the data set loads
    "data": "import bnlab.run.trainer as t\n"
            "load = t.load_dataset\n"
            "def interrupted(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return load(*a, **k)\n"
            "t.load_dataset = interrupted",
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_an_interrupt_during_start_up_ends_in_one_line_and_leaves_no_directory(tmp_path, moment):
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data")}
    env.pop("HYDRA_FULL_ERROR", None)
    code = STARTUP.format(tests=str(Path(__file__).parent), patch=MOMENTS[moment])
    result = subprocess.run([sys.executable, "-c", code, "train", *SHORT], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 130
    assert result.stderr == "bnlab: interrupted before training started; nothing kept\n"
    assert not (tmp_path / "outputs").exists()  # neither the run nor the folders made for it


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.4, 1.2, 2.0, 2.8])
def test_an_interrupt_at_any_moment_leaves_no_directory_or_a_run_that_resumes(tmp_path, delay):
    """Whatever the moment (start-up, training, evaluation, a checkpoint): one line, exit 130,
    and either nothing or an interrupted run that resumes to the uninterrupted scalars."""
    import time

    from helpers import LONG, start

    proc = start(tmp_path / "run", tmp_path, "train.steps=600", "train.checkpoint_every=50",
                 "train.progress=off")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    if err == "bnlab: interrupted before training started; nothing kept\n":
        assert not (tmp_path / "run").exists()
        return
    assert err == "bnlab: interrupted; resume with: bnlab train resume=run\n"
    assert summary_of(tmp_path / "run")["status"] == "interrupted"
    assert bnlab("train", "resume=run", cwd=tmp_path).returncode == 0
    assert train_in_process(tmp_path / "reference", *LONG, "train.steps=600",
                            "train.checkpoint_every=50") == "completed"
    assert scalars(tmp_path / "run") == scalars(tmp_path / "reference")


def test_a_run_interrupted_before_its_first_step_resumes_with_each_step_once(tmp_path):
    """The probe at step 0 comes before the first step; a resume from step 0 must not log it again."""
    probed = ["probe=default", "probe.every=10", "probe.batch_size=200"]
    patch = ("import os, signal\n"
             "import bnlab.probes.activations as a\n"
             "probe = a.Prober.probe\n"
             "def interrupted(self, step, *args, **kwargs):\n"
             "    if step == 0:\n"
             "        os.kill(os.getpid(), signal.SIGINT)\n"
             "    return probe(self, step, *args, **kwargs)\n"
             "a.Prober.probe = interrupted")
    stopped = bnlab_patched(patch, "train", *SHORT, *probed, "hydra.run.dir=run", cwd=tmp_path)
    assert stopped.returncode == 130
    assert stopped.stderr == "bnlab: interrupted; resume with: bnlab train resume=run\n"
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 0
    resumed = bnlab("train", "resume=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    rows = scalars(tmp_path / "run")
    assert any(step == 0 and tag.startswith("pct/") for step, tag, _ in rows)
    assert len({(step, tag) for step, tag, _ in rows}) == len(rows)  # each step once, step 0 too
    assert {step for step, tag, _ in rows if tag == "train/loss"} == {10, 20, 30, 40}


# ---------------------------------------------------------------- a disk that is completely full
def mount_tmpfs(disk: Path, size: str) -> None:
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the file system has not a byte left."""
    with open(path, "wb", buffering=0) as f:
        block = bytes(1 << 16)
        while block:
            try:
                f.write(block)
            except OSError:
                block = block[: len(block) // 2]


def whole_records(events: Path) -> int:
    """How many records a TensorBoard event file holds; fails on a half-written one at its end
    (a record: 8-byte length, 4-byte CRC, the data, 4-byte CRC)."""
    data, at, count = events.read_bytes(), 0, 0
    while at < len(data):
        assert at + 12 <= len(data), f"half a record header at byte {at} of {len(data)}"
        at += 12 + int.from_bytes(data[at: at + 8], "little") + 4
        assert at <= len(data), f"half a record at the end of {events.name}"
        count += 1
    return count


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_completely_full_disk_before_the_run_is_refused_in_one_line(tmp_path):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "256k")
    try:
        fill(disk / "filler")
        result = bnlab("train", *SHORT, "hydra.run.dir=disk/run", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr == (f"bnlab: error: hydra.run.dir=disk/run: cannot write under {disk} (No "
                                 "space left on device); choose another directory with "
                                 "hydra.run.dir=<dir>\n")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_disk_that_fills_completely_mid_run_fails_it_in_one_line_and_it_resumes(tmp_path):
    """Not a byte left, not even for train.log: one line (no traceback), the event file cut back
    to whole records, the last checkpoint intact; once space is freed the run resumes exactly."""
    from helpers import start, wait_for_checkpoint

    disk = tmp_path / "disk"
    mount_tmpfs(disk, "8m")
    try:
        run = disk / "run"
        # Rows at every step: scalars.csv's last page fills up long before the next checkpoint,
        # whose failed temporary file would give space back.
        every = ["train.log_every=1", "train.checkpoint_every=100", "probe=off"]
        proc = start(run, tmp_path, "train.steps=100000", *every, "train.progress=off")
        wait_for_checkpoint(run, proc, 100)
        fill(disk / "filler")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        assert re.fullmatch(f"bnlab: error: cannot write {run}/(scalars.csv|events.out.tfevents.[^:]+): No "
                            r"space left on device \[ENOSPC\]; run disk/run failed \(train.log not "
                            r"writable\); once fixed: bnlab train resume=disk/run\n", err), err
        (events,) = run.glob("events.out.tfevents.*")
        assert whole_records(events) > 1
        assert not list(run.rglob("*.tmp"))
        summary = summary_of(run)
        assert summary["status"] == "failed" and summary["error"].endswith("[ENOSPC]")
        step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
        (disk / "filler").unlink()
        resumed = bnlab("train", f"resume={run}", f"train.steps={step + 30}", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        rows = scalars(run)  # every step once (the write failures' exact resume: above)
        assert sorted(s for s, t, _ in rows if t == "train/loss") == list(range(1, step + 31))
        assert len({(s, t) for s, t, _ in rows}) == len(rows)
    finally:
        subprocess.run(["umount", str(disk)])
