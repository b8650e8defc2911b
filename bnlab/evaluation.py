"""The loss of a data set's task, and evaluation on a whole split: shared by trainer and probes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnlab.config import EVAL_AUTO
from bnlab.data import Split
from bnlab.models import Net
from bnlab.norms import frozen_stats


def loss_function(task: str):
    """The training loss of a data set's task: cross-entropy (classification), MSE (regression)."""
    return F.cross_entropy if task == "classification" else F.mse_loss


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
            out = model(x).float()
            if task == "classification":
                loss_sum += F.cross_entropy(out, y, reduction="sum")
                correct += (out.argmax(1) == y).sum()
            else:  # mean over the outputs of each example, as F.mse_loss averages them in training
                loss_sum += F.mse_loss(out, y, reduction="sum") / out[0].numel()
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
