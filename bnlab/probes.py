"""Activation statistics on a fixed probe batch: per-layer moments, drift, percentiles, saturation.

Every ``probe.every`` steps the model runs, in train mode, without gradients and without touching
running statistics, on a batch drawn once from the training split. For each hidden layer K it
reads three points, ``pre`` (layer output), ``norm`` (norm output) and ``act`` (activation
output); per feature j (a unit, or a channel over N, H, W) it takes the mean mu_j and the biased
variance var_j and logs (eps = 1e-5):

    act/layerK/<point>/mean, /var   mean_j mu_j, mean_j var_j
    drift/layerK/<point>/mean       RMS_j (mu_j(t) - mu_j(t')) / sqrt(var_j(t') + eps)
    drift/layerK/<point>/var        RMS_j 0.5 * log((var_j(t) + eps) / (var_j(t') + eps))
    drift0/layerK/<point>/...       the same with t' = the first probe (before training)
    pct/layerK/p15, p50, p85        percentiles of the nonlinearity input of unit ``probe.unit``
    sat/layerK                      fraction of nonlinearity inputs x with f'(x) < 0.1 max f'

where t' is the previous probe for ``drift`` (logged from the second probe on). The statistic
functions below are pure, so tests check them against direct computations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bnlab.data import Dataset
from bnlab.evaluation import loss_function
from bnlab.ics import gradient_ics, preserved_rng
from bnlab.models import Net
from bnlab.norms import frozen_stats

POINTS = ("pre", "norm", "act")
PERCENTILES = (15, 50, 85)
DRIFT_EPS = 1e-5
SATURATION_LEVEL = 0.1  # "saturated": the derivative is below 10% of its maximum
# The probe batch's own stream; the batch stream uses `seed` and `seed + 1`.
PROBE_SEED_OFFSET = 7919


# ---------------------------------------------------------------- pure statistics
def feature_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean mu_j = E[x_j] and biased variance var_j = E[(x_j - mu_j)^2], as float64.

    Features are dim 1; the expectation is over N for (N, C) and over N, H, W for (N, C, H, W).
    Two passes in the input's precision: as exact as E[x^2] - E[x]^2 in float64, at half the
    memory traffic of converting the whole batch.
    """
    dims = (0,) if x.dim() == 2 else (0, *range(2, x.dim()))
    mean = x.float().mean(dims, keepdim=True)
    var = (x - mean).square_().mean(dims)
    return mean.flatten().double(), var.double()


def rms(x: Tensor) -> Tensor:
    """Root mean square over the last dimension."""
    return x.square().mean(-1).sqrt()


def drift(mean: Tensor, var: Tensor, ref_mean: Tensor, ref_var: Tensor,
          eps: float = DRIFT_EPS) -> tuple[Tensor, Tensor]:
    """Scale-free shift of per-feature statistics (features on the last dim) against a reference.

    mean drift = RMS_j (mu_j - mu_j^ref) / sqrt(var_j^ref + eps)
    var drift  = RMS_j 0.5 * log((var_j + eps) / (var_j^ref + eps))   (log of the std ratio)
    Leading dimensions broadcast, so one call handles several points and references.
    """
    shift = (mean - ref_mean) / (ref_var + eps).sqrt()
    scale = 0.5 * torch.log((var + eps) / (ref_var + eps))
    return rms(shift), rms(scale)


def unit_percentiles(x: Tensor, unit: int, q: Tensor | None = None) -> Tensor:
    """Percentiles of feature ``unit`` of x over N (or N, H, W), in float64.

    ``q`` holds the fractions (default 0.15, 0.50, 0.85); linear interpolation between order
    statistics, numpy's default (``torch.quantile``).
    """
    values = x[:, unit].reshape(-1).double()
    if q is None:
        q = percentile_fractions(x.device)
    return torch.quantile(values, q)


def percentile_fractions(device: torch.device) -> Tensor:
    """PERCENTILES as float64 fractions on ``device`` (build once: a copy to the GPU costs a sync)."""
    return torch.tensor(PERCENTILES, dtype=torch.float64, device=device) / 100


