"""The command line as a user meets it: help, a real run directory, bad input, the wheel."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, bnlab

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


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=0", "train.batch_size=0 is not valid: expected an integer >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0 is not valid: expected a number > 0"),
    ("optim.momentum=1.5", "optim.momentum=1.5 is not valid: expected a number in [0, 1]"),
    ("probe.unit=100", "probe.unit=100 is not valid: expected an integer below the narrowest hidden width"),
    ("data.root=/proc/forbidden data=mnist", "mnist: files missing in /proc/forbidden/MNIST/raw"),
])
def test_out_of_range_values_fail_before_any_work(tmp_path, override, expected):
    result = bnlab("train", *override.split(), "train.steps=5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bnlab: error: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*"))


@pytest.mark.parametrize("override, expected", [
    ("norm=foo", "Could not find 'norm/foo'"),
    ("optim.lr=abc", "optim.lr"),
    ("train.bacth_size=3", "train.bacth_size"),
])
def test_hydra_rejects_unknown_options_and_wrong_types(tmp_path, override, expected):
    result = bnlab("train", override, cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr
    if override == "norm=foo":
        assert "Available options in 'norm'" in result.stderr and "\tbn\n" in result.stderr
    assert not (tmp_path / "outputs").exists()


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
    from_wheel = subprocess.run([sys.executable, "-c", "import bnlab.config as c; print(c.config_dir())"],
                                cwd=tmp_path, capture_output=True, text=True,
                                env={"PYTHONPATH": str(target)})
    assert from_wheel.stdout.strip() == str(target / "bnlab" / "conf")
