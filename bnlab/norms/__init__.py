"""Normalization layers, one module per family, and the registry behind ``build_norm``.

    from bnlab.norms import build_norm
    layer = build_norm("bn", num_features=64, dims=4, momentum=0.1)

``dims`` is the rank of the input: 2 for (N, C), 4 for (N, C, H, W). How to add a norm:
:mod:`bnlab.norms.registry`.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bnlab.norms.base import LOW_PRECISION, Norm, in_forward_order, per_feature
from bnlab.norms.registry import NORMS, build_norm, norm_class, register_norm


@contextmanager
def _set_flag(model: nn.Module, flag: str, value: bool) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, Norm)]
    saved = [getattr(m, flag) for m in layers]
    for m in layers:
        setattr(m, flag, value)
    try:
        yield
    finally:
        for m, old in zip(layers, saved, strict=True):
            setattr(m, flag, old)


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer of every module of ``model`` is as it was when the block ends, whatever the
    layers did to it inside (updated in place, or replaced by a new tensor)."""
    saved = [(module, name, buffer.clone()) for module in model.modules()
             for name, buffer in module._buffers.items() if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, value in saved:
                current = module._buffers.get(name)
                if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                    current.copy_(value)
                else:
                    module._buffers[name] = value


@contextmanager
def frozen_stats(model: nn.Module) -> Iterator[None]:
    """A measurement pass: train-mode batch statistics that leave no trace in ``model`` or in torch.

    Running statistics and step counters stay as they are, and torch's global RNG (CPU, and the
    CUDA devices of ``model``) is restored on exit. Inside, stochastic layers (noisy BN) draw
    from it one after another as in a training step, so the pass sees in every layer the noise
    the next training step will draw there (for inputs of the same shape).

    bnlab's layers honour ``update_stats=False`` and leave their buffers alone; a layer that
    does not know the flag (one written the way ``torch.nn.BatchNorm`` is, or torch's own) may
    update its buffers inside, and :func:`preserved_buffers` puts them back on exit, so the
    guarantee does not depend on the layer's cooperation.
    """
    tensors = itertools.chain(model.parameters(), model.buffers())
    cuda = sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda, device_type="cuda"), preserved_buffers(model), \
            _set_flag(model, "update_stats", False):
        yield


def held_noise(model: nn.Module):
    """Stochastic layers (noisy BN) reuse their last noise sample instead of drawing anew."""
    return _set_flag(model, "hold_noise", True)


def maps_over_batches(model: nn.Module) -> bool:
    """Whether ``model`` may run under ``torch.func.vmap``, many batches each with its own statistics.

    Opt-in: every bnlab norm layer must declare it (:attr:`Norm.maps_over_batches`), and any
    other module that holds buffers (a layer bnlab does not know, ``torch.nn.BatchNorm1d``) rules
    it out, since updating state in place under vmap fails or goes wrong."""
    for m in model.modules():
        if isinstance(m, Norm):
            if not m.maps_over_batches:
                return False
        elif any(True for _ in m.buffers(recurse=False)):
            return False
    return True


def uses_batch_statistics(model: nn.Module) -> bool:
    """Whether any norm layer of ``model`` normalizes with batch statistics in training mode."""
    return any(isinstance(m, Norm) and m.uses_batch_statistics for m in model.modules())


def finish_training(model: nn.Module, batches: Iterable, num_batches: int = 100) -> int:
    """Run the end-of-training hook of every layer that has one (:meth:`Norm.finish_training`).

    The layers run in forward order, ``model`` in eval mode, on the inputs of the first
    ``num_batches`` of ``batches``; nothing is read when no layer needs it. Returns the number
    of batches read.
    """
    layers = [m for m in model.modules() if isinstance(m, Norm) and m.finishes_training()]
    if not layers:
        return 0
    return in_forward_order(model, layers, batches, num_batches,
                            lambda layer, inputs: layer.finish_training(model, inputs))


# Every module of this package is imported here: a norm's module registers it by existing.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LOW_PRECISION", "NORMS", "Norm", "build_norm",
           "finish_training", "frozen_stats", "held_noise", "norm_class", "per_feature",
           "maps_over_batches", "preserved_buffers", "register_norm", "uses_batch_statistics"]
