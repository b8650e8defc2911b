"""Multi-process training: cross-replica BN against one process on the full batch, and torchrun.

Everything runs on the CPU with the gloo backend and 2 processes.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnlab.errors import UserError
from bnlab.models import build_model
from bnlab.norms import build_norm, frozen_stats
from bnlab.norms.batchnorm import BatchNorm
from bnlab.norms.sync import SyncBatchNorm, convert_sync
from bnlab.run.distributed import _resolve_run_dir, agree_on_run_dir, replica

from helpers import compose, train_in_process

WORLD = 2
STEPS = 3  # forward/backward passes, so that running statistics move more than once


def _global_batch(dims: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch with a large mean (where sum-of-squares variance loses precision) and a
    fixed upstream gradient G; the loss is sum(y * G)."""
    g = torch.Generator().manual_seed(100 + step)
    shape = (8, 3) if dims == 2 else (8, 3, 4, 5)
    x = 5.0 + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    return x, torch.randn(shape, generator=g, dtype=torch.float64)


def _affine(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=layer.weight.dtype))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 0.7], dtype=layer.bias.dtype))


def _sync_worker(rank: int, init_file: str, out_dir: str, dims: int, device: str) -> None:
    # gloo all-reduces CUDA tensors too, so two processes can share one GPU here (NCCL cannot).
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        layer = SyncBatchNorm(3, dims, momentum=0.1).double().to(device)
        _affine(layer)
        results = []
        for step in range(STEPS):
            x, grad = (t.to(device) for t in _global_batch(dims, step))
            x = x.chunk(WORLD)[rank].clone().requires_grad_(True)
            layer.zero_grad()
            y = layer(x)
            (y * grad.chunk(WORLD)[rank]).sum().backward()
            results.append({"y": y.detach(), "x_grad": x.grad, "w_grad": layer.weight.grad.clone(),
                            "b_grad": layer.bias.grad.clone()})
        x0 = _global_batch(dims, 0)[0].to(device).chunk(WORLD)[rank]
        before = layer.running_mean.clone(), layer.running_var.clone()
        with frozen_stats(layer):  # the probes' mode: batch statistics, running ones untouched
            layer(x0)
        frozen_kept = torch.equal(before[0], layer.running_mean) and torch.equal(before[1], layer.running_var)
        layer.eval()
        eval_y = layer(x0)
        state = {"steps": results, "running_mean": layer.running_mean, "running_var": layer.running_var,
                 "tracked": layer.num_batches_tracked, "frozen_kept": frozen_kept, "eval_y": eval_y}
        torch.save(_to_cpu(state), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [2, 4])
def test_sync_bn_on_two_processes_equals_bn_on_the_full_batch(tmp_path: Path, dims: int,
                                                              device: str) -> None:
    """Outputs, input and parameter gradients, running statistics: torch's BN on the whole batch."""
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path), dims, device), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    reference = (nn.BatchNorm1d if dims == 2 else nn.BatchNorm2d)(3, momentum=0.1).double()
    _affine(reference)
    for step in range(STEPS):
        x, grad = _global_batch(dims, step)
        x.requires_grad_(True)
        reference.zero_grad()
        y = reference(x)
        (y * grad).sum().backward()
        got = [r["steps"][step] for r in ranks]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach())
        torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), x.grad)
        # Each replica's parameter gradient is its shard's share; DDP adds them up (and averages).
        torch.testing.assert_close(sum(g["w_grad"] for g in got), reference.weight.grad)
        torch.testing.assert_close(sum(g["b_grad"] for g in got), reference.bias.grad)
    reference.eval()
    eval_y = reference(_global_batch(dims, 0)[0])
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean)
        torch.testing.assert_close(r["running_var"], reference.running_var)
        assert int(r["tracked"]) == STEPS
        assert r["frozen_kept"]
    torch.testing.assert_close(torch.cat([r["eval_y"] for r in ranks]), eval_y.detach())


