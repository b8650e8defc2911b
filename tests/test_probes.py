"""Probes (bnlab.probes.activations) and gradient-based ICS (bnlab.probes.ics): formulas, and that
measuring never changes training."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.data import load_dataset, make_batch_stream
from bnlab.models import ACTIVATIONS, Block, Net, build_model
from bnlab.norms import Norm, build_norm
from bnlab.probes.activations import (
    BATCH_NOISE_SEED_OFFSET,
    Prober,
    batch_noise,
    drift,
    feature_moments,
    saturated_fraction,
    saturation_bounds,
    settling_step,
    unit_percentiles,
)
from bnlab.probes.ics import gradient_ics

from helpers import compose, train_in_process

CPU = torch.device("cpu")


class Recorder:
    """Stands in for bnlab.rundir.writer.Recorder: keeps what the prober logs."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, float]] = defaultdict(dict)
        self.calls: list[int] = []
        self.histograms: list[tuple[str, int]] = []
        self.layouts: list[dict] = []

    def scalars(self, step, values):
        self.calls.append(step)
        self.values[step].update(values)

    def histogram(self, tag, values, step):
        self.histograms.append((tag, step))

    def layout(self, layout):
        self.layouts.append(layout)


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = defaultdict(dict)
    with open(run / "scalars.csv") as f:
        for row in csv.DictReader(f):
            table[row["tag"]][int(row["step"])] = float(row["value"])
    return table


def make_prober(digits, *overrides: str) -> tuple[Prober, Net]:
    cfg = compose("data=digits", "probe.batch_size=200", *overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, digits.shape, digits.num_classes)
    return Prober(cfg, model, digits, CPU), model


# ---------------------------------------------------------------- pure statistics
@pytest.mark.parametrize("shape", [(50, 7), (6, 5, 4, 3)])
def test_feature_moments_are_per_feature_mean_and_biased_variance(shape):
    x = torch.randn(*shape) * 3 + 10
    mean, var = feature_moments(x)
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    # float32 arithmetic, float64 reference: float32's tolerance
    torch.testing.assert_close(mean, x.double().mean(dims), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, x.double().var(dims, unbiased=False), rtol=1e-5, atol=1e-5)
    # Several batches stacked on a leading dim: each batch's own moments.
    stacked = torch.stack([x, 2 * x - 1, x + 5])
    means, variances = feature_moments(stacked, batched=True)
    assert means.shape == variances.shape == (3, shape[1])
    for b in range(3):
        torch.testing.assert_close(means[b], stacked[b].double().mean(dims), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(variances[b], stacked[b].double().var(dims, unbiased=False),
                                   rtol=1e-5, atol=1e-4)


def test_drift_matches_the_definition():
    mean, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    ref_mean, ref_var = torch.tensor([0.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.0])
    eps = 1e-5
    shifts = [(m - r) / math.sqrt(rv + eps) for m, r, rv in zip(mean, ref_mean, ref_var, strict=True)]
    scales = [0.5 * math.log((v + eps) / (rv + eps)) for v, rv in zip(var, ref_var, strict=True)]
    expected_mean = math.sqrt(sum(s * s for s in shifts) / 3)
    expected_var = math.sqrt(sum(s * s for s in scales) / 3)
    mean_drift, var_drift = drift(mean, var, ref_mean, ref_var)
    assert mean_drift.item() == pytest.approx(expected_mean, rel=1e-6)
    assert var_drift.item() == pytest.approx(expected_var, rel=1e-6)
    # Against itself (drift0 at the first probe) both are exactly 0.
    assert drift(mean, var, mean, var)[0].item() == 0.0
    assert drift(mean, var, mean, var)[1].item() == 0.0


def test_drift_broadcasts_over_references_and_points():
    mean, var = torch.randn(3, 8), torch.rand(3, 8) + 0.1
    refs_mean, refs_var = torch.randn(2, 3, 8), torch.rand(2, 3, 8) + 0.1
    mean_drift, var_drift = drift(mean, var, refs_mean, refs_var)
    assert mean_drift.shape == (2, 3)
    for r in range(2):
        for p in range(3):
            one = drift(mean[p], var[p], refs_mean[r, p], refs_var[r, p])
            torch.testing.assert_close(mean_drift[r, p], one[0])
            torch.testing.assert_close(var_drift[r, p], one[1])


@pytest.mark.parametrize("shape", [(101, 4), (9, 4, 5, 5)])
def test_unit_percentiles_match_numpy(shape):
    x = torch.randn(*shape)
    unit = 2
    values = x[:, unit].reshape(-1).numpy()  # a conv channel: all of N, H, W
    expected = np.percentile(values, [15, 50, 85])
    np.testing.assert_allclose(unit_percentiles(x, unit).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_saturation_is_where_the_derivative_is_below_a_tenth_of_its_maximum(name):
    x = torch.linspace(-8, 8, 160_001, dtype=torch.float64, requires_grad=True)
    ACTIVATIONS[name]()(x).sum().backward()
    derivative = x.grad
    expected = (derivative < 0.1 * derivative.max()).double().mean().item()
    got = saturated_fraction(x.detach(), saturation_bounds(name)).item()
    assert got == pytest.approx(expected, abs=3 / x.numel())  # a grid point at each boundary
    if name in ("relu", "leaky_relu"):
        assert got == pytest.approx(0.5, abs=1e-4)
    if name == "identity":
        assert got == 0.0


@pytest.mark.parametrize("bounds", [(-1.0, 2.0), (-1.5, 1.5), (0.5, math.inf), (-math.inf, math.inf)])
def test_saturated_fraction_counts_the_entries_outside_the_bounds(bounds):
    x = torch.randn(300, 7) * 2
    x[0, :4] = torch.tensor(bounds[:1] * 2 + bounds[1:] * 2)  # values on a bound are not outside
    lo, hi = bounds
    expected = sum(1 for v in x.flatten().tolist() if v < lo or v > hi) / x.numel()
    assert saturated_fraction(x, bounds).item() == expected


def direct_batch_noise(chunks: list[torch.Tensor], reference: torch.Tensor,
                       eps: float = 1e-5) -> tuple[float, float]:
    """Batch noise by the definition, one batch and one feature at a time, in float64: each
    batch's moments against those of ``reference``."""
    shifts, scales = [], []
    for j in range(reference.shape[1]):
        whole = reference[:, j].double().reshape(-1)
        mu, var = whole.mean().item(), whole.var(unbiased=False).item()
        for chunk in chunks:
            part = chunk[:, j].double().reshape(-1)
            mu_c, var_c = part.mean().item(), part.var(unbiased=False).item()
            shifts.append((mu_c - mu) / math.sqrt(var + eps))
            scales.append(math.log(math.sqrt(var_c + eps) / math.sqrt(var + eps)))
    return (math.sqrt(sum(v * v for v in shifts) / len(shifts)),
            math.sqrt(sum(v * v for v in scales) / len(scales)))


def noise_of(chunks: list[torch.Tensor], reference: torch.Tensor) -> list[float]:
    stats = [feature_moments(c) for c in chunks]
    mean, var = feature_moments(reference)
    noise = batch_noise(torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]), mean, var)
    return [t.item() for t in noise]


