"""Runs that differ only in seed, learning rate, momentum or weight decay, trained as one program.

Each member is an ordinary :class:`~bnlab.run.trainer.Trainer` of its own run directory: its model
(built from its seed, exactly as a standalone run builds it), its optimizer, its batch stream
(seeded by its seed, so it sees the standalone run's batches in the standalone order), its
prober, recorder, checkpoints and summary. Only the training step is shared: the members'
parameters and buffers are rows of one :class:`~bnlab.batched.program.Program`, one forward and
backward (torch.func) moves every member, and each member's own optimizer updates its rows.
Logging, evaluation, probes and checkpoints then run per member on
its own module, at the steps a standalone run would run them, so a member's run directory is
what the standalone run would have written, and ``bnlab train resume=<member>`` continues it.

A member whose training loss stops being finite is marked ``diverged`` and, with
``train.stop_on_divergence`` (the default), leaves the program: the others go on without it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bnlab.batched.program import Program
from bnlab.config.schema import hidden_widths
from bnlab.data import check_sampler, load_dataset
from bnlab.errors import UserError
from bnlab.models import norm_factory
from bnlab.run.checkpoint import load_checkpoint
from bnlab.run.optim import loop_update
from bnlab.run.preflight import check_against_data, check_config
from bnlab.run.process import fit_threads_to_step, seed_everything, setup_process
from bnlab.run.progress import Progress
from bnlab.run.trainer import EXIT_INTERRUPTED, Loop, Trainer
from bnlab.rundir.lock import hold
from bnlab.rundir.names import CHECKPOINT

# The keys in which the members of one program may differ.
VARYING_KEYS = ("seed", "optim.lr", "optim.momentum", "optim.weight_decay")


def not_vectorized(cfg: DictConfig) -> str | None:
    """Why a run of ``cfg`` cannot join a vectorized program (a short reason), or None.

    From the config alone, before any data is loaded: the norm asks one of its layers
    (:attr:`bnlab.norms.Norm.maps_over_members`); the program checks the built network again.
    """
    if getattr(cfg.norm, "sync", False):
        return "norm.sync=true: cross-replica statistics train one run per process group"
    widths = hidden_widths(cfg)
    make_norm, _ = norm_factory(cfg.norm)
    try:
        layer = make_norm(widths[0] if widths else 8, 4 if cfg.model.name in ("cnn", "vgg") else 2)
    except ValueError as err:  # a bad option: the run's own checks say so
        return str(err)
    if not getattr(layer, "maps_over_members", False):
        return f"norm={cfg.norm.name} with these options does not map over members"
    if cfg.optim.name not in ("sgd", "adam"):
        return f"optim={cfg.optim.name} is not vectorized"
    for key in ("compile", "amp"):
        if getattr(cfg.train, key):
            return f"train.{key}=true is not vectorized"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun processes train one run each"
    return None


class Member(Trainer):
    """One run of a group: a Trainer whose parameters are views of its row of the program.

    Its checkpoints hold its own rows only (copies, not views of the stacked tensors) and its own
    optimizer's state, so the file is a standalone run's checkpoint.
    """

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        model = state["model"]
        # torch.save writes a view's whole storage, every member's rows: save copies. In place,
        # to keep the state dict's version metadata.
        for key, value in model.items():
            model[key] = value.clone()
        return state


class Group:
    """Members at the same step, trained in lockstep; members leave when they stop."""

    def __init__(self, members: Sequence[Member], resumed: Sequence[bool], label: str) -> None:
        self.members = list(members)
        self.resumed = dict(zip(self.members, resumed, strict=True))
        first = self.members[0]
        self.task, self.label = first.task, label
        self.step, self.total_steps = first.step, first.total_steps
        if any(m.step != self.step or m.total_steps != self.total_steps for m in self.members):
            raise ValueError("the members of a group must be at the same step of the same schedule")
        self.program = Program([m.model for m in self.members],
                               [loop_update(m.optimizer) for m in self.members], self.task)

    def _step(self, batches: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """One step of the program on the members' own batches; each member's loss and count."""
        loss, correct = self.program.step(torch.stack([x for x, _ in batches]),
                                          torch.stack([y for _, y in batches]))
        return list(zip(loss.unbind(), correct.unbind(), strict=True))

    def _leave(self, leaving: Sequence[Member]) -> None:
        """Members that stopped leave the program; their modules get their own storage back."""
        rows = [row for row, m in enumerate(self.members) if m not in leaving]
        self.members = [self.members[row] for row in rows]
        self.program.keep(rows)

    def run(self) -> dict[Member, str]:
        """Train every member to the end with the one training loop (:class:`bnlab.run.trainer.Loop`);
        returns each member's final status. After each step every member does a standalone run's
        bookkeeping on its own module, timed with the program's training time; the group shows
        its own progress."""
        first = self.members[0]
        progress = Progress(self.total_steps, self.step, str(first.cfg.train.progress), label=self.label)
        quiet = Progress(self.total_steps, self.step, "off")  # the members' own displays
        loop = Loop(self.members, self._step, progress, {m: quiet for m in self.members},
                    resumed=self.resumed, leave=self._leave,
                    show=self._show)
        try:
            return loop.run()
        except BaseException as err:
            for member in self.members:
                if member not in loop.statuses:
                    member.summary("failed", error=f"{type(err).__name__}: {err}")
            raise

    def _show(self, progress: Progress, step: int) -> None:
        finals = [m.final for m in self.members if "train/loss" in m.final]
        if not finals:
            return
        losses = [f["train/loss"] for f in finals if math.isfinite(f["train/loss"])]
        shown = {"runs": len(self.members),
                 "mean loss": sum(losses) / len(losses) if losses else math.nan}
        if self.task == "classification":
            shown["mean acc"] = sum(f["train/acc"] for f in finals) / len(finals)
        shown["steps/s"] = finals[0]["perf/steps_per_s"]
        progress.update(step, shown)


def _install_signal_handlers(group: Group) -> dict[int, Any]:
    """First SIGINT/SIGTERM: checkpoint every member at the next step; second: leave now."""
    def handle(signum, frame):
        if any(m.stop_signal is not None for m in group.members):
            os._exit(EXIT_INTERRUPTED)
        for member in group.members:
            member.stop_signal = signum

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def build_group(jobs: Sequence[tuple[DictConfig, Path]], label: str = "batched") -> Group:
    """The program of the runs ``jobs`` = [(cfg, run dir)], ready to run; nothing written yet.

    The configs must differ only in :data:`VARYING_KEYS` and be at the same step (fresh, or
    ``cfg.resume`` set and a checkpoint in the run directory). A UserError (a bad value, a
    checkpoint that does not fit) is raised before any file is written: the caller can then run
    the jobs one by one, which reports the error per run as ``bnlab train`` does.
    """
    cfgs = [cfg for cfg, _ in jobs]
    for cfg in cfgs:
        check_config(cfg)
        reason = not_vectorized(cfg)
        if reason:
            raise UserError(reason)
    device = setup_process(cfgs[0])
    data = load_dataset(cfgs[0].data, device)
    check_against_data(cfgs[0], data.shape, len(data.train), data.num_classes)
    check_sampler(cfgs[0].data, data, cfgs[0].train.batch_size)
    members, resumed = [], []
    for cfg, run_dir in jobs:
        seed_everything(cfg.seed)  # the model's initialization: the standalone run's
        member = Member(cfg, Path(run_dir), device, data)
        if cfg.resume is not None:
            member.load_state_dict(load_checkpoint(Path(run_dir) / CHECKPOINT, device))
        members.append(member)
        resumed.append(cfg.resume is not None)
    # the program's step is every member's: its work decides the threads
    fit_threads_to_step(cfgs[0], members[0].model, data.train.x,
                        cfgs[0].train.batch_size * len(members))
    return Group(members, resumed, label)


def train_group(jobs: Sequence[tuple[DictConfig, Path]], label: str = "batched") -> list[str]:
    """Train the runs ``jobs`` = [(cfg, run dir)] as one program (see :func:`build_group`);
    returns their statuses: completed, diverged or interrupted (SIGINT, SIGTERM)."""
    with contextlib.ExitStack() as locks:
        for _, run_dir in jobs:  # one writer per run directory (RunLocked is a UserError)
            locks.enter_context(hold(Path(run_dir)))
        group = build_group(jobs, label)
        members = list(group.members)
        previous = _install_signal_handlers(group)
        try:
            statuses = group.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return [statuses[m] for m in members]
