"""Normalization layers against torch's own layers or against their papers' equations."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from bnlab.config.norm_options import NORM_SCHEMAS
from bnlab.norms import (
    NORMS,
    Norm,
    build_norm,
    finish_training,
    frozen_stats,
    held_noise,
    norm_class,
    uses_batch_statistics,
)
from bnlab.norms.batchnorm import (
    BatchNorm,
    batch_norm_train,
    estimate_population_statistics,
)
from bnlab.norms.whitening import pca_whitening, zca_whitening

from helpers import REPO, compose, train_in_process

SHAPES = [(7, 13), (60, 100), (7, 13, 5, 5), (2, 3, 4, 6)]


def _randomize_affine(*layers: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = layers[0].weight.shape[0]
    weight, bias = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad


# ---------------------------------------------------------------- the registry
def _layer_defaults(cls: type) -> dict:
    """Every keyword default of the layer's constructor, through ``**options`` into its base's."""
    defaults = {}
    for klass in reversed(cls.__mro__):
        for method in (getattr(klass, "__init__", None), getattr(klass, "_init_noise", None)):
            if method is None or getattr(method, "__qualname__", "").split(".")[0] != klass.__name__:
                continue
            for p in inspect.signature(method).parameters.values():
                if p.default is not inspect.Parameter.empty and p.name != "dims":
                    defaults[p.name] = p.default
    return defaults


@pytest.mark.parametrize("name", sorted(NORMS))
def test_the_schema_is_the_one_place_of_a_norms_defaults(name):
    """Config defaults, constructor defaults and the config file's comments all say the same."""
    schema = {f.name: f.default for f in fields(NORM_SCHEMAS[name])}
    composed = OmegaConf.to_container(compose(f"norm={name}").norm)
    assert composed == {**schema, "name": name}  # the YAML sets no value of its own
    constructor = _layer_defaults(norm_class(name))
    options = {k: v for k, v in schema.items() if k not in ("name", "position", "sync")}
    assert {k: constructor[k] for k in options} == options
    # The YAML documents each option in a comment "#   key: value": the schema's value.
    text = (REPO / "configs" / "norm" / f"{name}.yaml").read_text()
    documented = dict(re.findall(r"^#   (\w+): (\S+)", text, re.MULTILINE))
    assert set(documented) == set(schema) - {"name"}
    for key, value in documented.items():
        assert yaml.safe_load(value) == schema[key], key


def _moved(layer: Norm, shape) -> torch.Tensor:
    """Train the layer's running statistics on a few batches, then return a test batch."""
    for _ in range(3):
        layer(torch.randn(shape) * 2 + 1)
    return torch.randn(shape) * 2 + 1


@pytest.mark.parametrize("name", sorted(NORMS))
def test_uses_batch_statistics_says_whether_train_and_eval_mode_differ(name):
    torch.manual_seed(30)
    options = {"group_size": 4} if "group_size" in NORM_SCHEMAS[name].__dataclass_fields__ else {}
    options |= {"mean_range": 0.0, "mean_jitter": 0.0, "std_low": 1.0, "std_high": 1.0,
                "std_jitter": 0.0} if name.startswith("noisy") else {}  # noise aside: the statistics only
    layer = build_norm(name, 8, 2, **options)
    x = _moved(layer, (32, 8))
    with frozen_stats(layer):
        train_mode = layer(x)
    layer.eval()
    differ = not torch.allclose(train_mode, layer(x), atol=1e-4)
    assert differ == type(layer).uses_batch_statistics
    assert uses_batch_statistics(nn.Sequential(nn.Linear(8, 8), layer)) == differ


@torch.no_grad()
def test_finish_training_runs_population_statistics_only_where_asked():
    torch.manual_seed(31)
    batches = [torch.randn(8, 2, 4, 4) * 2 + 1 for _ in range(3)]
    moving, population, reference = (_small_net(inference=i) for i in ("moving", "population", "moving"))
    for net in (population, reference):
        net.load_state_dict(moving.state_dict())
    stream = iter(batches)
    assert finish_training(moving, stream) == 0
    assert next(stream) is batches[0]  # nothing read when no layer asks
    assert finish_training(population, batches) == 3
    estimate_population_statistics(reference, batches)
    for ours, theirs in zip(population.modules(), reference.modules(), strict=True):
        if isinstance(ours, BatchNorm):
            assert_close(ours.running_var, theirs.running_var)
            assert_close(ours.running_mean, theirs.running_mean)
    assert not torch.equal(population[5].running_var, moving[5].running_var)


# ---------------------------------------------------------------- bn
IMPLS = ["torch", "scratch"]  # torch's kernel (the default) and the paper's equations (the reference)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_matches_torch_batchnorm(shape, impl):
    torch.manual_seed(0)
    c, dims = shape[1], len(shape)
    ours = build_norm("bn", c, dims, momentum=0.1, impl=impl)
    ref = (nn.BatchNorm1d if dims == 2 else nn.BatchNorm2d)(c, eps=1e-5, momentum=0.1)
    _randomize_affine(ours, ref)
    for _ in range(4):
        x = torch.randn(shape) * 3 + 2
        grad = torch.randn(shape)
        y, gx = _forward_backward(ours, x, grad)
        y_ref, gx_ref = _forward_backward(ref, x, grad)
        assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
        assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
        for layer in (ours, ref):
            layer.weight.grad = layer.bias.grad = None
    assert_close(ours.running_mean, ref.running_mean)
    assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4
    ours.eval()
    ref.eval()
    x = torch.randn(shape)
    assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bn_cumulative_average_matches_torch(impl):
    torch.manual_seed(1)
    ours, ref = BatchNorm(5, momentum=None, impl=impl), nn.BatchNorm1d(5, momentum=None)
    for _ in range(3):
        x = torch.randn(9, 5) + torch.arange(5.0)
        ours(x)
        ref(x)
    assert_close(ours.running_mean, ref.running_mean)
    assert_close(ours.running_var, ref.running_var)


def test_bn_is_accurate_for_inputs_with_a_large_mean():
    torch.manual_seed(2)
    x = torch.randn(60, 10, dtype=torch.float64) * 0.1 + 1000.0
    expected = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()
    # the reference's two-pass variance; torch's kernel (impl=torch) is torch's own business: it
    # reached 2.3e-3 here, once with several threads
    assert_close(BatchNorm(10, impl="scratch")(x.float()).double(), expected, rtol=0, atol=2e-3)


def test_bn_refuses_one_value_per_feature_like_torch():
    with pytest.raises(ValueError, match="more than 1 value"):
        nn.BatchNorm1d(4)(torch.randn(1, 4))
    for impl in IMPLS:
        with pytest.raises(ValueError, match="more than 1 value"):
            BatchNorm(4, impl=impl)(torch.randn(1, 4))


@pytest.mark.parametrize("shape", [(30, 16), (8, 16, 3, 3)])
def test_bn_compiles_as_one_graph_and_matches_eager(shape):
    """train.compile=true traces bnlab's BN whole (its forward and closed-form backward) with
    no graph break, and the compiled step equals the eager one, running estimates included."""
    from torch._dynamo.utils import counters

    from bnlab.norms import batchnorm

    torch._dynamo.reset()
    counters.clear()
    batchnorm._CONSTANTS.clear()  # as in a fresh process, where the compiled step runs first
    torch.manual_seed(3)
    eager, compiled = (BatchNorm(16, dims=len(shape), impl="scratch") for _ in range(2))
    x, grad = torch.randn(shape) * 2 + 1, torch.randn(shape)
    step = torch.compile(lambda layer, x: layer(x), fullgraph=True)
    x_c = x.clone().requires_grad_()
    y_c = step(compiled, x_c)
    y_c.backward(grad)
    gx_c = x_c.grad
    y, gx = _forward_backward(eager, x, grad)
    assert sum(counters["graph_break"].values()) == 0
    assert_close(y_c, y, rtol=1e-5, atol=1e-5)
    assert_close(gx_c, gx, rtol=1e-4, atol=1e-5)
    assert_close(compiled.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-5)
    assert_close(compiled.running_var, eager.running_var)
    assert compiled.num_batches_tracked.item() == 1


