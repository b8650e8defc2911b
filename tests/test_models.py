"""Building the network (bnlab.models): which layers keep a bias, how the weights start."""

from __future__ import annotations

import pytest

from bnlab.norms import NORMS, build_norm, norm_class

from helpers import compose


@pytest.mark.parametrize("name", sorted(NORMS))
def test_a_norm_with_a_shift_replaces_the_bias_before_it(name):
    """The model drops a linear layer's bias exactly when the norm after it has its own beta."""
    from bnlab.models import build_model

    cls = norm_class(name)
    layer = build_norm(name, 8, 2, **({"group_size": 4} if name in ("whiten",) else {}))
    has_beta = any(n.endswith("bias") for n, _ in layer.named_parameters())
    assert cls.replaces_bias == has_beta
    model = build_model(compose(f"norm={name}", "model.widths=[8]", "data=digits"), (1, 8, 8), 10)
    assert (model.blocks[0].layer.bias is None) == has_beta


def test_glorot_init_draws_from_the_xavier_uniform_range() -> None:
    import math

    import torch
    from torch import nn

    from bnlab.models import build_model

    cfg = compose("model=mlp", "model.widths=[300,200]", "model.init=glorot", "norm=none")
    torch.manual_seed(0)
    layers = [m for m in build_model(cfg, (1, 28, 28), 10).modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 3
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # U(-a, a): a/sqrt(3)
        assert torch.all(layer.bias == 0)
    default = build_model(compose("model=mlp", "model.widths=[300,200]", "norm=none"), (1, 28, 28), 10)
    first = next(m for m in default.modules() if isinstance(m, nn.Linear))
    # torch's default bound is 1/sqrt(fan_in), well inside Glorot's for this layer
    assert first.weight.abs().max() <= 1 / math.sqrt(784) < math.sqrt(6 / (784 + 300))
