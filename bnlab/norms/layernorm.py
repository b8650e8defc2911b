"""``ln``: layer normalization (Ba, Kiros & Hinton 2016)."""

from __future__ import annotations

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
    W). No batch statistics: train and eval mode compute the same thing.
    """

    def __init__(self, num_features: int, dims: int = 2, eps: float = LNOptions.eps) -> None:
        super().__init__(num_features, dims, groups=1, eps=eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dims={self.dims}, eps={self.eps}"
