"""Claims (bnlab.report.claims): the verdict rule on synthetic runs whose right answer is known
(censoring, divergence, ties at the resolution, along, a family, an equivalence, an interaction,
a paired claim), the claims table of the report, and claims kept out of the config keys, the
groups and TensorBoard's hparams.

The exact p-values are checked against references written out here: scipy's exact Mann-Whitney
and Wilcoxon tests where there are no ties, and a brute-force enumeration of every split of the
pooled runs (Gehan's pairwise score) where there are ties or censored runs."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from math import comb
from pathlib import Path

import pytest

from bnlab.report.data import build_report
from bnlab.rundir.reader import find_runs

from helpers import run_main, sweep_of, synthetic_run, train_in_process

SEEDS5 = range(5)


def judged_on(root: Path):
    from bnlab.report.claims import judge_all

    runs = find_runs([root])
    return judge_all(runs, build_report(runs, [root]).keys)


def set_summary(run_dir: Path, **fields) -> None:
    """Change a synthetic run's summary.json (its budget, its status)."""
    path = run_dir / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def add_tag(run_dir: Path, tag: str, values: list[float], every: int = 10) -> None:
    with open(run_dir / "scalars.csv", "a") as f:
        f.writelines(f"{(i + 1) * every},{tag},{v!r}\n" for i, v in enumerate(values))


def brute_force_p(a: list[tuple[float, bool]], b: list[tuple[float, bool]], r: float = 0.0,
                  higher: bool = True) -> float:
    """P(S >= S_obs) over every split of the pooled (value, censored) pairs, S the sum over the
    first side of Gehan's score (pairs it is surely above minus pairs surely above it; the other
    way for ``higher=False``); a censored value is only known to exceed its own value; a
    difference below r is a tie."""
    pooled = a + b
    sign = 1 if higher else -1

    def beats(x, y) -> int:
        (vx, cx), (vy, cy) = x, y
        if cx and cy:
            return 0
        if cx:
            return 1 if vy <= vx else 0
        if cy:
            return -1 if vx <= vy else 0
        d = vx - vy
        return 0 if math.isnan(d) or abs(d) < r * (1 - 1e-9) else (1 if d > 0 else -1)

    def s(side) -> int:
        return sign * sum(beats(pooled[i], y) for i in side for y in pooled)

    observed = s(range(len(a)))
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    return sum(s(side) >= observed for side in splits) / len(splits)


BN_BETTER = {"id": "bn_better", "text": "BN ends more accurate", "source": "a paper, Fig. 1",
             "metric": "test/acc", "statistic": "final", "direction": "higher",
             "better": {"norm": "bn"}, "than": {"norm": "none"}, "published": 0.98}
BN5 = [0.90, 0.91, 0.93, 0.92, 0.94]
NONE5 = [0.80, 0.83, 0.81, 0.84, 0.82]


# ---------------------------------------------------------------- the exact test
def test_five_seeds_that_separate_completely_reproduce_with_the_exact_permutation_p(tmp_path):
    from scipy.stats import mannwhitneyu

    (judgement,), not_judged = judged_on(sweep_of(tmp_path, {"bn": BN5, "none": NONE5}, [BN_BETTER]))
    assert not_judged == []
    (comparison,) = judgement.comparisons
    assert [v.x for v in comparison.better.values] == BN5  # in seed order
    assert [v.x for v in comparison.than.values] == NONE5
    reference = mannwhitneyu(BN5, NONE5, alternative="greater", method="exact").pvalue
    assert comparison.p_claimed == pytest.approx(reference) == pytest.approx(1 / comb(10, 5))
    assert judgement.verdict == "reproduced" and judgement.threshold == 0.05
    assert comparison.smallest_p == pytest.approx(1 / 252)


def test_three_seeds_cannot_reproduce_anything_however_far_apart(tmp_path):
    # Complete separation of 3 vs 3 is one split of C(6, 3) = 20: p = 0.05, not below 0.05.
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": [0.9, 0.91, 0.93], "none": [0.1, 0.11, 0.12]},
                                         [BN_BETTER]))
    assert judgement.p == pytest.approx(0.05) and judgement.verdict == "inconclusive"
    assert "cannot show it" in judgement.reason and "0.05" in judgement.reason


