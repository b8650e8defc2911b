"""The loss of a data set's task, and evaluation on a whole split: shared by trainer and probes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnlab.config import EVAL_AUTO
from bnlab.data import Split, make_batch_stream
from bnlab.models import Net
from bnlab.norms import frozen_stats, uses_batch_statistics

# The test batches of the train-mode evaluation have their own stream, seeded apart from the
# training stream (`seed`, `seed + 1`) and the probe batch (probes.PROBE_SEED_OFFSET).
TRAIN_MODE_SEED_OFFSET = 104729


def loss_function(task: str):
    """The training loss of a data set's task: cross-entropy (classification), MSE (regression)."""
    return F.cross_entropy if task == "classification" else F.mse_loss


def _sums(out: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number of correct predictions of one batch (0 for a regression task)."""
    if task == "classification":
        return F.cross_entropy(out, y, reduction="sum"), (out.argmax(1) == y).sum()
    # the mean over the outputs of each example, as F.mse_loss averages them in training
    return F.mse_loss(out, y, reduction="sum") / out[0].numel(), torch.zeros((), dtype=torch.long)


@torch.no_grad()
def evaluate(model: Net, split: Split, batch_size: int, train_mode: bool = False,
             task: str = "classification") -> tuple[float, float]:
    """Mean loss and accuracy on the whole split, in eval mode (or train-mode batch statistics).

    A regression task has no accuracy: it is NaN, and the trainer does not log it.
    """
    was_training = model.training
    model.train(train_mode)
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    with frozen_stats(model):
        for start in range(0, len(split), batch_size):
            x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
            loss, hits = _sums(model(x).float(), y, task)
            loss_sum += loss
            correct += hits.to(correct.device)
    model.train(was_training)
    n = len(split)
    return loss_sum.item() / n, correct.item() / n if task == "classification" else math.nan


# train.eval_every=auto: every run, however short, gets a curve of this many evaluations. One
# evaluation of the default MLP on Fashion-MNIST's 10,000 test images costs ~20 training steps
# at batch 60 (measured), so 20 of them cost ~5% of its default 8,000-step run (docs/configuration.md).
EVALUATIONS_PER_RUN = 20


def eval_interval(eval_every: int | str, total_steps: int) -> int:
    """Steps between evaluations: ``train.eval_every``, or for ``auto``
    ``ceil(total_steps / EVALUATIONS_PER_RUN)`` (the last step is always evaluated too)."""
    if eval_every == EVAL_AUTO:
        return max(1, math.ceil(total_steps / EVALUATIONS_PER_RUN))
    return int(eval_every)


@torch.no_grad()
def evaluate_train_mode(model: Net, split: Split, batch_size: int, seed: int, data_cfg,
                        task: str = "classification") -> tuple[float, float]:
    """Mean loss and accuracy of the train-mode network on test batches built like training's.

    The batches are ``ceil(len(split) / batch_size)`` batches of ``batch_size`` drawn from the
    split by the training sampler's rule (``data.sampler``: i.i.d. permutations, or K labels x m
    examples), from a generator seeded with ``seed + TRAIN_MODE_SEED_OFFSET``: the same batches
    at every evaluation, and no draw from the training stream. Every layer normalizes with the
    batch's statistics (running statistics untouched); torch's global RNG is restored after, so
    noisy layers' draws here do not shift training (:func:`bnlab.norms.frozen_stats`). Loss and
    accuracy are means over all ``n_batches * batch_size`` predictions (about one pass over the
    split).
    """
    stream = make_batch_stream(split, batch_size, seed + TRAIN_MODE_SEED_OFFSET, data_cfg,
                               augment=False)
    n_batches = -(-len(split) // batch_size)
    was_training = model.training
    model.train()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    try:
        with frozen_stats(model):  # also restores torch's RNG after noisy layers' draws
            for _ in range(n_batches):
                x, y = next(stream)
                loss, hits = _sums(model(x).float(), y, task)
                loss_sum += loss
                correct += hits.to(correct.device)
    finally:
        model.train(was_training)
    n = n_batches * batch_size
    return loss_sum.item() / n, correct.item() / n if task == "classification" else math.nan


def train_mode_metrics(model: Net, split: Split, batch_size: int, seed: int, data_cfg,
                       task: str = "classification") -> dict[str, float]:
    """``test/acc_train_mode`` (``test/loss_train_mode`` for a regression task) from
    :func:`evaluate_train_mode`, for a model with batch-statistic layers; else nothing."""
    if not uses_batch_statistics(model):
        return {}
    loss, acc = evaluate_train_mode(model, split, batch_size, seed, data_cfg, task)
    if task == "classification":
        return {"test/acc_train_mode": acc}
    return {"test/loss_train_mode": loss}
