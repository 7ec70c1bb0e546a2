"""rsLoRA study: the protocol (selection on dev only, reports on test seeds, one fixed rate for the curves), the
scales it trains with, the curves, the verdict logic on synthetic intervals, and the outputs."""
import dataclasses
import json
import math

import numpy as np
import pytest

from helpers import record_protocol_runs
from minilora.experiments import common, protocol, rslora


@pytest.fixture(scope="module")
def recorded():
    """The fast study, with every training run checked against the protocol and recorded, and every scored part
    recorded: (result, calls, parts)."""
    parts = []
    held_out = common.held_out

    def recording_held_out(part):
        parts.append(part)
        return held_out(part)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "held_out", recording_held_out)
        result, calls = record_protocol_runs(rslora.run, seed=0)
    return result, calls, parts


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_scale_for_is_alpha_over_r_or_over_sqrt_r():
    for r in (1, 4, 16, 64):
        assert rslora.scale_for("standard", r, 8.0) == pytest.approx(8.0 / r)
        assert rslora.scale_for("rslora", r, 8.0) == pytest.approx(8.0 / math.sqrt(r))
    with pytest.raises(ValueError, match="unknown scaling"):
        rslora.scale_for("alpha", 4, 8.0)


def test_ratio_ranks_are_the_first_rank_where_the_rules_differ_and_the_largest():
    assert rslora.ratio_ranks(rslora.RANKS) == (4, 64)
    assert rslora.ratio_ranks(rslora.FAST_RANKS) == (4, 16)
    with pytest.raises(ValueError, match="start at 1"):
        rslora.ratio_ranks((2, 4, 8))


def test_selection_reads_dev_only_and_reports_read_test_seeds_only(recorded):
    result, calls, parts = recorded
    assert set(parts) <= {"dev", "test"}
    for call in calls:
        if call["seed"] == protocol.SELECTION_SEED:
            assert call["part"] == "dev", call
        else:
            assert call["part"] == "test" and call["seed"] in protocol.FAST_REPORT_SEEDS, call
    # the tuned runs report at the rate chosen on dev, one run per reporting seed
    for scaling, use_rslora in rslora.SCALINGS.items():
        for r, tuned in zip(result.ranks, result.tuned[scaling]):
            if scaling == "rslora" and r in result.shared:
                continue
            dev = {float(lr): v for lr, v in tuned["dev_scores"].items()}
            assert tuned["lr"] == min(dev, key=dev.get)
            mine = [c for c in calls if c["r"] == r and c["use_rslora"] == use_rslora and c["eval_every"] == 0]
            assert {float(f"{c['lr']:g}") for c in mine if c["part"] == "dev"} == set(dev)
            reports = [c for c in mine if c["part"] == "test"]
            assert sorted(c["seed"] for c in reports) == list(protocol.FAST_REPORT_SEEDS)
            assert all(c["lr"] == tuned["lr"] for c in reports)
            assert len(tuned["losses"]) == len(protocol.FAST_REPORT_SEEDS)


def test_curves_use_one_fixed_rate_the_one_tuned_at_rank_one(recorded):
    result, calls, _ = recorded
    assert result.ranks[0] == 1 and result.fixed_lr == result.tuned["standard"][0]["lr"]
    curve_calls = [c for c in calls if c["eval_every"] == rslora.FAST_CURVE_EVAL_EVERY]
    assert curve_calls and all(c["lr"] == result.fixed_lr and c["part"] == "test" for c in curve_calls)
    # r = 1: one run per seed for both rules (the same scale); every other rank: one per rule per seed
    expected = len(protocol.FAST_REPORT_SEEDS) * (2 * len(result.ranks) - len(result.shared))
    assert len(curve_calls) == expected


def test_runs_trained_with_the_scale_of_their_scaling(result):
    """result.scales is read from the trained models' LoRALinear.scale, not computed from the config."""
    assert result.ranks == list(rslora.FAST_RANKS) and result.alpha == rslora.ALPHA
    for i, r in enumerate(result.ranks):
        assert result.scales["standard"][i] == pytest.approx(result.alpha / r)
        assert result.scales["rslora"][i] == pytest.approx(result.alpha / math.sqrt(r))


def test_every_curve_starts_at_the_pretrained_test_loss(result):
    steps = result.curve_settings["steps"]
    expected_steps = [0] + list(range(rslora.FAST_CURVE_EVAL_EVERY, steps + 1, rslora.FAST_CURVE_EVAL_EVERY))
    for scaling in rslora.SCALINGS:
        assert len(result.curves[scaling]) == len(result.ranks)
        for per_seed, final, gain in zip(result.curves[scaling], result.final_loss[scaling],
                                         result.improvement[scaling]):
            assert len(per_seed) == len(protocol.FAST_REPORT_SEEDS)
            for curve in per_seed:
                points = np.array(curve, dtype=float)
                assert points[:, 0].tolist() == expected_steps
                assert np.isfinite(points[:, 1]).all()
                assert points[0, 1] == pytest.approx(result.pretrained_loss, rel=1e-6)
            finals = [curve[-1][1] for curve in per_seed]
            assert final["values"] == finals
            assert gain["values"] == pytest.approx([result.pretrained_loss - f for f in finals])
    settings = common.RunSettings(**result.settings)
    assert result.pretrained_loss == pytest.approx(common.pretrained_val_loss(settings, "test"), rel=1e-6)


