"""The training loop: optimizer, schedule, evaluation, probes, divergence, checkpoints.

``main`` is the Hydra task behind ``bnlab train``: it checks the config, trains, and turns the
errors a user can cause into one line on stderr. ``Trainer`` holds one run's state.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from bnlab import __version__, distributed
from bnlab.checkpoint import load_checkpoint, rng_states, save_checkpoint, set_rng_states
from bnlab.config import validate
from bnlab.data import Dataset, check_sampler, load_dataset, make_batch_stream
from bnlab.errors import UserError
from bnlab.evaluation import evaluate, loss_function, train_mode_metrics
from bnlab.models import Net, build_model
from bnlab.norms import Norm
from bnlab.progress import Progress
from bnlab.record import SUMMARY_JSON, Recorder, write_json_atomic

CHECKPOINT = Path("checkpoints") / "last.pt"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- process set-up
def parallel_jobs() -> int:
    """How many training processes share this machine's cores (parallel launcher or torchrun)."""
    jobs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
        n_jobs = launcher.get("n_jobs", None) if launcher is not None else None
        if n_jobs:
            jobs = max(jobs, int(n_jobs) if int(n_jobs) > 0 else os.cpu_count() or 1)
    except (ValueError, AttributeError):
        pass
    return jobs


def launcher_cpus() -> int | None:
    """CPUs a cluster launcher reserved for each job (submitit's ``cpus_per_task``), if set."""
    try:
        from hydra.core.hydra_config import HydraConfig

        cpus = HydraConfig.get().launcher.get("cpus_per_task", None)
    except (ValueError, AttributeError):
        return None
    return int(cpus) if cpus else None


def auto_threads(cfg: DictConfig) -> int:
    """``train.threads``, or the CPUs a cluster launcher reserved, or this process's share of
    the cores: more threads than free cores collapse throughput (DESIGN.md, CPU facts)."""
    if cfg.train.threads:
        return int(cfg.train.threads)
    reserved = launcher_cpus()
    if reserved:
        return reserved
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // parallel_jobs())


def setup_process(cfg: DictConfig) -> torch.device:
    """Flush subnormals, pick threads and device: without these, CPU timings are random."""
    # Saturated sigmoids under BN produce subnormal floats that slow the CPU 20-30x.
    torch.set_flush_denormal(True)
    torch.set_num_threads(auto_threads(cfg))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    return distributed.device_for(device)


def progress_setting(requested: str) -> tuple[str, str]:
    """(mode, label) of the progress display.

    Jobs of a parallel launcher (and torchrun's processes) share one terminal, where live bars
    would overwrite each other: there ``auto`` means plain lines labelled with the job's overrides.
    """
    if requested != "auto" or parallel_jobs() == 1:
        return requested, "train"
    label = "train"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            label = hydra_cfg.job.override_dirname or f"job {hydra_cfg.job.num}"
    except ValueError:  # no Hydra context (tests calling run() directly)
        pass
    return "plain", label


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import hydra
    import torchvision

    return {"bnlab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "hydra": hydra.__version__, "python": platform.python_version()}


def build_optimizer(cfg_optim: DictConfig, model: Net) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg_optim.name == "sgd":
        # fused: one kernel for all parameters instead of a loop of small ops (~5% of a CPU step)
        opt = torch.optim.SGD(params, lr=cfg_optim.lr, momentum=cfg_optim.momentum,
                              weight_decay=cfg_optim.weight_decay, nesterov=cfg_optim.nesterov,
                              fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas),
                                weight_decay=cfg_optim.weight_decay)
    return opt


def learning_rate(cfg_optim, step: int, total_steps: int) -> float:
    """The rate of update number ``step`` (0-based): constant, or cosine from lr to 0.

    A closed form of the step, not an LR-scheduler object: nothing to checkpoint, and no
    wrapper around ``optimizer.step`` (torch's schedulers cost ~4% of a small CPU step).
    """
    if cfg_optim.schedule == "cosine":
        return cfg_optim.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    return cfg_optim.lr


# ---------------------------------------------------------------- the run
class Interrupted(Exception):
    pass


