"""The loss of a data set's task, and evaluation on a whole split: shared by trainer and probes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