COMPILED_NORMS = [("brn", {"warmup_steps": 1, "ramp_steps": 0, "d_ramp_steps": 0}),
                  ("brn", {"warmup_steps": 1, "ramp_steps": 0, "d_ramp_steps": 0, "impl": "scratch"}),
                  ("ln", {}), ("gn", {}), ("noisy_bn", {}), ("zca", {}), ("iternorm", {}),
                  ("bn", {"ghost_batch": 15}),
                  ("brn", {"warmup_steps": 1, "ramp_steps": 0, "d_ramp_steps": 0, "ghost_batch": 15})]


@pytest.mark.parametrize(("name", "options"), COMPILED_NORMS)
def test_compiled_training_steps_equal_eager_ones(name, options):
    """Three training steps of a layer compiled as train.compile=true compiles them give the
    eager steps' outputs, input gradients and running statistics. brn leaves its warm-up after
    the first step, where r and d start to depend on the running statistics it updates."""
    torch._inductor.config.fallback_random = True  # as the trainer sets it
    torch.manual_seed(0)
    xs, grads = torch.randn(3, 60, 16) * 2 + 1, torch.randn(3, 60, 16)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(1)
        layer = build_norm(name, 16, 2, **options)
        forward = torch.compile(lambda x, layer=layer: layer(x)) if compiled else layer
        steps = []
        for x, grad in zip(xs, grads, strict=True):
            x = x.clone().requires_grad_()
            torch.manual_seed(2)  # noisy_bn's noise
            y = forward(x)
            y.backward(grad)
            steps.append((y.detach(), x.grad))
        results.append((steps, {k: v.clone() for k, v in layer.state_dict().items()}))
    (eager, eager_state), (compiled, compiled_state) = results
    for (y, gx), (y_c, gx_c) in zip(eager, compiled, strict=True):
        assert_close(y_c, y, rtol=1e-5, atol=1e-5)
        assert_close(gx_c, gx, rtol=1e-4, atol=1e-5)
    assert compiled_state.keys() == eager_state.keys()
    for key, value in eager_state.items():
        assert_close(compiled_state[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.2, None])
def test_bn_impl_torch_is_the_native_layer(momentum):
    """impl=torch steps exactly as torch.nn.BatchNorm2d: outputs, gradients and buffers, in
    train and eval mode, the cumulative average (momentum=None) included."""
    torch.manual_seed(0)
    layer = build_norm("bn", 6, 4, impl="torch", momentum=momentum, eps=1e-3)
    native = nn.BatchNorm2d(6, eps=1e-3, momentum=momentum)
    with torch.no_grad():
        for module in (layer, native):
            module.weight.copy_(torch.linspace(0.5, 2, 6))
            module.bias.copy_(torch.linspace(-1, 1, 6))
    for _ in range(3):
        x = (torch.randn(5, 6, 3, 3) * 3 + 1).requires_grad_()
        outs = [m(x) for m in (layer, native)]
        grads = [torch.autograd.grad((o * o).sum(), (x, m.weight))
                 for o, m in zip(outs, (layer, native), strict=True)]
        assert torch.equal(outs[0], outs[1])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert layer.state_dict().keys() == native.state_dict().keys()
    for key, value in native.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    layer.eval(), native.eval()
    x = torch.randn(4, 6, 3, 3)
    assert torch.equal(layer(x), native(x))


# ---------------------------------------------------------------- frozen statistics mode
STATEFUL = [
    ("bn", {}), ("bn", {"impl": "scratch"}), ("brn", {"warmup_steps": 0, "ramp_steps": 0}),
    ("brn", {"warmup_steps": 0, "ramp_steps": 0, "impl": "scratch"}),
    ("whiten", {"method": "zca", "group_size": 3}), ("whiten", {"method": "pca", "group_size": 3}),
    ("whiten", {"method": "iter", "group_size": 3}), ("noisy_bn", {}), ("lp", {}),
    ("bn", {"ghost_batch": 2}), ("bn", {"ghost_batch": 2, "impl": "scratch"}),
    ("brn", {"warmup_steps": 0, "ramp_steps": 0, "ghost_batch": 2}), ("noisy_bn", {"ghost_batch": 2}),
]


@pytest.mark.parametrize("name,options", STATEFUL)
@pytest.mark.parametrize("dims", [2, 4])
def test_frozen_mode_uses_batch_statistics_and_leaves_buffers_alone(name, options, dims):
    torch.manual_seed(3)
    layer = build_norm(name, 8, dims, **options)
    shape = (16, 8) if dims == 2 else (4, 8, 3, 3)
    layer(torch.randn(shape) * 2 + 1)  # one real step: buffers differ from their initial values
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape) * 2 + 1
    with frozen_stats(layer), held_noise(layer):
        frozen = layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with held_noise(layer):
        trained = layer(x)  # the same batch statistics, and now the buffers move
    assert_close(frozen, trained)
    assert any(not torch.equal(v, before[k]) for k, v in layer.state_dict().items())


# ---------------------------------------------------------------- double backward (Hessians)
# (N, C) and (N, C, H, W) with (C,) parameters; the batched launcher's (G, C, N) with (G, C)
@pytest.mark.parametrize("shape, dims, params", [((6, 4), (0,), (4,)), ((3, 2, 2, 3), (0, 2, 3), (2,)),
                                                 ((2, 3, 5), (2,), (2, 3))])
def test_bn_supports_double_backward(shape, dims, params):
    torch.manual_seed(20)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(params, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(params, dtype=torch.float64).requires_grad_()

    def bn(x, w, b):
        return batch_norm_train(x, w, b, 1e-5, dims)

    assert torch.autograd.gradcheck(bn, (x, w, b))
    assert torch.autograd.gradgradcheck(bn, (x, w, b))


@pytest.mark.parametrize("name,options", [
    ("bn", {"ghost_batch": 3}), ("bn", {"ghost_batch": 3, "impl": "scratch"}),
    ("lp", {"p": 1.0}), ("lp", {"p": 2.0}), ("lp", {"p": float("inf")})])
def test_ghost_batches_and_lp_support_double_backward(name, options):
    """Hessian-vector products (create_graph=True) go through them: gradgradcheck in float64."""
    torch.manual_seed(21)
    layer = build_norm(name, 3, 4, **options).double()
    x = (torch.randn(7, 3, 2, 1, dtype=torch.float64) * 2 + 1).requires_grad_()
    with frozen_stats(layer):
        assert torch.autograd.gradcheck(layer, (x,))
        assert torch.autograd.gradgradcheck(layer, (x,))


def _mlp(norm: nn.Module, norm2: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4, bias=False), norm, nn.Tanh(), nn.Linear(4, 3, bias=False),
                         norm2, nn.Tanh(), nn.Linear(3, 2)).double()


def _hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the loss's Hessian H with respect to all parameters, by double backward."""
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    return list(torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v, strict=True)), params))


