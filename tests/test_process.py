"""A training process's threads (bnlab.run.process): never more compute threads than free cores."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bnlab.errors import UserError
from bnlab.run import process

from helpers import compose


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_free_cores_sees_a_core_kept_busy_by_another_process():
    busy = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready"
        free = process.free_cores(window=0.3)
        assert free is not None and 1 <= free <= process.usable_cores() - 1
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("free, expected", [(None, 2), (2, 2), (1, 1)])
def test_automatic_threads_are_the_share_of_the_free_cores(monkeypatch, free, expected):
    monkeypatch.setattr(process, "usable_cores", lambda: 2)
    monkeypatch.setattr(process, "free_cores", lambda window=0.05: free)
    monkeypatch.setattr(process, "parallel_jobs", lambda: 1)
    monkeypatch.setattr(process, "launcher_cpus", lambda: None)
    assert process.auto_threads(compose("data=digits")) == expected
    assert process.auto_threads(compose("data=digits", "train.threads=2")) == 2  # asked for: kept
    with pytest.raises(UserError, match="train.threads=3 is not valid: this process may use 2 cores"):
        process.auto_threads(compose("data=digits", "train.threads=3"))  # above the cores: refused
    monkeypatch.setattr(process, "parallel_jobs", lambda: 2)
    assert process.auto_threads(compose("data=digits")) == 1
    monkeypatch.setattr(process, "launcher_cpus", lambda: 8)
    assert process.auto_threads(compose("data=digits")) == 2  # a reservation above the cores is capped


def _model(*overrides: str):
    from bnlab.models import build_model

    cfg = compose("data=digits", *overrides)
    return cfg, build_model(cfg, (1, 8, 8), 10)


def test_forward_flops_count_the_layers_products_and_leave_the_model_as_it_was():
    import torch

    cfg, model = _model("model.widths=[32,16]", "norm=bn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 1, 8, 8)
    # 2 FLOPs per multiply-add: 64 -> 32 -> 16 -> 10, per row, for 60 rows
    assert process.forward_flops(model, x, 60) == 2 * 60 * (64 * 32 + 32 * 16 + 16 * 10)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_small_step_runs_on_one_thread_and_a_large_one_keeps_its_threads(monkeypatch):
    import torch

    x = torch.randn(4, 1, 8, 8)
    previous = torch.get_num_threads()
    try:
        cfg, model = _model()
        for rows, expected in ((60, 1), (10**6, 2)):  # ~4 kFLOP a row: 60 rows are small
            torch.set_num_threads(2)
            assert process.fit_threads_to_step(cfg, model, x, rows) == expected == torch.get_num_threads()
        asked, _ = _model("train.threads=2")
        torch.set_num_threads(2)
        assert process.fit_threads_to_step(asked, model, x, 60) == 2  # train.threads is kept
    finally:
        torch.set_num_threads(previous)