def test_claim_not_reproduced_when_the_other_side_wins_every_seed(tmp_path):
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": NONE5, "none": BN5}, [BN_BETTER]))
    assert judgement.verdict == "not reproduced" and "the other way" in judgement.reason
    assert judgement.p_not == pytest.approx(1 / 252)


def test_overlapping_seeds_are_inconclusive_with_the_exact_p(tmp_path):
    from scipy.stats import mannwhitneyu

    bn, none = [0.85, 0.90, 0.80, 0.88, 0.79], [0.86, 0.84, 0.87, 0.81, 0.83]
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": bn, "none": none}, [BN_BETTER]))
    reference = mannwhitneyu(bn, none, alternative="greater", method="exact").pvalue
    assert judgement.p == pytest.approx(reference) and reference > 0.05
    assert judgement.verdict == "inconclusive" and "not below 0.05" in judgement.reason


# ---------------------------------------------------------------- ties and resolution
def test_a_difference_below_one_test_example_is_a_tie_not_certainty(tmp_path):
    # Accuracies are k/360 (the digits test split): the resolution is inferred from them.
    claim = {**BN_BETTER, "id": "mean_acc", "statistic": "mean"}
    for seed in SEEDS5:  # every seed identical: zero spread on both sides
        synthetic_run(tmp_path / "close", ["norm=bn", f"seed={seed}"], [180 / 360, 324 / 360], [claim])
        synthetic_run(tmp_path / "close", ["norm=none", f"seed={seed}"], [181 / 360, 322 / 360], [claim])
    (judgement,), _ = judged_on(tmp_path / "close")  # means 0.7 vs 0.69861: 1/720 apart
    (comparison,) = judgement.comparisons
    assert comparison.resolution == pytest.approx(1 / 360)
    assert judgement.p == 1.0 and judgement.p_not == 1.0 and judgement.verdict == "inconclusive"
    # One whole example apart at every seed: that is a difference, and 5 vs 5 separate.
    final = {**BN_BETTER, "id": "final_acc"}
    for seed in SEEDS5:
        synthetic_run(tmp_path / "apart", ["norm=bn", f"seed={seed}"], [0.5, 324 / 360], [final])
        synthetic_run(tmp_path / "apart", ["norm=none", f"seed={seed}"], [0.5, 323 / 360], [final])
    (judgement,), _ = judged_on(tmp_path / "apart")
    assert judgement.p == pytest.approx(1 / 252) and judgement.verdict == "reproduced"


def test_zero_spread_on_a_loss_is_not_certainty(tmp_path):
    # Lower is better for a loss; identical seeds on both sides: Welch's t would say p = 0.
    claim = {**BN_BETTER, "id": "loss", "metric": "test/loss", "direction": "lower"}
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"bn": [0.9] * 3, "none": [0.8] * 3}, [claim]))
    (comparison,) = judgement.comparisons
    assert [v.x for v in comparison.better.values] == pytest.approx([0.1] * 3)  # 1 - acc
    assert comparison.resolution == 0.0  # a loss is continuous: only equal values tie
    assert judgement.p == pytest.approx(1 / 20) and judgement.verdict == "inconclusive"


# ---------------------------------------------------------------- censoring
def test_a_run_that_diverged_before_the_target_is_censored_at_its_budget(tmp_path):
    """Two of five baseline runs diverge at step 20 without reaching 0.85: counted at their last
    step they would be the fastest runs of all; censored at the budget (100 steps) they are the
    slowest, and BN, which reaches it at step 30 at every seed, trains faster."""
    claim = {**BN_BETTER, "id": "faster", "statistic": "steps_to_target", "target": 0.85}
    del claim["direction"]  # fewer steps is better by default
    for seed in SEEDS5:
        synthetic_run(tmp_path, ["norm=bn", f"seed={seed}"], [0.5, 0.6, 0.9, 0.9, 0.9, 0.9,
                                                                 0.9, 0.9, 0.9, 0.9], [claim])
        if seed < 2:
            run = synthetic_run(tmp_path, ["norm=none", f"seed={seed}"], [0.5, 0.4], [claim],
                                status="diverged")
            set_summary(run, total_steps=100, diverged_step=20)
        else:
            synthetic_run(tmp_path, ["norm=none", f"seed={seed}"],
                          [0.5, 0.6, 0.7, 0.8, 0.86, 0.9, 0.9, 0.9, 0.9, 0.9], [claim])
    (judgement,), _ = judged_on(tmp_path)
    (comparison,) = judgement.comparisons
    assert judgement.claim.direction == "lower" and comparison.resolution == 10  # one eval interval
    assert [(v.x, v.censored) for v in comparison.better.values] == [(30.0, False)] * 5
    assert [(v.x, v.censored) for v in comparison.than.values] == \
        [(100.0, True)] * 2 + [(50.0, False)] * 3
    reference = brute_force_p([(30.0, False)] * 5, [(100.0, True)] * 2 + [(50.0, False)] * 3, 10,
                              higher=False)
    assert judgement.p == pytest.approx(reference) == pytest.approx(1 / 252)
    assert judgement.verdict == "reproduced"


