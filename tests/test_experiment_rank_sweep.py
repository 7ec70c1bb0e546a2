"""The rank-sweep study (paper Table 6) in fast mode: every configuration, exact parameter counts, plot, summary."""
import math

import pytest

from minilora.experiments import common, rank_sweep
from minilora.pretrained import pretrained_info


@pytest.fixture(scope="module")
def result():
    return rank_sweep.run(fast=True, seed=0)


def test_every_configuration_is_there_with_finite_losses(result):
    assert result.ranks == [1, 2] and result.seeds == [0]
    assert set(result.target_sets) == {"Wq", "Wq,Wv", "Wq,Wk,Wv,Wo"}
    assert sorted((row["targets"], row["r"]) for row in result.lora) == sorted(
        (label, r) for label in result.target_sets for r in (1, 2))
    for row in result.lora:
        assert len(row["losses"]) == 1 and all(math.isfinite(x) for x in row["losses"])
        assert row["mean"] == row["losses"][0] and row["spread"] == 0.0
    assert math.isfinite(result.pretrained_loss) and math.isfinite(result.full["mean"])


def test_trainable_parameters_are_r_times_in_plus_out_per_layer_and_target(result):
    config = pretrained_info()["model_config"]
    for row in result.lora:
        targets = result.target_sets[row["targets"]]
        assert row["trainable"] == row["r"] * (config["n_embd"] + config["n_embd"]) * config["n_layer"] * len(targets)
    assert result.full["trainable"] > max(row["trainable"] for row in result.lora)


def test_every_fine_tuning_improves_on_the_pretrained_model(result):
    for row in result.lora:
        assert row["mean"] < result.pretrained_loss, row
    assert result.full["mean"] < result.pretrained_loss


def test_plot_and_summary(result, tmp_path):
    path = tmp_path / "rank_sweep.png"
    rank_sweep.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = rank_sweep.summary(result)
    for row in result.lora:
        assert f"{row['mean']:.4f}" in text and f"{row['trainable']:,}" in text
    assert f"{result.pretrained_loss:.4f}" in text and f"{result.full['mean']:.4f}" in text
    assert f"{common.bits_per_char(result.pretrained_loss):.4f}" in text
