"""What every bnlab normalization layer shares, and what the rest of bnlab may ask of one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

import torch
from torch import Tensor, nn

# Inputs whose statistics are computed in float32 (autocast), as torch's own norm layers do.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def per_feature(v: Tensor, rank: int) -> Tensor:
    """A per-feature (C,) vector shaped to broadcast over a rank-2 (N, C) or rank-4 (N, C, H, W) input."""
    return v if rank == 2 else v.view(-1, 1, 1)


class Norm(nn.Module):
    """Base class of bnlab's normalization layers.

    ``update_stats=False`` is the probes' frozen-statistics mode: a train-mode forward pass uses
    batch statistics as usual but leaves running estimates and step counters untouched, so
    measuring the network never changes its training. ``hold_noise=True`` makes a stochastic
    layer reuse its last noise sample instead of drawing a new one.

    The class attributes and methods below are what the trainer, the probes and the config
    checks ask of a layer; nothing outside ``bnlab.norms`` compares norm names.
    """

    update_stats: bool = True
    # True while a measurement needs repeated passes to see the same noise (noisy BN, ICS probes).
    hold_noise: bool = False
    # Training mode normalizes with the mini-batch's statistics, so it differs from eval mode.
    uses_batch_statistics: bool = False
    # Has a cross-replica version for multi-process training (``norm.sync``, bnlab.norms.sync);
    # set by register_norm from the options' ``sync`` key.
    supports_sync: bool = False
    # Ends with a learned per-feature shift beta: a bias just before it is redundant (Ioffe &
    # Szegedy, Sec. 3.2), so the model drops it.
    replaces_bias: bool = True
    # A train-mode measurement without autograd may run many batches as one ``torch.func.vmap``
    # pass, each batch with its own statistics (bnlab.run.evaluation). Opt-in: a layer declares
    # it once it is known to run under vmap with frozen statistics (no in-place update of its
    # state, no state kept between calls); the others take one pass per batch, same numbers.
    maps_over_batches: bool = False
    # Many members' copies of the layer may train as one program (bnlab.batched.program): its
    # training step runs under ``torch.func.vmap`` over the members' stacked parameters and
    # buffers (no custom autograd Function without a vmap rule, no draws of its own, buffer
    # updates only in place). Opt-in as well; the others' runs train one by one.
    maps_over_members: bool = False

    @classmethod
    def build(cls, num_features: int, dims: int = 2, **options) -> Norm:
        """The layer that ``norm=<name>`` with config keys ``options`` stands for.

        A norm with several implementations of one layer (BN's ``impl``) chooses among them here.
        """
        return cls(num_features, dims, **options)

    def log_scalars(self) -> dict[str, float]:
        """Scalars worth logging for this layer (Batch Renorm's current r_max, d_max)."""
        return {}

    def finishes_training(self) -> bool:
        """Whether :meth:`finish_training` has work to do (the trainer then reads training batches)."""
        return False

    def finish_training(self, model: nn.Module, inputs: list[Tensor]) -> None:
        """End-of-training hook, before the final evaluation (BN's ``inference=population``).

        Called by :func:`bnlab.norms.finish_training` with ``model`` in eval mode, once per
        layer in the order a forward pass reaches them (the layers before this one are finished
        already), with the inputs of the same training batches for every layer.
        """

    @staticmethod
    def reduce_dims(x: Tensor) -> tuple[int, ...]:
        """Dimensions a per-feature statistic reduces over: N for (N, C), N, H, W for (N, C, H, W)."""
        return (0,) if x.dim() == 2 else (0, 2, 3)


def _inputs(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def forward_order(model: nn.Module, layers: list[nn.Module], x: Tensor) -> list[nn.Module]:
    """``layers`` in the order a forward pass of ``model`` on ``x`` reaches them."""
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


@torch.no_grad()
def in_forward_order(model: nn.Module, layers: list[nn.Module], batches: Iterable, num_batches: int,
                     visit: Callable[[nn.Module, list[Tensor]], None]) -> int:
    """``visit(layer, inputs)`` for each of ``layers`` in forward order, ``model`` in eval mode.

    ``inputs`` are the inputs of the first ``num_batches`` of ``batches`` (tensors or ``(x, y)``
    pairs), the same list for every layer; reading a stream advances it. Returns their number.
    """
    data = [_inputs(b) for b in islice(iter(batches), num_batches)]
    if not data:
        raise ValueError("need at least one batch")
    was_training = model.training
    model.eval()
    try:
        for layer in forward_order(model, layers, data[0]):
            visit(layer, data)
    finally:
        model.train(was_training)
    return len(data)
