"""`bnlab report` (bnlab.report, bnlab.runs) on a small real sweep, on damaged runs, and
`Recorder.hparams`.

The numbers in the report are checked against each run's own scalars.csv, read here with the
csv module, independently of bnlab.runs.
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
from bnlab.report import main
from bnlab.report_data import build_report
from bnlab.runs import _parse_careful, _parse_fast, find_runs, read_scalars

from helpers import bnlab, compose, train_in_process

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


def csv_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} straight from scalars.csv, complete lines only."""
    text = (run_dir / "scalars.csv").read_text()
    lines = text.splitlines(keepends=True)
    series: dict[str, list[tuple[int, float]]] = {}
    for row in csv.DictReader(line for line in lines if line.endswith("\n")):
        series.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return series


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


def run_main(argv: list[str]) -> tuple[int, str]:
    from contextlib import redirect_stdout
    from io import StringIO

    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


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
    code = ("import sys, bnlab.report, bnlab.runs; "
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


# ---------------------------------------------------------------- TensorBoard HParams
def test_hparams_are_written_into_the_runs_own_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from bnlab.record import Recorder

    recorder = Recorder(tmp_path)
    recorder.scalars(10, {"test/acc": 0.75})
    recorder.hparams({"norm.name": "bn", "optim.lr": 0.1, "model.widths": [100, 100],
                      "train.amp": False, "resume": None, "seed": np.int64(3)},
                     {"test/acc": 0.75})
    recorder.close()

    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-run, unlike add_hparams
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    assert set(content) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG,
                            metadata.SESSION_END_INFO_TAG}
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["norm.name"].string_value == "bn"
    assert start.hparams["optim.lr"].number_value == 0.1
    assert start.hparams["model.widths"].string_value == "[100, 100]"
    assert start.hparams["train.amp"].string_value == "False"
    assert start.hparams["seed"].number_value == 3
    assert "resume" not in start.hparams
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [m.name.tag for m in experiment.metric_infos] == ["test/acc"]
    assert events.Scalars("test/acc")[0].value == 0.75  # the value the dashboard shows


# ---------------------------------------------------------------- synthetic runs
_COMPOSED: dict[tuple, dict] = {}


def synthetic_run(root: Path, overrides: list[str], acc: list[float], claims=(),
                  status: str = "completed", every: int = 10) -> Path:
    """A run directory as `bnlab train -m` leaves it, with made-up test/acc values (test/loss is
    1 - acc): the composed config (with the preset's claims), overrides, scalars.csv, summary."""
    import copy

    from omegaconf import OmegaConf

    base = tuple(o for o in overrides if not o.startswith("seed="))
    if base not in _COMPOSED:
        _COMPOSED[base] = OmegaConf.to_container(compose("train.progress=off", *base), resolve=True)
    config = copy.deepcopy(_COMPOSED[base])
    config["seed"] = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
    config["claims"] = list(claims)
    run_dir = root / ",".join(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    rows = ["step,tag,value"]
    for i, value in enumerate(acc, 1):
        rows += [f"{i * every},test/acc,{value!r}", f"{i * every},test/loss,{1 - value!r}"]
    (run_dir / "scalars.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": status, "steps": len(acc) * every, "total_steps": len(acc) * every,
         "wall_s": 1.0}))
    return run_dir


def sweep_of(root: Path, finals: dict[str, list[float]], claims=(), extra=(),
             first: float = 0.5) -> Path:
    """One run per (norm, seed): test/acc goes ``first`` -> the final value given per seed."""
    for norm, values in finals.items():
        for seed, value in enumerate(values):
            synthetic_run(root, [f"norm={norm}", *extra, f"seed={seed}"], [first, value], claims)
    return root


def judged_on(root: Path):
    from bnlab.claims import judge_all

    runs = find_runs([root])
    return judge_all(runs, build_report(runs, [root]).keys)


BN_BETTER = {"id": "bn_better", "text": "BN ends more accurate", "source": "a paper, Fig. 1",
             "metric": "test/acc", "statistic": "final", "direction": "higher",
             "better": {"norm": "bn"}, "than": {"norm": "none"}, "published": 0.98}


# ---------------------------------------------------------------- claims: the verdict rule
def test_claim_reproduced_when_welch_test_is_significant_in_the_claimed_direction(tmp_path):
    from scipy.stats import ttest_ind

    bn, none = [0.90, 0.91, 0.93], [0.80, 0.83, 0.81]
    (judgement,), not_judged = judged_on(sweep_of(tmp_path, {"bn": bn, "none": none}, [BN_BETTER]))
    assert not_judged == []
    (comparison,) = judgement.comparisons
    assert judgement.verdict == "reproduced"
    assert comparison.better.values == bn and comparison.than.values == none  # in seed order
    reference = ttest_ind(bn, none, equal_var=False, alternative="greater").pvalue
    assert comparison.p_claimed == pytest.approx(reference, rel=1e-9) and reference < 0.05
    assert comparison.p_opposite == pytest.approx(1 - reference, rel=1e-9)


