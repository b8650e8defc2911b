"""``noisy_bn``: batch normalization followed by distributional noise, and ``noisy_none``: the same
noise without the normalization (Santurkar et al. 2018, Sec. 2.1, App. A.2.1, Alg. 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.config.norm_options import NoiseOptions, NoisyBNOptions, NoisyNoneOptions
from bnlab.norms.base import Norm
from bnlab.norms.batchnorm import BatchNorm
from bnlab.norms.registry import register_norm


class NoiseInjection:
    """Adds Santurkar et al.'s time-varying, non-zero-mean, non-unit-variance noise (Alg. 1).

    At every training step each layer draws, for every unit j (a feature of (N, C), a channel
    of (N, C, H, W)),

        mu_j ~ U(-mean_range, mean_range),  sigma_j ~ U(std_low, std_high)

    and then, independently for every sample i and unit j (for conv, every i, h, w: "treating
    the height and width dimensions as part of the batch", App. A.2.1),

        m_ij ~ U(mu_j - mean_jitter, mu_j + mean_jitter),  s_ij ~ N(sigma_j, std_jitter^2),
        a_ij <- s_ij * a_ij + m_ij

    With the defaults (the paper's n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1) each unit sees
    its own shift and scale every step ("every unit in the layer experiences a different
    distribution"). Alg. 1 writes N(sigma, r_sigma) without saying whether r_sigma is a standard
    deviation or a variance; here it is the standard deviation.

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

    def _init_noise(self, mean_range: float = NoiseOptions.mean_range,
                    std_low: float = NoiseOptions.std_low, std_high: float = NoiseOptions.std_high,
                    mean_jitter: float = NoiseOptions.mean_jitter,
                    std_jitter: float = NoiseOptions.std_jitter) -> None:
        if mean_range < 0 or mean_jitter < 0 or std_jitter < 0 or std_low > std_high:
            raise ValueError(
                f"noise: need mean_range, mean_jitter, std_jitter >= 0 and std_low <= std_high, "
                f"got {mean_range}, {mean_jitter}, {std_jitter}, {std_low} > {std_high}")
        self.mean_range, self.std_low, self.std_high = mean_range, std_low, std_high
        self.mean_jitter, self.std_jitter = mean_jitter, std_jitter
        self.noise: tuple[Tensor, Tensor] | None = None  # (s, m) of the last draw

    def draw_noise(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """One sample (s, m) shaped like ``like`` ((N, C) or (N, C, H, W)), from the global RNG."""
        opts = {"device": like.device, "dtype": like.dtype}
        units = (like.shape[1],) + (1,) * (like.dim() - 2)  # one (mu_j, sigma_j) per unit / channel
        mu = (torch.rand(units, **opts) * 2 - 1) * self.mean_range
        sigma = self.std_low + torch.rand(units, **opts) * (self.std_high - self.std_low)
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
                 impl: str = NoisyBNOptions.impl, ghost_batch: int | None = NoisyBNOptions.ghost_batch,
                 **noise: float) -> None:
        BatchNorm.__init__(self, num_features, dims, momentum=momentum, eps=eps, inference=inference,
                           impl=impl, ghost_batch=ghost_batch)
        self._init_noise(**noise)

    def forward(self, x: Tensor) -> Tensor:
        y = BatchNorm.forward(self, x)
        return self.add_noise(y) if self.training else y


@register_norm(NoisyNoneOptions)
class NoisyIdentity(NoiseInjection, Norm):
    """y = x plus :class:`NoiseInjection` in training mode: noisy BN's noise where noisy BN's
    normalization would be, without it (Santurkar et al. 2018, Sec. 2.1: "adding the same amount
    of noise to the activations of the standard (non-BatchNorm) network prevents it from
    training entirely"). Eval mode is the identity. No learned shift, so the layer before it
    keeps its bias."""

    replaces_bias = False

    def __init__(self, num_features: int, dims: int = 2, **noise: float) -> None:
        super().__init__()
        self._init_noise(**noise)

    def forward(self, x: Tensor) -> Tensor:
        return self.add_noise(x) if self.training else x
