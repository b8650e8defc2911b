"""Activation statistics on a fixed probe batch: per-layer moments, drift, percentiles, saturation,
batch noise; and, when asked, the loss's curvature and the normalization's disturbance.

Every ``probe.every`` steps the model runs without gradients and without touching running
statistics on a batch drawn once from the training split: in train mode (batch statistics, the
network that is trained), in eval mode (running statistics, no noise: the network that is
evaluated), or both (``probe.mode``). For each hidden layer K it reads three points, ``pre``
(layer output), ``norm`` (norm output) and ``act`` (activation output); per feature j (a unit, or
a channel over N, H, W) it takes the mean mu_j and the biased variance var_j and logs (eps = 1e-5):

    act/layerK/<point>/mean, /var   mean_j mu_j, mean_j var_j
    drift/layerK/<point>/mean       RMS_j (mu_j(t) - mu_j(t')) / sqrt(var_j(t') + eps)
    drift/layerK/<point>/var        RMS_j 0.5 * log((var_j(t) + eps) / (var_j(t') + eps))
    drift0/layerK/<point>/...       the same with t' = the view's reference probe
    pct/layerK/p15, p50, p85        percentiles of the nonlinearity input of unit ``probe.unit``
    sat/layerK                      fraction of nonlinearity inputs x with f'(x) < 0.1 max f'
    batchnoise/layerK/mean, /std    RMS over training-sized batches c and units j of
                                    (mu_cj - mu_j) / sqrt(var_j + eps) and
                                    0.5 * log((var_cj + eps) / (var_j + eps)) at the norm's input

where t' is the previous probe for ``drift`` (logged from the second probe on). The eval-mode view
logs the same tags, ``batchnoise/`` excepted, under the prefix ``infer/``, with its own reference
and previous probe. The train view's reference is the first probe (step 0); the eval view's is the
first probe once its running averages have settled (:func:`settling_step`): at step 0 they are
(0, 1) and the inference network is not normalized at all.

Batch noise is what a training batch sees: a fixed set of batches of the training batch size,
drawn by the training sampler's rule (:func:`bnlab.data.make_batch_stream`, its own seed), each
run through the train-mode network with its own statistics at every layer (so a layer's input
carries the earlier layers' noise, as in training); mu_cj, var_cj are batch c's moments at the
norm's input (each ghost batch's, with ``norm.ghost_batch``), mu_j, var_j the probe batch's at
the same point (its 1,000 i.i.d. images stand in for the population). ``curvature/``
(:mod:`bnlab.probes.curvature`) and ``snd/`` (:mod:`bnlab.probes.snd`) are measured at the first
probe at or after each multiple of ``probe.curvature_every`` and ``probe.snd_every``. The
statistic functions below are pure, so tests check them against direct computations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bnlab.config.schema import world_size
from bnlab.data import Dataset, make_batch_stream
from bnlab.models import Block, Net, loss_function
from bnlab.norms import Norm, frozen_stats
from bnlab.probes.curvature import check_double_backward, curvature, start_generator
from bnlab.probes.ics import gradient_ics
from bnlab.probes.passes import points_per_batch
from bnlab.probes.snd import batch_plan, layer_disturbances

POINTS = ("pre", "norm", "act")
PERCENTILES = (15, 50, 85)
DRIFT_EPS = 1e-5
SATURATION_LEVEL = 0.1  # "saturated": the derivative is below 10% of its maximum
# The probe batch's own stream; the batch stream uses `seed` and `seed + 1`, the train-mode
# evaluation bnlab.run.evaluation.TRAIN_MODE_SEED_OFFSET.
PROBE_SEED_OFFSET = 7919
BATCH_NOISE_SEED_OFFSET = 15485863  # the batch-noise batches
SND_SEED_OFFSET = 32452843  # the disturbance probe's batches
# A running average r <- (1 - m) r + m b keeps (1 - m)^k of its start after k updates: ~e^-3 = 5%
# after 3/m. The inference view's drift reference waits for that many training steps.
SETTLING_TIME_CONSTANTS = 3
# probe.mode -> the views measured: (tag prefix, train mode?)
TRAIN_VIEW, INFER_VIEW = ("", True), ("infer/", False)
MODE_VIEWS = {"train": (TRAIN_VIEW,), "eval": (INFER_VIEW,), "both": (TRAIN_VIEW, INFER_VIEW)}


# ---------------------------------------------------------------- pure statistics
def feature_moments(x: Tensor, batched: bool = False) -> tuple[Tensor, Tensor]:
    """Per-feature mean mu_j = E[x_j] and biased variance var_j = E[(x_j - mu_j)^2], as float64.

    Features are dim 1; the expectation is over N for (N, C) and over N, H, W for (N, C, H, W).
    ``batched``: x stacks several batches on a leading dim (b, N, C, ...), and the moments are
    each batch's, (b, C). Two passes in the input's precision: as exact as E[x^2] - E[x]^2 in
    float64, at half the memory traffic of converting the whole batch.
    """
    lead = int(batched)
    dims = (lead, *range(lead + 2, x.dim()))
    mean = x.float().mean(dims, keepdim=True)
    var = (x - mean).square_().mean(dims)
    return mean.flatten(lead).double(), var.double()


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
    if hi == math.inf:  # relu, gelu: one comparison, not two and an or (a third of the time)
        outside = x < lo
    elif lo == -hi:  # sigmoid, tanh
        outside = x.abs() > hi
    else:
        outside = (x < lo) | (x > hi)
    return torch.count_nonzero(outside).double() / x.numel()  # exact; 1.5x a float mean


def batch_noise(chunk_mean: Tensor, chunk_var: Tensor, mean: Tensor, var: Tensor,
                eps: float = DRIFT_EPS) -> tuple[Tensor, Tensor]:
    """How far the statistics of batches c stray from the reference statistics, per feature j.

    ``chunk_mean``, ``chunk_var`` (n, C): each batch's mu_cj and biased var_cj; ``mean``, ``var``
    (C,): the reference mu_j, var_j. Returns, as float64 0-dim tensors::

        mean noise = RMS_{c,j} (mu_cj - mu_j) / sqrt(var_j + eps)
        std noise  = RMS_{c,j} 0.5 * log((var_cj + eps) / (var_j + eps))   (log sigma_cj / sigma_j)

    the shift and log-scale a BN layer applies to unit j when it normalizes by a batch's
    statistics instead of the reference's.
    """
    shift, scale = drift(chunk_mean.double(), chunk_var.double(), mean, var, eps)
    return rms(shift), rms(scale)  # RMS over batches of the per-batch RMS over units


def norm_input(block: Block) -> str:
    """The point whose statistics the block's norm computes: ``pre`` before the activation,
    ``act`` after it."""
    return "pre" if block.norm_first else "act"


def settling_step(model: Net) -> int:
    """The first step at which the running averages of ``model``'s norm layers have settled:
    ceil(SETTLING_TIME_CONSTANTS / m) for the slowest momentum m > 0 among the layers that use
    batch statistics (BN's 0.1: step 30; BRN's 0.01: step 300); 0 when no layer keeps one (the
    inference network is then the training one) or none moves (m = 0)."""
    momenta = [float(m.momentum) for m in model.modules()
               if isinstance(m, Norm) and m.uses_batch_statistics
               and isinstance(getattr(m, "momentum", None), (int, float)) and m.momentum > 0]
    return math.ceil(SETTLING_TIME_CONSTANTS / min(momenta)) if momenta else 0


# ---------------------------------------------------------------- the prober
@dataclass
class View:
    """One network the probes measure: train mode (prefix "") or eval mode ("infer/"), with its
    own reference and previous probe statistics (per layer, (3, C) float64 mu_j and var_j). The
    reference (``first``) is the first probe at or after ``reference_step``."""

    prefix: str
    train_mode: bool
    reference_step: int = 0
    first: list[tuple[Tensor, Tensor]] | None = None
    prev: list[tuple[Tensor, Tensor]] | None = None


class Prober:
    """Measures a model's activations on a fixed probe batch; the trainer calls it.

    ``probe`` logs the statistics of the module docstring (and, when due, ``curvature/`` and
    ``snd/``), ``ics`` the gradient-based ICS of :mod:`bnlab.probes.ics`, ``landscape`` the loss
    landscape of :mod:`bnlab.probes.landscape`. None of them changes training: running statistics
    are frozen, torch's global RNG state is restored, and the probe batch and every batch a probe
    draws come from private generators.
    """

    def __init__(self, cfg: DictConfig, model: Net, data: Dataset, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg.probe, model, torch.device(device)
        self.seed = int(cfg.seed)
        self.ics_every = int(cfg.probe.ics_every)
        self.landscape_every = int(cfg.probe.landscape_every)
        self.curvature_every = int(cfg.probe.curvature_every)
        self.curvature_iters = int(cfg.probe.curvature_iters)
        self.snd_every = int(cfg.probe.snd_every)
        settled = settling_step(model)
        self.views = [View(prefix, train, 0 if train else settled)
                      for prefix, train in MODE_VIEWS[cfg.probe.mode]]
        self.task = getattr(data, "task", "classification")
        self.loss_fn = loss_function(self.task)
        self.bounds = saturation_bounds(str(cfg.activation.name))
        self.fractions = percentile_fractions(self.device)
        # The batch one norm layer sees in a training step: a replica's share under torchrun.
        synced = bool(getattr(cfg.norm, "sync", False))
        replicas = 1 if synced else world_size()
        self.chunk_size = max(1, int(cfg.train.batch_size) // replicas)
        # The rows one normalization's statistics cover: a ghost batch of the batch, or all of it.
        ghost = getattr(cfg.norm, "ghost_batch", None)
        self.norm_batch = int(ghost) if ghost and self.chunk_size % int(ghost) == 0 else self.chunk_size
        generator = torch.Generator().manual_seed(self.seed + PROBE_SEED_OFFSET)
        index = torch.randperm(len(data.train), generator=generator)[: self.cfg.batch_size]
        index = index.to(data.train.x.device)
        self.x = data.train.x[index].to(self.device)
        self.y = data.train.y[index].to(self.device)
        # Batch noise: as many training batches as fit in the probe batch's size, drawn once.
        n_chunks = int(self.cfg.batch_size) // self.chunk_size
        self.chunks: Tensor | None = None  # (n_chunks, chunk_size, ...)
        if n_chunks and any(view.train_mode for view in self.views):
            stream = make_batch_stream(data.train, int(cfg.train.batch_size),
                                       self.seed + BATCH_NOISE_SEED_OFFSET, cfg.data,
                                       world_size=replicas, augment=False)
            self.chunks = torch.stack([next(stream)[0] for _ in range(n_chunks)]).to(self.device)
        self.snd_plan: Tensor | None = None
        if self.snd_every > 0 and self.chunk_size <= len(self.x):
            snd_generator = torch.Generator().manual_seed(self.seed + SND_SEED_OFFSET)
            self.snd_plan = batch_plan(len(self.x), self.chunk_size, int(cfg.probe.snd_samples),
                                       int(cfg.probe.snd_draws), snd_generator)
        if self.curvature_every > 0:  # refused before training, not at the first measurement
            rows = min(len(self.x), max(2, self.chunk_size))
            check_double_backward(model, self.x[:rows], self.y[:rows], self.loss_fn,
                                  f"probe.curvature_every={self.curvature_every}")

    # -- activation statistics
    @torch.no_grad()
    def _record_points(self, train_mode: bool) -> list[dict[str, Tensor]]:
        blocks = self.model.blocks
        taps: list[dict[str, Tensor]] = [{} for _ in blocks]
        was_training = self.model.training
        self.model.train(train_mode)
        try:
            # Noisy layers draw from the global RNG: restore it so training sees the same stream.
            with frozen_stats(self.model):
                for block, tap in zip(blocks, taps, strict=True):
                    block.taps = tap
                self.model(self.x)
        finally:
            for block in blocks:
                block.taps = None
            self.model.train(was_training)
        return taps

    def probe(self, step: int, recorder) -> None:
        """Measure the probe batch at ``step`` in each view and log every probe tag in one call."""
        if not self.model.blocks:  # a linear classifier: no hidden layer to probe
            return
        tags: list[str] = []
        values: list[Tensor] = []

        def add(names: list[str], tensor: Tensor) -> None:
            tags.extend(names)
            values.append(tensor.reshape(-1))

        measured = []
        for view in self.views:
            taps = self._record_points(view.train_mode)
            moments = self._statistics(view, step, taps, add)
            if view.train_mode and self.chunks is not None:
                self._batch_noise(moments, add)
            if self._due(self.cfg.hist_every, step):
                for k, (tap, block) in enumerate(zip(taps, self.model.blocks, strict=True), start=1):
                    point = block.nonlinearity_input
                    recorder.histogram(f"{view.prefix}hist/layer{k}/{point}",
                                       tap[point].detach().float().cpu(), step)
            measured.append((view, moments))
        if self._due(self.curvature_every, step):
            stats = curvature(self.model, self.x, self.y, self.loss_fn, self.curvature_iters,
                              start_generator(self.seed, step))
            add([f"curvature/{name}" for name in stats], torch.stack(list(stats.values())))
        if self.snd_plan is not None and self._due(self.snd_every, step):
            snd = layer_disturbances(self.model, self.x, self.snd_plan)
            add([f"snd/layer{k}" for k in range(1, len(snd) + 1)], snd)
        numbers = torch.cat(values).tolist()  # the one host sync
        recorder.scalars(step, dict(zip(tags, numbers, strict=True)))
        if step == 0:
            recorder.layout(self.layout())
        for view, moments in measured:
            if view.first is None and step >= view.reference_step:
                view.first = moments
            view.prev = moments

    def _statistics(self, view: View, step: int, taps: list[dict[str, Tensor]], add
                    ) -> list[tuple[Tensor, Tensor]]:
        """Add the view's tags and (device) values; returns its moments per layer."""
        moments = []
        for tap in taps:
            mean, var = feature_moments(torch.cat([tap[p] for p in POINTS], dim=1))
            moments.append((mean.view(len(POINTS), -1), var.view(len(POINTS), -1)))
        first = view.first
        if first is None and step >= view.reference_step:
            first = moments  # this probe becomes the reference: drift0 = 0
        prefix = view.prefix
        for k, (tap, (mean, var)) in enumerate(zip(taps, moments, strict=True), start=1):
            layer = f"layer{k}"
            per_point = [f"{layer}/{p}" for p in POINTS]
            add([f"{prefix}act/{n}/mean" for n in per_point], mean.mean(-1))
            add([f"{prefix}act/{n}/var" for n in per_point], var.mean(-1))
            refs = [(kind, r[k - 1]) for kind, r in (("drift0", first), ("drift", view.prev))
                    if r is not None]
            if refs:
                ref_mean = torch.stack([m for _, (m, _) in refs])
                ref_var = torch.stack([v for _, (_, v) in refs])
                mean_drift, var_drift = drift(mean, var, ref_mean, ref_var)  # (len(refs), 3)
                kinds = [kind for kind, _ in refs]
                add([f"{prefix}{kind}/{n}/mean" for kind in kinds for n in per_point], mean_drift)
                add([f"{prefix}{kind}/{n}/var" for kind in kinds for n in per_point], var_drift)
            x = tap[self.model.blocks[k - 1].nonlinearity_input]
            percentiles = unit_percentiles(x, self.cfg.unit, self.fractions)
            add([f"{prefix}pct/{layer}/p{q}" for q in PERCENTILES], percentiles)
            add([f"{prefix}sat/{layer}"], saturated_fraction(x, self.bounds))
        return moments

    def _batch_noise(self, moments: list[tuple[Tensor, Tensor]], add) -> None:
        """``batchnoise/`` of every layer: each training-sized batch through the train-mode
        network with its own statistics, against the probe batch's ``moments`` (train view).
        With ``norm.ghost_batch=K`` the statistics are each group of K rows' (a norm's batch)."""
        points = [norm_input(block) for block in self.model.blocks]
        inputs = points_per_batch(self.model, self.chunks, points)
        for k, (layer, point) in enumerate(zip(inputs, points, strict=True), start=1):
            groups = layer.flatten(0, 1).unflatten(0, (-1, self.norm_batch))  # ghost batches apart
            chunk_mean, chunk_var = feature_moments(groups, batched=True)
            mean, var = moments[k - 1]
            i = POINTS.index(point)
            noise = batch_noise(chunk_mean, chunk_var, mean[i], var[i])
            add([f"batchnoise/layer{k}/mean", f"batchnoise/layer{k}/std"], torch.stack(noise))

    def _due(self, every: int, step: int) -> bool:
        """True at the first probe at or after each multiple of ``every`` (0: never), step 0 included."""
        return every > 0 and step // every != (step - int(self.cfg.every)) // every

    def layout(self) -> dict[str, dict[str, list]]:
        """TensorBoard custom-scalars charts: one per metric with all layers, pct per layer."""
        charts: dict[str, dict[str, list]] = {}
        for view in self.views:
            pre, title = view.prefix, "probes" if view.train_mode else "probes (inference network)"
            for kind in ("act", "drift", "drift0"):
                charts[f"{title}: {kind}"] = {
                    f"{pre}{kind}/{point}/{stat}": ["Multiline", [rf"^{pre}{kind}/layer\d+/{point}/{stat}$"]]
                    for point in POINTS for stat in ("mean", "var")
                }
            charts[f"{title}: pct"] = {
                f"{pre}pct/layer{k}": ["Multiline", [rf"^{pre}pct/layer{k}/p\d+$"]]
                for k in range(1, len(self.model.blocks) + 1)
            }
            charts[f"{title}: sat"] = {f"{pre}sat": ["Multiline", [rf"^{pre}sat/layer\d+$"]]}
        if self.chunks is not None:
            charts["probes: batchnoise"] = {
                f"batchnoise/{stat}": ["Multiline", [rf"^batchnoise/layer\d+/{stat}$"]]
                for stat in ("mean", "std")
            }
        if self.ics_every > 0:
            charts["probes: ics"] = {f"ics/{stat}": ["Multiline", [rf"^ics/layer\d+/{stat}$"]]
                                     for stat in ("l2", "cos")}
        if self.landscape_every > 0:
            charts["probes: landscape"] = {
                "landscape/loss_min, loss_max": ["Multiline", [r"^landscape/loss_m(in|ax)$"]],
                "landscape/loss_range": ["Multiline", [r"^landscape/loss_range$"]],
                "landscape/grad_change": ["Multiline", [r"^landscape/grad_change$"]],
                "landscape/beta": ["Multiline", [r"^landscape/beta$"]],
            }
        if self.curvature_every > 0:
            charts["probes: curvature"] = {
                "curvature/top_eig, along_grad": ["Multiline", [r"^curvature/(top_eig|along_grad)$"]],
                "curvature/residual": ["Multiline", [r"^curvature/residual$"]],
            }
        if self.snd_plan is not None:
            charts["probes: snd"] = {"snd": ["Multiline", [r"^snd/layer\d+$"]]}
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

    # -- loss landscape along the gradient
    def landscape(self, step: int, model: Net, optimizer: torch.optim.Optimizer, x: Tensor,
                  y: Tensor, recorder) -> None:
        """Log ``landscape/*`` (:mod:`bnlab.probes.landscape`) at the batch (x, y) of the update about to
        be made, with step sizes scaled by the learning rate in force."""
        from bnlab.probes.landscape import landscape

        lr = float(optimizer.param_groups[0]["lr"])
        stats = landscape(model, x, y, lr, loss_function(self.task))
        numbers = torch.stack(list(stats.values())).tolist()
        recorder.scalars(step, {f"landscape/{k}": v for k, v in zip(stats, numbers, strict=True)})

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """First and previous probe statistics of each view (CPU tensors: loadable with
        weights_only=True); the train view's at the top level, the inference view's under "infer"."""
        def pack(moments):
            if moments is None:
                return None
            return [{"mean": m.cpu(), "var": v.cpu()} for m, v in moments]

        state: dict[str, Any] = {}
        for view in self.views:
            refs = {"first": pack(view.first), "prev": pack(view.prev)}
            if view.train_mode:
                state.update(refs)
            else:
                state["infer"] = refs
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def unpack(packed):
            if packed is None:
                return None
            return [(p["mean"].to(self.device), p["var"].to(self.device)) for p in packed]

        for view in self.views:
            refs = state if view.train_mode else state.get("infer", {})
            view.first, view.prev = unpack(refs.get("first")), unpack(refs.get("prev"))