def test_convert_sync_swaps_bn_layers_and_keeps_their_state() -> None:
    cfg = compose("norm=bn", "data=digits", "model=mlp", "model.widths=[16,12]", "probe=off")
    model = build_model(cfg, (1, 8, 8), 10)
    torch.manual_seed(0)
    model.train()
    for _ in range(3):  # move running statistics and make the affine parameters non-trivial
        model(torch.randn(32, 1, 8, 8)).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    x = torch.randn(16, 1, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    eval_before = model(x)

    convert_sync(model)
    norms = [b.norm for b in model.blocks]
    assert all(type(n) is SyncBatchNorm for n in norms)
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(n.training for n in norms)  # the mode is carried over too
    torch.testing.assert_close(model(x), eval_before)


def test_convert_sync_handles_torch_impl_and_leaves_other_norms_alone() -> None:
    torch_bn = build_norm("bn", 6, dims=4, impl="torch")
    with torch.no_grad():
        torch_bn.running_mean.fill_(0.25)
        torch_bn.weight.fill_(2.0)
    holder = nn.Sequential(torch_bn, build_norm("ln", 6, dims=4))
    convert_sync(holder)
    assert type(holder[0]) is SyncBatchNorm and holder[0].dims == 4
    assert torch.all(holder[0].running_mean == 0.25) and torch.all(holder[0].weight == 2.0)
    assert not isinstance(holder[1], BatchNorm)  # layer norm has no batch statistics to share
    # In one process SyncBatchNorm is BN: compare with torch's layer in train mode.
    x = torch.randn(4, 6, 3, 3)
    reference = nn.BatchNorm2d(6)
    with torch.no_grad():
        reference.weight.fill_(2.0)
        reference.running_mean.fill_(0.25)
    torch.testing.assert_close(holder[0](x), reference(x))
    torch.testing.assert_close(holder[0].running_var, reference.running_var)


def test_replica_reads_torchruns_environment() -> None:
    assert replica({}) == replica({"RANK": "1"})  # not under torchrun: rank 0 of 1
    me = replica({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (me.rank, me.world_size, me.local_rank, me.is_writer) == (3, 4, 1, False)


def test_run_dir_is_resolved_once_from_the_pattern_or_the_override(monkeypatch) -> None:
    monkeypatch.setenv("BNLAB_RUN_ID", "abc123")
    resolved = _resolve_run_dir([], "outputs/${now:%Y}/x-${oc.env:BNLAB_RUN_ID,run}")
    assert resolved.startswith("outputs/2") and resolved.endswith("/x-abc123")
    assert _resolve_run_dir(["seed=1", "hydra.run.dir='/tmp/a b'"], "ignored") == "/tmp/a b"
    with pytest.raises(UserError, match="hydra.run.dir"):
        _resolve_run_dir(["hydra.run.dir=r/${hydra:job.name}"], "ignored")


def test_torchrun_refuses_a_sweep() -> None:
    with pytest.raises(UserError, match="sweep"):
        agree_on_run_dir(["-m", "seed=0,1"], "outputs/x")


def _rows(path: Path) -> list[tuple[int, str, float]]:
    with open(path) as f:
        return [(int(r["step"]), r["tag"], float(r["value"])) for r in csv.DictReader(f)]


def test_torchrun_two_processes_train_like_one_process_on_the_full_batch(tmp_path: Path) -> None:
    """One run directory, written once by rank 0; with norm.sync=true the two shards of each
    global batch give the weights one process gets from the whole batch."""
    overrides = ["data=digits", "norm=bn", "norm.sync=true", "train.steps=20",
                 "train.batch_size=32", "train.log_every=5", "train.eval_every=10",
                 "train.checkpoint_every=10", "probe=off", "optim.momentum=0.9"]
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "bnlab", "train", *overrides, "train.progress=off"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert len(runs) == 1, runs
    run = runs[0]
    assert len(list((tmp_path / "outputs").rglob(".hydra"))) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    rows = _rows(run / "scalars.csv")
    assert not [key for key, n in Counter((s, t) for s, t, _ in rows).items() if n > 1]
    assert [s for s, t, _ in rows if t == "train/loss"] == [5, 10, 15, 20]

    single = tmp_path / "single"
    assert train_in_process(single, *overrides, "norm.sync=false") == "completed"
    torchrun_state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    single_state = torch.load(single / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torchrun_state.keys() == single_state.keys()
    for key, value in single_state.items():
        torch.testing.assert_close(torchrun_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    single_loss = [v for s, t, v in _rows(single / "scalars.csv") if t == "train/loss"]
    torch.testing.assert_close([v for s, t, v in rows if t == "train/loss"], single_loss,
                               rtol=1e-4, atol=1e-6)
