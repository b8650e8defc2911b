"""The loss landscape along the gradient (bnlab.probes.landscape): the definitions on a quadratic with a
known Hessian and on a real network, and that measuring never changes training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bnlab.models import build_model
from bnlab.probes.landscape import landscape, step_sizes

from helpers import Point, compose, quadratic, train_in_process

CPU = torch.device("cpu")




@pytest.fixture
def hessian():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    eigenvalues = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64)
    return q, eigenvalues, q @ torch.diag(eigenvalues) @ q.T


def test_step_sizes_span_half_to_four_learning_rates():
    etas = step_sizes(0.1)
    assert etas[0].item() == pytest.approx(0.05) and etas[-1].item() == pytest.approx(0.4)
    assert len(etas) == 8 and torch.all(etas.diff() > 0)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_beta_on_a_quadratic_is_the_curvature_along_the_gradient(hessian, k):
    q, eigenvalues, h = hessian
    c = torch.zeros(5, dtype=torch.float64)
    model = Point(1.7 * q[:, k])  # theta - c along eigenvector k: g = lambda_k theta
    stats = landscape(model, torch.zeros(1), c, lr=0.1, loss_fn=quadratic(h))
    assert stats["beta"].item() == pytest.approx(eigenvalues[k].item(), rel=1e-9)


def test_every_statistic_on_a_quadratic_matches_its_closed_form(hessian):
    _, eigenvalues, h = hessian
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    theta = torch.tensor([0.3, 0.1, -1.0, 2.0, 0.7], dtype=torch.float64)
    model = Point(theta)
    lr = 0.05
    stats = landscape(model, torch.zeros(1), c, lr=lr, loss_fn=quadratic(h))
    # Along -g: L(theta - eta g) = L - eta |g|^2 + eta^2/2 g'Hg;  grad(theta - eta g) - g = -eta H g.
    g = h @ (theta - c)
    etas = torch.linspace(0.5, 4.0, 8, dtype=torch.float64) * lr
    loss0 = 0.5 * (theta - c) @ h @ (theta - c)
    losses = loss0 - etas * (g @ g) + etas**2 / 2 * (g @ h @ g)
    assert stats["loss_min"].item() == pytest.approx(losses.min().item(), rel=1e-12)
    assert stats["loss_max"].item() == pytest.approx(losses.max().item(), rel=1e-12)
    assert stats["loss_range"].item() == pytest.approx((losses.max() - losses.min()).item(), rel=1e-9)
    assert stats["grad_change"].item() == pytest.approx((etas[-1] * (h @ g).norm()).item(), rel=1e-9)
    beta = ((h @ g).norm() / g.norm()).item()
    assert stats["beta"].item() == pytest.approx(beta, rel=1e-9)
    assert eigenvalues.min().item() < beta < eigenvalues.max().item()  # g is no eigenvector
    # theta moved nowhere: the model is as it was.
    assert torch.equal(model.theta.detach(), theta)


def make_model(digits, *overrides):
    cfg = compose("data=digits", "model.widths=[32,32]", *overrides)
    torch.manual_seed(0)
    return build_model(cfg, digits.shape, digits.num_classes)


def test_a_network_matches_moving_a_copy_of_it_by_hand(digits):
    model = make_model(digits, "norm=bn", "activation=tanh")
    x, y = digits.train.x[:64], digits.train.y[:64]
    lr = 0.2
    stats = landscape(model, x, y, lr, F.cross_entropy)

    reference = copy.deepcopy(model).train()
    params = list(reference.parameters())
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    losses, changes, ratios = [], [], []
    for eta in torch.linspace(0.5, 4.0, 8, dtype=torch.float64).tolist():
        moved = copy.deepcopy(reference)
        with torch.no_grad():
            for p, gi in zip(moved.parameters(), g, strict=True):
                p.sub_(eta * lr * gi)
        loss = F.cross_entropy(moved(x), y)  # train mode: the moved network's batch statistics
        g2 = torch.autograd.grad(loss, list(moved.parameters()))
        change = torch.cat([(a - b).double().flatten() for a, b in zip(g2, g, strict=True)]).norm()
        losses.append(loss.item())
        changes.append(change.item())
        ratios.append(change.item() / (eta * lr * torch.cat([t.double().flatten() for t in g]).norm().item()))
    assert stats["loss_min"].item() == pytest.approx(min(losses), rel=1e-5)
    assert stats["loss_max"].item() == pytest.approx(max(losses), rel=1e-5)
    assert stats["grad_change"].item() == pytest.approx(max(changes), rel=1e-4)
    assert stats["beta"].item() == pytest.approx(max(ratios), rel=1e-4)
    assert stats["loss_max"] > stats["loss_min"] and stats["beta"] > 0


def test_model_optimizer_running_statistics_and_rng_are_untouched(digits):
    model = make_model(digits, "norm=bn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = digits.train.x[:64], digits.train.y[:64]
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # momentum buffers, running statistics and .grad all exist now
    model.eval()
    state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    landscape(model, x, y, 0.1, F.cross_entropy)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p, before in zip(optimizer.state_dict()["state"].values(), optim_state["state"].values(),
                         strict=True):
        assert torch.equal(p["momentum_buffer"], before["momentum_buffer"])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training


def test_stochastic_layers_hold_their_noise_along_the_line(digits):
    model = make_model(digits, "norm=noisy_bn")
    x, y = digits.train.x[:64], digits.train.y[:64]
    rng = torch.get_rng_state()
    # Steps of length 0: every point is theta itself, so only fresh noise could change the loss.
    stats = landscape(model, x, y, 0.1, F.cross_entropy, etas=torch.zeros(3, dtype=torch.float64))
    assert stats["grad_change"].item() == 0.0 and stats["beta"].item() == 0.0
    assert stats["loss_min"].item() == stats["loss_max"].item()
    assert torch.equal(torch.get_rng_state(), rng)


def test_report_draws_the_landscape_figure_from_the_runs(tmp_path):
    """`bnlab report` reads landscape/* and draws landscape.png: (a) the seeds' mean loss_min to
    mean loss_max, (b, c) each group's mean over seeds with a min..max band."""
    import csv

    from omegaconf import OmegaConf

    from bnlab.report.command import REPORT_TAGS, build_report, main
    from bnlab.report.figures import landscape as landscape_figure
    from bnlab.rundir.reader import find_runs, load_scalars

    sweep = tmp_path / "sweep"
    for norm in ("none", "bn"):
        for seed in (0, 1):
            overrides = ["data=digits", f"norm={norm}", f"seed={seed}", "train.steps=20",
                         "train.log_every=10", "train.eval_every=20", "probe.every=20",
                         "probe.batch_size=100", "model.widths=[16,16]", "probe.landscape_every=5"]
            run = sweep / f"norm={norm},seed={seed}"
            assert train_in_process(run, *overrides) == "completed"
            (run / ".hydra").mkdir()
            OmegaConf.save(compose("train.progress=off", "train.threads=1", *overrides),
                           run / ".hydra" / "config.yaml")
            OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert (out / "landscape.png").stat().st_size > 10_000
    assert "landscape.png" in (out / "report.md").read_text()

    import matplotlib

    matplotlib.use("Agg")
    runs = find_runs([sweep])
    load_scalars(runs, tags=list(REPORT_TAGS))
    report = build_report(runs, [sweep])
    bn = next(g for g in report.groups if "bn" in g.label)
    fig = landscape_figure(report.groups, {g.label: f"C{i}" for i, g in enumerate(report.groups)})
    beta = {}
    for run in bn.completed:
        with open(run.path / "scalars.csv") as f:
            beta[run.seed] = {int(r["step"]): float(r["value"]) for r in csv.DictReader(f)
                              if r["tag"] == "landscape/beta"}
    assert set(beta[0]) == {5, 10, 15, 20}
    ax_beta = fig.axes[2]
    line = next(line for line in ax_beta.lines if line.get_label().startswith(bn.label))
    expected = [(beta[0][s] + beta[1][s]) / 2 for s in (5, 10, 15, 20)]
    assert list(line.get_xdata()) == [5, 10, 15, 20]
    assert list(line.get_ydata()) == pytest.approx(expected, rel=1e-12)
