"""The optimizer, its learning-rate schedule, and the step's backward pass and update as the
training loop calls them.

On the default MLP a CPU step is ~1.3-2 ms, and torch's ``SGD.step`` spends ~80 us of it in
Python (grouping the parameters by device, collecting buffers, grad-mode and profiler
wrappers) around one fused kernel that takes ~25 us; ``zero_grad`` adds ~20 us. The loop
calls that kernel directly instead (:func:`loop_update`), on the optimizer's own parameters,
momentum buffers and ``param_groups``, so checkpoints, schedules and ``optimizer.state_dict()``
are those of torch's optimizer and the numbers are bit for bit the same. Likewise
``loss.backward()``'s Python wrapper costs ~5% of the eager CPU step, and the loop calls
autograd's engine itself (:func:`loop_backward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import Tensor, nn


def build_optimizer(cfg_optim: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg_optim.name == "sgd":
        # fused: one kernel for all parameters instead of a loop of small ops (~5% of a CPU step)
        opt = torch.optim.SGD(params, lr=cfg_optim.lr, momentum=cfg_optim.momentum,
                              weight_decay=cfg_optim.weight_decay, nesterov=cfg_optim.nesterov,
                              fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas),
                                weight_decay=cfg_optim.weight_decay)
    return opt


def learning_rate(cfg_optim, step: int, total_steps: int) -> float:
    """The rate of update number ``step`` (0-based): constant, or cosine from lr to 0.

    A closed form of the step, not an LR-scheduler object: nothing to checkpoint, and no
    wrapper around ``optimizer.step`` (torch's schedulers cost ~4% of a small CPU step).
    """
    if cfg_optim.schedule == "cosine":
        return cfg_optim.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    return cfg_optim.lr


def clear_grads(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.zero_grad(set_to_none=True)`` as a plain loop over the parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clear() -> None:
        for p in params:
            p.grad = None
    return clear


def loop_backward(device: torch.device, compiled: bool) -> Callable[[Tensor], None]:
    """``loss.backward()`` for the training loop: on a CPU, without ``torch.compile``, autograd's
    engine called as ``torch.autograd.backward`` calls it (the same gradients, bit for bit),
    without the wrapper's argument handling, debug-logging check and context stash (which lets
    compiled code see its configuration on a GPU's worker threads). Elsewhere, and where the
    engine is not reachable, ``Tensor.backward``."""
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    if device.type != "cpu" or compiled or not hasattr(engine, "run_backward"):
        return Tensor.backward

    def backward(loss: Tensor) -> None:
        engine.run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                            allow_unreachable=True, accumulate_grad=True)
    return backward


def loop_update(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.step`` for the training loop: for a fused SGD with one parameter group on
    one device and dtype, torch's fused kernel called directly; otherwise ``optimizer.step``.

    Each call reads the group's current ``lr`` (the schedule sets it) and the momentum buffers
    from ``optimizer.state`` (a loaded checkpoint replaces them). A step that torch would treat
    differently (the first, which creates the buffers; a parameter without a gradient) is left
    to ``optimizer.step``. Hooks registered on the optimizer's ``step`` do not run on the direct
    path; bnlab registers none.
    """
    if not _fusable(optimizer):
        return optimizer.step
    group = optimizer.param_groups[0]
    params, state = group["params"], optimizer.state
    with_buffers = group["momentum"] != 0

    def update() -> None:
        grads = [p.grad for p in params]
        buffers = [state[p].get("momentum_buffer") for p in params] if with_buffers else []
        if any(g is None for g in grads) or any(b is None for b in buffers):
            optimizer.step()
            return
        with torch.no_grad():  # an in-place update of leaves that require grad
            torch._fused_sgd_(params, grads, buffers, weight_decay=group["weight_decay"],
                              momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                              nesterov=group["nesterov"], maximize=False, is_first_step=False)
    return update


def _fusable(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    params = group["params"]
    if not (group["fused"] and params and hasattr(torch, "_fused_sgd_")):
        return False
    if group["maximize"] or group["differentiable"]:
        return False
    first = params[0]
    return all(p.device == first.device and p.dtype == first.dtype for p in params)
