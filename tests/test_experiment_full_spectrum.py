"""Full fine-tuning's Delta W: the spectrum measures on matrices with known answers; a fast run of the study under
the protocol (its learning rate chosen on dev with seed 0, reporting runs on test); the verdict logic."""
import dataclasses
import json

import numpy as np
import pytest

from helpers import record_protocol_runs
from minilora.experiments import protocol
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
def recorded():
    """The fast study with every full fine-tuning run recorded; a selection-seed run scored on test, or a test
    run with a seed that is not a reporting seed, fails it. (result, calls)."""
    return record_protocol_runs(fs.run, seed=0)


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_the_rate_is_chosen_on_dev_and_the_spectra_come_from_the_test_runs(recorded):
    result, calls = recorded
    dev = [c for c in calls if c["part"] == "dev"]
    test = [c for c in calls if c["part"] == "test"]
    assert {c["seed"] for c in dev} == {protocol.SELECTION_SEED}
    assert sorted(f"{c['lr']:g}" for c in dev) == sorted(result.tuning["dev_scores"])
    assert result.tuning["dev_scores"][f"{result.lr:g}"] == min(result.tuning["dev_scores"].values())
    assert {c["lr"] for c in test} == {result.lr}
    assert [c["seed"] for c in test] == result.seeds == [run["seed"] for run in result.runs]
    assert protocol.as_interval(result.val_after).values == [run["val_after"] for run in result.runs]
    assert result.protocol["tuning"]["full fine-tuning"]["best"] == result.lr
    assert result.protocol["report_seeds"] == result.seeds and result.protocol["split"]["corpus"] == "python-email"


def test_every_weight_of_every_run_is_measured(result):
    assert result.steps == 6 and len(result.names) == 24 and set(result.pretrained) == set(result.names)
    for run in result.runs:
        assert set(run["weights"]) == set(result.names)
        for name in result.names:
            w = run["weights"][name]
            expected = {"fc": [128, 512], "proj": [512, 128]}.get(name.split(".")[3], [128, 128])
            assert w["shape"] == expected and 0 < w["relative_update"]
            # Marchenko-Pastur: a Gaussian's top direction holds about (sqrt(d) + sqrt(k))^2 / (d k) of its energy
            assert w["random"]["energy"][0] < 0.05
            assert all(a <= b + 1e-12 for a, b in zip(w["delta"]["energy"], w["delta"]["energy"][1:]))
    c = fs.counts(result)
    assert c["weights"] == 24 and c["cases"] == 24 * len(result.seeds)


def test_group_intervals_are_over_the_reporting_runs(result):
    assert set(result.groups) == {"attention", "MLP"}
    for group, entry in result.groups.items():
        names = fs.group_names(result.names, group)
        assert len(names) == (16 if group == "attention" else 8)
        for key in ("delta", "random"):
            for measure in fs.GROUP_MEASURES:
                interval = protocol.as_interval(entry[key][measure])
                per_run = [fs.measures(run["weights"][n][key] for n in names)[measure] for run in result.runs]
                assert interval.values == pytest.approx(per_run) and interval.n == len(result.seeds)
        assert entry["pretrained"] == fs.measures(result.pretrained[n] for n in names)


def synthetic_groups(delta_sr, random_sr, delta_r90):
    entry = lambda sr, r90: {"stable_rank": dataclasses.asdict(protocol.interval(sr)),
                             "rank_90": dataclasses.asdict(protocol.interval(r90))}
    return {"attention": {"delta": entry(delta_sr, delta_r90), "random": entry(random_sr, [66.0, 66.0, 66.0]),
                          "pretrained": {"stable_rank": 12.0, "rank_90": 36.0}}}


def test_verdicts_follow_the_intervals():
    result = fs.FullSpectrumResult(seeds=[1, 2, 3], steps=100, lr=1e-3, tuning={}, val_before=2.0, val_after={},
                                   ranks=list(fs.RANKS), names=[])
    result.groups = synthetic_groups([5.0, 5.5, 6.0], [32.0, 33.0, 34.0], [4.0, 5.0, 6.0])
    assert [f["verdict"] for f in fs.findings(result)] == ["Delta W lower", "meets"]
    result.groups = synthetic_groups([10.0, 30.0, 50.0], [32.0, 33.0, 34.0], [7.0, 8.0, 9.0])
    assert [f["verdict"] for f in fs.findings(result)] == [protocol.NOT_DISTINGUISHABLE, protocol.NOT_DISTINGUISHABLE]
    result.groups = synthetic_groups([40.0, 41.0, 42.0], [32.0, 33.0, 34.0], [27.0, 28.0, 29.0])
    assert [f["verdict"] for f in fs.findings(result)] == ["Gaussian lower", "misses"]


def test_findings_are_recorded(result):
    assert [f["claim"].split(":")[0] for f in result.findings] == ["attention", "attention", "MLP", "MLP"]
    for f in result.findings:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "full-spectrum"
        assert f["verdict"] in {"Delta W lower", "Gaussian lower", "meets", "misses", protocol.NOT_DISTINGUISHABLE}


def test_result_is_json_plot_and_summary(result, tmp_path):
    json.dumps(dataclasses.asdict(result))
    fs.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = fs.summary(result)
    c = fs.counts(result)
    assert f"{c['top1_above_random']}/{c['cases']}" in text and str(protocol.as_interval(result.val_after)) in text
    assert f"seeds {result.seeds}" in text and f"lr {result.lr:g}" in text
    for f in result.findings:
        assert f"{f['claim']}: {f['verdict']}" in text
