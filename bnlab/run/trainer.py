"""The training loop: optimizer, schedule, evaluation, probes, divergence, checkpoints.

``main`` is the Hydra task behind ``bnlab train``: it checks the config, trains, and turns the
errors a user can cause into one line on stderr. ``Trainer`` holds one run's state; its loop is
the step followed by one block of bookkeeping (:meth:`Trainer._after_step`). Setting up the
process (threads, device, seeds) is :mod:`bnlab.run.process`; file names are :mod:`bnlab.rundir.names`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from bnlab.config.schema import Config, as_dict, typed
from bnlab.data import Dataset, check_sampler, load_dataset, make_batch_stream
from bnlab.errors import UserError, WriteError
from bnlab.models import build_model, loss_function
from bnlab.norms import Norm, finish_training
from bnlab.run import distributed
from bnlab.run.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from bnlab.run.evaluation import eval_interval, evaluate, train_mode_metrics
from bnlab.run.optim import build_optimizer, clear_grads, learning_rate, loop_backward, loop_update
from bnlab.run.preflight import check_against_data, check_config
from bnlab.run.process import (
    device_name,
    fit_threads_to_step,
    job_label,
    progress_setting,
    seed_everything,
    setup_process,
    versions,
)
from bnlab.run.progress import Progress
from bnlab.run.resume import check_length, record_length
from bnlab.rundir.lock import RunLocked, hold
from bnlab.rundir.names import CHECKPOINT, SUMMARY_JSON, TRAIN_LOG
from bnlab.rundir.outcome import headline, read_summary, run_report, shown_path
from bnlab.rundir.writer import Recorder, discard_fresh, looks_fresh, overwrite_json, write_json_atomic

EXIT_FAILED = 1  # an exception inside the run, a write that failed
EXIT_USER_ERROR = 2  # a bad config or input, found before any work; a second writer
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- the run
class Interrupted(Exception):
    """Raised in the loop after a first Ctrl-C or SIGTERM: checkpoint, then stop."""


class Trainer:
    """One training run in ``run_dir``: fresh, or resumed from its checkpoint."""

    def __init__(self, cfg: Config | DictConfig, run_dir: Path, device: torch.device, data: Dataset,
                 rank: int = 0, world_size: int = 1) -> None:
        cfg = typed(cfg)  # the schema's dataclasses from here on, not the composed DictConfig
        self.cfg, self.run_dir, self.device, self.data = cfg, run_dir, device, data
        self.rank, self.world_size = rank, world_size
        self.is_writer = rank == 0
        tcfg = cfg.train
        per_epoch = len(data.train) // tcfg.batch_size
        self.total_steps = tcfg.epochs * per_epoch if tcfg.epochs else tcfg.steps

        self.model = build_model(cfg, data.shape, data.num_outputs).to(device)
        # One loss for step, evaluation and probes (ICS reads it from here).
        self.task = data.task
        self.loss_fn = loss_function(data.task)
        self.distributed = distributed.is_distributed()
        if self.distributed and getattr(cfg.norm, "sync", False):
            from bnlab.norms.sync import convert_sync

            convert_sync(self.model)
        # DDP only for the training step: evaluation, probes and checkpoints use the module itself.
        self.train_model = distributed.wrap(self.model, device)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.stream = make_batch_stream(data.train, tcfg.batch_size, cfg.seed, cfg.data,
                                        rank=rank, world_size=world_size)
        self.prober = None
        if cfg.probe.enabled:
            from bnlab.probes.activations import Prober

            self.prober = Prober(cfg, self.model, data, device)
        self.step_fn = self._make_step()
        self.eval_every = eval_interval(tcfg.eval_every, self.total_steps)
        self.landscape_every = self.prober.landscape_every if self.prober is not None else 0
        self.schedule = cfg.optim if cfg.optim.schedule == "cosine" else None
        self.step = 0
        self.started = False  # run() began: summary.json is this run's now
        self.loss_sum = torch.zeros((), device=device)  # since the last log step, on the device
        self.correct_sum = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0
        self.best: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.diverged_step: int | None = None
        self.wall_before = 0.0  # wall time of earlier attempts of a resumed run
        self.stop_signal: int | None = None
        self.stop_agreed = False  # under torchrun: some replica was asked to stop

    # -- one optimization step, compiled when asked
    def _make_step(self):
        model = self.train_model
        clear, update = clear_grads(self.optimizer), loop_update(self.optimizer)
        backward = loop_backward(self.device, bool(self.cfg.train.compile))
        amp = bool(self.cfg.train.amp) and self.device.type == "cuda"
        loss_fn, classification = self.loss_fn, self.task == "classification"

        def forward_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            if amp:  # entered only when on: even a disabled autocast context costs ~4 us a step
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(x)
                return loss_fn(logits.float(), y), logits
            logits = model(x)
            return loss_fn(logits, y), logits

        if self.cfg.train.compile:
            # Random draws (noisy_bn's noise) through torch's own generator, as in eager mode:
            # the compiled run then trains on the same numbers as the eager one.
            torch._inductor.config.fallback_random = True
            forward_loss = torch.compile(forward_loss)

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            loss, logits = forward_loss(x, y)
            clear()
            backward(loss)
            update()
            if not classification:
                return loss.detach(), torch.zeros((), device=y.device, dtype=torch.long)
            return loss.detach(), (logits.detach().argmax(1) == y).sum()

        return step

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "total_steps": self.total_steps,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": rng_states(), "loss_sum": self.loss_sum.cpu(), "correct_sum": self.correct_sum.cpu(),
            "seen": self.seen, "best": self.best, "final": self.final, "wall_s": self.wall(),
            "probe": self.prober.state_dict() if self.prober else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"checkpoint does not match this run's model ({first})") from err
        self.stream.load_state_dict(state["stream"])
        set_rng_states(state["rng"])
        self.step, self.seen = state["step"], state["seen"]
        self.loss_sum = state["loss_sum"].to(self.device)
        self.correct_sum = state["correct_sum"].to(self.device)
        self.best, self.final, self.wall_before = state["best"], state["final"], state["wall_s"]
        if self.prober:
            self.prober.load_state_dict(state["probe"])

    def save(self) -> None:
        """Checkpoint, and say so in summary.json: a killed run then shows how far it got."""
        if self.is_writer:
            save_checkpoint(self.run_dir / CHECKPOINT, self.state_dict())
            self.summary("running")

    # -- bookkeeping
    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def summary(self, status: str, error: str | None = None) -> None:
        if not self.is_writer:
            return
        data = {
            "status": status, "steps": self.step, "total_steps": self.total_steps,
            "wall_s": round(self.wall(), 3), "device": str(self.device),
            "device_name": device_name(self.device),
            "threads": torch.get_num_threads(), "world_size": self.world_size,
            "versions": versions(), "final": self.final, "best": self.best,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.diverged_step is not None:
            data["diverged_step"] = self.diverged_step
        if error:
            data["error"] = error
        write_json_atomic(self.run_dir / SUMMARY_JSON, data)

    def _log_train(self, recorder: Recorder, train_time: float, steps: int) -> float:
        """Read the device-side sums (the only host sync), log them; returns the mean loss.

        Under torchrun the sums of all replicas are added first (each holds its shard's loss and
        correct count), so every rank gets the same mean loss and agrees on divergence; the
        replicas also agree here on whether any of them was asked to stop.
        """
        loss_sum, correct_sum = self.loss_sum.item(), self.correct_sum.item()
        if self.distributed:
            sums = torch.tensor([loss_sum, correct_sum, float(self.stop_signal is not None)],
                                dtype=torch.float64)
            loss_sum, correct_sum, stops = distributed.all_reduce_sum(sums).tolist()
            loss_sum /= self.world_size
            self.stop_agreed = stops > 0
        loss = loss_sum / max(self.seen, 1)
        values = {"train/loss": loss}
        if self.task == "classification":
            values["train/acc"] = correct_sum / max(self.seen * self.stream.batch_size, 1)
        values.update({"train/lr": self.optimizer.param_groups[0]["lr"],
                       "perf/steps_per_s": steps / train_time if train_time > 0 else float("nan")})
        for layer in self.model.modules():
            if isinstance(layer, Norm) and layer.log_scalars():
                values.update({f"norm/{k}": v for k, v in layer.log_scalars().items()})
                break  # the schedule is the same in every layer
        recorder.scalars(self.step, values)
        self.final.update(values)
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        self.seen = 0
        return loss

    def _evaluate(self, recorder: Recorder) -> dict[str, float]:
        loss, acc = evaluate(self.model, self.data.test, self.cfg.train.eval_batch_size,
                             task=self.task)
        values = {"test/loss": loss}
        if self.task == "classification":
            values["test/acc"] = acc
        # Train-mode (batch statistics) metrics on test batches built like the training batches.
        values.update(train_mode_metrics(self.model, self.data.test, self.cfg.train.batch_size,
                                         self.cfg.seed, self.cfg.data, self.task))
        recorder.scalars(self.step, values)
        self.final.update(values)
        if self.task == "classification" and acc > self.best.get("test/acc", -1.0):
            self.best.update({"test/acc": acc, "test/acc_step": self.step})
        if loss < self.best.get("test/loss", math.inf):
            self.best["test/loss"] = loss
        return values

    # -- the loop
    def run(self, resumed: bool) -> str:
        """Train to ``total_steps``; returns the status: completed, diverged or interrupted.

        An exception leaves the files as they were at that moment (the recorder closed
        without raising again); :func:`run` then marks the summary.
        """
        mode, label = progress_setting(self.cfg.train.progress) if self.is_writer else ("off", "train")
        progress = Progress(self.total_steps, self.step, mode, label=label)
        loop = Loop([self], lambda batches: [self.step_fn(*batches[0])], progress, {self: progress},
                    resumed={self: resumed})
        return loop.run()[self]

    def step_batch(self, recorder: Recorder) -> tuple[Tensor, Tensor]:
        """This run's next batch, and what happens before the step is taken on it: the step's
        learning rate, and gradient ICS and the loss landscape, measured on the batch at the
        parameters the step starts from."""
        x, y = next(self.stream)
        if self.schedule is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.schedule, self.step, self.total_steps)
        if self.prober is not None and self.prober.wants_ics(self.step + 1):
            self.prober.ics(self.step + 1, self.model, self.optimizer, x, y, recorder)
        if self.landscape_every and (self.step + 1) % self.landscape_every == 0:
            self.prober.landscape(self.step + 1, self.model, self.optimizer, x, y, recorder)
        return x, y

    def _after_step(self, recorder: Recorder, progress: Progress) -> bool:
        """The step's bookkeeping, each part when due: log, evaluate, probe, checkpoint.

        Returns True when the training loss diverged and the run stops (train.stop_on_divergence),
        evaluated and checkpointed here as at its last step: each happens once per run's end.
        """
        step, tcfg = self.step, self.cfg.train
        last = step == self.total_steps
        logs = step % tcfg.log_every == 0 or last
        if logs and self._log(recorder, progress) and tcfg.stop_on_divergence:
            self._evaluate(recorder)
            self.save()
            return True
        if step % self.eval_every == 0 or last:
            if last:
                finish_training(self.model, self.stream)  # BN's inference=population
            values = self._evaluate(recorder)
            progress.evaluated(step, {k: v for k, v in values.items() if k in ("test/acc", "test/loss")})
        if self.prober is not None and step % self.cfg.probe.every == 0:
            self.prober.probe(step, recorder)
        if step % tcfg.checkpoint_every == 0 or last:
            self.save()
        if logs:
            self._t_mark = time.perf_counter()  # eval, probes and checkpoints are not train time
        return False

    def _log(self, recorder: Recorder, progress: Progress) -> bool:
        """Log the training scalars and show them; True when the mean loss is not finite."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - self._t_mark
        mean_loss = self._log_train(recorder, train_time, self.step - self._log_step)
        self._log_step = self.step
        shown = {"loss": mean_loss, "acc": self.final.get("train/acc", math.nan),
                 "steps/s": self.final["perf/steps_per_s"]}
        progress.update(self.step, shown if self.task == "classification"
                        else {k: v for k, v in shown.items() if k != "acc"})
        if math.isfinite(mean_loss):
            return False
        if self.diverged_step is None:  # the first non-finite log step (stop_on_divergence=false goes on)
            self.diverged_step = self.step
            progress.message(f"diverged: train/loss={mean_loss} at step {self.step}")
        return True

    def _write_hparams(self, recorder: Recorder) -> None:
        """The run's config and final metrics for TensorBoard's HParams dashboard."""
        from bnlab.rundir.reader import flatten

        config = flatten(as_dict(self.cfg))
        skip = ("resume", "train.progress", "train.threads", "data.root", "claims")
        recorder.hparams({k: v for k, v in config.items() if k not in skip},
                         {k: v for k, v in self.final.items() if k.startswith(("test/", "train/"))})


