"""The presets (configs/experiment/*): each states its source, composes with every norm it
compares, keeps its paper's settings, states claims its own sweep can judge, and runs through
scripts/reproduce.sh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab.config.schema import config_dir, validate
from bnlab.rundir.reader import find_runs

from helpers import REPO, compose, compose_hydra

PRESETS = {  # preset -> the norms its comparison sweeps (what its script passes as norm=...)
    "ioffe_fig1": ["none", "bn"],
    "brn_small_batch": ["bn", "brn", "ln"],
    "santurkar_noisy_bn": ["none", "bn", "noisy_bn"],
    "santurkar_noisy_bn_small": ["none", "bn", "noisy_bn"],
    "santurkar_dln": ["none", "bn"],
    "d2l_lenet_bn": ["none", "bn"],
    "whitening": ["bn", "whiten"],
}


# ---------------------------------------------------------------- each preset against its paper
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_states_its_source_and_composes_with_every_norm_it_compares(preset: str):
    text = (config_dir() / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert re.search(r"(arXiv \d{4}\.\d{4,5}|Dive into Deep Learning)", text), "no source"
    base = compose(f"experiment={preset}")
    validate(base)
    for norm in PRESETS[preset]:
        cfg = compose(f"experiment={preset}", f"norm={norm}")
        validate(cfg)
        assert cfg.norm.name == norm
        # Everything but the norm is the preset's: the sweep compares one thing.
        for key in ("model", "data", "optim", "activation"):
            assert cfg[key] == base[key], (preset, norm, key)
        assert cfg.train.steps == base.train.steps and cfg.train.batch_size == base.train.batch_size


def test_preset_settings_match_their_papers() -> None:
    ioffe = compose("experiment=ioffe_fig1")
    assert (ioffe.data.name, ioffe.activation.name, list(ioffe.model.widths)) == \
        ("mnist", "sigmoid", [100, 100, 100])
    assert (ioffe.norm.position, ioffe.train.batch_size, ioffe.train.steps) == ("before_act", 60, 50000)
    d2l = compose("experiment=d2l_lenet_bn")
    assert (d2l.optim.lr, d2l.optim.momentum, d2l.train.batch_size, d2l.train.epochs) == (1.0, 0.0, 256, 10)
    assert (d2l.model.pool, list(d2l.model.channels), d2l.data.normalize) == ("avg", [6, 16], False)
    dln = compose("experiment=santurkar_dln")
    assert len(dln.model.widths) + 1 == 25 and set(dln.model.widths) == {10}
    assert (dln.activation.name, dln.data.name, dln.model.init) == ("identity", "linear", "glorot")
    vgg = compose("experiment=santurkar_noisy_bn")
    assert (vgg.optim.lr, vgg.train.batch_size, vgg.train.steps, vgg.data.augment) == (0.1, 128, 15000, False)
    assert vgg.probe.ics_every > 0


def test_batch_renorm_schedule_fits_the_preset_run_and_reaches_only_brn() -> None:
    brn = compose("experiment=brn_small_batch", "norm=brn")
    full_bounds_at = brn.norm.warmup_steps + max(brn.norm.ramp_steps, brn.norm.d_ramp_steps)
    assert full_bounds_at < brn.train.steps
    assert "warmup_steps" not in compose("experiment=brn_small_batch", "norm=bn").norm
    # Without the preset, BRN keeps the paper's schedule.
    assert compose("norm=brn").norm.warmup_steps == 5000


def test_preset_sweeper_params_sweep_the_norms() -> None:
    cfg = compose_hydra("experiment=ioffe_fig1")
    assert cfg.hydra.sweeper.params == {"norm": "none,bn"}


def test_the_santurkar_landscape_preset_composes_and_keeps_the_papers_protocol():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bnlab.config.schema import register_configs

    text = (config_dir() / "experiment" / "santurkar_landscape.yaml").read_text()
    assert text.startswith("# @package _global_\n") and "arXiv 1805.11604" in text
    for norm in ("none", "bn"):
        cfg = compose("experiment=santurkar_landscape", f"norm={norm}")
        validate(cfg)
        assert cfg.norm.name == norm and cfg.probe.landscape_every > 0
        # App. A.1: plain SGD, lr 0.1, batch 128; ReLU with the norm before it.
        optim = cfg.optim
        assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.1, 0.0, 0.0)
        assert (cfg.train.batch_size, cfg.activation.name, cfg.norm.position) == (128, "relu", "before_act")
        assert {c.metric for c in cfg.claims} == {"landscape/loss_range", "landscape/grad_change",
                                                  "landscape/beta"}
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        hydra_cfg = hydra_compose(config_name="train", overrides=["experiment=santurkar_landscape"],
                                  return_hydra_config=True)
    params = hydra_cfg.hydra.sweeper.params
    assert params["norm"] == "none,bn" and len(params["seed"].split(",")) == len(default_seeds())


# ---------------------------------------------------------------- the presets' claims
PRESET_FILES = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_every_preset_states_claims_its_own_sweep_can_judge(preset):
    """Each claim reads, and names keys and values that the preset's sweep produces."""
    import yaml

    from bnlab.report.claims import parse_claim
    from bnlab.rundir.reader import flatten

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


