"""``bn``: batch normalization (Ioffe & Szegedy 2015), Algorithms 1 and 2."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab.norms.ghost as ghost
from bnlab.config.norm_options import BNOptions
from bnlab.norms.base import LOW_PRECISION, Norm, in_forward_order, per_feature
from bnlab.norms.registry import register_norm

_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device, made once per value.

    On the CPU an operation given a Python number first wraps it in a tensor, which costs more
    than the arithmetic on the small MLP (``t.mul_(0.9)`` ~5 us, ``t.mul_(c)`` ~2 us); BN's
    constants (1/m, eps, the momentum) repeat every step, so each is wrapped once."""
    if torch.compiler.is_compiling():  # train.compile: a constant in the graph, no cache
        return torch.full((), value, dtype=like.dtype, device=like.device)
    key = (value, like.dtype, like.device)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return tensor


class _BatchNormTrain(torch.autograd.Function):
    """Train-mode batch normalization with the paper's closed-form backward pass.

    Statistics reduce over ``dims`` of x: N of (N, C); N, H, W of (N, C, H, W); the examples
    n of the batched launcher's (G, C, N) (kept as size-1 dimensions where they are not
    leading, so the statistics broadcast). ``weight`` and ``bias`` hold one value per
    statistic: (C,), or (G, C) for G stacked members.
    Per statistic, over its m values (Ioffe & Szegedy, Alg. 1 and Sec. 3):

        mu_B = mean(x),  var_B = mean((x - mu_B)^2),  x_hat = (x - mu_B) / sqrt(var_B + eps),
        y = gamma * x_hat + beta
        dbeta = sum(dy),  dgamma = sum(dy * x_hat),
        dx = gamma / sqrt(var_B + eps) * (dy - (dbeta + x_hat * dgamma) / m)

    ``record``, if given, is called in the forward pass with (mu_B, sum((x - mu_B)^2), m),
    shaped as the statistics: the running estimates' update. The statistics are constants for
    autograd. On the small MLP each operation's dispatch costs about as much as its arithmetic
    (3-5 us), so the pass is written in few operations: x_hat is normalized in place and kept
    for the backward pass, constants are tensors made once (:func:`_constant`), and nothing is
    reshaped that need not be. This is the reference (``impl=scratch``); the default path is
    torch's own kernel (``F.batch_norm``, :class:`BatchNorm` with ``impl=torch``).

    Double backward (``create_graph=True``, as Hessian-vector products need): the backward
    pass then computes the same formula from x with differentiable operations, so autograd
    can differentiate it in turn; an ordinary backward uses the saved x_hat.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, dims: tuple[int, ...],
                record: Callable[[Tensor, Tensor, int], None] | None):
        y, x_hat, inv_std, keepdim = _batch_norm_forward(x, weight, bias, eps, dims, record)
        # x_hat saves the backward pass two operations; x is kept for a double backward
        ctx.save_for_backward(x, x_hat, inv_std, weight)
        ctx.eps, ctx.dims, ctx.keepdim = eps, dims, keepdim
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor | None):
        if grad_y is None:
            return None, None, None, None, None, None
        x, x_hat, inv_std, weight = ctx.saved_tensors
        dims, keepdim = ctx.dims, ctx.keepdim
        params = weight.shape
        if keepdim:  # the parameters shaped as the statistics (a view autograd sees, if it looks)
            weight = weight.view(inv_std.shape)
        if torch.is_grad_enabled():  # create_graph=True: this backward will be differentiated
            grads = batch_norm_backward(x, weight, grad_y, ctx.eps, dims, keepdim)
        else:
            grad_bias = grad_y.sum(dims, keepdim=keepdim)
            grad_weight = (grad_y * x_hat).sum(dims, keepdim=keepdim)
            grad_x = None
            if ctx.needs_input_grad[0]:
                # dx = gamma / sqrt(var_B + eps) * (dy - (dbeta + x_hat * dgamma) / m)
                grad_x = torch.addcmul(grad_bias, x_hat, grad_weight)
                m = x.numel() // inv_std.numel()
                grad_x = torch.addcmul(grad_y, grad_x, _constant(-1.0 / m, x)).mul_(weight * inv_std)
            grads = grad_x, grad_weight, grad_bias
        grad_x, grad_weight, grad_bias = grads
        if keepdim:  # back to the parameters' own shape
            grad_weight, grad_bias = grad_weight.view(params), grad_bias.view(params)
        return grad_x, grad_weight, grad_bias, None, None, None


def _batch_norm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dims: tuple[int, ...],
                        record: Callable[[Tensor, Tensor, int], None] | None
                        ) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(y, x_hat, 1 / sqrt(var_B + eps), keepdim) of :class:`_BatchNormTrain`'s forward pass."""
    # statistics of leading dimensions ((N, C)) broadcast as they are; others keep theirs
    keepdim = dims != tuple(range(len(dims)))
    total = x.sum(dims, keepdim=keepdim)
    m = x.numel() // total.numel()
    inv_m = _constant(1.0 / m, x)
    mean = total * inv_m
    x_hat = x - mean
    squares = (x_hat * x_hat).sum(dims, keepdim=keepdim)  # two passes: exact when |mu| >> sigma
    inv_std = torch.addcmul(_constant(eps, x), squares, inv_m).rsqrt()
    x_hat.mul_(inv_std)
    shape = total.shape
    y = torch.addcmul(bias.view(shape) if keepdim else bias, x_hat,
                      weight.view(shape) if keepdim else weight)
    if record is not None:
        record(mean, squares, m)
    return y, x_hat, inv_std, keepdim


