"""``ln``: layer normalization (Ba, Kiros & Hinton 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.norms import register_norm
from bnlab.norms.base import Norm
from bnlab.norms.batchnorm import LOW_PRECISION


class LayerNorm(Norm):
    """Statistics per sample over all of its features, then a per-feature affine (Ba et al. 2016).

        mu = mean_j(x_j),  var = mean_j((x_j - mu)^2)   over j = C (N, C) or C, H, W (N, C, H, W)
        y = gamma_c * (x - mu) / sqrt(var + eps) + beta_c

    gamma and beta have one entry per feature (per channel for conv inputs, unlike
    ``torch.nn.LayerNorm``'s elementwise affine over C, H, W). No batch statistics: train and
    eval mode compute the same thing, and there is nothing to update.
    """

    def __init__(self, num_features: int, dims: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.dims, self.eps = num_features, dims, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, dims={self.dims}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in LOW_PRECISION:  # statistics in float32 under autocast, as torch's does
            return self._normalize(x.float()).to(x.dtype)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        dims = tuple(range(1, x.dim()))
        mean = x.mean(dims, keepdim=True)
        centered = x - mean
        x_hat = centered * (centered.square().mean(dims, keepdim=True) + self.eps).rsqrt()
        if x.dim() == 2:
            return torch.addcmul(self.bias, x_hat, self.weight)
        return torch.addcmul(self.bias.view(-1, 1, 1), x_hat, self.weight.view(-1, 1, 1))


@register_norm("ln")
def build_ln(num_features: int, dims: int = 2, eps: float = 1e-5) -> Norm:
    return LayerNorm(num_features, dims, eps=eps)
