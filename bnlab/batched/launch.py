"""``hydra/launcher=batched``: a sweep's runs grouped and trained as vectorized programs.

The launcher (``hydra_plugins/bnlab_batched_launcher``) hands the sweep's jobs to
:func:`launch`, which

1. composes each job's config and finds its run directory, as Hydra's basic launcher does;
2. looks at what that directory already holds: nothing (a new run), a finished run (kept as it
   is), or a run that stopped early (continued from its checkpoint, or started again when it
   has none). Re-running a sweep's command with ``hydra.sweep.dir=<that sweep>`` therefore
   finishes what a killed sweep left undone;
3. groups the jobs whose configs differ only in ``hydra.launcher.vary`` (seed, learning rate,
   momentum, weight decay) and that can be vectorized (:func:`bnlab.batched.group.not_vectorized`), at
   most ``hydra.launcher.max_group`` per program, and trains each group with
   :func:`bnlab.batched.group.train_group`, after Hydra has set up each member's run directory
   (``.hydra/``, its job log) exactly as for any job;
4. runs every other job as the basic launcher would: in this process, one after another.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from bnlab.errors import UserError
from bnlab.rundir.names import CHECKPOINT, CONFIG, SCALARS_CSV, SUMMARY_JSON, TRAIN_LOG

log = logging.getLogger(__name__)

KEPT = ("completed", "diverged")  # statuses of runs that a re-run of the sweep leaves as they are


@dataclass
class Job:
    idx: int
    overrides: list[str]
    config: DictConfig  # Hydra's config of this job, ``hydra`` node included
    run_dir: Path
    task: dict[str, Any]  # the job's own config (no ``hydra`` node), interpolations resolved
    label: str  # hydra.job.override_dirname, e.g. seed=0
    previous: str = "new"  # new | keep | resume | restart
    start_step: int = 0
    result: JobReturn | None = field(default=None, repr=False)


def _with_hydra_config(config: DictConfig, fn):
    """Evaluate ``fn()`` with Hydra's global config set to this job's, as ``run_job`` does."""
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(config)
    try:
        return fn()
    finally:
        HydraConfig.instance().cfg = saved


def _make_job(launcher, idx: int, overrides: list[str]) -> Job:
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config):
        config.hydra.job.id = idx
        config.hydra.job.num = idx

    def describe() -> tuple[Path, dict[str, Any], str]:
        run_dir = os.path.abspath(os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                                               str(OmegaConf.select(config, "hydra.sweep.subdir"))))
        own = copy.deepcopy(config)
        with read_write(own), open_dict(own):
            del own["hydra"]
        return (Path(run_dir), OmegaConf.to_container(own, resolve=True),
                str(config.hydra.job.override_dirname))

    run_dir, task, label = _with_hydra_config(config, describe)
    return Job(idx, list(overrides), config, run_dir, task, label)


# ---------------------------------------------------------------- what a run directory holds
def _flat(tree: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    from bnlab.rundir.reader import flatten

    return {k: v for k, v in flatten(tree).items() if k not in skip}


def _inspect(job: Job) -> None:
    """Set ``job.previous`` (and ``start_step``) from what its run directory already holds."""
    from bnlab.run.resume import RESUMABLE_KEYS
    from bnlab.rundir.lock import holder, refusal
    from bnlab.rundir.outcome import read_summary

    pid = holder(job.run_dir)
    if pid is not None:  # a live process writes it: touch nothing
        raise UserError(refusal(job.run_dir, pid))
    saved_config = job.run_dir / CONFIG
    if not saved_config.is_file():
        job.previous = "restart" if job.run_dir.is_dir() and any(job.run_dir.iterdir()) else "new"
        return
    skip = (*RESUMABLE_KEYS, "resume")
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_config), resolve=False), skip)
    new = _flat(OmegaConf.to_container(job.config, resolve=False), (*skip, "hydra"))
    new = {k: v for k, v in new.items() if not k.startswith("hydra.")}
    changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k) != new.get(k))
    if changed:
        key = changed[0]
        raise UserError(f"{job.run_dir} holds a run of another config ({key}: {saved.get(key)!r} "
                        f"there, {new.get(key)!r} now); choose another hydra.sweep.dir")
    summary = read_summary(job.run_dir) or {}
    saved_loop = OmegaConf.load(saved_config).get("train", {})
    same_length = all(saved_loop.get(k) == job.task["train"].get(k) for k in ("steps", "epochs"))
    if summary.get("status") in KEPT and same_length:
        job.previous = "keep"
    elif (job.run_dir / CHECKPOINT).is_file():
        from bnlab.run.checkpoint import load_checkpoint

        job.previous = "resume"
        job.start_step = int(load_checkpoint(job.run_dir / CHECKPOINT)["step"])
        # what `bnlab train resume=<run>` composes: no new .hydra/
        with read_write(job.config), read_write(job.config.hydra):
            job.config.resume = str(job.run_dir)
            job.config.hydra.output_subdir = None
        job.task["resume"] = str(job.run_dir)
    else:
        job.previous = "restart"


def _clear(run_dir: Path) -> None:
    """Remove what an earlier attempt without a checkpoint wrote (not Hydra's files)."""
    for name in (SCALARS_CSV, SUMMARY_JSON):
        (run_dir / name).unlink(missing_ok=True)
    for events in run_dir.glob("events.out.tfevents.*"):
        events.unlink()
    shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)