def batch_norm_backward(x: Tensor, weight: Tensor, grad_y: Tensor, eps: float,
                        dims: tuple[int, ...], keepdim: bool):
    """(dx, dgamma, dbeta) of train-mode BN, differentiable in x, gamma and dy (the backward
    pass of :class:`_BatchNormTrain` under ``create_graph=True``); ``weight`` shaped as the
    statistics."""
    mean = x.mean(dims, keepdim=keepdim)
    m = x.numel() // mean.numel()
    centered = x - mean
    inv_std = (centered.square().mean(dims, keepdim=keepdim) + eps).rsqrt()
    x_hat = centered * inv_std
    grad_bias = grad_y.sum(dims, keepdim=keepdim)
    grad_weight = (grad_y * x_hat).sum(dims, keepdim=keepdim)
    grad_x = weight * inv_std * (grad_y - (grad_bias + x_hat * grad_weight) / m)
    return grad_x, grad_weight, grad_bias


def batch_norm_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dims: tuple[int, ...],
                     record: Callable[[Tensor, Tensor, int], None] | None = None) -> Tensor:
    """Train-mode BN of x over ``dims`` (:class:`_BatchNormTrain`).

    Without autograd (measurements under ``torch.no_grad``) the same forward pass runs as plain
    operations, which ``torch.func.vmap`` can map over many batches at once."""
    if torch.is_grad_enabled():
        return _BatchNormTrain.apply(x, weight, bias, eps, dims, record)
    return _batch_norm_forward(x, weight, bias, eps, dims, record)[0]


def record_batch(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                 momentum: float | None, mean: Tensor, squares: Tensor, m: int) -> None:
    """The running estimates' update from one training batch, torch's convention:
    running = (1 - f) * running + f * batch statistic, with f the momentum (or 1 / batches seen,
    ``momentum=None``: the cumulative average) and the unbiased batch variance
    m / (m - 1) * var_B = sum((x - mu_B)^2) / (m - 1). Statistics shaped as the buffers or
    viewable as them; called without autograd."""
    if mean.shape != running_mean.shape:
        mean, squares = mean.view_as(running_mean), squares.view_as(running_var)
    tracked = num_batches_tracked.add_(_constant(1, num_batches_tracked))
    if momentum is None:  # a new factor every step: computed on the device, no cache, no sync
        factor = tracked.reciprocal().to(mean.dtype)
        keep, weight = 1.0 - factor, factor / (m - 1)
    else:
        factor, keep, weight = (_constant(v, mean) for v in (momentum, 1.0 - momentum, momentum / (m - 1)))
    running_mean.lerp_(mean, factor)
    running_var.mul_(keep).addcmul_(squares, weight)