def test_claim_not_reproduced_when_significant_the_other_way(tmp_path):
    from scipy.stats import ttest_ind

    bn, none = [0.80, 0.82, 0.81], [0.90, 0.91, 0.93]
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": bn, "none": none}, [BN_BETTER]))
    assert judgement.verdict == "not reproduced"
    reference = ttest_ind(bn, none, equal_var=False, alternative="less").pvalue
    assert judgement.comparisons[0].p_opposite == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("bn,none,why", [
    ([0.85, 0.90, 0.80], [0.86, 0.84, 0.85], "not significant"),
    ([0.90, 0.91], [0.10, 0.11], "fewer than 3 seeds"),  # a huge gap, but two seeds
])
def test_claim_inconclusive_without_significance_or_seeds(tmp_path, bn, none, why):
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": bn, "none": none}, [BN_BETTER]))
    assert judgement.verdict == "inconclusive" and why in judgement.reason


def test_claim_on_a_loss_and_with_zero_spread(tmp_path):
    # Lower is better for a loss; identical seeds on both sides: any difference is certain.
    claim = {**BN_BETTER, "id": "loss", "metric": "test/loss", "direction": "lower"}
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": [0.9] * 3, "none": [0.8] * 3}, [claim]))
    assert judgement.verdict == "reproduced"  # test/loss = 1 - acc: 0.1 vs 0.2
    assert judgement.comparisons[0].better.values == pytest.approx([0.1] * 3)


def test_claim_along_a_key_holds_only_if_it_holds_at_every_value(tmp_path):
    claim = {**BN_BETTER, "id": "along_lr", "along": "optim.lr"}
    finals = {  # lr -> (bn, none)
        "0.1": ([0.90, 0.91, 0.93], [0.80, 0.83, 0.81]),
        "1.0": ([0.90, 0.91, 0.93], [0.10, 0.11, 0.12]),
        "3.0": ([0.50, 0.60, 0.40], [0.52, 0.49, 0.55]),  # no difference here
    }
    for lr, (bn, none) in finals.items():
        sweep_of(tmp_path / "all", {"bn": bn, "none": none}, [claim], extra=[f"optim.lr={lr}"])
        if lr != "3.0":
            sweep_of(tmp_path / "two", {"bn": bn, "none": none}, [claim],
                     extra=[f"optim.lr={lr}"])
    (both,), _ = judged_on(tmp_path / "two")
    assert both.verdict == "reproduced"
    assert [c.label for c in both.comparisons] == ["optim.lr=0.1", "optim.lr=1.0"]
    (three,), _ = judged_on(tmp_path / "all")
    assert three.verdict == "inconclusive" and "1 of 3" in three.reason
    assert [c.verdict for c in three.comparisons] == ["reproduced", "reproduced", "inconclusive"]


def test_one_reversed_value_along_a_key_makes_it_not_reproduced(tmp_path):
    claim = {**BN_BETTER, "id": "along_lr", "along": "optim.lr"}
    sweep_of(tmp_path, {"bn": [0.90, 0.91, 0.93], "none": [0.80, 0.83, 0.81]}, [claim],
             extra=["optim.lr=0.1"])
    sweep_of(tmp_path, {"bn": [0.50, 0.51, 0.50], "none": [0.90, 0.91, 0.93]}, [claim],
             extra=["optim.lr=1.0"])
    (judgement,), _ = judged_on(tmp_path)
    assert judgement.verdict == "not reproduced" and "0.025" in judgement.reason  # 0.05 / 2


def test_steps_to_target_counts_a_run_that_never_reached_it_at_its_last_step(tmp_path):
    claim = {**BN_BETTER, "id": "faster", "statistic": "steps_to_target", "target": 0.85}
    del claim["direction"]  # fewer steps is better by default
    for seed in range(3):
        synthetic_run(tmp_path, ["norm=bn", f"seed={seed}"], [0.5, 0.9, 0.9, 0.9], [claim])
        synthetic_run(tmp_path, ["norm=none", f"seed={seed}"],
                      [0.5, 0.6, 0.7, 0.9 if seed else 0.8], [claim])  # seed 0 never gets there
    (judgement,), _ = judged_on(tmp_path)
    (comparison,) = judgement.comparisons
    assert judgement.claim.direction == "lower" and judgement.verdict == "reproduced"
    assert comparison.better.values == [20.0] * 3
    assert sorted(comparison.than.values) == [40.0] * 3 and comparison.than.not_reached == 1