# A train-mode output of a layer that normalizes with its batch's statistics is set by the layer's
# definition (per unit, mean beta and variance gamma^2 on the batch), and noisy BN's carries the
# noise it injects: a claim read there could not fail. The nonlinearity input is that output for
# norm.position=before_act, so the percentiles read it too.
FIXED_TAG = re.compile(r"^(act|drift|drift0)/layer\d+/norm/|^pct/layer\d+/")


def fixed_by_construction(claim, preset: str) -> list[str]:
    """The norms on either side of ``claim`` whose own train-mode output it reads."""
    from bnlab.norms import norm_class

    if not FIXED_TAG.match(claim.metric) and not (claim.than_metric and FIXED_TAG.match(claim.than_metric)):
        return []
    swept = str(_sweep_params(preset).get("norm", compose(f"experiment={preset}").norm.name)).split(",")
    norms = set()
    for selector in (claim.better, claim.than):
        named = selector.get("norm", swept)
        norms |= set(named if isinstance(named, list) else [named] if isinstance(named, str) else named)
    return sorted(n for n in norms if norm_class(n).uses_batch_statistics)


def _sweep_params(preset: str) -> dict:
    import yaml

    path = REPO / "configs" / "experiment" / f"{preset}.yaml"
    return (yaml.safe_load(path.read_text()).get("hydra") or {}).get("sweeper", {}).get("params", {})


def preset_claims(preset: str):
    from bnlab.report.claims import parse_claim

    return [parse_claim(c) for c in _plain(compose(f"experiment={preset}"))["claims"]]


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_no_claim_reads_a_quantity_the_norms_definition_fixes(preset):
    for claim in preset_claims(preset):
        assert fixed_by_construction(claim, preset) == [], f"{preset}/{claim.id} reads {claim.metric}"


def test_a_claim_on_bns_train_mode_output_is_refused_and_its_inference_view_is_not():
    from bnlab.report.claims import parse_claim

    base = {"id": "c", "text": "t", "source": "s", "statistic": "mean", "direction": "lower",
            "better": {"norm": "bn"}, "than": {"norm": "none"}}
    for metric in ("drift/layer3/norm/mean", "drift0/layer1/norm/var", "act/layer2/norm/mean",
                   "pct/layer3/p50"):
        assert fixed_by_construction(parse_claim({**base, "metric": metric}), "ioffe_fig1") == ["bn"]
    noisy = parse_claim({**base, "metric": "drift/layer3/norm/mean", "better": {"norm": "noisy_bn"},
                         "than": {"norm": "none"}})
    assert fixed_by_construction(noisy, "santurkar_noisy_bn_small") == ["noisy_bn"]
    for metric in ("infer/drift/layer3/norm/mean", "drift/layer3/pre/mean", "test/acc"):
        assert fixed_by_construction(parse_claim({**base, "metric": metric}), "ioffe_fig1") == []
    # A norm that does not use its batch's statistics (layer norm) may be read there.
    ln = parse_claim({**base, "metric": "drift/layer3/norm/mean", "better": {"norm": "ln"}})
    assert fixed_by_construction(ln, "brn_noniid") == []


# The probe settings that log a tag (docs/metrics.md).
LOGGED_BY = {"infer/": lambda p: p.enabled and p.mode in ("eval", "both"),
             "drift/": lambda p: p.enabled and p.mode in ("train", "both"),
             "ics/": lambda p: p.enabled and p.ics_every > 0,
             "landscape/": lambda p: p.enabled and p.landscape_every > 0,
             "snd/": lambda p: p.enabled and p.get("snd_every", 0) > 0}


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_every_claims_metric_is_logged_by_its_preset(preset):
    probe = compose(f"experiment={preset}").probe
    for claim in preset_claims(preset):
        for metric in claim.metrics:
            for prefix, logged in LOGGED_BY.items():
                if metric.startswith(prefix):
                    assert logged(probe), f"{preset}/{claim.id}: {metric} needs other probe settings"


