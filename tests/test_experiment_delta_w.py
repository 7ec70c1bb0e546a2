"""Delta W against W (paper 7.3, Table 7): the projection measure on known matrices, the protocol of the study
(selection on dev only, updates from the reporting seeds' test runs), verdicts from synthetic intervals, outputs."""
import dataclasses
import json

import numpy as np
import pytest

from helpers import record_protocol_runs
from minilora.experiments import common, delta_w, protocol


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


def test_update_numbers_and_random_projections():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((20, 14))
    delta = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 14))
    numbers = delta_w.update_numbers(W, delta, 3)
    assert numbers["delta_dirs"] == pytest.approx(delta_w.projection_norm(W, *delta_w.top_singular_vectors(delta, 3)))
    assert numbers["amplification"] == pytest.approx(np.linalg.norm(delta) / numbers["delta_dirs"])
    draws = delta_w.random_projections(W, 3, np.random.default_rng(0), 5)
    assert len(draws) == 5 and all(0 < d <= numbers["w_dirs"] + 1e-12 for d in draws)
    row = delta_w.compare(W, delta, 3, np.random.default_rng(0), draws=5)
    assert row["random"] == pytest.approx(np.mean(draws)) and row["delta_dirs"] == numbers["delta_dirs"]


@pytest.fixture(scope="module")
def recorded():
    """The fast study, with every training run checked against the protocol and recorded: (result, calls)."""
    return record_protocol_runs(delta_w.run, seed=0)


@pytest.fixture(scope="module")
def fast_result(recorded):
    return recorded[0]


def test_selection_reads_dev_only_and_updates_come_from_reporting_runs(recorded):
    res, calls = recorded
    for call in calls:
        if call["seed"] == protocol.SELECTION_SEED:
            assert call["part"] == "dev", call
        else:
            assert call["part"] == "test" and call["seed"] in protocol.FAST_REPORT_SEEDS, call
    for r in res.ranks:
        tuned = res.tuned[f"r={r}"]
        dev = {float(lr): v for lr, v in tuned["dev_scores"].items()}
        assert tuned["lr"] == min(dev, key=dev.get)
        reports = [c for c in calls if c["r"] == r and c["part"] == "test"]
        assert sorted(c["seed"] for c in reports) == list(protocol.FAST_REPORT_SEEDS)
        assert all(c["lr"] == tuned["lr"] for c in reports)
    assert set(res.protocol["tuning"]) == {f"r={r}" for r in res.ranks}
    assert res.protocol["report_seeds"] == list(protocol.FAST_REPORT_SEEDS)


def test_fast_study(fast_result):
    res = fast_result
    assert res.ranks == list(delta_w.FAST_RANKS) and res.shape == [128, 128]
    assert len(res.modules) == 8
    seeds = len(protocol.FAST_REPORT_SEEDS)
    for name, m in res.modules.items():
        for k, r in enumerate(res.ranks):
            assert len(m["delta_dirs"][k]) == seeds
            # W's own directions are the best any rank-r pair can do (a theorem, so it holds at any size)
            assert all(d <= m["w_dirs"][k] + 1e-9 for d in m["delta_dirs"][k]), (name, r)
            assert m["w_dirs"][k] > protocol.as_interval(m["random"][k]).mean, (name, r)
            assert len(m["random"][k]["values"]) == res.random_draws
            assert all(np.isfinite(a) and a > 0 for a in m["amplification"][k]), (name, r)
        # more directions take in more of W
        assert m["w_dirs"][1] > m["w_dirs"][0] and m["random"][1]["mean"] > m["random"][0]["mean"]
    middle = res.modules[delta_w.middle_module(res)]
    for key in delta_w.PER_SEED:
        assert [i["values"] for i in res.middle[key]] == middle[key]
    for k in range(len(res.ranks)):
        amps = np.array([m["amplification"][k] for m in res.modules.values()])       # (modules, seeds)
        assert res.geomean["amplification"][k]["values"] == pytest.approx(np.exp(np.log(amps).mean(axis=0)).tolist())


def _interval(values):
    return dataclasses.asdict(protocol.interval(values))