@pytest.mark.parametrize("shape,chunk", [((100, 6), 16), ((30, 4, 3, 3), 7)])
def test_batch_noise_matches_the_definition(shape, chunk):
    scale = torch.linspace(0.5, 3, shape[1]).view(1, -1, *[1] * (len(shape) - 2))
    reference = torch.randn(*shape) * scale + 2
    chunks = [torch.randn(chunk, *shape[1:]) * scale * 1.3 + 2.2 for _ in range(5)]
    assert noise_of(chunks, reference) == pytest.approx(direct_batch_noise(chunks, reference), rel=1e-5)


def test_batch_noise_vanishes_for_large_chunks_and_is_large_for_chunks_of_two():
    torch.manual_seed(0)
    x = torch.randn(4096, 16) * 2 + 1
    noise = {size: noise_of(list(x.split(size)), x) for size in (2, 8, 64, 512, 2048, 4096)}
    assert noise[4096] == [0.0, 0.0]  # one chunk: the whole batch
    for kind in (0, 1):  # the mean noise, then the std noise
        values = [noise[c][kind] for c in sorted(noise)]
        assert values == sorted(values, reverse=True), values  # shrinks as chunks grow
    # Gaussian units: the chunk mean strays by ~1/sqrt(B) of a std, log sigma by ~1/sqrt(2B).
    assert noise[2][0] == pytest.approx(1 / math.sqrt(2), rel=0.1)
    assert noise[64][0] == pytest.approx(1 / 8, rel=0.1)
    assert noise[2][1] > 0.5 and noise[2048][1] < 0.05


# ---------------------------------------------------------------- probes in a run
def test_bn_standardizes_the_norm_point_at_the_first_probe(tmp_path, digits_overrides):
    tables = {}
    for norm in ("bn", "none"):
        run = tmp_path / norm
        assert train_in_process(run, *digits_overrides, f"norm={norm}", "train.steps=20") == "completed"
        tables[norm] = read_scalars(run)
    bn, none = tables["bn"], tables["none"]
    for k in (1, 2, 3):
        # Batch statistics of the probe batch itself: mean 0, variance var / (var + eps).
        assert abs(bn[f"act/layer{k}/norm/mean"][0]) < 1e-6
        assert bn[f"act/layer{k}/norm/var"][0] == pytest.approx(1.0, abs=2e-3)
        # Without a norm the point is the raw layer output, far from unit variance.
        assert abs(none[f"act/layer{k}/norm/var"][0] - 1.0) > 0.3
        assert none[f"act/layer{k}/norm/var"][0] == none[f"act/layer{k}/pre/var"][0]
        assert bn[f"drift0/layer{k}/norm/mean"][0] == 0.0
        assert f"drift/layer{k}/norm/mean" not in bn or 0 not in bn[f"drift/layer{k}/norm/mean"]
        assert 20 in bn[f"drift/layer{k}/norm/mean"]
    # Train-mode test accuracy only where train and eval mode differ.
    assert 20 in bn["test/acc_train_mode"] and "test/acc_train_mode" not in none


