"""``gn``: group normalization (Wu & He 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import bnlab.norms.kernel as kernel
from bnlab.config.norm_options import GNOptions
from bnlab.norms.base import LOW_PRECISION, Norm, per_feature
from bnlab.norms.registry import register_norm


@register_norm(GNOptions)
class GroupNorm(Norm):
    """Statistics per sample over each group of C / G consecutive channels (Wu & He 2018, Eq. 1-3).

        mu_{n,g} = mean(x_{n,c,h,w} : c in group g),  var_{n,g} likewise (biased)
        y = gamma_c * (x - mu_{n,g}) / sqrt(var_{n,g} + eps) + beta_c

    For (N, C) inputs each feature is a channel of size 1. ``groups=1`` is layer normalization
    and ``groups=C`` instance normalization. Same in train and eval mode.
    """

    def __init__(self, num_features: int, dims: int = 2, groups: int = GNOptions.groups,
                 eps: float = GNOptions.eps) -> None:
        super().__init__()
        if groups < 1 or num_features % groups != 0:
            raise ValueError(f"gn: num_features={num_features} is not divisible by groups={groups}; "
                             f"choose norm.groups among the divisors of every normalized width")
        self.num_features, self.dims, self.groups, self.eps = num_features, dims, groups, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, dims={self.dims}, groups={self.groups}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in LOW_PRECISION:  # statistics in float32 under autocast, as torch's does
            return self._normalize(x.float()).to(x.dtype)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        """The compiled operator where it serves (an (N, C) CPU batch with autograd on), else
        torch operations (which ``torch.func.vmap`` can map)."""
        if torch.is_grad_enabled() and kernel.serves(x, self.weight, self.bias):
            return kernel.group_norm(x, self.weight, self.bias, self.groups, self.eps)
        grouped = x.reshape(x.shape[0], self.groups, -1)
        mean = grouped.mean(2, keepdim=True)
        centered = grouped - mean
        x_hat = (centered * (centered.square().mean(2, keepdim=True) + self.eps).rsqrt()).view_as(x)
        return torch.addcmul(per_feature(self.bias, x.dim()), x_hat, per_feature(self.weight, x.dim()))


def group_norm_backward(x: Tensor, weight: Tensor, grad_y: Tensor, groups: int, eps: float):
    """(dx, dgamma, dbeta) of group normalization of an (N, C) input, differentiable in x, gamma
    and dy: the compiled operator's backward pass under ``create_graph=True``. Per sample and
    group of k features, with h = gamma * dy:

        dx = (h - mean(h) - x_hat * mean(h * x_hat)) / sqrt(var + eps),
        dgamma = sum_n(dy * x_hat),  dbeta = sum_n(dy)
    """
    n, c = x.shape
    grouped = x.reshape(n, groups, -1)
    centered = grouped - grouped.mean(2, keepdim=True)
    inv_std = (centered.square().mean(2, keepdim=True) + eps).rsqrt()
    x_hat = centered * inv_std
    dy = grad_y.reshape(n, groups, -1)
    h = dy * weight.reshape(groups, -1)
    grad_x = inv_std * (h - h.mean(2, keepdim=True) - x_hat * (h * x_hat).mean(2, keepdim=True))
    return grad_x.reshape(n, c), (dy * x_hat).sum(0).reshape(c), dy.sum(0).reshape(c)


# The compiled operator's backward pass under create_graph=True (norm_ops.cpp) calls this formula.
_GRAPH_BACKWARD = torch.library.Library("bnlab", "FRAGMENT")
_GRAPH_BACKWARD.define("group_norm_backward_graph(Tensor x, Tensor weight, Tensor grad_y, int groups, "
                       "float eps) -> (Tensor, Tensor, Tensor)")
_GRAPH_BACKWARD.impl("group_norm_backward_graph", group_norm_backward, "CompositeImplicitAutograd")
