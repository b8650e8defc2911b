"""BN's compiled operator (bnlab.norms.kernel) against torch's layer and bnlab's own
torch-operation path, and its fallback when it cannot be built."""

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

from bnlab.norms import kernel
from bnlab.norms.batchnorm import BatchNorm

HAS_COMPILER = shutil.which(os.environ.get("CXX") or "c++") is not None
needs_kernel = pytest.mark.skipif(kernel.status() != "compiled", reason=f"BN kernel {kernel.status()}")


COMPILED_NODE = "torch::autograd::CppNode<(anonymous namespace)::BatchNormTrain>"


def _torch_ops_only(monkeypatch) -> None:
    """BN as torch operations, as without a compiler."""
    monkeypatch.setattr(kernel, "serves", lambda *args: False)


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
