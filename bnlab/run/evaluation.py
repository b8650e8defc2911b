"""Evaluation on a whole split, in eval mode and in train mode (batch statistics)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.config.schema import EVAL_AUTO
from bnlab.data import Split, make_batch_stream
from bnlab.models import Net
from bnlab.norms import frozen_stats, maps_over_batches, uses_batch_statistics

# The test batches of the train-mode evaluation have their own stream, seeded apart from the
# training stream (`seed`, `seed + 1`) and the probe batch (probes.PROBE_SEED_OFFSET).
TRAIN_MODE_SEED_OFFSET = 104729


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


# Train-mode evaluation of an MLP maps its batches with torch.func.vmap, about this many rows a
# pass. Measured on 2 CPU cores (default MLP, 167 batches of 60): 61 ms one batch a pass, 32 ms
# in passes of 2,048 rows, 45 ms in one pass of all; the CNN's 40 batches of 256 took 1.3-2.2x
# longer mapped than one by one (convolutions under vmap), so conv nets keep one pass a batch.
ROWS_PER_MAPPED_PASS = 2048


def maps_batches(model: Net) -> bool:
    """Whether the train-mode evaluation of ``model`` maps its batches (see ROWS_PER_MAPPED_PASS)."""
    return maps_over_batches(model) and all(isinstance(b.layer, nn.Linear) for b in model.blocks)


@torch.no_grad()
def evaluate_train_mode(model: Net, split: Split, batch_size: int, seed: int, data_cfg,
                        task: str = "classification", rows_per_pass: int = ROWS_PER_MAPPED_PASS
                        ) -> tuple[float, float]:
    """Mean loss and accuracy of the train-mode network on test batches built like training's.

    The batches are ``ceil(len(split) / batch_size)`` batches of ``batch_size`` drawn from the
    split by the training sampler's rule (``data.sampler``: i.i.d. permutations, or K labels x m
    examples), from a generator seeded with ``seed + TRAIN_MODE_SEED_OFFSET``: the same batches
    at every evaluation, and no draw from the training stream. Every layer normalizes with the
    batch's statistics (running statistics untouched); torch's global RNG is restored after, so
    noisy layers' draws here do not shift training (:func:`bnlab.norms.frozen_stats`). Loss and
    accuracy are means over all ``n_batches * batch_size`` predictions (about one pass over the
    split).

    An MLP's batches run as one ``torch.func.vmap`` pass per ``rows_per_pass`` rows, each batch
    with its own statistics: the same numbers as one pass per batch, to rounding, in half the
    time. Conv nets, and models with a layer that cannot be mapped (noisy BN), run one pass per
    batch (:func:`maps_batches`).
    """
    stream = make_batch_stream(split, batch_size, seed + TRAIN_MODE_SEED_OFFSET, data_cfg,
                               augment=False)
    n_batches = -(-len(split) // batch_size)
    per_pass = max(1, rows_per_pass // batch_size) if maps_batches(model) else 1
    forward = torch.func.vmap(model) if per_pass > 1 else model
    was_training = model.training
    model.train()
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    try:
        with frozen_stats(model):  # also restores torch's RNG after noisy layers' draws
            for start in range(0, n_batches, per_pass):
                batches = [next(stream) for _ in range(min(per_pass, n_batches - start))]
                if per_pass > 1:  # (batches, batch_size, ...) in, (batches * batch_size, outputs) out
                    out = forward(torch.stack([x for x, _ in batches])).flatten(0, 1)
                    y = torch.cat([y for _, y in batches])
                else:
                    (x, y), = batches
                    out = model(x)
                loss, hits = _sums(out.float(), y, task)
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
