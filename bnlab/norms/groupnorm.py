"""``gn``: group normalization (Wu & He 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.config.norm_options import GNOptions
from bnlab.norms.base import LOW_PRECISION, Norm, per_feature
from bnlab.norms.registry import register_norm


@register_norm(GNOptions)
class GroupNorm(Norm):
    """Statistics per sample over each group of C / G consecutive channels (Wu & He 2018, Eq. 1-3).

        mu_{n,g} = mean(x_{n,c,h,w} : c in group g),  var_{n,g} likewise (biased)
        y = gamma_c * (x - mu_{n,g}) / sqrt(var_{n,g} + eps) + beta_c

    For (N, C) inputs each feature is a channel of size 1. ``groups=1`` is layer normalization
    and ``groups=C`` instance normalization. Same in train and eval mode. ``impl=torch`` (the
    default) is ``F.group_norm``; ``impl=scratch`` the equations above as torch operations.
    ``ghost_batch`` is accepted and changes nothing: the statistics are each sample's own.
    """

    maps_over_batches = True  # frozen statistics leave no state to update: vmap maps it
    maps_over_members = True

    def __init__(self, num_features: int, dims: int = 2, groups: int = GNOptions.groups,
                 eps: float = GNOptions.eps, impl: str = GNOptions.impl,
                 ghost_batch: int | None = GNOptions.ghost_batch) -> None:
        super().__init__()
        if groups < 1 or num_features % groups != 0:
            raise ValueError(f"gn: num_features={num_features} is not divisible by groups={groups}; "
                             f"choose norm.groups among the divisors of every normalized width")
        self.num_features, self.dims, self.groups, self.eps = num_features, dims, groups, eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, dims={self.dims}, groups={self.groups}, eps={self.eps}, "
                f"impl={self.impl}")

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in LOW_PRECISION:  # statistics in float32 under autocast, as torch's does
            return self._normalize(x.float()).to(x.dtype)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        if self.impl == "torch":
            return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)
        grouped = x.reshape(x.shape[0], self.groups, -1)
        mean = grouped.mean(2, keepdim=True)
        centered = grouped - mean
        x_hat = (centered * (centered.square().mean(2, keepdim=True) + self.eps).rsqrt()).view_as(x)
        return torch.addcmul(per_feature(self.bias, x.dim()), x_hat, per_feature(self.weight, x.dim()))
