"""What every bnlab normalization layer shares."""

from __future__ import annotations

from torch import Tensor, nn


class Norm(nn.Module):
    """Base class of bnlab's normalization layers.

    ``update_stats=False`` is the probes' frozen-statistics mode: a train-mode forward pass uses
    batch statistics as usual but leaves running estimates and step counters untouched, so
    measuring the network never changes its training. ``hold_noise=True`` makes a stochastic
    layer reuse its last noise sample instead of drawing a new one.
    """

    update_stats: bool = True
    # True while a measurement needs repeated passes to see the same noise (noisy BN, ICS probes).
    hold_noise: bool = False

    def log_scalars(self) -> dict[str, float]:
        """Scalars worth logging for this layer (Batch Renorm's current r_max, d_max)."""
        return {}

    @staticmethod
    def reduce_dims(x: Tensor) -> tuple[int, ...]:
        """Dimensions a per-feature statistic reduces over: N for (N, C), N, H, W for (N, C, H, W)."""
        return (0,) if x.dim() == 2 else (0, 2, 3)