# ---------------------------------------------------------------- grouping
def group_key(task: dict[str, Any], vary: list[str], start_step: int) -> str | None:
    """The key shared by jobs that can run as one program, or None when the job cannot."""
    from bnlab.batched.group import not_vectorized

    cfg = OmegaConf.create(task)
    if not_vectorized(cfg) is not None:
        return None
    rest = copy.deepcopy(task)
    rest.pop("resume", None)
    for key in vary:
        node = rest
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node.pop(leaf)
    return json.dumps([rest, start_step], sort_keys=True, default=str)


def plan(jobs: list[Job], vary: list[str], max_group: int) -> list[list[Job]]:
    """Units of work in sweep order: groups of 2 or more jobs, and single jobs."""
    groups: dict[str, list[Job]] = {}
    units: list[list[Job]] = []
    dirs = [job.run_dir for job in jobs]
    for job in jobs:
        key = None
        if dirs.count(job.run_dir) == 1:  # two jobs writing one directory: never together
            key = group_key(job.task, vary, job.start_step)
        if key is None:
            units.append([job])
            continue
        group = groups.get(key)
        if group is None or (max_group and len(group) >= max_group):
            group = groups[key] = []
            units.append(group)
        group.append(job)
    return units


# ---------------------------------------------------------------- running
def _run_basic(launcher, job: Job) -> JobReturn:
    """The basic launcher's way: Hydra's run_job with bnlab's task, in this process."""
    ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                  config=job.config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return ret


def _kept(job: Job) -> JobReturn:
    """The JobReturn of a run left as it is."""
    def make() -> JobReturn:
        ret = JobReturn(overrides=OmegaConf.to_container(job.config.hydra.overrides.task),
                        cfg=OmegaConf.create({k: v for k, v in job.task.items()}),
                        hydra_cfg=copy.deepcopy(HydraConfig.instance().cfg), working_dir=os.getcwd(),
                        task_name=str(job.config.hydra.job.name), status=JobStatus.COMPLETED)
        ret.return_value = None
        return ret

    return _with_hydra_config(job.config, make)


