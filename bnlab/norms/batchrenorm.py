"""``brn``: batch renormalization (Ioffe 2017, Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab.norms.ghost as ghost
from bnlab.config.norm_options import BRNOptions
from bnlab.norms.base import LOW_PRECISION, Norm, per_feature
from bnlab.norms.registry import register_norm


@register_norm(BRNOptions)
class BatchRenorm(Norm):
    """Batch renormalization, per feature (Ioffe 2017, Alg. 1).

    Training, over the m values of a feature in the mini-batch:

        mu_B = mean(x),  sigma_B = sqrt(mean((x - mu_B)^2) + eps)
        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
        mu += momentum * (mu_B - mu),  sigma += momentum * (sigma_B - sigma)

    Inference: y = gamma * (x - mu) / sigma + beta, with the moving mu and sigma.

    Schedule, over the layer's training steps t (``num_batches_tracked``, which frozen-statistics
    passes do not advance): plain BN (r_max = 1, d_max = 0) while t < ``warmup_steps``, then
    r_max rises linearly to ``r_max`` over ``ramp_steps`` and d_max to ``d_max`` over
    ``d_ramp_steps`` (a ramp of 0 steps jumps to the final value right after warm-up).

    ``impl=torch`` (the default) runs torch's BN kernel with r and d folded into the affine
    parameters, y = (gamma * r) * x_hat + (gamma * d + beta), r and d outside the graph: the
    same function and the same gradients (dgamma = r * sum(dy * x_hat) + d * sum(dy)), and
    torch's double backward. ``impl=scratch`` writes the equations above as they stand.

    ``ghost_batch=K`` (Ioffe 2017, Sec. 4.2: Batch Renorm over micro-batches of 4 inside each
    worker's 32 examples): in training mode every group l of K consecutive examples gets its own
    mu_B, sigma_B, r_l and d_l, all computed against the moving mu and sigma of before the step;
    then the moving averages take one update per group in order (:mod:`bnlab.norms.ghost`), and
    the schedule counts the step once. (The paper does not say how its micro-batches update the
    moving averages; a loop of BRN calls over the groups would let group l's r and d see groups
    1..l-1's updates, a difference of order momentum.)
    """

    maps_over_batches = True  # frozen statistics leave no state to update: vmap maps it
    uses_batch_statistics = True

    @property
    def maps_over_members(self) -> bool:
        """Its operations map over members; with ghost batches (not tried) it trains alone."""
        return self.ghost_batch is None

    def __init__(self, num_features: int, dims: int = 2, momentum: float = BRNOptions.momentum,
                 eps: float = BRNOptions.eps, r_max: float = BRNOptions.r_max,
                 d_max: float = BRNOptions.d_max, warmup_steps: int = BRNOptions.warmup_steps,
                 ramp_steps: int = BRNOptions.ramp_steps,
                 d_ramp_steps: int = BRNOptions.d_ramp_steps, impl: str = BRNOptions.impl,
                 ghost_batch: int | None = BRNOptions.ghost_batch) -> None:
        super().__init__()
        if r_max < 1 or d_max < 0:
            raise ValueError(f"brn: need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if min(warmup_steps, ramp_steps, d_ramp_steps) < 0:
            raise ValueError("brn: warmup_steps, ramp_steps and d_ramp_steps must be >= 0")
        if ghost_batch is not None and ghost_batch < 1:
            raise ValueError(f"brn: ghost_batch={ghost_batch} is not valid: expected None or an integer >= 1")
        self.num_features, self.dims, self.momentum, self.eps = num_features, dims, momentum, eps
        self.r_max, self.d_max, self.impl, self.ghost_batch = r_max, d_max, impl, ghost_batch
        self.warmup_steps, self.ramp_steps, self.d_ramp_steps = warmup_steps, ramp_steps, d_ramp_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, dims={self.dims}, momentum={self.momentum}, eps={self.eps}, "
                f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"ramp_steps={self.ramp_steps}, d_ramp_steps={self.d_ramp_steps}, impl={self.impl}"
                + ("" if self.ghost_batch is None else f", ghost_batch={self.ghost_batch}"))

    def _ramp(self, step: Tensor | int, length: int) -> Tensor | float:
        """0 during warm-up, then linear to 1 over ``length`` steps (1 at once when 0)."""
        past = step - self.warmup_steps
        if length == 0:
            return (past >= 0) * 1.0
        ramp = past / length
        return ramp.clamp(0.0, 1.0) if isinstance(ramp, Tensor) else min(max(ramp, 0.0), 1.0)

    def limits(self, step: Tensor | int | None = None) -> tuple[Tensor, Tensor] | tuple[float, float]:
        """(r_max, d_max) in force at training step ``step`` (default: the next step).

        Tensors on the layer's device for a tensor step (the schedule then costs no host sync),
        numbers for a number.
        """
        step = self.num_batches_tracked if step is None else step
        r_max = 1.0 + (self.r_max - 1.0) * self._ramp(step, self.ramp_steps)
        d_max = self.d_max * self._ramp(step, self.d_ramp_steps)
        return r_max, d_max

    def log_scalars(self) -> dict[str, float]:
        """The limits used by the latest training step (those of step 0 before any)."""
        r_max, d_max = self.limits((self.num_batches_tracked - 1).clamp(min=0))
        return {"r_max": r_max.item(), "d_max": d_max.item()}

    def _update_running(self, mean: Tensor, std: Tensor) -> None:
        """The moving averages after one batch's (C,) mu_B and sigma_B, or after the G groups'
        (G, C) statistics of a step with ghost batches, one update per group in order."""
        if mean.dim() == 2:
            mean = ghost.sequential_update(self.running_mean, mean, self.momentum)
            std = ghost.sequential_update(self.running_std, std, self.momentum)
            momentum = 1.0  # the groups' updates are done: lerp with weight 1 is exactly the result
        else:
            momentum = self.momentum
        if torch.compiler.is_compiling():
            # train.compile: new tensors, not in-place updates. The compiled backward pass may
            # recompute r and d from these buffers and must find the values they were computed
            # from; updated in place, the gradient of x came out wrong (by up to 2.4, measured).
            self.running_mean = self.running_mean.lerp(mean, momentum)
            self.running_std = self.running_std.lerp(std, momentum)
            self.num_batches_tracked = self.num_batches_tracked + 1
            return
        self.running_mean.lerp_(mean, momentum)
        self.running_std.lerp_(std, momentum)
        self.num_batches_tracked.add_(1)

    @torch.no_grad()
    def _corrections(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """(r, d) of this batch from its mu_B and sigma_B ((C,), or (G, C) for G ghost batches),
        constants for backprop (stop_gradient), then the moving averages' update (unless the
        statistics are frozen)."""
        r_max, d_max = self.limits()
        r = torch.clamp(std / self.running_std, 1.0 / r_max, r_max)
        d = torch.clamp((mean - self.running_mean) / self.running_std, -d_max, d_max)
        if self.update_stats:
            self._update_running(mean, std)
        return r, d

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in LOW_PRECISION:  # statistics in float32 under autocast, as torch's BN does
            return self._renorm(x.float()).to(x.dtype)
        return self._renorm(x)

    def _renorm(self, x: Tensor) -> Tensor:
        rank = x.dim()
        if not self.training:
            scale = self.weight / self.running_std
            shift = self.bias - self.running_mean * scale
            return x * per_feature(scale, rank) + per_feature(shift, rank)
        if self.ghost_batch is not None:
            return self._ghost_renorm(x)
        dims = self.reduce_dims(x)
        if self.impl == "torch":
            with torch.no_grad():
                var, mean = torch.var_mean(x, dims, correction=0)
                r, d = self._corrections(mean, (var + self.eps).sqrt())
            return F.batch_norm(x, None, None, self.weight * r, torch.addcmul(self.bias, self.weight, d),
                                True, 0.0, self.eps)
        mean = x.mean(dims)
        centered = x - per_feature(mean, rank)
        std = (centered.square().mean(dims) + self.eps).sqrt()
        r, d = self._corrections(mean, std)
        x_hat = centered * per_feature(r / std, rank) + per_feature(d, rank)
        return x_hat * per_feature(self.weight, rank) + per_feature(self.bias, rank)

    def _ghost_renorm(self, x: Tensor) -> Tensor:
        """Training mode with ``ghost_batch``: each group's own r and d, all against the moving
        averages of before the step, then one update of them per group."""
        c, rank = self.num_features, x.dim()
        pieces = ghost.parts(x, self.ghost_batch)
        if any(part.numel() // (groups * c) < 2 for part, groups in pieces):
            raise ValueError(f"Expected more than 1 value per channel when training, got a ghost "
                             f"batch of one example, input size {tuple(x.shape)}")
        views = [ghost.grouped(part, groups) for part, groups in pieces]
        with torch.no_grad():  # every group's (G, C) statistics first: r and d use the old averages
            stats = [torch.var_mean(view, dims, correction=0) for view, dims in views]
            means = torch.cat([mean.reshape(-1, c) for _, mean in stats])
            stds = torch.cat([(var.reshape(-1, c) + self.eps).sqrt() for var, _ in stats])
            r, d = self._corrections(means, stds)
        outputs, start = [], 0
        for (part, groups), (view, dims) in zip(pieces, views, strict=True):
            rg, dg = r[start:start + groups], d[start:start + groups]
            start += groups
            if self.impl == "torch":
                weight = (self.weight * rg).flatten()
                bias = torch.addcmul(self.bias, self.weight, dg).flatten()
                y = F.batch_norm(ghost.to_channels(part, groups), None, None, weight, bias,
                                 True, 0.0, self.eps)
                outputs.append(ghost.from_channels(y, groups))
                continue
            shape = (groups, 1, c) + (1,) * (rank - 2)  # a (G, C) statistic over (G, K, C, ...)
            mean = view.mean(dims, keepdim=True)
            centered = view - mean
            std = (centered.square().mean(dims, keepdim=True) + self.eps).sqrt()
            x_hat = centered * (rg.view(shape) / std) + dg.view(shape)
            y = x_hat * self.weight.view(shape[1:]) + self.bias.view(shape[1:])
            outputs.append(y.flatten(0, 1))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
