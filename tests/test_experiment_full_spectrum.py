"""Full fine-tuning's Delta W: the spectrum measures on matrices with known answers, and a fast run of the study."""
import dataclasses
import json

import numpy as np
import pytest

from minilora.experiments import full_spectrum as fs
from minilora.experiments import rank_basics as rb

S = np.array([4.0, 2.0, 2.0, 1.0, 0.0])          # sum of squares 25


def test_energy_fraction_of_known_singular_values():
    assert fs.energy_fraction(S, 1) == pytest.approx(16 / 25, abs=1e-15)
    assert fs.energy_fraction(S, 2) == pytest.approx(20 / 25, abs=1e-15)
    assert fs.energy_fraction(S, 4) == pytest.approx(1.0, abs=1e-15)
    assert fs.energy_fraction(S, 5) == 1.0
    assert fs.energy_fraction(S[::-1], 1) == pytest.approx(16 / 25)     # the order of S does not matter
    with pytest.raises(ValueError):
        fs.energy_fraction(np.zeros(3), 1)


def test_stable_rank_of_known_matrices():
    M = rb.matrix_with_singular_values(8, 6, S, seed=0)
    assert abs(fs.stable_rank(M) - 25 / 16) < 1e-12
    assert fs.stable_rank(np.eye(5)) == pytest.approx(5.0)                       # all singular values equal
    assert fs.stable_rank(np.outer([1.0, 2.0, 3.0], [1.0, -1.0])) == pytest.approx(1.0)   # rank one
    assert fs.stable_rank(3.0 * M) == pytest.approx(fs.stable_rank(M))           # scale-free
    with pytest.raises(ValueError):
        fs.stable_rank(np.zeros((3, 3)))


def test_energy_measures_agree_with_the_singular_values():
    M = rb.matrix_with_singular_values(8, 6, S, seed=1)
    np.testing.assert_allclose(fs.singular_values(M), np.r_[S, 0.0], atol=1e-12)
    report = fs.spectrum_report(M, ranks=(1, 2))
    assert report["energy"] == pytest.approx([16 / 25, 20 / 25])
    assert report["stable_rank"] == pytest.approx(25 / 16)
    assert report["rank_90"] == 3 == fs.rank_for_energy(S, 0.9)     # 16 + 4 + 4 = 24 of 25 = 96%
    assert fs.rank_for_energy(S, 0.8) == 2                           # exactly 80% at r = 2


def test_a_gaussian_reference_has_the_shape_and_norm_and_a_flat_spectrum():
    M = rb.matrix_with_singular_values(128, 128, [3.0, 1.0], seed=2)
    R = fs.gaussian_like(M, np.random.default_rng(0))
    assert R.shape == M.shape and np.linalg.norm(R) == pytest.approx(np.linalg.norm(M))
    assert 25 < fs.stable_rank(R) < 40             # Marchenko-Pastur: about 128 * 128 / (2 sqrt(128))^2 = 32


def test_weight_names_cover_attention_and_mlp():
    names = fs.weight_names(2)
    assert len(names) == 12 and names[0] == "h.0.attn.q_proj.weight" and names[5] == "h.0.mlp.proj.weight"


@pytest.fixture(scope="module")
def result():
    return fs.run(fast=True, seed=0)


def test_fast_run_finds_the_update_concentrated_in_few_directions(result):
    assert result.steps == 6 and len(result.names) == 24
    assert result.val_after < result.val_before
    c = fs.counts(result)
    assert c["top1_above_random"] >= 20                  # nearly all 24; room for another BLAS's rounding
    assert c["stable_rank_below_random"] >= 22
    for name in result.names:
        w = result.weights[name]
        assert 0 < w["relative_update"] < 0.5
        assert w["random"]["energy"][0] < 0.05            # a Gaussian's top direction holds little
        assert all(a <= b + 1e-12 for a, b in zip(w["delta"]["energy"], w["delta"]["energy"][1:]))
    mean = lambda key, f: np.mean([f(result.weights[n][key]) for n in result.names])
    assert mean("delta", lambda s: s["stable_rank"]) < 0.5 * mean("random", lambda s: s["stable_rank"])
    assert mean("delta", lambda s: s["energy"][0]) > 2 * mean("random", lambda s: s["energy"][0])


def test_result_is_json_plot_and_summary(result, tmp_path):
    json.dumps(dataclasses.asdict(result))
    fs.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = fs.summary(result)
    c = fs.counts(result)
    assert f"{c['top1_above_random']}/24" in text and f"{result.val_after:.4f}" in text
    w = result.weights["h.0.attn.q_proj.weight"]
    assert f"{w['delta']['stable_rank']:.1f}" in text and f"{w['delta']['energy'][0]:.3f}" in text