@pytest.mark.parametrize("impl", IMPLS)
def test_bn_hessian_vector_products_equal_torchs(impl):
    torch.manual_seed(21)
    ours = _mlp(BatchNorm(4, impl=impl), BatchNorm(3, impl=impl))
    native = _mlp(nn.BatchNorm1d(4), nn.BatchNorm1d(3))
    native.load_state_dict(ours.state_dict())
    for m in (ours, native):
        _randomize_affine(m[1], seed=1)
        _randomize_affine(m[4], seed=2)
    x, y = torch.randn(16, 5, dtype=torch.float64) * 3 + 1, torch.randint(0, 2, (16,))
    v = [torch.randn_like(p) for p in ours.parameters()]
    expected = _hvp(native, x, y, v)
    for got, want in zip(_hvp(ours, x, y, v), expected, strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert max(h.abs().max() for h in expected) > 1e-3  # a Hessian worth comparing


def test_iternorm_supports_double_backward():
    torch.manual_seed(22)
    layer = build_norm("iternorm", 4, 2, group_size=None).double()
    x = (torch.randn(12, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradgradcheck(layer, (x,))


@pytest.mark.parametrize("name", ["zca", "pca"])
def test_eigendecomposition_whitening_refuses_double_backward(name):
    layer = build_norm(name, 4, 2, group_size=None).double()
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    loss = layer(x).square().mul(torch.arange(4.0, dtype=torch.float64)).sum()
    torch.autograd.grad(loss, x, retain_graph=True)  # first order works
    with pytest.raises(RuntimeError, match=f"{name}: norm={name} .* double backward .* norm=iternorm"):
        torch.autograd.grad(loss, x, create_graph=True)


WORLD = 2


def _sync_hvp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from bnlab.norms.sync import SyncBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, x, y, v = _sync_case(SyncBatchNorm(4), SyncBatchNorm(3))
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        params = list(model.parameters())
        loss = F.cross_entropy(model(x), y, reduction="sum")  # the replicas' losses add up
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v, strict=True)), params)
        torch.save({"grads": [g.detach() for g in grads], "hvp": list(hvp)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sync_case(norm: nn.Module, norm2: nn.Module):
    torch.manual_seed(23)
    model = _mlp(norm, norm2)
    _randomize_affine(model[1], seed=1)
    x, y = torch.randn(16, 5, dtype=torch.float64) * 3 + 1, torch.randint(0, 2, (16,))
    return model, x, y, [torch.randn_like(p) for p in model.parameters()]


def test_sync_bn_hessian_vector_products_equal_bn_on_the_full_batch(tmp_path):
    """Summed over the replicas, as data parallelism sums gradients: BN's HVP on the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_sync_hvp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, x, y, v = _sync_case(BatchNorm(4), BatchNorm(3))
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v, strict=True)), params)
    for k, (g, h) in enumerate(zip(grads, hvp, strict=True)):
        assert_close(sum(r["grads"][k] for r in ranks), g.detach(), rtol=1e-9, atol=1e-12)
        assert_close(sum(r["hvp"][k] for r in ranks), h, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- bn: population statistics (Alg. 2)
def _small_net(norm: str = "bn", **options) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False), build_norm(norm, 3, 4, **options), nn.Tanh(), nn.Flatten(),
        nn.Linear(12, 5, bias=False), build_norm(norm, 5, 2, **options), nn.Tanh(), nn.Linear(5, 2))


def _alg2_by_hand(net: nn.Sequential, batches: list[torch.Tensor], eps: float = 1e-5):
    """Ioffe & Szegedy's Alg. 2 written out for ``_small_net``: layer by layer, earlier ones frozen."""
    conv, bn1, lin = net[0], net[1], net[4]

    def stats(inputs, dims):
        m = inputs[0].numel() // inputs[0].shape[1]
        mean = torch.stack([h.mean(dims) for h in inputs]).mean(0)
        var = torch.stack([h.var(dims, unbiased=False) for h in inputs]).mean(0) * m / (m - 1)
        return mean, var

    h1 = [conv(x) for x in batches]
    mean1, var1 = stats(h1, (0, 2, 3))
    shape = (1, -1, 1, 1)
    a1 = [torch.tanh(bn1.weight.view(shape) * (h - mean1.view(shape)) / (var1.view(shape) + eps).sqrt()
                     + bn1.bias.view(shape)) for h in h1]
    h2 = [lin(a.flatten(1)) for a in a1]
    mean2, var2 = stats(h2, (0,))
    return [(mean1, var1), (mean2, var2)]


@torch.no_grad()
def test_population_statistics_follow_algorithm_2():
    torch.manual_seed(4)
    net = _small_net()
    for _ in range(5):  # move weights and running statistics away from their start
        net(torch.randn(10, 2, 4, 4))
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    batches = [(torch.randn(10, 2, 4, 4) * 2 + 1, torch.zeros(10)) for _ in range(6)]
    expected = _alg2_by_hand(net, [x for x, _ in batches])
    net.train()
    used = estimate_population_statistics(net, iter(batches), num_batches=4)
    assert used == 4
    expected4 = _alg2_by_hand(net, [x for x, _ in batches[:4]])
    assert not torch.allclose(expected[1][0], expected4[1][0])  # num_batches matters
    for layer, (mean, var) in zip((net[1], net[5]), expected4, strict=True):
        assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
    assert net.training  # the model's mode is restored


@torch.no_grad()
def test_population_statistics_are_the_same_for_the_torch_layer():
    torch.manual_seed(5)
    ours, native = _small_net(), _small_net(impl="torch")
    for a, b in zip(ours.parameters(), native.parameters(), strict=True):
        b.copy_(a)
    batches = [torch.randn(8, 2, 4, 4) for _ in range(3)]
    estimate_population_statistics(ours, batches)
    estimate_population_statistics(native, batches)
    assert_close(native[5].running_var, ours[5].running_var)
    assert_close(native[1].running_mean, ours[1].running_mean)


# ---------------------------------------------------------------- brn
def _brn(**options):
    defaults = {"momentum": 0.01, "r_max": 3.0, "d_max": 5.0, "warmup_steps": 0, "ramp_steps": 0,
                "d_ramp_steps": 0, "impl": "torch"}
    return build_norm("brn", 6, 2, **{**defaults, **options})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [{"r_max": 1.0, "d_max": 0.0}, {"warmup_steps": 100}])
def test_brn_without_renormalization_is_bn(options, impl):
    torch.manual_seed(6)
    brn, bn = _brn(**options, impl=impl), BatchNorm(6, impl=impl)
    _randomize_affine(brn, bn)
    with torch.no_grad():  # moving statistics far from the batch's: r, d would matter if allowed
        brn.running_mean.fill_(3.0)
        brn.running_std.fill_(0.1)
    x, grad = torch.randn(20, 6), torch.randn(20, 6)
    y, gx = _forward_backward(brn, x, grad)
    y_bn, gx_bn = _forward_backward(bn, x, grad)
    assert_close(y, y_bn, rtol=1e-5, atol=1e-5)
    assert_close(gx, gx_bn, rtol=1e-4, atol=1e-5)
    assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
    assert_close(brn.bias.grad, bn.bias.grad)


def _brn_by_the_paper(x, gamma, beta, mu, sigma, r_max, d_max, eps, stop_gradient=True):
    """Ioffe 2017, Alg. 1, for (N, C) inputs."""
    mu_b = x.mean(0)
    sigma_b = ((x - mu_b).square().mean(0) + eps).sqrt()
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mu_b - mu) / sigma, -d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    return gamma * ((x - mu_b) / sigma_b * r + d) + beta, mu_b, sigma_b