# ---------------------------------------------------------------- the loop
Step = Callable[[list[tuple[Tensor, Tensor]]], list[tuple[Tensor, Tensor]]]


class Loop:
    """The one training loop: steps ``runs`` (one run, or the members of a batched program, all
    at the same step of the same schedule) in lockstep to the end.

    Each step: every run's next batch (:meth:`Trainer.step_batch`), then ``step`` on all the
    batches (a run's own step, or one program for all), which returns each run's loss and
    correct count; then each run's bookkeeping in one order, each part when due
    (:meth:`Trainer._after_step`: log, evaluate, probe, checkpoint). A run whose loss diverges
    (with ``train.stop_on_divergence``) ends there and leaves (``leave``); the others go on.
    ``displays[run]`` is the progress display a run's own lines go to; ``progress`` is the
    loop's, which ``show`` updates at log steps for a group (a single run updates its own).
    """

    def __init__(self, runs: list[Trainer], step: Step, progress: Progress, displays: dict[Trainer, Progress],
                 resumed: dict[Trainer, bool], leave: Callable[[list[Trainer]], None] | None = None,
                 show: Callable[[Progress, int], None] | None = None) -> None:
        self.runs, self.step, self.progress, self.displays = list(runs), step, progress, displays
        self.resumed, self.leave, self.show = resumed, leave, show
        self.statuses: dict[Trainer, str] = {}
        self.recorders: dict[Trainer, Recorder] = {}

    def _finish(self, run: Trainer, status: str) -> None:
        """What a run does after its last step (its final evaluation and checkpoint are done,
        at its last step or where it stopped, in ``_after_step``)."""
        recorder = self.recorders.pop(run)
        run._write_hparams(recorder)
        recorder.close()
        run.summary(status)
        self.statuses[run] = status

    def run(self) -> dict[Trainer, str]:
        """Train every run to its end; returns each run's status: completed, diverged or
        interrupted. An exception abandons every open recorder and propagates."""
        t_start = time.perf_counter()
        for run in self.runs:
            run.t_start, run.started, run._log_step = t_start, True, run.step
            self.recorders[run] = Recorder(run.run_dir, enabled=run.is_writer,
                                           purge_step=run.step + 1 if self.resumed[run] else None)
        try:
            for run in self.runs:
                run.summary("running")
                if run.prober is not None and run.step == 0 and not self.resumed[run]:  # a resume at 0 has it
                    run.prober.probe(0, self.recorders[run])
            try:
                self._loop()
            except Interrupted:
                for run in self.runs:
                    run.save()
                    self.recorders.pop(run).close()
                    run.summary("interrupted")
                    self.statuses[run] = "interrupted"
        except BaseException:
            for recorder in self.recorders.values():
                recorder.abandon()
            raise
        finally:
            self.progress.close()
        return self.statuses

    def _loop(self) -> None:
        first = self.runs[0]
        t_mark = time.perf_counter()
        while self.runs and first.step < first.total_steps:
            # Replicas stop together, at a log step where they agreed to (see _log_train).
            if any((r.stop_signal is not None and not r.distributed) or r.stop_agreed for r in self.runs):
                raise Interrupted
            batches = [run.step_batch(self.recorders[run]) for run in self.runs]
            results = self.step(batches)
            for run, (loss, correct) in zip(self.runs, results, strict=True):
                run.loss_sum += loss
                run.correct_sum += correct
                run.seen += 1
                run.step += 1
            step = first.step
            logs = step % first.cfg.train.log_every == 0 or step == first.total_steps
            if logs:
                if first.device.type == "cuda":
                    torch.cuda.synchronize()
                train_time = time.perf_counter() - t_mark
            stopped = []
            for run in self.runs:
                if logs:  # its steps/s: the loop's, not counting the runs logged before it
                    run._t_mark = time.perf_counter() - train_time
                if run._after_step(self.recorders[run], self.displays[run]):
                    stopped.append(run)
                if len(self.runs) > 1 and run.diverged_step == step:
                    self.progress.message(f"diverged: {run.run_dir.name}: train/loss="
                                          f"{run.final['train/loss']} at step {step}")
            if logs:
                if self.show is not None:
                    self.show(self.progress, step)
                t_mark = time.perf_counter()  # eval, probes and checkpoints are not train time
            for run in stopped:
                self._finish(run, "diverged")
            if stopped:
                if self.leave is not None:
                    self.leave(stopped)
                self.runs = [r for r in self.runs if r not in stopped]
        for run in self.runs:
            self._finish(run, "diverged" if run.diverged_step is not None else "completed")


