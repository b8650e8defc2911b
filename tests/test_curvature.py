"""The curvature probe (bnlab.probes.curvature): Lanczos against known spectra and against the full
Hessian of a tiny network, the curvature along the gradient, the refusal of layers without double
backward, and that measuring never changes training."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bnlab.models import build_model
from bnlab.norms import build_norm
from bnlab.probes.activations import Prober
from bnlab.probes.curvature import HessianVectorProducts, curvature, lanczos_top, start_generator

from helpers import Point, compose, quadratic, train_in_process

CPU = torch.device("cpu")
F64 = torch.float64


def spectrum(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """A symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=F64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T




def test_lanczos_finds_the_largest_eigenvalue_not_the_largest_in_magnitude():
    # -9 is the largest in magnitude: power iteration would converge to it; lambda_max is 4.
    eigenvalues = [-9.0, -1.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0]
    a = spectrum(eigenvalues)
    top, residual = lanczos_top(lambda v: a @ v, torch.randn(8, dtype=F64), iters=20)
    assert top.item() == pytest.approx(4.0, rel=1e-12)
    assert residual.item() == 0.0  # Krylov space exhausted after 8 steps: exact, stopped early


@pytest.mark.parametrize("iters", [2, 4, 6])
def test_early_lanczos_bounds_the_top_eigenvalue_and_its_residual_is_the_true_one(iters):
    eigenvalues = torch.linspace(0.1, 5.0, 40, dtype=F64).tolist()
    a = spectrum(eigenvalues, seed=1)
    start = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=F64)
    top, residual = lanczos_top(lambda v: a @ v, start, iters)
    assert top.item() <= 5.0 + 1e-12  # Cauchy interlacing: a Ritz value never exceeds lambda_max
    # The residual bound: some eigenvalue lies within residual * |top| of the estimate.
    gap = min(abs(top.item() - lam) for lam in eigenvalues)
    assert gap <= residual.item() * abs(top.item()) + 1e-12
    # residual = ||A u - theta u|| / |theta| for the Ritz vector u, computed here from scratch.
    q = [start / start.norm()]
    for _ in range(iters - 1):
        w = a @ q[-1]
        for v in q:
            w = w - (v @ w) * v
        q.append(w / w.norm())
    basis = torch.stack(q, 1)
    values, vectors = torch.linalg.eigh(basis.T @ a @ basis)
    u = basis @ vectors[:, -1]
    assert top.item() == pytest.approx(values[-1].item(), rel=1e-10)
    assert residual.item() == pytest.approx(((a @ u - values[-1] * u).norm() / values[-1]).item(), rel=1e-6)


def test_more_lanczos_steps_converge():
    a = spectrum(torch.linspace(0.1, 5.0, 60, dtype=F64).tolist() + [9.0], seed=3)
    start = torch.randn(61, generator=torch.Generator().manual_seed(4), dtype=F64)
    results = [lanczos_top(lambda v: a @ v, start, iters) for iters in (3, 10, 30)]
    tops = [t.item() for t, _ in results]
    residuals = [r.item() for _, r in results]
    assert tops == sorted(tops) and residuals == sorted(residuals, reverse=True)
    assert tops[-1] == pytest.approx(9.0, rel=1e-8) and residuals[-1] < 1e-6  # an outlier converges first


def test_a_quadratic_gives_its_top_eigenvalue_and_the_curvature_along_its_gradient():
    eigenvalues = [0.5, 1.0, 2.0, 3.0, 7.0]
    a = spectrum(eigenvalues, seed=5)
    c = torch.zeros(5, dtype=F64)
    theta = torch.tensor([0.3, 0.1, -1.0, 2.0, 0.7], dtype=F64)
    stats = curvature(Point(theta), torch.zeros(1), c, quadratic(a), 20, start_generator(0, 0))
    g = a @ theta
    assert stats["top_eig"].item() == pytest.approx(7.0, rel=1e-12)
    assert stats["residual"].item() == 0.0
    assert stats["along_grad"].item() == pytest.approx((g @ a @ g / (g @ g)).item(), rel=1e-12)
    # Along an eigenvector the gradient's curvature is that eigenvalue.
    q, vals = torch.linalg.eigh(a)[1], torch.linalg.eigh(a)[0]
    along = curvature(Point(1.7 * q[:, 1]), torch.zeros(1), c, quadratic(a), 20, start_generator(0, 0))
    assert along["along_grad"].item() == pytest.approx(vals[1].item(), rel=1e-10)