def _gelu_threshold(level: float) -> float:
    """The x below which GELU's derivative Phi(x) + x phi(x) is under ``level`` times its maximum.

    GELU' rises monotonically on (-sqrt 2, sqrt 2) to its maximum at sqrt 2 and is negative
    (so below the level) for every x < -sqrt 2: one threshold, found by bisection.
    """
    def derivative(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2))) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    target = level * derivative(math.sqrt(2))
    lo, hi = -math.sqrt(2), math.sqrt(2)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if derivative(mid) < target else (lo, mid)
    return (lo + hi) / 2


def saturation_bounds(activation: str, level: float = SATURATION_LEVEL) -> tuple[float, float]:
    """(lo, hi) such that f'(x) < level * max f' exactly when x < lo or x > hi.

    sigmoid: s(1 - s) < level/4  <=>  |x| > logit((1 + sqrt(1 - level)) / 2)
    tanh:    1 - tanh^2 < level  <=>  |x| > atanh(sqrt(1 - level))
    relu, leaky_relu (slope 0.01 < level): x < 0;  gelu: x < t (numerically);  identity: never.
    """
    if activation == "sigmoid":
        s = (1 + math.sqrt(1 - level)) / 2
        t = math.log(s / (1 - s))
        return -t, t
    if activation == "tanh":
        t = math.atanh(math.sqrt(1 - level))
        return -t, t
    if activation in ("relu", "leaky_relu"):
        return 0.0, math.inf
    if activation == "gelu":
        return _gelu_threshold(level), math.inf
    if activation == "identity":
        return -math.inf, math.inf
    raise ValueError(f"no saturation rule for activation {activation!r}")