def test_probe_logs_the_direct_computation_on_its_batch(digits):
    prober, model = make_prober(digits, "norm=bn", "activation=tanh", "probe.unit=3")
    recorder = Recorder()
    prober.probe(0, recorder)
    with torch.no_grad():
        model.train()
        h = prober.x.flatten(1)
        logged = recorder.values[0]
        for k, block in enumerate(model.blocks, start=1):
            pre = block.layer(h)
            normed = F.batch_norm(pre, None, None, block.norm.weight, block.norm.bias, True, 0.0, 1e-5)
            h = torch.tanh(normed)
            for point, t in (("pre", pre), ("norm", normed), ("act", h)):
                assert logged[f"act/layer{k}/{point}/mean"] == pytest.approx(
                    t.mean(0).mean().item(), abs=1e-6)
                assert logged[f"act/layer{k}/{point}/var"] == pytest.approx(
                    t.var(0, unbiased=False).mean().item(), rel=1e-5)
            p = np.percentile(normed[:, 3].numpy(), [15, 50, 85])
            # float32: this BN and F.batch_norm round differently, ~1e-6 per layer
            assert [logged[f"pct/layer{k}/p{q}"] for q in (15, 50, 85)] == pytest.approx(p, rel=1e-4)
            t = math.atanh(math.sqrt(0.9))
            assert logged[f"sat/layer{k}"] == pytest.approx((normed.abs() > t).float().mean().item())
    assert recorder.calls == [0]  # one call per probe


def test_eval_view_logs_the_inference_network_under_infer(digits):
    prober, model = make_prober(digits, "norm=bn", "activation=tanh", "probe.mode=eval",
                                "train.batch_size=50")
    with torch.no_grad():  # running statistics far from the probe batch's own
        for block in model.blocks:
            block.norm.running_mean.uniform_(-1, 1)
            block.norm.running_var.uniform_(0.5, 3)
    recorder = Recorder()
    prober.probe(0, recorder)
    logged = recorder.values[0]
    assert all(tag.startswith("infer/") for tag in logged)  # eval only: no train-mode tags
    # No batch statistics in the inference network: no batch noise. Step 0 is before its running
    # averages settled: no reference yet, so no drift0.
    assert not any(tag.startswith(("infer/batchnoise/", "infer/drift0/")) for tag in logged)
    with torch.no_grad():
        h = prober.x.flatten(1)
        for k, block in enumerate(model.blocks, start=1):
            pre = block.layer(h)
            norm = block.norm
            normed = F.batch_norm(pre, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                  False, 0.0, 1e-5)
            h = torch.tanh(normed)
            for point, t in (("pre", pre), ("norm", normed), ("act", h)):
                assert logged[f"infer/act/layer{k}/{point}/mean"] == pytest.approx(
                    t.mean(0).mean().item(), abs=1e-5)
                assert logged[f"infer/act/layer{k}/{point}/var"] == pytest.approx(
                    t.var(0, unbiased=False).mean().item(), rel=1e-4)
            p = np.percentile(normed[:, 0].numpy(), [15, 50, 85])
            assert [logged[f"infer/pct/layer{k}/p{q}"] for q in (15, 50, 85)] == pytest.approx(p, rel=1e-4)
            t = math.atanh(math.sqrt(0.9))
            assert logged[f"infer/sat/layer{k}"] == pytest.approx((normed.abs() > t).float().mean().item())
            # Not standardized: the running statistics are not the probe batch's.
            assert abs(logged[f"infer/act/layer{k}/norm/var"] - 1) > 0.05