def test_diverged_runs_are_judged_failed_and_killed_ones_are_not(tmp_path):
    sweep_of(tmp_path, {"bn": [0.90, 0.91, 0.93]}, [BN_BETTER])
    for seed, status in enumerate(["diverged", "diverged", "completed", "failed"]):
        synthetic_run(tmp_path, ["norm=none", f"seed={seed}"], [0.5, 0.1 + seed / 100],
                      [BN_BETTER], status=status)
    (judgement,), _ = judged_on(tmp_path)
    than = judgement.comparisons[0].than
    assert than.runs == 3 and than.diverged == 2
    assert than.values == pytest.approx([0.1, 0.11, 0.12])  # the failed run is left out
    assert judgement.verdict == "reproduced"


def test_claims_whose_groups_are_absent_or_unreadable_are_not_judged(tmp_path):
    absent = {**BN_BETTER, "id": "vs_ln", "than": {"norm": "ln"}}
    broken = {k: v for k, v in BN_BETTER.items() if k != "metric"} | {"id": "broken"}
    bad_key = {**BN_BETTER, "id": "bad_key", "where": {"optim.nope": 1}}
    judged, not_judged = judged_on(sweep_of(tmp_path, {"bn": [0.9] * 3, "none": [0.8] * 3},
                                            [BN_BETTER, absent, broken, bad_key]))
    assert [j.claim.id for j in judged] == ["bn_better"]
    reasons = {nj.id: nj.reason for nj in not_judged}
    assert reasons["vs_ln"] == "no runs with norm=ln"
    assert "missing metric" in reasons["broken"]
    assert "optim.nope" in reasons["bad_key"]


def test_claims_table_in_terminal_report_md_and_claims_csv(tmp_path):
    root = sweep_of(tmp_path / "sweep", {"bn": [0.90, 0.91, 0.93], "none": [0.80, 0.83, 0.81]},
                    [BN_BETTER, {**BN_BETTER, "id": "vs_ln", "than": {"norm": "ln"}}])
    code, stdout = run_main([str(root), "--out", str(tmp_path / "out")])
    assert code == 0
    assert "Claims" in stdout and "reproduced" in stdout and "vs_ln not judged" in stdout
    markdown = (tmp_path / "out" / "report.md").read_text()
    claims_md = markdown.split("## Claims")[1].split("\n## ")[0]
    assert "| bn_better: BN ends more accurate" in claims_md and "| 0.98 |" in claims_md
    assert "norm=bn 0.913 ± 0.015 (n=3) vs norm=none 0.813 ± 0.015 (n=3)" in claims_md
    assert "reproduced (p < 0.05)" in claims_md and "- vs_ln (a paper, Fig. 1)" in claims_md
    with open(tmp_path / "out" / "claims.csv") as f:
        rows = {row["claim"]: row for row in csv.DictReader(f)}
    assert rows["bn_better"]["verdict"] == "reproduced"
    assert float(rows["bn_better"]["better_mean"]) == pytest.approx(statistics.mean([0.9, 0.91, 0.93]))
    assert rows["bn_better"]["better_n"] == "3" and rows["vs_ln"]["verdict"] == "not judged"


def test_claims_are_not_config_keys(tmp_path):
    root = sweep_of(tmp_path, {"bn": [0.9], "none": [0.8]}, [BN_BETTER])
    runs = find_runs([root])
    assert all("claims" not in run.config and run.claims == [BN_BETTER] for run in runs)
    # Two presets' claims differ, yet the runs still group by norm only.
    synthetic_run(root, ["norm=bn", "seed=1"], [0.5, 0.9], [{**BN_BETTER, "id": "other"}])
    assert build_report(find_runs([root]), [root]).keys == ["norm.name"]


# ---------------------------------------------------------------- the target and ties
def test_auto_target_is_not_dragged_down_by_a_group_that_never_learned(tmp_path):
    for norm, best in [("bn", 0.95), ("ln", 0.90), ("none", 0.10)]:
        for seed in range(2):
            synthetic_run(tmp_path, [f"norm={norm}", f"seed={seed}"], [0.1, best])
    report = build_report(find_runs([tmp_path]), [tmp_path])
    assert report.target == pytest.approx(0.90)  # the worst run's best would be 0.10


def test_equal_step_counts_are_a_tie_not_1x_fewer(tmp_path):
    from bnlab.report import headline

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