class Trainer:
    """One training run in ``run_dir``: fresh, or resumed from its checkpoint."""

    def __init__(self, cfg: DictConfig, run_dir: Path, device: torch.device, data: Dataset,
                 rank: int = 0, world_size: int = 1) -> None:
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
        if self.distributed and cfg.norm.get("sync", False):
            from bnlab.norms.sync import convert_sync

            convert_sync(self.model)
        # DDP only for the training step: evaluation, probes and checkpoints use the module itself.
        self.train_model = distributed.wrap(self.model, device)
        self.optimizer = build_optimizer(cfg.optim, self.model)
        self.stream = make_batch_stream(data.train, tcfg.batch_size, cfg.seed, cfg.data,
                                        rank=rank, world_size=world_size)
        self.prober = None
        if cfg.probe.enabled:
            from bnlab.probes import Prober

            self.prober = Prober(cfg, self.model, data, device)
        self.step_fn = self._make_step()
        self.step = 0
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
        model, opt = self.train_model, self.optimizer
        amp = bool(self.cfg.train.amp) and self.device.type == "cuda"
        loss_fn, classification = self.loss_fn, self.task == "classification"

        def forward_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            return loss_fn(logits.float(), y), logits

        if self.cfg.train.compile:
            forward_loss = torch.compile(forward_loss)

        def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            loss, logits = forward_loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
            else platform.processor() or platform.machine(),
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
        cfg, tcfg = self.cfg, self.cfg.train
        self.t_start = time.perf_counter()
        recorder = Recorder(self.run_dir, purge_step=self.step + 1 if resumed else None,
                            enabled=self.is_writer)
        mode, label = progress_setting(tcfg.progress) if self.is_writer else ("off", "train")
        progress = Progress(self.total_steps, self.step, mode, label=label)
        self.summary("running")
        if self.prober is not None and self.step == 0:
            self.prober.probe(0, recorder)
        status = "completed"
        # Plain ints: an OmegaConf attribute read costs ~30 us, a tenth of a small CPU step.
        log_every, eval_every = int(tcfg.log_every), int(tcfg.eval_every)
        checkpoint_every, stop_on_divergence = int(tcfg.checkpoint_every), bool(tcfg.stop_on_divergence)
        probe_every = int(cfg.probe.every) if self.prober is not None else 0
        cosine = cfg.optim.schedule == "cosine"
        optim_cfg = OmegaConf.to_object(cfg.optim) if cosine else None
        steps_since_log, train_time = 0, 0.0
        t_mark = time.perf_counter()
        try:
            while self.step < self.total_steps:
                # Replicas stop together, at a log step where they agreed to (see _log_train).
                if (self.stop_signal is not None and not self.distributed) or self.stop_agreed:
                    raise Interrupted
                x, y = next(self.stream)
                if cosine:
                    for group in self.optimizer.param_groups:
                        group["lr"] = learning_rate(optim_cfg, self.step, self.total_steps)
                if self.prober is not None and self.prober.wants_ics(self.step + 1):
                    self.prober.ics(self.step + 1, self.model, self.optimizer, x, y, recorder)
                loss, correct = self.step_fn(x, y)
                self.loss_sum += loss
                self.correct_sum += correct
                self.seen += 1
                self.step += 1
                steps_since_log += 1
                step = self.step
                last = step == self.total_steps
                if step % log_every == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    train_time += time.perf_counter() - t_mark
                    mean_loss = self._log_train(recorder, train_time, steps_since_log)
                    steps_since_log, train_time = 0, 0.0
                    if not math.isfinite(mean_loss):
                        self.diverged_step = step
                        progress.message(f"diverged: train/loss={mean_loss} at step {step}")
                        if stop_on_divergence:
                            status = "diverged"
                            break
                    shown = {"loss": mean_loss, "acc": self.final.get("train/acc", math.nan),
                             "steps/s": self.final["perf/steps_per_s"]}
                    progress.update(step, shown if self.task == "classification"
                                    else {k: v for k, v in shown.items() if k != "acc"})
                    t_mark = time.perf_counter()
                if step % eval_every == 0 or last:
                    self._finish_population_stats(last)
                    self._evaluate(recorder)
                if probe_every and step % probe_every == 0:
                    self.prober.probe(step, recorder)
                if step % checkpoint_every == 0 or last:
                    self.save()
                if step % log_every == 0 or last:
                    t_mark = time.perf_counter()  # eval, probes and checkpoints are not train time
            if status == "diverged" or self.diverged_step is not None:
                status = "diverged"
                self._evaluate(recorder)
            self.save()
            self._write_hparams(recorder)
        except Interrupted:
            self.save()
            status = "interrupted"
        finally:
            progress.close()
            recorder.close()
        self.summary(status)
        return status

    def _write_hparams(self, recorder: Recorder) -> None:
        """The run's config and final metrics for TensorBoard's HParams dashboard."""
        from bnlab.runs import flatten

        config = flatten(OmegaConf.to_container(self.cfg, resolve=True))
        skip = ("resume", "train.progress", "train.threads", "data.root")
        recorder.hparams({k: v for k, v in config.items() if k not in skip},
                         {k: v for k, v in self.final.items() if k.startswith(("test/", "train/"))})

    def _finish_population_stats(self, last: bool) -> None:
        """BN's ``inference=population`` (Ioffe & Szegedy, Alg. 2) replaces the moving averages."""
        if last and self.cfg.norm.get("inference") == "population":
            from bnlab.norms.batchnorm import estimate_population_statistics

            estimate_population_statistics(self.model, self.stream)