def _synthetic(delta_dirs, amp_small, amp_large, w_dirs=4.0, random=(0.2, 0.21, 0.22)):
    """A result at ranks (4, 16) whose middle Wq numbers and geometric means are the given values per seed."""
    delta_dirs, amp_small, amp_large, random = map(_interval, (delta_dirs, amp_small, amp_large, random))
    res = delta_w.DeltaWResult(ranks=[4, 16], steps=1, layer=0, shape=[8, 8], targets=["q_proj"])
    res.modules = {"h.0.attn.q_proj": {"w_norm": 9.0, "w_dirs": [w_dirs, w_dirs], "random": [random, random],
                                       "random_expected": [0.2, 0.2]}}
    res.middle = {"delta_dirs": [delta_dirs, delta_dirs], "amplification": [amp_small, amp_large]}
    res.geomean = {"delta_over_random": [amp_small, amp_small], "amplification": [amp_small, amp_large]}
    return [f["verdict"] for f in delta_w.findings_of(res)]


def test_verdicts_follow_the_intervals():
    assert _synthetic([0.5, 0.52, 0.54], [5.0, 5.1, 5.2], [1.5, 1.6, 1.7]) == [
        "above random", "above 1", "below W's top directions", "above 1 (amplifies)", "above 1 (amplifies)",
        "larger at r=4"]
    assert _synthetic([0.1, 0.11, 0.12], [0.5, 0.51, 0.52], [1.5, 1.6, 1.7], w_dirs=0.05) == [
        "below random", "below 1", "above W's top directions", "below 1", "below 1", "larger at r=16"]
    assert set(_synthetic([0.0, 0.5, 0.2], [0.5, 2.0, 1.0], [0.8, 1.5, 1.1], w_dirs=0.3)) == {
        protocol.NOT_DISTINGUISHABLE}


def test_findings_summary_plot_and_json(fast_result, tmp_path):
    res = fast_result
    assert res.findings and all(set(f) == {"study", "claim", "paper", "ours", "verdict"} for f in res.findings)
    assert any(str(delta_w.PAPER["amplification"]) in f["paper"] for f in res.findings)
    text = delta_w.summary(res)
    mid = delta_w.middle_module(res)
    assert mid in text and protocol.as_interval(res.middle["amplification"][0]).text(2) in text
    assert "lr chosen on dev" in text and all(f["verdict"] in text for f in res.findings)
    json.dumps(dataclasses.asdict(res), allow_nan=False)
    delta_w.plot(res, tmp_path / "delta_w.png")
    assert (tmp_path / "delta_w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smaller():
    """The fast study at other ranks and steps (what a notebook asks for), every training run checked against
    the protocol and recorded: (result, calls)."""
    return record_protocol_runs(delta_w.run, seed=0, ranks=(2, 8), steps=4)


def test_ranks_keyword_picks_the_ranks(smaller):
    res, calls = smaller
    assert res.ranks == [2, 8] and {c["r"] for c in calls} == {2, 8}
    assert set(res.tuned) == set(res.protocol["tuning"]) == {"r=2", "r=8"}
    for m in res.modules.values():
        assert all(len(m[key]) == 2 for key in ("w_dirs", "random", "random_expected", *delta_w.PER_SEED))
        assert m["w_dirs"][1] > m["w_dirs"][0]
    assert all(len(res.geomean[key]) == 2 for key in delta_w.GEOMEANS)
    # the protocol is the default's: selection on dev, each rank's reporting seeds on test
    for r in (2, 8):
        assert sorted(c["seed"] for c in calls if c["r"] == r and c["part"] == "test") == \
            list(protocol.FAST_REPORT_SEEDS)
    assert all(c["part"] == "dev" for c in calls if c["seed"] == protocol.SELECTION_SEED)
    # r = 4 (the paper's) is not among them: the findings read the first rank, and the trend up to the last
    assert any("r=2 against r=8" in f["claim"] for f in res.findings)


def test_steps_keyword_sets_every_runs_steps(smaller):
    res, calls = smaller
    assert res.steps == res.settings["steps"] == 4 != delta_w.FAST_STEPS
    assert calls and all(c["steps"] == 4 for c in calls)


@pytest.mark.parametrize("kwargs", [{"ranks": ()}, {"ranks": (16, 4)}, {"ranks": (4, 4)}, {"ranks": (0, 4)},
                                    {"ranks": (4, 256)}, {"steps": 0}, {"steps": 2.5}])
def test_ranks_and_steps_are_checked_before_training(kwargs, monkeypatch):
    monkeypatch.setattr(common, "run_lora", lambda *a, **k: pytest.fail("trained despite bad arguments"))
    with pytest.raises(ValueError, match="ranks must|steps must"):
        delta_w.run(fast=True, **kwargs)
