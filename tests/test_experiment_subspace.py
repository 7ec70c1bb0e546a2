"""Subspace similarity phi (paper 7.2): known answers on constructed matrices, chance by Monte Carlo, the study."""
import numpy as np
import pytest

from minilora.experiments import subspace


def random_A(r, d, seed):
    return np.random.default_rng(seed).standard_normal((r, d))


def test_phi_of_a_matrix_with_itself_is_one_everywhere():
    A = random_A(6, 20, 0)
    # U_i and U_j are nested pieces of one basis, so the smaller lies in the larger: phi = 1 at every i, j
    np.testing.assert_allclose(subspace.phi_matrix(A, A), 1.0, atol=1e-12)
    # phi depends only on A's right singular vectors: rotating A's rows or rescaling changes nothing
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((6, 6)))
    np.testing.assert_allclose(subspace.phi_matrix(A, 3.0 * Q @ A), 1.0, atol=1e-10)


def test_phi_of_orthogonal_subspaces_is_zero():
    rng = np.random.default_rng(0)
    d = 16
    A1 = np.zeros((4, d))
    A2 = np.zeros((5, d))
    A1[:, :4] = rng.standard_normal((4, 4))        # rows in span(e_1..e_4)
    A2[:, 4:9] = rng.standard_normal((5, 5))       # rows in span(e_5..e_9)
    np.testing.assert_allclose(subspace.phi_matrix(A1, A2), 0.0, atol=1e-12)


def test_phi_known_partial_overlap():
    # A1 reads e_1 (strongly) and e_2; A2 reads e_1 and e_3: the top directions coincide, the second ones do not
    A1 = np.zeros((2, 5))
    A1[0, 0], A1[1, 1] = 2.0, 1.0
    A2 = np.zeros((2, 5))
    A2[0, 0], A2[1, 2] = 3.0, 1.0
    m = subspace.phi_matrix(A1, A2)
    np.testing.assert_allclose(m, [[1.0, 1.0], [1.0, 0.5]], atol=1e-12)
    assert subspace.phi(A1, A2, 2, 2) == pytest.approx(0.5)


def test_phi_is_symmetric_and_in_unit_interval():
    A1, A2 = random_A(4, 30, 0), random_A(7, 30, 1)
    m12, m21 = subspace.phi_matrix(A1, A2), subspace.phi_matrix(A2, A1)
    assert m12.shape == (4, 7)
    np.testing.assert_allclose(m12, m21.T, atol=1e-12)          # phi(A1, A2, i, j) = phi(A2, A1, j, i)
    assert subspace.phi(A1, A2, 3, 5) == pytest.approx(subspace.phi(A2, A1, 5, 3))
    assert (m12 >= 0).all() and (m12 <= 1).all()


def test_phi_checks_its_inputs():
    with pytest.raises(ValueError, match="same input space"):
        subspace.phi_matrix(random_A(2, 10, 0), random_A(2, 11, 1))
    with pytest.raises(ValueError, match="1 <= i"):
        subspace.phi(random_A(2, 10, 0), random_A(3, 10, 1), 3, 1)
    with pytest.raises(ValueError, match="2-D"):
        subspace.subspace_basis(np.zeros(5))


def test_random_expectation_matches_monte_carlo():
    """E phi = max(i, j) / d for uniformly random subspaces: Gaussian A's have Haar-random singular vectors."""
    d, r1, r2, trials = 48, 4, 12, 4000
    rng = np.random.default_rng(0)
    total = np.zeros((r1, r2))
    for _ in range(trials):
        total += subspace.phi_matrix(rng.standard_normal((r1, d)), rng.standard_normal((r2, d)))
    mean = total / trials
    expected = subspace.random_expectation(r1, r2, d)
    assert expected[0, 0] == pytest.approx(1 / d) and expected[2, 9] == pytest.approx(10 / d)
    np.testing.assert_allclose(mean, expected, rtol=0.05)


@pytest.fixture(scope="module")
def fast_result():
    return subspace.run(fast=True, seed=0)


def test_fast_study(fast_result, tmp_path):
    res = fast_result
    assert (res.r_small, res.r_large, res.d) == (8, 32, 128)
    for key, m in res.heatmaps.items():
        m = np.asarray(m)
        assert m.shape == ((8, 32) if key.startswith("ranks") else (8, 8)), key
        assert np.isfinite(m).all() and (m >= 0).all() and (m <= 1).all(), key
    assert len(res.layers["ranks/trained"]) == 8                 # Wq and Wv of 4 layers
    # the control: A at initialisation is random, so phi sits at chance (r1, r2 = 8, 32: max(i, j) / d = 0.25)
    init_all = np.mean([v["all"] for v in res.layers["ranks/init"].values()])
    assert init_all == pytest.approx(res.random["ranks"]["all"], abs=0.03)
    # what training added to A (A - A_init) shares its subspace between r = 8 and r = 32 far beyond chance
    learned_all = np.mean([v["all"] for v in res.layers["ranks/learned"].values()])
    assert learned_all > 1.5 * res.random["ranks"]["all"]
    assert all(v["val_after"] < v["val_before"] for v in res.runs.values())
    text = subspace.summary(res)
    assert "phi(1,1)" in text and f"{res.random['ranks']['top1']:.3f}" in text
    assert f"{res.layers['ranks/trained']['h.0.attn.q_proj']['top1']:.3f}" in text
    subspace.plot(res, tmp_path / "subspace.png")
    assert (tmp_path / "subspace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
