"""``bn``: batch normalization (Ioffe & Szegedy 2015, Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.norms import register_norm
from bnlab.norms.base import Norm


class BatchNorm(Norm):
    """y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, per feature.

    Conventions of ``torch.nn.BatchNorm{1,2}d``: ``running = (1 - momentum) * running +
    momentum * batch``, running variance from the unbiased batch variance, normalization with
    the biased one, running statistics in eval mode.
    """

    def __init__(self, num_features: int, dims: int = 2, momentum: float = 0.1,
                 eps: float = 1e-5, inference: str = "moving") -> None:
        super().__init__()
        self.num_features, self.dims, self.momentum, self.eps = num_features, dims, momentum, eps
        self.inference = inference
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _shape(self, v: Tensor) -> Tensor:
        return v.view(1, -1) if self.dims == 2 else v.view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            dims = self.reduce_dims(x)
            mean = x.mean(dims)
            var = (x - self._shape(mean)).square().mean(dims)
            if self.update_stats:
                n = x.numel() // x.shape[1]
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
                    self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * self._shape(scale) + self._shape(self.bias - mean * scale)


class TorchBatchNorm(Norm):
    """torch's native layer, the reference (``impl=torch``), honouring the frozen mode."""

    def __init__(self, num_features: int, dims: int = 2, momentum: float = 0.1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = (nn.BatchNorm1d if dims == 2 else nn.BatchNorm2d)(num_features, eps, momentum)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if self.training and not self.update_stats:
            return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return bn(x)


@register_norm("bn")
def build_bn(num_features: int, dims: int = 2, impl: str = "scratch", **options) -> Norm:
    if impl == "torch":
        options.pop("inference", None)
        return TorchBatchNorm(num_features, dims, **options)
    return BatchNorm(num_features, dims, **options)
