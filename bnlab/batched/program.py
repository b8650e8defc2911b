"""G models of one architecture trained as one program, with torch.func.

The members are ordinary modules built as their standalone runs build them. Their parameters and
buffers are stacked into (G, ...) tensors (``torch.func.stack_module_state``), and every member's
own tensors become views of its row, so the member's module, optimizer, probes and checkpoints
keep working on it as they would alone. A training step runs the first member's module as a
function of each row (``torch.func.functional_call`` under ``torch.func.vmap``): one forward and
one backward for all members, every layer each member's own (BN's statistics are per member, its
running estimates update in the stacked buffers). Each member's own ``torch.optim`` optimizer
then updates its rows, with its own learning rate, momentum and weight decay.

Layers take part when they declare it (:attr:`bnlab.norms.Norm.maps_over_members`): torch's
kernels and plain operations map over members; the papers' equations as custom autograd
Functions (``impl=scratch``), whitening's eigendecompositions and noisy BN's draws do not, and
their runs train one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from bnlab.norms import Norm


def unvectorizable(model: nn.Module) -> str | None:
    """Why ``model`` cannot join a program (a short reason), or None."""
    for module in model.modules():
        if isinstance(module, Norm):
            if not module.maps_over_members:
                return f"{type(module).__name__} ({module.extra_repr()}) does not map over members"
        elif any(True for _ in module.buffers(recurse=False)):
            return f"{type(module).__name__} holds buffers bnlab cannot map over members"
    return None


def member_losses(out: Tensor, y: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Each member's mean loss (G,) and correct count (G,) (zeros for a regression), from
    outputs (G, N, K): cross-entropy averaged over its N examples, or MSE over its N x K outputs,
    as the member's standalone step computes its loss."""
    g, n = out.shape[:2]
    if task == "classification":
        losses = F.cross_entropy(out.reshape(g * n, -1), y.reshape(g * n), reduction="none")
        correct = (out.detach().argmax(2) == y).sum(1)
        return losses.view(g, n).mean(1), correct
    losses = F.mse_loss(out, y, reduction="none").flatten(1).mean(1)
    return losses, torch.zeros(g, dtype=torch.long, device=out.device)


class Program:
    """The members' parameters and buffers stacked; ``models[g]``'s tensors are row g of them.

    ``updates[g]()`` applies member g's optimizer to its parameters once their ``.grad`` is set.
    """

    def __init__(self, models: Sequence[nn.Module], updates: Sequence[Callable[[], None]], task: str) -> None:
        reason = unvectorizable(models[0])
        if reason:
            raise ValueError(reason)
        self.models, self.updates, self.task = list(models), list(updates), task
        self.template = self.models[0]  # its structure and flags; the tensors come from the rows
        self.params, self.buffers = stack_module_state(self.models)
        self.forward = vmap(self._member_forward, randomness="different")
        self._bind()

    def __len__(self) -> int:
        return len(self.models)

    def _member_forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def _bind(self) -> None:
        """Each member's parameters and buffers become views of its row (the same Python
        objects, so its optimizer and probes keep their references)."""
        self._rows = []  # (member's parameter, stacked name, row): where its gradient comes from
        for g, model in enumerate(self.models):
            for name, p in model.named_parameters():
                p.data = self.params[name].data[g]
                self._rows.append((p, name, g))
            for name, b in model.named_buffers():
                b.data = self.buffers[name][g]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only the members ``rows``; those that leave get their own storage back."""
        leaving = [m for g, m in enumerate(self.models) if g not in rows]
        for model in leaving:
            for t in (*model.parameters(), *model.buffers()):
                t.data = t.data.clone()
            for p in model.parameters():
                p.grad = None if p.grad is None else p.grad.clone()
        index = torch.tensor(list(rows), device=next(iter(self.params.values())).device)
        self.params = {k: v.detach().index_select(0, index).requires_grad_() for k, v in self.params.items()}
        self.buffers = {k: v.index_select(0, index) for k, v in self.buffers.items()}
        self.models = [self.models[g] for g in rows]
        self.updates = [self.updates[g] for g in rows]
        self._bind()

    def step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One update of every member on its own batch (x: (G, N, ...), y: (G, N) or (G, N, K));
        returns the members' losses (G,) and correct counts (G,), on the device."""
        for p in self.params.values():
            p.grad = None
        losses, correct = member_losses(self.forward(self.params, self.buffers, x), y, self.task)
        losses.sum().backward()  # members share no parameter: each row gets its own gradient
        grads = {name: p.grad for name, p in self.params.items()}
        for p, name, g in self._rows:
            p.grad = grads[name][g]
        for update in self.updates:  # each member's own optimizer on its rows
            update()
        return losses.detach(), correct
