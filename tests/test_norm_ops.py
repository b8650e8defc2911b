"""The norms' compiled operators (bnlab.norms.kernel: BN, batch renormalization, group and
layer normalization) against torch's layers and bnlab's own torch-operation paths, and their
fallback when they cannot be built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bnlab.norms import build_norm, kernel
from bnlab.norms.batchnorm import BatchNorm
from bnlab.norms.batchrenorm import BatchRenorm
from bnlab.norms.groupnorm import GroupNorm

HAS_COMPILER = shutil.which(os.environ.get("CXX") or "c++") is not None
needs_kernel = pytest.mark.skipif(kernel.status() != "compiled", reason=f"BN kernel {kernel.status()}")


def _node(function: str) -> str:
    return f"torch::autograd::CppNode<(anonymous namespace)::{function}>"


COMPILED_NODE = _node("BatchNormTrain")


def _torch_ops_only(monkeypatch) -> None:
    """The norms as torch operations, as without a compiler."""
    monkeypatch.setattr(kernel, "serves", lambda *args, **kwargs: False)


class _Calls:
    """Counts the calls of the compiled operator, which still runs."""

    def __init__(self, monkeypatch, name: str = "batch_norm_train") -> None:
        self.count, real = 0, getattr(kernel, name)

        def counted(*args):
            self.count += 1
            return real(*args)
        monkeypatch.setattr(kernel, name, counted)


def _train_steps(layer: nn.Module, batches, grads, node: str | None = None):
    """(output, input grad, weight grad, bias grad) of a train-mode pass for each batch; each
    output's autograd node is named ``node``, if given."""
    out = []
    for x, g in zip(batches, grads, strict=True):
        x = x.clone().requires_grad_()
        y = layer(x)
        assert node is None or y.grad_fn.name() == node
        y.backward(g)
        out.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        layer.weight.grad = layer.bias.grad = None
    return out


def test_the_kernel_is_built_wherever_a_cxx_compiler_is():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine")
    assert kernel.status() == "compiled"


