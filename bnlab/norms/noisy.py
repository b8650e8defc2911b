"""``noisy_bn``: batch normalization followed by distributional noise (Santurkar et al. 2018, Sec. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.config.norm_options import NoisyBNOptions
from bnlab.norms.batchnorm import BatchNorm
from bnlab.norms.registry import register_norm


class NoiseInjection:
    """Adds Santurkar et al.'s time-varying, non-zero-mean, non-unit-variance noise to a BN output.

    At every training step each layer draws

        mu ~ U(-mean_range, mean_range),  sigma ~ U(std_low, std_high)

    and then, independently for every element of the batch's activations,

        m ~ U(mu - mean_jitter, mu + mean_jitter),  s ~ N(sigma, std_jitter^2),  a <- s * a + m

    Noise only in training mode. Draws come from torch's global RNG, which the trainer seeds and
    checkpoints, one layer after another in the order of the forward pass, in a training step
    and in a measurement pass alike: a measurement (:func:`bnlab.norms.frozen_stats`) restores
    the RNG when it ends, so each of its layers sees the noise that layer will draw in the next
    training step (for an input of the same shape) and training is not shifted. ``hold_noise=True``
    reuses the last sample (drawing one only if none of the input's shape is held).
    """

    maps_over_batches = False  # each call stores its draw in self.noise (hold_noise)
    maps_over_members = False  # its draws come from the global RNG, in the standalone run's order
    mean_range: float
    std_low: float
    std_high: float
    mean_jitter: float
    std_jitter: float

    def _init_noise(self, mean_range: float = NoisyBNOptions.mean_range,
                    std_low: float = NoisyBNOptions.std_low, std_high: float = NoisyBNOptions.std_high,
                    mean_jitter: float = NoisyBNOptions.mean_jitter,
                    std_jitter: float = NoisyBNOptions.std_jitter) -> None:
        if mean_range < 0 or mean_jitter < 0 or std_jitter < 0 or std_low > std_high:
            raise ValueError(
                f"noisy_bn: need mean_range, mean_jitter, std_jitter >= 0 and std_low <= std_high, "
                f"got {mean_range}, {mean_jitter}, {std_jitter}, {std_low} > {std_high}")
        self.mean_range, self.std_low, self.std_high = mean_range, std_low, std_high
        self.mean_jitter, self.std_jitter = mean_jitter, std_jitter
        self.noise: tuple[Tensor, Tensor] | None = None  # (s, m) of the last draw

    def draw_noise(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """One sample (s, m) shaped like ``like``, from the global RNG."""
        opts = {"device": like.device, "dtype": like.dtype}
        mu = (torch.rand((), **opts) * 2 - 1) * self.mean_range
        sigma = self.std_low + torch.rand((), **opts) * (self.std_high - self.std_low)
        m = mu + (torch.rand(like.shape, **opts) * 2 - 1) * self.mean_jitter
        s = sigma + torch.randn(like.shape, **opts) * self.std_jitter
        return s, m

    def add_noise(self, a: Tensor) -> Tensor:
        held = self.noise
        if not (self.hold_noise and held is not None and held[0].shape == a.shape
                and held[0].device == a.device):
            held = self.draw_noise(a)
        self.noise = held
        s, m = held
        return torch.addcmul(m, s, a)


@register_norm(NoisyBNOptions)
class NoisyBatchNorm(NoiseInjection, BatchNorm):
    """:class:`BatchNorm` (either ``impl``), then :class:`NoiseInjection` in training mode."""

    def __init__(self, num_features: int, dims: int = 2, momentum: float | None = NoisyBNOptions.momentum,
                 eps: float = NoisyBNOptions.eps, inference: str = NoisyBNOptions.inference,
                 impl: str = NoisyBNOptions.impl, **noise: float) -> None:
        BatchNorm.__init__(self, num_features, dims, momentum=momentum, eps=eps, inference=inference,
                           impl=impl)
        self._init_noise(**noise)

    def forward(self, x: Tensor) -> Tensor:
        y = BatchNorm.forward(self, x)
        return self.add_noise(y) if self.training else y
