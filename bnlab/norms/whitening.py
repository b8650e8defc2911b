"""``whiten``: batch whitening in groups of features: ZCA (decorrelated BN), PCA, IterNorm.

Decorrelated BN (Huang et al. 2018) and IterNorm (Huang et al. 2019). Per group of features,
over the m values of the mini-batch (m = N, or N * H * W for conv inputs, channels as features):

    X_c = X - mu_B,   Sigma = X_c X_c^T / m + eps * I,   Y = W X_c,   y = gamma * Y + beta

with the whitening matrix W of ``method``:

    zca:  Sigma = U diag(lambda) U^T,  W = U diag(lambda^-1/2) U^T       (= Sigma^-1/2)
    pca:  W = diag(lambda^-1/2) U^T
    iter: Sigma_N = Sigma / tr(Sigma),  P_0 = I,  P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2,
          W = P_T / sqrt(tr(Sigma))                                     (Newton, T = ``iters``)

Backprop guard: ``torch.linalg.eigh``'s backward divides by lambda_i - lambda_j, which is
infinite for repeated eigenvalues (duplicated or exactly whitened features) and huge for close
ones. Eigendecompositions run in float64 and have hand-written backward passes:

- zca: W = f(Sigma) with f(lambda) = lambda^-1/2 is a smooth spectral function, so its exact
  gradient (Daleckii-Krein) uses divided differences (f(l_i) - f(l_j)) / (l_i - l_j), which
  for this f have the closed form -1 / (s_i s_j (s_i + s_j)), s = sqrt(lambda): no difference
  of eigenvalues in a denominator, exact and finite even for repeated eigenvalues.
- pca: W depends on the eigenvectors themselves, whose derivative really is singular where
  eigenvalues meet. The 1 / (l_j - l_i) factor is broadened to (l_j - l_i) / ((l_j - l_i)^2 +
  eps^2): equal to it up to a relative eps^2 / (l_j - l_i)^2 for separated eigenvalues, bounded
  by 1 / (2 eps) and zero for equal ones (a rotation within a degenerate eigenspace).
- iter: only matrix products, no eigendecomposition: autograd is stable as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.config.norm_options import (
    WHITENING_METHODS,
    IterNormOptions,
    PCAOptions,
    WhitenOptions,
    ZCAOptions,
)
from bnlab.norms.base import LOW_PRECISION, Norm
from bnlab.norms.registry import register_norm


def _refuse_double_backward(method: str) -> None:
    """Our eigendecomposition backwards are first-order only: differentiating them would be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"bnlab whitening ({method}: norm={method} or norm=whiten norm.method={method}) does not "
            "support double backward (create_graph=True, e.g. Hessian-vector products): its "
            "eigendecomposition has a hand-written first-order backward. Use norm=iternorm "
            "(norm.method=iter), whose matrix products autograd differentiates to any order.")


