"""The command line as a user meets it: help, a real run directory, the lines a run and a sweep
end with, the wheel; a directory that holds a run is never written by another, keys and values
the schema refuses, the report naming every run it finds. (Bad values: test_config.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO, bnlab

FAST = ["data=digits", "train.steps=40", "train.log_every=10", "train.eval_every=20",
        "probe.every=20", "probe.batch_size=100"]


def test_help_lists_commands_quickly(tmp_path):
    result = bnlab("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("train", "report", "bench"):
        assert f"\n  {command} " in result.stdout


def test_unknown_command_is_one_line(tmp_path):
    result = bnlab("trian", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "bnlab: error: unknown command 'trian'; choose from train, report, bench"


def test_train_help_shows_config_groups(tmp_path):
    result = bnlab("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "bnlab train" in result.stdout
    for group in ("norm:", "activation:", "model:", "data:", "optim:", "probe:"):
        assert group in result.stdout


def test_train_writes_a_complete_run_directory(tmp_path):
    result = bnlab("train", "norm=bn", *FAST, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["final"]["test/acc"] > 0.5 and summary["device"] == "cpu"
    assert set(summary["versions"]) >= {"torch", "bnlab", "hydra", "python"}
    assert (run / "checkpoints" / "last.pt").is_file()
    lines = (run / "scalars.csv").read_text().splitlines()
    assert lines[0] == "step,tag,value"
    csv_tags = {line.split(",")[1] for line in lines[1:]}
    assert {"train/loss", "train/acc", "train/lr", "test/loss", "test/acc", "perf/steps_per_s"} <= csv_tags

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    board = events.Scalars("test/acc")
    csv = [(int(s), float(v)) for s, t, v in (line.split(",") for line in lines[1:]) if t == "test/acc"]
    assert [(e.step, pytest.approx(e.value)) for e in board] == csv
    assert "plain" not in result.stdout and "step 40/40" in result.stdout  # plain lines off a terminal


def test_wheel_carries_the_config_tree_for_a_normal_install(tmp_path):
    """A console script cannot find a relative config path once installed: configs/ must ship."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("bnlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "bnlab/conf/train.yaml" in names and "bnlab/conf/norm/bn.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    result = subprocess.run([sys.executable, "-m", "bnlab", "train", "--cfg", "job", "norm=none"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "name: none" in result.stdout and "batch_size: 60" in result.stdout
    from_wheel = subprocess.run([sys.executable, "-c", "import bnlab.config.schema as c; print(c.config_dir())"],  # noqa: E501
                                cwd=tmp_path, capture_output=True, text=True,
                                env={"PYTHONPATH": str(target)})
    assert from_wheel.stdout.strip() == str(target / "bnlab" / "conf")
    # hydra/launcher=batched ships as a Hydra plugin, found in the installed copy
    assert "hydra_plugins/bnlab_batched_launcher/config.py" in names
    plugin = subprocess.run([sys.executable, "-c", "import hydra_plugins.bnlab_batched_launcher as p; "
                             "print(p.__file__)"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target)})
    assert plugin.stdout.startswith(str(target)), plugin.stderr
    launcher = subprocess.run([sys.executable, "-m", "bnlab", "train", "--cfg", "hydra",
                               "hydra/launcher=batched"], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert launcher.returncode == 0, launcher.stderr
    assert "hydra_plugins.bnlab_batched_launcher.batched_launcher.BatchedLauncher" in launcher.stdout


# ---------------------------------------------------------------- what a run and a sweep end with
def test_a_run_ends_by_saying_its_status_accuracy_directory_and_next_commands(tmp_path):
    result = bnlab("train", "data=digits", "train.steps=100", "train.threads=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "outputs").glob("*/*")
    summary = json.loads((run / "summary.json").read_text())
    rel = run.relative_to(tmp_path)
    assert result.stdout.endswith(
        f"bnlab: completed: 100/100 steps in {summary['wall_s']:.1f} s, test/acc "
        f"{summary['final']['test/acc']:.4f} (best {summary['best']['test/acc']:.4f} at step "
        f"{summary['best']['test/acc_step']})\n"
        f"  run directory  {rel}\n"
        f"  next           tensorboard --logdir {rel}\n"
        f"                 bnlab report {rel}\n")
    # the evaluation shows when it happens (plain lines off a terminal)
    assert f"[train] step 100/100  test/loss {summary['final']['test/loss']:.4g}  test/acc" in result.stdout


def test_the_rich_bar_shows_the_last_evaluation():
    from bnlab.run.progress import Progress

    progress = Progress(100, 0, mode="rich")
    try:
        progress.update(50, {"loss": 0.5})
        progress.evaluated(50, {"test/acc": 0.91})
        progress.update(60, {"loss": 0.4})
        assert progress.bar.tasks[0].fields["metrics"] == "loss 0.4  | test/acc 0.91 @50"
    finally:
        progress.close()


@pytest.mark.parametrize("launcher", ["basic", "joblib",
                                      pytest.param("submitit_local", marks=pytest.mark.slow)])
def test_a_sweep_ends_by_counting_its_runs_whatever_the_launcher(tmp_path, launcher):
    """A job that fails (BN on batches of one example) does not stop the others."""
    result = bnlab("train", "-m", "data=digits", "train.steps=20", "probe=off", "train.threads=1",
                   "norm=bn,none", "train.batch_size=1", f"hydra/launcher={launcher}",
                   "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tail = result.stdout[result.stdout.index("bnlab: sweep of"):]
    assert tail.splitlines() == [
        "bnlab: sweep of 2 run(s): 1 completed, 1 failed",
        "  failed         norm=bn  train.batch_size=1 is not valid with norm=bn: it gives each fully "
        "connected layer one value per feature, whose batch variance is 0; use train.batch_size "
        ">= 2, or a per-example norm (norm=ln, norm=gn)",
        "  sweep directory  sweep",
        "  next             bnlab report sweep",
        "                   tensorboard --logdir sweep"]


# ---------------------------------------------------------------- a run directory is never overwritten
def files_of(folder) -> dict:
    """Every file's bytes (the lock holds the last writer's pid: bookkeeping, not the run)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


QUICK = ["data=digits", "train.steps=10", "probe=off", "train.threads=1", "train.progress=off"]


def test_a_directory_that_holds_a_run_is_written_only_by_its_resume(tmp_path):
    assert bnlab("train", *QUICK, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    before = files_of(tmp_path / "run")
    again = bnlab("train", *QUICK, "norm=none", "hydra.run.dir=run", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == ("bnlab: error: hydra.run.dir=run: run holds a completed run; a run directory "
                            "is written only by its own resume (bnlab train resume=run): choose another "
                            "directory\n")
    assert files_of(tmp_path / "run") == before


def test_a_sweep_refuses_jobs_that_share_a_directory_or_write_over_runs(tmp_path):
    twice = bnlab("train", "-m", *QUICK, "seed=0,0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert twice.returncode == 2
    assert twice.stderr == ("bnlab: error: two jobs of this sweep would write one directory (seed=0 "
                            "and seed=0: sweep/seed=0); give each swept value once\n")
    assert not (tmp_path / "sweep").exists()
    first = bnlab("train", "-m", *QUICK, "seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = files_of(tmp_path / "sweep")
    shorter = bnlab("train", "-m", *QUICK, "train.steps=5", "seed=0,1,2", "hydra.sweep.dir=sweep",
                    cwd=tmp_path)
    assert shorter.returncode == 2
    assert shorter.stderr.startswith("bnlab: error: 2 of this sweep's 3 jobs would write over runs "
                                     "already there (sweep/seed=0, ...); choose another hydra.sweep.dir")
    assert len(shorter.stderr.splitlines()) == 1 and files_of(tmp_path / "sweep") == before
    more = bnlab("train", "-m", *QUICK, "seed=2,3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "bnlab: sweep of 2 run(s): 2 completed\n" in more.stdout  # this sweep's jobs, not the 4 there
    after = files_of(tmp_path / "sweep")
    assert all(after[f] == content for f, content in before.items() if f.name != "multirun.yaml")


# ---------------------------------------------------------------- keys and values the schema refuses
@pytest.mark.parametrize("override, expected", [
    ("train.stpes=10", "unknown key train.stpes (in train.stpes=10); did you mean train.steps?"),
    ("+train.stpes=10", "unknown key train.stpes (in +train.stpes=10); did you mean train.steps?"),
    ("+foo=1", "unknown key foo (in +foo=1) (bnlab train --cfg job shows every key)"),
    ("+sead=1", "unknown key sead (in +sead=1); did you mean seed?"),
    ("norm=ln norm.momentm=0.5", "unknown key norm.momentm (in norm.momentm=0.5) (bnlab train --cfg job"),
])
def test_a_key_the_schema_does_not_know_is_refused_plus_or_not(tmp_path, override, expected):
    result = bnlab("train", "data=digits", *override.split(), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bnlab: error: {expected}")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_a_key_added_for_another_option_is_refused_once_composed(tmp_path):
    """norm.groups is gn's: with bn, chosen by the config rather than the command line, the
    composed config has a key its norm does not know."""
    result = bnlab("train", *QUICK, "+norm.groups=2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("bnlab: error: unknown key norm.groups (norm=bn has no such option)")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["train.threads=4096"], "train.threads=4096 is not valid: this process may use"),
    (["data.labels_per_batch=4"], "data.labels_per_batch=4 is not valid without data.sampler=grouped"),
    (["data.sampler=grouped", "data.labels_per_batch=11"],
     "data.labels_per_batch=11 is not valid: data=digits has 10 classes, so a grouped batch holds at "
     "most 10 labels"),
])
def test_values_that_cannot_work_are_refused_before_training(tmp_path, overrides, expected):
    result = bnlab("train", *QUICK, *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bnlab: error: {expected}")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_with_labels_per_batch_but_no_grouped_job_is_refused(tmp_path):
    result = bnlab("train", "-m", *QUICK, "seed=0,1", "data.labels_per_batch=2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("bnlab: error: data.labels_per_batch=2 is not valid without "
                             "data.sampler=grouped (the iid sampler draws any labels): drop it, or add "
                             "data.sampler=grouped\n")
    assert not (tmp_path / "outputs").exists()


def test_hydras_own_refusals_exit_with_the_user_error_code(tmp_path):
    result = bnlab("train", "norm=foo", cwd=tmp_path)
    assert result.returncode == 2
    assert "Could not find 'norm/foo'" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- the report
def test_the_report_names_every_run_it_finds_even_without_its_config(tmp_path):
    from helpers import sweep_of

    sweep = sweep_of(tmp_path / "sweep", {"bn": [0.9, 0.91, 0.92]})
    (sweep / "norm=bn,seed=1" / ".hydra" / "config.yaml").unlink()
    result = bnlab("report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 runs in 1 group(s) differing in nothing (one group) and 1 "
                                    "damaged run(s) in no group (listed below); seeds 0, 2")
    assert re.search(r"norm=bn,seed=1 +│ damaged +│ 20/20 steps; .hydra/config.yaml missing", result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_report_on_a_read_only_file_system_points_to_out(tmp_path):
    from helpers import sweep_of

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        sweep_of(disk / "sweep", {"bn": [0.9, 0.91], "none": [0.8, 0.82]})
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = bnlab("report", "disk/sweep", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr == ("bnlab: error: cannot write the report into disk/sweep/report "
                                 "(Read-only file system); write it elsewhere with --out DIR\n")
        elsewhere = bnlab("report", "disk/sweep", "--out", "report", cwd=tmp_path)
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert (tmp_path / "report" / "report.md").is_file()
    finally:
        subprocess.run(["umount", str(disk)])