def test_rank_one_is_one_run_for_both_scalings(result):
    assert result.shared == [1]
    assert result.curves["standard"][0] == result.curves["rslora"][0]
    assert result.tuned["standard"][0] == result.tuned["rslora"][0]
    assert not any(f["claim"].startswith("r=1:") for f in result.findings)


def test_rank_gain_ratio_is_paired_by_seed(result):
    ref, hi = (result.ranks.index(r) for r in result.ratio_ranks)
    for scaling in rslora.SCALINGS:
        gains = [[result.pretrained_loss - c[-1][1] for c in result.curves[scaling][k]] for k in (ref, hi)]
        assert result.rank_gain_ratio[scaling]["values"] == pytest.approx([b / a for a, b in zip(*gains)])


def test_rslora_moves_further_early_on(result):
    """With Adam, B is nearly the same in both runs early on, so ||dW|| differs by about the ratio of the
    scales, sqrt(r) (a little less once A moves too, hence the bounds)."""
    r = result.ranks[-1]
    ratio = result.update_norm["rslora"][-1] / result.update_norm["standard"][-1]
    assert 0.6 * math.sqrt(r) < ratio < 1.1 * math.sqrt(r)


def _interval(values):
    return dataclasses.asdict(protocol.interval(values))


def _synthetic(rs_test, std_test, rs_ratio, std_ratio):
    """A result at ranks (1, 4) whose r = 4 test losses and rank-gain ratios are the given values per seed."""
    r1 = {"lr": 0.01, "test": _interval([1.5, 1.6]), "interior": True, "dev_scores": {"0.01": 1.5}}
    tuned = {"standard": [r1, {**r1, "test": _interval(std_test)}], "rslora": [r1, {**r1, "test": _interval(rs_test)}]}
    result = rslora.RsLoRAResult(ranks=[1, 4], alpha=8.0, targets=["q_proj"], pretrained_loss=2.0, tuned=tuned,
                                 shared=[1], fixed_lr=0.01, ratio_ranks=[4, 4],
                                 rank_gain_ratio={"standard": _interval(std_ratio), "rslora": _interval(rs_ratio)})
    result.tuned_verdicts = [protocol.verdict(tuned["rslora"][i]["test"], tuned["standard"][i]["test"], "rsLoRA",
                                              "standard", True) for i in range(2)]
    return {f["claim"]: f["verdict"] for f in rslora.findings_of(result)}


def test_verdicts_follow_the_intervals():
    apart = _synthetic([1.0, 1.01, 1.02], [1.2, 1.21, 1.22], [2.0, 2.1, 2.2], [0.5, 0.55, 0.6])
    tuned_claim = next(c for c in apart if c.startswith("r=4:"))
    assert apart[tuned_claim] == "rsLoRA better"
    ratios = [v for c, v in apart.items() if "improvement over the pretrained" in c]
    assert ratios == ["below 1", "above 1"]              # standard first, then rsLoRA
    assert next(v for c, v in apart.items() if "rsLoRA vs standard" in c and "ratio" in c) == "rsLoRA better"

    overlapping = _synthetic([1.0, 1.3, 1.1], [1.2, 1.0, 1.1], [0.5, 1.5, 1.0], [0.9, 1.1, 1.0])
    assert set(overlapping.values()) == {protocol.NOT_DISTINGUISHABLE}


def test_protocol_and_findings_are_recorded(result):
    record = result.protocol
    assert record["selection_seed"] == protocol.SELECTION_SEED
    assert record["report_seeds"] == list(protocol.FAST_REPORT_SEEDS)
    assert record["split"]["corpus"] == common.split().name
    assert set(record["tuning"]) == {f"{s} r={r}" for r in result.ranks for s in rslora.SCALINGS} - {"rslora r=1"}
    assert len(result.findings) == (len(result.ranks) - 1) + 3
    for f in result.findings:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == rslora.STUDY


def test_result_is_json_ready(result):
    json.dumps(dataclasses.asdict(result), allow_nan=False)


def test_summary_has_the_protocol_numbers_and_findings(result):
    text = rslora.summary(result)
    assert "lr chosen on dev" in text and str(list(protocol.FAST_REPORT_SEEDS)) in text
    for scaling in rslora.SCALINGS:
        for tuned, gain in zip(result.tuned[scaling], result.improvement[scaling]):
            assert protocol.as_interval(tuned["test"]).text() in text
            assert protocol.as_interval(gain).text() in text
        assert protocol.as_interval(result.rank_gain_ratio[scaling]).text(3) in text
    for f in result.findings:
        assert f["verdict"] in text
    assert f"pretrained {result.pretrained_loss:.4f}" in text


def test_plot_writes_a_png(result, tmp_path):
    path = tmp_path / "plot.png"
    rslora.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rslora.plot(result, str(tmp_path / "as_str.png"))
    assert (tmp_path / "as_str.png").stat().st_size > 1000
