"""`bnlab <command>`: thin dispatch. Heavy imports (torch, hydra) happen only inside a command."""

from __future__ import annotations

import os
import secrets
import signal
import sys

USAGE = """usage: bnlab <command> [args]

commands:
  train    train one model, or a sweep with -m (Hydra overrides: bnlab train norm=bn seed=1)
  report   compare runs: tables, report.md and PNG figures (bnlab report outputs/multirun/...)
  bench    measure bnlab's speed against baselines (writes bench.json)

Run `bnlab <command> --help` for a command's options.
"""
EXIT_USER_ERROR = 2  # the codes of bnlab.run.trainer, which cannot be imported before torch
EXIT_INTERRUPTED = 130


class _StartupSignals:
    """Ctrl-C and SIGTERM while `bnlab train` starts, before the trainer's own handlers exist.

    A signal is recorded, never raised in the middle of an import (a KeyboardInterrupt inside
    torch's import has been swallowed, or turned into an unrelated error), and acted on at the
    next safe point (:meth:`leave_if_received`): the fresh run directory is removed, one line
    says so, exit 130. The trainer acts on a recorded signal as soon as its handlers take over
    (bnlab.run.trainer). A third signal leaves at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self.run_dir = None  # the job's directory, once Hydra made it
        self.sweep_dir = None

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        self.received = signum
        if self.count >= 3:
            self._discard()
            os.write(2, b"bnlab: interrupted\n")
            os._exit(EXIT_INTERRUPTED)

    def install(self) -> _StartupSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)
        return self

    def _discard(self) -> None:
        from bnlab.rundir.writer import discard_fresh, discard_fresh_sweep

        if self.run_dir is not None:
            discard_fresh(self.run_dir)
        if self.sweep_dir is not None:
            discard_fresh_sweep(self.sweep_dir)

    def leave_if_received(self, resuming: bool = False) -> None:
        """Exit 130 if a signal came: nothing of a run was written yet, and nothing is kept."""
        if self.received is None:
            return
        self._discard()
        what = "the run is as it was" if resuming else "nothing kept"
        print(f"bnlab: interrupted before training started; {what}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _train(argv: list[str]) -> int:
    signals = _StartupSignals().install()  # first: torch's import takes seconds
    # One tag per invocation, inherited by parallel workers, keeps run and sweep directories unique.
    os.environ.setdefault("BNLAB_RUN_ID", secrets.token_hex(3))
    from bnlab.errors import UserError
    from bnlab.run.preflight import check_output_dir, check_override_keys
    from bnlab.run.resume import resume_from
    from bnlab.rundir import writer

    try:
        resumption = resume_from(argv)
        if resumption is not None:
            return _resume(resumption, signals)
        shows = [a for a in argv if a in ("--cfg", "-c", "--info", "-i")]
        if shows and any(a in ("-m", "--multirun") for a in argv):
            raise UserError(f"{shows[0]} shows the config of one run and cannot be combined with -m; "
                            "drop -m and give one value per key (a sweep's first job)")
        check_override_keys(argv)
        if not any(a in ("--help", "-h", "--cfg", "-c", "--info", "-i", "--hydra-help") for a in argv):
            writer.existed_before = check_output_dir(argv)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    signals.leave_if_received()

    import hydra

    from bnlab.config.schema import config_dir, register_configs

    if any(a in ("-m", "--multirun") for a in argv):
        argv = _name_runs_by_swept_keys(argv, config_dir() / "train.yaml")
    if "LOCAL_RANK" in os.environ:  # started by torchrun: all ranks must share one run directory
        from bnlab.run.distributed import agree_on_run_dir, launched_by_torchrun

        try:
            if launched_by_torchrun():
                pattern = _configured(config_dir() / "train.yaml", "hydra.run.dir")
                argv = agree_on_run_dir(argv, pattern)
        except UserError as err:
            print(f"bnlab: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR

    register_configs()
    sys.argv = ["bnlab train", *argv]
    started = []

    def task(cfg) -> None:
        from pathlib import Path

        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        started.append(True)
        hydra_cfg = HydraConfig.get()
        signals.run_dir = Path(hydra_cfg.runtime.output_dir)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            signals.sweep_dir = Path(str(hydra_cfg.sweep.dir))
        signals.leave_if_received()
        if hydra_cfg.mode == RunMode.RUN and cfg.resume is None and "LOCAL_RANK" not in os.environ:
            _refuse_bad_values(cfg, signals.run_dir)
        from bnlab.run.trainer import main as train_main  # torch: seconds

        signals.leave_if_received()
        train_main(cfg)

    try:
        hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(task)()
    except SystemExit as stop:
        if stop.code == 1 and not started:  # Hydra's own message for a bad override: a user's error
            return EXIT_USER_ERROR
        raise
    finally:
        if "torch" in sys.modules:  # only a run that trained can have joined a process group
            from bnlab.run.distributed import shutdown

            shutdown()
        _ended()
    return _after(signals)


def _refuse_bad_values(cfg, run_dir) -> None:
    """The schema's bounds and relations, checked before torch is imported: a bad value gets its
    one line and exit 2 in ~0.5 s instead of ~2.5 s, and the directory Hydra made for the
    run goes, as the trainer removes it for any refusal before training. A sweep's job is left
    to the trainer, which marks it failed for the sweep's report while the other jobs go on; so
    are a resumed run and torchrun's replicas."""
    from bnlab.config.schema import validate
    from bnlab.errors import UserError
    from bnlab.rundir.writer import discard_fresh

    try:
        validate(cfg)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        discard_fresh(run_dir)
        sys.exit(EXIT_USER_ERROR)


