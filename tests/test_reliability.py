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
from bnlab.record import Recorder, truncate_scalars

from helpers import bnlab, compose, train_in_process

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
    assert err == "bnlab: interrupted; resume with: bnlab train resume=run\n"  # relative to the cwd
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
    # .lock holds the pid of the last process that held the run: bookkeeping, not the run's data
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    result = bnlab("train", f"resume={run}", "train.steps=2500", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("bnlab: error: checkpoint does not match this run's model")
    assert len(result.stderr.strip().splitlines()) == 1
    assert files() == before


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
    truncate_scalars(path, from_step=100)
    assert path.read_text() == "step,tag,value\n10,train/loss,0.5\n20,train/loss,0.4\n"
    truncate_scalars(path, from_step=20)
    assert path.read_text() == "step,tag,value\n10,train/loss,0.5\n"


def test_a_resumed_recorder_drops_the_same_steps_from_the_csv_as_from_tensorboard(tmp_path):
    """A checkpoint at step 10: the killed attempt's rows at 11 and later go from both sinks,
    so the resumed run logs step 11 once (log_every=1 logs every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = Recorder(tmp_path)
    for step in (9, 10, 11, 12):
        first.scalars(step, {"train/loss": 1.0 / step})
    first.close()
    resumed = Recorder(tmp_path, purge_step=11)
    resumed.scalars(11, {"train/loss": 0.5})
    resumed.close()
    assert [tuple(line.split(",")[:1]) for line in (tmp_path / "scalars.csv").read_text().splitlines()[1:]] \
        == [("9",), ("10",), ("11",)]
    board = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0}).Reload().Scalars("train/loss")
    assert [(e.step, e.value) for e in board] == [(9, pytest.approx(1 / 9)), (10, pytest.approx(0.1)),
                                                   (11, 0.5)]


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


# ---------------------------------------------------------------- no false record
SHORT = ["data=digits", "train.steps=40", "train.log_every=10", "train.eval_every=10",
         "train.checkpoint_every=10", "probe=off", "train.threads=1", "train.progress=off"]

# Runs `bnlab` in a fresh process after a patch of bnlab.train (a fault injected where a real
# one could happen), so that exit code, stderr and files are what a user would get.
INJECT = """
import sys
import bnlab.train as train
calls = []
def nth_call(original, n, exc):
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return original(*args, **kwargs)
    return wrapper
{patch}
from bnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def bnlab_patched(patch: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNLAB_DATA": str(cwd / "data")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", INJECT.format(patch=patch), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def execute(run: Path, *overrides: str) -> int:
    """`bnlab train` in this process, from the run directory on: its exit code."""
    from bnlab.train import execute as execute_job

    run.mkdir(parents=True, exist_ok=True)
    return execute_job(compose(*SHORT, *overrides), run, multirun=False)


def fail_on_call(n: int, exc: BaseException, original):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return original(*args, **kwargs)
    return wrapper


def test_an_exception_in_the_loop_marks_the_run_failed_with_one_line_and_the_traceback_logged(tmp_path):
    result = bnlab_patched("train.evaluate = nth_call(train.evaluate, 2, ValueError('boom'))",
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
    import bnlab.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bnlab.train, where, fail_on_call(1, ValueError("boom"), getattr(bnlab.train, where)))
    assert execute(tmp_path / "run") == 1
    assert capsys.readouterr().err == ("bnlab: error: ValueError: boom; run run failed "
                                       "(traceback in run/train.log)\n")
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and summary["error"] == "ValueError: boom"
    assert summary["steps"] == 0
    assert "ValueError: boom" in (tmp_path / "run" / "train.log").read_text()


def test_ctrl_c_before_training_keeps_nothing(tmp_path, monkeypatch, capsys):
    import bnlab.train

    monkeypatch.setattr(bnlab.train, "load_dataset", fail_on_call(1, KeyboardInterrupt(), None))
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    assert execute(tmp_path / "run") == 130
    assert capsys.readouterr().err == "bnlab: interrupted before training started; nothing kept\n"
    assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_mid_run_says_interrupted_and_the_run_resumes_exactly(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C raises KeyboardInterrupt wherever the loop is (here: in an evaluation)."""
    import bnlab.train

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(bnlab.train, "evaluate", fail_on_call(3, KeyboardInterrupt(), bnlab.train.evaluate))
        assert execute(tmp_path / "run") == 130
    assert capsys.readouterr().err == "bnlab: interrupted; resume with: bnlab train resume=run\n"
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "interrupted" and summary["steps"] == 30
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 20
    assert execute(tmp_path / "run", f"resume={tmp_path / 'run'}") == 0
    assert execute(tmp_path / "straight") == 0
    assert scalars(tmp_path / "run") == scalars(tmp_path / "straight")
    assert summary_of(tmp_path / "run")["status"] == "completed"


# ---------------------------------------------------------------- one writer per run directory
HOLD = "import sys, time; from pathlib import Path; from bnlab.lock import hold\n" \
       "with hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)"


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    from bnlab.lock import RunLocked, hold, holder

    holder_proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                                   text=True)
    try:
        assert holder_proc.stdout.readline() == "held\n"
        assert holder(tmp_path) == holder_proc.pid
        with pytest.raises(RunLocked, match=f"being written by process {holder_proc.pid} "), \
                hold(tmp_path, wait_s=0.2):
            pass
    finally:
        holder_proc.kill()
        holder_proc.wait()
    assert holder(tmp_path) is None  # the kernel released it with the process
    with hold(tmp_path, wait_s=0):
        assert holder(tmp_path) == os.getpid()


def test_a_second_writer_in_the_task_touches_nothing(tmp_path, monkeypatch, capsys):
    """The command line refuses a live run first; the task refuses one too (a race past it)."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)  # looks like a fresh run: a user error would remove it
    holder_proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder_proc.stdout.readline() == "held\n"
        assert execute(run) == 2
    finally:
        holder_proc.kill()
        holder_proc.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"bnlab: error: {run} is being written by process {holder_proc.pid} ")
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock"]


def test_one_writer_per_run_even_from_the_command_line_and_sigkill_frees_it(tmp_path):
    run = tmp_path / "run"
    proc = start(run, tmp_path)
    try:
        wait_for_checkpoint(run, proc, 100)
        hydra_files = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
        for args in ([f"resume={run}"], [*LONG, f"hydra.run.dir={run}"]):
            second = bnlab("train", *args, cwd=tmp_path)
            assert second.returncode == 2
            assert second.stderr.startswith(f"bnlab: error: {run} is being written by process {proc.pid} ")
            assert len(second.stderr.splitlines()) == 1
        assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files
    finally:
        proc.kill()
        proc.wait()
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    resumed = bnlab("train", f"resume={run}", f"train.steps={step + 40}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert summary_of(run)["status"] == "completed" and summary_of(run)["steps"] == step + 40
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the killed attempt's and the resume's


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

    import bnlab.record

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
        return bnlab.record.os.write(fd, data)

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
            patch.setattr(bnlab.record, "_write_all", lambda fd, data: partial_write(fd, data))
        else:
            patch.setattr(bnlab.record, "open", failing_open, raising=False)
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


def test_a_run_whose_process_died_without_a_word_reads_as_killed(tmp_path):
    """summary.json says running; the reader and the sweep's end lines say killed once no
    process on this machine holds the run, and keep running for a lock taken elsewhere."""
    from bnlab.outcome import read_summary, sweep_runs
    from bnlab.rundir import LOCK
    from bnlab.runs import Run

    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "summary.json").write_text(json.dumps({"status": "running", "steps": 10}))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert Run(run, summary=read_summary(run)).status == "running"
        assert sweep_runs(tmp_path / "sweep") == {run: "running"}
    finally:
        proc.kill()
        proc.wait()
    assert Run(run, summary=read_summary(run)).status == "killed"
    assert sweep_runs(tmp_path / "sweep") == {run: "killed"}
    assert json.loads((run / "summary.json").read_text())["status"] == "running"  # the reader writes nothing
    (run / LOCK).write_text("12345 another-node\n")  # written on another machine: flock cannot tell
    assert Run(run, summary=read_summary(run)).status == "running"
