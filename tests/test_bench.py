"""`bnlab bench`'s rows: a ratio is the median of the rounds' paired ratios, shown with their range."""

from bnlab.bench import Bench, print_table


def test_a_row_ratio_is_the_median_of_its_rounds_and_the_table_shows_their_range(capsys):
    bench = Bench.__new__(Bench)  # the rows only: no data set loaded
    bench.rows = []
    bench.add("norms", "bn vs native", 1.2e-3, 1.0e-3, "s/step", ratios=[1.31, 0.97, 1.18])
    bench.add("report", "report", 5.0, 10.0, "s")
    paired, plain = bench.rows
    assert paired["ratio"] == 1.18 and paired["ratios"] == [1.31, 0.97, 1.18]
    assert plain["ratio"] == 0.5 and plain["ratios"] is None
    print_table(bench.rows)
    out = capsys.readouterr().out
    assert "1.18 (0.97-1.31)" in out
    assert "0.50 " in out and "0.50 (" not in out


def test_rounds_rotate_which_measurement_runs_first_and_keep_each_rounds_results_together():
    bench = Bench.__new__(Bench)
    order = []
    measures = {name: (lambda n=name: order.append(n) or f"{n}{len(order)}") for name in "abc"}
    results = bench.rounds(measures, 4)
    assert order == list("abc" "bca" "cab" "abc")  # each first once in three rounds
    assert results == {"a": ["a1", "a6", "a8", "a10"], "b": ["b2", "b4", "b9", "b11"],
                       "c": ["c3", "c5", "c7", "c12"]}


def test_the_cpu_group_times_by_cpu_time_at_one_thread_and_pairs_its_rounds():
    """The cpu group's two rows come from the process's CPU clock at one thread, each round's
    trainer and the reference BN (impl=scratch) paired with that round's native-BN ceiling."""
    import time

    bench = Bench.__new__(Bench)
    bench.rows = []
    calls = []
    native = iter([1000.0, 800.0])
    scratch = iter([900.0, 800.0])
    trainer_seconds = iter([2.0, 4.0])

    def ceiling(overrides, threads, steps, clock):
        calls.append((threads, clock))
        return next(native) if "norm.impl=torch" in overrides else next(scratch)  # impl=scratch

    def trainer(overrides, threads, steps, clock):
        calls.append((threads, clock))
        return next(trainer_seconds), []

    bench.ceiling_steps_per_s, bench._trainer_run = ceiling, trainer
    bench.cpu_time(1000, 2)
    assert calls and all(c == (1, time.process_time) for c in calls)
    bn, defaults = bench.rows
    assert bn["ratios"] == [1000 / 900, 1.0] and "scratch" in bn["name"]
    assert defaults["ratios"] == [500 / 1000, 250 / 800] and ">= 0.9" in defaults["note"]


def test_the_threads_group_pairs_automatic_threads_with_fixed_counts_idle_and_with_a_core_busy(monkeypatch):
    """Two phases (idle, then one core kept busy by another process), each round's automatic
    count against the better of 1 thread and all cores measured in the same round."""
    import subprocess

    import bnlab.run.process

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def steps_per_s(overrides, threads, steps):  # 1 thread: 100 steps/s; 2: 80; half as fast when loaded
        loaded = any(p.poll() is None for p in started)
        return (100.0 if threads == 1 else 80.0) / (2 if loaded else 1)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(bnlab.run.process, "usable_cores", lambda: 2)
    bench = Bench.__new__(Bench)
    bench.rows = []
    bench.trainer_steps_per_s, bench._auto_threads = steps_per_s, lambda overrides=None, runs=1: 2
    bench.threads(10, 2)
    assert len(started) == 1 and started[0].poll() is not None  # the busy process is gone after
    idle, cnn, loaded, fixed = bench.rows
    assert idle["ratios"] == [0.8, 0.8] and "MLP, idle" in idle["name"]
    assert cnn["ratios"] == [0.8, 0.8] and "CNN batch 256, idle" in cnn["name"]
    assert loaded["ratios"] == [0.8, 0.8] and "one core busy" in loaded["name"]
    assert fixed["ratios"] == [0.8, 0.8] and fixed["name"].endswith("vs train.threads=1")