def tiny_network(norm: str) -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(3, 4, bias=False), build_norm(norm, 4, 2), nn.Tanh(),
                         nn.Linear(4, 3)).double()


@pytest.mark.parametrize("norm", ["bn", "none", "iternorm"])
def test_a_tiny_network_matches_its_full_hessian(norm):
    model = tiny_network(norm)
    x, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 3, (10,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):  # the train-mode loss as a function of all parameters, one vector
        params = {n: t.view(s) for n, t, s in zip(names, flat.split([s.numel() for s in shapes]),
                                                   shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    hessian = torch.autograd.functional.hessian(loss, flat)
    g = torch.autograd.functional.jacobian(loss, flat)
    n = len(flat)
    exact = curvature(model, x, y, F.cross_entropy, n + 5, start_generator(0, 0))
    assert exact["top_eig"].item() == pytest.approx(torch.linalg.eigvalsh(hessian)[-1].item(), rel=1e-9)
    assert exact["residual"].item() < 1e-9
    assert exact["along_grad"].item() == pytest.approx((g @ hessian @ g / (g @ g)).item(), rel=1e-9)
    # Fewer steps than parameters: a lower bound, within its residual of an eigenvalue.
    early = curvature(model, x, y, F.cross_entropy, 6, start_generator(0, 0))
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert early["top_eig"].item() <= eigenvalues[-1].item() + 1e-9
    gap = (eigenvalues - early["top_eig"]).abs().min().item()
    assert gap <= early["residual"].item() * abs(early["top_eig"].item()) + 1e-9


def test_hessian_vector_products_treat_unused_parameters_as_zero():
    model = tiny_network("none")
    model.append(nn.Linear(3, 3).double())  # takes part in the loss ...
    unused = nn.Parameter(torch.ones(2, dtype=F64))
    model.register_parameter("unused", unused)  # ... this one does not
    x, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 3, (10,))
    hvp = HessianVectorProducts(model, x, y, F.cross_entropy)
    v = torch.randn(len(hvp.gradient), dtype=F64)
    hv = hvp(v)
    assert next(model.parameters()) is unused  # a module's own parameters come first
    assert hv[:2].abs().sum().item() == 0.0 and hvp.gradient[:2].abs().sum().item() == 0.0
    assert hv[2:].abs().sum().item() > 0


class Sink:
    def __init__(self) -> None:
        self.values: dict[int, dict[str, float]] = defaultdict(dict)

    def scalars(self, step, values):
        self.values[step].update(values)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_the_probe_logs_curvature_on_the_probe_batch_when_due(digits):
    cfg = compose("data=digits", "model.widths=[16,16]", "norm=noisy_bn", "probe.batch_size=100",
                  "probe.every=10", "probe.curvature_every=25", "probe.curvature_iters=30")
    torch.manual_seed(0)
    model = build_model(cfg, digits.shape, digits.num_classes)
    prober, sink = Prober(cfg, model, digits, CPU), Sink()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for step in range(0, 61, 10):
        prober.probe(step, sink)
    # The first probe at or after each multiple of 25.
    assert [s for s in sink.values if "curvature/top_eig" in sink.values[s]] == [0, 30, 50]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    logged = sink.values[30]
    # The same measurement by hand: the noise of the pass is the one the next step would draw.
    torch.set_rng_state(rng)
    expected = curvature(model, prober.x, prober.y, F.cross_entropy, 30, start_generator(cfg.seed, 30))
    for name, value in expected.items():
        assert logged[f"curvature/{name}"] == pytest.approx(value.item(), rel=1e-6), name
    assert logged["curvature/top_eig"] >= logged["curvature/along_grad"]  # g'Hg/g'g <= lambda_max
    assert logged["curvature/residual"] < 0.05


@pytest.mark.parametrize("norm", ["zca", "pca"])
def test_norms_that_refuse_double_backward_are_refused_before_training(tmp_path, capsys, norm):
    from bnlab.run.trainer import execute

    cfg = compose("train.progress=off", "train.threads=1", "data=digits", f"norm={norm}",
                  "model.widths=[16,16]", "probe.batch_size=100", "probe.curvature_every=10")
    run = tmp_path / "run"
    run.mkdir()
    assert execute(cfg, run, multirun=False) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnlab: error: probe.curvature_every=10 needs")
    assert "double backward" in err and "norm=iternorm" in err
    assert not run.exists()  # nothing of a run was kept
    # The same network without the curvature probe trains.
    assert train_in_process(tmp_path / "plain", "data=digits", f"norm={norm}", "model.widths=[16,16]",
                            "probe.batch_size=100", "train.steps=2") == "completed"
