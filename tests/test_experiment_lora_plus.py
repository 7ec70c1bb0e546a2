"""LoRA+ study: the protocol (eta_A tuned on dev for every lambda, reports on test seeds at that rate), the curves
and the steps-to-target measure, the verdict logic on synthetic intervals, and the outputs."""
import dataclasses
import json

import numpy as np
import pytest

from helpers import record_protocol_runs
from minilora.experiments import STUDIES, common, lora_plus, protocol


@pytest.fixture(scope="module")
def recorded():
    """The fast study with every training run checked against the protocol and recorded: (result, calls)."""
    return record_protocol_runs(lora_plus.run, seed=0)


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_the_study_is_registered():
    assert STUDIES["lora-plus"] == "lora_plus"


def test_every_lambda_tunes_eta_A_on_dev_and_reports_on_test_at_that_rate(recorded):
    result, calls = recorded
    assert result.ratios == list(lora_plus.FAST_RATIOS) and [t["ratio"] for t in result.tuned] == result.ratios
    centre = common.RunSettings().lora_lr
    for tuned in result.tuned:
        mine = [c for c in calls if c["loraplus_ratio"] == tuned["ratio"]]
        assert all(c["r"] == lora_plus.R and c["targets"] == lora_plus.TARGETS for c in mine)
        dev = {float(lr): v for lr, v in tuned["dev_scores"].items()}
        assert {float(f"{c['lr']:g}") for c in mine if c["part"] == "dev"} == set(dev)
        assert all(c["seed"] == protocol.SELECTION_SEED for c in mine if c["part"] == "dev")
        assert tuned["lr"] == min(dev, key=dev.get) and tuned["lr_B"] == pytest.approx(tuned["lr"] * tuned["ratio"])
        first = protocol.LR_SERIES.index(centre)      # the first grid: centred on the previous lambda's choice
        assert set(protocol.LR_SERIES[first - 1:first + 2]) <= set(dev)
        centre = tuned["lr"]
        reports = [c for c in mine if c["part"] == "test"]
        assert sorted(c["seed"] for c in reports) == list(protocol.FAST_REPORT_SEEDS)
        assert all(c["lr"] == tuned["lr"] and c["eval_every"] == lora_plus.FAST_CURVE_EVAL_EVERY for c in reports)
        assert all(c["eval_every"] == 0 for c in mine if c["part"] == "dev")
    assert all(c["loraplus_ratio"] is not None for c in calls)


def test_curves_start_at_the_pretrained_loss_and_end_at_the_reported_loss(result):
    steps = result.settings["steps"]
    expected = [0] + list(range(lora_plus.FAST_CURVE_EVAL_EVERY, steps + 1, lora_plus.FAST_CURVE_EVAL_EVERY))
    for tuned in result.tuned:
        assert len(tuned["curves"]) == len(protocol.FAST_REPORT_SEEDS)
        for curve, loss in zip(tuned["curves"], tuned["losses"]):
            points = np.array(curve, dtype=float)
            assert points[:, 0].tolist() == expected and np.isfinite(points[:, 1]).all()
            assert points[0, 1] == pytest.approx(result.pretrained_loss, rel=1e-6)
            assert points[-1, 1] == loss


def test_steps_to_target_interpolates_the_first_crossing():
    curve = [[0, 2.0], [10, 1.8], [20, 1.5], [30, 1.2], [40, 1.6]]
    assert lora_plus.steps_to(curve, 1.65) == pytest.approx(15.0)
    assert lora_plus.steps_to(curve, 1.8) == 10.0
    assert lora_plus.steps_to(curve, 2.5) == 0.0
    assert lora_plus.steps_to(curve, 1.0) is None


def test_target_is_half_of_plain_loras_improvement(result):
    plain = next(t for t in result.tuned if t["ratio"] == 1)
    assert result.target_loss == pytest.approx(result.pretrained_loss - 0.5 * (result.pretrained_loss -
                                                                                 np.mean(plain["losses"])))
    for tuned in result.tuned:
        assert tuned["steps_to_target"] == [lora_plus.steps_to(c, result.target_loss) for c in tuned["curves"]]