# ---------------------------------------------------------------- the Hydra task
def _looks_like_fresh_run(run_dir: Path) -> bool:
    """Only Hydra's own files: nothing a user would miss if the directory went away."""
    return all(p.name in (".hydra", "train.log") for p in run_dir.iterdir())


def _install_signal_handlers(trainer: Trainer) -> None:
    def handle(signum, frame):  # first signal: checkpoint at the next step; second: leave now
        if trainer.stop_signal is not None:
            os._exit(EXIT_INTERRUPTED)
        trainer.stop_signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


def run(cfg: DictConfig, run_dir: Path) -> str:
    """Train ``cfg`` in ``run_dir`` (resuming from its checkpoint when ``cfg.resume`` is set)."""
    validate(cfg)
    replica = distributed.init_process_group()  # a no-op outside torchrun
    if cfg.norm.get("sync", False) and cfg.norm.name != "bn":
        raise UserError(f"norm.sync=true is not valid with norm={cfg.norm.name}: cross-replica "
                        "statistics exist for norm=bn only")
    device = setup_process(cfg)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, device)
    check_sampler(cfg.data, data, cfg.train.batch_size)
    if cfg.train.batch_size > len(data.train):
        raise UserError(f"train.batch_size={cfg.train.batch_size} is not valid: the {data.name} "
                        f"training split has only {len(data.train)} examples")
    if cfg.probe.enabled and cfg.probe.batch_size > len(data.train):
        raise UserError(f"probe.batch_size={cfg.probe.batch_size} is not valid: the {data.name} "
                        f"training split has only {len(data.train)} examples")
    trainer = Trainer(cfg, run_dir, device, data, rank=replica.rank, world_size=replica.world_size)
    resumed = cfg.resume is not None
    if resumed:
        trainer.load_state_dict(load_checkpoint(run_dir / CHECKPOINT, device))
    _install_signal_handlers(trainer)
    return trainer.run(resumed)


def main(cfg: DictConfig) -> None:
    """Hydra task of ``bnlab train``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        status = run(cfg, run_dir)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        if not distributed.replica().is_writer:
            sys.exit(EXIT_USER_ERROR)  # rank 0 decides what happens to the shared directory
        if cfg.resume is not None:
            sys.exit(EXIT_USER_ERROR)  # the run's own files stay exactly as they were
        if multirun:
            # Keep the directory: a sweep's report lists this run as failed, and why.
            write_json_atomic(run_dir / SUMMARY_JSON, {"status": "failed", "error": str(err)})
            return
        if run_dir.is_dir() and _looks_like_fresh_run(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the date folder Hydra made for it, if now empty
                run_dir.parent.rmdir()
        sys.exit(EXIT_USER_ERROR)
    if status == "interrupted":
        if distributed.replica().is_writer:
            print(f"bnlab: interrupted; resume with: bnlab train resume={run_dir}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