@pytest.mark.parametrize("impl", IMPLS)
def test_brn_follows_the_paper(impl):
    """Both paths against Alg. 1 written out: torch's kernel with r and d folded into the affine
    parameters, and the equations as they stand."""
    torch.manual_seed(7)
    layer = _brn(r_max=1.5, d_max=0.5, momentum=0.05, impl=impl).double()
    _randomize_affine(layer)
    mu = torch.linspace(-1, 1, 6, dtype=torch.float64)
    sigma = torch.linspace(0.3, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(mu)
        layer.running_std.copy_(sigma)
    x = torch.randn(30, 6, dtype=torch.float64) * 1.2 + 0.2
    grad = torch.randn(30, 6, dtype=torch.float64)
    y, gx = _forward_backward(layer, x, grad)

    xr = x.clone().requires_grad_()
    gamma = layer.weight.detach().clone().requires_grad_()
    beta = layer.bias.detach().clone().requires_grad_()
    y_ref, mu_b, sigma_b = _brn_by_the_paper(xr, gamma, beta, mu, sigma, 1.5, 0.5, 1e-5)
    ratio = sigma_b / sigma
    assert (ratio > 1.5).any() and (ratio < 1 / 1.5).any()  # both clips are active
    y_ref.backward(grad)
    assert_close(y, y_ref.detach())
    assert_close(gx, xr.grad)
    assert_close(layer.weight.grad, gamma.grad)
    assert_close(layer.bias.grad, beta.grad)

    xg = x.clone().requires_grad_()  # with gradients through r and d the result would differ
    _brn_by_the_paper(xg, gamma, beta, mu, sigma, 1.5, 0.5, 1e-5, stop_gradient=False)[0].backward(grad)
    assert not torch.allclose(xg.grad, gx)

    assert_close(layer.running_mean, mu + 0.05 * (mu_b.detach() - mu))
    assert_close(layer.running_std, sigma + 0.05 * (sigma_b.detach() - sigma))
    layer.eval()
    x_eval = torch.randn(5, 6, dtype=torch.float64)
    expected = gamma.detach() * (x_eval - layer.running_mean) / layer.running_std + beta.detach()
    assert_close(layer(x_eval), expected)


def test_brn_schedule():
    layer = _brn(r_max=3.0, d_max=5.0, warmup_steps=100, ramp_steps=200, d_ramp_steps=100)

    def expected(t):
        r_frac = min(max((t - 100) / 200, 0.0), 1.0)
        d_frac = min(max((t - 100) / 100, 0.0), 1.0)
        return 1 + 2 * r_frac, 5 * d_frac

    for t in (0, 99, 100, 150, 200, 299, 300, 1000):
        r_max, d_max = layer.limits(torch.tensor(t))
        assert (r_max.item(), d_max.item()) == pytest.approx(expected(t)), t
    assert expected(150) == (1.5, 2.5)  # the ramps differ: d is halfway while r is a quarter in
    jump = _brn(r_max=3.0, d_max=5.0, warmup_steps=10, ramp_steps=0, d_ramp_steps=0)
    assert [jump.limits(torch.tensor(t))[0].item() for t in (9, 10)] == [1.0, 3.0]


def test_brn_schedule_counts_training_steps_only():
    layer = _brn(warmup_steps=2, ramp_steps=4, d_ramp_steps=2)
    x = torch.randn(8, 6)
    for _ in range(4):
        layer(x)
    with frozen_stats(layer):
        layer(x)
    layer.eval()
    layer(x)
    assert layer.num_batches_tracked.item() == 4
    # the 4th training step was t=3: r_max = 1 + 2 * 1/4, d_max = 5 * 1/2
    assert layer.log_scalars() == pytest.approx({"r_max": 1.5, "d_max": 2.5})


def test_brn_defaults_follow_the_paper_schedule():
    layer = build_norm("brn", 4, 2)
    r_max, d_max = layer.limits(torch.tensor(40_000))
    assert (r_max.item(), d_max.item()) == (3.0, 5.0)
    r_max, d_max = layer.limits(torch.tensor(25_000))
    assert d_max.item() == 5.0 and r_max.item() < 3.0
    assert layer.limits(torch.tensor(4_999))[0].item() == 1.0


# ---------------------------------------------------------------- ln, gn
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(7, 13), (4, 6, 5, 5)])
def test_ln_matches_torch_layer_norm(shape, impl):
    torch.manual_seed(8)
    layer = build_norm("ln", shape[1], len(shape), impl=impl)
    _randomize_affine(layer)
    x = torch.randn(shape) * 2 + 1
    affine_shape = (-1,) if len(shape) == 2 else (-1, 1, 1)
    expected = (F.layer_norm(x, shape[1:], eps=1e-5) * layer.weight.view(affine_shape)
                + layer.bias.view(affine_shape))
    assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    if len(shape) == 2:  # per feature = torch's elementwise affine
        assert_close(layer(x), F.layer_norm(x, shape[1:], layer.weight, layer.bias, 1e-5),
                     rtol=1e-5, atol=1e-5)
    layer.eval()
    assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,groups", [((7, 12), 3), ((4, 6, 5, 5), 2), ((3, 8, 2, 3), 8)])
def test_gn_matches_torch_group_norm(shape, groups, impl):
    torch.manual_seed(9)
    layer = build_norm("gn", shape[1], len(shape), groups=groups, impl=impl)
    _randomize_affine(layer)
    x, grad = torch.randn(shape) * 2 + 1, torch.randn(shape)
    y, gx = _forward_backward(layer, x, grad)
    xr = x.clone().requires_grad_()
    F.group_norm(xr, groups, layer.weight, layer.bias, 1e-5).backward(grad)
    assert_close(y, F.group_norm(x, groups, layer.weight, layer.bias, 1e-5), rtol=1e-5, atol=1e-5)
    assert_close(gx, xr.grad, rtol=1e-4, atol=1e-5)


def test_gn_refuses_groups_that_do_not_divide_the_features():
    with pytest.raises(ValueError, match="num_features=6 is not divisible by groups=4"):
        build_norm("gn", 6, 4, groups=4)


# ---------------------------------------------------------------- whiten
def _correlated(n: int, c: int, seed: int = 10, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=gen, dtype=dtype)
    return torch.randn(n, c, generator=gen, dtype=dtype) @ mixing + 2.0


def _covariance(y: torch.Tensor) -> torch.Tensor:
    yc = y - y.mean(0)
    return yc.mT @ yc / y.shape[0]


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whiten_gives_identity_covariance_per_group(method):
    x = _correlated(256, 10)
    layer = build_norm("whiten", 10, 2, method=method, group_size=4)
    cov = _covariance(layer(x).detach())
    for group in (slice(0, 4), slice(4, 8), slice(8, 10)):
        assert_close(cov[group, group], torch.eye(group.stop - group.start), atol=1e-3, rtol=0)
    assert cov[0:4, 4:8].abs().max() > 0.05  # groups are whitened separately, not jointly


def test_whiten_whole_layer_and_conv_channels():
    x = _correlated(256, 10)
    cov = _covariance(build_norm("whiten", 10, 2, group_size=None)(x).detach())
    assert_close(cov, torch.eye(10), atol=1e-3, rtol=0)
    images = _correlated(64 * 9, 5).view(64, 3, 3, 5).permute(0, 3, 1, 2)  # channels correlated
    y = build_norm("whiten", 5, 4, group_size=None)(images).detach()
    assert_close(_covariance(y.permute(0, 2, 3, 1).reshape(-1, 5)), torch.eye(5), atol=1e-3, rtol=0)


