"""``none``: no normalization."""

from torch import Tensor

from bnlab.config.norm_options import NoneOptions
from bnlab.norms.base import Norm
from bnlab.norms.registry import register_norm


@register_norm(NoneOptions)
class Identity(Norm):
    """y = x. No shift of its own, so the layer before it keeps its bias.

    ``ghost_batch`` is accepted and changes nothing: no example's output depends on another's.
    """

    maps_over_batches = True  # frozen statistics leave no state to update: vmap maps it
    maps_over_members = True
    replaces_bias = False

    def __init__(self, num_features: int, dims: int = 2,
                 ghost_batch: int | None = NoneOptions.ghost_batch) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x
