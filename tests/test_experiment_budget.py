"""The fixed-budget study (paper Table 5) in fast mode: every configuration, one shared budget, plot, summary."""
import math

import pytest

from minilora.experiments import budget
from minilora.pretrained import pretrained_info


@pytest.fixture(scope="module")
def result():
    return budget.run(fast=True, seed=0)


def test_every_configuration_is_there_with_finite_losses(result):
    assert [row["label"] for row in result.configurations] == list(budget.CONFIGURATIONS)
    assert result.seeds == [0]
    for row in result.configurations:
        assert len(row["losses"]) == 1 and all(math.isfinite(x) for x in row["losses"])
    assert math.isfinite(result.pretrained_loss)


def test_every_configuration_trains_the_same_budget(result):
    config = pretrained_info()["model_config"]
    assert {row["r"] for row in result.configurations if len(row["targets"]) == 1} == {8}
    assert {row["r"] for row in result.configurations if len(row["targets"]) == 2} == {4}
    assert {row["r"] for row in result.configurations if len(row["targets"]) == 4} == {2}
    for row in result.configurations:
        assert row["trainable"] == row["r"] * (config["n_embd"] + config["n_embd"]) * config["n_layer"] * len(row["targets"])
        assert row["trainable"] == result.budget
    assert result.budget == 8 * 256 * 4


def test_every_configuration_improves_on_the_pretrained_model(result):
    for row in result.configurations:
        assert row["mean"] < result.pretrained_loss, row


def test_plot_and_summary(result, tmp_path):
    path = tmp_path / "budget.png"
    budget.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = budget.summary(result)
    for row in result.configurations:
        assert row["label"] in text and f"{row['mean']:.4f}" in text
    assert f"{result.budget:,}" in text and f"{result.pretrained_loss:.4f}" in text