def test_whiten_remainder_group_is_whitened_on_its_own():
    x = _correlated(128, 10)
    layer = build_norm("whiten", 10, 2, group_size=4)
    assert layer.running_whitening.shape == (2, 4, 4)
    assert layer.running_whitening_rest.shape == (1, 2, 2)
    y = layer(x)
    for group in (slice(0, 4), slice(4, 8), slice(8, 10)):
        alone = build_norm("whiten", group.stop - group.start, 2, group_size=None)
        assert_close(y[:, group], alone(x[:, group]), rtol=1e-4, atol=1e-4)
    even = build_norm("whiten", 8, 2, group_size=4)
    assert even.running_whitening_rest.numel() == 0


def test_zca_output_is_the_whitened_output_closest_to_its_input():
    x = _correlated(256, 6)
    centered = x - x.mean(0)
    y_zca = build_norm("whiten", 6, 2, method="zca", group_size=None)(x).detach()
    y_pca = build_norm("whiten", 6, 2, method="pca", group_size=None)(x).detach()
    distance = (y_zca - centered).norm()
    assert distance < (y_pca - centered).norm()
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):  # every other whitened output is a rotation of the ZCA one
        rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
        assert distance < (y_zca @ rotation - centered).norm()


def test_iter_norm_is_newtons_iteration_on_the_spectrum():
    """IterNorm with T steps maps each eigenvalue l of Sigma_N to l * p_T(l)^2 <= 1, not to 1."""
    x = _correlated(200, 5, dtype=torch.float64)
    layer = build_norm("whiten", 5, 2, method="iter", iters=5, group_size=None).double()
    y = layer(x).detach()
    centered = x - x.mean(0)
    sigma = centered.mT @ centered / 200 + 1e-5 * torch.eye(5, dtype=torch.float64)
    lam, u = torch.linalg.eigh(sigma)
    lam_n = lam / lam.sum()
    p = torch.ones_like(lam_n)
    for _ in range(5):
        p = 0.5 * (3 * p - p**3 * lam_n)
    w = u @ torch.diag(p / lam.sum().sqrt()) @ u.mT
    assert_close(y, centered @ w.mT)
    out = torch.linalg.eigvalsh(_covariance(y))
    assert (out <= 1 + 1e-6).all() and (out >= lam_n - 1e-9).all()
    assert out.min() < 0.9  # five iterations do not whiten this input completely
    converged = build_norm("whiten", 5, 2, method="iter", iters=60, group_size=None).double()
    assert_close(_covariance(converged(x).detach()), torch.eye(5, dtype=torch.float64),
                 atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["zca", "pca", "iter"])
def test_whiten_eval_uses_running_estimates(method):
    x = _correlated(64, 7)
    layer = build_norm("whiten", 7, 2, method=method, group_size=3, momentum=1.0)
    _randomize_affine(layer)
    y_train = layer(x).detach()
    layer.eval()
    assert_close(layer(x), y_train, rtol=1e-4, atol=1e-4)
    assert_close(layer(x[:5]), y_train[:5], rtol=1e-4, atol=1e-4)  # no batch statistics in eval


def test_whiten_running_estimates_are_moving_averages():
    x = _correlated(64, 5)
    layer = build_norm("whiten", 5, 2, method="zca", group_size=3, momentum=0.1)
    layer(x)
    centered = (x - x.mean(0)).double()
    assert_close(layer.running_mean, 0.1 * x.mean(0))
    for buffer, group in ((layer.running_whitening[0], slice(0, 3)),
                          (layer.running_whitening_rest[0], slice(3, 5))):
        g = centered[:, group]
        sigma = g.mT @ g / 64 + 1e-5 * torch.eye(g.shape[1], dtype=torch.float64)
        lam, u = torch.linalg.eigh(sigma)
        inv_sqrt = u @ torch.diag(lam.rsqrt()) @ u.mT
        expected = 0.9 * torch.eye(g.shape[1]) + 0.1 * inv_sqrt.float()
        assert_close(buffer, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["zca", "pca", "iter"])
def test_whiten_gradients_match_finite_differences(method):
    x = _correlated(8, 5, dtype=torch.float64).requires_grad_()
    layer = build_norm("whiten", 5, 2, method=method, group_size=3).double()
    _randomize_affine(layer)
    layer.double()
    with frozen_stats(layer):
        assert torch.autograd.gradcheck(layer, (x,))