def test_both_views_log_what_each_mode_logs_alone_with_their_own_references(digits):
    recorders = {mode: Recorder() for mode in ("train", "eval", "both")}
    for mode, recorder in recorders.items():
        prober, model = make_prober(digits, "norm=bn", f"probe.mode={mode}")
        for step in range(3):
            prober.probe(step, recorder)
            with torch.no_grad():  # a stand-in for training: weights and running statistics move
                torch.manual_seed(step)
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
                for block in model.blocks:
                    block.norm.running_mean.add_(0.1)
    train, infer, both = (recorders[m].values for m in ("train", "eval", "both"))
    for step in range(3):
        assert both[step] == {**train[step], **infer[step]}
        assert not set(train[step]) & set(infer[step])
    # The views see different networks: BN in train mode is standardized, in eval mode not.
    assert infer[2]["infer/drift/layer2/norm/mean"] > 10 * train[2]["drift/layer2/norm/mean"]
    assert "infer/drift/layer1/pre/mean" not in infer[0] and "infer/drift/layer1/pre/mean" in infer[1]


def norm_inputs_by_hand(model: Net, x: torch.Tensor, norm_first: bool, group: int) -> list[torch.Tensor]:
    """Each layer's norm input for the batch x through the train-mode BN network, written out:
    every layer normalizes each group of ``group`` rows with its own statistics (F.batch_norm),
    so noise compounds."""
    h, inputs = x.flatten(1), []
    for block in model.blocks:
        pre = block.layer(h)
        inputs.append(pre if norm_first else torch.tanh(pre))
        norm = block.norm
        normed = torch.cat([F.batch_norm(part, None, None, norm.weight, norm.bias, True, 0.0, 1e-5)
                            for part in inputs[-1].split(group)])
        h = torch.tanh(normed) if norm_first else normed
    return inputs


@pytest.mark.parametrize("position,ghost", [("before_act", None), ("after_act", None), ("before_act", 8)])
def test_batch_noise_is_each_training_batch_through_the_network_with_its_own_statistics(digits, position,
                                                                                         ghost):
    extra = [f"norm.ghost_batch={ghost}"] if ghost else []
    prober, model = make_prober(digits, "norm=bn", "activation=tanh", f"norm.position={position}",
                                "train.batch_size=32", *extra)
    cfg = compose("data=digits", "train.batch_size=32")
    stream = make_batch_stream(digits.train, 32, cfg.seed + BATCH_NOISE_SEED_OFFSET, cfg.data, augment=False)
    assert len(prober.chunks) == 200 // 32
    for chunk in prober.chunks:  # the training sampler's batches, from their own seed
        assert torch.equal(chunk, next(stream)[0])
    recorder = Recorder()
    prober.probe(0, recorder)
    logged = recorder.values[0]
    norm_first, group = position == "before_act", ghost or 32
    with torch.no_grad():
        # The probe batch's own pass (ghost batches too: the layer cuts any batch into groups of K).
        reference = norm_inputs_by_hand(model, prober.x, norm_first, ghost or len(prober.x))
        per_chunk = [norm_inputs_by_hand(model, chunk, norm_first, group) for chunk in prober.chunks]
    for k in (1, 2, 3):
        # With ghost batches, each group of K rows is one normalization's batch.
        groups = [part for inputs in per_chunk for part in inputs[k - 1].split(group)]
        expected = direct_batch_noise(groups, reference[k - 1])
        assert [logged[f"batchnoise/layer{k}/mean"], logged[f"batchnoise/layer{k}/std"]] == pytest.approx(
            expected, rel=1e-4)
    # Batches of B stray by ~1/sqrt(B) of a standard deviation in their means: 0.18 at 32, 0.35 at 8.
    assert 0.6 / math.sqrt(group) < logged["batchnoise/layer1/mean"] < 1.6 / math.sqrt(group)
    # A training batch larger than the probe batch: no chunk to measure, nothing logged.
    prober, _ = make_prober(digits, "train.batch_size=300")
    prober.probe(0, recorder := Recorder())
    assert not any(tag.startswith("batchnoise/") for tag in recorder.values[0])
    assert "act/layer1/norm/mean" in recorder.values[0]


def test_batch_noise_batches_are_drawn_as_the_grouped_sampler_draws(digits):
    overrides = ["data.sampler=grouped", "data.labels_per_batch=4", "train.batch_size=32"]
    prober, _ = make_prober(digits, *overrides)
    cfg = compose("data=digits", *overrides)
    stream = make_batch_stream(digits.train, 32, cfg.seed + BATCH_NOISE_SEED_OFFSET, cfg.data, augment=False)
    for chunk in prober.chunks:
        x, y = next(stream)
        assert torch.equal(chunk, x)
        assert sorted(torch.bincount(y).tolist(), reverse=True)[:5] == [8, 8, 8, 8, 0]  # 4 labels x 8


def test_probe_changes_no_running_statistics_rng_or_mode(digits):
    prober, model = make_prober(digits, "norm=bn")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    prober.probe(0, Recorder())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all(block.taps is None for block in model.blocks)