def record_groups(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                  momentum: float | None, means: Tensor, variances: Tensor) -> None:
    """The running estimates' update from the G ghost batches of one training step, (G, C) means
    and unbiased variances: one update per group in order (:func:`bnlab.norms.ghost.sequential_update`),
    or with ``momentum=None`` the cumulative average over every group seen (each step has the
    same G groups, so it is the average over steps of the groups' mean). ``num_batches_tracked``
    counts training steps, as without ghost batches."""
    num_batches_tracked.add_(1)
    if momentum is None:
        factor = num_batches_tracked.reciprocal().to(means.dtype)
        running_mean.lerp_(means.mean(0), factor)
        running_var.lerp_(variances.mean(0), factor)
        return
    running_mean.copy_(ghost.sequential_update(running_mean, means, momentum))
    running_var.copy_(ghost.sequential_update(running_var, variances, momentum))


class PopulationStatistics:
    """``inference=population``: at the end of training, Alg. 2 replaces the running statistics.

    For the layers that hold BN's ``running_mean`` and ``running_var`` (see :meth:`running`).
    """

    inference: str

    def running(self) -> tuple[Tensor, Tensor]:
        return self.running_mean, self.running_var

    def finishes_training(self) -> bool:
        return self.inference == "population"

    def finish_training(self, model: nn.Module, inputs: list[Tensor]) -> None:
        for buffer, value in zip(self.running(), _input_statistics(model, self, inputs), strict=True):
            buffer.copy_(value)


