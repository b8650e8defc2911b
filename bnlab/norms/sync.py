"""Cross-replica batch normalization for multi-process training (``norm.sync=true``).

Under data parallelism each process sees 1/R of the global batch. Plain BN normalizes each
shard with its own statistics; :class:`SyncBatchNorm` normalizes with the statistics of the
whole global batch, so R processes compute what one process would on the full batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.norms.base import LOW_PRECISION, Norm, per_feature
from bnlab.norms.batchnorm import BatchNorm


def _replicas() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r on every replica r. Each replica's loss depends on the same y, so the
    gradient for x_r is the sum over replicas of dL_q/dy: the backward pass all-reduces too,
    differentiably, so double backward (Hessian-vector products) is exact as well."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Through the function itself, not a bare all_reduce, so that a double backward
        # (create_graph=True) sees the sum over replicas too: its own derivative, once more.
        return _AllReduceSum.apply(grad)


def _global_sum(t: Tensor) -> Tensor:
    """Sum over the replicas, differentiable."""
    return _AllReduceSum.apply(t) if _replicas() > 1 else t


class SyncBatchNorm(BatchNorm):
    """Batch normalization with statistics over the global batch of all replicas.

    With ``n_r`` values of a feature on replica r and ``N = sum_r n_r``:

        mu  = (1/N) sum_r sum_i x_ri
        var = (1/N) sum_r sum_i (x_ri - mu)^2          (biased, used to normalize)
        y   = gamma * (x - mu) / sqrt(var + eps) + beta

    Both sums are all-reduced by an autograd function whose backward all-reduces the
    gradients, so each replica's input gradient includes the terms of
    the other replicas' losses, exactly as the one-process BN backward on the full batch does.
    The variance is a second pass around the global mean (two all-reduces per layer) rather
    than sum-of-squares minus squared mean, which loses precision when |mu| >> sigma.

    Running statistics follow :class:`bnlab.norms.batchnorm.BatchNorm` (torch's conventions,
    the unbiased global variance N/(N-1) var), and so do eval mode and ``update_stats=False``.
    Outside an initialized process group (or with one replica) it is plain BN. A subclass of
    ``BatchNorm``, so whatever treats BN layers specially (probes, population statistics) treats
    this one alike.
    """

    maps_over_batches = False  # each call is a collective: every replica must make the same calls
    maps_over_members = False

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in LOW_PRECISION  # statistics in float32 under autocast, as BatchNorm does
        xf = x.float() if low else x
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            dims = self.reduce_dims(xf)
            local_count = xf.numel() // xf.shape[1]
            count_and_sums = torch.cat([xf.new_full((1,), float(local_count)), xf.sum(dims)])
            count_and_sums = _global_sum(count_and_sums)
            count, mean = count_and_sums[0], count_and_sums[1:] / count_and_sums[0]
            var = _global_sum((xf - per_feature(mean, xf.dim())).square().sum(dims)) / count
            if self.update_stats:
                self._update_running(mean.detach(), var.detach(), count.detach())
        scale = self.weight * torch.rsqrt(var + self.eps)
        y = xf * per_feature(scale, xf.dim()) + per_feature(self.bias - mean * scale, xf.dim())
        return y.to(x.dtype) if low else y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # count stays a tensor: reading it on the host would synchronize CUDA at every layer.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var * (count / (count - 1).clamp_min(1)), factor)


def _sync_copy(layer: BatchNorm) -> SyncBatchNorm:
    sync = SyncBatchNorm(layer.num_features, layer.dims, momentum=layer.momentum, eps=layer.eps,
                         inference=layer.inference)
    sync.load_state_dict(layer.state_dict())
    sync.train(layer.training)
    sync.update_stats = layer.update_stats
    return sync.to(device=layer.weight.device)


def convert_sync(model: nn.Module) -> nn.Module:
    """Replace every layer of ``model`` that ``supports_sync`` by a :class:`SyncBatchNorm`, in place.

    Those are bnlab's BN layers (``BatchNorm``, either ``impl``; not its subclasses that
    add behaviour a plain swap would lose, such as noisy BN's noise). Parameters, buffers, mode
    and device are copied. Returns ``model``.
    """
    for name, child in model.named_children():
        if isinstance(child, Norm) and child.supports_sync and not isinstance(child, SyncBatchNorm):
            setattr(model, name, _sync_copy(child))
        else:
            convert_sync(child)
    return model
