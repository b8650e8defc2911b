"""``bn``: batch normalization (Ioffe & Szegedy 2015), Algorithms 1 and 2."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.norms import register_norm
from bnlab.norms.base import Norm

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _per_feature(v: Tensor, rank: int) -> Tensor:
    """A (C,) vector shaped to broadcast over (N, C) or (N, C, H, W)."""
    return v if rank == 2 else v.view(-1, 1, 1)


class _BatchNormTrain(torch.autograd.Function):
    """Train-mode batch normalization with the paper's closed-form backward pass.

    Forward (per feature, over the m values of the mini-batch):
        mu_B = mean(x),  var_B = mean((x - mu_B)^2),  x_hat = (x - mu_B) / sqrt(var_B + eps),
        y = gamma * x_hat + beta
    Backward (Ioffe & Szegedy, Sec. 3, simplified):
        dbeta = sum(dy),  dgamma = sum(dy * x_hat),
        dx = gamma / sqrt(var_B + eps) * (dy - dbeta / m - x_hat * dgamma / m)
    Returns (y, mu_B, var_B); the statistics are constants for autograd.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):
        rank = x.dim()
        dims = (0,) if rank == 2 else (0, 2, 3)
        inv_m = x.shape[1] / x.numel()
        # sum * (1/m), not mean(): on small CPU tensors mean() costs about 3x a sum
        mean = x.sum(dims).mul_(inv_m)
        x_hat = x - _per_feature(mean, rank)
        var = (x_hat * x_hat).sum(dims).mul_(inv_m)  # two passes: exact also when |mean| >> std
        inv_std = (var + eps).rsqrt_()
        x_hat.mul_(_per_feature(inv_std, rank))
        y = torch.addcmul(_per_feature(bias, rank), x_hat, _per_feature(weight, rank))
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, _grad_mean, _grad_var):
        if grad_y is None:
            return None, None, None, None
        x_hat, inv_std, weight = ctx.saved_tensors
        rank = grad_y.dim()
        dims = (0,) if rank == 2 else (0, 2, 3)
        m = grad_y.numel() // grad_y.shape[1]
        grad_bias = grad_y.sum(dims)
        grad_weight = (grad_y * x_hat).sum(dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = gamma / sqrt(var_B + eps) * (dy - (dbeta + x_hat * dgamma) / m)
            grad_x = torch.addcmul(_per_feature(grad_bias, rank), x_hat,
                                   _per_feature(grad_weight, rank))
            grad_x = torch.sub(grad_y, grad_x, alpha=1.0 / m)
            grad_x.mul_(_per_feature(weight * inv_std, rank))
        return grad_x, grad_weight, grad_bias, None


class BatchNorm(Norm):
    """y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, per feature (Ioffe & Szegedy, Alg. 1).

    Conventions of ``torch.nn.BatchNorm{1,2}d``: ``running = (1 - momentum) * running +
    momentum * batch`` (``momentum=None``: cumulative average), running variance from the unbiased
    batch variance, normalization with the biased one, running statistics in eval mode.
    The backward pass is the paper's closed form (:class:`_BatchNormTrain`), not autograd's
    graph of the forward: same gradients, a fraction of the operations.
    """

    def __init__(self, num_features: int, dims: int = 2, momentum: float | None = 0.1,
                 eps: float = 1e-5, inference: str = "moving") -> None:
        super().__init__()
        self.num_features, self.dims, self.momentum, self.eps = num_features, dims, momentum, eps
        self.inference = inference  # moving | population (applied by the trainer, see build_bn)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, dims={self.dims}, momentum={self.momentum}, eps={self.eps}, "
                f"inference={self.inference}")

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in LOW_PRECISION  # statistics in float32 under autocast, as torch does
        xf = x.float() if low else x
        if self.training:
            m = xf.numel() // xf.shape[1]
            if m < 2:
                raise ValueError(f"Expected more than 1 value per channel when training, "
                                 f"got input size {tuple(x.shape)}")
            y, mean, var = _BatchNormTrain.apply(xf, self.weight, self.bias, self.eps)
            if self.update_stats:
                self._update_running(mean, var, m)
        else:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            y = torch.addcmul(_per_feature(shift, xf.dim()), xf, _per_feature(scale, xf.dim()))
        return y.to(x.dtype) if low else y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, m: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.item()
        else:
            factor = self.momentum
        # one fused update of both buffers: fewer operations on these small tensors
        torch._foreach_lerp_([self.running_mean, self.running_var], [mean, var * (m / (m - 1))],
                             factor)