def test_drift_and_drift0_against_first_and_previous_probe(digits):
    prober, model = make_prober(digits, "norm=none", "activation=relu")
    recorder = Recorder()
    stats = []
    for step in range(3):
        prober.probe(step, recorder)
        with torch.no_grad():
            taps = {}
            model.blocks[1].taps = taps
            model(prober.x)
            model.blocks[1].taps = None
            stats.append(feature_moments(taps["act"]))
            for p in model.parameters():  # a stand-in for training
                p.add_(0.05 * torch.randn_like(p))
    assert "drift/layer2/act/mean" not in recorder.values[0]
    for step, ref, kind in ((1, 0, "drift"), (2, 1, "drift"), (2, 0, "drift0"), (1, 0, "drift0")):
        mean_drift, var_drift = drift(*stats[step], *stats[ref])
        assert recorder.values[step][f"{kind}/layer2/act/mean"] == pytest.approx(mean_drift.item())
        assert recorder.values[step][f"{kind}/layer2/act/var"] == pytest.approx(var_drift.item())


@pytest.mark.parametrize("overrides,step", [(["norm=bn"], 30), (["norm=bn", "norm.momentum=0.05"], 60),
                                            (["norm=brn"], 300), (["norm=ln"], 0), (["norm=none"], 0)])
def test_running_averages_settle_after_three_time_constants(digits, overrides, step):
    _, model = make_prober(digits, *overrides)
    assert settling_step(model) == step  # ceil(3 / momentum): (1 - m)^(3/m) < e^-3 of the start left


def test_the_inference_views_reference_waits_for_the_running_averages_to_settle(digits):
    prober, model = make_prober(digits, "norm=bn", "probe.mode=both")
    recorder = Recorder()
    eval_moments = {}
    for step in (0, 20, 40, 60):
        prober.probe(step, recorder)
        with torch.no_grad():
            model.eval()
            taps = {}
            model.blocks[1].taps = taps
            model(prober.x)
            model.blocks[1].taps = None
            eval_moments[step] = feature_moments(taps["norm"])
            for block in model.blocks:  # a stand-in for training: the running averages move
                block.norm.running_mean.add_(0.3)
                block.norm.running_var.mul_(0.7)
        model.train()
    values = recorder.values
    # Steps 0 and 20 come before BN's running averages settle (step 30): no reference, no drift0.
    for step in (0, 20):
        assert not any(tag.startswith("infer/drift0/") for tag in values[step])
        assert values[step]["drift0/layer2/norm/mean"] == pytest.approx(0.0, abs=1e-3 * step + 1e-12)
    assert "infer/drift/layer2/norm/mean" in values[20]  # the rate since the previous probe: from the 2nd
    assert values[40]["infer/drift0/layer2/norm/mean"] == 0.0  # the reference
    mean_drift, var_drift = drift(*eval_moments[60], *eval_moments[40])
    assert values[60]["infer/drift0/layer2/norm/mean"] == pytest.approx(mean_drift.item())
    assert values[60]["infer/drift0/layer2/norm/var"] == pytest.approx(var_drift.item())
    assert mean_drift.item() > 0.1
    # Without running statistics (the inference network is the trained one) the reference is step 0.
    prober, _ = make_prober(digits, "norm=ln", "probe.mode=eval")
    prober.probe(0, recorder := Recorder())
    assert recorder.values[0]["infer/drift0/layer1/act/mean"] == 0.0


def test_histograms_and_layout(digits):
    prober, model = make_prober(digits, "probe.every=20", "probe.hist_every=50", "norm.position=after_act",
                                "probe.mode=both", "probe.landscape_every=20", "probe.ics_every=20",
                                "probe.curvature_every=100", "probe.snd_every=100")
    recorder = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits.train.x[:32], digits.train.y[:32]
    for step in range(0, 201, 20):
        prober.probe(step, recorder)
    prober.landscape(20, model, optimizer, x, y, recorder)
    prober.ics(20, model, optimizer, x, y, recorder)
    # The first probe at or after each multiple of hist_every; the nonlinearity input is `pre`.
    assert {s for _, s in recorder.histograms} == {0, 60, 100, 160, 200}
    assert {t for t, _ in recorder.histograms} == {f"{view}hist/layer{k}/pre" for k in (1, 2, 3)
                                                   for view in ("", "infer/")}
    assert len(recorder.layouts) == 1
    charts = {c: spec for category in recorder.layouts[0].values() for c, spec in category.items()}
    tags = set(recorder.values[20]) | set(recorder.values[100])
    assert {"batchnoise/layer3/std", "landscape/beta", "ics/layer2/cos", "infer/drift0/layer1/act/var",
            "curvature/top_eig", "curvature/residual", "snd/layer3"} <= tags
    for tag in tags:
        assert any(re.match(rx, tag) for spec in charts.values() for rx in spec[1]), tag


