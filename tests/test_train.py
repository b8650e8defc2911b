"""The trainer: reproducible on CPU, the learning-rate schedule, epochs, resident batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import scalars, train_in_process

FAST = ["data=digits", "train.steps=40", "train.log_every=10", "train.eval_every=20", "probe=off"]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert train_in_process(tmp_path / name, *FAST, f"seed={seed}") == "completed"
    a, b, c = (scalars(tmp_path / n) for n in "abc")
    assert a == b
    assert [t for t in a if t[1] == "train/loss"] != [t for t in c if t[1] == "train/loss"]


def test_cosine_schedule_logs_the_closed_form(tmp_path):
    train_in_process(tmp_path, *FAST, "optim.schedule=cosine", "optim.lr=0.2")
    logged = {s: v for s, t, v in scalars(tmp_path) if t == "train/lr"}
    # the rate of the last update made before each log step: update number s - 1 (0-based)
    for step, lr in logged.items():
        assert lr == 0.2 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 40))


def test_epochs_set_the_number_of_steps(tmp_path):
    train_in_process(tmp_path, "data=digits", "train.epochs=2", "train.batch_size=100", "probe=off")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 2 * (1437 // 100)


def test_train_metrics_are_means_since_the_previous_log_step(tmp_path):
    train_in_process(tmp_path, *FAST, "train.log_every=1")
    every = {s: v for s, t, v in scalars(tmp_path) if t == "train/loss"}
    coarse_dir = tmp_path.parent / "coarse"
    train_in_process(coarse_dir, *FAST, "train.log_every=10")
    coarse = {s: v for s, t, v in scalars(coarse_dir) if t == "train/loss"}
    for step, value in coarse.items():
        window = [every[s] for s in range(step - 9, step + 1)]
        assert abs(value - sum(window) / 10) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_default_budget_on_fashion_mnist_reaches_086(tmp_path):
    """The README's main command: the default budget and optimizer, BN before each sigmoid."""
    status = train_in_process(tmp_path, "data=fashion_mnist", "norm=bn", "activation=sigmoid",
                              f"data.root={tmp_path / 'data'}", "train.threads=0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert status == "completed" and summary["final"]["test/acc"] >= 0.86


def test_compiled_training_equals_eager_noise_included(tmp_path):
    """train.compile=true trains on the same numbers as eager mode: noisy_bn's noise comes from
    torch's generator in both, so every logged training scalar agrees to float32 rounding."""
    runs = {}
    for compiled in ("false", "true"):
        run = tmp_path / compiled
        status = train_in_process(run, "data=digits", "norm=noisy_bn", "train.steps=60",
                                  "train.log_every=20", "probe=off", f"train.compile={compiled}")
        assert status == "completed"
        runs[compiled] = {(step, tag): value for step, tag, value in scalars(run)
                          if tag.startswith("train/loss")}
    assert runs["true"].keys() == runs["false"].keys() and len(runs["true"]) == 3
    for key, value in runs["false"].items():
        assert math.isclose(runs["true"][key], value, rel_tol=1e-4), key