def test_a_run_that_never_reaches_the_target_is_slower_than_one_that_reaches_it_at_the_budget(tmp_path):
    """BN reaches 0.85 at its last evaluation, step 40, at every seed; the baseline never does
    in the same 40 steps. Counted at its last step (40) it would tie with BN; censored, its
    steps exceed 40, and BN is faster at every seed."""
    claim = {**BN_BETTER, "id": "faster", "statistic": "steps_to_target", "target": 0.85,
             "direction": "lower"}
    for seed in SEEDS5:
        synthetic_run(tmp_path, ["norm=bn", f"seed={seed}"], [0.5, 0.6, 0.7, 0.9], [claim])
        synthetic_run(tmp_path, ["norm=none", f"seed={seed}"], [0.5, 0.6, 0.7, 0.8], [claim])
    (judgement,), _ = judged_on(tmp_path)
    (comparison,) = judgement.comparisons
    assert [(v.x, v.censored, v.note) for v in comparison.than.values] == [(40.0, True, "never reached")] * 5
    reference = brute_force_p([(40.0, False)] * 5, [(40.0, True)] * 5, 10, higher=False)
    assert judgement.p == pytest.approx(reference) == pytest.approx(1 / 252)
    assert judgement.verdict == "reproduced"
    assert brute_force_p([(40.0, False)] * 5, [(40.0, False)] * 5, 10, higher=False) == 1.0


# ---------------------------------------------------------------- divergence
def test_a_diverged_run_ranks_worst_in_an_accuracy_claim(tmp_path):
    """A method that diverges in one seed of five and is slightly better in the other four does
    not beat a stable one: dropping the diverged run (survivorship) would give p = 2/252."""
    claim = {**BN_BETTER, "id": "whiten_better", "better": {"norm": "ln"}, "than": {"norm": "bn"}}
    ln, bn = [0.91, 0.92, 0.93, 0.94], [0.900, 0.905, 0.895, 0.900, 0.899]
    sweep_of(tmp_path, {"ln": ln, "bn": bn}, [claim])
    synthetic_run(tmp_path, ["norm=ln", "seed=4"], [0.5, 0.96], [claim], status="diverged")
    (judgement,), _ = judged_on(tmp_path)
    (comparison,) = judgement.comparisons
    assert [v.x for v in comparison.better.values] == [*ln, -math.inf]  # its 0.96 is not used
    assert comparison.better.values[-1].note == "diverged"
    r = comparison.resolution
    assert judgement.p == pytest.approx(brute_force_p(
        [(x, False) for x in [*ln, -math.inf]], [(x, False) for x in bn], r))
    assert judgement.p > 0.05 and judgement.verdict == "inconclusive"
    assert brute_force_p([(x, False) for x in ln], [(x, False) for x in bn], r) < 0.01


