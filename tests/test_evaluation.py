"""Evaluation (bnlab.run.evaluation): how often it happens (eval_every=auto), and the train-mode
metrics of the norms that use batch statistics."""

from __future__ import annotations

import pytest
import torch

from bnlab.data import load_dataset

from helpers import compose, csv_series, train_in_process


# ---------------------------------------------------------------- eval_every=auto
def test_eval_every_auto_evaluates_twenty_times_whatever_the_length(tmp_path):
    from bnlab.run.evaluation import EVALUATIONS_PER_RUN, eval_interval

    assert EVALUATIONS_PER_RUN == 20
    assert eval_interval(7, 100) == 7 and eval_interval("auto", 10) == 1
    for total in (40, 1000, 1001, 8000):
        every = eval_interval("auto", total)
        evaluations = len(range(every, total + 1, every)) + (total % every != 0)
        assert evaluations == min(total, 20)
    assert compose().train.eval_every == "auto"  # the default
    run_dir = tmp_path / "run"
    assert train_in_process(run_dir, "data=digits", "train.steps=40", "probe=off") == "completed"
    assert [s for s, _ in csv_series(run_dir)["test/acc"]] == list(range(2, 41, 2))


# ---------------------------------------------------------------- train-mode evaluation
def trained_digits_model(*overrides: str):
    """A digits MLP whose running statistics disagree with its batch statistics."""
    from bnlab.models import build_model

    cfg = compose("data=digits", *overrides)
    data = load_dataset(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, data.shape, data.num_outputs)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "running_mean"):
                module.running_mean.fill_(0.5)
    return cfg, data, model


@pytest.mark.parametrize("norm, sampler, rows_per_pass", [
    ("norm=bn", "iid", 400), ("norm=bn", "grouped", 400), ("norm=bn", "iid", 100),
    ("norm.impl=torch", "iid", 400), ("norm=brn", "iid", 400), ("norm=zca", "iid", 400),
    ("norm=pca", "iid", 400), ("norm=iternorm", "iid", 400), ("norm=noisy_bn", "iid", 400),
    ("model=cnn", "iid", 400)])
def test_train_mode_evaluation_equals_a_direct_computation(norm, sampler, rows_per_pass):
    """One batch after another, directly, against bnlab's evaluation: vmap passes of all 18
    batches (400 rows) or of 5 (100 rows); one pass per batch for noisy BN and the CNN."""
    import copy
    import math

    import torch.nn.functional as F

    from bnlab.data import make_batch_stream
    from bnlab.run.evaluation import TRAIN_MODE_SEED_OFFSET, evaluate, evaluate_train_mode, maps_batches

    cfg, data, model = trained_digits_model("norm=bn", norm, f"data.sampler={sampler}",
                                            "data.labels_per_batch=2", "train.batch_size=20")
    assert maps_batches(model) is (norm not in ("norm=noisy_bn", "model=cnn"))
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    model.eval()
    loss, acc = evaluate_train_mode(model, data.test, 20, cfg.seed, cfg.data, rows_per_pass=rows_per_pass)
    # Nothing moved: running statistics, parameters, global RNG, the model's mode.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state()) and not model.training

    # Directly: ceil(360 / 20) = 18 batches of 20 from the training rule, on a copy in train mode.
    direct = copy.deepcopy(model).train()
    stream = make_batch_stream(data.test, 20, cfg.seed + TRAIN_MODE_SEED_OFFSET, cfg.data)
    n_batches = math.ceil(len(data.test) / 20)
    losses, hits = [], 0
    with torch.no_grad(), torch.random.fork_rng():  # noisy BN: the draws the evaluation made
        for _ in range(n_batches):
            x, y = next(stream)
            if sampler == "grouped":  # 2 labels x 10 examples
                assert len(y.unique()) == 2 and (torch.bincount(y)[y.unique()] == 10).all()
            out = direct(x)
            losses.append(F.cross_entropy(out, y, reduction="sum"))
            hits += int((out.argmax(1) == y).sum())
    assert acc == hits / (n_batches * 20)
    assert loss == pytest.approx(float(torch.stack(losses).sum()) / (n_batches * 20), rel=1e-6)
    assert acc != evaluate(model, data.test, 1000)[1]  # not the eval-mode network
    # The same batches at every evaluation.
    assert evaluate_train_mode(model, data.test, 20, cfg.seed, cfg.data,
                               rows_per_pass=rows_per_pass) == (loss, acc)


def test_train_mode_metrics_only_for_batch_statistic_norms():
    from bnlab.run.evaluation import train_mode_metrics

    for norm, expected in (("bn", True), ("brn", True), ("noisy_bn", True), ("whiten", True),
                           ("ln", False), ("none", False)):
        cfg, data, model = trained_digits_model(f"norm={norm}")
        tags = train_mode_metrics(model, data.test, 32, cfg.seed, cfg.data)
        assert (set(tags) == {"test/acc_train_mode"}) is expected, norm
        assert expected or tags == {}


@pytest.mark.parametrize("norm", ["bn", "noisy_bn"])
def test_train_mode_evaluation_leaves_training_bit_identical(tmp_path, norm):
    common = ["data=digits", f"norm={norm}", "data.sampler=grouped", "data.labels_per_batch=4",
              "train.batch_size=32", "train.steps=60", "train.log_every=10", "probe=off"]
    tables = []
    for every in (10, 1000):  # train-mode evaluations at six steps, or at the last only
        run = tmp_path / str(every)
        assert train_in_process(run, *common, f"train.eval_every={every}") == "completed"
        rows = [line.split(",") for line in (run / "scalars.csv").read_text().splitlines()[1:]]
        tables.append({(s, t): v for s, t, v in rows if t.startswith("train/")})
        assert sum(t == "test/acc_train_mode" for _, t, _ in rows) == (6 if every == 10 else 1)
    assert tables[0] == tables[1]