@needs_kernel
@pytest.mark.parametrize("shape", [(60, 100), (2, 3), (257, 7), (5, 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_bn_equals_torch_and_bnlabs_operations(monkeypatch, shape, momentum):
    """Three training steps of the compiled operator (which must run, forward and backward), of
    bnlab's torch-operation path and of torch's layer: outputs, gradients, running estimates and
    counters agree."""
    torch.manual_seed(0)
    c = shape[1]
    compiled, ops = BatchNorm(c, momentum=momentum), BatchNorm(c, momentum=momentum)
    native = nn.BatchNorm1d(c, momentum=momentum)
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    with torch.no_grad():
        for layer in (compiled, ops, native):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    batches = [torch.randn(shape) * 3 + 2 for _ in range(3)]
    grads = [torch.randn(shape) for _ in range(3)]
    forward = _Calls(monkeypatch)
    got = _train_steps(compiled, batches, grads, node=COMPILED_NODE)
    assert forward.count == 3
    want = _train_steps(native, batches, grads)
    with monkeypatch.context() as patch:
        _torch_ops_only(patch)
        ops_steps = _train_steps(ops, batches, grads)
    assert forward.count == 3  # the operation path did not use the kernel
    for reference, tolerance in ((want, 1e-4), (ops_steps, 1e-5)):
        for ours, theirs in zip(got, reference, strict=True):
            for a, b in zip(ours, theirs, strict=True):
                assert_close(a, b, rtol=tolerance, atol=tolerance)
    for layer in (native, ops):
        assert_close(compiled.running_mean, layer.running_mean, rtol=1e-6, atol=1e-6)
        assert_close(compiled.running_var, layer.running_var, rtol=1e-6, atol=1e-6)
        assert compiled.num_batches_tracked.item() == layer.num_batches_tracked.item() == 3


@needs_kernel
def test_compiled_bn_keeps_precision_when_the_mean_dwarfs_the_spread():
    """Sums accumulate in double: 200,000 rows around 1,000 with spread 1 give the float64
    statistics of the float32 input (a float32 sum would be off by its spacing at 2e8, 16).
    With momentum 1 the running estimates are the batch's mean and unbiased variance."""
    torch.manual_seed(2)
    x = (torch.randn(200_000, 2, dtype=torch.float64) + 1000.0).float()
    ones, zeros = torch.ones(2), torch.zeros(2)
    running = torch.zeros(2), torch.ones(2), torch.tensor(0)
    with torch.enable_grad():
        y = kernel.batch_norm_train(x, ones, zeros, running, 1.0, 1e-5)
    exact = x.double()
    assert_close(running[0].double(), exact.mean(0), rtol=1e-7, atol=0)
    assert_close(running[1].double(), exact.var(0), rtol=1e-6, atol=0)
    assert running[2].item() == 1
    expected = (exact - exact.mean(0)) / (exact.var(0, unbiased=False) + 1e-5).sqrt()
    assert_close(y.double(), expected, rtol=0, atol=1e-4)


@needs_kernel
def test_compiled_bn_without_an_input_gradient_gives_the_parameters_theirs(monkeypatch):
    """The first layer's input needs no gradient: dgamma and dbeta as torch's, no dx."""
    torch.manual_seed(3)
    ours, native = BatchNorm(8), nn.BatchNorm1d(8)
    x, g = torch.randn(16, 8), torch.randn(16, 8)
    y = ours(x)
    assert y.grad_fn.name() == COMPILED_NODE
    y.backward(g)
    native(x).backward(g)
    assert_close(ours.weight.grad, native.weight.grad, rtol=1e-5, atol=1e-5)
    assert_close(ours.bias.grad, native.bias.grad, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_double_backward_after_a_compiled_forward_equals_torchs(monkeypatch):
    """create_graph=True (Hessian-vector products) after a compiled forward pass: the backward
    is then computed as operations autograd can differentiate, and agrees with torch's."""
    torch.manual_seed(4)
    x0, v, gamma = torch.randn(32, 6) * 2 + 1, torch.randn(32, 6), torch.rand(6) + 0.5

    def hvp(norm) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        (dx,) = torch.autograd.grad((norm(x) ** 3).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad((dx * v).sum(), x)
        return hv

    layer = BatchNorm(6)
    with torch.no_grad():
        layer.weight.copy_(gamma)
    forward = _Calls(monkeypatch)
    ours = hvp(layer)
    assert forward.count == 1
    assert_close(ours, hvp(lambda x: F.batch_norm(x, None, None, gamma, None, True)), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_nan_spreads_through_its_feature_only_as_in_torch():
    """A diverging input: the feature holding a NaN is NaN everywhere, the others are finite."""
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    ours, native = BatchNorm(4)(x), nn.BatchNorm1d(4)(x)
    assert torch.equal(ours.isnan(), native.isnan())
    assert ours[:, 1].isnan().all() and ours[:, [0, 2, 3]].isfinite().all()


@needs_kernel
def test_what_the_kernel_leaves_to_the_operations(monkeypatch):
    """Conv inputs, float64, large and non-contiguous inputs take the operation path."""
    forward = _Calls(monkeypatch)
    BatchNorm(4, dims=4)(torch.randn(3, 4, 2, 2))
    BatchNorm(4).double()(torch.randn(8, 4, dtype=torch.float64))
    BatchNorm(kernel.MAX_ELEMENTS // 8 + 1)(torch.randn(8, kernel.MAX_ELEMENTS // 8 + 1))
    BatchNorm(4)(torch.randn(4, 8).t())
    assert forward.count == 0
    BatchNorm(4)(torch.randn(8, 4))
    assert forward.count == 1


def _affine(layer: nn.Module, c: int) -> nn.Module:
    """The layer with a gamma and beta of its own (not the initial ones and zeros)."""
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, c))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return layer


def _against_operations(monkeypatch, make, batches, grads, function: str, name: str):
    """(compiled steps, operation-path steps, the two layers): the compiled operator must run
    in every step and the operation path never."""
    compiled, ops = make(), make()
    ops.load_state_dict(compiled.state_dict())
    calls = _Calls(monkeypatch, name)
    got = _train_steps(compiled, batches, grads, node=_node(function))
    assert calls.count == len(batches)
    with monkeypatch.context() as patch:
        _torch_ops_only(patch)
        want = _train_steps(ops, batches, grads)
    assert calls.count == len(batches)
    return got, want, compiled, ops


def _assert_steps_close(got, want, tolerance: float) -> None:
    for ours, theirs in zip(got, want, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert_close(a, b, rtol=tolerance, atol=tolerance)


@needs_kernel
@pytest.mark.parametrize("shape", [(60, 100), (2, 12), (33, 12)])
@pytest.mark.parametrize("groups", [1, 4])
def test_compiled_group_norm_equals_torch_and_bnlabs_operations(monkeypatch, shape, groups):
    """Layer (1 group) and group normalization: three training passes of
    the compiled operator against torch's F.group_norm and bnlab's operations."""
    torch.manual_seed(5)
    c = shape[1]
    if c % groups:
        pytest.skip("groups must divide the width")
    batches = [torch.randn(shape) * 3 + 2 for _ in range(3)]
    grads = [torch.randn(shape) for _ in range(3)]
    got, want, compiled, _ = _against_operations(
        monkeypatch, lambda: _affine(GroupNorm(c, groups=groups), c), batches, grads, "GroupNorm",
        "group_norm")
    _assert_steps_close(got, want, 1e-5)
    native = _affine(nn.GroupNorm(groups, c), c)
    _assert_steps_close(got, _train_steps(native, batches, grads), 1e-4)


@needs_kernel
def test_compiled_layer_norm_is_torchs_layer_norm_over_the_features(monkeypatch):
    torch.manual_seed(6)
    x, g = torch.randn(16, 40) * 2 - 1, torch.randn(16, 40)
    layer = _affine(build_norm("ln", 40), 40)
    native = _affine(nn.LayerNorm(40), 40)
    calls = _Calls(monkeypatch, "group_norm")
    _assert_steps_close(_train_steps(layer, [x], [g]), _train_steps(native, [x], [g]), 1e-4)
    assert calls.count == 1


@needs_kernel
def test_compiled_group_norm_keeps_precision_when_the_mean_dwarfs_the_spread():
    """A group's sums accumulate in double: 200,000 features around 1,000 normalize as float64
    normalizes the same float32 input."""
    torch.manual_seed(7)
    x = (torch.randn(2, 200_000, dtype=torch.float64) + 1000.0).float()
    with torch.enable_grad():
        y = kernel.group_norm(x, torch.ones(200_000), torch.zeros(200_000), 1, 1e-5)
    exact = x.double()
    spread = (exact.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    expected = (exact - exact.mean(1, keepdim=True)) / spread
    assert_close(y.double(), expected, rtol=0, atol=1e-4)


def _renorm(c: int, **options) -> BatchRenorm:
    """Batch renormalization that corrects from its second step: r_max ramps 1 -> 3 over two
    steps, d_max is 0.5 at once, and the moving averages move fast enough to matter."""
    layer = BatchRenorm(c, momentum=0.3, r_max=3.0, d_max=0.5, warmup_steps=1, ramp_steps=2,
                        d_ramp_steps=0, **options)
    return _affine(layer, c)


@needs_kernel
@pytest.mark.parametrize("shape", [(60, 100), (2, 3), (33, 7)])
def test_compiled_batch_renorm_equals_bnlabs_operations(monkeypatch, shape):
    """Five training passes through warm-up and the ramp, on batches whose statistics differ
    from the moving ones (so r and d are clipped and nonzero): outputs, gradients, the moving
    mean and sigma and the counter as bnlab's operation path (Ioffe 2017, Alg. 1)."""
    torch.manual_seed(8)
    c = shape[1]
    batches = [torch.randn(shape) * (1 + k) + k for k in range(5)]
    grads = [torch.randn(shape) for _ in range(5)]
    got, want, compiled, ops = _against_operations(
        monkeypatch, lambda: _renorm(c), batches, grads, "BatchRenormTrain", "batch_renorm_train")
    _assert_steps_close(got, want, 1e-5)
    for key, value in ops.state_dict().items():
        assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    assert compiled.num_batches_tracked.item() == 5
    assert not torch.equal(compiled.running_std, torch.ones(c))  # the moving sigma moved


@needs_kernel
def test_compiled_batch_renorm_corrects_with_r_and_d_as_the_paper_says(monkeypatch):
    """One pass after warm-up against Alg. 1 written out: y = gamma (x_hat r + d) + beta with
    r, d clipped from the moving statistics; dgamma = sum(dy (x_hat r + d)); dx treats r and d
    as constants (x_hat r + d's gradient through x_hat only)."""
    torch.manual_seed(9)
    layer = _renorm(5)
    layer.num_batches_tracked.fill_(3)  # past the ramps: r_max = 3, d_max = 0.5
    layer.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0]))
    layer.running_std.copy_(torch.tensor([1.0, 0.2, 8.0, 1.0, 0.5]))
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    x0, g = torch.randn(20, 5) * 2 + 1, torch.randn(20, 5)
    calls = _Calls(monkeypatch, "batch_renorm_train")
    [(y, dx, dgamma, dbeta)] = _train_steps(layer, [x0], [g])
    assert calls.count == 1
    x = x0.double().requires_grad_()
    mean, std = x.mean(0), (x.var(0, unbiased=False) + 1e-5).sqrt()
    r = (std / sigma).clamp(1 / 3, 3).detach()
    d = ((mean - mu) / sigma).clamp(-0.5, 0.5).detach()
    assert (r == 3).any() and (r == 1 / 3).any() and (d.abs() == 0.5).any()  # the clipping is tested
    x_hat = (x - mean) / std
    gamma, beta = layer.weight.detach().double(), layer.bias.detach().double()
    expected = gamma * (x_hat * r + d) + beta
    expected.backward(g.double())
    assert_close(y.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert_close(dx.double(), x.grad, rtol=1e-5, atol=1e-5)
    assert_close(dgamma.double(), (g.double() * (x_hat * r + d)).sum(0).detach(), rtol=1e-5, atol=1e-5)
    assert_close(dbeta.double(), g.double().sum(0), rtol=1e-5, atol=1e-5)
    assert_close(layer.running_mean.double(), mu.double() + 0.3 * (mean.detach() - mu.double()),
                 rtol=1e-6, atol=1e-6)
    assert_close(layer.running_std.double(), sigma.double() + 0.3 * (std.detach() - sigma.double()),
                 rtol=1e-6, atol=1e-6)


@needs_kernel
def test_compiled_batch_renorm_in_a_measurement_pass_leaves_its_state(monkeypatch):
    """Frozen statistics (the probes' mode) with autograd on: the operator runs, corrects with
    the moving statistics and updates neither them nor the counter."""
    from bnlab.norms import frozen_stats
    layer = _renorm(4)
    layer.num_batches_tracked.fill_(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    calls = _Calls(monkeypatch, "batch_renorm_train")
    with frozen_stats(layer):
        layer(torch.randn(10, 4) * 5).sum().backward()
    assert calls.count == 1
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@needs_kernel
@pytest.mark.parametrize("norm", ["gn", "brn"])
def test_double_backward_after_compiled_gn_and_brn_equals_their_operations(monkeypatch, norm):
    """Hessian-vector products through the compiled group norm and batch renorm (past warm-up,
    r and d active) equal those through bnlab's operations."""
    torch.manual_seed(10)
    x0, v = torch.randn(24, 12) * 2 + 1, torch.randn(24, 12)

    def make():
        if norm == "gn":
            return _affine(GroupNorm(12, groups=2), 12)
        layer = _renorm(12)
        layer.num_batches_tracked.fill_(3)
        layer.running_std.fill_(0.5)
        return layer

    def hvp(layer) -> tuple[torch.Tensor, ...]:
        x = x0.clone().requires_grad_()
        dx, dgamma = torch.autograd.grad((layer(x) ** 3).sum(), (x, layer.weight), create_graph=True)
        return torch.autograd.grad((dx * v).sum() + dgamma.square().sum(), (x, layer.weight))

    name = "group_norm" if norm == "gn" else "batch_renorm_train"
    calls = _Calls(monkeypatch, name)
    ours = hvp(make())
    assert calls.count == 1
    with monkeypatch.context() as patch:
        _torch_ops_only(patch)
        theirs = hvp(make())
    for a, b in zip(ours, theirs, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("norm", ["ln", "brn"])
def test_compiled_gn_and_brn_without_an_input_gradient_give_the_parameters_theirs(monkeypatch, norm):
    torch.manual_seed(11)
    make = (lambda: _affine(build_norm("ln", 8), 8)) if norm == "ln" else (lambda: _renorm(8))
    ours, ref = make(), make()
    x, g = torch.randn(16, 8) * 2, torch.randn(16, 8)
    ours(x).backward(g)
    with monkeypatch.context() as patch:
        _torch_ops_only(patch)
        ref(x).backward(g)
    assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_what_gn_and_brn_leave_to_the_operations(monkeypatch):
    """Conv inputs and inference (no autograd, or brn's eval mode) take the operations."""
    gn, brn = _Calls(monkeypatch, "group_norm"), _Calls(monkeypatch, "batch_renorm_train")
    GroupNorm(4, dims=4, groups=2)(torch.randn(3, 4, 2, 2))
    BatchRenorm(4, dims=4)(torch.randn(3, 4, 2, 2))
    with torch.no_grad():
        GroupNorm(4, groups=2)(torch.randn(8, 4))
        BatchRenorm(4)(torch.randn(8, 4))
    BatchRenorm(4).eval()(torch.randn(8, 4))
    assert gn.count == brn.count == 0
    GroupNorm(4, groups=2)(torch.randn(8, 4))
    BatchRenorm(4)(torch.randn(8, 4))
    assert gn.count == brn.count == 1


def _status_in_fresh_processes(tmp_path, processes: int = 1, **env: str) -> list[dict]:
    """kernel.status(), a BN layer's agreement with torch's and the cached libraries, from
    ``processes`` new processes started together with ``env`` (one dict each)."""
    code = ("import json, torch\n"
            "from bnlab.norms import kernel, build_norm\n"
            "x = torch.randn(20, 5) * 2 + 1\n"
            "ours, ref = build_norm('bn', 5), torch.nn.BatchNorm1d(5)\n"
            "same = torch.allclose(ours(x), ref(x), atol=1e-5)\n"
            "print(json.dumps({'status': kernel.status(), 'same': same,\n"
            "                  'cached': sorted(p.name for p in kernel._cache_dir().glob('*.so'))}))\n")
    full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
    started = [subprocess.Popen([sys.executable, "-c", code], env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    results = []
    for process in started:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err
        results.append(json.loads(out))
    return results


def test_without_a_compiler_bn_runs_as_operations_and_says_why(tmp_path):
    [broken] = _status_in_fresh_processes(tmp_path, CXX="false")
    assert broken["status"].startswith("unavailable (false failed")
    assert broken["same"] and broken["cached"] == []  # nothing half-built is left behind
    [missing] = _status_in_fresh_processes(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert missing["status"].startswith("unavailable (") and "no-such-compiler" in missing["status"]
    [off] = _status_in_fresh_processes(tmp_path, BNLAB_BN_KERNEL="off")
    assert off["status"] == "off (BNLAB_BN_KERNEL=off)" and off["same"]


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
def test_the_kernel_is_built_once_into_the_cache(tmp_path):
    """Two processes starting together (a sweep's jobs) share one build; a later one reuses it."""
    first = _status_in_fresh_processes(tmp_path, processes=2)
    assert all(r["status"] == "compiled" and r["same"] for r in first)
    [library] = first[1]["cached"]
    built = (tmp_path / "bnlab" / library).stat().st_mtime_ns
    [again] = _status_in_fresh_processes(tmp_path)
    assert again["cached"] == [library]
    assert (tmp_path / "bnlab" / library).stat().st_mtime_ns == built
