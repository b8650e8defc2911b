"""Claims (bnlab.report.claims): the verdict rule on synthetic runs whose values are known, the claims
table of the report, and claims kept out of the config keys, the groups and TensorBoard's hparams."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from bnlab.report.data import build_report
from bnlab.rundir.reader import find_runs

from helpers import run_main, sweep_of, synthetic_run, train_in_process


def judged_on(root: Path):
    from bnlab.report.claims import judge_all

    runs = find_runs([root])
    return judge_all(runs, build_report(runs, [root]).keys)


BN_BETTER = {"id": "bn_better", "text": "BN ends more accurate", "source": "a paper, Fig. 1",
             "metric": "test/acc", "statistic": "final", "direction": "higher",
             "better": {"norm": "bn"}, "than": {"norm": "none"}, "published": 0.98}


# ---------------------------------------------------------------- the verdict rule
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


# ---------------------------------------------------------------- in the report
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


# ---------------------------------------------------------------- not config
def test_claims_are_not_config_keys(tmp_path):
    root = sweep_of(tmp_path, {"bn": [0.9], "none": [0.8]}, [BN_BETTER])
    runs = find_runs([root])
    assert all("claims" not in run.config and run.claims == [BN_BETTER] for run in runs)
    # Two presets' claims differ, yet the runs still group by norm only.
    synthetic_run(root, ["norm=bn", "seed=1"], [0.5, 0.9], [{**BN_BETTER, "id": "other"}])
    assert build_report(find_runs([root]), [root]).keys == ["norm.name"]


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