class TorchBatchNorm(Norm):
    """torch's native layer, the reference (``impl=torch``), honouring the frozen mode."""

    def __init__(self, num_features: int, dims: int = 2, momentum: float | None = 0.1,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = (nn.BatchNorm1d if dims == 2 else nn.BatchNorm2d)(num_features, eps, momentum)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        if self.training and not self.update_stats:
            return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return bn(x)


@register_norm("bn")
def build_bn(num_features: int, dims: int = 2, impl: str = "scratch", momentum: float = 0.1,
             eps: float = 1e-5, inference: str = "moving") -> Norm:
    """``impl=scratch``: :class:`BatchNorm`; ``impl=torch``: :class:`TorchBatchNorm`.

    ``inference=population`` is carried out by the trainer at the end of training with
    :func:`estimate_population_statistics`; until then both use the moving averages.
    """
    if impl == "torch":
        return TorchBatchNorm(num_features, dims, momentum=momentum, eps=eps)
    if impl != "scratch":
        raise ValueError(f"bn: impl={impl!r} is not valid: expected scratch or torch")
    return BatchNorm(num_features, dims, momentum=momentum, eps=eps, inference=inference)


# ---------------------------------------------------------------- Algorithm 2: population statistics
class _Reached(Exception):
    """Raised by a forward pre-hook to stop the forward pass once a layer's input is known."""


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    """Layers whose ``running_mean`` / ``running_var`` are BN population estimates."""
    kinds = (BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return [m for m in model.modules() if isinstance(m, kinds) and m.running_var is not None]


def _inputs(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _forward_order(model: nn.Module, layers: list[nn.Module], x: Tensor) -> list[nn.Module]:
    """``layers`` in the order a forward pass on ``x`` reaches them."""
    order: dict[int, nn.Module] = {}

    def record(module: nn.Module, args) -> None:
        order.setdefault(id(module), module)

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return list(order.values())


def _input_statistics(model: nn.Module, layer: nn.Module, data: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Mean over batches of mu_B and of the unbiased m_B / (m_B - 1) * sigma_B^2 of ``layer``'s input."""
    means: list[Tensor] = []
    variances: list[Tensor] = []

    def capture(module: nn.Module, args) -> None:
        x = args[0].float()
        dims = [d for d in range(x.dim()) if d != 1]
        m = x.numel() // x.shape[1]
        mean = x.mean(dims)
        centered = x - mean.view([1, -1] + [1] * (x.dim() - 2))
        means.append(mean)
        variances.append(centered.square().mean(dims) * (m / max(m - 1, 1)))
        raise _Reached  # the layers after this one do not matter here

    hook = layer.register_forward_pre_hook(capture)
    try:
        for x in data:
            try:
                model(x)
            except _Reached:
                pass
    finally:
        hook.remove()
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


@torch.no_grad()
def estimate_population_statistics(model: nn.Module, batches: Iterable,
                                   num_batches: int = 100) -> int:
    """Replace each BN layer's running statistics by population estimates (Ioffe & Szegedy, Alg. 2).

    For every BN layer k, in the order the forward pass reaches them, over the same
    ``num_batches`` mini-batches B of m values per feature (m = N, or N * H * W for conv):

        E[x] = mean_B(mu_B),    Var[x] = m / (m - 1) * mean_B(sigma_B^2)

    (batches of unequal size each get their own m_B / (m_B - 1)). Layer k's inputs are computed
    with layers 1..k-1 already in inference mode with their new estimates, as Alg. 2 does: its
    loop over k replaces layer k's transform in N_BN^inf before moving on to k + 1, so the
    statistics are those of the inputs the inference network really sees, not those of the
    train-mode network. This costs one forward pass per layer, each cut short at that layer.

    ``batches`` is any iterable of input tensors or of ``(x, y)`` pairs (a list, a DataLoader,
    or the trainer's training stream; reading a stream advances it, so the trainer calls this
    once, at the end of training). Returns the number of batches used.
    """
    data = [_inputs(b) for b in itertools.islice(iter(batches), num_batches)]
    if not data:
        raise ValueError("estimate_population_statistics needs at least one batch")
    was_training = model.training
    model.eval()
    try:
        for layer in _forward_order(model, _batch_norms(model), data[0]):
            mean, var = _input_statistics(model, layer, data)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    finally:
        model.train(was_training)
    return len(data)
