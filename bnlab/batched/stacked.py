"""G copies of one MLP trained as one program: parameters stacked on a leading member dimension.

Member g of the stack is an ordinary bnlab :class:`~bnlab.models.Net` whose parameters and
buffers are *views* of row g of the stacked tensors, so evaluation, probes and checkpoints use
the member's own module and always see its current weights. A training step runs all members
at once, each on its own batch (inputs (G, N, ...)):

    linear        h_g <- W_g h_g + b_g                      one torch.baddbmm for all g
    bn            per member and feature, over the member's N examples (Ioffe & Szegedy, Alg. 1;
                  the member's own closed-form function, bnlab.norms.batchnorm.batch_norm_train)
    ln, gn        per example, as the member's own layer; gamma_g, beta_g per member
    activation    elementwise (the member's module)
    loss          L = sum_g L_g, L_g the member's mean loss: dL/dtheta_g = dL_g/dtheta_g

and the optimizer applies each member's own learning rate, momentum and weight decay to its
row (SGD or AdamW, the update rules of ``torch.optim``). Members never mix: a NaN in one
member's row stays there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.models import Block, Net
from bnlab.norms.batchnorm import BatchNorm, batch_norm_train, record_batch
from bnlab.norms.groupnorm import GroupNorm
from bnlab.norms.identity import Identity
from bnlab.norms.layernorm import LayerNorm

# Exact types: subclasses (noisy BN, sync BN) compute something else.
STACKABLE_NORMS = (Identity, BatchNorm, GroupNorm, LayerNorm)


def unstackable(net: Net) -> str | None:
    """Why ``net`` cannot be stacked (a sentence), or None: Flatten, Linear blocks with a
    stackable norm and a parameter-free activation, a Linear classifier."""
    layers = list(net.features)
    if not layers or not isinstance(layers[0], nn.Flatten):
        return "only the MLP (Flatten, then linear blocks) is vectorized"
    for layer in layers[1:]:
        if not isinstance(layer, Block) or not isinstance(layer.layer, nn.Linear):
            return "only the MLP (Flatten, then linear blocks) is vectorized"
        if type(layer.norm) not in STACKABLE_NORMS:
            return f"norm layer {type(layer.norm).__name__} is not vectorized"
        if isinstance(layer.norm, BatchNorm) and layer.norm.momentum is None:
            return "batch norm with cumulative running averages (momentum=None) is not vectorized"
        if any(True for _ in layer.act.parameters()):
            return "activations with parameters are not vectorized"
    if not isinstance(net.classifier, nn.Linear):
        return "the classifier must be one linear layer"
    return None


def _group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """Group normalization of (G, C, N) per member and example (Wu & He 2018, Eq. 1-3):
    mu, var over each group of C / groups features; y = gamma_c * x_hat + beta_c."""
    grouped = x.view(x.shape[0], groups, -1, x.shape[2])
    mean = grouped.mean(2, keepdim=True)
    centered = grouped - mean
    x_hat = (centered * (centered.square().mean(2, keepdim=True) + eps).rsqrt()).view_as(x)
    return torch.addcmul(bias.unsqueeze(2), x_hat, weight.unsqueeze(2))


class StackedMLP:
    """The parameters and buffers of G MLPs of one architecture, stacked; the members are views.

    ``params[name]`` is a (G, ...) leaf tensor for every ``name`` of ``Net.named_parameters``
    (``buffers`` likewise); after :meth:`bind`, ``nets[g]``'s tensor ``name`` is row g of it.
    """

    def __init__(self, nets: Sequence[Net]) -> None:
        reason = unstackable(nets[0])
        if reason:
            raise ValueError(reason)
        self.template = nets[0]
        self.params = {name: torch.stack([dict(net.named_parameters())[name].detach() for net in nets])
                       .requires_grad_() for name, _ in self.template.named_parameters()}
        self.buffers = {name: torch.stack([dict(net.named_buffers())[name] for net in nets])
                        for name, _ in self.template.named_buffers()}
        self.bind(nets)

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def bind(self, nets: Sequence[Net]) -> None:
        """Make each member's parameters and buffers views of its row (same Python objects, so
        its optimizer and probes keep their references)."""
        for g, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.data = self.params[name].data[g]
            for name, b in net.named_buffers():
                b.data = self.buffers[name][g]

    def keep(self, rows: Sequence[int], nets: Sequence[Net]) -> None:
        """Keep only ``rows`` (members that stopped leave the program) and rebind ``nets``."""
        index = torch.tensor(list(rows), device=next(iter(self.params.values())).device)
        self.params = {k: v.detach().index_select(0, index).requires_grad_() for k, v in self.params.items()}
        self.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
        self.bind(nets)

    # -- the forward pass in train mode, activations feature-major: (G, C, N)
    def _linear(self, prefix: str, h: Tensor) -> Tensor:
        """W h + b per member: (G, out, in) x (G, in, N). In this order the weights' gradient
        comes out in their own layout (the other order makes autograd copy it every step)."""
        weight, bias = self.params[prefix + ".weight"], self.params.get(prefix + ".bias")
        if bias is None:
            return torch.bmm(weight, h)
        return torch.baddbmm(bias.unsqueeze(2), weight, h)

    def _norm(self, prefix: str, norm: nn.Module, h: Tensor) -> Tensor:
        if isinstance(norm, Identity):
            return h
        weight, bias = self.params[prefix + ".weight"], self.params[prefix + ".bias"]
        if isinstance(norm, GroupNorm):
            return _group_norm(h, weight, bias, norm.groups, norm.eps)
        # per member g and feature c over the member's examples n: the member's own BN
        buffers = self.buffers

        def record(mean: Tensor, squares: Tensor, m: int) -> None:
            record_batch(buffers[prefix + ".running_mean"], buffers[prefix + ".running_var"],
                         buffers[prefix + ".num_batches_tracked"], norm.momentum, mean, squares, m)

        return batch_norm_train(h, weight, bias, norm.eps, (2,), record)

    def forward(self, x: Tensor) -> Tensor:
        """Train-mode outputs (G, N, K) of the members for inputs (G, N, C, H, W)."""
        h = x.flatten(2).transpose(1, 2)  # (G, D, N), a view: bmm reads it as it is
        for i, block in enumerate(self.template.features):
            if not isinstance(block, Block):
                continue  # the Flatten
            prefix = f"features.{i}"
            h = self._linear(prefix + ".layer", h)
            if block.norm_first:
                h = block.act(self._norm(prefix + ".norm", block.norm, h))
            else:
                h = self._norm(prefix + ".norm", block.norm, block.act(h))
        return self._linear("classifier", h).transpose(1, 2)


def member_losses(out: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Each member's mean loss (G,) and correct count (G,) (zeros for regression).

    The member's own loss: cross-entropy averaged over its N examples, or the MSE averaged
    over its N x K outputs.
    """
    g, n = out.shape[:2]
    if task == "classification":
        losses = F.cross_entropy(out.reshape(g * n, -1), y.reshape(g * n), reduction="none")
        correct = (out.detach().argmax(2) == y).sum(1)
        return losses.view(g, n).mean(1), correct
    losses = F.mse_loss(out, y, reduction="none").flatten(1).mean(1)
    return losses, torch.zeros(g, dtype=torch.long, device=out.device)