def _prepare(launcher, job: Job, note: str) -> tuple[DictConfig, Path]:
    """Let Hydra set up the job's run directory (``.hydra/``, the job log) as for any job, with
    a task that only hands back the composed config (and says in the job's log where it trains);
    training comes after, for the whole group."""
    captured: dict[str, Any] = {}

    def task(cfg: DictConfig) -> None:
        captured.update(cfg=cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))
        _append_log(captured["run_dir"], note + "\n")

    job.result = run_job(hydra_context=launcher.hydra_context, task_function=task, config=job.config,
                         job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    return captured["cfg"], captured["run_dir"]


def _append_log(run_dir: Path, text: str) -> None:
    """Append to the job's log in its run directory (not to the terminal)."""
    with open(run_dir / TRAIN_LOG, "a") as f:
        f.write(text)


def _run_group(launcher, jobs: list[Job]) -> None:
    from bnlab.batched.group import train_group

    names = ", ".join(j.label for j in jobs)
    note = f"bnlab: trained by hydra/launcher=batched as one program of {len(jobs)} runs: {names}"
    prepared = [_prepare(launcher, job, note) for job in jobs]
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    label = f"{len(jobs)} runs"
    log.info(f"Training {len(jobs)} runs as one program: {names}")
    try:
        statuses = train_group(prepared, label)
    except UserError as err:
        log.info(f"Not as one program ({err}): running these {len(jobs)} jobs one by one")
        for job in jobs:
            job.result = _run_basic(launcher, job)
        return
    except Exception as err:  # a bug: each member's summary says failed; Hydra reports it
        import traceback

        for job in jobs:
            _append_log(job.run_dir, traceback.format_exc())
            job.result.status = JobStatus.FAILED
            job.result.return_value = err
        return
    from bnlab.rundir.outcome import headline, read_summary

    for job, status in zip(jobs, statuses, strict=True):  # what a sweep's job says at its end
        print(f"bnlab: [{job.label}] {headline(read_summary(job.run_dir) or {'status': status})}",
              flush=True)
    if "interrupted" in statuses:
        from bnlab.run.trainer import EXIT_INTERRUPTED

        sweep_dir = launcher.config.hydra.sweep.dir
        print(f"bnlab: interrupted; continue the sweep with the same command and "
              f"hydra.sweep.dir={sweep_dir}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def launch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    """Hydra's Launcher.launch for ``hydra/launcher=batched``: one JobReturn per job, in order."""
    from bnlab.batched.group import VARYING_KEYS

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    try:
        unknown = [k for k in launcher.vary if k not in VARYING_KEYS]
        if unknown:
            raise UserError(f"hydra.launcher.vary: {', '.join(unknown)} cannot vary within a program; "
                            f"choose among {', '.join(VARYING_KEYS)}")
        jobs = [_make_job(launcher, initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for job in jobs:
            _inspect(job)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if job.previous != "keep"]
    units = plan(todo, list(launcher.vary), launcher.max_group)
    grouped = sum(len(u) for u in units if len(u) > 1)
    log.info(f"Batched launcher: {len(jobs)} jobs in {sweep_dir}: {grouped} in "
             f"{sum(len(u) > 1 for u in units)} vectorized programs, "
             f"{len(todo) - grouped} one by one, {len(jobs) - len(todo)} already finished")
    for job in jobs:
        note = {"new": "", "keep": " (finished: kept)", "resume": f" (continues from step {job.start_step})",
                "restart": " (no checkpoint: starts again)"}[job.previous]
        log.info(f"\t#{job.idx} : {' '.join(filter_overrides(job.overrides))}{note}")
    for job in jobs:
        if job.previous in ("keep", "resume"):
            # This sweep accounts for the run (its end counts runs by their .hydra/ time),
            # though Hydra does not write its .hydra/ again.
            os.utime(job.run_dir / CONFIG)
        if job.previous == "keep":
            job.result = _kept(job)
        elif job.previous == "restart":
            _clear(job.run_dir)
    for unit in units:
        if len(unit) > 1:
            _run_group(launcher, unit)
        else:
            unit[0].result = _run_basic(launcher, unit[0])
    return [job.result for job in jobs]
