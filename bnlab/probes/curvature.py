"""Curvature of the training loss: the Hessian's top eigenvalue and the curvature along the gradient.

With theta all trainable parameters, L(theta) the training loss of a batch (x, y) in train mode
(batch statistics, running statistics frozen, noise held at one sample), g = grad L and
H = hess L, products H v come from double backward (Pearlmutter 1994: H v = grad (g . v), one
backward through the graph of g per product; H itself is never formed). Then::

    top_eig    = theta_1, the largest eigenvalue of the m x m tridiagonal T_m of m Lanczos steps
                 on H from a random unit vector (full reorthogonalization; m = probe.curvature_iters)
    residual   = ||H u - theta_1 u|| / |theta_1| = beta_m |s_m| / |theta_1|   for the Ritz vector
                 u = Q_m s of theta_1 (s: the eigenvector of T_m, s_m its last entry, beta_m the
                 norm of the step m+1 direction before normalization)
    along_grad = g^T H g / g^T g

Reading them: theta_1 <= lambda_max(H) always (Cauchy interlacing), and some eigenvalue of H lies
within residual * |theta_1| of theta_1 (Weyl's bound for the residual of a symmetric matrix), so a
small residual says the estimate sits on an eigenvalue; the Lanczos top Ritz value converges to
lambda_max first, far faster than power iteration, whose estimate would also chase the eigenvalue
largest in magnitude (a negative one, on a saddle) rather than the largest. Lanczos stops early,
exactly, when it finds an invariant subspace (beta_j ~ 0, e.g. m >= the number of parameters):
the residual is then 0.

Sources: the top eigenvalue of the Hessian by Lanczos is how Ghorbani, Krishnan & Xiao 2019
(arXiv 1901.10159) track the spectrum's outliers, which they find absent with BN in train mode.
g^T H g / g^T g is the quantity of Santurkar et al. 2018's Theorem 4.2, which bounds it for the
Hessian with respect to a layer's *activations*; here it is with respect to all parameters
(docs/metrics.md lists the departures).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bnlab.errors import UserError
from bnlab.norms import frozen_stats

LossFn = Callable[[Tensor, Tensor], Tensor]
# T_m's next off-diagonal below this fraction of its scale: an invariant subspace, stop exactly.
BREAKDOWN = 1e-9


class HessianVectorProducts:
    """v -> H v for the loss of ``model`` on (x, y) at its current parameters, as flat vectors.

    One forward pass and one backward pass with ``create_graph=True`` when built (g and its
    graph), then one backward through that graph per product. Build it inside the measurement's
    contexts (train mode, frozen statistics, preserved RNG): the forward pass is the only one, so
    a stochastic layer's noise is one sample for every product.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            # A parameter the loss does not reach has gradient None: 0, and a row of zeros in H.
            self.grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.gradient = _flat(self.grads, self.params).detach()

    def __call__(self, v: Tensor) -> Tensor:
        pieces = v.split([p.numel() for p in self.params])
        with torch.enable_grad():
            terms = [(g * piece.view_as(g)).sum() for g, piece in zip(self.grads, pieces, strict=True)
                     if g is not None and g.requires_grad]
            if not terms:  # g does not depend on theta: H = 0
                return torch.zeros_like(v)
            hv = torch.autograd.grad(sum(terms), self.params, retain_graph=True, allow_unused=True)
        return _flat(hv, self.params)


def _flat(tensors: tuple[Tensor | None, ...], like: list[Tensor]) -> Tensor:
    """One vector of ``tensors`` in order, a None as zeros of its parameter's shape."""
    return torch.cat([t.flatten() if t is not None else torch.zeros_like(p).flatten()
                      for t, p in zip(tensors, like, strict=True)])


def lanczos_top(hvp: Callable[[Tensor], Tensor], start: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """(theta_1, residual) of ``iters`` Lanczos steps on the symmetric operator ``hvp`` from ``start``.

    theta_1 is the largest eigenvalue of the tridiagonal T_m, residual = beta_m |s_m| / |theta_1|
    (module docstring; 0 when the iteration found an invariant subspace and stopped early). Every
    new direction is orthogonalized against all previous ones (full reorthogonalization, twice:
    "twice is enough"), so that rounding does not bring back copies of converged eigenvalues.
    Float64 0-dim tensors on ``start``'s device.
    """
    q = start / torch.linalg.vector_norm(start)
    basis = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for _ in range(iters):
        w = hvp(q)
        alpha = torch.dot(q, w)
        alphas.append(alpha)
        stacked = torch.stack(basis)
        for _ in range(2):
            w = w - stacked.T @ (stacked @ w)
        beta = torch.linalg.vector_norm(w)
        betas.append(beta)
        scale = max(abs(a.item()) for a in alphas) + max(b.item() for b in betas)
        if beta.item() <= BREAKDOWN * scale or len(basis) == start.numel():
            betas[-1] = torch.zeros_like(beta)  # exact: K_j is invariant under H
            break
        q = w / beta
        basis.append(q)
    diagonal = torch.stack(alphas).double()
    off = torch.stack(betas[:-1]).double() if len(betas) > 1 else diagonal.new_zeros(0)
    tridiagonal = torch.diag(diagonal) + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    top, s_last = values[-1], vectors[-1, -1]
    residual = betas[-1].double() * s_last.abs()
    return top, torch.where(top != 0, residual / top.abs(), residual)


def curvature(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, iters: int,
              generator: torch.Generator) -> dict[str, Tensor]:
    """``top_eig``, ``residual`` and ``along_grad`` (module docstring) of the loss of ``model`` on
    (x, y): ``{name: 0-dim float64 tensor}`` on the model's device.

    The Lanczos start vector is drawn from ``generator`` (CPU), never from torch's global RNG.
    Model, running statistics, ``.grad`` and the global RNG are left as they were, so measuring
    never changes training.
    """
    was_training = model.training
    model.train()
    try:
        with frozen_stats(model):
            hvp = HessianVectorProducts(model, x, y, loss_fn)
            g = hvp.gradient
            start = torch.randn(g.numel(), generator=generator, dtype=g.dtype).to(g.device)
            top, residual = lanczos_top(hvp, start, iters)
            g_norm2 = torch.dot(g, g).double()
            gHg = torch.dot(g, hvp(g)).double()
    finally:
        model.train(was_training)
    along = torch.where(g_norm2 > 0, gHg / g_norm2, torch.zeros_like(gHg))
    return {"top_eig": top, "residual": residual, "along_grad": along}


def check_double_backward(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, key: str) -> None:
    """Raise UserError (one line, naming ``key``) when a layer of ``model`` refuses the double
    backward the curvature probe needs: one Hessian-vector product on (x, y), the model, its
    running statistics and the global RNG untouched."""
    was_training = model.training
    model.train()
    try:
        with frozen_stats(model):
            hvp = HessianVectorProducts(model, x, y, loss_fn)
            hvp(hvp.gradient)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key} needs Hessian-vector products (double backward), which this "
                        f"network refuses: {first}") from err
    finally:
        model.train(was_training)


def start_generator(seed: int, step: int) -> torch.Generator:
    """The Lanczos start vector's generator for the measurement at ``step``: a function of the
    run's seed and the step only, so a resumed run draws the same vectors."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))

