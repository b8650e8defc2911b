"""``noisy_bn``: batch normalization followed by distributional noise (Santurkar et al. 2018, Sec. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.norms import register_norm
from bnlab.norms.base import Norm
from bnlab.norms.batchnorm import BatchNorm, TorchBatchNorm


class NoiseInjection:
    """Adds Santurkar et al.'s time-varying, non-zero-mean, non-unit-variance noise to a BN output.

    At every training step each layer draws

        mu ~ U(-mean_range, mean_range),  sigma ~ U(std_low, std_high)

    and then, independently for every element of the batch's activations,

        m ~ U(mu - mean_jitter, mu + mean_jitter),  s ~ N(sigma, std_jitter^2),  a <- s * a + m

    Noise only in training mode. Draws come from torch's global RNG, which the trainer seeds and
    checkpoints. ``hold_noise=True`` reuses the last sample (drawing one only if none of the
    input's shape is held). A draw outside a real training step (``update_stats=False`` or
    ``hold_noise=True``) leaves the global RNG as it found it, so measuring never shifts training.
    """

    mean_range: float
    std_low: float
    std_high: float
    mean_jitter: float
    std_jitter: float

    def _init_noise(self, mean_range: float, std_low: float, std_high: float,
                    mean_jitter: float, std_jitter: float) -> None:
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

    def add_noise(self, a: Tensor, training_step: bool) -> Tensor:
        held = self.noise
        if (self.hold_noise and held is not None and held[0].shape == a.shape
                and held[0].device == a.device):
            s, m = held
        elif training_step and not self.hold_noise:
            s, m = self.draw_noise(a)
        else:
            devices = [a.device] if a.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                s, m = self.draw_noise(a)
        self.noise = (s, m)
        return torch.addcmul(m, s, a)


class NoisyBatchNorm(NoiseInjection, BatchNorm):
    """:class:`BatchNorm`, then :class:`NoiseInjection` in training mode."""

    def __init__(self, num_features: int, dims: int = 2, momentum: float | None = 0.1,
                 eps: float = 1e-5, inference: str = "moving", mean_range: float = 0.5,
                 std_low: float = 1.0, std_high: float = 1.25, mean_jitter: float = 0.1,
                 std_jitter: float = 0.1) -> None:
        BatchNorm.__init__(self, num_features, dims, momentum=momentum, eps=eps, inference=inference)
        self._init_noise(mean_range, std_low, std_high, mean_jitter, std_jitter)

    def forward(self, x: Tensor) -> Tensor:
        y = BatchNorm.forward(self, x)
        return self.add_noise(y, self.update_stats) if self.training else y


class NoisyTorchBatchNorm(NoiseInjection, TorchBatchNorm):
    """:class:`TorchBatchNorm` (``impl=torch``), then :class:`NoiseInjection` in training mode."""

    def __init__(self, num_features: int, dims: int = 2, momentum: float | None = 0.1,
                 eps: float = 1e-5, mean_range: float = 0.5, std_low: float = 1.0,
                 std_high: float = 1.25, mean_jitter: float = 0.1, std_jitter: float = 0.1) -> None:
        TorchBatchNorm.__init__(self, num_features, dims, momentum=momentum, eps=eps)
        self._init_noise(mean_range, std_low, std_high, mean_jitter, std_jitter)

    def forward(self, x: Tensor) -> Tensor:
        y = TorchBatchNorm.forward(self, x)
        return self.add_noise(y, self.update_stats) if self.training else y


@register_norm("noisy_bn")
def build_noisy_bn(num_features: int, dims: int = 2, impl: str = "scratch", momentum: float = 0.1,
                   eps: float = 1e-5, inference: str = "moving", mean_range: float = 0.5,
                   std_low: float = 1.0, std_high: float = 1.25, mean_jitter: float = 0.1,
                   std_jitter: float = 0.1) -> Norm:
    noise = {"mean_range": mean_range, "std_low": std_low, "std_high": std_high,
             "mean_jitter": mean_jitter, "std_jitter": std_jitter}
    if impl == "torch":
        return NoisyTorchBatchNorm(num_features, dims, momentum=momentum, eps=eps, **noise)
    if impl != "scratch":
        raise ValueError(f"noisy_bn: impl={impl!r} is not valid: expected scratch or torch")
    return NoisyBatchNorm(num_features, dims, momentum=momentum, eps=eps, inference=inference,
                          **noise)