def test_a_diverged_run_ranks_worst_in_a_loss_claim(tmp_path):
    claim = {**BN_BETTER, "id": "lower_loss", "metric": "test/loss", "direction": "lower",
             "better": {"norm": "ln"}, "than": {"norm": "bn"}}
    ln, bn = [0.91, 0.92, 0.93, 0.94], [0.900, 0.905, 0.895, 0.900, 0.899]
    sweep_of(tmp_path, {"ln": ln, "bn": bn}, [claim])
    run = synthetic_run(tmp_path, ["norm=ln", "seed=4"], [0.5, 0.96], [claim], status="completed")
    (run / "scalars.csv").write_text((run / "scalars.csv").read_text().replace(
        f"20,test/loss,{1 - 0.96!r}", "20,test/loss,nan"))  # the final loss is not finite
    (judgement,), _ = judged_on(tmp_path)
    better = judgement.comparisons[0].better
    assert better.values[-1].x == math.inf and better.values[-1].note == "not finite"
    assert judgement.p > 0.05 and judgement.verdict == "inconclusive"


def test_a_baseline_that_diverges_at_every_seed_is_the_worst_outcome(tmp_path):
    sweep_of(tmp_path, {"bn": BN5}, [BN_BETTER])
    for seed in SEEDS5:
        synthetic_run(tmp_path, ["norm=none", f"seed={seed}"], [0.5, 0.99], [BN_BETTER],
                      status="diverged")  # its last evaluation looked good: it is not used
    (judgement,), _ = judged_on(tmp_path)
    assert judgement.comparisons[0].than.count("diverged") == 5
    assert judgement.p == pytest.approx(1 / 252) and judgement.verdict == "reproduced"


def test_failed_runs_are_listed_not_judged(tmp_path):
    sweep_of(tmp_path, {"bn": BN5, "none": NONE5}, [BN_BETTER])
    for seed, status in ((5, "failed"), (6, "interrupted")):
        synthetic_run(tmp_path, ["norm=none", f"seed={seed}"], [0.5, 0.99], [BN_BETTER], status=status)
    (judgement,), _ = judged_on(tmp_path)
    than = judgement.comparisons[0].than
    assert than.n == 5 and than.excluded == {"failed": 1, "interrupted": 1}
    assert judgement.p == pytest.approx(1 / 252)


# ---------------------------------------------------------------- along
ALONG = {**BN_BETTER, "id": "along_lr", "along": "optim.lr"}


def test_along_every_value_must_hold(tmp_path):
    finals = {"0.1": (BN5, NONE5), "1.0": (BN5, [0.1, 0.11, 0.12, 0.13, 0.14]),
              "3.0": ([0.50, 0.60, 0.40, 0.45, 0.55], [0.52, 0.49, 0.55, 0.47, 0.51])}
    for lr, (bn, none) in finals.items():
        sweep_of(tmp_path, {"bn": bn, "none": none}, [ALONG], extra=[f"optim.lr={lr}"])
    (judgement,), _ = judged_on(tmp_path)
    assert [c.label for c in judgement.comparisons] == ["optim.lr=0.1", "optim.lr=1.0", "optim.lr=3.0"]
    assert [c.verdict for c in judgement.comparisons] == ["reproduced", "reproduced", "inconclusive"]
    assert judgement.verdict == "inconclusive" and "1 of 3 values" in judgement.reason
    assert judgement.p == max(c.p_claimed for c in judgement.comparisons)


def test_along_with_a_missing_value_is_not_judged(tmp_path):
    # where names lr 0.1, 1 and 3; BN has no runs at 3: no verdict from the values that are there.
    claim = {**ALONG, "where": {"optim.lr": [0.1, 1.0, 3.0]}}
    for lr in ("0.1", "1.0"):
        sweep_of(tmp_path / "where", {"bn": BN5, "none": NONE5}, [claim], extra=[f"optim.lr={lr}"])
    sweep_of(tmp_path / "where", {"none": NONE5}, [claim], extra=["optim.lr=3.0"])
    judged, (nj,) = judged_on(tmp_path / "where")
    assert judged == [] and nj.reason == "no runs with norm=bn at optim.lr=3.0"
    # No where: the values the sweep holds. The baseline was also run at lr 10, BN was not.
    for lr in ("0.1", "1.0"):
        sweep_of(tmp_path / "sweep", {"bn": BN5, "none": NONE5}, [ALONG], extra=[f"optim.lr={lr}"])
    sweep_of(tmp_path / "sweep", {"none": NONE5}, [ALONG], extra=["optim.lr=10.0"])
    judged, (nj,) = judged_on(tmp_path / "sweep")
    assert judged == [] and nj.reason == "no runs with norm=bn at optim.lr=10.0"