def test_resumed_prober_continues_drift_exactly(digits, tmp_path):
    recorders = [Recorder(), Recorder()]
    prober, model = make_prober(digits, "norm=bn", "probe.mode=both")
    prober.probe(0, recorders[0])
    with torch.no_grad():
        model.blocks[0].layer.weight.mul_(1.5)
    prober.probe(40, recorders[0])  # past BN's settling step (30): the inference view's reference
    torch.save(prober.state_dict(), tmp_path / "probe.pt")
    with torch.no_grad():
        model.blocks[1].norm.bias.add_(0.3)
        model.blocks[0].norm.running_mean.add_(0.2)
    prober.probe(80, recorders[0])

    resumed, resumed_model = make_prober(digits, "norm=bn", "probe.mode=both")
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(torch.load(tmp_path / "probe.pt", weights_only=True))
    resumed.probe(80, recorders[1])
    assert recorders[1].values[80] == recorders[0].values[80]
    assert recorders[0].values[80]["drift/layer2/norm/mean"] > 0.1
    assert recorders[0].values[80]["infer/drift/layer2/norm/mean"] > 0.1
    assert recorders[0].values[80]["infer/drift0/layer1/norm/mean"] > 0.1


# ---------------------------------------------------------------- probing never changes training
@pytest.mark.parametrize("data,norm", [("digits", "bn"), ("digits", "noisy_bn"), ("linear", "bn")])
def test_training_is_identical_with_and_without_probes(tmp_path, data, norm):
    base = [f"data={data}", f"norm={norm}", "train.steps=30", "train.batch_size=32",
            "train.log_every=1", "train.eval_every=15", "train.checkpoint_every=100",
            "probe.batch_size=200"]
    variants = {
        "off": ["probe=off"],
        "every_step": ["probe.every=1"],
        "full": ["probe=full", "probe.every=1", "probe.ics_every=1", "probe.hist_every=10",
                 "probe.mode=both", "probe.landscape_every=1", "probe.curvature_every=10",
                 "probe.snd_every=10"],
    }
    tables = {}
    for name, extra in variants.items():
        assert train_in_process(tmp_path / name, *base, *extra) == "completed"
        tables[name] = read_scalars(tmp_path / name)
    assert len(tables["off"]["train/loss"]) == 30
    for name in ("every_step", "full"):
        assert tables[name]["train/loss"] == tables["off"]["train/loss"], name
        assert tables[name]["test/loss"] == tables["off"]["test/loss"], name
    full = tables["full"]
    assert set(full["ics/layer3/l2"]) == set(range(1, 31))
    assert set(full["landscape/beta"]) == set(range(1, 31))
    assert 30 in full["infer/drift/layer3/act/mean"] and 30 in full["batchnoise/layer3/std"]
    assert set(full["curvature/top_eig"]) == set(full["snd/layer3"]) == {0, 10, 20, 30}
    assert 30 in tables["every_step"]["drift/layer3/act/mean"]
    # Layer 1 has no earlier layer: G' is G exactly, noise included (held, not redrawn).
    assert set(full["ics/layer1/l2"].values()) == {0.0}
    assert min(full["ics/layer2/l2"].values()) > 0


def test_resumed_run_logs_the_same_drift(tmp_path, digits_overrides):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [*digits_overrides, "train.steps=60", "probe.every=10"]
    train_in_process(whole, *common)
    train_in_process(parts, *common, "train.steps=30")
    train_in_process(parts, *common, f"resume={parts}")
    a, b = read_scalars(whole), read_scalars(parts)
    for tag, first in (("drift/layer3/norm/mean", 10), ("drift0/layer2/act/var", 0),
                       ("pct/layer1/p85", 0)):
        assert set(a[tag]) == set(b[tag]) == set(range(first, 61, 10))
        assert b[tag] == pytest.approx(a[tag], rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- gradient-based ICS
def tiny_linear_net() -> Net:
    """Two hidden linear blocks without norm or nonlinearity, then a classifier."""
    def block(n_in, n_out):
        return Block(nn.Linear(n_in, n_out), build_norm("none", n_out), nn.Identity(), True)

    torch.manual_seed(0)
    return Net(nn.Sequential(nn.Flatten(), block(4, 3), block(3, 3)), nn.Linear(3, 2))


def test_ics_matches_a_hand_computation_with_sgd_momentum():
    model = tiny_linear_net()
    lr, momentum, wd = 0.3, 0.9, 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    F.cross_entropy(model(torch.randn(8, 4)), y).backward()  # one real step: momentum buffers
    optimizer.step()

    b1, b2, c = model.blocks[0].layer, model.blocks[1].layer, model.classifier
    w1, v1, w2, v2 = (t.detach().clone() for t in (b1.weight, b1.bias, b2.weight, b2.bias))

    def loss(w1, v1, w2, v2):
        return F.cross_entropy(c((x @ w1.T + v1) @ w2.T + v2), y)

    leaves = [t.clone().requires_grad_() for t in (w1, v1, w2, v2)]
    g_w1, g_v1, g_w2, _ = torch.autograd.grad(loss(*leaves), leaves)
    # SGD with momentum and weight decay, by hand: buf = m buf + (g + wd p); p' = p - lr buf.
    buf_w1 = optimizer.state[b1.weight]["momentum_buffer"]
    buf_v1 = optimizer.state[b1.bias]["momentum_buffer"]
    w1_new = w1 - lr * (momentum * buf_w1 + g_w1 + wd * w1)
    v1_new = v1 - lr * (momentum * buf_v1 + g_v1 + wd * v1)
    w2_leaf = w2.clone().requires_grad_()
    g_w2_after = torch.autograd.grad(loss(w1_new, v1_new, w2_leaf, v2), w2_leaf)[0]

    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers_before = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    l2, cos = gradient_ics(model, optimizer, x, y)

    assert l2[0].item() == 0.0 and cos[0].item() == pytest.approx(1.0, abs=1e-12)
    assert l2[1].item() == pytest.approx((g_w2 - g_w2_after).norm().item(), rel=1e-5)
    assert cos[1].item() == pytest.approx(
        F.cosine_similarity(g_w2.flatten(), g_w2_after.flatten(), dim=0).item(), rel=1e-6)
    assert l2[1].item() > 1e-4  # the earlier layer's update does shift layer 2's gradient
    # Model, optimizer state and gradients untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key])
    for p, buf in zip(model.parameters(), buffers_before, strict=True):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buf)


