"""Rank basics: the measures on matrices with known answers, and the study end to end."""
import json

import numpy as np
import pytest

from minilora.experiments import rank_basics as rb


def built(s, shape=(9, 7), seed=3):
    """A matrix U diag(s) V^T with exactly the singular values s (and zeros after them)."""
    return rb.matrix_with_singular_values(*shape, s, seed=seed)


S = np.array([6.0, 4.0, 2.5, 1.0, 0.3, 0.0])


def test_rank_of_the_identity_and_of_a_rank_deficient_matrix():
    assert rb.numerical_rank(np.eye(3)) == 3
    assert rb.numerical_rank(np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]])) == 2
    assert rb.numerical_rank(np.zeros((4, 5))) == 0
    assert rb.numerical_rank(np.outer(np.arange(1.0, 5.0), np.arange(1.0, 7.0))) == 1


def test_numerical_rank_counts_singular_values_above_numpys_tolerance():
    M = built(S)
    assert rb.numerical_rank(M) == 5 == np.linalg.matrix_rank(M)
    S_M = np.linalg.svd(M, compute_uv=False)
    assert rb.default_tolerance(M) == pytest.approx(S_M.max() * max(M.shape) * np.finfo(np.float64).eps)
    # noise above the default tolerance makes it full rank; a tolerance above the noise finds the rank again
    noisy = M + 1e-9 * np.random.default_rng(0).standard_normal(M.shape)
    assert rb.numerical_rank(noisy) == 7            # 9 x 7: full rank
    assert rb.numerical_rank(noisy, tol=1e-6) == 5
    assert rb.numerical_rank(M, tol=1.5) == 3           # 6, 4, 2.5 lie above 1.5


@pytest.mark.parametrize("r", range(len(S) + 1))
def test_eckart_young_errors_are_the_tail_singular_values(r):
    M = built(S)
    M_r, fro, spectral = rb.best_rank_r(M, r)
    assert M_r.shape == M.shape
    assert rb.numerical_rank(M_r) == min(r, 5)
    assert abs(fro - np.sqrt(np.sum(S[r:] ** 2))) < 1e-12
    assert abs(spectral - (S[r] if r < len(S) else 0.0)) < 1e-12
    assert rb.eckart_young_errors(S, r) == pytest.approx((np.sqrt(np.sum(S[r:] ** 2)), S[r] if r < len(S) else 0.0),
                                                         abs=1e-15)


def test_the_truncated_svd_beats_another_rank_r_approximation():
    M = built(S)
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((M.shape[1], 2)))   # 2 random directions
    _, fro, spectral = rb.best_rank_r(M, 2)
    assert fro < np.linalg.norm(M - M @ Q @ Q.T)
    assert spectral <= np.linalg.norm(M - M @ Q @ Q.T, 2)


def test_best_rank_r_rejects_a_rank_outside_the_matrix():
    with pytest.raises(ValueError, match="rank r"):
        rb.best_rank_r(np.eye(3), 4)


def test_lora_parameter_count_is_r_times_d_plus_k():
    assert rb.lora_parameter_count(128, 128, 8) == 2048
    assert rb.lora_parameter_count(128, 512, 4) == 4 * 640
    assert rb.lora_parameter_count(3, 5, 1) == 8
    assert rb.break_even_rank(128, 128) == 64
    assert rb.lora_parameter_count(128, 128, 64) == 128 * 128


@pytest.fixture(scope="module")
def result():
    return rb.run(fast=True, seed=0)


def test_the_study_reproduces_the_known_answers(result):
    assert result.identity_rank == 3 and result.deficient_rank == 2
    assert result.noisy_rank_default_tol == 3 and result.noisy_rank_loose_tol == 2
    assert result.constructed_rank == 6
    assert result.eckart_young_max_discrepancy < 1e-12
    assert result.weight_eckart_young_max_discrepancy < 1e-10
    attention = result.parameter_counts["attention 128x128"]
    assert attention["lora"] == [r * 256 for r in rb.RANKS] and attention["full"] == 16384


def test_the_pretrained_weight_is_full_rank_but_approximately_low_rank(result):
    assert result.weight_shape == [128, 128]
    assert result.weight_numerical_rank == 128
    curve = result.relative_error
    assert curve["weight"][0] == pytest.approx(1.0) and curve["weight"][-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(curve["weight"], curve["weight"][1:]))      # decreasing in r
    for r in (4, 16, 32):   # a trained weight has more structure than a Gaussian; the SVD beats random directions
        assert curve["weight"][r] < curve["random"][r] - 0.05
        assert curve["weight"][r] < curve["weight_random_projection"][r]
    assert result.rank_needed["weight"]["0.5"] < result.rank_needed["random"]["0.5"]


def test_every_exact_fact_holds_and_nothing_is_selected(result):
    assert [f["verdict"] for f in result.findings] == ["holds"] * 4
    for f in result.findings:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "rank-basics"
    assert result.protocol["training"] == "none" and result.protocol["selection"].startswith("none")


@pytest.mark.parametrize("field, wrong", [("deficient_rank", 3), ("eckart_young_max_discrepancy", 1e-6),
                                          ("weight_numerical_rank", 127)])
def test_a_fact_that_fails_is_reported_as_not_holding(result, field, wrong):
    import dataclasses

    broken = rb.findings(dataclasses.replace(result, **{field: wrong}))
    assert "does not hold" in [f["verdict"] for f in broken]


def test_result_is_json_plot_and_summary(result, tmp_path):
    import dataclasses

    json.dumps(dataclasses.asdict(result))
    rb.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = rb.summary(result)
    assert "rank(I_3) = 3" in text and "16,384" in text and "cheaper below r = 64.0" in text
    assert f"numerical rank {result.weight_numerical_rank}" in text
    assert f"{result.relative_error['weight'][8]:.3f}" in text
    for f in result.findings:
        assert f"{f['claim']}: {f['verdict']}" in text
