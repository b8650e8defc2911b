"""Sweeps (Hydra multirun) through bnlab's command line, with each launcher, and the presets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.cli import _name_runs_by_swept_keys
from bnlab.config import config_dir, validate

from helpers import REPO, bnlab, compose, train_in_process

# Runs small enough that start-up dominates: a sweep is about what happens around the runs.
TINY = ["data=digits", "train.steps=20", "train.batch_size=32", "train.eval_every=10",
        "train.log_every=10", "train.checkpoint_every=10", "probe=off"]

PRESETS = {  # preset -> the norms its comparison sweeps (what its script passes as norm=...)
    "ioffe_fig1": ["none", "bn"],
    "brn_small_batch": ["bn", "brn", "ln"],
    "santurkar_noisy_bn": ["none", "bn", "noisy_bn"],
    "santurkar_noisy_bn_small": ["none", "bn", "noisy_bn"],
    "santurkar_dln": ["none", "bn"],
    "d2l_lenet_bn": ["none", "bn"],
    "whitening": ["bn", "whiten"],
}


def _summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def _sweep_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "outputs" / "multirun").rglob("multirun.yaml"))


# ---------------------------------------------------------------- run directories
def test_runs_are_named_after_the_swept_keys_and_sweeps_never_share_a_directory(tmp_path: Path):
    """Two sweeps started together (the same second) get two directories, each holding runs
    named after what varies (norm=bn), not after every override (data=digits,...)."""
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data")}
    env.pop("BNLAB_RUN_ID", None)
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "bnlab", "train", "-m", "norm=none,bn", *TINY,
               "train.progress=off"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    sweeps = _sweep_dirs(tmp_path)
    assert len(sweeps) == 2
    for sweep in sweeps:
        assert re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{6}", sweep.name), sweep.name
        assert sorted(_summaries(sweep)) == ["norm=bn", "norm=none"]
        assert {s["status"] for s in _summaries(sweep).values()} == {"completed"}


def test_fixed_overrides_are_left_out_of_run_names() -> None:
    argv = ["-m", "norm=none,bn", "seed=0,1", "data=digits", "+extra=1", "train.steps=50",
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.widths=[10,10]"]
    extended = _name_runs_by_swept_keys(argv, config_dir() / "train.yaml")
    assert extended[:-1] == argv
    key, value = extended[-1].split("=", 1)
    assert key == "hydra.job.config.override_dirname.exclude_keys"
    excluded = value.strip("[]").split(",")
    # train.yaml's own exclusions stay, the fixed keys join them, swept and Hydra keys do not.
    assert {"hydra.launcher.n_jobs", "device", "data", "extra", "train.steps",
            "model.widths"} <= set(excluded)
    assert not {"norm", "seed", "hydra/launcher"} & set(excluded)
    # A user's own list is respected.
    own = ["-m", "norm=none,bn", "data=digits", "hydra.job.config.override_dirname.exclude_keys=[]"]
    assert _name_runs_by_swept_keys(own, config_dir() / "train.yaml") == own


# ---------------------------------------------------------------- launchers and failing jobs
@pytest.mark.parametrize("launcher", ["basic", "joblib", "batched"])
def test_a_failing_and_a_diverging_job_do_not_stop_the_sweep(tmp_path: Path, launcher: str):
    """lr=1e6 without normalization diverges; batch 5000 > the digits training split is a user
    error inside the task. The sweep still runs every job and records what happened to each.
    (batched: the two lr runs of batch 32 share a program; the two of batch 5000 cannot start
    one, so they run one by one and fail as with the basic launcher.)"""
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    done = bnlab("train", "-m", "optim.lr=0.1,1e6", "train.batch_size=32,5000", "norm=none",
                 "activation=relu", *[o for o in TINY if not o.startswith("train.batch_size")],
                 f"hydra/launcher={launcher}", *extra, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = _summaries(sweep)
    status = {name: s["status"] for name, s in summaries.items()}
    assert status == {
        "optim.lr=0.1,train.batch_size=32": "completed",
        "optim.lr=1000000.0,train.batch_size=32": "diverged",
        "optim.lr=0.1,train.batch_size=5000": "failed",
        "optim.lr=1000000.0,train.batch_size=5000": "failed",
    }
    assert "train.batch_size=5000" in summaries["optim.lr=0.1,train.batch_size=5000"]["error"]
    if launcher == "joblib":
        # Each worker takes its share of the cores and prints plain lines named after its run.
        cores = len(os.sched_getaffinity(0))
        assert summaries["optim.lr=0.1,train.batch_size=32"]["threads"] == max(1, cores // 2)
        assert "[optim.lr=0.1,train.batch_size=32] step 20/20" in done.stdout


def test_submitit_local_runs_the_cluster_code_path(tmp_path: Path) -> None:
    """hydra/launcher=submitit_local pickles each job and runs it in its own process, as
    submitit_slurm does on a cluster node; cpus_per_task sets torch's threads."""
    sweep = tmp_path / "sweep"
    done = bnlab("train", "-m", "norm=none,bn", *TINY, "hydra/launcher=submitit_local",
                 "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5",
                 f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = _summaries(sweep)
    assert sorted(summaries) == ["norm=bn", "norm=none"]
    for summary in summaries.values():
        assert summary["status"] == "completed" and summary["steps"] == 20
        assert summary["threads"] == 1
    assert (sweep / ".submitit").is_dir()


def test_the_slurm_example_composes_onto_submitit_slurm() -> None:
    cfg = compose_hydra("hydra/launcher=slurm_example")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min >= 1


def compose_hydra(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bnlab.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides),
                             return_hydra_config=True)


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_states_its_source_and_composes_with_every_norm_it_compares(preset: str):
    text = (config_dir() / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert re.search(r"(arXiv \d{4}\.\d{4,5}|Dive into Deep Learning)", text), "no source"
    base = compose(f"experiment={preset}")
    validate(base)
    for norm in PRESETS[preset]:
        cfg = compose(f"experiment={preset}", f"norm={norm}")
        validate(cfg)
        assert cfg.norm.name == norm
        # Everything but the norm is the preset's: the sweep compares one thing.
        for key in ("model", "data", "optim", "activation"):
            assert cfg[key] == base[key], (preset, norm, key)
        assert cfg.train.steps == base.train.steps and cfg.train.batch_size == base.train.batch_size


def test_preset_settings_match_their_papers() -> None:
    ioffe = compose("experiment=ioffe_fig1")
    assert (ioffe.data.name, ioffe.activation.name, list(ioffe.model.widths)) == \
        ("mnist", "sigmoid", [100, 100, 100])
    assert (ioffe.norm.position, ioffe.train.batch_size, ioffe.train.steps) == ("before_act", 60, 50000)
    d2l = compose("experiment=d2l_lenet_bn")
    assert (d2l.optim.lr, d2l.optim.momentum, d2l.train.batch_size, d2l.train.epochs) == (1.0, 0.0, 256, 10)
    assert (d2l.model.pool, list(d2l.model.channels), d2l.data.normalize) == ("avg", [6, 16], False)
    dln = compose("experiment=santurkar_dln")
    assert len(dln.model.widths) + 1 == 25 and set(dln.model.widths) == {10}
    assert (dln.activation.name, dln.data.name, dln.model.init) == ("identity", "linear", "glorot")
    vgg = compose("experiment=santurkar_noisy_bn")
    assert (vgg.optim.lr, vgg.train.batch_size, vgg.train.steps, vgg.data.augment) == (0.1, 128, 15000, False)
    assert vgg.probe.ics_every > 0


def test_batch_renorm_schedule_fits_the_preset_run_and_reaches_only_brn() -> None:
    brn = compose("experiment=brn_small_batch", "norm=brn")
    full_bounds_at = brn.norm.warmup_steps + max(brn.norm.ramp_steps, brn.norm.d_ramp_steps)
    assert full_bounds_at < brn.train.steps
    assert "warmup_steps" not in compose("experiment=brn_small_batch", "norm=bn").norm
    # Without the preset, BRN keeps the paper's schedule.
    assert compose("norm=brn").norm.warmup_steps == 5000


def test_preset_sweeper_params_sweep_the_norms() -> None:
    cfg = compose_hydra("experiment=ioffe_fig1")
    assert cfg.hydra.sweeper.params == {"norm": "none,bn"}


def test_every_preset_is_reproduced_by_the_one_script() -> None:
    """scripts/reproduce.sh <preset> runs any preset: it is executable, valid bash, and sweeps
    the named experiment and reports on the same directory (test_report.py runs it end to end)."""
    script = REPO / "scripts" / "reproduce.sh"
    assert os.access(script, os.X_OK), script
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert 'experiment="$PRESET"' in text and 'hydra.sweep.dir="$SWEEP"' in text
    assert '$BNLAB report "$SWEEP"' in text
    presets = {p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")}
    assert set(PRESETS) <= presets
    leftovers = sorted(p.name for p in (REPO / "scripts").glob("*.sh") if p.name != "reproduce.sh")
    assert leftovers == []  # one script for every preset, no per-preset copies


def test_the_linear_data_set_is_a_regression_the_trainer_fits_with_mse(tmp_path: Path) -> None:
    """santurkar_dln's task: y = A x exactly, one A for both splits; MSE loss, no accuracy."""
    import torch
    import torch.nn.functional as F

    from bnlab.data import load_dataset
    from bnlab.models import build_model
    from bnlab.train import evaluate

    cfg = compose("experiment=santurkar_dln", "model.widths=[10,10,10]")
    data = load_dataset(cfg.data, torch.device("cpu"))
    assert (data.task, data.num_outputs, data.num_classes) == ("regression", 10, 0)
    x, y = data.train.x.flatten(1), data.train.y
    a = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(x @ a, y, atol=1e-4, rtol=0)
    torch.testing.assert_close(data.test.x.flatten(1) @ a, data.test.y, atol=1e-4, rtol=0)

    model = build_model(cfg, data.shape, data.num_outputs).eval()
    loss, acc = evaluate(model, data.test, 300, task="regression")  # batches of unequal size
    with torch.no_grad():
        assert loss == pytest.approx(F.mse_loss(model(data.test.x), data.test.y).item(), rel=1e-5)
    assert acc != acc  # NaN: a regression has no accuracy

    run = tmp_path / "run"
    assert train_in_process(run, "experiment=santurkar_dln", "model.widths=[10,10,10]",
                            "train.steps=40", "train.eval_every=20", "probe=off") == "completed"
    with open(run / "scalars.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    tags = {tag for _, tag, _ in rows}
    assert {"train/loss", "test/loss"} <= tags and not {"train/acc", "test/acc"} & tags
    test_loss = [float(v) for _, tag, v in rows if tag == "test/loss"]
    assert test_loss[-1] < test_loss[0]


def test_glorot_init_draws_from_the_xavier_uniform_range() -> None:
    import math

    import torch
    from torch import nn

    from bnlab.models import build_model

    cfg = compose("model=mlp", "model.widths=[300,200]", "model.init=glorot", "norm=none")
    torch.manual_seed(0)
    layers = [m for m in build_model(cfg, (1, 28, 28), 10).modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # U(-a, a): a/sqrt(3)
        assert torch.all(layer.bias == 0)
    default = build_model(compose("model=mlp", "model.widths=[300,200]", "norm=none"), (1, 28, 28), 10)
    first = next(m for m in default.modules() if isinstance(m, nn.Linear))
    # torch's default bound is 1/sqrt(fan_in), well inside Glorot's for this layer
    assert first.weight.abs().max() <= 1 / math.sqrt(784) < math.sqrt(6 / (784 + 300))