def _hadamard_features() -> torch.Tensor:
    """8 samples of 7 features with a covariance exactly the identity: all eigenvalues equal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h[:, 1:]


def test_zca_gradient_is_exact_at_repeated_eigenvalues():
    x = _hadamard_features().requires_grad_()
    assert_close(_covariance(x.detach()), torch.eye(7, dtype=torch.float64))
    layer = build_norm("whiten", 7, 2, method="zca", group_size=None).double()
    with frozen_stats(layer):
        assert torch.autograd.gradcheck(layer, (x,))
    identity = torch.eye(4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: zca_whitening(a @ a.mT, 1e-5), (identity,))


@pytest.mark.parametrize("method", ["zca", "pca", "iter"])
@pytest.mark.parametrize("case", ["duplicated", "triplicated", "equal_eigenvalues", "near_equal"])
def test_whiten_backward_is_finite_at_degenerate_covariances(method, case):
    gen = torch.Generator().manual_seed(12)
    if case == "equal_eigenvalues":
        x = _hadamard_features().float()
    elif case == "near_equal":
        x = _hadamard_features().float() + 1e-4 * torch.randn(8, 7, generator=gen)
    else:
        x = torch.randn(16, 7, generator=gen)
        x[:, 1] = x[:, 0]
        if case == "triplicated":
            x[:, 2] = x[:, 0]
    x.requires_grad_()
    layer = build_norm("whiten", 7, 2, method=method, group_size=None)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=gen))
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("name,method", [("zca", "zca"), ("pca", "pca"), ("iternorm", "iter")])
@pytest.mark.parametrize("dims", [2, 4])
def test_each_whitening_option_is_whiten_with_that_method(name, method, dims):
    torch.manual_seed(40)
    ours, whiten = build_norm(name, 7, dims, group_size=3), build_norm("whiten", 7, dims, method=method,
                                                                       group_size=3)
    _randomize_affine(ours, whiten)
    shape = (40, 7) if dims == 2 else (6, 7, 3, 3)
    for _ in range(2):  # two training steps: outputs, gradients and running estimates agree
        x, grad = torch.randn(shape) * 2 + 1, torch.randn(shape)
        (y1, g1), (y2, g2) = _forward_backward(ours, x, grad), _forward_backward(whiten, x, grad)
        assert torch.equal(y1, y2) and torch.equal(g1, g2)
    for (key, a), (_, b) in zip(ours.state_dict().items(), whiten.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    ours.eval()
    whiten.eval()
    assert torch.equal(ours(x), whiten(x))
    # The config: whiten's keys less `method` (and `iters` and `fix_signs`, which only iter and
    # pca use).
    composed, reference = compose(f"norm={name}").norm, compose("norm=whiten", f"norm.method={method}").norm
    own = {"iters": "iter", "fix_signs": "pca"}
    expected = {k: v for k, v in reference.items() if k != "method" and own.get(k, method) == method}
    assert dict(composed) == {**expected, "name": name}


def test_pca_keeps_the_eigenvectors_signs_unless_asked_to_fix_them():
    """Huang et al. 2018, Sec. 3.1: PCA whitening's W = Lambda^-1/2 D^T changes with the
    eigenvectors, signs included. The default keeps torch.linalg.eigh's; fix_signs=True makes
    each eigenvector's largest entry positive; the two differ by the signs of W's rows only."""
    torch.manual_seed(41)
    a = torch.randn(3, 5, 5, dtype=torch.float64)
    sigma = a @ a.mT + torch.eye(5, dtype=torch.float64)
    lam, u = torch.linalg.eigh(sigma)
    expected = (lam.flip(-1) + 1e-5).rsqrt().unsqueeze(-1) * u.flip(-1).mT  # diag(lambda^-1/2) U^T
    with torch.no_grad():
        kept, fixed = pca_whitening(sigma, 1e-5), pca_whitening(sigma, 1e-5, fix_signs=True)
    assert_close(kept, expected)
    peaks = fixed.gather(-1, fixed.abs().argmax(-1, keepdim=True))
    assert (peaks > 0).all()
    assert_close(fixed.abs(), kept.abs())
    assert ((fixed * kept).sum(-1) < 0).any()  # of 15 eigenvectors, eigh returned some the other way
    # The option reaches the layer, and its batch's whitening matrix.
    x = torch.randn(64, 4) * torch.tensor([3.0, 2.0, 1.0, 0.5]) + 1
    for fix in (False, True):
        layer = build_norm("pca", 4, 2, group_size=None, fix_signs=fix, momentum=1.0)
        layer(x)
        centered = (x - x.mean(0)).double()
        w = pca_whitening(centered.T @ centered / 64, 1e-5, fix_signs=fix).float()
        assert_close(layer.running_whitening[0], w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- noisy_bn
NOISE = {"mean_range": 0.5, "std_low": 1.0, "std_high": 1.25, "mean_jitter": 0.1, "std_jitter": 0.1}


def test_noisy_bn_is_bn_then_noise_in_training_only():
    torch.manual_seed(13)
    layer, bn = build_norm("noisy_bn", 8, 2, **NOISE), BatchNorm(8)
    x = torch.randn(500, 8) * 3 + 1
    y = layer(x)
    s, m = layer.noise
    assert_close(y, s * bn(x) + m)
    # One step, unit j: m ~ U(mu_j - 0.1, mu_j + 0.1), s ~ N(sigma_j, 0.1^2), per sample.
    spread = m.max(0).values - m.min(0).values
    assert (spread <= 2 * 0.1 + 1e-6).all() and (spread > 2 * 0.1 * 0.95).all()
    mu = (m.max(0).values + m.min(0).values) / 2
    assert (mu.abs() <= 0.5 + 0.1 / 100).all()
    assert_close(m.mean(0), mu, atol=0.015, rtol=0)
    assert ((1.0 - 0.015 < s.mean(0)) & (s.mean(0) < 1.25 + 0.015)).all()
    assert_close(s.std(0), torch.full((8,), 0.1), rtol=0.15, atol=0)
    layer.eval()
    bn.eval()
    assert_close(layer(x), bn(x))


def _ks_uniform(values: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample ``values`` and U(low, high)."""
    v = values.double().sort().values
    cdf = ((v - low) / (high - low)).clamp(0, 1)
    n = len(v)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


@pytest.mark.parametrize("shape", [(40, 2000), (4, 2000, 3, 3)])
def test_noisy_bn_draws_the_noise_per_unit(shape):
    """Alg. 1 (Santurkar et al., App. A.2.1): every unit j draws its own mu_j ~ U(-0.5, 0.5) and
    sigma_j ~ U(1, 1.25) each step; for conv, H and W count as batch. In one draw, the units'
    noise means spread as U(-0.5, 0.5) and their scales as U(1, 1.25): one draw per layer would
    put every unit at the same mu and sigma (KS distance ~0.5)."""
    torch.manual_seed(14)
    layer = build_norm("noisy_bn", shape[1], len(shape), **NOISE)
    s, m = layer.draw_noise(torch.empty(shape))
    per_unit = [d for d in range(len(shape)) if d != 1]
    mu_j, sigma_j = m.mean(per_unit), s.mean(per_unit)  # the jitter averages out over 40 values
    # 2,000 units: the 1% critical value of the KS distance is 1.63 / sqrt(2000) = 0.036
    assert _ks_uniform(mu_j, -0.5, 0.5) < 0.036
    assert _ks_uniform(sigma_j, 1.0, 1.25) < 0.036 + 0.015 / 0.25  # scales blurred by N(0, 0.1^2) / sqrt(40)
    assert mu_j.var().item() == pytest.approx(0.5**2 / 3, rel=0.1)  # U(-a, a) has variance a^2/3
    # Within a unit, every sample (and position) draws from that unit's own distribution.
    spread = m.amax(per_unit) - m.amin(per_unit)
    assert (spread <= 2 * 0.1 + 1e-6).all()
    # Time-varying: the next step draws the units anew.
    s2, m2 = layer.draw_noise(torch.empty(shape))
    assert torch.corrcoef(torch.stack([m.mean(per_unit), m2.mean(per_unit)]))[0, 1].abs() < 0.1


def test_noisy_bn_hold_noise_reuses_the_sample_and_spares_the_rng():
    torch.manual_seed(15)
    layer = build_norm("noisy_bn", 6, 4, **NOISE)
    x, smaller = torch.randn(4, 6, 3, 3), torch.randn(2, 6, 3, 3)
    first = layer(x)
    assert not torch.equal(layer(x), first)  # a new draw every training step
    noise = layer.noise
    rng = torch.get_rng_state()
    with held_noise(layer), frozen_stats(layer):
        held = layer(x)
        assert torch.equal(layer(x), held)
        assert layer.noise[0] is noise[0]
        other = layer(smaller)  # another shape: a new sample, held from now on
        assert torch.equal(layer(smaller), other)
    with frozen_stats(layer):
        layer(x)  # a measurement's own draw
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("impl", ["scratch", "torch"])
@torch.no_grad()
def test_noisy_bn_population_statistics_are_those_of_the_noise_free_network(impl):
    """Alg. 2 on the inference network: no noise anywhere, so plain BN with the same weights."""
    torch.manual_seed(24)
    noisy = _small_net("noisy_bn", impl=impl, inference="population", **NOISE)
    for _ in range(20):  # training steps: the moving averages are collected under the noise
        noisy(torch.randn(10, 2, 4, 4) * 2 + 1)
    plain = _small_net("bn", impl=impl, inference="population")
    plain.load_state_dict(noisy.state_dict())
    moving = [tuple(t.clone() for t in m.running()) for m in noisy.modules() if hasattr(m, "running")]
    batches = [torch.randn(10, 2, 4, 4) * 2 + 1 for _ in range(5)]
    assert finish_training(noisy, batches) == finish_training(plain, batches) == 5
    layers = [(a, b) for a, b in zip(noisy.modules(), plain.modules(), strict=True) if hasattr(a, "running")]
    assert len(layers) == 2
    for ours, reference in layers:
        for got, want in zip(ours.running(), reference.running(), strict=True):
            assert_close(got, want, rtol=1e-6, atol=1e-7)
    # Layer 2's moving averages saw layer 1's noise (a <- s a + m): the population's do not.
    # (The noise's per-unit mean shifts average out over the steps; its scales do not.)
    assert not torch.allclose(layers[1][0].running()[1], moving[1][1], rtol=0.05)
    noisy.eval()
    plain.eval()
    x = torch.randn(6, 2, 4, 4)
    assert_close(noisy(x), plain(x))


