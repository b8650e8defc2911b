"""`bnlab bench` (also `python scripts/bench.py`): bnlab's speed as ratios against baselines.

This machine is noisy and absolute times are not comparable between runs, so every row is a
ratio of two figures measured side by side in this process: the trainer against the textbook
PyTorch loop and against the ceiling (one resident batch, no data movement), probes against
none, each norm against torch's native BatchNorm, and the report and start-up against their
own baselines. Run it with nothing else busy on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MLP = ["model=mlp", "train.batch_size=60"]
CNN = ["model=cnn", "train.batch_size=256"]


def _seconds(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class Bench:
    def __init__(self, data: str, steps: int) -> None:
        import torch

        from bnlab.config.schema import compose
        from bnlab.data import load_dataset

        torch.set_flush_denormal(True)
        self.torch = torch
        self.compose = compose
        self.data_name, self.steps = data, steps
        self.data = load_dataset(compose(f"data={data}").data, torch.device("cpu"))
        self.rows: list[dict] = []

    def cfg(self, *overrides: str):
        """The config of a measurement: evaluation and checkpoints off (the final ones remain)."""
        return self.compose(f"data={self.data_name}", "train.progress=off", "train.eval_every=1000000",
                            "train.checkpoint_every=1000000", *overrides)

    def add(self, group: str, name: str, value: float, baseline: float, unit: str, note: str = "",
            ratios: list[float] | None = None) -> None:
        """One row. ``ratios``: the ratio of each round's paired measurements; the row's ratio is
        their median, and their range is printed with it, so a reader sees the machine's noise.
        Without them the ratio is value / baseline."""
        ratio = value / baseline if ratios is None else statistics.median(ratios)
        self.rows.append({"group": group, "name": name, "value": value, "baseline": baseline,
                          "unit": unit, "ratio": ratio, "ratios": ratios, "note": note})

    # -- the three loops on one model: bnlab's trainer, the textbook loop, the ceiling
    def trainer_steps_per_s(self, overrides: list[str], threads: int, steps: int | None = None) -> float:
        steps = steps or self.steps
        seconds, _ = self._trainer_run(overrides, threads, steps)
        return steps / seconds

    def _trainer_run(self, overrides: list[str], threads: int, steps: int,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[float, list[float]]:
        """(seconds, logged perf/steps_per_s) of one whole run. Building the model is start-up;
        the run, its logging, evaluation and checkpoints count."""
        import csv

        from bnlab.run.trainer import Trainer

        cfg = self.cfg(*overrides, f"train.steps={steps}", f"train.threads={threads}")
        self.torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp), self.torch.device("cpu"), self.data)
            seconds = _seconds(lambda: trainer.run(resumed=False), clock)
            with open(Path(tmp) / "scalars.csv") as f:
                rates = [float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "perf/steps_per_s"]
        return seconds, rates

    def _model_and_step(self, overrides: list[str]):
        import torch.nn.functional as F

        from bnlab.models import build_model
        from bnlab.run.optim import build_optimizer

        cfg = self.cfg(*overrides)
        model = build_model(cfg, self.data.shape, self.data.num_classes)
        opt = build_optimizer(cfg.optim, model)

        def step(x, y) -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return cfg, step

    def ceiling_steps_per_s(self, overrides: list[str], threads: int, steps: int | None = None,
                            clock: Callable[[], float] = time.perf_counter) -> float:
        """The same model and optimizer stepping on one resident batch: no data movement at all."""
        self.torch.set_num_threads(threads)
        cfg, step = self._model_and_step(overrides)
        batch = cfg.train.batch_size
        x, y = self.data.train.x[:batch].clone(), self.data.train.y[:batch].clone()
        steps = steps or self.steps
        for _ in range(20):
            step(x, y)

        def once() -> None:
            for _ in range(steps):
                step(x, y)
        return steps / _seconds(once, clock)

    def textbook_steps_per_s(self, overrides: list[str], threads: int, steps: int | None = None) -> float:
        """torchvision dataset + ToTensor/Normalize + DataLoader: how most tutorials train."""
        import torchvision.datasets as tvd
        import torchvision.transforms as T
        from torch.utils.data import DataLoader

        self.torch.set_num_threads(threads)
        cfg, step = self._model_and_step(overrides)
        root = os.path.expanduser(str(cfg.data.root))
        classes = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST}
        transform = T.Compose([T.ToTensor(), T.Normalize((0.2860,), (0.3530,))])
        dataset = classes[self.data_name](root, train=True, download=False, transform=transform)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
        steps = min(steps or self.steps, len(loader))

        def once() -> None:
            for i, (x, y) in enumerate(loader):
                step(x, y)
                if i + 1 == steps:
                    break
        return steps / _seconds(once)

    def rounds(self, measures: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list]:
        """Each measurement once per round, in turn: ratios within a round share the machine's
        state of the moment, and their median over rounds is robust to its drift. Round r starts
        at measurement r (mod their number): the first of a round ran up to 7% slower than the
        same configuration measured later in it (2026-12-07), a bias no fixed order cancels."""
        results: dict[str, list] = {name: [] for name in measures}
        names = list(measures)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(measures[name]())
        return results

    def loops(self, name: str, overrides: list[str], steps: int, rounds: int) -> None:
        """The trainer against the ceiling of its own model (probes off: their cost is a row of
        its own), the trainer at its defaults (bnlab's BN, default probes) against the ceiling
        of the same network with torch's native BN (the comparison a user makes), and the
        textbook loop. Evaluation and checkpoints are off in all of them: ``train.eval_every=auto``
        evaluates 20 times a run, whatever its length, so a short benchmark run would be mostly
        evaluation."""
        auto = self._auto_threads(overrides)
        native = [*overrides, "norm.impl=torch"]
        # the textbook loop runs ~130 steps/s on the MLP: a fifth of the steps measures it as well
        textbook_steps = max(50, steps // 5)
        r = self.rounds({
            "ceiling1": lambda: self.ceiling_steps_per_s(overrides, 1, steps),
            "ceiling2": lambda: self.ceiling_steps_per_s(overrides, 2, steps),
            "native1": lambda: self.ceiling_steps_per_s(native, 1, steps),
            "native2": lambda: self.ceiling_steps_per_s(native, 2, steps),
            "trainer": lambda: self.trainer_steps_per_s([*overrides, "probe=off"], auto, steps),
            "defaults": lambda: self.trainer_steps_per_s(overrides, auto, steps),
            "textbook1": lambda: self.textbook_steps_per_s(overrides, 1, textbook_steps),
            "textbook2": lambda: self.textbook_steps_per_s(overrides, 2, textbook_steps),
        }, rounds)
        best = {k: [max(a, b) for a, b in zip(r[k + "1"], r[k + "2"], strict=True)]
                for k in ("ceiling", "native", "textbook")}
        med = statistics.median

        def row(measured: str, baseline: str, label: str, note: str) -> None:
            self.add("trainer", f"{name}: {label}", med(r[measured]), med(best[baseline]), "steps/s",
                     f"{note}; baseline best of 1/2 threads ({med(r[baseline + '1']):.0f} / "
                     f"{med(r[baseline + '2']):.0f})",
                     ratios=[a / b for a, b in zip(r[measured], best[baseline], strict=True)])

        row("trainer", "ceiling", "trainer vs ceiling", f"probes off, {auto} thread(s)")
        row("defaults", "native", "trainer at defaults vs native-BN ceiling",
            "bnlab's BN and default probes against torch's BN on one resident batch; "
            "target >= 0.9")
        row("trainer", "textbook", "trainer vs textbook loop", "probes off")

    def _auto_threads(self, overrides: list[str] = MLP, runs: int = 1) -> int:
        """The threads a run of ``overrides`` (a batched program of ``runs`` runs) would take
        now, chosen as ``bnlab train`` does: the free cores at start, then one thread for a
        small step."""
        from bnlab.models import build_model
        from bnlab.run.optim import build_optimizer
        from bnlab.run.process import auto_threads, fit_threads_to_step

        cfg = self.cfg(*overrides)
        self.torch.set_num_threads(auto_threads(cfg))
        model = build_model(cfg, self.data.shape, self.data.num_classes)
        build_optimizer(cfg.optim, model)
        return fit_threads_to_step(cfg, model, self.data.train.x, cfg.train.batch_size * runs)

    def cpu_time(self, steps: int, rounds: int) -> None:
        """The two CPU targets again, timed by this process's CPU time at one thread. On a shared
        virtual machine the wall clock also runs while the host serves others (steal time):
        +-30% between 3-second measurements on the machine bnlab is developed on, more than the
        differences measured. CPU time counts only this process's work. One thread, because with
        more, idle workers' spinning would count too. The trainer's figure is a whole run:
        logging, default probes, final evaluation and checkpoint included."""
        cpu = time.process_time
        r = self.rounds({
            "native": lambda: self.ceiling_steps_per_s([*MLP, "norm.impl=torch"], 1, steps, cpu),
            "bn": lambda: self.ceiling_steps_per_s([*MLP, "norm.impl=scratch"], 1, steps, cpu),
            "defaults": lambda: steps / self._trainer_run(MLP, 1, steps, cpu)[0],
        }, rounds)
        med = statistics.median
        self.add("cpu time", "MLP: bn impl=scratch (the equations) vs impl=torch, CPU time per step",
                 1 / med(r["bn"]), 1 / med(r["native"]), "s/step",
                 "1 thread, one resident batch; what the reference costs",
                 ratios=[n / b for n, b in zip(r["native"], r["bn"], strict=True)])
        self.add("cpu time", "MLP: trainer at defaults vs native-BN ceiling, CPU time", med(r["defaults"]),
                 med(r["native"]), "steps/s", f"1 thread, whole {steps}-step runs; target >= 0.9",
                 ratios=[d / n for n, d in zip(r["native"], r["defaults"], strict=True)])

    # -- train.compile: the same trainer, its forward and closed-form backward compiled
    def compiled(self, steps: int, rounds: int) -> None:
        """``train.compile=true`` against the eager trainer and the native-BN ceiling (probes off),
        and what its compilation costs a run (with the compile cache of earlier rounds warm).
        A run's steady rate is the median of the rates the trainer logs, leaving out the first
        two log intervals, where a compiled run compiles; its wall time includes them."""
        auto = self._auto_threads()
        r = self.rounds({
            "eager": lambda: self._trainer_run([*MLP, "probe=off"], auto, steps),
            "compiled": lambda: self._trainer_run([*MLP, "probe=off", "train.compile=true"], auto, steps),
            "native": lambda: self.ceiling_steps_per_s([*MLP, "norm.impl=torch"], auto, steps),
        }, rounds)
        med = statistics.median
        wall = {k: [seconds for seconds, _ in r[k]] for k in ("eager", "compiled")}
        rate = {k: [med(rates[2:]) for _, rates in r[k]] for k in ("eager", "compiled")}
        rate["native"] = r["native"]
        pairs = list(zip(rate["eager"], rate["compiled"], rate["native"], strict=True))
        self.add("compile", "MLP: train.compile=true vs eager trainer (steady steps/s)",
                 med(rate["compiled"]), med(rate["eager"]), "steps/s",
                 f"probes off, {auto} thread(s); the rates the trainer logs, after the first two "
                 "log intervals", ratios=[c / e for e, c, _ in pairs])
        self.add("compile", "MLP: train.compile=true vs native-BN ceiling (steady steps/s)",
                 med(rate["compiled"]), med(rate["native"]), "steps/s",
                 "the compiled trainer's steady rate against torch's BN stepping eagerly on one "
                 "resident batch", ratios=[c / n for _, c, n in pairs])
        self.add("compile", f"MLP: wall time of a {steps}-step run, compiled vs eager",
                 med(wall["compiled"]), med(wall["eager"]), "s",
                 "whole runs, compilation included (compile cache warm after the first round)",
                 ratios=[c / e for e, c in zip(wall["eager"], wall["compiled"], strict=True)])

    # -- probes
    # Each probe at the interval docs/metrics.md gives it, added to the default probes.
    PROBE_ROWS = {
        "default": ([], "every 200 steps on 1,000 images; target <= 1.10"),
        "full": (["probe=full"], "every 50 steps, ICS every 100, histograms every 500"),
        "snd": (["probe.snd_every=250"], "default probes + disturbance every 250 steps (4 x 8 batches)"),
        "curvature": (["probe.curvature_every=2000"],
                      "default probes + Hessian top eigenvalue every 2,000 steps (20 Lanczos steps)"),
    }

    def probes(self, steps: int, rounds: int) -> None:
        """Each probe setting against probes off, per training step of the default MLP. The
        curvature row needs runs of at least 2,000 steps to measure once."""
        auto = self._auto_threads()
        measures = {"off": lambda: self.trainer_steps_per_s([*MLP, "probe=off"], auto, steps)}
        for name, (overrides, _) in self.PROBE_ROWS.items():
            run_steps = max(steps, 2000) if name == "curvature" else steps
            measures[name] = lambda o=overrides, s=run_steps: self.trainer_steps_per_s([*MLP, *o], auto, s)
        r = self.rounds(measures, rounds)
        med = statistics.median
        for name, (overrides, note) in self.PROBE_ROWS.items():
            label = " ".join(overrides) or "probe=default"
            self.add("probes", f"MLP: {label} vs probe=off (time per step)",
                     1 / med(r[name]), 1 / med(r["off"]), "s/step", note,
                     ratios=[off / on for off, on in zip(r["off"], r[name], strict=True)])

    # -- evaluation: the train-mode pass mapped over batches, the eval-mode pass size
    def evaluation(self, rounds: int) -> None:
        """The train-mode evaluation of the default MLP in vmap passes against one pass per
        batch, and the CNN's eval-mode evaluation in passes of ``train.eval_batch_size`` rows
        against one pass of the whole test split."""
        from bnlab.models import build_model
        from bnlab.run.evaluation import ROWS_PER_MAPPED_PASS, evaluate, evaluate_train_mode

        def model(overrides: list[str]):
            cfg = self.cfg(*overrides)
            return cfg, build_model(cfg, self.data.shape, self.data.num_classes)

        (mlp_cfg, mlp), (cnn_cfg, cnn) = model(MLP), model(CNN)
        test, batch, eval_rows = self.data.test, mlp_cfg.train.batch_size, cnn_cfg.train.eval_batch_size
        train_mode = lambda rows: _seconds(  # noqa: E731
            lambda: evaluate_train_mode(mlp, test, batch, 0, mlp_cfg.data, rows_per_pass=rows))
        r = self.rounds({"mapped": lambda: train_mode(ROWS_PER_MAPPED_PASS),
                         "one by one": lambda: train_mode(batch),
                         "passes": lambda: _seconds(lambda: evaluate(cnn, test, eval_rows)),
                         "whole": lambda: _seconds(lambda: evaluate(cnn, test, len(test)))}, rounds)
        med = statistics.median
        self.add("evaluation", f"MLP: train-mode evaluation, vmap passes vs one pass per batch of {batch}",
                 med(r["mapped"]), med(r["one by one"]), "s",
                 f"{len(test):,} test images; passes of {ROWS_PER_MAPPED_PASS} rows",
                 ratios=[a / b for a, b in zip(r["mapped"], r["one by one"], strict=True)])
        self.add("evaluation", f"CNN: eval-mode evaluation in passes of {eval_rows} "
                 "vs one pass", med(r["passes"]), med(r["whole"]), "s",
                 f"{len(test):,} test images; train.eval_batch_size",
                 ratios=[a / b for a, b in zip(r["passes"], r["whole"], strict=True)])

    # -- normalization layers, per training step of the default MLP
    def norms(self, steps: int, rounds: int) -> None:
        threads = self._auto_threads()
        variants = [("bn impl=scratch", ["norm=bn", "norm.impl=scratch"]), ("brn", ["norm=brn"]),
                    ("brn impl=scratch", ["norm=brn", "norm.impl=scratch"]), ("ln", ["norm=ln"]),
                    ("gn", ["norm=gn"]), ("noisy_bn", ["norm=noisy_bn"])]
        for method in ("zca", "pca", "iter"):
            for group in (16, 100):
                variants.append((f"whiten {method} g{group}",
                                 ["norm=whiten", f"norm.method={method}", f"norm.group_size={group}"]))
        native = [*MLP, "norm=bn", "norm.impl=torch"]
        med = statistics.median
        for name, overrides in variants:
            variant = [*MLP, *overrides]
            r = self.rounds({"native": lambda: self.ceiling_steps_per_s(native, threads, steps),
                             "variant": lambda v=variant: self.ceiling_steps_per_s(v, threads, steps)},
                            rounds)
            self.add("norms", f"{name} vs native BN (time per step)", 1 / med(r["variant"]),
                     1 / med(r["native"]), "s/step",
                     f"MLP 784-100-100-100-10, batch 60, {threads} thread(s); step time / native BN's",
                     ratios=[n / v for n, v in zip(r["native"], r["variant"], strict=True)])
        # the same two layers where each operation has real work: the gap is per-operation overhead
        cnn_steps = max(20, steps // 10)
        threads = self._auto_threads(CNN)
        r = self.rounds({"native": lambda: self.ceiling_steps_per_s([*CNN, "norm=bn", "norm.impl=torch"],
                                                                    threads, cnn_steps),
                         "variant": lambda: self.ceiling_steps_per_s([*CNN, "norm=bn", "norm.impl=scratch"],
                                                                     threads, cnn_steps)},
                        rounds)
        self.add("norms", "bn impl=scratch vs native BN on the CNN (time per step)", 1 / med(r["variant"]),
                 1 / med(r["native"]), "s/step", f"CNN, batch 256, {threads} thread(s)",
                 ratios=[n / v for n, v in zip(r["native"], r["variant"], strict=True)])

    # -- threads on a machine that other work shares
    def threads(self, steps: int, rounds: int) -> None:
        """The trainer at its automatic thread count against fixed counts: with one core kept
        busy by another process (target: within 1.5x of ``train.threads=1``), and on the machine
        as it is (target: within a few percent of the better of 1 and all cores), for the MLP
        (a small step: one thread) and the CNN (a step big enough to share)."""
        from bnlab.run.process import usable_cores

        cores = usable_cores()

        def measures(overrides: list[str], run_steps: int) -> dict[str, Callable[[], float]]:
            run = [*overrides, "probe=off"]
            auto = self._auto_threads(overrides)  # the count a run starting now would choose
            return {"auto": lambda: self.trainer_steps_per_s(run, auto, run_steps),
                    "one": lambda: self.trainer_steps_per_s(run, 1, run_steps),
                    "all": lambda: self.trainer_steps_per_s(run, cores, run_steps)}

        idle = self.rounds(measures(MLP, steps), rounds)
        cnn = self.rounds(measures(CNN, max(20, steps // 25)), rounds)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            loaded = self.rounds(measures(MLP, steps), rounds)
        finally:
            busy.kill()
            busy.wait()
        med = statistics.median
        for label, r in (("MLP, idle machine", idle), ("CNN batch 256, idle machine", cnn),
                         ("MLP, one core busy", loaded)):
            best = [max(o, a) for o, a in zip(r["one"], r["all"], strict=True)]
            self.add("threads", f"{label}: automatic threads vs best of 1 and {cores}",
                     med(r["auto"]), med(best), "steps/s",
                     f"probes off; 1 thread {med(r['one']):.1f}, {cores} threads {med(r['all']):.1f} steps/s",
                     ratios=[a / b for a, b in zip(r["auto"], best, strict=True)])
        self.add("threads", f"MLP, one core busy: train.threads={cores} vs train.threads=1",
                 med(loaded["all"]), med(loaded["one"]), "steps/s",
                 "what a fixed count of all cores costs when another process holds one",
                 ratios=[a / o for a, o in zip(loaded["all"], loaded["one"], strict=True)])

    # -- many seeds as one program: hydra/launcher=batched
    def batched(self, seeds: int, steps: int, rounds: int, device: str) -> None:
        """``seeds`` runs of the MLP (probes off) three ways, aggregate steps/s (runs x steps /
        seconds of training; start-up and model building excluded): one vectorized program
        (the batched launcher), one run after another in one process (the basic launcher),
        and two processes sharing the seeds (joblib with n_jobs=2, cores // 2 threads each)."""
        import concurrent.futures
        import multiprocessing

        overrides = [*MLP, "probe=off", f"train.steps={steps}", f"device={device}"]
        threads, one_run = self._auto_threads(runs=seeds), self._auto_threads()
        total = seeds * steps
        seed_lists = [list(range(seeds))[i::2] for i in range(2)]
        # spawn: a forked child cannot use CUDA; warm each worker first (imports, data)
        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        try:
            half = max(1, threads // 2)
            list(pool.map(_train_seeds, [(self.data_name, overrides, [], 1, half)] * 2))

            def parallel() -> float:
                # the two workers train at the same time: the slower one's training seconds
                jobs = [(self.data_name, overrides, s, steps, half) for s in seed_lists]
                return total / max(pool.map(_train_seeds, jobs))

            r = self.rounds({
                "batched": lambda: total / _train_group(self.cfg, overrides, seeds, threads),
                "sequential": lambda: total / _train_seeds((self.data_name, overrides, list(range(seeds)),
                                                            steps, one_run)),
                "parallel": parallel,
            }, rounds)
        finally:
            pool.shutdown()
        med = statistics.median
        where = f"{device}, {threads} thread(s)" if device == "cpu" else device
        self.add("batched", f"MLP x{seeds} seeds: batched vs sequential", med(r["batched"]),
                 med(r["sequential"]), "steps/s",
                 f"aggregate steps/s, {steps} steps per run, {where}; sequential: the basic "
                 f"launcher's way ({one_run} thread(s))",
                 ratios=[b / s for b, s in zip(r["batched"], r["sequential"], strict=True)])
        self.add("batched", f"MLP x{seeds} seeds: batched vs 2 parallel processes", med(r["batched"]),
                 med(r["parallel"]), "steps/s",
                 f"aggregate steps/s; 2 processes with {max(1, threads // 2)} thread(s) each, "
                 "half the seeds each: joblib n_jobs=2's way",
                 ratios=[b / p for b, p in zip(r["batched"], r["parallel"], strict=True)])

    # -- report
    def report(self, runs: int, steps: int) -> None:
        from bnlab.report.synthetic import bench_report

        seconds = bench_report(runs, steps)
        self.add("report", f"report of {runs} runs x {steps} steps", seconds, 10.0, "s",
                 "ratio = measured / the 10 s target")

    # -- start-up
    def startup(self) -> None:
        def run(*args: str) -> Callable[[], object]:
            return lambda: subprocess.run([sys.executable, *args], check=True, capture_output=True)

        bare = _best_time(run("-c", "pass"), 5)
        help_ = _best_time(run("-m", "bnlab", "--help"), 5)
        self.add("startup", "bnlab --help vs python -c pass", help_, bare, "s",
                 "ratio = bnlab --help / python's bare start; < 1 s is the target")
        with tempfile.TemporaryDirectory() as tmp:
            one_step = _best_time(run("-m", "bnlab", "train", f"data={self.data_name}", "train.steps=1",
                                      "train.progress=off", "hydra.run.dir=" + tmp + "/${now:%H%M%S%f}"), 3)
        torch_import = _best_time(run("-c", "import torch"), 3)
        self.add("startup", "bnlab train of one step vs python -c 'import torch'", one_step,
                 torch_import, "s", "a whole run's fixed cost: start-up, data, model, one step, "
                 "the final evaluation, summary and checkpoint; best of 3")


def _train_seeds(job: tuple) -> float:
    """Train the MLP for each seed of ``seeds``, one after another in this process, as the
    basic launcher does; returns the seconds of training (model building excluded)."""
    data_name, overrides, seeds, steps, threads = job
    from bnlab.config.schema import compose
    from bnlab.data import load_dataset
    from bnlab.run.process import seed_everything, setup_process
    from bnlab.run.trainer import Trainer

    seconds = 0.0
    for seed in seeds:
        cfg = compose(f"data={data_name}", "train.progress=off", "train.eval_every=1000000",
                      "train.checkpoint_every=1000000", *overrides, f"seed={seed}",
                      f"train.steps={steps}", f"train.threads={threads}")
        device = setup_process(cfg)
        key = (data_name, str(device))
        if key not in _DATA:
            _DATA[key] = load_dataset(cfg.data, device)
        data = _DATA[key]
        seed_everything(seed)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp), device, data)
            t0 = time.perf_counter()
            trainer.run(resumed=False)
            seconds += time.perf_counter() - t0
    return seconds


_DATA: dict = {}  # data sets loaded by _train_seeds in this process


def _train_group(make_cfg, overrides: list[str], seeds: int, threads: int) -> float:
    """Train ``seeds`` seeds of the MLP as one vectorized program; returns the seconds of
    training (building the program excluded)."""
    from bnlab.batched.group import build_group

    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(make_cfg(*overrides, f"seed={s}", f"train.threads={threads}"), Path(tmp) / str(s))
                for s in range(seeds)]
        for _, run_dir in jobs:
            run_dir.mkdir()
        group = build_group(jobs)
        return _seconds(group.run)


