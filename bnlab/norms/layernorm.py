"""``ln``: layer normalization (Ba, Kiros & Hinton 2016)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bnlab.config.norm_options import LNOptions
from bnlab.norms.groupnorm import GroupNorm
from bnlab.norms.registry import register_norm


@register_norm(LNOptions)
class LayerNorm(GroupNorm):
    """Statistics per sample over all of its features, then a per-feature affine (Ba et al. 2016).

        mu = mean_j(x_j),  var = mean_j((x_j - mu)^2)   over j = C (N, C) or C, H, W (N, C, H, W)
        y = gamma_c * (x - mu) / sqrt(var + eps) + beta_c

    That is group normalization with a single group. gamma and beta have one entry per feature
    (per channel for conv inputs, unlike ``torch.nn.LayerNorm``'s elementwise affine over C, H,
    W). No batch statistics: train and eval mode compute the same thing. ``impl=torch`` (the
    default) is ``F.layer_norm`` on (N, C) inputs and ``F.group_norm`` with one group on conv
    inputs (for the per-channel affine). ``ghost_batch`` is accepted and changes nothing.
    """

    def __init__(self, num_features: int, dims: int = 2, eps: float = LNOptions.eps,
                 impl: str = LNOptions.impl, ghost_batch: int | None = LNOptions.ghost_batch) -> None:
        super().__init__(num_features, dims, groups=1, eps=eps, impl=impl)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dims={self.dims}, eps={self.eps}, impl={self.impl}"

    def _normalize(self, x: Tensor) -> Tensor:
        if self.impl == "torch" and x.dim() == 2:
            return F.layer_norm(x, (self.num_features,), self.weight, self.bias, self.eps)
        return super()._normalize(x)
