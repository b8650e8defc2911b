"""Gradient-based internal covariate shift (Santurkar et al. 2018, Definition 2.1).

For hidden layer i, with the parameters W_1..W_k of step t and the batch (x, y) of step t:

    G_i  = grad_{W_i} L(W_1,    ..., W_{i-1},    W_i, ..., W_k; x, y)
    G'_i = grad_{W_i} L(W_1',   ..., W_{i-1}',   W_i, ..., W_k; x, y)

where W' are the parameters after this step's optimizer update. ICS_i = ||G_i - G'_i||_2 (how
much the update of the earlier layers alone changes the problem layer i sees); cos(G_i, G'_i)
is the scale-free version. "Parameters of layer j" are all of block j's: the linear/conv weight
and bias and its norm's gamma and beta.

These functions know nothing about the trainer. They leave the model, its running statistics,
the optimizer state and torch's global RNG exactly as they found them, so measuring ICS never
changes training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.models import Net
from bnlab.norms import frozen_stats, held_noise

LossFn = Callable[[Tensor, Tensor], Tensor]


def _loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn,
          params: dict[str, Tensor] | None = None) -> Tensor:
    out = model(x) if params is None else functional_call(model, params, (x,))
    return loss_fn(out.float(), y)


def updated_parameters(model: nn.Module, optimizer: torch.optim.Optimizer,
                       grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameters one ``optimizer.step()`` with ``grads`` would produce, by name.

    Model and optimizer are deep-copied together (so the copy's optimizer holds the copy's
    parameters, with its own momentum buffers, Adam moments and learning rates) and the copy
    is stepped: the original parameters and optimizer state are untouched.
    """
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    for name, param in model_copy.named_parameters():
        param.grad = grads.get(name)
    optimizer_copy.step()
    return {name: p.detach() for name, p in model_copy.named_parameters()}


def gradient_ics(model: Net, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                 loss_fn: LossFn = F.cross_entropy) -> tuple[Tensor, Tensor]:
    """ICS of every hidden layer on batch (x, y): tensors ``l2`` and ``cos``, one entry per layer.

    ``l2[i] = ||G_i - G'_i||_2`` and ``cos[i] = <G_i, G'_i> / (||G_i|| ||G'_i||)`` (float64, on
    the model's device), G and G' as in the module docstring, for the training loss
    ``loss_fn(output, y)`` (cross-entropy on the logits; MSE for a regression task).

    The first pass draws whatever noise a stochastic layer draws, from torch's current RNG
    state, i.e. the same noise the training step that follows will draw; the later passes hold
    that sample. No running statistics move and the RNG state is restored at the end.
    """
    name_of = {id(p): name for name, p in model.named_parameters()}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    blocks = model.blocks
    was_training = model.training
    model.train()
    try:
        with frozen_stats(model):
            grads = torch.autograd.grad(_loss(model, x, y, loss_fn), list(trainable.values()),
                                        allow_unused=True)
            grads_by_name = {n: g for n, g in zip(trainable, grads, strict=True) if g is not None}
            updated = updated_parameters(model, optimizer, grads_by_name)
            before, after = [], []
            with held_noise(model):
                for k, block in enumerate(blocks):
                    weight = block.layer.weight
                    before.append(grads_by_name[name_of[id(weight)]])
                    earlier = {name_of[id(p)] for b in blocks[:k] for p in b.parameters()}
                    params = {name: updated[name] for name in earlier}
                    loss = _loss(model, x, y, loss_fn, params)
                    after.append(torch.autograd.grad(loss, weight)[0])
    finally:
        model.train(was_training)
    return compare_gradients(before, after)


def compare_gradients(before: list[Tensor], after: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per pair (g, g'): ``||g - g'||_2`` and ``cos(g, g')``, in float64, stacked (no host sync)."""
    if not before:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty
    l2, cos = [], []
    for g, g2 in zip(before, after, strict=True):
        g, g2 = g.double().flatten(), g2.double().flatten()
        l2.append(torch.linalg.vector_norm(g - g2))
        cos.append(F.cosine_similarity(g, g2, dim=0, eps=1e-30).clamp(-1, 1))  # rounding can pass 1
    return torch.stack(l2), torch.stack(cos)