# ---------------------------------------------------------------- eval_every=auto
def test_eval_every_auto_evaluates_twenty_times_whatever_the_length(tmp_path):
    from bnlab.evaluation import EVALUATIONS_PER_RUN, eval_interval

    assert EVALUATIONS_PER_RUN == 20
    assert eval_interval(7, 100) == 7 and eval_interval("auto", 10) == 1
    for total in (40, 1000, 1001, 8000):
        every = eval_interval("auto", total)
        evaluations = len(range(every, total + 1, every)) + (total % every != 0)
        assert evaluations == min(total, 20)
    assert compose().train.eval_every == "auto"  # the default
    run_dir = tmp_path / "run"
    assert train_in_process(run_dir, "data=digits", "train.steps=40", "probe=off") == "completed"
    assert [s for s, _ in csv_series(run_dir)["test/acc"]] == list(range(2, 41, 2))


# ---------------------------------------------------------------- module structure
def test_report_modules_are_in_no_import_cycle():
    import ast

    package = Path(__file__).resolve().parent.parent / "bnlab"
    modules = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    imports = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bnlab."):
                imports[name].add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imports[name] |= {a.name.split(".")[1] for a in node.names
                                  if a.name.startswith("bnlab.")}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in imports.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for name in ("report", "report_data", "report_figures", "claims", "runs"):
        assert name not in reachable(name), f"bnlab.{name} imports itself through a cycle"
    assert "report" not in reachable("report_figures") | reachable("claims")


# ---------------------------------------------------------------- the presets' claims
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" /
                                  "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_states_claims_its_own_sweep_can_judge(preset):
    """Each claim reads, and names keys and values that the preset's sweep produces."""
    import yaml

    from bnlab.claims import parse_claim
    from bnlab.runs import flatten

    raw = compose(f"experiment={preset}")
    config = flatten({k: v for k, v in _plain(raw).items() if k != "claims"})
    claims = [parse_claim(c) for c in _plain(raw)["claims"]]
    assert claims, f"{preset} states no claims"
    assert len({c.id for c in claims}) == len(claims)
    path = Path(__file__).resolve().parent.parent / "configs" / "experiment" / f"{preset}.yaml"
    swept = (yaml.safe_load(path.read_text()).get("hydra") or {}).get("sweeper", {}).get("params", {})
    for claim in claims:
        for name, value in [*claim.better.items(), *claim.than.items(), *claim.where.items()]:
            key = name if name in config else f"{name}.name"
            assert key in config, f"{preset}/{claim.id}: no config key {name}"
            produced = {str(v) for v in str(swept[name]).split(",")} if name in swept else set()
            values = value if isinstance(value, list) else [value]
            for v in values:
                assert (str(v) in produced or float_eq(v, produced) or v == config[key]), \
                    f"{preset}/{claim.id}: {name}={v} is not in the preset's sweep"


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def float_eq(value, texts: set[str]) -> bool:
    try:
        return any(float(t) == float(value) for t in texts)
    except (TypeError, ValueError):
        return False


def test_claims_stay_out_of_training_and_tensorboard_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    run_dir = tmp_path / "run"
    overrides = ["experiment=lr_sensitivity", "data=digits", "train.steps=10", "probe=off"]
    assert train_in_process(run_dir, *overrides) == "completed"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert "optim.lr" in start.hparams and not any(k.startswith("claims") for k in start.hparams)


# ---------------------------------------------------------------- scripts/reproduce.sh
REPRODUCE = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.sh"


def test_reproduce_without_a_preset_is_one_line_and_exit_2():
    for args in ([], ["norm=bn"]):  # an override where the preset should be
        result = subprocess.run(["bash", str(REPRODUCE), *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.startswith("usage: scripts/reproduce.sh <preset>")


@pytest.mark.slow
def test_reproduce_runs_the_ioffe_sweep_and_judges_every_claim(tmp_path):
    import os

    env = {**os.environ, "BNLAB": f"{sys.executable} -m bnlab", "SWEEP": str(tmp_path / "sweep"),
           "N_JOBS": "2", "BNLAB_DATA": str(tmp_path / "data")}
    result = subprocess.run(["bash", str(REPRODUCE), "ioffe_fig1", "data=digits", "train.steps=60",
                             "probe.every=10", "probe.batch_size=200", "train.threads=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = find_runs([tmp_path / "sweep"])
    assert sorted((r.config["norm.name"], r.seed) for r in runs) == [
        (n, s) for n in ("bn", "none") for s in (0, 1, 2)]
    claims = (tmp_path / "sweep" / "report" / "report.md").read_text().split("## Claims")[1]
    for claim in runs[0].claims:
        row = next(line for line in claims.splitlines() if line.startswith(f"| {claim['id']}:"))
        assert any(f"| {v} (" in row for v in ("reproduced", "not reproduced", "inconclusive"))