# ---------------------------------------------------------------- one run, whatever happens
class _Signals:
    """Ctrl-C and SIGTERM. The first asks a training run to checkpoint and stop at the next step
    (before training has started, it interrupts at once); the second interrupts at once
    (KeyboardInterrupt, so that summary.json still says ``interrupted``); a third leaves now."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.trainer, self.count = run_dir, None, 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1 and self.trainer is not None:
            self.trainer.stop_signal = signum
            return
        if self.count >= 3:
            if self.trainer is not None and self.trainer.started:
                _record_end(self.run_dir, self.trainer, "interrupted", None)
            os._exit(EXIT_INTERRUPTED)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            # `bnlab train` records a signal that comes while it starts (bnlab.cli): act on it now.
            if any(getattr(handler, "received", None) for handler in previous.values()):
                raise KeyboardInterrupt
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _error_text(err: BaseException) -> str:
    return str(err) if isinstance(err, (UserError, WriteError)) else f"{type(err).__name__}: {err}"


def _record_end(run_dir: Path, trainer: Trainer | None, status: str, err: BaseException | None) -> bool:
    """Make summary.json say how the run ended; False if even that cannot be written.

    The trainer writes its whole summary; before it exists the last summary (a resumed run's)
    or an empty one gets the status. On a full disk the atomic write needs room for a second
    copy, so the file is rewritten in place as a last resort.
    """
    error = _error_text(err) if err is not None else None
    if trainer is not None:
        try:
            trainer.summary(status, error)
            return True
        except Exception:  # the disk, or what failed the run failing again: write less
            pass
    data = {**(read_summary(run_dir) or {"steps": 0}), "status": status,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if trainer is not None:
        data["steps"] = trainer.step
    if error:
        data["error"] = error
    path = run_dir / SUMMARY_JSON
    for write in (write_json_atomic, overwrite_json):
        try:
            write(path, data)
            return True
        except WriteError:
            if not path.exists():
                return False
    return False


def run(cfg: DictConfig, run_dir: Path) -> str:
    """Train ``cfg`` in ``run_dir`` (resuming from its checkpoint when ``cfg.resume`` is set).

    Returns completed, diverged or interrupted. Whatever ends it, summary.json tells the truth:
    an exception marks the run ``failed`` with the error (``interrupted`` for Ctrl-C) before it
    propagates, except a UserError or Ctrl-C before training starts, which leave the files as
    they were (:func:`main` then removes a fresh directory).
    """
    trainer, writer = None, distributed.replica().is_writer
    with _Signals(run_dir).installed() as signals:
        try:
            check_config(cfg)
            replica = distributed.init_process_group()  # a no-op outside torchrun
            device = setup_process(cfg)
            seed_everything(cfg.seed)
            data = load_dataset(cfg.data, device)
            check_against_data(cfg, data.shape, len(data.train), data.num_classes, replica.world_size)
            check_sampler(cfg.data, data, cfg.train.batch_size)
            trainer = Trainer(cfg, run_dir, device, data, rank=replica.rank,
                              world_size=replica.world_size)
            fit_threads_to_step(cfg, trainer.model, data.train.x,
                                cfg.train.batch_size // replica.world_size)
            resumed = cfg.resume is not None
            if resumed:
                trainer.load_state_dict(load_checkpoint(run_dir / CHECKPOINT, device))
                check_length(trainer.step, trainer.total_steps, cfg)
                if writer:  # train.steps above the current step extends the run: its config says so
                    record_length(run_dir, cfg)
            signals.trainer = trainer
            return trainer.run(resumed)
        except BaseException as err:
            started = trainer is not None and trainer.started
            interrupted = isinstance(err, KeyboardInterrupt)
            if writer and interrupted and started:
                _record_end(run_dir, trainer, "interrupted", None)
            elif writer and not interrupted and (started or not isinstance(err, UserError)):
                _record_end(run_dir, trainer, "failed", err)
            raise


# ---------------------------------------------------------------- the Hydra task

def _log_traceback(run_dir: Path, err: BaseException) -> bool:
    """Append ``err``'s traceback to the run's train.log; False if it cannot be written."""
    text = "".join(traceback.format_exception(err))
    stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
    try:
        with open(run_dir / TRAIN_LOG, "a") as log:
            log.write(f"[{stamp}] bnlab: the run failed\n{text}")
        return True
    except OSError:
        return False


def execute(cfg: DictConfig, run_dir: Path, multirun: bool) -> int:
    """Run one job in ``run_dir`` while holding its lock, and say how it ended: the exit code.

    A second writer is refused and touches nothing. A user error before training removes a
    fresh run directory (a sweep keeps it, marked failed, for its report); any other exception
    leaves the run marked failed, its traceback in train.log and one line on stderr.
    """
    writer = distributed.replica().is_writer
    try:
        with hold(run_dir) if writer else contextlib.nullcontext():
            return _execute(cfg, run_dir, multirun, writer)
    except RunLocked as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except WriteError as err:  # the lock file itself
        print(f"bnlab: error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _execute(cfg: DictConfig, run_dir: Path, multirun: bool, writer: bool) -> int:
    resume_command = f"bnlab train resume={shown_path(run_dir)}"
    try:
        status = run(cfg, run_dir)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        if writer and cfg.resume is None and looks_fresh(run_dir):
            if multirun:  # a sweep's report lists this run as failed, and why
                _record_end(run_dir, None, "failed", err)
            else:
                discard_fresh(run_dir)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if writer:
            if cfg.resume is None and looks_fresh(run_dir):
                discard_fresh(run_dir)
                print("bnlab: interrupted before training started; nothing kept", file=sys.stderr)
            else:
                print(f"bnlab: interrupted; resume with: {resume_command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not writer:  # no log file of its own: the traceback goes to the terminal
            traceback.print_exc()
            return EXIT_FAILED
        logged = _log_traceback(run_dir, err)
        where = f"traceback in {shown_path(run_dir / TRAIN_LOG)}" if logged else "train.log not writable"
        hint = f"; once fixed: {resume_command}" if isinstance(err, WriteError) and \
            (run_dir / CHECKPOINT).is_file() else ""
        print(f"bnlab: error: {_error_text(err)}; run {shown_path(run_dir)} failed ({where}){hint}",
              file=sys.stderr)
        if not logged and not isinstance(err, WriteError):  # a bug's traceback has nowhere else to go
            traceback.print_exc()
        return EXIT_FAILED
    if not writer:
        return 0
    summary = read_summary(run_dir) or {"status": status}
    if multirun:
        print(f"bnlab: [{job_label()}] {headline(summary)}", flush=True)
    else:
        print(run_report(run_dir, summary), flush=True)
    if status == "interrupted":
        print(f"bnlab: interrupted; resume with: {resume_command}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def main(cfg: DictConfig) -> None:
    """Hydra task of ``bnlab train``: one run, or one job of a sweep.

    A single run exits with the code of :func:`execute`. A sweep's job returns instead, so
    that the launcher goes on with the other jobs (the sweep's end counts them), except when
    interrupted, which ends the sweep.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    code = execute(cfg, Path(hydra_cfg.runtime.output_dir), multirun)
    if code and (not multirun or code == EXIT_INTERRUPTED):
        sys.exit(code)
