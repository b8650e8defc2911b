"""The loss landscape along the gradient (Santurkar et al. 2018, Sec. 3.2, Fig. 4; App. A.2.2).

At parameters theta and training batch (x, y), with g = grad L(theta; x, y) and the step
lengths eta_1 < ... < eta_n spread evenly over [1/2, 4] x the learning rate (the paper's range
for its VGG; it does not say how many points, bnlab takes 8)::

    loss_min    = min_i L(theta - eta_i g)
    loss_max    = max_i L(theta - eta_i g)                          "loss landscape", Fig. 4(a)
    loss_range  = loss_max - loss_min                               (its shaded band's height)
    grad_change = max_i ||grad L(theta - eta_i g) - g||_2           "gradient predictiveness", 4(b)
    beta        = max_i ||grad L(theta - eta_i g) - g||_2 / ||eta_i g||_2
                                                                    "effective beta-smoothness", 4(c)

L is the training loss in train mode (batch statistics of the moved network, running statistics
frozen), without weight decay; stochastic layers (noisy BN) hold the noise of the first pass, the
noise the training step that follows draws. The moved parameters go through
``torch.func.functional_call``: the model, its running statistics, the optimizer and torch's
global RNG are left exactly as they were, so measuring never changes training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.norms import frozen_stats, held_noise

STEP_RANGE = (0.5, 4.0)  # eta / learning rate, both ends included (their VGG's range)
N_STEPS = 8

LossFn = Callable[[Tensor, Tensor], Tensor]


def step_sizes(lr: float, low: float = STEP_RANGE[0], high: float = STEP_RANGE[1],
               n: int = N_STEPS) -> Tensor:
    """``n`` step lengths eta evenly spaced over [low, high] x ``lr`` (float64, CPU)."""
    return torch.linspace(low, high, n, dtype=torch.float64) * lr


def summarize(losses: Tensor, grad_changes: Tensor, etas: Tensor, grad_norm: Tensor
              ) -> dict[str, Tensor]:
    """``loss_min``, ``loss_max``, ``loss_range``, ``grad_change``, ``beta`` (module docstring) from the
    losses L(theta - eta_i g), the changes ||grad L(theta - eta_i g) - g||, the etas and ||g||.

    A zero gradient moves nowhere: its beta is 0.
    """
    losses, grad_changes = losses.double(), grad_changes.double()
    distances = etas.to(grad_changes) * grad_norm.double()
    ratios = torch.where(distances > 0, grad_changes / distances, torch.zeros_like(grad_changes))
    low, high = losses.min(), losses.max()
    return {"loss_min": low, "loss_max": high, "loss_range": high - low,
            "grad_change": grad_changes.max(), "beta": ratios.max()}


def _dense(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> list[Tensor]:
    """The gradients, detached; an unused parameter's gradient is zero."""
    return [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads, like, strict=True)]


def _flat(grads: list[Tensor]) -> Tensor:
    """One float64 vector of all the gradients."""
    return torch.cat([g.double().flatten() for g in grads])


def landscape(model: nn.Module, x: Tensor, y: Tensor, lr: float, loss_fn: LossFn,
              etas: Tensor | None = None) -> dict[str, Tensor]:
    """The loss landscape along the gradient at batch (x, y): ``{name: 0-dim float64 tensor}``
    for ``loss_min``, ``loss_max``, ``loss_range``, ``grad_change``, ``beta`` (module docstring), on the
    model's device, no host sync. ``etas`` defaults to :func:`step_sizes` of ``lr``.
    """
    if etas is None:
        etas = step_sizes(lr)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    leaves = list(params.values())
    was_training = model.training
    model.train()
    losses, changes = [], []
    try:
        with torch.enable_grad(), frozen_stats(model):
            g = _dense(torch.autograd.grad(loss_fn(model(x), y), leaves, allow_unused=True),
                       leaves)
            flat_g = _flat(g)
            with held_noise(model):
                for eta in etas.tolist():
                    moved = {name: (p.detach() - eta * gi).requires_grad_()
                             for (name, p), gi in zip(params.items(), g, strict=True)}
                    loss = loss_fn(functional_call(model, moved, (x,)), y)
                    moved_g = torch.autograd.grad(loss, list(moved.values()), allow_unused=True)
                    losses.append(loss.detach())
                    changes.append(torch.linalg.vector_norm(_flat(_dense(moved_g, leaves)) - flat_g))
    finally:
        model.train(was_training)
    return summarize(torch.stack(losses), torch.stack(changes), etas.to(flat_g.device),
                     torch.linalg.vector_norm(flat_g))