def default_seeds() -> list[str]:
    match = re.search(r'SEEDS="\$\{SEEDS:-([0-9,]+)\}"', (REPO / "scripts" / "reproduce.sh").read_text())
    return match.group(1).split(",")


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_the_default_seeds_can_show_every_claim_after_holm(preset):
    """With scripts/reproduce.sh's seeds, complete separation of the two sides reaches Holm's
    strictest threshold, ALPHA / (the preset's number of claims), for every claim."""
    from bnlab.report.claims import ALPHA, smallest_p

    claims = preset_claims(preset)
    n = len(default_seeds())
    for claim in claims:
        assert smallest_p(claim.kind, n, n) < ALPHA / len(claims), (preset, claim.id, n)


@pytest.mark.parametrize("preset", PRESET_FILES)
def test_each_preset_header_says_how_each_claim_could_fail(preset):
    text = (REPO / "configs" / "experiment" / f"{preset}.yaml").read_text()
    for claim in preset_claims(preset):
        assert re.search(rf"^#\s+{claim.id}: not reproduced if ", text, re.M), f"{preset}/{claim.id}"


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def float_eq(value, texts: set[str]) -> bool:
    try:
        return any(float(t) == float(value) for t in texts)
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- scripts/reproduce.sh
def test_every_preset_is_reproduced_by_the_one_script() -> None:
    """scripts/reproduce.sh <preset> runs any preset: it is executable, valid bash, and sweeps
    the named experiment and reports on the same directory (the slow test below runs it end to end)."""
    script = REPO / "scripts" / "reproduce.sh"
    assert os.access(script, os.X_OK), script
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert 'experiment="$PRESET"' in text and 'hydra.sweep.dir="$SWEEP"' in text
    assert '$BNLAB report "$SWEEP"' in text
    presets = {p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")}
    assert set(PRESETS) <= presets
    leftovers = sorted(p.name for p in (REPO / "scripts").glob("*.sh") if p.name != "reproduce.sh")
    assert leftovers == []  # one script for every preset, no per-preset copies


REPRODUCE = REPO / "scripts" / "reproduce.sh"


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
        (n, s) for n in ("bn", "none") for s in map(int, default_seeds())]
    claims = (tmp_path / "sweep" / "report" / "report.md").read_text().split("## Claims")[1]
    for claim in runs[0].claims:
        row = next(line for line in claims.splitlines() if line.startswith(f"| {claim['id']}:"))
        assert any(f"| {v} (" in row for v in ("reproduced", "not reproduced", "inconclusive"))
        assert "complete separation of 5 vs 5 seeds" in row


# ---------------------------------------------------------------- the results table
def _table_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("presets_table", REPO / "scripts" / "presets_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_presets_table_is_the_rendering_of_the_kept_reports():
    """docs/presets.md's table types no verdict or number: it is what the script renders from
    docs/results/*/claims.csv and reproduce.json, as they are committed."""
    assert _table_script().main(["--check"]) == 0


def test_a_kept_report_becomes_a_row_with_its_verdicts_numbers_seeds_and_times(tmp_path, monkeypatch):
    import json

    from helpers import run_main, sweep_of

    claim = {"id": "bn_better", "text": "BN ends higher", "source": "a paper", "metric": "test/acc",
             "better": {"norm": "bn"}, "than": {"norm": "none"}}
    sweep = sweep_of(tmp_path / "sweep", {"bn": [0.91, 0.92, 0.93, 0.94, 0.95],
                                          "none": [0.51, 0.52, 0.53, 0.54, 0.55]}, [claim])
    assert run_main([str(sweep), "--out", str(sweep / "report")])[0] == 0
    (sweep / "report" / "reproduce.json").write_text(json.dumps(
        {"preset": "made_up", "seeds": "0,1,2,3,4", "n_jobs": 2, "overrides": ["data=digits"],
         "wall_s": 90.0, "cpu_s": 150.0}))
    script = _table_script()
    page = tmp_path / "presets.md"
    page.write_text(f"intro\n{script.START}\nold table\n{script.END}\nrest\n")
    monkeypatch.setattr(script, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(script, "PAGE", page)
    monkeypatch.setattr(script, "REPO", tmp_path)
    assert script.main(["--collect", str(sweep)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "old table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `made_up`"))
    assert "`scripts/reproduce.sh made_up data=digits`" in row and "| 0, 1, 2, 3, 4 |" in row
    assert "1.5 min (2.5 min of CPU, 2 jobs)" in row
    assert "`bn_better` **reproduced** (norm=bn 0.93 ± 0.0158 vs norm=none 0.53 ± 0.0158; p = 0.004)" in row
    assert script.main(["--check"]) == 0
    page.write_text(text.replace("**reproduced**", "**not reproduced**"))  # a verdict typed by hand
    assert script.main(["--check"]) == 1