def test_one_reversed_value_along_a_key_makes_it_not_reproduced(tmp_path):
    sweep_of(tmp_path, {"bn": BN5, "none": NONE5}, [ALONG], extra=["optim.lr=0.1"])
    sweep_of(tmp_path, {"bn": NONE5, "none": BN5}, [ALONG], extra=["optim.lr=1.0"])
    (judgement,), _ = judged_on(tmp_path)
    assert judgement.p_not == pytest.approx(2 / 252)  # Bonferroni over the 2 values
    assert judgement.verdict == "not reproduced"


# ---------------------------------------------------------------- a family of claims
def test_holm_over_the_claims_of_a_preset(tmp_path):
    """Alone, a claim with p = 7/252 = 0.028 would be reproduced; as the second of three it
    must beat 0.05/2 and does not, and Holm stops there: the third (p = 0.048) is not
    reproduced either, though its own threshold is 0.05."""
    claims = [{**BN_BETTER, "id": "bn", "better": {"norm": "bn"}},
              {**BN_BETTER, "id": "ln", "better": {"norm": "ln"}},
              {**BN_BETTER, "id": "gn", "better": {"norm": "gn"}}]
    none = [0.80, 0.82, 0.84, 0.87, 0.89]
    sweep_of(tmp_path, {"bn": [0.90, 0.91, 0.93, 0.92, 0.94], "ln": [0.86, 0.88, 0.91, 0.93, 0.95],
                        "gn": [0.83, 0.88, 0.91, 0.93, 0.95], "none": none}, claims)
    judged, _ = judged_on(tmp_path)
    by_id = {j.claim.id: j for j in judged}
    assert [by_id[c].p * 252 for c in ("bn", "ln", "gn")] == pytest.approx([1, 7, 12])
    assert [by_id[c].verdict for c in ("bn", "ln", "gn")] == ["reproduced", "inconclusive", "inconclusive"]
    assert [by_id[c].threshold for c in ("bn", "ln", "gn")] == pytest.approx([0.05 / 3, 0.05 / 2, 0.05])
    assert all(j.family == 3 for j in judged)
    assert "Holm stopped" in by_id["gn"].reason
    alone, _ = judged_on(sweep_of(tmp_path / "alone", {"ln": [0.86, 0.88, 0.91, 0.93, 0.95],
                                                       "none": none}, [claims[1]]))
    assert alone[0].verdict == "reproduced"


# ---------------------------------------------------------------- equivalence (TOST)
EQUIVALENT = {"id": "noisy_like_bn", "text": "noisy BN ends as accurate as BN",
              "source": "a paper", "metric": "test/acc", "margin": 0.02,
              "better": {"norm": "noisy_bn"}, "than": {"norm": "bn"}}


@pytest.mark.parametrize("noisy,verdict", [
    ([0.905, 0.91, 0.915, 0.92, 0.925], "reproduced"),  # within 0.02 of every BN seed
    ([0.85, 0.86, 0.855, 0.865, 0.86], "not reproduced"),  # 0.05 below: outside the margin
    ([0.88, 0.95, 0.86, 0.93, 0.91], "inconclusive"),  # too spread to tell
])
def test_an_equivalence_is_shown_by_two_one_sided_tests(tmp_path, noisy, verdict):
    bn = [0.910, 0.912, 0.915, 0.913, 0.911]
    (judgement,), _ = judged_on(sweep_of(tmp_path, {"noisy_bn": noisy, "bn": bn}, [EQUIVALENT]))
    assert judgement.claim.kind == "equivalence" and judgement.verdict == verdict
    r = judgement.comparisons[0].resolution
    lower = brute_force_p([(x + 0.02, False) for x in noisy], [(x, False) for x in bn], r)
    upper = brute_force_p([(x, False) for x in bn], [(x - 0.02, False) for x in noisy], r)
    assert judgement.p == pytest.approx(max(lower, upper))


# ---------------------------------------------------------------- interaction
BATCH = {"id": "bn_loses_more", "text": "BN loses more accuracy from batch 32 to 2 than no norm",
         "source": "a paper", "metric": "test/acc",
         "change": {"from": {"train.batch_size": 32}, "to": {"train.batch_size": 2}},
         "better": {"norm": "none"}, "than": {"norm": "bn"}, "direction": "higher"}


