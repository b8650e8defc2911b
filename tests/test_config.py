"""The config a run starts from: what Hydra refuses when it composes, the ranges `validate`
checks (bounds, a norm's own options), the checks against the data set's shape (preflight),
and every `bnlab train` command the docs show."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from bnlab.config.norm_options import NORM_SCHEMAS
from bnlab.errors import UserError
from bnlab.norms import NORMS, build_norm

from helpers import REPO, bnlab, compose


# ---------------------------------------------------------------- bad values: refused before any work
@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=0", "train.batch_size=0 is not valid: expected an integer >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0 is not valid: expected a number > 0"),
    ("optim.momentum=1.5", "optim.momentum=1.5 is not valid: expected a number in [0, 1]"),
    ("probe.unit=100", "probe.unit=100 is not valid: expected an integer below the narrowest hidden width"),
    ("data.root=/proc/forbidden data=mnist", "mnist: files missing in /proc/forbidden/MNIST/raw"),
    ("train.cuda_graph=true", "train.cuda_graph=True is not valid: expected false: CUDA-graph capture"),
    ("train.amp=true device=cpu", "train.amp=true is CUDA autocast (bfloat16) and this run is on cpu"),
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
    assert result.returncode == 2  # a user's error, whoever says so (bnlab or Hydra)
    assert expected in result.stderr and "Traceback" not in result.stderr
    if override == "norm=foo":
        assert "Available options in 'norm'" in result.stderr and "\tbn\n" in result.stderr
    assert not (tmp_path / "outputs").exists()


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
    from bnlab.run.preflight import check_against_data

    cfg = compose("data=digits", "model.widths=[]", *overrides) if "model=vgg" in overrides \
        else compose("data=digits", *overrides)
    if expected is None:
        check_against_data(cfg, shape, 1437, 10)
        return
    with pytest.raises(UserError) as err:
        check_against_data(cfg, shape, 1437, 10)
    assert str(err.value).startswith(expected)


# ---------------------------------------------------------------- where data sets live
@pytest.mark.parametrize("data", sorted(p.stem for p in (REPO / "configs" / "data").glob("*.yaml")))
def test_every_data_set_lives_in_bnlab_data_else_the_xdg_cache(data, monkeypatch):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert compose(f"data={data}").data.root == "~/.cache/bnlab/data"
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert compose(f"data={data}").data.root == "/srv/cache/bnlab/data"
    monkeypatch.setenv("BNLAB_DATA", "/srv/data")
    assert compose(f"data={data}").data.root == "/srv/data"


def test_a_run_looks_for_its_data_in_the_xdg_cache(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "bnlab", "train", "data=mnist", "data.download=false",
                             "train.steps=5"], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in {**os.environ, **env}.items() if k != "BNLAB_DATA"})
    assert result.returncode == 2
    expected = f"bnlab: error: mnist: files missing in {tmp_path}/cache/bnlab/data/MNIST/raw"
    assert result.stderr.startswith(expected)


# ---------------------------------------------------------------- a norm's options
def test_help_and_composing_a_config_do_not_load_torch():
    """The norms' options are torch-free (bnlab.config.norm_options): `bnlab train --help` shows a
    norm's keys, and a config composes, without importing torch (~2 s of start-up)."""
    code = ("import contextlib, io, sys\n"
            "from bnlab.cli import main\n"
            "from bnlab.config.schema import compose\n"
            "shown = io.StringIO()\n"
            "with contextlib.redirect_stdout(shown), contextlib.suppress(SystemExit):\n"
            "    main(['train', 'norm=whiten', '--help'])  # Hydra exits after its help\n"
            "assert compose('norm=noisy_bn').norm.std_high == 1.25\n"
            "print('method: zca' in shown.getvalue(), 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_a_value_out_of_its_bounds_is_refused_before_torch_is_imported(tmp_path):
    """A single run's bad value (the schema's bounds) gets its line and exit 2 without the
    seconds of importing torch, and no run directory is left."""
    code = ("import sys\n"
            "from bnlab.cli import main\n"
            "try:\n"
            "    code = main(['train', 'optim.lr=-1', 'hydra.run.dir=run'])\n"
            "except SystemExit as stop:\n"
            "    code = stop.code\n"
            "print(code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr == "bnlab: error: optim.lr=-1.0 is not valid: expected a number > 0\n"
    assert not (tmp_path / "run").exists()


def test_sync_is_an_option_of_the_norms_that_support_it():
    from bnlab.config.schema import validate

    for name, cls in NORMS.items():
        assert ("sync" in NORM_SCHEMAS[name].__dataclass_fields__) == cls.supports_sync, name
    assert [n for n, c in NORMS.items() if c.supports_sync] == ["bn"]
    assert build_norm("bn", 4, impl="torch").supports_sync
    assert not build_norm("noisy_bn", 4, impl="torch").supports_sync
    cfg = compose("norm=ln", "+norm.sync=true", "data=digits")
    with pytest.raises(UserError, match="norm.sync=true is not valid with norm=ln"):
        validate(cfg)
    validate(compose("norm=bn", "norm.sync=true", "data=digits"))


@pytest.mark.parametrize("overrides,message", [
    (["norm=gn", "norm.groups=3"], "norm.groups=3 is not valid: expected a divisor of every hidden"),
    (["norm=noisy_bn", "norm.std_low=2.0"], "norm.std_high=1.25 is not valid: expected a number >= "),
    (["norm=bn", "norm.momentum=2"], "norm.momentum=2.0 is not valid: expected a number in"),
    (["norm=whiten", "norm.method=svd"], "norm.method='svd' is not valid: expected one of zca, pca"),
])
def test_a_norms_own_checks_run_in_validate(overrides, message):
    from bnlab.config.schema import validate

    with pytest.raises(UserError, match=re.escape(message)):
        validate(compose(*overrides, "data=digits"))


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

    from bnlab.config.schema import config_dir, register_configs, validate
    from bnlab.run.resume import RESUMABLE_KEYS

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
