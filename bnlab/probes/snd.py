"""Stochastic normalization disturbance (Huang, Zhou, Zhu, Liu & Shao 2019, IterNorm, arXiv 1904.03441).

How much a sample's normalized output depends on the rest of its mini-batch. For a sample x and a
normalization F that normalizes x with the statistics of a mini-batch B holding it::

    SND(x) = E_B || F_B(x) - E_B[F_B(x)] ||_2

estimated over s mini-batches B_1..B_s that all hold x, the other m - 1 members drawn at
random::

    snd(x) = (1/s) sum_i || F_{B_i}(x) - (1/s) sum_j F_{B_j}(x) ||_2

bnlab measures it on a network, at the output of every hidden layer's norm (``norm`` point), in
train mode with running statistics frozen and noise held at one sample (so only the batch, not
noisy BN's draw, changes between passes): each batch is one forward pass with x at row 0 and
m - 1 other rows of the probe batch (m = the batch one norm layer sees in a training step).
``snd/layerK`` is the mean of snd(x) over n samples x. Layer 1's input is x itself, so its value
is the paper's quantity for that layer; a deeper layer's input already depends on the batch
through the earlier layers, so its value includes the disturbance they pass on, as in training.
A norm without batch statistics (none, ln, gn) gives exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.models import Net
from bnlab.probes.passes import points_per_batch


def disturbance(outputs: Tensor) -> Tensor:
    """snd(x) from ``outputs`` (s, ...): F_{B_i}(x) of the s batches, one row each (float64, 0-dim)."""
    flat = outputs.flatten(1).double()
    return torch.linalg.vector_norm(flat - flat.mean(0), dim=1).mean()


def batch_plan(pool_size: int, batch_size: int, samples: int, draws: int,
               generator: torch.Generator) -> Tensor:
    """Row indices (samples, draws, batch_size) into a pool of ``pool_size`` examples.

    ``samples`` distinct examples x (a random choice); for each, ``draws`` batches whose row 0 is x
    and whose other ``batch_size - 1`` rows are distinct examples of the pool other than x, drawn
    uniformly without replacement, independently for every batch.
    """
    if not 1 <= batch_size <= pool_size or samples > pool_size:
        raise ValueError(f"snd: batches of {batch_size} for {samples} samples need a pool of at "
                         f"least that many examples, not {pool_size}")
    chosen = torch.randperm(pool_size, generator=generator)[:samples]
    plan = torch.empty(samples, draws, batch_size, dtype=torch.long)
    for i, x in enumerate(chosen.tolist()):
        for j in range(draws):
            others = torch.randperm(pool_size - 1, generator=generator)[: batch_size - 1]
            others += (others >= x).long()  # skip x itself
            plan[i, j, 0] = x
            plan[i, j, 1:] = others
    return plan


def layer_disturbances(model: Net, pool: Tensor, plan: Tensor) -> Tensor:
    """``snd/layerK`` for every hidden layer K of ``model``: float64 (layers,), on the pool's device.

    One train-mode pass per batch of ``plan`` (:func:`batch_plan`) over rows of ``pool``, noise
    held; running statistics, torch's global RNG and the model's mode are left as they were.
    """
    samples, draws, _ = plan.shape
    batches = pool[plan.flatten(0, 1).to(pool.device)]  # (samples * draws, size, ...)
    outputs = points_per_batch(model, batches, ["norm"] * len(model.blocks), hold_noise=True)
    values = []
    for layer in outputs:
        rows = layer[:, 0].unflatten(0, (samples, draws))  # F_B(x) of each sample x, each batch B
        values.append(torch.stack([disturbance(per_sample) for per_sample in rows]).mean())
    return torch.stack(values)
