"""Subspace similarity phi (paper 7.2): known answers on constructed matrices, chance by Monte Carlo, the
protocol of the study (selection on dev only, matrices from the reporting seeds' test runs), verdicts from
synthetic intervals, the outputs."""
import dataclasses
import json

import numpy as np
import pytest

from helpers import record_protocol_runs
from minilora.experiments import common, protocol, subspace


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


def test_update_bases_read_the_adapters_subspaces():
    """Delta W = s A^T B^T (in, out): its input directions span A's rows, its output directions span B's columns."""
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((4, 20)), rng.standard_normal((15, 4))
    U_in, V_out = subspace.update_bases(2.0 * A.T @ B.T, 4)
    assert U_in.shape == (20, 4) and V_out.shape == (15, 4)
    np.testing.assert_allclose(U_in.T @ U_in, np.eye(4), atol=1e-12)
    assert subspace.phi_of_bases(U_in, subspace.subspace_basis(A))[-1, -1] == pytest.approx(1.0)
    assert subspace.phi_of_bases(V_out, subspace.subspace_basis(B.T))[-1, -1] == pytest.approx(1.0)
    A2 = rng.standard_normal((6, 20))
    np.testing.assert_allclose(subspace.phi_of_bases(subspace.subspace_basis(A), subspace.subspace_basis(A2)),
                               subspace.phi_matrix(A, A2), atol=1e-12)
    with pytest.raises(ValueError, match="1 <= r"):
        subspace.update_bases(A.T @ B.T, 16)


def test_spectral_gap_and_the_product_shortcut():
    assert subspace.spectral_gap(np.diag([6.0, 2.0, 1.0])) == pytest.approx(3.0)
    assert subspace.spectral_gap(np.diag([6.0, 2.0, 1.0]), r=2) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="two non-zero"):
        subspace.spectral_gap(np.diag([1.0, 0.0]))
    rng = np.random.default_rng(3)
    F, G = rng.standard_normal((30, 5)), rng.standard_normal((5, 30))
    np.testing.assert_allclose(np.linalg.svd(subspace._product_core(F, G), compute_uv=False),
                               np.linalg.svd(F @ G, compute_uv=False)[:5], rtol=1e-10)


def test_random_baseline_sits_at_chance():
    d, r1, r2 = 32, 2, 8
    draws = subspace.random_baseline(r1, r2, d, modules=4, draws=100, rng=np.random.default_rng(0))
    assert all(len(v) == 100 for v in draws.values())
    assert np.mean(draws["top1"]) == pytest.approx(1 / d, rel=0.3)
    assert np.mean(draws["all"]) == pytest.approx(r2 / d, rel=0.05)
    assert all(np.min(draws[f"gap {k} r={r}"]) >= 1.0 for k in ("A", "dW") for r in (r1, r2))
    spectra = subspace.random_spectra((r1, r2), d, 10, np.random.default_rng(1))
    assert [len(spectra[f"A r={r}"]) for r in (r1, r2)] == [r1, r2] and spectra["dW r=8"][0] == 1.0


@pytest.fixture(scope="module")
def recorded():
    """The fast study, with every training run checked against the protocol and recorded: (result, calls)."""
    return record_protocol_runs(subspace.run, seed=0)


@pytest.fixture(scope="module")
def fast_result(recorded):
    return recorded[0]


def test_selection_reads_dev_only_and_the_matrices_come_from_reporting_runs(recorded):
    res, calls = recorded
    for call in calls:
        if call["seed"] == protocol.SELECTION_SEED:
            assert call["part"] == "dev", call
        else:
            assert call["part"] == "test" and call["seed"] in protocol.FAST_REPORT_SEEDS, call
    for r in (res.r_small, res.r_large):
        tuned = res.tuned[f"r={r}"]
        dev = {float(lr): v for lr, v in tuned["dev_scores"].items()}
        assert tuned["lr"] == min(dev, key=dev.get)
        reports = [c for c in calls if c["r"] == r and c["part"] == "test"]
        assert sorted(c["seed"] for c in reports) == list(protocol.FAST_REPORT_SEEDS)
        assert all(c["lr"] == tuned["lr"] for c in reports)
    # each r_small run meets an r_large run of another seed (a shared seed would share A's start)
    assert len(res.pairs) == len(protocol.FAST_REPORT_SEEDS)
    assert all(small != large for small, large in res.pairs)
    assert sorted(s for s, _ in res.pairs) == sorted(l for _, l in res.pairs) == list(protocol.FAST_REPORT_SEEDS)


def test_fast_study_shapes_and_invariants(fast_result):
    res = fast_result
    assert (res.r_small, res.r_large, res.d) == (8, 64, 128)
    for state, m in res.heatmaps.items():
        m = np.asarray(m)
        assert m.shape == (8, 64), state
        assert np.isfinite(m).all() and (m >= 0).all() and (m <= 1).all(), state
    for state in subspace.STATES:
        assert len(res.modules[state]) == 8                          # Wq and Wv of 4 layers
        for stat in subspace.STATS:
            values = res.phi[state][stat]["values"]
            assert len(values) == len(res.pairs)
            per_module = [res.modules[state][n][stat] for n in res.modules[state]]
            assert values == pytest.approx(np.mean(per_module, axis=0).tolist())
    # Delta W = s A^T B^T reads exactly A's row space: the whole input subspaces agree with A's
    assert res.phi["dW in"]["all"]["values"] == pytest.approx(res.phi["A"]["all"]["values"], abs=1e-8)
    assert res.random["top1"]["mean"] == pytest.approx(1 / res.d, rel=0.3)
    for kind in ("A", "dW"):
        verdicts = [subspace._against_random(res.gaps[f"{kind} r={r}"], res.random[f"gap {kind} r={r}"])
                    for r in (res.r_small, res.r_large)]
        assert res.top_direction_defined[kind] == (verdicts == ["above random"] * 2)