def test_noisy_none_is_noisy_bns_noise_on_the_raw_activations():
    """The control of Santurkar et al.'s Sec. 2.1: the same noise, no normalization. Drawn from
    the same RNG state, noisy_none's noise is noisy_bn's sample for sample; eval mode is y = x."""
    x = torch.randn(50, 6) * 3 + 1
    torch.manual_seed(16)
    noisy_bn = build_norm("noisy_bn", 6, 2, **NOISE)
    noisy_bn(x)
    torch.manual_seed(16)
    control = build_norm("noisy_none", 6, 2, **NOISE)
    y = control(x)
    s, m = control.noise
    assert torch.equal(s, noisy_bn.noise[0]) and torch.equal(m, noisy_bn.noise[1])
    assert_close(y, s * x + m)
    assert not type(control).replaces_bias  # nothing learned replaces the layer's bias
    assert not list(control.parameters()) and not list(control.buffers())
    control.eval()
    assert torch.equal(control(x), x)


# ---------------------------------------------------------------- lp
def _lp_by_hand(x: torch.Tensor, p: float, weight, bias, eps: float = 1e-5):
    """Santurkar et al.'s Sec. 3.3 as bnlab reads it, written out per feature: centre by the batch
    mean, divide by the average l_p norm of the activations before centring."""
    dims = [d for d in range(x.dim()) if d != 1]
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, m)
    mean = flat.mean(1)
    if p == float("inf"):
        scale = flat.abs().max(1).values
    else:
        scale = (flat.abs() ** p).mean(1) ** (1 / p)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = weight.view(shape) * (x - mean.view(shape)) / (scale.view(shape) + eps) + bias.view(shape)
    return y, mean, scale, dims


@pytest.mark.parametrize("p", [1.0, 2.0, float("inf")])
@pytest.mark.parametrize("shape", [(30, 6), (5, 6, 3, 4)])
def test_lp_normalization_follows_its_equation(p, shape):
    torch.manual_seed(50)
    layer = build_norm("lp", 6, len(shape), p=p, momentum=0.2)
    _randomize_affine(layer)
    running_mean, running_scale = torch.zeros(6), torch.ones(6)
    for _ in range(3):  # training steps: outputs, gradients and the moving averages
        x = (torch.randn(shape) * 2 + 1).requires_grad_()
        grad = torch.randn(shape)
        y = layer(x)
        y.backward(grad)
        x_ref = x.detach().clone().requires_grad_()
        y_ref, mean, scale, _ = _lp_by_hand(x_ref, p, layer.weight.detach(), layer.bias.detach())
        y_ref.backward(grad)
        assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)  # through mu_B and s_B, as BN
        running_mean = 0.8 * running_mean + 0.2 * mean
        running_scale = 0.8 * running_scale + 0.2 * scale.detach()
        assert_close(layer.running_mean, running_mean.detach())
        assert_close(layer.running_scale, running_scale)
    layer.eval()
    x = torch.randn(shape)
    shape_c = [1, -1] + [1] * (len(shape) - 2)
    expected = (layer.weight.view(shape_c) * (x - running_mean.view(shape_c))
                / (running_scale.view(shape_c) + 1e-5) + layer.bias.view(shape_c))
    assert_close(layer(x), expected.detach())


@pytest.mark.parametrize("name,p", [("l1", 1.0), ("l2", 2.0), ("linf", float("inf"))])
def test_each_lp_option_is_lp_with_that_p(name, p):
    torch.manual_seed(52)
    ours, lp = build_norm(name, 5, 4), build_norm("lp", 5, 4, p=p)
    _randomize_affine(ours, lp)
    x, grad = torch.randn(4, 5, 2, 3) * 2 + 1, torch.randn(4, 5, 2, 3)
    (y1, g1), (y2, g2) = _forward_backward(ours, x, grad), _forward_backward(lp, x, grad)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    for (key, a), (_, b) in zip(ours.state_dict().items(), lp.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    composed, reference = compose(f"norm={name}").norm, compose("norm=lp", f"norm.p={p}").norm
    assert dict(composed) == {**{k: v for k, v in reference.items() if k != "p"}, "name": name}


def test_lp_fixes_the_mean_but_not_the_spread():
    """The paper's point (Sec. 3.3): the first moment is fixed as BN fixes it, the second is not.
    With p = 2 the scale is the root mean square of the uncentred activations, so the output's
    variance is var / (var + mu^2); with a zero batch mean it is BN (up to eps's place)."""
    torch.manual_seed(51)
    x = torch.randn(400, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([0.0, 3.0, -1.0])
    y = build_norm("lp", 3, 2, p=2.0)(x).detach()
    assert_close(y.mean(0), torch.zeros(3), atol=1e-6, rtol=0)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    assert_close(y.var(0, unbiased=False), var / (var + mean**2), rtol=1e-4, atol=0)
    centred = x - x.mean(0)
    bn = BatchNorm(3)
    assert_close(build_norm("lp", 3, 2, p=2.0)(centred), bn(centred), rtol=1e-4, atol=1e-4)
    # p = inf: the largest magnitude maps to at most 1 + |mu| / max|x| in size
    y_inf = build_norm("lp", 3, 2, p=float("inf"))(x).detach()
    assert (y_inf.abs().amax(0) <= 1 + mean.abs() / x.abs().amax(0) + 1e-5).all()
    assert y_inf.var(0).max() < 0.5  # far from BN's unit variance


# ---------------------------------------------------------------- ghost batches
GHOST = [  # (norm, options): the layers with a normalization batch
    ("bn", {}), ("bn", {"impl": "scratch"}), ("bn", {"momentum": None}),
    ("bn", {"impl": "scratch", "momentum": None}),
]


@pytest.mark.parametrize("name,options", GHOST)
@pytest.mark.parametrize("shape,k", [((12, 5), 3), ((14, 5), 4), ((6, 5, 3, 2), 2), ((7, 5, 2, 2), 3)])
def test_ghost_batches_are_bn_on_each_group_separately(name, options, shape, k):
    """norm.ghost_batch=K: the same outputs, input gradients, parameter gradients and running
    statistics as torch's own BatchNorm run on each group of K consecutive examples in turn
    (Hoffer et al.'s ghost batches; a remainder group when K does not divide N), over two steps."""
    torch.manual_seed(60)
    momentum = options.get("momentum", 0.1)
    layer = build_norm(name, 5, len(shape), ghost_batch=k, **options)
    torch_bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(5, momentum=momentum)
    _randomize_affine(layer, torch_bn)
    for _ in range(2):
        x, grad = torch.randn(shape) * 2 + 1, torch.randn(shape)
        y, dx = _forward_backward(layer, x, grad)
        x_ref = x.clone().requires_grad_()
        y_ref = torch.cat([torch_bn(group) for group in x_ref.split(k)])
        y_ref.backward(grad)
        assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5)
        assert_close(dx, x_ref.grad, rtol=1e-4, atol=1e-5)
        assert_close(layer.weight.grad, torch_bn.weight.grad, rtol=1e-4, atol=1e-5)
        assert_close(layer.bias.grad, torch_bn.bias.grad, rtol=1e-4, atol=1e-5)
        assert_close(layer.running_mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
        assert_close(layer.running_var, torch_bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(layer.num_batches_tracked) == 2  # training steps, not groups
    layer.eval()
    torch_bn.eval()
    x = torch.randn(shape)
    assert_close(layer(x), torch_bn(x).detach(), rtol=1e-5, atol=1e-5)


def test_ghost_batches_of_noisy_bn_are_those_of_bn():
    torch.manual_seed(61)
    noisy = build_norm("noisy_bn", 4, 2, ghost_batch=5, **NOISE)
    bn = build_norm("bn", 4, 2, ghost_batch=5)
    x = torch.randn(20, 4) * 2 + 1
    y = noisy(x)
    s, m = noisy.noise
    assert_close(y, s * bn(x) + m)
    assert_close(noisy.running_var, bn.running_var)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(12, 5), (14, 5), (6, 5, 2, 3)])
def test_ghost_batches_of_brn_are_micro_batches(impl, shape):
    """Ioffe 2017, Sec. 4.2: each group of K examples is renormalized with its own mu_B, sigma_B,
    r and d against the moving averages of before the step (Alg. 1 on the group alone); the
    moving averages then take one update per group, in order; the schedule counts the step."""
    torch.manual_seed(62)
    k, options = 4, {"warmup_steps": 0, "ramp_steps": 0, "d_ramp_steps": 0, "momentum": 0.1, "impl": impl}
    layer = build_norm("brn", 5, len(shape), ghost_batch=k, **options)
    _randomize_affine(layer)
    with torch.no_grad():  # moving averages away from the batches' statistics: r, d are clipped
        layer.running_mean.copy_(torch.linspace(-1, 2, 5))
        layer.running_std.copy_(torch.linspace(0.2, 3, 5))
    single = build_norm("brn", 5, len(shape), **options)  # one group at a time, from the same state
    single.load_state_dict(layer.state_dict())
    x, grad = torch.randn(shape) * 2 + 1, torch.randn(shape)
    y, dx = _forward_backward(layer, x, grad)
    mean, std = single.running_mean.clone(), single.running_std.clone()
    for rows, group in zip(torch.arange(shape[0]).split(k), x.split(k), strict=True):
        with frozen_stats(single):  # the averages of before the step
            y_ref, dx_ref = _forward_backward(single, group, grad[rows])
        assert_close(y[rows], y_ref, rtol=1e-5, atol=1e-5)
        assert_close(dx[rows], dx_ref, rtol=1e-4, atol=1e-5)
        dims = [d for d in range(group.dim()) if d != 1]
        mean = 0.9 * mean + 0.1 * group.mean(dims)
        std = 0.9 * std + 0.1 * (group.var(dims, unbiased=False) + 1e-5).sqrt()
    assert_close(layer.running_mean, mean)
    assert_close(layer.running_std, std)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["none", "ln", "gn"])
