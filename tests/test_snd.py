"""Stochastic normalization disturbance (bnlab.probes.snd): the estimator's definition, the batches it
draws, a network's disturbance against a direct loop over batches with the norms written out, and
its known orderings (no batch statistics: 0; PCA above ZCA, ZCA growing with the group size)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from bnlab.config.schema import validate
from bnlab.errors import UserError
from bnlab.models import build_model
from bnlab.probes.activations import Prober
from bnlab.probes.snd import batch_plan, disturbance, layer_disturbances

from helpers import compose

CPU = torch.device("cpu")


def test_disturbance_is_the_mean_distance_from_the_mean_output():
    outputs = torch.randn(7, 3, 2)  # 7 batches; a (3, 2) output per batch, flattened
    mean = outputs.double().mean(0)
    direct = sum((outputs[i].double() - mean).square().sum().sqrt().item() for i in range(7)) / 7
    assert disturbance(outputs).item() == pytest.approx(direct, rel=1e-12)
    assert disturbance(outputs[:1].expand(5, 3, 2)).item() == 0.0  # the same output in every batch


def test_batch_plan_holds_the_sample_at_row_0_and_distinct_others():
    plan = batch_plan(50, 12, samples=4, draws=6, generator=torch.Generator().manual_seed(0))
    assert plan.shape == (4, 6, 12)
    samples = plan[:, 0, 0]
    assert len(set(samples.tolist())) == 4 and torch.all(plan[:, :, 0] == samples[:, None])
    for i in range(4):
        for j in range(6):
            rows = plan[i, j].tolist()
            assert len(set(rows)) == 12 and all(0 <= r < 50 for r in rows)  # x once, no repeats
        assert len({tuple(plan[i, j, 1:].tolist()) for j in range(6)}) == 6  # other batches each time
    with pytest.raises(ValueError, match="pool"):
        batch_plan(10, 11, 1, 2, torch.Generator())


def network(digits, *overrides):
    cfg = compose("data=digits", "activation=tanh", *overrides)
    torch.manual_seed(0)
    return build_model(cfg, digits.shape, digits.num_classes)


def bn(x, norm):
    return F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, 1e-5)


def zca(x, norm):
    """Decorrelated BN (Huang et al. 2018) written out for one group: gamma Sigma^-1/2 (x - mu) + beta."""
    centred = (x - x.mean(0)).double()
    sigma = centred.T @ centred / len(x) + norm.eps * torch.eye(x.shape[1], dtype=torch.float64)
    lam, u = torch.linalg.eigh(sigma)
    whitened = (centred @ u @ torch.diag(lam.rsqrt()) @ u.T).float()
    return whitened * norm.weight + norm.bias


def direct_snd(model, pool, plan, normalize) -> list[float]:
    """The definition, one batch at a time, each layer written out: snd/layerK."""
    samples, draws, _ = plan.shape
    per_layer = defaultdict(list)
    for i in range(samples):
        outputs = defaultdict(list)
        for j in range(draws):
            h = pool[plan[i, j]].flatten(1)
            for k, block in enumerate(model.blocks):
                normed = normalize(block.layer(h), block.norm)
                outputs[k].append(normed[0].double())
                h = torch.tanh(normed)
        for k, rows in outputs.items():
            f = torch.stack(rows)
            per_layer[k].append((f - f.mean(0)).norm(dim=1).mean().item())
    return [sum(v) / len(v) for _, v in sorted(per_layer.items())]


@pytest.mark.parametrize("norm,normalize", [("bn", bn), ("zca", zca)])
def test_a_networks_disturbance_matches_a_direct_loop_over_batches(digits, norm, normalize):
    model = network(digits, f"norm={norm}", "model.widths=[16,16]")
    pool = digits.train.x[:100]
    plan = batch_plan(100, 10, samples=3, draws=5, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    measured = layer_disturbances(model, pool, plan)
    with torch.no_grad():
        expected = direct_snd(model, pool, plan, normalize)
    assert measured.tolist() == pytest.approx(expected, rel=1e-4)
    assert min(expected) > 0.05  # batches of 10: a sample's output does depend on its batch
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("norm", ["none", "ln", "gn"])
def test_norms_without_batch_statistics_have_no_disturbance(digits, norm):
    model = network(digits, f"norm={norm}", "model.widths=[16,16]")
    plan = batch_plan(100, 10, samples=3, draws=5, generator=torch.Generator().manual_seed(1))
    assert layer_disturbances(model, digits.train.x[:100], plan).tolist() == [0.0, 0.0]


def test_noisy_bn_is_measured_with_its_noise_held(digits):
    """Only the batch may change a sample's output: noisy BN's draw is one sample for all batches,
    so with batches that are the same set of rows, the disturbance is 0."""
    model = network(digits, "norm=noisy_bn", "model.widths=[16,16]")
    plan = batch_plan(100, 10, samples=2, draws=4, generator=torch.Generator().manual_seed(1))
    plan[:, :, 1:] = plan[:, :1, 1:]  # every draw of a sample: the same other rows, in order
    assert layer_disturbances(model, digits.train.x[:100], plan).tolist() == [0.0, 0.0]


def test_pca_disturbs_most_and_zca_more_with_larger_groups(digits):
    """Huang et al. 2019 (IterNorm), Sec. 3: full whitening disturbs more than group-wise, PCA
    (stochastic axis swapping) most. Layer 1 (the digits' 64 pixels -> 32 units), batches of 48."""
    plan = batch_plan(600, 48, samples=4, draws=8, generator=torch.Generator().manual_seed(2))
    pool = digits.train.x[:600]
    snd = {}
    for name, overrides in (("bn", ["norm=bn"]), ("zca8", ["norm=zca", "norm.group_size=8"]),
                            ("zca32", ["norm=zca", "norm.group_size=32"]),
                            ("pca8", ["norm=pca", "norm.group_size=8"])):
        model = network(digits, *overrides, "model.widths=[32]")
        snd[name] = layer_disturbances(model, pool, plan)[0].item()
    assert snd["bn"] < snd["zca8"] < snd["zca32"] < snd["pca8"], snd


def test_the_probe_logs_snd_when_due_and_refuses_batches_it_cannot_draw(digits):
    cfg = compose("data=digits", "model.widths=[16,16,16]", "norm=bn", "probe.batch_size=100",
                  "probe.every=10", "probe.snd_every=20", "train.batch_size=16")
    torch.manual_seed(0)
    model = build_model(cfg, digits.shape, digits.num_classes)
    prober = Prober(cfg, model, digits, CPU)

    class Sink:
        values: dict = defaultdict(dict)

        def scalars(self, step, values):
            self.values[step].update(values)

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    sink = Sink()
    for step in range(0, 41, 10):
        prober.probe(step, sink)
    assert [s for s in sink.values if "snd/layer1" in sink.values[s]] == [0, 20, 40]
    assert prober.snd_plan.shape == (4, 8, 16)  # snd_samples x snd_draws x the training batch
    expected = layer_disturbances(model, prober.x, prober.snd_plan).tolist()
    assert [sink.values[40][f"snd/layer{k}"] for k in (1, 2, 3)] == pytest.approx(expected, rel=1e-12)
    for bad, key in ((["probe.snd_samples=200"], "probe.snd_samples"),
                     (["train.batch_size=128"], "probe.snd_every")):
        with pytest.raises(UserError, match=key):
            validate(compose("data=digits", "probe.batch_size=100", "probe.snd_every=20", *bad))
