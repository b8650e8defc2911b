"""Ghost batches: statistics over groups of K consecutive examples of the training batch.

Hoffer, Hubara & Soudry 2017 ("ghost batch normalization") and Ioffe 2017, Sec. 4.2
("micro-batches") normalize each group of K examples of a batch of N with the group's own
statistics, apart from the batch the gradient is taken over. ``norm.ghost_batch=K`` does so
for ``bn``, ``noisy_bn`` and ``brn``. What the layers share lives here:

- the groups: rows 0..K-1, K..2K-1, ...; when K does not divide N (a probe's batch: training
  batches are checked to divide before a run starts), the last N mod K rows form one smaller
  group of their own, as ``torch.split(x, K)`` cuts them;
- a view of G groups of (K, C, ...) as one (K, G * C, ...) batch, whose G * C "channels" are the
  groups' features, so torch's kernel (``F.batch_norm``) normalizes every group in one call;
- the running estimates: one update per group, in the groups' order, with the layer's momentum,
  as Hoffer et al.'s code does (github.com/eladhoffer/bigBatch, main_gbn.py: each ghost batch
  runs through the model, torch's BN, in turn) and as a loop of ``nn.BatchNorm`` calls over the
  groups would: r <- (1 - a)^G r + sum_l a (1 - a)^(G - l) s_l for the groups' statistics
  s_1..s_G. (Keras's ``virtual_batch_size`` averages them into one update instead.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def parts(x: Tensor, k: int) -> list[tuple[Tensor, int]]:
    """(rows, number of groups) of ``x``'s parts: its whole groups of ``k``, then the remainder."""
    n = x.shape[0]
    whole = n - n % k
    found = [(x[:whole], whole // k)] if whole else []
    if whole < n:
        found.append((x[whole:], 1))
    return found


def to_channels(x: Tensor, groups: int) -> Tensor:
    """(G * K, C, ...) -> (K, G * C, ...): group g's feature c becomes channel g * C + c."""
    if groups == 1:
        return x
    return x.unflatten(0, (groups, -1)).transpose(0, 1).flatten(1, 2)


def from_channels(y: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`to_channels`."""
    if groups == 1:
        return y
    return y.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 1)


def grouped(x: Tensor, groups: int) -> tuple[Tensor, tuple[int, ...]]:
    """(G, K, C, ...) view of ``x`` and the dimensions of one group's statistic (K, and H, W)."""
    view = x.unflatten(0, (groups, -1))
    return view, (1,) + tuple(range(3, view.dim()))


def sequential_update(running: Tensor, stats: Tensor, momentum: float) -> Tensor:
    """``running`` (C,) after one update ``r <- (1 - momentum) * r + momentum * s`` per row s of
    ``stats`` (G, C), in order, computed at once: (1 - a)^G r + sum_l a (1 - a)^(G - l) s_l."""
    count = stats.shape[0]
    powers = torch.arange(count - 1, -1, -1, dtype=stats.dtype, device=stats.device)
    weights = momentum * (1.0 - momentum) ** powers
    return running * (1.0 - momentum) ** count + weights @ stats