def test_ghost_batch_changes_nothing_where_no_sample_sees_another(name):
    torch.manual_seed(63)
    x = torch.randn(8, 4, 3, 3)
    assert torch.equal(build_norm(name, 4, 4, ghost_batch=2)(x), build_norm(name, 4, 4)(x))


@pytest.mark.parametrize("overrides,error", [
    (["norm=bn", "norm.ghost_batch=7"], "norm.ghost_batch=7 is not valid: expected null or a divisor of"),
    (["norm=brn", "norm.ghost_batch=7"], "norm.ghost_batch=7 is not valid"),
    (["norm=noisy_bn", "norm.ghost_batch=7"], "norm.ghost_batch=7 is not valid"),
    (["norm=bn", "norm.ghost_batch=1"], "norm.ghost_batch=1 is not valid: expected null (the whole batch)"),
    (["norm=bn", "norm.ghost_batch=4", "norm.sync=true"],
     "norm.ghost_batch=4 is not valid: expected null with norm.sync=true"),
    (["norm=lp", "norm.p=3"], "norm.p=3.0 is not valid: expected 1, 2 or inf"),
    (["norm=bn", "norm.ghost_batch=6"], None), (["norm=lp", "norm.p=inf"], None),
])
def test_norm_keys_are_checked_before_training(overrides, error):
    from bnlab.config.schema import validate
    from bnlab.errors import UserError

    cfg = compose("train.batch_size=60", *overrides)
    if error is None:
        validate(cfg)
        return
    with pytest.raises(UserError) as info:
        validate(cfg)
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


@torch.no_grad()
def test_population_statistics_from_grouped_batches_estimate_the_within_batch_variance():
    """inference=population under data.sampler=grouped: Alg. 2's m/(m-1) mean_B var_B is unbiased
    for i.i.d. batches only. From batches that each hold one cluster it estimates the variance
    within a batch, not the population's: the clusters' spread (here 3^2 = 9) is left out."""
    torch.manual_seed(64)
    layer = BatchNorm(1, inference="population")
    net = nn.Sequential(layer)
    centres = torch.tensor([-3.0, 3.0])
    grouped = [centres[i % 2] + torch.randn(50, 1) for i in range(40)]
    iid = [centres[torch.randint(0, 2, (50, 1))] + torch.randn(50, 1) for _ in range(40)]
    estimate_population_statistics(net, grouped)
    within = layer.running_var.item()
    estimate_population_statistics(net, iid)
    population = layer.running_var.item()
    assert within == pytest.approx(1.0, abs=0.1)
    assert population == pytest.approx(1.0 + 9.0, rel=0.1)


# ---------------------------------------------------------------- end to end
END_TO_END = [
    ("bn", []), ("bn", ["norm.impl=scratch"]), ("bn", ["norm.inference=population"]),
    ("brn", ["norm.momentum=0.1", "norm.warmup_steps=10", "norm.ramp_steps=10",
             "norm.d_ramp_steps=5"]),
    ("ln", []), ("gn", ["norm.groups=2"]), ("whiten", []), ("whiten", ["norm.method=iter"]),
    ("whiten", ["norm.method=pca", "norm.group_size=4"]), ("zca", []), ("noisy_bn", []),
    ("noisy_bn", ["norm.inference=population"]), ("noisy_none", []), ("lp", []), ("lp", ["norm.p=inf"]),
    ("bn", ["norm.ghost_batch=10"]), ("brn", ["norm.ghost_batch=4", "norm.warmup_steps=10"]),
]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("name,extra", END_TO_END)
def test_every_variant_trains_on_digits(tmp_path, name, extra, model):
    status = train_in_process(tmp_path, f"norm={name}", f"model={model}", "data=digits",
                              "train.steps=60", "train.eval_every=60", "probe=off", "activation=relu",
                              *extra)  # one evaluation: eval_every=auto would make 20 of 60 steps
    assert status == "completed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["test/acc"] > 0.3  # chance is 0.1


def test_brn_schedule_is_logged_by_the_trainer(tmp_path):
    import csv

    status = train_in_process(tmp_path, "norm=brn", "data=digits", "train.steps=30", "probe=off",
                              "train.log_every=10", "norm.warmup_steps=10", "norm.ramp_steps=10",
                              "norm.d_ramp_steps=5")
    assert status == "completed"
    rows = list(csv.DictReader((tmp_path / "scalars.csv").open()))
    logged = {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows if r["tag"].startswith("norm/")}
    # step s used the limits of t = s - 1 completed steps: warm-up for t < 10, then the ramps
    assert logged[(10, "norm/r_max")] == 1.0 and logged[(10, "norm/d_max")] == 0.0
    assert logged[(20, "norm/r_max")] == pytest.approx(1 + 2 * 9 / 10)
    assert logged[(20, "norm/d_max")] == 5.0
    assert logged[(30, "norm/r_max")] == 3.0