def test_ics_updates_only_the_earlier_layers(digits):
    cfg = compose("data=digits", "norm=bn", "model.widths=[16,16,16]")
    torch.manual_seed(0)
    model = build_model(cfg, digits.shape, digits.num_classes)
    first = set(model.blocks[0].parameters())
    # Layer 1 (weight, gamma, beta) frozen by lr=0: layer 2's gradient cannot move; layer 3's can.
    optimizer = torch.optim.SGD([
        {"params": [p for p in model.parameters() if p in first], "lr": 0.0},
        {"params": [p for p in model.parameters() if p not in first], "lr": 0.5},
    ])
    running = model.blocks[0].norm.running_mean.clone()
    l2, cos = gradient_ics(model, optimizer, digits.train.x[:64], digits.train.y[:64])
    assert l2[0].item() == 0.0 and l2[1].item() == 0.0
    assert cos[1].item() == pytest.approx(1.0, abs=1e-12)
    assert l2[2].item() > 0 and cos[2].item() < 1
    assert torch.equal(model.blocks[0].norm.running_mean, running)  # frozen statistics
    assert model.blocks[0].norm.num_batches_tracked.item() == 0


class NoisyScale(Norm):
    """A stochastic layer like noisy BN: multiplicative noise from the global RNG, holdable."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.noise: torch.Tensor | None = None

    def forward(self, x):
        if self.training and not (self.hold_noise and self.noise is not None):
            self.noise = 1 + 0.5 * torch.randn(x.shape[1])
        return x * self.noise if self.training else x


def test_stochastic_layers_see_held_noise_and_training_is_unchanged(digits):
    cfg = compose("data=digits", "norm=none", "model.widths=[16,16]", "probe.batch_size=100",
                  "probe.ics_every=1")
    runs = []
    for measured in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, digits.shape, digits.num_classes)
        for block in model.blocks:
            block.norm = NoisyScale(16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        prober, recorder = Prober(cfg, model, digits, CPU), Recorder()
        for step in range(1, 6):
            x, y = digits.train.x[step * 32:(step + 1) * 32], digits.train.y[step * 32:(step + 1) * 32]
            if measured:
                prober.ics(step, model, optimizer, x, y, recorder)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if measured:
                prober.probe(step, recorder)
                # Layer 1 has no earlier layer: with the noise held, G' is G exactly.
                assert recorder.values[step]["ics/layer1/l2"] == 0.0
                assert recorder.values[step]["ics/layer2/l2"] > 0.0
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_state_dict_loads_with_weights_only(digits, tmp_path):
    prober, _ = make_prober(digits, "probe.mode=both")
    buffer = io.BytesIO()
    torch.save(prober.state_dict(), buffer)  # before any probe: nothing to carry
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == {"first": None, "prev": None,
                                                     "infer": {"first": None, "prev": None}}
    prober.probe(0, Recorder())
    buffer = io.BytesIO()
    torch.save(prober.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["infer"]["prev"][0]["var"].shape == (3, 100)  # (points, units) of layer 1
    assert state["infer"]["first"] is None  # step 0: BN's running averages have not settled


def test_a_model_without_hidden_layers_logs_nothing(digits):
    prober, model = make_prober(digits, "model.widths=[]", "probe.ics_every=1")
    recorder = Recorder()
    prober.probe(0, recorder)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prober.ics(1, model, optimizer, digits.train.x[:8], digits.train.y[:8], recorder)
    assert recorder.calls == []


def test_inference_batch_noise_and_landscape_tags_reach_csv_and_tensorboard(tmp_path):
    """`bnlab train data=digits train.steps=200 probe.every=50 probe.mode=both
    probe.landscape_every=100 train.threads=1` logs infer/, batchnoise/ and landscape/ tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert train_in_process(run, "data=digits", "train.steps=200", "probe.every=50", "probe.mode=both",
                            "probe.landscape_every=100") == "completed"
    csv_tags = read_scalars(run)
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    board = set(events.Tags()["scalars"])
    for tag, steps in (("infer/drift/layer2/norm/mean", {50, 100, 150, 200}),
                       ("infer/sat/layer3", {0, 50, 100, 150, 200}),
                       ("batchnoise/layer1/mean", {0, 50, 100, 150, 200}),
                       ("batchnoise/layer3/std", {0, 50, 100, 150, 200}),
                       # from the first probe after BN's running averages settled (step 30)
                       ("infer/drift0/layer3/norm/mean", {50, 100, 150, 200}),
                       ("landscape/loss_min", {100, 200}), ("landscape/loss_max", {100, 200}),
                       ("landscape/loss_range", {100, 200}),
                       ("landscape/grad_change", {100, 200}), ("landscape/beta", {100, 200})):
        assert set(csv_tags[tag]) == steps, tag
        assert tag in board, tag
        assert {e.step for e in events.Scalars(tag)} == steps, tag
        assert all(math.isfinite(v) for v in csv_tags[tag].values()), tag
    for step in (100, 200):
        assert csv_tags["landscape/loss_min"][step] <= csv_tags["landscape/loss_max"][step]
    assert csv_tags["infer/drift0/layer3/norm/mean"][50] == 0.0
    assert "infer/batchnoise/layer1/mean" not in csv_tags