def _inverse_sqrt_spd(sigma0: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(W, U, s) with W = U diag(1 / s) U^T, s = sqrt(max(lambda, 0) + eps)."""
    lam, u = torch.linalg.eigh(sigma0)
    s = (lam.clamp_min(0.0) + eps).sqrt()
    return (u / s.unsqueeze(-2)) @ u.mT, u, s


class _InverseSqrtSPD(torch.autograd.Function):
    """W = (Sigma_0 + eps I)^-1/2 for a batch of symmetric PSD matrices, exact backward.

    First order only: a double backward raises (see :func:`_refuse_double_backward`).
    """

    @staticmethod
    def forward(ctx, sigma0: Tensor, eps: float) -> Tensor:
        w, u, s = _inverse_sqrt_spd(sigma0, eps)
        ctx.save_for_backward(u, s)
        return w

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        _refuse_double_backward("zca")
        u, s = ctx.saved_tensors
        # Daleckii-Krein: dL/dSigma = U (K o U^T G U) U^T, K_ij = divided difference of s^-1.
        k = -1.0 / (s.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))
        g = 0.5 * (grad_w + grad_w.mT)
        return u @ (k * (u.mT @ g @ u)) @ u.mT, None


class _BroadenedEigh(torch.autograd.Function):
    """Eigenvalues (ascending) and eigenvectors of symmetric matrices; broadened backward.

    First order only: a double backward raises (see :func:`_refuse_double_backward`).
    """

    @staticmethod
    def forward(ctx, sigma: Tensor, broadening: float) -> tuple[Tensor, Tensor]:
        lam, u = torch.linalg.eigh(sigma)
        ctx.save_for_backward(lam, u)
        ctx.broadening = broadening
        ctx.set_materialize_grads(False)
        return lam, u

    @staticmethod
    def backward(ctx, grad_lam: Tensor | None, grad_u: Tensor | None):
        _refuse_double_backward("pca")
        lam, u = ctx.saved_tensors
        inner = torch.zeros_like(u)
        if grad_u is not None:
            gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # gap_ij = lambda_j - lambda_i
            inner = (gap / (gap.square() + ctx.broadening ** 2)) * (u.mT @ grad_u)
        if grad_lam is not None:
            inner = inner + torch.diag_embed(grad_lam)
        grad = u @ inner @ u.mT
        return 0.5 * (grad + grad.mT), None


def zca_whitening(sigma0: Tensor, eps: float) -> Tensor:
    """W = U diag((lambda + eps)^-1/2) U^T of the covariances ``sigma0`` (..., g, g).

    Without autograd (measurements) the forward pass runs as plain operations, which
    ``torch.func.vmap`` can map over many batches; so does :func:`pca_whitening`'s."""
    if torch.is_grad_enabled():
        return _InverseSqrtSPD.apply(sigma0, eps)
    return _inverse_sqrt_spd(sigma0, eps)[0]


def pca_whitening(sigma0: Tensor, eps: float, fix_signs: bool = False) -> Tensor:
    """W = diag((lambda + eps)^-1/2) U^T, components by decreasing variance.

    The eigenvectors come as ``torch.linalg.eigh`` returns them: an eigenvector's sign is
    arbitrary, so from batch to batch a component may flip sign as well as swap places, both
    part of the "stochastic axis swapping" Huang et al. 2018 (Sec. 3.1) blame PCA whitening's
    failure on. ``fix_signs=True`` makes each eigenvector's largest entry positive, so that W
    (and its running average) flips no sign for no reason: only the swaps remain.
    """
    lam, u = _BroadenedEigh.apply(sigma0, eps) if torch.is_grad_enabled() else torch.linalg.eigh(sigma0)
    lam, u = lam.flip(-1), u.flip(-1)
    if fix_signs:
        with torch.no_grad():
            peak = u.abs().argmax(-2, keepdim=True)
            sign = torch.gather(u, -2, peak).sign()
            sign.masked_fill_(sign == 0, 1.0)  # vmap cannot batch a boolean-mask index
        u = u * sign
    return (u * (lam.clamp_min(0.0) + eps).rsqrt().unsqueeze(-2)).mT


def iterative_whitening(sigma0: Tensor, eps: float, iters: int) -> Tensor:
    """IterNorm's W = P_T / sqrt(tr(Sigma)) with Newton's iterations on Sigma_N = Sigma / tr(Sigma)."""
    eye = torch.eye(sigma0.shape[-1], dtype=sigma0.dtype, device=sigma0.device)
    sigma = sigma0 + eps * eye
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    sigma_n = sigma / trace
    # Coupled form (Higham 2008, Functions of Matrices, Sec. 6.7): y_k = Sigma_N P_k, z_k = P_k.
    # Equal to P_k = (3 P - P^3 Sigma_N) / 2 in exact arithmetic and as cheap (three products),
    # but stable: the uncoupled form blows rounding errors up once it has converged (T > ~15).
    y, z = sigma_n, eye.expand_as(sigma)
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return z * trace.rsqrt()


@register_norm(WhitenOptions)
class BatchWhitening(Norm):
    """Batch whitening over groups of ``group_size`` consecutive features (see module docstring).

    The last group takes the remainder when ``group_size`` does not divide the number of
    features (as the DBN code does); ``group_size=None`` whitens the whole layer as one group.
    Equal-size groups go through one batched eigendecomposition (or batched products).
    Eval mode uses running averages of the mean and of W (``running = (1 - momentum) *
    running + momentum * batch``), as DBN and IterNorm do. ``fix_signs`` (pca only): see
    :func:`pca_whitening`.
    """

    maps_over_batches = True  # frozen statistics leave no state to update: vmap maps it
    uses_batch_statistics = True

    def __init__(self, num_features: int, dims: int = 2, method: str = WhitenOptions.method,
                 group_size: int | None = WhitenOptions.group_size, iters: int = WhitenOptions.iters,
                 momentum: float = WhitenOptions.momentum, eps: float = WhitenOptions.eps,
                 fix_signs: bool = WhitenOptions.fix_signs) -> None:
        super().__init__()
        if method not in WHITENING_METHODS:
            raise ValueError(f"whiten: method={method!r} is not valid: expected one of {WHITENING_METHODS}")
        if group_size is not None and group_size < 1:
            raise ValueError(f"whiten: group_size={group_size} is not valid: expected null or >= 1")
        if iters < 1:
            raise ValueError(f"whiten: iters={iters} is not valid: expected an integer >= 1")
        size = num_features if group_size is None else min(group_size, num_features)
        self.num_features, self.dims, self.method = num_features, dims, method
        self.group_size, self.iters, self.momentum, self.eps = group_size, iters, momentum, eps
        self.fix_signs = fix_signs
        # (number of groups, group size): the equal groups, then the remainder group if any
        self.chunks = [(num_features // size, size), (int(num_features % size > 0), num_features % size)]
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        for i, (count, k) in enumerate(self.chunks):
            self.register_buffer(self._buffer(i), torch.eye(k).expand(count, k, k).clone())

    @staticmethod
    def _buffer(i: int) -> str:
        return ("running_whitening", "running_whitening_rest")[i]

    def extra_repr(self) -> str:
        return (f"{self.num_features}, dims={self.dims}, method={self.method}, "
                f"group_size={self.group_size}, iters={self.iters}, momentum={self.momentum}, "
                f"eps={self.eps}" + (", fix_signs=True" if self.fix_signs else ""))

    def whitening_matrix(self, sigma0: Tensor) -> Tensor:
        """W for a batch of group covariances ``sigma0`` (count, k, k), in ``sigma0``'s dtype."""
        if self.method == "iter":
            return iterative_whitening(sigma0, self.eps, self.iters)
        if self.method == "zca":
            return zca_whitening(sigma0.double(), self.eps).to(sigma0.dtype)
        return pca_whitening(sigma0.double(), self.eps, self.fix_signs).to(sigma0.dtype)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # covariances need float32
            return self._whiten(x)

    def _whiten(self, x: Tensor) -> Tensor:
        c = self.num_features
        features = x.t() if x.dim() == 2 else x.transpose(0, 1).reshape(c, -1)  # (C, m)
        if features.dtype in LOW_PRECISION:
            features = features.float()
        if self.training:
            mean = features.mean(1)
        else:
            mean = self.running_mean
        centered = features - mean.unsqueeze(1)
        outputs, start = [], 0
        for i, (count, k) in enumerate(self.chunks):
            if count == 0:
                continue
            group = centered[start:start + count * k].reshape(count, k, -1)
            start += count * k
            running = getattr(self, self._buffer(i))
            if self.training:
                sigma0 = group @ group.mT / group.shape[-1]
                w = self.whitening_matrix(sigma0)
                if self.update_stats:
                    running.lerp_(w.detach(), self.momentum)
            else:
                w = running
            outputs.append((w @ group).reshape(count * k, -1))
        if self.training and self.update_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
        whitened = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        y = torch.addcmul(self.bias.unsqueeze(1), whitened, self.weight.unsqueeze(1)).to(x.dtype)
        if x.dim() == 2:
            return y.t()
        n, _, h, w_ = x.shape
        return y.view(c, n, h, w_).transpose(0, 1)


# One option of its own per method, so that `-m norm=bn,zca,pca,iternorm` is one sweep.
@register_norm(ZCAOptions)
class ZCAWhitening(BatchWhitening):
    """``norm=zca``: :class:`BatchWhitening` with ``method=zca`` (decorrelated BN, Huang et al. 2018)."""

    def __init__(self, num_features: int, dims: int = 2, **options) -> None:
        super().__init__(num_features, dims, method="zca", **options)


@register_norm(PCAOptions)
class PCAWhitening(BatchWhitening):
    """``norm=pca``: :class:`BatchWhitening` with ``method=pca``."""

    def __init__(self, num_features: int, dims: int = 2, **options) -> None:
        super().__init__(num_features, dims, method="pca", **options)


@register_norm(IterNormOptions)
class IterNorm(BatchWhitening):
    """``norm=iternorm``: :class:`BatchWhitening` with ``method=iter`` (Huang et al. 2019)."""

    def __init__(self, num_features: int, dims: int = 2, **options) -> None:
        super().__init__(num_features, dims, method="iter", **options)
