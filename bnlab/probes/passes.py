"""Train-mode passes of many batches, each normalized with its own statistics, reading one point per
hidden layer: what batch noise and the disturbance probe measure.

The passes leave running statistics, torch's global RNG and the model's mode as they were
(:func:`bnlab.norms.frozen_stats`). An MLP whose layers all map over batches runs them as
``torch.func.vmap`` passes of about ``ROWS_PER_PASS`` rows (the same numbers as one pass per
batch, to rounding); conv nets, and layers that keep state between calls (noisy BN's held noise),
take one pass per batch, all inside one entry of the contexts, which cost more than a small pass.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from bnlab.models import Net
from bnlab.norms import frozen_stats, held_noise, maps_over_batches

# Rows of one mapped pass, as in the train-mode evaluation (bnlab.run.evaluation).
ROWS_PER_PASS = 2048


def _mapped(model: Net) -> bool:
    return maps_over_batches(model) and all(isinstance(b.layer, nn.Linear) for b in model.blocks)


@torch.no_grad()
def points_per_batch(model: Net, batches: Tensor, points: list[str], hold_noise: bool = False
                     ) -> list[Tensor]:
    """For ``batches`` (b, N, ...) and one point name per hidden block (``pre``, ``norm`` or
    ``act``), the value of that point in each batch's train-mode pass: a list over blocks of
    (b, N, C, ...) tensors. ``hold_noise``: stochastic layers draw once and hold that sample."""
    blocks = model.blocks

    def forward(x: Tensor) -> tuple[Tensor, ...]:
        taps: list[dict[str, Tensor]] = [{} for _ in blocks]
        for block, tap in zip(blocks, taps, strict=True):
            block.taps = tap
        model(x)
        return tuple(tap[point] for tap, point in zip(taps, points, strict=True))

    was_training = model.training
    model.train()
    per_pass = max(1, ROWS_PER_PASS // batches.shape[1]) if _mapped(model) else 1
    outputs: list[tuple[Tensor, ...]] = []
    try:
        hold = held_noise(model) if hold_noise else contextlib.nullcontext()
        with frozen_stats(model), hold:
            for start in range(0, len(batches), per_pass):
                group = batches[start:start + per_pass]
                if per_pass > 1:
                    outputs.append(torch.func.vmap(forward)(group))
                else:
                    outputs.append(tuple(t.unsqueeze(0) for t in forward(group[0])))
    finally:
        for block in blocks:
            block.taps = None
        model.train(was_training)
    return [torch.cat(layer) for layer in zip(*outputs, strict=True)]