def train_step(net: StackedMLP, optimizer: StackedOptimizer, x: Tensor, y: Tensor,
               task: str) -> tuple[Tensor, Tensor]:
    """One update of every member on its own batch (x: (G, N, ...), y: (G, N) or (G, N, K));
    returns the members' losses (G,) and correct counts (G,), on the device."""
    for p in net.params.values():
        p.grad = None
    losses, correct = member_losses(net.forward(x), y, task)
    losses.sum().backward()
    optimizer.step()
    return losses.detach(), correct


# ---------------------------------------------------------------- optimizers over stacked rows
def _rows(values: Sequence[float], like: Tensor) -> Tensor:
    """One number per member as a (G,) tensor on ``like``'s device and dtype."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def _bcast(vector: Tensor, like: Tensor) -> Tensor:
    """A (G,) vector viewed as (G, 1, ...) to broadcast over the stacked tensor ``like``."""
    return vector.view(-1, *[1] * (like.dim() - 1))


class StackedOptimizer:
    """Per-member hyperparameters (G,) and per-parameter state (G, ...) of an update rule.

    ``state_of`` and ``load_state`` translate member g's rows to and from the state that
    ``torch.optim`` keeps for one parameter, so a member's checkpoint is a standalone one.
    """

    state_keys: tuple[str, ...] = ()

    def __init__(self, params: dict[str, Tensor], lrs: Sequence[float]) -> None:
        self.params = params
        self.hyper: dict[str, list[float]] = {"lr": list(lrs)}
        self.state: dict[str, dict[str, Tensor]] = {key: {k: torch.zeros_like(p) for k, p in params.items()}
                                                    for key in self.state_keys}

    @property
    def _like(self) -> Tensor:
        return next(iter(self.params.values()))

    def _vectors(self) -> None:
        self.vec = {name: _rows(values, self._like) for name, values in self.hyper.items()}

    def set_lr(self, lrs: Sequence[float]) -> None:
        """The members' learning rates of the next step (one host-to-device copy)."""
        self.hyper["lr"] = list(lrs)
        self.vec["lr"].copy_(torch.tensor(self.hyper["lr"], dtype=self._like.dtype))

    def keep(self, rows: Sequence[int], params: dict[str, Tensor]) -> None:
        """Keep only members ``rows``, whose parameters are now ``params``."""
        index = torch.tensor(list(rows), device=self._like.device)
        self.params = params
        self.hyper = {name: [values[r] for r in rows] for name, values in self.hyper.items()}
        self.state = {key: {k: t.index_select(0, index) for k, t in tensors.items()}
                      for key, tensors in self.state.items()}
        self._vectors()


