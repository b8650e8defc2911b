"""The command line as a user meets it: help, a real run directory, the lines a run and a sweep
end with, the wheel. (Bad input is refused by the config: test_config.py.)"""

from __future__ import annotations

import json
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
