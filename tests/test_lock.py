"""One writer per run directory (bnlab.rundir.lock): a second writer is refused and touches nothing,
from the command line or in the task; a lock left by a killed process never blocks, and a run
whose process died without a word reads as killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bnlab.run.checkpoint import load_checkpoint

from helpers import LONG, bnlab, execute, start, summary_of, wait_for_checkpoint

HOLD = "import sys, time; from pathlib import Path; from bnlab.rundir.lock import hold\n" \
       "with hold(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)"


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    from bnlab.rundir.lock import RunLocked, hold, holder

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
    proc = start(run, tmp_path, "train.steps=100000")  # still running while two others start
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


def test_a_run_whose_process_died_without_a_word_reads_as_killed(tmp_path):
    """summary.json says running; the reader and the sweep's end lines say killed once no
    process on this machine holds the run, and keep running for a lock taken elsewhere."""
    from bnlab.rundir.names import LOCK
    from bnlab.rundir.outcome import read_summary, sweep_runs
    from bnlab.rundir.reader import Run

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
    never_started = tmp_path / "sweep" / "1"  # Hydra wrote its config; the job died before a summary
    (never_started / ".hydra").mkdir(parents=True)
    (never_started / ".hydra" / "config.yaml").write_text("seed: 1\n")
    assert sweep_runs(tmp_path / "sweep") == {run: "running", never_started: "no summary"}