def _batch_sweep(root: Path, finals: dict[tuple[str, int], list[float]], claims) -> Path:
    for (norm, batch), values in finals.items():
        sweep_of(root, {norm: values}, claims, extra=[f"train.batch_size={batch}"])
    return root


def test_an_interaction_is_judged_on_the_per_seed_changes(tmp_path):
    bn32, bn2 = [0.95, 0.96, 0.94, 0.95, 0.97], [0.60, 0.62, 0.58, 0.65, 0.61]
    none32, none2 = [0.90, 0.91, 0.89, 0.92, 0.90], [0.85, 0.87, 0.84, 0.86, 0.88]
    root = _batch_sweep(tmp_path / "bn", {("bn", 32): bn32, ("bn", 2): bn2, ("none", 32): none32,
                                          ("none", 2): none2}, [BATCH])
    (judgement,), _ = judged_on(root)
    (comparison,) = judgement.comparisons
    for side, (start, end) in ((comparison.better, (none32, none2)), (comparison.than, (bn32, bn2))):
        assert [v.x for v in side.values] == pytest.approx([b - a for a, b in zip(start, end, strict=True)])
    assert judgement.p == pytest.approx(1 / 252) and judgement.verdict == "reproduced"


def test_an_interaction_is_not_fooled_by_a_loss_both_networks_share(tmp_path):
    """Both lose 0.35 from batch 32 to 2 (fewer examples seen, not normalization): "BN is worse
    at batch 2" reproduces, the interaction does not."""
    bn32, none32 = [0.95, 0.96, 0.94, 0.95, 0.97], [0.90, 0.91, 0.89, 0.92, 0.90]
    shared = [0.35, 0.36, 0.33, 0.34, 0.37]
    finals = {("bn", 32): bn32, ("bn", 2): [a - d for a, d in zip(bn32, shared, strict=True)],
              ("none", 32): none32,
              ("none", 2): [a - d for a, d in zip(none32, reversed(shared), strict=True)]}
    worse = {**BN_BETTER, "id": "bn_worse_at_2", "better": {"norm": "bn", "train.batch_size": 32},
             "than": {"norm": "bn", "train.batch_size": 2}}
    judged, _ = judged_on(_batch_sweep(tmp_path, finals, [BATCH, worse]))
    by_id = {j.claim.id: j.verdict for j in judged}
    assert by_id == {"bn_loses_more": "inconclusive", "bn_worse_at_2": "reproduced"}


def test_an_interaction_with_a_missing_cell_is_not_judged(tmp_path):
    root = _batch_sweep(tmp_path, {("bn", 32): BN5, ("bn", 2): NONE5, ("none", 32): BN5}, [BATCH])
    judged, (nj,) = judged_on(root)
    assert nj.reason == "no runs with norm=none at train.batch_size=2"


# ---------------------------------------------------------------- paired
PAIRED = {"id": "train_mode_recovers", "text": "in train mode BN is more accurate",
          "source": "Ioffe 2017, Fig. 3", "metric": "test/acc_train_mode",
          "than_metric": "test/acc", "better": {"norm": "bn"}}


def test_a_paired_claim_is_judged_on_the_per_run_differences(tmp_path):
    from scipy.stats import wilcoxon

    train_mode = [0.85, 0.86, 0.84, 0.87, 0.85, 0.86]
    accs = [0.58, 0.60, 0.62, 0.55, 0.86, 0.59]  # seed 4: eval mode 0.01 better
    for seed, (tm, acc) in enumerate(zip(train_mode, accs, strict=True)):
        run = synthetic_run(tmp_path, ["norm=bn", f"seed={seed}"], [0.5, acc], [PAIRED])
        add_tag(run, "test/acc_train_mode", [0.5, tm])
    (judgement,), _ = judged_on(tmp_path)
    (comparison,) = judgement.comparisons
    differences = [tm - acc for tm, acc in zip(train_mode, accs, strict=True)]
    assert [v.x for v in comparison.better.values] == pytest.approx(differences)
    reference = wilcoxon(differences, alternative="greater", method="exact").pvalue
    assert judgement.p == pytest.approx(reference) and comparison.smallest_p == 1 / 64
    assert judgement.verdict == "reproduced"


