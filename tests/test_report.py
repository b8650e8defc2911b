"""`bnlab report` (bnlab.report.command, bnlab.rundir.reader) on a small real sweep, on damaged runs,
on synthetic runs, and against a swept key.

The numbers in the report are checked against each run's own scalars.csv, read here with the
csv module, independently of bnlab.rundir.reader.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnlab.errors import UserError
from bnlab.report.command import main
from bnlab.report.data import build_report
from bnlab.rundir.reader import _parse_careful, _parse_fast, find_runs, read_scalars

from helpers import bnlab, compose, csv_series, run_main, sweep_of, synthetic_run, train_in_process

NORMS = ("none", "bn")
SEEDS = (0, 1)
OVERRIDES = ["data=digits", "train.steps=60", "train.batch_size=32", "train.eval_every=10",
             "train.log_every=10", "train.checkpoint_every=60", "probe.every=10",
             "probe.batch_size=200", "optim.lr=0.5"]


# ---------------------------------------------------------------- helpers
def write_hydra_files(run_dir: Path, overrides: list[str]) -> None:
    """What Hydra writes into a run directory: the composed config and the overrides."""
    from omegaconf import OmegaConf

    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(compose("train.progress=off", "train.threads=1", *overrides),
                   run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")


def read_summary_csv(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.csv") as f:
        return {row["group"]: row for row in csv.DictReader(f)}


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def number(cell: str) -> float | None:
    return float(cell) if cell else None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """2 norms x 2 seeds on digits, laid out as a Hydra multirun directory."""
    root = tmp_path_factory.mktemp("sweep")
    for norm in NORMS:
        for seed in SEEDS:
            overrides = [*OVERRIDES, f"norm={norm}", f"seed={seed}"]
            run_dir = root / f"norm={norm},seed={seed}"
            assert train_in_process(run_dir, *overrides) == "completed"
            write_hydra_files(run_dir, overrides)
    return root


@pytest.fixture(scope="module")
def clean_report(sweep, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("clean_report")
    target = chosen_target(sweep)
    code, stdout = run_main([str(sweep), "--out", str(out), "--target", str(target)])
    assert code == 0
    return out, stdout


def chosen_target(sweep: Path) -> float:
    """A target between the runs' best accuracies: some runs reach it, some may not."""
    bests = sorted(max(v for _, v in csv_series(d)["test/acc"]) for d in sweep.iterdir())
    return round(statistics.median(bests), 4)


