"""MLP, CNN and VGG built from a norm factory and an activation, with named probe points.

A hidden block is ``layer -> norm -> activation`` (``norm.position=before_act``, the layer's bias
dropped since the norm's beta replaces it) or ``layer -> activation -> norm`` (``after_act``).
Each block can record its three points for the probes: ``pre`` (layer output), ``norm`` (norm
output) and ``act`` (activation output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.config.schema import as_dict
from bnlab.norms import build_norm, norm_class

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01), "gelu": nn.GELU, "identity": nn.Identity,
}

def loss_function(task: str):
    """The training loss of a data set's task: cross-entropy (classification), MSE (regression)."""
    return F.cross_entropy if task == "classification" else F.mse_loss


NormFactory = Callable[[int, int], nn.Module]  # (num_features, dims) -> layer


class Block(nn.Module):
    """One hidden layer with its normalization and nonlinearity, in the configured order."""

    def __init__(self, layer: nn.Module, norm: nn.Module, activation: nn.Module,
                 norm_first: bool) -> None:
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, activation
        self.norm_first = norm_first
        self.taps: dict[str, Tensor] | None = None  # set by the probes to record the points

    def forward(self, x: Tensor) -> Tensor:
        pre = self.layer(x)
        if self.norm_first:
            normed = self.norm(pre)
            out = activated = self.act(normed)
        else:
            activated = self.act(pre)
            out = normed = self.norm(activated)
        if self.taps is not None:
            self.taps.update(pre=pre, norm=normed, act=activated)
        return out

    @property
    def nonlinearity_input(self) -> str:
        return "norm" if self.norm_first else "pre"


class Net(nn.Module):
    """A stack of blocks (and pools), then a linear classifier; ``blocks`` are layer1, layer2, ..."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    @property
    def blocks(self) -> list[Block]:
        return [m for m in self.features if isinstance(m, Block)]


def norm_factory(cfg_norm) -> tuple[NormFactory, bool]:
    """(make(num_features, dims), whether the layer replaces the bias before it) for ``cfg.norm``."""
    options = {k: v for k, v in as_dict(cfg_norm).items() if k not in ("name", "position", "sync")}
    name = str(cfg_norm.name)

    def make(num_features: int, dims: int) -> nn.Module:
        return build_norm(name, num_features, dims, **options)

    return make, norm_class(name).replaces_bias


def conv_plan(model) -> list[tuple[int, int, int] | str]:
    """The feature extractor of ``cfg.model``: ``(out_channels, kernel_size, padding)`` for a
    stride-1 conv block, ``"M"`` for a 2x2 pool, in order; empty for an MLP."""
    if model.name == "cnn":
        plan: list[tuple[int, int, int] | str] = []
        for channels, padding in zip(model.channels, model.paddings, strict=True):
            plan += [(int(channels), int(model.kernel_size), int(padding)), "M"]
        return plan
    if model.name == "vgg":
        return [item if item == "M" else (int(item), 3, 1) for item in model.layers]
    return []


def build_model(cfg, in_shape: tuple[int, int, int], num_classes: int) -> Net:
    """The network of ``cfg.model`` for inputs of shape (C, H, W)."""
    make_norm, replaces_bias = norm_factory(cfg.norm)
    norm_first = cfg.norm.position == "before_act"
    # Before the activation the norm's beta replaces the layer's bias (Ioffe & Szegedy, Sec. 3.2).
    bias = not (replaces_bias and norm_first)
    activation = ACTIVATIONS[cfg.activation.name]

    def block(layer: nn.Module, width: int, dims: int) -> Block:
        return Block(layer, make_norm(width, dims), activation(), norm_first)

    layers: list[nn.Module] = []
    c, h, w = in_shape
    model = cfg.model
    if model.name in ("cnn", "vgg"):
        for item in conv_plan(model):
            if item == "M":
                pool = nn.MaxPool2d(2) if getattr(model, "pool", "max") == "max" else nn.AvgPool2d(2)
                layers.append(pool)
                continue
            out, k, p = item
            layers.append(block(nn.Conv2d(c, out, k, padding=p, bias=bias), out, 4))
            c = out
        layers.append(nn.Flatten())
        with torch.no_grad():  # shape inference: the flattened size after convs and pools
            features = nn.Sequential(*layers).eval()(torch.zeros(2, *in_shape)).shape[1]
    else:
        layers.append(nn.Flatten())
        features = c * h * w
    for width in model.widths:
        layers.append(block(nn.Linear(features, width, bias=bias), width, 2))
        features = width
    net = Net(nn.Sequential(*layers), nn.Linear(features, num_classes))
    if model.init == "glorot":
        glorot_init(net)
    return net


def glorot_init(net: nn.Module) -> None:
    """Xavier/Glorot uniform weights, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), zero biases.

    The init of Santurkar et al. 2018 and of d2l's training loop; torch's default (Kaiming
    uniform with a = sqrt(5)) shrinks the signal by about 1/sqrt(3) per layer, which a deep
    network without normalization (a 25-layer linear one) cannot train through.
    """
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