def test_a_paired_difference_within_the_resolution_is_no_evidence(tmp_path):
    for seed in range(6):
        run = synthetic_run(tmp_path, ["norm=bn", f"seed={seed}"], [0.5, 324 / 360], [PAIRED])
        add_tag(run, "test/acc_train_mode", [0.5, 324 / 360 + 1e-7])
    (judgement,), _ = judged_on(tmp_path)
    assert judgement.p == 1.0 and judgement.verdict == "inconclusive"


# ---------------------------------------------------------------- reading claims
@pytest.mark.parametrize("change,why", [
    ({"margin": -0.1}, "margin must be a positive number"),
    ({"change": {"from": {"train.batch_size": 32}}}, "change is {from:"),
    ({"change": {"from": {"train.batch_size": 2}, "to": {"train.batch_size": 2}}}, "different values"),
    ({"statistic": "steps_to_target", "target": 0.9, "change": BATCH["change"]}, "censored"),
    ({"margin": 0.1, "than_metric": "test/loss", "than": None}, "different kinds"),
    ({"than_metric": "test/loss"}, "no than"),
    ({"than": None}, "missing than"),
    ({"along": "norm"}, "also a key that selects"),
])
def test_malformed_claims_are_refused_with_the_reason(change, why):
    from bnlab.report.claims import ClaimError, parse_claim

    with pytest.raises(ClaimError, match=why.replace("{", r"\{")):
        parse_claim({**BN_BETTER, **change})


def test_claims_whose_groups_are_absent_or_unreadable_are_not_judged(tmp_path):
    absent = {**BN_BETTER, "id": "vs_ln", "than": {"norm": "ln"}}
    broken = {k: v for k, v in BN_BETTER.items() if k != "metric"} | {"id": "broken"}
    bad_key = {**BN_BETTER, "id": "bad_key", "where": {"optim.nope": 1}}
    judged, not_judged = judged_on(sweep_of(tmp_path, {"bn": BN5, "none": NONE5},
                                            [BN_BETTER, absent, broken, bad_key]))
    assert [j.claim.id for j in judged] == ["bn_better"]
    reasons = {nj.id: nj.reason for nj in not_judged}
    assert reasons["vs_ln"] == "no runs with norm=ln"
    assert "missing metric" in reasons["broken"]
    assert "optim.nope" in reasons["bad_key"]


# ---------------------------------------------------------------- in the report
def test_claims_table_in_terminal_report_md_and_claims_csv(tmp_path):
    root = sweep_of(tmp_path / "sweep", {"bn": BN5, "none": NONE5},
                    [BN_BETTER, {**BN_BETTER, "id": "vs_ln", "than": {"norm": "ln"}}])
    code, stdout = run_main([str(root), "--out", str(tmp_path / "out")])
    assert code == 0
    assert "Claims" in stdout and "reproduced" in stdout and "vs_ln not judged" in stdout
    markdown = (tmp_path / "out" / "report.md").read_text()
    claims_md = markdown.split("## Claims")[1].split("\n## ")[0]
    assert "| bn_better: BN ends more accurate" in claims_md and "| 0.98 |" in claims_md
    assert "norm=bn 0.920 ± 0.016 (n=5) vs norm=none 0.820 ± 0.016 (n=5), p = 0.004" in claims_md
    assert "complete separation of 5 vs 5 seeds gives p = 0.004, which reaches 0.05" in claims_md
    assert "reproduced (p = 0.004 < 0.05, a family of one)" in claims_md
    assert "Holm" in claims_md and "- vs_ln (a paper, Fig. 1)" in claims_md
    with open(tmp_path / "out" / "claims.csv") as f:
        rows = {row["claim"]: row for row in csv.DictReader(f)}
    row = rows["bn_better"]
    assert row["verdict"] == "reproduced" and row["kind"] == "difference"
    assert float(row["better_mean"]) == pytest.approx(statistics.mean(BN5))
    assert row["better_n"] == "5" and float(row["p_claimed"]) == pytest.approx(1 / 252)
    assert float(row["resolution"]) == pytest.approx(0.01) and row["family"] == "1"
    assert rows["vs_ln"]["verdict"] == "not judged"


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
