"""hydra/launcher=batched: many runs as one vectorized program, each still its own run.

The reference is always the standalone run of the same config (bnlab's own trainer, or torch's
optimizers stepping one model at a time): a member must train, log, checkpoint and resume as it.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bnlab.batched.group import not_vectorized, train_group
from bnlab.batched.launch import Job, plan
from bnlab.batched.program import Program, unvectorizable
from bnlab.models import build_model
from bnlab.run.optim import build_optimizer
from bnlab.run.trainer import run
from bnlab.rundir.names import CHECKPOINT

from helpers import bnlab, compose, train_in_process

SMALL = ["data=digits", "model.widths=[32,32]", "train.batch_size=32", "train.steps=60",
         "train.log_every=10", "train.eval_every=30", "train.checkpoint_every=30", "probe.every=20",
         "probe.batch_size=200", "train.progress=off", "train.threads=1"]


def scalars(run_dir: Path) -> dict[tuple[int, str], float]:
    with open(run_dir / "scalars.csv") as f:
        rows = list(csv.DictReader(f))
    table = {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows}
    assert len(table) == len(rows), "a (step, tag) logged twice"
    return table


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_scalars(got: dict, want: dict, rel: float = 1e-4, abs_: float = 1e-4) -> None:
    """The same tags at the same steps, equal up to float rounding (timings excepted)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if not key[1].startswith("perf/"):
            assert got[key] == pytest.approx(value, rel=rel, abs=abs_, nan_ok=True), key


def group_jobs(root: Path, overrides: list[str], variants: list[list[str]]) -> list[tuple]:
    jobs = []
    for i, variant in enumerate(variants):
        run_dir = root / str(i)
        run_dir.mkdir(parents=True)
        jobs.append((compose(*overrides, *variant), run_dir))
    return jobs


# ---------------------------------------------------------------- the program (torch.func)
@pytest.mark.parametrize("norm, model", [("bn", "mlp"), ("ln", "mlp"), ("gn", "mlp"), ("none", "mlp"),
                                         ("brn", "mlp"), ("bn", "cnn")])
def test_a_program_step_is_each_member_stepping_alone(norm: str, model: str) -> None:
    """Three members with their own lr, momentum and weight decay: after 15 steps of the program
    every parameter, running statistic and optimizer state equals what torch's optimizer (SGD,
    AdamW) gives the member alone. In float64, so that equal means equal: in float32 the CNN's
    BN gradients under vmap differ from the standalone ones by up to 1e-4 relative, where
    cancellation amplifies the rounding of sums taken in another order."""
    from omegaconf import OmegaConf

    from bnlab.run.optim import loop_update

    torch.set_num_threads(1)
    position = "after_act" if norm == "ln" else "before_act"
    shape = ["model.widths=[16,8]"] if model == "mlp" else \
        ["model.channels=[4,6]", "model.paddings=[2,2]", "model.widths=[12]"]
    brn = ["norm.warmup_steps=2", "norm.ramp_steps=5", "norm.d_ramp_steps=5"] if norm == "brn" else []
    for optim in ("sgd", "adam"):
        base = compose("data=digits", f"norm={norm}", f"norm.position={position}", f"model={model}", *shape,
                       *brn, f"optim={optim}")
        cfgs = []
        for lr, momentum, decay in ((0.1, 0.0, 0.0), (0.05, 0.9, 0.001), (0.2, 0.5, 0.01)):
            cfg = copy.deepcopy(base)
            OmegaConf.update(cfg, "optim", {"lr": lr / (10 if optim == "adam" else 1),
                                            "momentum": momentum, "weight_decay": decay}, merge=True)
            cfgs.append(cfg)
        nets = []
        for seed, cfg in enumerate(cfgs):
            torch.manual_seed(seed)
            nets.append(build_model(cfg, (1, 8, 8), 10).double())
        alone = copy.deepcopy(nets)
        optimizers = [build_optimizer(c.optim, net) for c, net in zip(cfgs, alone, strict=True)]
        own = [build_optimizer(c.optim, net) for c, net in zip(cfgs, nets, strict=True)]
        program = Program(nets, [loop_update(o) for o in own], "classification")
        g = torch.Generator().manual_seed(0)
        for _ in range(15):
            x = torch.randn(3, 16, 1, 8, 8, generator=g, dtype=torch.float64)
            y = torch.randint(0, 10, (3, 16), generator=g)
            losses, _ = program.step(x, y)
            for k, (net, opt) in enumerate(zip(alone, optimizers, strict=True)):
                loss = F.cross_entropy(net(x[k]), y[k])
                opt.zero_grad()
                loss.backward()
                opt.step()
                assert losses[k].item() == pytest.approx(loss.item(), rel=1e-12)
        for net, ref in zip(nets, alone, strict=True):  # nets[k] are views of the program's rows
            for (name, got), want in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
                assert torch.allclose(got.double(), want.double(), rtol=1e-10, atol=1e-12), (optim, name)
        for mine, theirs in zip(own, optimizers, strict=True):
            for a, b in zip(mine.state_dict()["state"].values(), theirs.state_dict()["state"].values(),
                            strict=True):
                assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-10, atol=1e-12) for k in a)