def print_table(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r)
        return
    table = Table(title="bnlab bench: ratios measured side by side in one run")
    for col in ("group", "measurement", "value", "baseline", "ratio (range over rounds)", "note"):
        table.add_column(col, overflow="fold")
    def fmt(value: float, unit: str) -> str:
        return f"{value * 1e3:.3f} ms" if unit == "s/step" else f"{value:.4g} {unit}"

    for r in rows:
        spread = f" ({min(r['ratios']):.2f}-{max(r['ratios']):.2f})" if r.get("ratios") else ""
        table.add_row(r["group"], r["name"], fmt(r["value"], r["unit"]), fmt(r["baseline"], r["unit"]),
                      f"{r['ratio']:.2f}{spread}", r["note"])
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnlab bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist",
                        help="data set of the loops: fashion_mnist or mnist (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4000, help="MLP steps per measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of paired measurements; each ratio is the median over rounds")
    parser.add_argument("--only", help="comma-separated groups to run (default: all)",
                        default="trainer,cpu,threads,compile,probes,evaluation,norms,batched,report,startup")
    parser.add_argument("--seeds", type=int, default=16, help="runs of the batched group")
    parser.add_argument("--device", default="cpu", help="device of the batched group: cpu or cuda")
    parser.add_argument("--report-runs", type=int, default=100)
    parser.add_argument("--report-steps", type=int, default=10_000)
    parser.add_argument("--out", default="bench.json", help="where to write the rows as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    groups = set(args.only.split(","))

    from bnlab.errors import UserError

    try:
        bench = Bench(args.data, args.steps)
    except UserError as err:
        print(f"bnlab: error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rounds = args.repeats
    if "trainer" in groups:
        bench.loops("MLP batch 60", MLP, args.steps, rounds)
        # ~30 steps/s on 2 cores: fewer steps and rounds keep the whole benchmark near 10 minutes
        bench.loops("CNN batch 256", CNN, max(50, args.steps // 25), max(1, rounds - 1))
    if "cpu" in groups:
        # steadier than the wall clock: half the steps, two more rounds
        bench.cpu_time(max(100, args.steps // 2), rounds + 2)
    if "threads" in groups:
        bench.threads(max(200, args.steps // 4), rounds)
    if "compile" in groups:
        bench.compiled(args.steps, rounds)
    if "probes" in groups:
        bench.probes(args.steps, rounds)
    if "evaluation" in groups:
        bench.evaluation(rounds)
    if "norms" in groups:
        bench.norms(max(100, args.steps // 10), max(1, rounds - 1))
    if "batched" in groups:
        bench.batched(args.seeds, max(50, args.steps // 10), max(1, rounds - 1), args.device)
    if "report" in groups:
        bench.report(args.report_runs, args.report_steps)
    if "startup" in groups:
        bench.startup()
    print_table(bench.rows)
    meta = {"python": platform.python_version(), "torch": bench.torch.__version__,
            "machine": platform.machine(), "cores": os.cpu_count(), "data": args.data,
            "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1),
            "load": statistics.mean(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": bench.rows}, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['seconds']} s)")
    return 0
