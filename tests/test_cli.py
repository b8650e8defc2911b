"""The command line as a user meets it: help, a real run directory, bad input, the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO, bnlab, compose

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
    from bnlab.progress import Progress

    progress = Progress(100, 0, mode="rich")
    try:
        progress.update(50, {"loss": 0.5})
        progress.evaluated(50, {"test/acc": 0.91})
        progress.update(60, {"loss": 0.4})
        assert progress.bar.tasks[0].fields["metrics"] == "loss 0.4  | test/acc 0.91 @50"
    finally:
        progress.close()


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=1", "train.batch_size=1 is not valid with norm=bn: it gives each fully "
                           "connected layer one value per feature"),
    ("model=vgg", "model=vgg does not fit data=digits's 8x8 images: pool 4 gets a 1x1 input; "
                  "it needs images of at least 32x32 (or fewer layers in model.layers)"),
])
def test_misconfigurations_fail_before_training_and_leave_no_directory(tmp_path, override, expected):
    result = bnlab("train", "data=digits", override, "train.steps=5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"bnlab: error: {expected}")
    assert len(result.stderr.splitlines()) == 1
    assert list((tmp_path / "outputs").rglob("*")) == []


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


@pytest.mark.parametrize("overrides, shape, expected", [
    (["model=cnn", "model.channels=[6,6,6,6,6]", "model.paddings=[2,2,2,2,2]"], (1, 28, 28),
     "model=cnn does not fit data=digits's 28x28 images: pool 5 gets a 1x1 input; it needs images "
     "of at least 32x32 (or fewer layers in model.channels)"),
    (["model=cnn", "model.paddings=[0,0]"], (1, 8, 8),
     "model=cnn does not fit data=digits's 8x8 images: conv 2 (5x5, padding 0) gets a 2x2 input; "
     "it needs images of at least 16x16"),
    (["probe.batch_size=2000"], (1, 8, 8),
     "probe.batch_size=2000 is not valid: the digits training split has only 1437 examples"),
    (["data.sampler=grouped", "data.labels_per_batch=12", "train.batch_size=24"], (1, 8, 8),
     "data.labels_per_batch=12 is not valid: data=digits has 10 classes"),
    (["model=vgg", "model.layers=[8,M,8,M,8,M]", "train.batch_size=1"], (1, 8, 8), None),  # 1x1 maps
    (["model=vgg", "model.layers=[8,M,8,M,8,M,8]", "train.batch_size=1"], (1, 8, 8),
     "train.batch_size=1 is not valid with norm=bn: it gives conv 4's 1x1 output one value"),
    (["norm=ln", "train.batch_size=1"], (1, 8, 8), None),  # per-example statistics
])
def test_the_config_is_checked_against_the_data_sets_shape(overrides, shape, expected):
    from bnlab.errors import UserError
    from bnlab.preflight import check_against_data

    cfg = compose("data=digits", "model.widths=[]", *overrides) if "model=vgg" in overrides \
        else compose("data=digits", *overrides)
    if expected is None:
        check_against_data(cfg, shape, 1437, 10)
        return
    with pytest.raises(UserError) as err:
        check_against_data(cfg, shape, 1437, 10)
    assert str(err.value).startswith(expected)


# ---------------------------------------------------------------- the docs' commands compose
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i")


def documented_commands() -> list[tuple[str, list[str], str | None]]:
    """``(where, argv after "bnlab train" or the script path, expected error)`` of every shell
    line of a fenced block in README.md and docs/*.md that runs `bnlab train` or a script.

    A line written as a transcript (``$ bnlab train ...``) whose next line is ``bnlab: error:
    ...``, or whose comment speaks of an error message, is an example of a refused command.
    Environment-variable prefixes (``DATA=... scripts/x.sh``) and comments are dropped.
    """
    import re
    import shlex

    found = []
    for path in DOCS:
        lines, block = path.read_text().splitlines(), None
        for i, line in enumerate(lines):
            if line.startswith("```"):
                block = line[3:].strip() if block is None else None
                continue
            if block not in SHELL_BLOCKS or not ("bnlab" in line or "scripts/" in line):
                continue
            transcript = line.startswith("$ ")
            words = shlex.split(line[2:] if transcript else line, comments=True)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words.pop(0)
            after = lines[i + 1] if i + 1 < len(lines) else ""
            error = None
            if transcript and after.startswith("bnlab: error: "):
                error = after.removeprefix("bnlab: error: ")
            elif transcript and re.search(r"#.*\b(error|message)\b", line):
                error = ""
            where = f"{path.relative_to(REPO)}:{i + 1}"
            if words and words[0].startswith("scripts/"):
                found.append((where, words, None))
            elif "bnlab" in words and words[words.index("bnlab") + 1:][:1] == ["train"]:
                found.append((where, words[words.index("bnlab") + 2:], error))
    return found


def jobs_of(argv: list[str], groups: set[str]) -> tuple[list[list[str]], list[tuple[str, str]], bool]:
    """What to check of one documented command: the override lists to compose (one per value
    of a swept config group), the other swept ``(key, value)`` pairs to set on the first one
    (composing costs far more than setting a value), and whether it is a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in argv)
    words, skip = [], False
    for a in argv:
        if skip or a.startswith("-") or a == "..." or "<" in a:
            skip = a in FLAGS_WITH_VALUE
            continue
        if a.split("=", 1)[0] not in ("hydra.run.dir", "hydra.sweep.dir"):  # any path will do
            words.append(a)
    overrides = OverridesParser.create().parse_overrides(words)
    first = [f"{o.input_line.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}"
             if o.is_sweep_override() else o.input_line for o in overrides]
    jobs, assignments = [first], []
    for i, o in enumerate(overrides):
        if o.is_sweep_override():
            key = o.input_line.split("=", 1)[0]
            for value in list(o.sweep_string_iterator())[1:]:
                if key in groups or "/" in key:
                    jobs.append(first[:i] + [f"{key}={value}"] + first[i + 1:])
                else:
                    assignments.append((key, value))
    return jobs, assignments, multirun


def test_every_documented_train_command_composes_and_validates():
    """What `bnlab train --cfg job` would check for each command of the docs, in this process:
    the docs cannot name a key, an option or a value the configs do not accept."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from bnlab.config import config_dir, register_configs, validate
    from bnlab.resume import RESUMABLE_KEYS

    commands = documented_commands()
    assert len([c for c in commands if c[1] and not c[1][0].startswith("scripts/")]) >= 10
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    problems, composed, seen = [], {}, set()

    def check(where: str, overrides: list[str], error: str | None, sweep: bool,
              assignments: list[tuple[str, str]] = ()) -> None:
        shown = f"{where}: bnlab train {' '.join(overrides)}"
        try:
            key = tuple(overrides)
            if key not in composed:
                composed[key] = hydra_compose(config_name="train", overrides=overrides,
                                              return_hydra_config=True)
            cfg = composed[key]
            validate(cfg)
            params = dict(cfg.hydra.sweeper.params or {}) if sweep else {}
            for name, values in params.items():  # a preset's own sweep
                if not any(o.split("=", 1)[0] == name for o in overrides):
                    for value in values.split(","):
                        check(where, [*overrides, f"{name}={value}"], error, False)
            for name, value in assignments:
                changed = cfg.copy()
                OmegaConf.update(changed, name, yaml.safe_load(value), merge=False)
                validate(changed)
        except Exception as err:  # noqa: BLE001 (any failure is a finding)
            if error is None:
                problems.append(f"{shown}: {err}")
            elif not str(err).startswith(error):
                problems.append(f"{shown}: expected {error!r}, got {err}")
            return
        if error is not None:
            problems.append(f"{shown}: should fail ({error})")

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for where, argv, error in commands:
            if argv and argv[0].startswith("scripts/"):
                if not os.access(REPO / argv[0], os.X_OK):
                    problems.append(f"{where}: {argv[0]} is not an executable script of the repository")
                continue
            resume = [a for a in argv if a.startswith("resume=")]
            if resume:
                keys = {a.split("=", 1)[0] for a in argv if "=" in a and a not in resume}
                if keys - set(RESUMABLE_KEYS):
                    problems.append(f"{where}: resume= refuses {sorted(keys - set(RESUMABLE_KEYS))}")
                continue
            jobs, assignments, sweep = jobs_of(argv, groups)
            check(where, jobs[0], error, sweep, assignments)
            seen.update(jobs[0])
            for overrides in jobs[1:]:  # another option of a swept group: once in all the docs
                if not set(overrides) <= seen:
                    check(where, overrides, error, sweep)
                    seen.update(overrides)
    assert problems == []