def test_layers_that_do_not_map_over_members_are_refused() -> None:
    for overrides, mapped in ((["norm=bn"], True), (["norm=bn", "norm.impl=scratch"], False),
                              (["norm=zca"], False), (["norm=noisy_bn"], False), (["norm=brn"], True),
                              (["norm=gn", "model=cnn"], True), (["norm=none"], True)):
        cfg = compose("data=digits", *overrides)
        net = build_model(cfg, (1, 8, 8), 10)
        assert (unvectorizable(net) is None) == mapped, overrides
        assert (not_vectorized(cfg) is None) == mapped, overrides
    from bnlab.norms import build_norm

    assert not build_norm("bn", 4, momentum=None).maps_over_members  # the cumulative average's host factor
    assert unvectorizable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))


# ---------------------------------------------------------------- members against standalone runs
CNN = ["model=cnn", "model.channels=[4,8]", "model.paddings=[2,2]", "model.widths=[32]"]


@pytest.mark.parametrize("norm, optim", [("bn", ["optim.momentum=0.9", "optim.weight_decay=0.0001"]),
                                         ("ln", ["optim=adam", "optim.lr=0.01"]),
                                         ("none", []),
                                         ("bn", [*CNN, "optim.momentum=0.9"])])
def test_each_member_trains_as_its_standalone_run(tmp_path: Path, norm: str, optim: list[str]) -> None:
    """Same scalars (losses, accuracies, probes) at the same steps, and a checkpoint of the
    standalone format holding the member's own weights only; an MLP and a CNN."""
    overrides = [*SMALL, f"norm={norm}", *optim]
    jobs = group_jobs(tmp_path / "batched", overrides, [["seed=0"], ["seed=1"]])
    assert train_group(jobs) == ["completed", "completed"]
    for seed, (_, member) in enumerate(jobs):
        alone = tmp_path / "alone" / str(seed)
        assert train_in_process(alone, *overrides, f"seed={seed}") == "completed"
        got, want = scalars(member), scalars(alone)
        assert_same_scalars(got, want)
        assert abs(got[(60, "test/acc")] - want[(60, "test/acc")]) <= 0.01
        assert summary(member)["status"] == "completed" and summary(member)["steps"] == 60
        mine, theirs = (torch.load(d / CHECKPOINT, weights_only=True) for d in (member, alone))
        assert mine.keys() == theirs.keys()
        shapes = [{k: v.shape for k, v in c["model"].items()} for c in (mine, theirs)]
        assert shapes[0] == shapes[1]
        assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        assert {i: sorted(s) for i, s in mine["optimizer"]["state"].items()} == \
               {i: sorted(s) for i, s in theirs["optimizer"]["state"].items()}
        assert mine["stream"]["pos"] == theirs["stream"]["pos"]
        # a view saved with torch.save would carry every member's rows
        sizes = [(d / CHECKPOINT).stat().st_size for d in (member, alone)]
        assert sizes[0] < 1.2 * sizes[1]


def test_a_member_continues_alone_with_bnlab_train_resume(tmp_path: Path) -> None:
    """A member's checkpoint is a standalone run's: resumed by the trainer, it ends where a
    standalone run of 90 steps ends."""
    overrides = [*SMALL, "norm=bn", "optim.momentum=0.9"]
    jobs = group_jobs(tmp_path / "batched", overrides, [["seed=0"], ["seed=1"]])
    assert train_group(jobs) == ["completed", "completed"]
    member = jobs[1][1]
    cfg = compose("train.progress=off", "train.threads=1", *overrides, "seed=1", "train.steps=90",
                  f"resume={member}")
    assert run(cfg, member) == "completed"
    alone = tmp_path / "alone"
    train_in_process(alone, *overrides, "seed=1", "train.steps=90")
    assert_same_scalars(scalars(member), scalars(alone))


def test_a_diverging_member_leaves_the_program_and_the_others_go_on(tmp_path: Path) -> None:
    """lr=1e6 without normalization diverges; its partners (lr 0.1) complete with exactly the
    scalars of their standalone runs, and the diverged member stops where a standalone one does."""
    overrides = [*SMALL, "norm=none", "activation=relu", "probe=off"]
    variants = [["optim.lr=0.1", "seed=0"], ["optim.lr=1e6", "seed=0"], ["optim.lr=0.1", "seed=1"]]
    jobs = group_jobs(tmp_path / "batched", overrides, variants)
    assert train_group(jobs) == ["completed", "diverged", "completed"]
    for variant, (_, member) in zip(variants, jobs, strict=True):
        alone = tmp_path / "alone" / "_".join(variant)
        status = train_in_process(alone, *overrides, *variant)
        assert summary(member)["status"] == status
        assert summary(member).get("diverged_step") == summary(alone).get("diverged_step")
        assert_same_scalars(scalars(member), scalars(alone))
    assert summary(jobs[1][1])["diverged_step"] == 10


