"""The fixed-budget study (paper Table 5) in fast mode: one shared budget, the protocol (selection on dev with
seed 0, reporting on test with the reporting seeds), the paper's orders and the verdict logic, plot, summary."""
import dataclasses
import json
import math

import pytest

from helpers import record_protocol_runs
from minilora.experiments import budget, protocol
from minilora.pretrained import pretrained_info


@pytest.fixture(scope="module")
def recorded():
    """The fast study with every training run recorded; a selection-seed run scored on test, or a test run with a
    seed that is not a reporting seed, fails it. (result, calls)."""
    return record_protocol_runs(budget.run, seed=0)


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_every_configuration_is_there_with_an_interval(result):
    assert [row["label"] for row in result.configurations] == list(budget.CONFIGURATIONS)
    assert result.seeds == list(protocol.report_seeds(True))
    for row in result.configurations:
        test = protocol.as_interval(row["test"])
        assert test.n == len(result.seeds) and all(math.isfinite(x) for x in row["losses"])
        assert row["lr"] in protocol.LR_SERIES
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


def test_rates_are_chosen_on_dev_and_reported_on_test(recorded):
    result, calls = recorded
    for row in result.configurations:
        mine = [c for c in calls if (c["targets"], c["r"]) == (tuple(row["targets"]), row["r"])]
        dev = [c for c in mine if c["part"] == "dev"]
        test = [c for c in mine if c["part"] == "test"]
        assert {c["seed"] for c in dev} == {protocol.SELECTION_SEED}
        assert sorted(f"{c['lr']:g}" for c in dev) == sorted(row["dev_scores"])
        assert budget.dev_loss(row) == min(row["dev_scores"].values())
        assert {c["lr"] for c in test} == {row["lr"]} and sorted(c["seed"] for c in test) == result.seeds
    assert set(result.protocol["tuning"]) == {f"LoRA {row['label']} r={row['r']}" for row in result.configurations}
    assert result.protocol["report_seeds"] == result.seeds and result.protocol["split"]["corpus"] == "python-email"


def test_the_paper_orders_the_pairs_its_spread_separates():
    orders = budget.paper_orders()
    # the paper's text: Wq or Wk alone is clearly worse than Wq, Wv
    assert ("Wq,Wv", "Wq") in orders and ("Wq,Wv", "Wk") in orders and ("Wq,Wk,Wv,Wo", "Wq") in orders
    assert not {("Wq", "Wk"), ("Wk", "Wq")} & set(orders)         # 0.4 and 0.2 points: within the spread
    assert not {("Wq,Wv", "Wo"), ("Wo", "Wq,Wv")} & set(orders)   # 0.5 and 0.0 points
    assert not {("Wq,Wk", "Wv"), ("Wv", "Wq,Wk")} & set(orders)   # the two tasks disagree
    table = {"A": {"a": 1.0, "b": 2.0, "c": 2.0}, "B": {"a": 1.0, "b": 1.0, "c": 3.0}}
    assert budget.paper_orders(table, {"A": 0.4, "B": 0.4}) == [("b", "a"), ("c", "a"), ("c", "b")]
    assert budget.paper_orders(table, {"A": 0.5, "B": 0.5}) == [("c", "a"), ("c", "b")]   # a gap of 1.0 is not > 1.0


def synthetic(losses_by_label):
    rows = []
    for label, losses in losses_by_label.items():
        targets, r = budget.CONFIGURATIONS[label]
        rows.append({"label": label, "targets": list(targets), "r": r, "trainable": 8192, "lr": 1e-2,
                     "interior": True, "dev_scores": {"0.01": 1.0},
                     "test": dataclasses.asdict(protocol.interval(losses)), "losses": list(losses)})
    result = budget.BudgetResult(budget=8192, seeds=[1, 2, 3], pretrained_loss=3.0, configurations=rows)
    result.findings = budget.findings(result)
    return result


def test_verdicts_follow_the_intervals():
    result = synthetic({"Wq": [2.00, 2.01, 2.02], "Wk": [1.50, 1.51, 1.52], "Wq,Wv": [1.40, 1.50, 1.60]})
    verdicts = {f["claim"]: f["verdict"] for f in result.findings}
    assert verdicts == {"Wq,Wv (r=4) beats Wq (r=8) at 8,192 parameters": "Wq,Wv better",
                        "Wq,Wv (r=4) beats Wk (r=8) at 8,192 parameters": protocol.NOT_DISTINGUISHABLE}
    assert budget.tally(result) == {"agrees": 1, protocol.NOT_DISTINGUISHABLE: 1, "reversed": 0}
    reversed_ = synthetic({"Wq": [1.00, 1.01, 1.02], "Wq,Wv": [2.00, 2.01, 2.02]})
    assert [f["verdict"] for f in reversed_.findings] == ["Wq better"]
    assert budget.tally(reversed_)["reversed"] == 1


def test_findings_cover_every_order_of_the_paper(result):
    assert len(result.findings) == len(budget.paper_orders())
    for f, (better, worse) in zip(result.findings, budget.paper_orders()):
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "budget"
        assert f["claim"].startswith(f"{better} (") and f" beats {worse} (" in f["claim"]
        assert f["verdict"] in {f"{better} better", f"{worse} better", protocol.NOT_DISTINGUISHABLE}
    json.dumps(dataclasses.asdict(result))


def test_plot_and_summary(result, tmp_path):
    path = tmp_path / "budget.png"
    budget.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = budget.summary(result)
    for row in result.configurations:
        assert row["label"] in text and protocol.as_interval(row["test"]).text() in text
    assert f"{result.budget:,}" in text and f"{result.pretrained_loss:.4f}" in text
    assert f"seeds {result.seeds}" in text
    for f in result.findings:
        assert f"{f['claim']}: {f['verdict']}" in text
