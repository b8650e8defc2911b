"""Normalization layers, one file per family, and the registry behind ``build_norm``.

    from bnlab.norms import build_norm
    layer = build_norm("bn", num_features=64, dims=4, momentum=0.1)

``dims`` is the rank of the input: 2 for (N, C), 4 for (N, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from bnlab.norms.base import Norm

NORMS: dict[str, Callable[..., nn.Module]] = {}


def register_norm(name: str) -> Callable:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        NORMS[name] = factory
        return factory
    return add


def build_norm(name: str, num_features: int, dims: int = 2, **options) -> nn.Module:
    """Build normalization layer ``name`` for ``num_features`` features of a rank-``dims`` input."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose from {', '.join(sorted(NORMS))}")
    if dims not in (2, 4):
        raise ValueError(f"dims must be 2 (N, C) or 4 (N, C, H, W), got {dims}")
    return NORMS[name](num_features=num_features, dims=dims, **options)


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


def frozen_stats(model: nn.Module):
    """Train-mode batch statistics without touching running statistics or step counters."""
    return _set_flag(model, "update_stats", False)


def held_noise(model: nn.Module):
    """Stochastic layers (noisy BN) reuse their last noise sample instead of drawing anew."""
    return _set_flag(model, "hold_noise", True)


# Importing the families fills the registry.
from bnlab.norms import (  # noqa: E402,F401
    batchnorm,
    batchrenorm,
    groupnorm,
    identity,
    layernorm,
    noisy,
    whitening,
)

__all__ = ["NORMS", "Norm", "build_norm", "frozen_stats", "held_noise", "register_norm"]