# ---------------------------------------------------------------- grouping
def test_jobs_share_a_program_only_when_they_differ_in_the_varying_keys() -> None:
    from omegaconf import OmegaConf

    tasks = {name: OmegaConf.to_container(compose(*overrides), resolve=True) for name, overrides in
             {"bn": [], "ln": ["norm=ln"], "cnn": ["model=cnn"], "zca": ["norm=zca"]}.items()}

    def job(idx: int, kind: str, seed: int, lr: float = 0.1) -> Job:
        task = copy.deepcopy(tasks[kind])
        task["seed"], task["optim"]["lr"] = seed, lr
        return Job(idx, [], None, Path(f"/sweep/{idx}"), task, str(idx))

    jobs = [job(0, "bn", 0), job(1, "bn", 1), job(2, "bn", 0, lr=0.5), job(3, "ln", 0), job(4, "ln", 1),
            job(5, "cnn", 0), job(6, "zca", 2), job(7, "zca", 3), job(8, "cnn", 1)]
    units = [[j.idx for j in unit] for unit in plan(jobs, ["seed", "optim.lr"], max_group=0)]
    assert units == [[0, 1, 2], [3, 4], [5, 8], [6], [7]]  # ZCA's eigendecomposition runs one by one
    units = [[j.idx for j in unit] for unit in plan(jobs[:3], ["seed"], max_group=0)]
    assert units == [[0, 1], [2]]
    units = [[j.idx for j in unit] for unit in plan(jobs[:3], ["seed", "optim.lr"], max_group=2)]
    assert units == [[0, 1], [2]]
    # runs resumed from different steps cannot step together
    later = job(10, "bn", 5)
    later.start_step = 30
    assert [[j.idx for j in u] for u in plan([*jobs[:2], later], ["seed"], 0)] == [[0, 1], [10]]
    # two jobs writing one directory never share a program
    twin = job(9, "bn", 0)
    twin.run_dir = jobs[0].run_dir
    assert [[j.idx for j in u] for u in plan([jobs[0], twin, jobs[1]], ["seed"], 0)] == [[0], [9], [1]]


# ---------------------------------------------------------------- through the command line
def test_a_batched_sweep_writes_every_run_directory_and_the_report_reads_it(tmp_path: Path) -> None:
    """Two programs (norm none and bn, two seeds each) and two ZCA runs that fall back to the
    basic launcher's way; every run directory has Hydra's files and a completed summary."""
    sweep = tmp_path / "sweep"
    done = bnlab("train", "-m", "norm=none,bn,zca", "seed=0,1", *SMALL, "probe=off", "train.steps=30",
                 "hydra/launcher=batched", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 in 2 vectorized programs, 2 one by one" in done.stdout + done.stderr
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == [f"norm={n},seed={s}" for n in ("bn", "none", "zca") for s in (0, 1)]
    from omegaconf import OmegaConf

    for name in runs:
        run_dir = sweep / name
        assert summary(run_dir)["status"] == "completed"
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed == int(name[-1])
        assert f"seed={name[-1]}" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        assert list(run_dir.glob("events.out.tfevents.*"))
    report = bnlab("report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (sweep / "report" / "report.md").read_text()
    for norm in ("none", "bn", "zca"):
        assert f"norm={norm}" in text
    assert text.count("2/2") >= 3


def test_a_killed_group_resumes_when_its_sweep_command_runs_again(tmp_path: Path) -> None:
    """SIGKILL mid-run; the same command with the same hydra.sweep.dir continues every member
    from its checkpoint, and each ends with the scalars of an uninterrupted program."""
    sweep = tmp_path / "sweep"
    overrides = [*SMALL, "probe=off", "train.steps=400", "train.eval_every=200",
                 "train.checkpoint_every=40", "train.log_every=50"]  # resumed between logs
    command = [sys.executable, "-m", "bnlab", "train", "-m", "seed=0,1,2", *overrides,
               "hydra/launcher=batched", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data")}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    members = [sweep / f"seed={s}" for s in range(3)]
    deadline = time.monotonic() + 180
    steps = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            steps = min(summary(m)["steps"] for m in members)
        except (OSError, ValueError, KeyError):
            steps = 0
        if steps >= 100:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 100 <= steps < 400, "killed too late (or never started)"
    assert {summary(m)["status"] for m in members} == {"running"}
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continues from step" in again.stdout + again.stderr
    reference = group_jobs(tmp_path / "reference", overrides, [[f"seed={s}"] for s in range(3)])
    assert train_group(reference) == ["completed"] * 3
    for member, (_, ref) in zip(members, reference, strict=True):
        assert summary(member)["status"] == "completed" and summary(member)["steps"] == 400
        got, want = scalars(member), scalars(ref)
        assert_same_scalars(got, want, rel=1e-6, abs_=1e-7)
        assert got[(400, "test/acc")] == want[(400, "test/acc")]
    # Once finished, the sweep is left as it is.
    third = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "3 already finished" in third.stdout + third.stderr
