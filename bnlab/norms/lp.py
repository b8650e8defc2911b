"""``lp``: l_p normalization (Santurkar, Tsipras, Ilyas & Madry 2018, Sec. 3.3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bnlab.config.norm_options import LP_NORMS, L1Options, L2Options, LinfOptions, LpOptions
from bnlab.norms.base import LOW_PRECISION, Norm, per_feature
from bnlab.norms.registry import register_norm


def lp_scale(x: Tensor, p: float, dims: tuple[int, ...]) -> Tensor:
    """The average l_p norm of ``x`` over ``dims``: (mean |x|^p)^(1/p), i.e. ||x||_p / m^(1/p) for
    its m values; for p = inf, max |x|. Differentiable (0 gradient where every value is 0)."""
    norm = torch.linalg.vector_norm(x, p, dims)
    if p == math.inf:
        return norm
    m = x.numel() // norm.numel()
    return norm * m ** (-1.0 / p)


@register_norm(LpOptions)
class LpNorm(Norm):
    """l_p normalization, per feature (a unit, or a channel over N, H, W), over the mini-batch:

        mu_B = mean(x),   s_B = (mean |x|^p)^(1/p)   (p = 1, 2; for p = inf, s_B = max |x|)
        y = gamma * (x - mu_B) / (s_B + eps) + beta

    Santurkar et al. (Sec. 3.3) "fix the first order moment of the activations, as BatchNorm
    does, and then normalize them by the average of their l_p-norm (before shifting the mean),
    for p = 1, 2, inf", and give no equation. Read here: the mean is subtracted as BN does, and
    the scale is the average l_p norm of the feature's m values taken *before* the mean is
    subtracted, i.e. of x, not x - mu_B. (With the centred values and p = 2 the scale would be
    BN's standard deviation, and the scheme BN itself, which the paper's "no control over the
    distribution moments" rules out.) The output's mean is beta, as with BN; its spread is not
    fixed: with p = 2 its variance is gamma^2 var_B / (var_B + mu_B^2), below gamma^2 wherever
    mu_B != 0, and with p = 1 or inf it depends on the distribution's shape as well. The
    statistics are differentiated through, as BN's are. Where the paper is silent, bnlab's
    choices: the average is over the batch per feature (BN's axes), eps is added to s_B, and
    gamma, beta follow as in BN.

    Eval mode: y = gamma * (x - running_mean) / (running_scale + eps) + beta, with moving
    averages ``running = (1 - momentum) * running + momentum * batch`` of mu_B and s_B (as Batch
    Renorm keeps sigma rather than the variance; no unbiasing).
    """

    maps_over_batches = True  # frozen statistics leave no state to update: vmap maps it
    uses_batch_statistics = True

    def __init__(self, num_features: int, dims: int = 2, p: float = LpOptions.p,
                 momentum: float = LpOptions.momentum, eps: float = LpOptions.eps) -> None:
        super().__init__()
        if p not in LP_NORMS:
            raise ValueError(f"lp: p={p!r} is not valid: expected 1, 2 or inf")
        self.num_features, self.dims, self.momentum, self.eps = num_features, dims, momentum, eps
        self.p = float(p)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_scale", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, dims={self.dims}, p={self.p}, momentum={self.momentum}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in LOW_PRECISION  # statistics in float32 under autocast, as torch's BN does
        xf = x.float() if low else x
        rank = xf.dim()
        if self.training:
            dims = self.reduce_dims(xf)
            mean, scale = xf.mean(dims), lp_scale(xf, self.p, dims)
            if self.update_stats:
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_scale.lerp_(scale, self.momentum)
                    self.num_batches_tracked.add_(1)
        else:
            mean, scale = self.running_mean, self.running_scale
        factor = self.weight / (scale + self.eps)
        y = (xf - per_feature(mean, rank)) * per_feature(factor, rank) + per_feature(self.bias, rank)
        return y.to(x.dtype) if low else y


# One option of its own per p, so that `-m norm=none,bn,l1,l2,linf` is one sweep.
@register_norm(L1Options)
class L1Norm(LpNorm):
    """``norm=l1``: :class:`LpNorm` with p = 1."""

    def __init__(self, num_features: int, dims: int = 2, **options) -> None:
        super().__init__(num_features, dims, p=1.0, **options)


@register_norm(L2Options)
class L2Norm(LpNorm):
    """``norm=l2``: :class:`LpNorm` with p = 2."""

    def __init__(self, num_features: int, dims: int = 2, **options) -> None:
        super().__init__(num_features, dims, p=2.0, **options)


@register_norm(LinfOptions)
class LinfNorm(LpNorm):
    """``norm=linf``: :class:`LpNorm` with p = inf."""

    def __init__(self, num_features: int, dims: int = 2, **options) -> None:
        super().__init__(num_features, dims, p=math.inf, **options)