def _interval(values):
    return dataclasses.asdict(protocol.interval(values))


def _synthetic(lp_loss, plain_loss, lp_steps, plain_steps, dev_choice=16):
    def tuned(ratio, losses, steps):
        return {"ratio": ratio, "lr": 0.01, "lr_B": 0.01 * ratio, "interior": True, "dev_scores": {"0.01": 1.5},
                "test": _interval(losses), "losses": losses, "curves": [[[0, 2.0], [6, x]] for x in losses],
                "steps_to_target": steps, "steps_interval": None if None in steps else _interval(steps)}

    result = lora_plus.LoraPlusResult(ratios=[1, 16], r=4, alpha=8.0, targets=["q_proj"],
                                      settings={"steps": 6, "batch_size": 4}, curve_settings={"eval_every": 2},
                                      pretrained_loss=2.0, target_loss=1.8,
                                      tuned=[tuned(1, plain_loss, plain_steps), tuned(16, lp_loss, lp_steps)],
                                      dev_choice={"ratio": dev_choice, "lr": 0.01, "dev": 1.5})
    result.findings = lora_plus.findings_of(result)
    return result, [f["verdict"] for f in result.findings]


def test_verdicts_follow_the_intervals():
    _, apart = _synthetic([1.0, 1.01, 1.02], [1.2, 1.21, 1.22], [2.0, 2.1, 2.2], [4.0, 4.1, 4.2])
    assert apart == ["lambda=16 better"] * 3
    _, worse = _synthetic([1.2, 1.21, 1.22], [1.0, 1.01, 1.02], [4.0, 4.1, 4.2], [2.0, 2.1, 2.2])
    assert worse == ["lambda=1 better"] * 3
    _, overlapping = _synthetic([1.0, 1.3, 1.1], [1.2, 1.0, 1.1], [2.0, 4.0, 3.0], [3.0, 2.5, 3.5])
    assert overlapping == [protocol.NOT_DISTINGUISHABLE] * 3
    _, unreached = _synthetic([1.0, 1.01, 1.02], [1.2, 1.21, 1.22], [2.0, None, 2.2], [4.0, 4.1, 4.2], dev_choice=1)
    assert unreached[1].startswith("not measurable") and unreached[2].startswith("lambda = 1 chosen on dev")


def test_protocol_and_findings_are_recorded(result):
    record = result.protocol
    assert record["selection_seed"] == protocol.SELECTION_SEED
    assert record["report_seeds"] == list(protocol.FAST_REPORT_SEEDS)
    assert record["split"]["corpus"] == common.split().name
    assert set(record["tuning"]) == {f"lambda={r}" for r in result.ratios}
    assert result.dev_choice["ratio"] in result.ratios
    assert len(result.findings) == 3
    for f in result.findings:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == lora_plus.STUDY


def test_result_is_json_ready_and_summarised(result):
    json.dumps(dataclasses.asdict(result), allow_nan=False)
    text = lora_plus.summary(result)
    assert "eta_A chosen on dev" in text and str(list(protocol.FAST_REPORT_SEEDS)) in text
    for tuned in result.tuned:
        assert protocol.as_interval(tuned["test"]).text() in text
    for f in result.findings:
        assert f["verdict"] in text
    assert f"pretrained {result.pretrained_loss:.4f}" in text and f"target loss {result.target_loss:.4f}" in text


def test_plot_writes_a_png(result, tmp_path):
    path = tmp_path / "plot.png"
    lora_plus.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    synthetic, _ = _synthetic([1.0, 1.01, 1.02], [1.2, 1.21, 1.22], [2.0, None, 2.2], [4.0, 4.1, 4.2])
    lora_plus.plot(synthetic, str(tmp_path / "unreached.png"))
    assert (tmp_path / "unreached.png").stat().st_size > 1000