def saturated_fraction(x: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Fraction of the entries of x outside [lo, hi] (see :func:`saturation_bounds`), float64."""
    lo, hi = bounds
    return ((x < lo) | (x > hi)).double().mean()


# ---------------------------------------------------------------- the prober
class Prober:
    """Measures a model's activations on a fixed probe batch; the trainer calls it.

    ``probe`` logs the statistics of the module docstring, ``ics`` the gradient-based ICS of
    :mod:`bnlab.ics`.
    None of them changes training: running statistics are frozen, torch's global RNG state is
    restored, and the probe batch comes from a private generator.
    """

    def __init__(self, cfg: DictConfig, model: Net, data: Dataset, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg.probe, model, torch.device(device)
        self.ics_every = int(cfg.probe.ics_every)
        self.task = getattr(data, "task", "classification")
        self.bounds = saturation_bounds(str(cfg.activation.name))
        self.fractions = percentile_fractions(self.device)
        generator = torch.Generator().manual_seed(int(cfg.seed) + PROBE_SEED_OFFSET)
        index = torch.randperm(len(data.train), generator=generator)[: self.cfg.batch_size]
        self.x = data.train.x[index.to(data.train.x.device)].to(self.device)
        # Per layer, (3, C) float64 tensors of mu_j and var_j at the points (pre, norm, act).
        self.first: list[tuple[Tensor, Tensor]] | None = None
        self.prev: list[tuple[Tensor, Tensor]] | None = None

    # -- activation statistics
    @torch.no_grad()
    def _record_points(self) -> list[dict[str, Tensor]]:
        blocks = self.model.blocks
        taps: list[dict[str, Tensor]] = [{} for _ in blocks]
        was_training = self.model.training
        self.model.train()
        try:
            # Noisy layers draw from the global RNG: restore it so training sees the same stream.
            with preserved_rng(self.device), frozen_stats(self.model):
                for block, tap in zip(blocks, taps, strict=True):
                    block.taps = tap
                self.model(self.x)
        finally:
            for block in blocks:
                block.taps = None
            self.model.train(was_training)
        return taps

    def probe(self, step: int, recorder) -> None:
        """Measure the probe batch at ``step`` and log every probe tag in one call."""
        if not self.model.blocks:  # a linear classifier: no hidden layer to probe
            return
        taps = self._record_points()
        moments = []
        for tap in taps:
            mean, var = feature_moments(torch.cat([tap[p] for p in POINTS], dim=1))
            moments.append((mean.view(len(POINTS), -1), var.view(len(POINTS), -1)))
        first = self.first if self.first is not None else moments

        tags: list[str] = []
        values: list[Tensor] = []

        def add(names: list[str], tensor: Tensor) -> None:
            tags.extend(names)
            values.append(tensor.reshape(-1))

        for k, (tap, (mean, var)) in enumerate(zip(taps, moments, strict=True), start=1):
            layer = f"layer{k}"
            per_point = [f"{layer}/{p}" for p in POINTS]
            add([f"act/{n}/mean" for n in per_point], mean.mean(-1))
            add([f"act/{n}/var" for n in per_point], var.mean(-1))
            refs = [first[k - 1]] + ([self.prev[k - 1]] if self.prev is not None else [])
            kinds = ["drift0", "drift"][: len(refs)]
            ref_mean = torch.stack([m for m, _ in refs])
            ref_var = torch.stack([v for _, v in refs])
            mean_drift, var_drift = drift(mean, var, ref_mean, ref_var)  # (len(refs), 3)
            add([f"{kind}/{n}/mean" for kind in kinds for n in per_point], mean_drift)
            add([f"{kind}/{n}/var" for kind in kinds for n in per_point], var_drift)
            x = tap[self.model.blocks[k - 1].nonlinearity_input]
            percentiles = unit_percentiles(x, self.cfg.unit, self.fractions)
            add([f"pct/{layer}/p{q}" for q in PERCENTILES], percentiles)
            add([f"sat/{layer}"], saturated_fraction(x, self.bounds))

        numbers = torch.cat(values).tolist()  # the one host sync
        recorder.scalars(step, dict(zip(tags, numbers, strict=True)))
        if self._wants_histograms(step):
            for k, (tap, block) in enumerate(zip(taps, self.model.blocks, strict=True), start=1):
                point = block.nonlinearity_input
                recorder.histogram(f"hist/layer{k}/{point}", tap[point].detach().float().cpu(), step)
        if step == 0:
            recorder.layout(self.layout())
        if self.first is None:
            self.first = moments
        self.prev = moments

    def _wants_histograms(self, step: int) -> bool:
        """True at the first probe at or after each multiple of ``hist_every``."""
        every = self.cfg.hist_every
        return every > 0 and step // every != (step - self.cfg.every) // every

    def layout(self) -> dict[str, dict[str, list]]:
        """TensorBoard custom-scalars charts: one per metric with all layers, pct per layer."""
        charts: dict[str, dict[str, list]] = {}
        for kind in ("act", "drift", "drift0"):
            charts[f"probes: {kind}"] = {
                f"{kind}/{point}/{stat}": ["Multiline", [rf"^{kind}/layer\d+/{point}/{stat}$"]]
                for point in POINTS for stat in ("mean", "var")
            }
        charts["probes: pct"] = {
            f"pct/layer{k}": ["Multiline", [rf"^pct/layer{k}/p\d+$"]]
            for k in range(1, len(self.model.blocks) + 1)
        }
        charts["probes: sat"] = {"sat": ["Multiline", [r"^sat/layer\d+$"]]}
        if self.cfg.ics_every > 0:
            charts["probes: ics"] = {f"ics/{stat}": ["Multiline", [rf"^ics/layer\d+/{stat}$"]]
                                     for stat in ("l2", "cos")}
        return charts

    # -- gradient-based ICS
    def wants_ics(self, step: int) -> bool:
        every = self.ics_every  # asked every step: a plain int, not an OmegaConf read
        return every > 0 and step % every == 0

    def ics(self, step: int, model: Net, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
            recorder) -> None:
        """Log ``ics/layerK/l2`` and ``ics/layerK/cos`` for the update about to be made on (x, y)."""
        if not model.blocks:
            return
        l2, cos = gradient_ics(model, optimizer, x, y, loss_function(self.task))
        numbers = torch.cat([l2, cos]).tolist()
        n = len(l2)
        values = {}
        for k in range(1, n + 1):
            values[f"ics/layer{k}/l2"] = numbers[k - 1]
            values[f"ics/layer{k}/cos"] = numbers[n + k - 1]
        recorder.scalars(step, values)

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """First and previous probe statistics (CPU tensors: loadable with weights_only=True)."""
        def pack(moments):
            if moments is None:
                return None
            return [{"mean": m.cpu(), "var": v.cpu()} for m, v in moments]

        return {"first": pack(self.first), "prev": pack(self.prev)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def unpack(packed):
            if packed is None:
                return None
            return [(p["mean"].to(self.device), p["var"].to(self.device)) for p in packed]

        self.first, self.prev = unpack(state.get("first")), unpack(state.get("prev"))