def _interval(values):
    return dataclasses.asdict(protocol.interval(values))


def _synthetic(trained_top1, random_top1, trained_gap, random_gap):
    res = subspace.SubspaceResult(d=128, r_small=8, r_large=64, steps=1, layer=2, targets=["q_proj"])
    trained_top1, random_top1, trained_gap, random_gap = map(_interval, (trained_top1, random_top1, trained_gap,
                                                                         random_gap))
    for state in subspace.STATES:
        res.phi[state] = {stat: trained_top1 for stat in subspace.STATS}
    res.random = {stat: random_top1 for stat in subspace.STATS}
    for kind in ("A", "dW"):
        for r in (8, 64):
            res.gaps[f"{kind} r={r}"] = trained_gap
            res.random[f"gap {kind} r={r}"] = random_gap
    return {f["claim"]: f["verdict"] for f in subspace.findings_of(res)}


def test_verdicts_follow_the_intervals():
    apart = _synthetic([0.7, 0.72, 0.74], [0.007, 0.008, 0.009], [2.0, 2.1, 2.2], [1.05, 1.06, 1.07])
    assert sum(v == "above random" for v in apart.values()) == 5      # phi(1,1) of A, dW in, dW out; phi(r1,r2) x2
    assert sum(v == "r=8: above random; r=64: above random" for v in apart.values()) == 2
    assert next(v for c, v in apart.items() if "against the paper" in c) == "above 0.5"
    below = _synthetic([0.001, 0.002, 0.003], [0.007, 0.008, 0.009], [1.0, 1.01, 1.02], [1.05, 1.06, 1.07])
    assert next(v for c, v in below.items() if "trained A" in c and "random" in c and "phi(1,1)" in c) == "below random"
    assert next(v for c, v in below.items() if "against the paper" in c) == "below 0.5"
    overlapping = _synthetic([0.0, 0.5, 0.2], [0.007, 0.008, 0.009], [1.0, 3.0, 1.5], [1.05, 1.06, 1.07])
    assert all(protocol.NOT_DISTINGUISHABLE in v for c, v in overlapping.items() if "against the paper" not in c)


def test_protocol_findings_summary_plot_and_json(fast_result, tmp_path):
    res = fast_result
    assert res.protocol["report_seeds"] == list(protocol.FAST_REPORT_SEEDS)
    assert set(res.protocol["tuning"]) == {"r=8", "r=64"} and res.protocol["pairs"] == res.pairs
    assert res.findings and all(f["study"] == subspace.STUDY for f in res.findings)
    text = subspace.summary(res)
    assert "phi(1,1)" in text and protocol.as_interval(res.phi["A"]["top1"]).text(3) in text
    assert protocol.as_interval(res.random["top1"]).text(3) in text
    assert all(f["verdict"] in text for f in res.findings)
    json.dumps(dataclasses.asdict(res), allow_nan=False)
    subspace.plot(res, tmp_path / "subspace.png")
    assert (tmp_path / "subspace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smaller():
    """The fast study at other ranks and steps (what a notebook asks for), every training run checked against
    the protocol and recorded: (result, calls)."""
    return record_protocol_runs(subspace.run, seed=0, ranks=(2, 4), steps=4)


def test_ranks_keyword_picks_the_pair(smaller):
    res, calls = smaller
    assert (res.r_small, res.r_large) == (2, 4) and {c["r"] for c in calls} == {2, 4}
    assert set(res.tuned) == set(res.protocol["tuning"]) == {"r=2", "r=4"}
    assert all(np.asarray(m).shape == (2, 4) for m in res.heatmaps.values())
    assert set(res.gaps) == {f"{k} r={r}" for k in ("A", "dW") for r in (2, 4)}
    assert [len(res.random_spectra[f"A r={r}"]) for r in (2, 4)] == [2, 4]
    # the protocol is the default's: selection on dev, each rank's reporting seeds on test, pairs across seeds
    for r in (2, 4):
        assert sorted(c["seed"] for c in calls if c["r"] == r and c["part"] == "test") == \
            list(protocol.FAST_REPORT_SEEDS)
    assert all(c["part"] == "dev" for c in calls if c["seed"] == protocol.SELECTION_SEED)
    assert all(small != large for small, large in res.pairs)
    assert protocol.as_interval(res.random["all"]).mean == pytest.approx(4 / res.d, rel=0.25)  # chance r_large / d
    assert "r=2 vs r=4" in subspace.summary(res)


def test_steps_keyword_sets_every_runs_steps(smaller):
    res, calls = smaller
    assert res.steps == res.settings["steps"] == 4 != subspace.FAST_STEPS
    assert calls and all(c["steps"] == 4 for c in calls)


@pytest.mark.parametrize("kwargs", [{"ranks": (8, 8)}, {"ranks": (64, 8)}, {"ranks": (1, 8)}, {"ranks": (8,)},
                                    {"ranks": (8, 256)}, {"steps": 0}, {"steps": 2.5}])
def test_ranks_and_steps_are_checked_before_training(kwargs, monkeypatch):
    monkeypatch.setattr(common, "run_lora", lambda *a, **k: pytest.fail("trained despite bad arguments"))
    with pytest.raises(ValueError, match="ranks must|steps must"):
        subspace.run(fast=True, **kwargs)
