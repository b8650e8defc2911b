"""The training loop's backward pass and update (bnlab.run.optim) against torch's own
``loss.backward()`` and ``optimizer.step``: the same gradients, parameters and momentum buffers,
bit for bit, whatever the settings, the schedule or a checkpoint in between."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.norms.batchnorm import BatchNorm
from bnlab.run.optim import clear_grads, loop_backward, loop_update


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.Sigmoid(), nn.Linear(16, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(20, 12, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(n)]


def _train(model, opt, update, batches, lrs=None) -> None:
    for i, (x, y) in enumerate(batches):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        update()


def _assert_same(a_model, a_opt, b_model, b_opt) -> None:
    for (name, p), q in zip(a_model.named_parameters(), b_model.parameters(), strict=True):
        assert torch.equal(p, q), name
        a_buf = a_opt.state[p].get("momentum_buffer")
        b_buf = b_opt.state[q].get("momentum_buffer")
        assert (a_buf is None) == (b_buf is None), name
        if a_buf is not None:
            assert torch.equal(a_buf, b_buf), name


SETTINGS = [dict(momentum=0.9), dict(momentum=0.0), dict(momentum=0.9, nesterov=True),
            dict(momentum=0.5, weight_decay=1e-3, dampening=0.1)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_the_loop_update_equals_torch_step_bit_for_bit(settings):
    a = _net()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.3, fused=True, **settings)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.3, fused=True, **settings)
    batches = _batches(6)
    lrs = [0.3 * (1 - i / 6) for i in range(6)]  # the schedule sets lr between steps
    _train(a, opt_a, opt_a.step, batches, lrs)
    _train(b, opt_b, loop_update(opt_b), batches, lrs)
    _assert_same(a, opt_a, b, opt_b)
    assert not torch.equal(a[0].weight, _net()[0].weight)  # it trained


def test_the_loop_update_leaves_only_the_first_step_to_torch():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    calls = []
    step = opt.step
    opt.step = lambda: (calls.append(1), step())[1]
    _train(model, opt, loop_update(opt), _batches(4))
    assert len(calls) == 1  # the first step creates the momentum buffers


def test_the_loop_update_continues_a_loaded_checkpoint_exactly():
    a = _net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.2, momentum=0.9, fused=True)
    batches = _batches(6)
    _train(a, opt_a, opt_a.step, batches[:3])
    saved = copy.deepcopy((a.state_dict(), opt_a.state_dict()))
    b = _net()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.9, fused=True)
    update = loop_update(opt_b)  # made before the load, as the trainer makes it
    b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    _train(a, opt_a, opt_a.step, batches[3:])
    _train(b, opt_b, update, batches[3:])
    _assert_same(a, opt_a, b, opt_b)


def test_a_parameter_without_a_gradient_is_left_alone_as_torch_does():
    a = nn.ModuleDict({"used": nn.Linear(12, 3), "unused": nn.Linear(12, 3)})
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, fused=True)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, fused=True)
    before = b["unused"].weight.clone()
    for model, update in ((a, opt_a.step), (b, loop_update(opt_b))):
        _train(model["used"], None, update, _batches(3))
    _assert_same(a, opt_a, b, opt_b)
    assert torch.equal(b["unused"].weight, before)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),  # not fused: torch's foreach path
    lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True, maximize=True),
], ids=["adamw", "sgd-foreach", "sgd-maximize"])
def test_other_optimizers_keep_torch_step(make):
    opt = make(_net().parameters())
    assert loop_update(opt) == opt.step


def test_clear_grads_sets_every_gradient_to_none():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    clear_grads(opt)()
    assert all(p.grad is None for p in model.parameters())


def test_the_loop_backward_gives_the_gradients_of_loss_backward_bit_for_bit():
    """With bnlab's BN (its autograd Function, the compiled closed form) between torch's layers."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 16, bias=False), BatchNorm(16), nn.Sigmoid(), nn.Linear(16, 3))
    b = copy.deepcopy(a)
    backward = loop_backward(torch.device("cpu"), compiled=False)
    assert backward is not torch.Tensor.backward
    x, y = _batches(1)[0]
    F.cross_entropy(a(x), y).backward()
    backward(F.cross_entropy(b(x), y))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert q.grad is not None and torch.equal(p.grad, q.grad), name
    # gradients accumulate, as loss.backward() accumulates them
    F.cross_entropy(a(x), y).backward()
    backward(F.cross_entropy(b(x), y))
    assert torch.equal(a[0].weight.grad, b[0].weight.grad)


@pytest.mark.parametrize("device,compiled", [("cuda", False), ("cpu", True)])
def test_the_loop_backward_is_torch_own_on_a_gpu_and_when_compiling(device, compiled):
    assert loop_backward(torch.device(device), compiled) is torch.Tensor.backward
