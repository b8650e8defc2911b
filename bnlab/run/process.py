"""Setting up a training process: subnormals, threads, device, seeds, and what it runs on.

A training process shares the machine with the other jobs of a parallel launcher (joblib,
submitit) or with torchrun's other replicas; the thread count and the progress display follow
from how many there are, which is read from the launcher's config and torchrun's environment.
"""

from __future__ import annotations

import os
import platform
import time

import torch
from torch import Tensor

from bnlab import __version__
from bnlab.errors import UserError
from bnlab.norms import frozen_stats
from bnlab.run import distributed

# A training step whose forward pass is under this many FLOPs runs on one thread when
# train.threads is not set: its operations are too small to share, and a second thread's
# synchronisation costs more than it saves. On the 2-core machine bnlab is developed on, 2
# threads made the default MLP (12 MFLOP at batch 60) and the same MLP at batch 256 (51 MFLOP)
# no faster than 1, and the CNN at batch 64 (89 MFLOP) 1.3x faster (docs/performance.md).
ONE_THREAD_BELOW_FLOPS = 50e6


def _launcher() -> object | None:
    """The Hydra launcher config of this job, or None outside a Hydra job (tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().launcher
    except (ValueError, AttributeError):
        return None


def parallel_jobs() -> int:
    """How many training processes share this machine's cores (parallel launcher or torchrun)."""
    jobs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launcher = _launcher()
    n_jobs = launcher.get("n_jobs", None) if launcher is not None else None
    if n_jobs:
        jobs = max(jobs, int(n_jobs) if int(n_jobs) > 0 else os.cpu_count() or 1)
    return jobs


def launcher_cpus() -> int | None:
    """CPUs a cluster launcher reserved for each job (submitit's ``cpus_per_task``), if set."""
    launcher = _launcher()
    cpus = launcher.get("cpus_per_task", None) if launcher is not None else None
    return int(cpus) if cpus else None


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all cores from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal


def free_cores(window: float = 0.05) -> int | None:
    """Cores left idle by the rest of the machine over ``window`` seconds, or None where it
    cannot be read. A compute thread that must meet the others at every operation waits for
    the slowest: on a core another process keeps busy it waits for the scheduler, and a
    2-thread step then runs 10-50x slower than a 1-thread one (docs/performance.md)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times()
    idle, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return None
    return max(1, round(idle / total * (os.cpu_count() or 1)))


def auto_threads(cfg) -> int:
    """``train.threads``, or the CPUs a cluster launcher reserved, or this process's share of
    the cores that are free when it starts: more threads than free cores collapse throughput
    (docs/performance.md). Never above the usable cores."""
    cores = usable_cores()
    if cfg.train.threads:
        if cfg.train.threads > cores:  # 999 was once accepted: a load average of ~200
            raise UserError(f"train.threads={cfg.train.threads} is not valid: this process may use "
                            f"{cores} cores; give at most {cores}, or 0 to choose from the free cores")
        return int(cfg.train.threads)
    reserved = launcher_cpus()
    if reserved:
        return min(reserved, cores)
    share = max(1, cores // parallel_jobs())
    free = free_cores()
    return share if free is None else max(1, min(share, free))


def forward_flops(model: torch.nn.Module, example: Tensor, rows: int) -> float:
    """FLOPs of ``model``'s forward pass over ``rows`` rows like ``example``'s, counted by torch's
    FlopCounterMode (matrix products and convolutions) on two rows in eval mode and scaled: the
    models' cost is linear in the rows. Nothing of the model changes (buffers, RNG, mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), frozen_stats(model), FlopCounterMode(display=False) as counter:
            model(example[:2])
    finally:
        model.train(was_training)
    return counter.get_total_flops() / len(example[:2]) * rows


def fit_threads_to_step(cfg, model: torch.nn.Module, example: Tensor, rows: int) -> int:
    """With ``train.threads`` not set, on a CPU: one thread for a step whose forward pass over
    its ``rows`` rows is under :data:`ONE_THREAD_BELOW_FLOPS`. Returns torch's thread count.
    Call it once the optimizer exists: FlopCounterMode needs ``torch._dynamo``, which the
    optimizer's constructor imports anyway (~1.7 s), and then costs a few milliseconds."""
    if cfg.train.threads or example.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.get_num_threads()
    if forward_flops(model, example, rows) < ONE_THREAD_BELOW_FLOPS:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def setup_process(cfg) -> torch.device:
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
    if cfg.train.amp and device.type != "cuda":  # refused, not silently ignored
        raise UserError(f"train.amp=true is CUDA autocast (bfloat16) and this run is on {device.type}; "
                        "drop it, or use device=cuda")
    return distributed.device_for(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_setting(requested: str) -> tuple[str, str]:
    """(mode, label) of the progress display.

    Jobs of a parallel launcher (and torchrun's processes) share one terminal, where live bars
    would overwrite each other: there ``auto`` means plain lines labelled with the job's overrides.
    """
    if requested != "auto" or parallel_jobs() == 1:
        return requested, "train"
    return "plain", job_label()


def job_label() -> str:
    """A sweep job's overrides (``norm=bn,seed=0``), else ``train``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # no Hydra context (tests calling run() directly)
        return "train"
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return "train"
    return hydra_cfg.job.override_dirname or f"job {hydra_cfg.job.num}"


def versions() -> dict[str, str]:
    """The versions a run's results depend on; torchvision's from its installed metadata, since
    importing it costs ~2 s of start-up and a run from resident tensors never needs it."""
    from importlib.metadata import PackageNotFoundError, version

    import hydra

    try:
        vision = version("torchvision")
    except PackageNotFoundError:
        vision = "not installed"
    return {"bnlab": __version__, "torch": torch.__version__, "torchvision": vision,
            "hydra": hydra.__version__, "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
