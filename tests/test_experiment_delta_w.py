"""Delta W against W (paper 7.3, Table 7): the projection measure on known matrices, and the study."""
import numpy as np
import pytest

from minilora.experiments import delta_w


def test_projection_with_ws_own_singular_vectors_is_the_top_singular_values():
    W = np.random.default_rng(0).standard_normal((20, 12))
    S = np.linalg.svd(W, compute_uv=False)
    for r in (1, 3, 12):
        U, V = delta_w.top_singular_vectors(W, r)
        assert U.shape == (20, r) and V.shape == (12, r)
        assert delta_w.projection_norm(W, U, V) == pytest.approx(np.sqrt(np.sum(S[:r] ** 2)))
    # all of W: the Frobenius norm
    assert delta_w.projection_norm(W, *delta_w.top_singular_vectors(W, 12)) == pytest.approx(np.linalg.norm(W))


def test_ws_own_directions_beat_any_other():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((15, 10))
    best = delta_w.projection_norm(W, *delta_w.top_singular_vectors(W, 3))
    for _ in range(50):
        U, V = delta_w.random_orthonormal(15, 3, rng), delta_w.random_orthonormal(10, 3, rng)
        assert delta_w.projection_norm(W, U, V) <= best + 1e-12


def test_a_rank_r_update_is_all_in_its_own_directions():
    rng = np.random.default_rng(2)
    delta = rng.standard_normal((16, 4)) @ rng.standard_normal((4, 9))       # rank 4
    assert delta_w.projection_norm(delta, *delta_w.top_singular_vectors(delta, 4)) == pytest.approx(
        np.linalg.norm(delta))


def test_layout_does_not_matter():
    """(in, out) here, (out, in) in the paper: the same number once U and V swap roles."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((12, 7))
    U, V = delta_w.random_orthonormal(12, 3, rng), delta_w.random_orthonormal(7, 3, rng)
    assert delta_w.projection_norm(W, U, V) == pytest.approx(delta_w.projection_norm(W.T, V, U))


def test_random_orthonormal_is_orthonormal_and_seeded():
    Q = delta_w.random_orthonormal(30, 5, np.random.default_rng(0))
    np.testing.assert_allclose(Q.T @ Q, np.eye(5), atol=1e-12)
    np.testing.assert_array_equal(Q, delta_w.random_orthonormal(30, 5, np.random.default_rng(0)))


def test_random_projection_expectation_matches_monte_carlo():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((24, 16)) * np.linspace(0.1, 3.0, 16)       # anisotropic on purpose
    r, trials = 3, 4000
    squares = [delta_w.projection_norm(W, delta_w.random_orthonormal(24, r, rng),
                                       delta_w.random_orthonormal(16, r, rng)) ** 2 for _ in range(trials)]
    assert np.sqrt(np.mean(squares)) == pytest.approx(delta_w.random_projection_expectation(W, r), rel=0.03)


def test_measure_checks_shapes():
    with pytest.raises(ValueError, match="need W"):
        delta_w.projection_norm(np.zeros((4, 3)), np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="1 <= r"):
        delta_w.top_singular_vectors(np.zeros((4, 3)), 4)


def test_compare_on_an_update_along_ws_own_directions():
    """Delta W = 0.1 x (W's top-r part): its directions are W's, and the amplification factor is 0.1."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((20, 14))
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    delta = 0.1 * (U[:, :3] * S[:3]) @ Vt[:3]
    row = delta_w.compare(W, delta, 3, rng, draws=4)
    assert row["delta_dirs"] == pytest.approx(row["w_dirs"])
    assert row["amplification"] == pytest.approx(0.1)
    assert row["w_norm"] == pytest.approx(np.linalg.norm(W)) and row["delta_norm"] == pytest.approx(0.1 * row["w_dirs"])


@pytest.fixture(scope="module")
def fast_result():
    return delta_w.run(fast=True, seed=0)


def test_fast_study(fast_result, tmp_path):
    res = fast_result
    assert res.ranks == list(delta_w.FAST_RANKS) and res.shape == [128, 128]
    assert len(res.modules) == 8
    for name, m in res.modules.items():
        for k, r in enumerate(res.ranks):
            # W's own directions are the best any rank-r pair can do (a theorem, so it holds at any size)
            assert m["w_dirs"][k] >= m["delta_dirs"][k], (name, r)
            assert m["w_dirs"][k] > m["random"][k], (name, r)
            assert np.isfinite(m["amplification"][k]) and m["amplification"][k] > 0, (name, r)
            assert m["delta_norm"][k] > 0 and m["w_norm"][k] == pytest.approx(m["w_norm"][0])
        # more directions take in more of W
        assert m["w_dirs"][1] > m["w_dirs"][0] and m["random"][1] > m["random"][0]
    text = delta_w.summary(res)
    mid = next(n for n in res.modules if n.startswith(f"h.{res.layer}.attn.q_proj"))
    assert mid in text and f"{res.modules[mid]['amplification'][0]:.2f}" in text
    delta_w.plot(res, tmp_path / "delta_w.png")
    assert (tmp_path / "delta_w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

