"""A norm written the way torch writes one works in bnlab, as docs/norms.md's "Adding a norm" says.

The three code blocks of that section are added, as they stand, to a copy of bnlab; the copy then
trains the new norm on digits with every probe on (train and eval views), with probes off, and
killed and resumed. The layer updates its running mean in place in training mode and knows
nothing of bnlab's frozen-statistics flag or of vmap: the measurement passes must protect
themselves (saved and restored buffers, vmap only for layers that opt in).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.norms import Norm, frozen_stats, maps_over_batches, preserved_buffers

from helpers import REPO, scalars, wait_for_checkpoint

SECTION = "## Adding a norm"
STEPS = ["data=digits", "norm=mean_bn", "train.steps=600", "train.log_every=20", "train.eval_every=200",
         "train.checkpoint_every=100", "probe.batch_size=200", "train.threads=1", "train.progress=off"]
PROBES_ON = ["probe=full", "probe.mode=both", "probe.every=100", "probe.ics_every=200",
             "probe.landscape_every=300"]


def example_blocks() -> dict[str, str]:
    """{path: code} of the section's fenced blocks, each naming its file on its first line."""
    text = (REPO / "docs" / "norms.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", section, re.DOTALL)
    found = {}
    for block in blocks:
        path = re.match(r"# (\S+)", block).group(1).rstrip(":")
        found[path] = block
    return found


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A copy of bnlab with the docs' norm added in the documented places."""
    root = tmp_path_factory.mktemp("own-norm")
    for name in ("bnlab", "configs", "hydra_plugins"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    blocks = example_blocks()
    assert set(blocks) == {"bnlab/config/norm_options.py", "bnlab/norms/mean_bn.py",
                           "configs/norm/mean_bn.yaml"}, "the docs name three places"
    options = root / "bnlab" / "config" / "norm_options.py"
    text = options.read_text()
    anchor = text.index("\nNORM_SCHEMAS")
    text = text[:anchor] + "\n\n" + blocks["bnlab/config/norm_options.py"] + text[anchor:]
    text, added = re.subn(r"for options in \(", "for options in (MeanBNOptions, ", text)
    assert added == 1
    options.write_text(text)
    for path in ("bnlab/norms/mean_bn.py", "configs/norm/mean_bn.yaml"):
        (root / path).write_text(blocks[path])
    return root


def train(package: Path, run: Path | None, *overrides: str, wait: bool = True):
    """`bnlab train` of the copy into ``run`` (None: the overrides say where, as resume= does)."""
    env = {**os.environ, "BNLAB_DATA": str(package / "data"), "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": str(package)}
    env.pop("HYDRA_FULL_ERROR", None)
    where = [f"hydra.run.dir={run}"] if run else []
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", "train", *overrides, *where], cwd=package,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return proc


TRAINING = ("train/loss", "train/acc", "test/loss", "test/acc", "test/acc_train_mode")


def training_rows(run: Path) -> list[tuple[int, str, float]]:
    return [row for row in scalars(run) if row[1] in TRAINING]


def test_the_docs_norm_trains_probes_and_resumes_exactly(package, tmp_path):
    probed = tmp_path / "probed"
    train(package, probed, *STEPS, *PROBES_ON)
    rows = scalars(probed)
    tags = {tag for _, tag, _ in rows}
    assert {"test/acc_train_mode", "infer/act/layer1/pre/mean", "ics/layer2/l2", "landscape/beta"} <= tags
    final = {tag: v for step, tag, v in rows if step == 600}
    assert final["test/acc"] > 0.8  # it learns: centring alone, on digits

    plain = tmp_path / "plain"
    train(package, plain, *STEPS, "probe=off")
    assert training_rows(plain) == training_rows(probed)  # probes never change training, bit for bit

    killed = tmp_path / "killed"
    proc = train(package, killed, *STEPS, *PROBES_ON, wait=False)
    wait_for_checkpoint(killed, proc, 100)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(package, None, f"resume={killed}")
    assert scalars(killed) == scalars(probed)  # every step once, every value equal


# ---------------------------------------------------------------- the mechanisms, in this process
class TorchStyleMeanBN(Norm):
    """The docs' layer: a running mean updated in place in training mode, no flags honoured."""

    uses_batch_statistics = True

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x):
        if self.training:
            mean = x.mean(0)
            with torch.no_grad():
                self.running_mean.lerp_(mean, 0.1)
            return x - mean + self.bias
        return x - self.running_mean + self.bias


def test_a_measurement_leaves_every_buffer_as_it_was_whatever_the_layer_does():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), TorchStyleMeanBN(6), nn.BatchNorm1d(6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with frozen_stats(net):
        net(torch.randn(8, 4) + 3)
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert "1.running_mean" in changed and "2.running_var" in changed  # the layers did update them
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_replaced_buffer_is_put_back_too():
    layer = TorchStyleMeanBN(3)
    original = layer.running_mean
    with preserved_buffers(layer):
        layer.running_mean = torch.ones(5)  # replaced by a tensor of another shape
    assert layer.running_mean.shape == (3,) and torch.equal(layer.running_mean, torch.zeros(3))
    assert original is not None


def test_vmap_is_opt_in():
    assert not maps_over_batches(nn.Sequential(nn.Linear(3, 3), TorchStyleMeanBN(3)))
    assert not maps_over_batches(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))  # buffers, unknown

    from bnlab.norms import build_norm

    assert maps_over_batches(nn.Sequential(nn.Linear(3, 3), build_norm("bn", 3), nn.Sigmoid()))
    assert not maps_over_batches(nn.Sequential(nn.Linear(3, 3), build_norm("noisy_bn", 3)))
