"""intrinsic-gpt study: the d90 convention, fast-run sanity (start points, baselines, trainable counts), outputs."""
import dataclasses
import json
import math

import numpy as np
import pytest

from minilora import backend
from minilora.experiments import common, intrinsic_gpt
from minilora.intrinsic import SubspaceModel
from minilora.pretrained import load_pretrained
from minilora.train import TrainConfig, fit


@pytest.fixture(scope="module")
def result():
    return intrinsic_gpt.run(fast=True, seed=0)


def test_threshold_crossing_convention():
    xs = [10, 100, 1000, 10000]
    # full performance 1.0 -> threshold 0.9, crossed between 100 (0.5) and 1000 (1.3): halfway in log d
    x, how = intrinsic_gpt.threshold_crossing(xs, [0.1, 0.5, 1.3, 1.0], 1.0)
    assert how == "interpolated" and x == pytest.approx(10 ** 2.5)
    # exactly at a sweep point
    x, how = intrinsic_gpt.threshold_crossing(xs, [0.0, 0.45, 0.9, 0.95], 1.0)
    assert how == "interpolated" and x == pytest.approx(1000)
    # the first point already reaches it
    assert intrinsic_gpt.threshold_crossing(xs, [0.95, 0.2, 0.3, 0.4], 1.0) == (10.0, "first point")
    # none reaches it
    assert intrinsic_gpt.threshold_crossing(xs, [0.1, 0.2, 0.3, 0.89], 1.0) == (None, "> max")
    # the first crossing counts, even if a later point falls back below
    x, _ = intrinsic_gpt.threshold_crossing(xs, [0.0, 0.9, 0.1, 1.0], 1.0, fraction=0.9)
    assert x == pytest.approx(100)
    assert intrinsic_gpt.describe_crossing(None, "> max", xs) == "> 10000"
    assert intrinsic_gpt.describe_crossing(10.0, "first point", xs).startswith("<= 10")
    with pytest.raises(ValueError):
        intrinsic_gpt.threshold_crossing([100, 10], [0.1, 0.2], 1.0)
    with pytest.raises(ValueError):
        intrinsic_gpt.threshold_crossing([10, 100], [0.1], 1.0)


def test_fast_run_has_finite_losses_and_both_baselines(result):
    assert result.ds == list(intrinsic_gpt.FAST_D_VALUES) and result.ranks == list(intrinsic_gpt.FAST_RANKS)
    for kind in ("pretrained", "random"):
        assert math.isfinite(result.start_loss[kind]) and math.isfinite(result.full_loss[kind])
        assert result.full_performance[kind] == pytest.approx(result.start_loss[kind] - result.full_loss[kind])
        assert result.full_loss[kind] < result.start_loss[kind]
    # the random model starts near ln(vocab) and far above the pretrained one
    assert result.start_loss["random"] > result.start_loss["pretrained"] + 1.0
    for label in intrinsic_gpt.CONFIGS:
        assert len(result.subspace_loss[label]) == len(result.ds)
        assert np.isfinite(result.subspace_loss[label]).all()
        assert label in result.d90 and result.d90_how[label] in ("interpolated", "first point", "> max")
    assert np.isfinite(result.lora_loss).all() and len(result.lora_loss) == len(result.ranks)
    json.dumps(dataclasses.asdict(result), allow_nan=False)


def test_subspace_runs_start_exactly_at_the_untouched_model(result):
    for label, (kind, _) in intrinsic_gpt.CONFIGS.items():
        assert result.subspace_start[label] == [result.start_loss[kind]] * len(result.ds)
    settings = common.RunSettings(**result.settings)
    assert result.start_loss["pretrained"] == common.pretrained_val_loss(settings)


def test_only_theta_d_and_lambdas_are_trainable(result):
    for label, (_, said) in intrinsic_gpt.CONFIGS.items():
        expected = [d + (result.n_tensors if said else 0) for d in result.ds]
        assert result.subspace_trainable[label] == expected
    assert result.D == sum(p.size for p in load_pretrained().parameters(trainable_only=True))


@pytest.mark.parametrize("said", [False, True])
def test_trained_weights_are_theta0_plus_lambda_P_theta_d(said):
    """After a few steps, every wrapped weight equals theta_0 + lambda_i (P theta_d)_i: nothing else moved."""
    model = load_pretrained(dropout=0.0)
    theta0 = [backend.to_numpy(p.data).astype(np.float64).copy() for p in model.parameters(trainable_only=True)]
    wrapper = SubspaceModel(model, 64, "fastfood", said=said, seed=0)
    fit(wrapper, common.downstream().train, None,
        TrainConfig(steps=3, batch_size=2, lr=0.1, min_lr=0.01, warmup_steps=0, weight_decay=0.0, eval_every=0,
                    checkpoint_every=0, quiet=True))
    theta_d = backend.to_numpy(wrapper.theta_d.data)
    assert np.abs(theta_d).max() > 0
    wrapper._write_weights()
    offset = backend.to_numpy(wrapper._projection.project(wrapper.theta_d.data)).astype(np.float64)
    lambdas = backend.to_numpy(wrapper.lambdas.data) if said else np.ones(len(theta0))
    if said:
        assert not np.allclose(lambdas, 1.0)
    start = 0
    for p, p0, lam in zip(model.parameters(trainable_only=True), theta0, lambdas):
        piece = offset[start:start + p.size].reshape(p.shape)
        start += p.size
        np.testing.assert_allclose(backend.to_numpy(p.data), p0 + lam * piece, rtol=1e-5, atol=1e-6)
    assert start == wrapper.D


def test_summary_has_the_numbers(result):
    text = intrinsic_gpt.summary(result)
    for kind in ("pretrained", "random"):
        assert f"start {result.start_loss[kind]:.4f}" in text and f"full FT {result.full_loss[kind]:.4f}" in text
    for label in intrinsic_gpt.CONFIGS:
        assert label in text
        for loss in result.subspace_loss[label]:
            assert f"{loss:.4f}" in text
        assert intrinsic_gpt.describe_crossing(result.d90[label], result.d90_how[label], result.ds) in text
    for loss in result.lora_loss:
        assert f"{loss:.4f}" in text
    assert "d90" in text and "performance = starting loss - trained loss" in text


def test_plot_writes_a_png(result, tmp_path):
    path = tmp_path / "plot.png"
    intrinsic_gpt.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