@register_norm(BNOptions)
class BatchNorm(PopulationStatistics, Norm):
    """y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta, per feature (Ioffe & Szegedy, Alg. 1).

    Conventions of ``torch.nn.BatchNorm{1,2}d``: ``running = (1 - momentum) * running +
    momentum * batch`` (``momentum=None``: cumulative average), running variance from the unbiased
    batch variance, normalization with the biased one, running statistics in eval mode.
    The backward pass is the paper's closed form (:class:`_BatchNormTrain`), not autograd's
    graph of the forward: same gradients, a fraction of the operations.

    ``impl=torch`` (the default) runs torch's kernel, ``F.batch_norm``, on the same parameters
    and buffers (what ``torch.nn.BatchNorm{1,2}d`` runs); ``impl=scratch`` the paper's equations
    written in Python, the reference that the tests hold equal to torch's layer.

    ``inference=population`` replaces the running statistics at the end of training with the
    population estimates of Alg. 2 (:meth:`finish_training`, run by the trainer); until then,
    and with ``moving``, eval mode uses the moving averages.

    ``ghost_batch=K`` (ghost batch normalization, Hoffer et al. 2017; Ioffe 2017's micro-batches):
    in training mode every group of K consecutive examples is normalized with its own mu_B and
    var_B, as if BN ran on each group alone, and the running estimates take one update per group
    (:mod:`bnlab.norms.ghost`); eval mode is unchanged. ``None``: the whole batch is one group.
    """

    maps_over_batches = True  # frozen statistics leave no state to update: vmap maps it

    @property
    def maps_over_members(self) -> bool:
        """torch's kernel maps; the Python equations' autograd Function, the cumulative
        average's host-side factor (``momentum=None``) and ghost batches (not tried) do not."""
        return self.impl == "torch" and self.momentum is not None and self.ghost_batch is None
    uses_batch_statistics = True

    def __init__(self, num_features: int, dims: int = 2, momentum: float | None = BNOptions.momentum,
                 eps: float = BNOptions.eps, inference: str = BNOptions.inference,
                 impl: str = BNOptions.impl, ghost_batch: int | None = BNOptions.ghost_batch) -> None:
        super().__init__()
        if impl not in ("torch", "scratch"):
            raise ValueError(f"impl={impl!r} is not valid: expected torch or scratch")
        if ghost_batch is not None and ghost_batch < 1:
            raise ValueError(f"ghost_batch={ghost_batch} is not valid: expected None or an integer >= 1")
        self.num_features, self.dims, self.momentum, self.eps = num_features, dims, momentum, eps
        self.inference, self.impl, self.ghost_batch = inference, impl, ghost_batch
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        ghost = "" if self.ghost_batch is None else f", ghost_batch={self.ghost_batch}"
        return (f"{self.num_features}, dims={self.dims}, momentum={self.momentum}, eps={self.eps}, "
                f"inference={self.inference}, impl={self.impl}{ghost}")

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.ghost_batch is not None:
            return self._ghost_forward(x)
        if self.impl == "torch":
            return self._torch_forward(x)
        low = x.dtype in LOW_PRECISION  # statistics in float32 under autocast, as torch does
        xf = x.float() if low else x
        if self.training:
            m = xf.numel() // xf.shape[1]
            if m < 2:
                raise ValueError(f"Expected more than 1 value per channel when training, "
                                 f"got input size {tuple(x.shape)}")
            y = self._train_forward(xf)
        else:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            y = torch.addcmul(per_feature(shift, xf.dim()), xf, per_feature(scale, xf.dim()))
        return y.to(x.dtype) if low else y

    def _torch_forward(self, x: Tensor) -> Tensor:
        """torch's kernel with ``torch.nn.BatchNorm``'s bookkeeping; frozen statistics: batch
        statistics and no running update."""
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if not self.update_stats:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, factor, self.eps)

    def _train_forward(self, x: Tensor) -> Tensor:
        """A training pass (:func:`batch_norm_train`); without autograd plain operations, which
        ``torch.func.vmap`` can map."""
        record = self._record_batch if self.update_stats else None
        return batch_norm_train(x, self.weight, self.bias, self.eps, self.reduce_dims(x), record)

    def _record_batch(self, mean: Tensor, squares: Tensor, m: int) -> None:
        record_batch(self.running_mean, self.running_var, self.num_batches_tracked, self.momentum,
                     mean, squares, m)

    def _ghost_forward(self, x: Tensor) -> Tensor:
        """Training mode with ``ghost_batch``: every group normalized with its own statistics,
        by torch's kernel over the groups-as-channels view or by :func:`batch_norm_train`."""
        low = x.dtype in LOW_PRECISION
        xf = x.float() if low else x
        c = self.num_features
        outputs, means, variances = [], [], []
        found: list[tuple[Tensor, Tensor, int]] = []  # (mu_B, sum (x - mu_B)^2, m) from the scratch path

        def record(mean: Tensor, squares: Tensor, m: int) -> None:
            found.append((mean, squares, m))

        for part, groups in ghost.parts(xf, self.ghost_batch):
            if part.numel() // (groups * c) < 2:
                raise ValueError(f"Expected more than 1 value per channel when training, got a ghost "
                                 f"batch of one example, input size {tuple(x.shape)}")
            if self.impl == "torch":
                stats = None
                if self.update_stats:  # momentum 1: the buffers receive the groups' mean and unbiased var
                    stats = (xf.new_zeros(groups * c), xf.new_ones(groups * c))
                y = F.batch_norm(ghost.to_channels(part, groups), *(stats or (None, None)),
                                 self.weight.repeat(groups), self.bias.repeat(groups), True, 1.0, self.eps)
                outputs.append(ghost.from_channels(y, groups))
                if stats is not None:
                    means.append(stats[0].view(groups, c))
                    variances.append(stats[1].view(groups, c))
            else:
                view, dims = ghost.grouped(part, groups)
                y = batch_norm_train(view, self.weight.expand(groups, c), self.bias.expand(groups, c),
                                     self.eps, dims, record if self.update_stats else None)
                outputs.append(y.flatten(0, 1))
                if self.update_stats:
                    mean, squares, count = found.pop()
                    means.append(mean.reshape(groups, c))
                    variances.append(squares.reshape(groups, c) / (count - 1))
        if means:
            with torch.no_grad():
                record_groups(self.running_mean, self.running_var, self.num_batches_tracked,
                              self.momentum, torch.cat(means), torch.cat(variances))
        y = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return y.to(x.dtype) if low else y


# ---------------------------------------------------------------- Algorithm 2: population statistics
class _Reached(Exception):
    """Raised by a forward pre-hook to stop the forward pass once a layer's input is known."""


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    """Layers whose ``running_mean`` / ``running_var`` are BN population estimates."""
    kinds = (BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return [m for m in model.modules() if isinstance(m, kinds) and m.running_var is not None]


@torch.no_grad()
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
    def replace(layer: nn.Module, inputs: list[Tensor]) -> None:
        mean, var = _input_statistics(model, layer, inputs)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)

    return in_forward_order(model, _batch_norms(model), batches, num_batches, replace)