# ---------------------------------------------------------------- noisy BN: the probes see the step's noise
class _Sink:
    """Takes whatever a prober logs; keeps its scalars."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, float]] = defaultdict(dict)

    def scalars(self, step, values) -> None:
        self.values[step].update(values)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _noisy_model(probe_batch: int):
    cfg = compose("data=digits", "norm=noisy_bn", "model.widths=[16,16,16]", "activation=relu",
                  f"probe.batch_size={probe_batch}", "probe.ics_every=1")
    data = load_dataset(cfg.data, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg, data.shape, data.num_classes)
    return model, Prober(cfg, model, data, torch.device("cpu")), data


def _noise(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in block.norm.noise) for block in model.blocks]


def _assert_same_noise(measured, trained) -> None:
    for k, ((s1, m1), (s2, m2)) in enumerate(zip(measured, trained, strict=True)):
        assert torch.equal(s1, s2) and torch.equal(m1, m2), f"layer {k + 1}"
    (s1, m1), (s2, m2) = trained[0], trained[1]  # equal shapes, yet each layer its own draw
    assert not torch.equal(m1, m2) and not torch.equal(s1, s2)
    assert m1.mean() != m2.mean()  # and its own step mu


def test_a_probe_pass_sees_the_noise_of_the_next_training_step():
    batch = 32
    model, prober, data = _noisy_model(probe_batch=batch)  # the probe batch has the step's shape
    x = data.train.x[:batch]
    torch.manual_seed(1)
    prober.probe(0, _Sink())
    measured = _noise(model)
    model(x)  # the training step's forward pass, from the RNG state the probe found
    _assert_same_noise(measured, _noise(model))


def test_ics_sees_the_noise_and_the_gradient_of_the_real_step(monkeypatch):
    import bnlab.probes.ics

    batch = 32
    model, prober, data = _noisy_model(probe_batch=batch)
    x, y = data.train.x[:batch], data.train.y[:batch]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    captured = {}
    update = bnlab.probes.ics.updated_parameters

    def capture(model_, optimizer_, grads):  # G: the gradients of ICS's first pass
        captured.update(grads=grads, noise=_noise(model_))
        return update(model_, optimizer_, grads)

    monkeypatch.setattr(bnlab.probes.ics, "updated_parameters", capture)
    torch.manual_seed(2)
    recorder = _Sink()
    prober.ics(1, model, optimizer, x, y, recorder)
    assert recorder.values[1]["ics/layer2/l2"] > 0  # the earlier layer's update moves layer 2's gradient
    F.cross_entropy(model(x), y).backward()  # the real step
    _assert_same_noise(captured["noise"], _noise(model))
    grads = dict(model.named_parameters())
    assert set(captured["grads"]) == set(grads)
    for name, g in captured["grads"].items():
        assert torch.equal(g, grads[name].grad), name