class StackedSGD(StackedOptimizer):
    """torch.optim.SGD's rule (dampening 0) on each row with the member's lr, momentum, wd:

        d = grad + wd p;   buf = momentum buf + d   (buf = d at the first step);
        d = d + momentum buf (Nesterov) or buf;   p = p - lr d
    """

    state_keys = ("momentum_buffer",)

    def __init__(self, params: dict[str, Tensor], lrs: Sequence[float], momenta: Sequence[float],
                 weight_decays: Sequence[float], nesterov: bool) -> None:
        super().__init__(params, lrs)
        self.hyper.update(momentum=list(momenta), weight_decay=list(weight_decays))
        self.nesterov = nesterov
        self._vectors()

    @torch.no_grad()
    def step(self) -> None:
        momentum = any(self.hyper["momentum"])
        decay = any(self.hyper["weight_decay"])
        for k, p in self.params.items():
            d = p.grad
            if decay:
                d = torch.addcmul(d, p, _bcast(self.vec["weight_decay"], p))
            if momentum:
                mom = _bcast(self.vec["momentum"], p)
                buf = self.state["momentum_buffer"][k].mul_(mom).add_(d)
                d = torch.addcmul(d, buf, mom) if self.nesterov else buf
            p.addcmul_(d, _bcast(self.vec["lr"], p), value=-1)

    def state_of(self, g: int, name: str, steps: int) -> dict[str, Tensor]:
        """Member g's ``torch.optim.SGD`` state of parameter ``name`` after ``steps`` updates."""
        if steps == 0 or self.hyper["momentum"][g] == 0:
            return {}  # torch keeps no buffer without momentum, nor before the first step
        return {"momentum_buffer": self.state["momentum_buffer"][name][g].clone()}

    def load_state(self, g: int, name: str, state: dict[str, Tensor], steps: int) -> None:
        buf = state.get("momentum_buffer")
        self.state["momentum_buffer"][name][g] = 0.0 if buf is None else buf


class StackedAdamW(StackedOptimizer):
    """torch.optim.AdamW's rule (amsgrad off) on each row with the member's lr and wd:

        p = p (1 - lr wd);   m = m + (1 - beta1)(grad - m);   v = beta2 v + (1 - beta2) grad^2
        p = p - lr / (1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: dict[str, Tensor], lrs: Sequence[float], weight_decays: Sequence[float],
                 betas: Sequence[float], eps: float = 1e-8) -> None:
        super().__init__(params, lrs)
        self.hyper["weight_decay"] = list(weight_decays)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), eps
        self.t = 0  # updates so far: the members of a program step together
        self._vectors()

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1 ** self.t, math.sqrt(1 - beta2 ** self.t)
        decay = 1 - self.vec["lr"] * self.vec["weight_decay"]
        step_size = self.vec["lr"] / correction1
        for k, p in self.params.items():
            exp_avg, exp_avg_sq = self.state["exp_avg"][k], self.state["exp_avg_sq"][k]
            p.mul_(_bcast(decay, p))
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / correction2).add_(self.eps)
            p.sub_(exp_avg * _bcast(step_size, p) / denom)

    def state_of(self, g: int, name: str, steps: int) -> dict[str, Tensor]:
        if steps == 0:
            return {}
        return {"step": torch.tensor(float(steps)),
                **{key: self.state[key][name][g].clone() for key in self.state_keys}}

    def load_state(self, g: int, name: str, state: dict[str, Tensor], steps: int) -> None:
        self.t = steps
        for key in self.state_keys:
            self.state[key][name][g] = state[key] if key in state else 0.0