# ---------------------------------------------------------------- the numbers
def test_groups_are_the_norms_and_numbers_match_scalars_csv(sweep, clean_report):
    out, stdout = clean_report
    target = chosen_target(sweep)
    rows = read_summary_csv(out)
    assert set(rows) == {f"norm={n}" for n in NORMS}  # norm.momentum etc. add no groups
    for norm in NORMS:
        row = rows[f"norm={norm}"]
        runs = [csv_series(sweep / f"norm={norm},seed={s}") for s in SEEDS]
        final_acc = [r["test/acc"][-1][1] for r in runs]
        best_acc = [max(v for _, v in r["test/acc"]) for r in runs]
        final_loss = [r["train/loss"][-1][1] for r in runs]
        reached = [next((s for s, v in r["test/acc"] if v >= target), None) for r in runs]
        reached = [s for s in reached if s is not None]

        assert row["runs"] == row["completed"] == str(len(SEEDS))
        for name, values in [("final_test_acc", final_acc), ("best_test_acc", best_acc),
                             ("final_train_loss", final_loss)]:
            mean, std = mean_and_std(values)
            assert number(row[f"{name}_mean"]) == pytest.approx(mean, rel=1e-12)
            assert number(row[f"{name}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-15)
        assert float(row["target"]) == target
        assert row["reached"] == f"{len(reached)}/{len(SEEDS)}"
        if reached:
            assert number(row["steps_to_target_mean"]) == pytest.approx(statistics.mean(reached))
        else:
            assert row["steps_to_target_mean"] == ""
        # Drift of the nonlinearity input (norm.position=before_act: the `norm` point), averaged
        # over probes then seeds; saturation at the last probe.
        for layer in (1, 2, 3):
            drift = [statistics.mean(v for _, v in r[f"drift/layer{layer}/norm/mean"])
                     for r in runs]
            sat = [r[f"sat/layer{layer}"][-1][1] for r in runs]
            assert number(row[f"drift_layer{layer}_mean"]) == pytest.approx(statistics.mean(drift))
            assert number(row[f"saturation_layer{layer}_mean"]) == pytest.approx(
                statistics.mean(sat))
        speed = [statistics.mean(v for _, v in r["perf/steps_per_s"]) for r in runs]
        assert number(row["steps_per_s_mean"]) == pytest.approx(statistics.mean(speed))
    # The terminal table shows the same groups and the chosen target.
    assert "norm=bn" in stdout and "norm=none" in stdout
    assert f"{target:.4g}" in stdout


def test_auto_target_is_the_median_of_the_groups_median_best(sweep):
    runs = find_runs([sweep])
    report = build_report(runs, [sweep])
    group_medians = [statistics.median(max(v for _, v in csv_series(sweep / f"norm={n},seed={s}")
                                           ["test/acc"]) for s in SEEDS) for n in NORMS]
    assert report.target == pytest.approx(statistics.median(group_medians))


def test_loss_metric_is_timed_downwards(sweep):
    report = build_report(find_runs([sweep]), [sweep], metric="test/loss", target=1.5)
    for group in report.groups:
        for run, stats in zip(group.completed, group.stats, strict=True):
            steps = [s for s, v in csv_series(run.path)["test/loss"] if v <= 1.5]
            assert stats.target_step == (steps[0] if steps else None)


def test_by_seed_regroups_and_unknown_key_is_one_line(sweep, capsys):
    report = build_report(find_runs([sweep]), [sweep], by=["seed"])
    assert [g.label for g in report.groups] == [f"seed={s}" for s in SEEDS]
    assert all(len(g.runs) == len(NORMS) for g in report.groups)
    by_norm = build_report(find_runs([sweep]), [sweep], by=["norm"])  # norm means norm.name
    assert [g.label for g in by_norm.groups] == ["norm=bn", "norm=none"]

    with pytest.raises(UserError, match="--metric test/nope"):
        build_report(find_runs([sweep]), [sweep], metric="test/nope")
    code = main([str(sweep), "--by", "nosuchkey", "--out", str(sweep.parent / "unused")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--by nosuchkey" in err and "norm" in err


# ---------------------------------------------------------------- the files
def test_figures_are_real_images_linked_from_report_md(clean_report):
    from matplotlib.image import imread

    out, _ = clean_report
    expected = ["test_acc.png", "train_loss.png", "drift.png", "percentiles.png"]
    markdown = (out / "report.md").read_text()
    for name in expected:
        image = imread(out / name)
        height, width = image.shape[:2]
        assert height >= 300 and width >= 400, name
        rgba = (image[..., :3] * 255).astype(np.uint32)
        colours = np.unique(rgba[..., 0] << 16 | rgba[..., 1] << 8 | rgba[..., 2])
        assert len(colours) > 20, f"{name} is nearly blank"
        assert f"]({name})" in markdown  # relative link, resolves next to report.md
    assert markdown.startswith("# bnlab report")
    assert "| norm=bn |" in markdown and "| norm=none |" in markdown


def test_import_does_not_load_torch_or_matplotlib():
    code = ("import sys, bnlab.report.command, bnlab.rundir.reader; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- damaged runs
@pytest.fixture(scope="module")
def damaged_sweep(sweep, tmp_path_factory) -> Path:
    """The clean sweep plus runs in every bad state a killed or broken run can leave."""
    root = tmp_path_factory.mktemp("damaged") / "sweep"
    shutil.copytree(sweep, root)
    source = root / "norm=bn,seed=0"

    def clone(name: str) -> Path:
        target = root / name
        shutil.copytree(source, target)
        return target

    (clone("norm=bn,seed=10") / "summary.json").unlink()
    (clone("norm=bn,seed=11") / "summary.json").write_text('{"status": "compl')
    with open(clone("norm=bn,seed=12") / "scalars.csv", "a") as f:
        f.write("60,test/acc,0.9")  # a half-written last line in a run that says completed
    running = clone("norm=bn,seed=13")
    summary = json.loads((running / "summary.json").read_text())
    (running / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    with open(running / "scalars.csv", "a") as f:
        f.write("70,test/acc,0.99")  # killed mid-write: the half line must not be data
    diverged = clone("norm=bn,seed=14")
    (diverged / "summary.json").write_text(
        json.dumps({**summary, "status": "diverged", "diverged_step": 40}))
    with open(clone("norm=bn,seed=15") / "scalars.csv", "a") as f:
        f.write("70,test/acc,0.5\ngarbage line\n80,test/acc\n")
    (clone("norm=bn,seed=17") / ".hydra" / "config.yaml").write_text("norm: {name: [bn\n")
    failed = root / "norm=bn,seed=16"
    shutil.copytree(source / ".hydra", failed / ".hydra")
    (failed / "summary.json").write_text(json.dumps(
        {"status": "failed", "error": "probe.unit=500 is not valid: expected an integer below 100"}))
    return root


def test_damaged_runs_are_listed_and_not_averaged(damaged_sweep, clean_report, tmp_path):
    out = tmp_path / "report"
    code, stdout = run_main([str(damaged_sweep), "--out", str(out),
                             "--target", str(read_target(clean_report[0]))])
    assert code == 0
    expected = {"norm=bn,seed=10": "no summary", "norm=bn,seed=11": "damaged",
                "norm=bn,seed=12": "damaged", "norm=bn,seed=13": "running",
                "norm=bn,seed=14": "diverged", "norm=bn,seed=15": "damaged",
                "norm=bn,seed=16": "failed", "norm=bn,seed=17": "damaged"}
    markdown = (out / "report.md").read_text()
    listed = markdown.split("## Runs not averaged")[1].split("##")[0]
    for name, status in expected.items():
        assert f"| {name} | {status} |" in listed
        assert name in stdout
    assert "summary.json unreadable" in listed
    assert "probe.unit=500 is not valid" in listed
    assert "diverged at step 40" in listed
    assert "2 unreadable line(s)" in listed

    assert ".hydra/config.yaml unreadable" in listed
    groups = read_summary_csv(out)
    assert set(groups) == {"norm=bn", "norm=none"}  # the run without a config is in none
    damaged = groups["norm=bn"]
    clean = read_summary_csv(clean_report[0])["norm=bn"]
    assert damaged["runs"] == str(len(SEEDS) + len(expected) - 1)
    assert damaged["completed"] == str(len(SEEDS))
    assert damaged["diverged"] == "1" and damaged["failed"] == "1"
    for column in ("final_test_acc_mean", "final_test_acc_std", "best_test_acc_mean",
                   "steps_to_target_mean", "final_train_loss_mean"):
        assert damaged[column] == clean[column], column


def read_target(out: Path) -> float:
    return float(next(iter(read_summary_csv(out).values()))["target"])


def test_no_runs_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: no runs under") and err.count("\n") == 1
    assert not (tmp_path / "empty" / "report").exists()

    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error:") and "missing" in err and err.count("\n") == 1


# ---------------------------------------------------------------- reading runs
def test_find_runs_in_a_run_a_sweep_and_a_tree(sweep, clean_report):
    one = sweep / "norm=bn,seed=0"
    assert [r.path for r in find_runs([one])] == [one.resolve()]
    assert len(find_runs([sweep])) == len(NORMS) * len(SEEDS)
    # A whole outputs/ tree, with a report folder in it that holds a copy of a run: skipped.
    tree = clean_report[0].parent / "outputs"
    shutil.copytree(sweep, tree / "multirun" / "day" / "time")
    shutil.copytree(one, tree / "multirun" / "day" / "time" / "report" / "copy")
    runs = find_runs([tree])
    assert len(runs) == len(NORMS) * len(SEEDS)
    run = next(r for r in runs if r.path.name == "norm=bn,seed=0")
    assert run.config["norm.name"] == "bn" and run.config["seed"] == 0
    assert run.config["model.widths"] == (100, 100, 100)
    assert "norm=bn" in run.overrides and run.status == "completed"


def test_read_scalars_matches_csv_and_skips_a_half_line(sweep, tmp_path):
    run_dir = sweep / "norm=bn,seed=0"
    expected = csv_series(run_dir)
    scalars, problems = read_scalars(run_dir / "scalars.csv")
    assert problems == [] and set(scalars) == set(expected)
    for tag, rows in expected.items():
        assert scalars[tag].steps.tolist() == [s for s, _ in rows]
        assert scalars[tag].values.tolist() == [v for _, v in rows]  # bit for bit

    partial = tmp_path / "scalars.csv"
    partial.write_text("step,tag,value\n1,a,0.5\n2,a,nan\n3,b,-inf\n4,a,0.2")
    scalars, problems = read_scalars(partial)
    assert scalars["a"].steps.tolist() == [1, 2] and np.isnan(scalars["a"].values[1])
    assert scalars["b"].values.tolist() == [-np.inf]
    assert len(problems) == 1 and "incomplete" in problems[0]


def test_fast_and_careful_readers_agree(sweep):
    body = (sweep / "norm=none,seed=1" / "scalars.csv").read_bytes().split(b"\n", 1)[1]
    fast = _parse_fast(body, ["drift/*", "test/acc"])
    careful, bad = _parse_careful(body, ["drift/*", "test/acc"])
    assert bad == 0 and set(fast) == set(careful) and "test/acc" in fast
    assert all(t.startswith("drift/") or t == "test/acc" for t in fast)
    for tag in fast:
        assert np.array_equal(fast[tag].steps, careful[tag].steps)
        assert np.array_equal(fast[tag].values, careful[tag].values, equal_nan=True)


def test_a_repeated_step_keeps_the_later_row_and_bad_lines_are_counted(tmp_path):
    path = tmp_path / "scalars.csv"
    path.write_text("step,tag,value\n1,a,1.0\n2,a,2.0\n2,a,2.5\n3,a,3.0\nnot,a,row\n3,,1\n")
    scalars, problems = read_scalars(path)
    assert scalars["a"].steps.tolist() == [1, 2, 3]
    assert scalars["a"].values.tolist() == [1.0, 2.5, 3.0]
    assert problems == ["scalars.csv has 2 unreadable line(s) (skipped)"]


# ---------------------------------------------------------------- a true Hydra multirun
def test_report_of_a_real_hydra_multirun(tmp_path):
    result = bnlab("train", "-m", "data=digits", "norm=none,bn", "train.steps=20",
                   "train.eval_every=10", "train.log_every=10", "train.checkpoint_every=20",
                   "probe.every=10", "probe.batch_size=100", "train.threads=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = bnlab("report", "outputs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "norm=bn" in result.stdout and "norm=none" in result.stdout
    rows = read_summary_csv(tmp_path / "outputs" / "report")
    assert set(rows) == {"norm=bn", "norm=none"}
    assert all(row["completed"] == "1" for row in rows.values())


# ---------------------------------------------------------------- the target and ties
def test_auto_target_is_not_dragged_down_by_a_group_that_never_learned(tmp_path):
    for norm, best in [("bn", 0.95), ("ln", 0.90), ("none", 0.10)]:
        for seed in range(2):
            synthetic_run(tmp_path, [f"norm={norm}", f"seed={seed}"], [0.1, best])
    report = build_report(find_runs([tmp_path]), [tmp_path])
    assert report.target == pytest.approx(0.90)  # the worst run's best would be 0.10


def test_equal_step_counts_are_a_tie_not_1x_fewer(tmp_path):
    from bnlab.report.command import headline

    for seed in range(2):
        synthetic_run(tmp_path, ["norm=bn", f"seed={seed}"], [0.5, 0.95, 0.96])
        synthetic_run(tmp_path, ["norm=none", f"seed={seed}"], [0.5, 0.93, 0.97])
        synthetic_run(tmp_path, ["norm=ln", f"seed={seed}"], [0.5, 0.6, 0.7, 0.95])
    runs = find_runs([tmp_path])
    two = [run for run in runs if run.config["norm.name"] != "ln"]
    tie = headline(build_report(two, [tmp_path], target=0.9))  # both at step 20
    assert tie.startswith("A tie: all 2 groups") and "x fewer" not in tie
    assert "within one evaluation interval (10 steps)" in tie
    three = headline(build_report(runs, [tmp_path], target=0.9))
    assert ("Fastest to test/acc ≥ 0.9: norm=bn, 20 steps (mean over 2/2 seeds), tied within "
            "one evaluation interval (10 steps) with norm=none; 2x fewer than norm=ln (40 steps)"
            in three)
    ahead = headline(build_report(runs, [tmp_path], target=0.94))
    assert "norm=bn, 20 steps (mean over 2/2 seeds); 2x fewer than norm=ln" in ahead


# ---------------------------------------------------------------- a metric against a swept key
@pytest.fixture(scope="module")
def batch_sweep(tmp_path_factory) -> Path:
    """The done-when sweep, small: norm=none,bn x train.batch_size=16,64 x seed=0,1 on digits."""
    root = tmp_path_factory.mktemp("batch_sweep")
    for norm in NORMS:
        for batch in (16, 64):
            for seed in SEEDS:
                overrides = ["data=digits", f"norm={norm}", f"train.batch_size={batch}",
                             f"seed={seed}", "train.steps=40", "probe=off", "optim.lr=0.5"]
                run_dir = root / f"norm={norm},train.batch_size={batch},seed={seed}"
                assert train_in_process(run_dir, *overrides) == "completed"
                write_hydra_files(run_dir, overrides)
    return root


def test_x_draws_the_metric_against_the_key_with_a_pivot_table(batch_sweep, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "report"
    code, stdout = run_main([str(batch_sweep), "--x", "train.batch_size", "--out", str(out)])
    assert code == 0
    image = imread(out / "test_acc_vs_train.batch_size.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 600
    assert len(np.unique((image[..., :3] * 255).astype(int) @ [65536, 256, 1])) > 20
    with open(out / "pivot.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["group", "statistic", "16", "64"]
    cells = {(r[0], r[1]): r[2:] for r in rows[1:]}
    for norm in NORMS:
        for column, batch in enumerate((16, 64)):
            series = [csv_series(batch_sweep / f"norm={norm},train.batch_size={batch},seed={s}")
                      ["test/acc"] for s in SEEDS]
            final = [s[-1][1] for s in series]
            best = [max(v for _, v in s) for s in series]
            row = f"norm={norm}"
            assert float(cells[row, "final_test/acc_mean"][column]) == pytest.approx(statistics.mean(final))
            assert float(cells[row, "final_test/acc_std"][column]) == pytest.approx(statistics.stdev(final))
            assert float(cells[row, "best_test/acc_mean"][column]) == pytest.approx(statistics.mean(best))
            assert cells[row, "completed"][column] == "2"
    markdown = (out / "report.md").read_text()
    section = markdown.split("## test/acc against train.batch_size")[1].split("\n## ")[0]
    assert "(test_acc_vs_train.batch_size.png)" in section
    assert "| norm | train.batch_size=16 | train.batch_size=64 |" in section
    assert "train.batch_size=64" in stdout
    # Batch size is the sweep's one numeric key: the same figure without --x.
    assert run_main([str(batch_sweep), "--out", str(tmp_path / "auto")])[0] == 0
    assert (tmp_path / "auto" / "test_acc_vs_train.batch_size.png").is_file()


def test_swept_key_axis_is_log_over_a_decade_and_only_for_one_numeric_key(tmp_path):
    for lr in ("0.01", "0.1", "1.0"):
        sweep_of(tmp_path / "lr", {"bn": [0.9, 0.92], "none": [0.8, 0.7]}, extra=[f"optim.lr={lr}"])
        for momentum in ("0.0", "0.9"):  # two numeric keys: which one is x is not obvious
            sweep_of(tmp_path / "two", {"bn": [0.9]},
                     extra=[f"optim.lr={lr}", f"optim.momentum={momentum}"])
    report = build_report(find_runs([tmp_path / "lr"]), [tmp_path / "lr"])
    assert report.axis.key == "optim.lr" and report.axis.values == [0.01, 0.1, 1.0]
    assert report.axis.log
    assert [label for label, _ in report.axis.lines] == ["norm=bn", "norm=none"]
    assert build_report(find_runs([tmp_path / "two"]), [tmp_path / "two"]).axis is None
    code, _ = run_main([str(tmp_path / "lr"), "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "test_acc_vs_optim.lr.png").is_file()


def test_x_with_a_key_that_does_not_vary_is_one_line(tmp_path, capsys):
    root = sweep_of(tmp_path, {"bn": [0.9], "none": [0.8]})
    assert main([str(root), "--x", "optim.lr", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--x optim.lr" in err and "norm" in err


# ---------------------------------------------------------------- which network drift is read in
@pytest.mark.parametrize("inference_everywhere", [True, False])
def test_drift_and_saturation_are_read_in_one_network_for_every_group(tmp_path, inference_everywhere):
    """The inference network's tags when every run logged them, else train mode for all; the
    header and the CSV columns say which."""
    root = tmp_path / "sweep"
    train_drift = {"bn": [0.01, 0.03], "none": [0.5, 0.7]}
    infer_drift = {"bn": [0.2, 0.4], "none": [0.6, 0.8]}
    for norm in ("bn", "none"):
        run = synthetic_run(root, [f"norm={norm}", "seed=0"], [0.5, 0.9])
        rows = [f"{10 * i},drift/layer1/norm/mean,{v!r}" for i, v in enumerate(train_drift[norm], 1)]
        rows += [f"20,sat/layer1,{0.25!r}"]
        if inference_everywhere or norm == "bn":
            rows += [f"{10 * i},infer/drift/layer1/norm/mean,{v!r}"
                     for i, v in enumerate(infer_drift[norm], 1)]
            rows += [f"20,infer/sat/layer1,{0.75!r}"]
        with open(run / "scalars.csv", "a") as f:
            f.write("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code, stdout = run_main([str(root), "--out", str(out)])
    assert code == 0
    with open(out / "summary.csv") as f:
        table = {row["group"]: row for row in csv.DictReader(f)}
    drift, view, sat = ((infer_drift, "infer_", 0.75) if inference_everywhere
                        else (train_drift, "", 0.25))
    for norm in ("bn", "none"):
        row = table[f"norm={norm}"]
        assert number(row[f"{view}drift_layer1_mean"]) == pytest.approx(statistics.mean(drift[norm]))
        assert number(row[f"{view}saturation_layer1_mean"]) == sat
    name = "inference network" if inference_everywhere else "train mode"
    assert f"drift L1 ({name})" in (out / "report.md").read_text()
