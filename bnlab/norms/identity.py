"""``none``: no normalization."""

from torch import Tensor

from bnlab.norms import register_norm
from bnlab.norms.base import Norm


@register_norm("none")
class Identity(Norm):
    def __init__(self, num_features: int, dims: int = 2) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x
