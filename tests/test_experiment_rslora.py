"""rsLoRA study: the scales it trains with, the shape and start of its curves, robust fast-mode findings, outputs."""
import dataclasses
import json
import math

import numpy as np
import pytest

from minilora.experiments import common, rslora
from minilora.pretrained import load_pretrained
from minilora.train import evaluate


@pytest.fixture(scope="module")
def result():
    return rslora.run(fast=True, seed=0)


def test_scale_for_is_alpha_over_r_or_over_sqrt_r():
    for r in (1, 4, 16, 64):
        assert rslora.scale_for("standard", r, 8.0) == pytest.approx(8.0 / r)
        assert rslora.scale_for("rslora", r, 8.0) == pytest.approx(8.0 / math.sqrt(r))
    with pytest.raises(ValueError, match="unknown scaling"):
        rslora.scale_for("alpha", 4, 8.0)


def test_runs_trained_with_the_scale_of_their_scaling(result):
    """result.scales is read from the trained models' LoRALinear.scale, not computed from the config."""
    assert result.ranks == list(rslora.FAST_RANKS) and result.alpha == rslora.ALPHA
    for i, r in enumerate(result.ranks):
        assert result.scales["standard"][i] == pytest.approx(result.alpha / r)
        assert result.scales["rslora"][i] == pytest.approx(result.alpha / math.sqrt(r))


def test_every_curve_starts_at_the_pretrained_loss_and_learns(result):
    steps = result.settings["steps"]
    expected_steps = [0] + list(range(rslora.FAST_EVAL_EVERY, steps + 1, rslora.FAST_EVAL_EVERY))
    for scaling in rslora.SCALINGS:
        assert len(result.curves[scaling]) == len(result.ranks)
        for curve, final in zip(result.curves[scaling], result.final_loss[scaling]):
            points = np.array(curve, dtype=float)
            assert points[:, 0].tolist() == expected_steps
            assert np.isfinite(points[:, 1]).all()
            assert points[0, 1] == result.pretrained_loss
            assert points[-1, 1] == final < result.pretrained_loss
    # step 0 is measured on the windows the later points use (fit's batch size), not FinetuneRun's val_before
    settings = common.RunSettings(**result.settings)
    assert result.pretrained_loss == pytest.approx(evaluate(load_pretrained(dropout=0.0), common.downstream().val,
                                                            batch_size=settings.batch_size,
                                                            max_batches=settings.eval_batches), rel=1e-6)


def test_rank_one_is_one_run_for_both_scalings(result):
    assert result.shared == [1]
    assert result.curves["standard"][0] == result.curves["rslora"][0]
    assert result.update_norm["standard"][0] == result.update_norm["rslora"][0]


def test_rslora_moves_further_and_learns_faster_at_the_larger_rank(result):
    """Findings that hold at the fast size whatever the seed: with Adam, B is nearly the same in both runs early
    on, so ||dW|| differs by about the ratio of the scales, sqrt(r) (a little less once A moves too, hence the
    bounds); and rsLoRA's larger steps give a lower final loss at the larger rank."""
    r = result.ranks[-1]
    ratio = result.update_norm["rslora"][-1] / result.update_norm["standard"][-1]
    assert 0.6 * math.sqrt(r) < ratio < 1.1 * math.sqrt(r)
    assert result.final_loss["rslora"][-1] < result.final_loss["standard"][-1]
    assert result.rank_gain["rslora"] < result.rank_gain["standard"]
    for scaling, losses in result.final_loss.items():
        assert result.rank_gain[scaling] == pytest.approx(losses[-1] - losses[0])


def test_result_is_json_ready(result):
    json.dumps(dataclasses.asdict(result), allow_nan=False)


def test_summary_has_the_numbers(result):
    text = rslora.summary(result)
    for scaling in rslora.SCALINGS:
        for loss, norm in zip(result.final_loss[scaling], result.update_norm[scaling]):
            assert f"{loss:.4f}" in text and f"{norm:.3f}" in text
        assert f"{result.rank_gain[scaling]:+.4f}" in text
        assert all(f" {s:.3g} " in text for s in result.scales[scaling])
    assert f"pretrained {result.pretrained_loss:.4f}" in text


def test_plot_writes_a_png(result, tmp_path):
    path = tmp_path / "plot.png"
    rslora.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rslora.plot(result, str(tmp_path / "as_str.png"))
    assert (tmp_path / "as_str.png").stat().st_size > 1000