def _ended() -> None:
    """Ignore signals from here on: the interpreter's shutdown puts the default handlers back,
    and a Ctrl-C during it (torch's takes a while) would kill the process without a word."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _after(signals: _StartupSignals) -> int:
    """Exit 0, or 130 when a signal came after the run had ended (its record is whole)."""
    if signals.received is None:
        return 0
    print("bnlab: interrupted after the run had ended; nothing lost", file=sys.stderr)
    return EXIT_INTERRUPTED


def _resume(resumption, signals: _StartupSignals) -> int:
    """`bnlab train resume=<run>`: continue the run with its saved config (bnlab.run.resume),
    without Hydra: nothing is composed, and the run's directory is the one it has."""
    from omegaconf import OmegaConf

    from bnlab.errors import UserError
    from bnlab.run.preflight import check_output_dir

    flags = list(resumption.flags)
    if flags and flags[0] in ("--cfg", "-c") and flags[1:] in ([], ["job"], ["all"]):
        print(OmegaConf.to_yaml(resumption.config), end="")
        return 0
    if flags:
        raise UserError(f"resume= takes overrides only, not {' '.join(flags)}")
    check_output_dir([f"hydra.run.dir={resumption.run}"], resuming=True)
    signals.leave_if_received(resuming=True)
    from bnlab.run.trainer import execute  # torch: seconds

    signals.leave_if_received(resuming=True)
    try:
        code = execute(resumption.config, resumption.run, multirun=False)
    finally:
        from bnlab.run.distributed import shutdown

        shutdown()
        _ended()
    return code or _after(signals)


def _configured(train_yaml, key: str):
    """``key`` of train.yaml as written (interpolations unresolved), or None."""
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(train_yaml), resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _name_runs_by_swept_keys(argv: list[str], train_yaml) -> list[str]:
    """Name a sweep's run directories after what varies: ``norm=bn,seed=0``.

    Hydra names them after all overrides (``data=digits,norm=bn,seed=0,train.steps=50``); the
    keys every run shares are in the sweep's ``multirun.yaml`` and each run's ``.hydra/``, so
    they are added to ``hydra.job.config.override_dirname.exclude_keys`` (unless the user sets
    that list). Sweeps from a preset's ``hydra.sweeper.params`` still name their runs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    exclude_key = "hydra.job.config.override_dirname.exclude_keys"
    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    if any(a.split("=", 1)[0].lstrip("+~") == exclude_key for a in candidates):
        return argv
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return argv  # Hydra reports the bad override itself
    fixed = [o.key_or_group for o in overrides
             if not o.is_hydra_override() and not o.is_sweep_override()]
    if not fixed:
        return argv
    excluded = list(_configured(train_yaml, exclude_key) or []) + fixed
    return [*argv, f"{exclude_key}=[{','.join(dict.fromkeys(excluded))}]"]


def _report(argv: list[str]) -> int:
    from bnlab.report.command import main as report_main

    return report_main(argv)


def _bench(argv: list[str]) -> int:
    from bnlab.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"train": _train, "report": _report, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bnlab: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return COMMANDS[command](rest)


def entry() -> None:
    sys.exit(main())
