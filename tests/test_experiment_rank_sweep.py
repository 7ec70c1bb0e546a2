"""The rank-sweep study (paper Table 6) in fast mode: the protocol (selection on dev with seed 0, reporting on
test with the reporting seeds), exact parameter counts, the verdict logic on synthetic intervals, plot, summary."""
import dataclasses
import json
import math

import pytest

from helpers import record_protocol_runs
from minilora.experiments import common, protocol, rank_sweep
from minilora.pretrained import pretrained_info


@pytest.fixture(scope="module")
def recorded():
    """The fast study, with every training run checked and recorded: (result, calls)."""
    return record_protocol_runs(rank_sweep.run, seed=0)


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_every_configuration_is_there_with_an_interval(result):
    assert result.ranks == [1, 2] and result.seeds == list(protocol.report_seeds(True))
    assert set(result.target_sets) == {"Wq", "Wq,Wv", "Wq,Wk,Wv,Wo"}
    assert sorted((row["targets"], row["r"]) for row in result.lora) == sorted(
        (label, r) for label in result.target_sets for r in (1, 2))
    for row in [*result.lora, result.full]:
        test = protocol.as_interval(row["test"])
        assert test.n == len(result.seeds) == len(row["losses"]) and all(math.isfinite(x) for x in row["losses"])
        assert test.low <= test.mean <= test.high
        assert row["lr"] in protocol.LR_SERIES
    assert math.isfinite(result.pretrained_loss)


def test_trainable_parameters_are_r_times_in_plus_out_per_layer_and_target(result):
    config = pretrained_info()["model_config"]
    for row in result.lora:
        targets = result.target_sets[row["targets"]]
        assert row["trainable"] == row["r"] * (config["n_embd"] + config["n_embd"]) * config["n_layer"] * len(targets)
    assert result.full["trainable"] > max(row["trainable"] for row in result.lora)


def test_rates_are_chosen_on_dev_and_reported_on_test(recorded):
    """Each configuration's rates are tried with the selection seed on dev (the guard refuses anything else),
    the chosen one has the lowest dev loss, and only the chosen rate runs on test, once per reporting seed."""
    result, calls = recorded
    configurations = [("lora", tuple(result.target_sets[row["targets"]]), row["r"], row) for row in result.lora]
    configurations.append(("full", (), None, result.full))
    for kind, targets, r, row in configurations:
        mine = [c for c in calls if (c["kind"], c["targets"], c["r"]) == (kind, targets, r)]
        dev = [c for c in mine if c["part"] == "dev"]
        test = [c for c in mine if c["part"] == "test"]
        assert {c["seed"] for c in dev} == {protocol.SELECTION_SEED}
        assert sorted(f"{c['lr']:g}" for c in dev) == sorted(row["dev_scores"])
        assert row["dev_scores"][f"{row['lr']:g}"] == min(row["dev_scores"].values())
        assert {c["lr"] for c in test} == {row["lr"]}
        assert sorted(c["seed"] for c in test) == result.seeds
    assert len(calls) == sum(len(row["dev_scores"]) + len(result.seeds) for row in [*result.lora, result.full])


def test_the_best_rank_is_chosen_on_dev(result):
    for label in result.target_sets:
        rows = rank_sweep.curve(result, label)
        assert result.best_rank[label] == min(rows, key=rank_sweep.dev_loss)["r"]
    recorded_tuning = result.protocol["tuning"]
    assert set(recorded_tuning) == {f"LoRA {row['targets']} r={row['r']}" for row in result.lora} | {"full fine-tuning"}
    assert result.protocol["report_seeds"] == result.seeds and result.protocol["selection_seed"] == 0
    assert result.protocol["split"]["corpus"] == "python-email"


def test_findings_are_recorded_with_a_verdict(result):
    claims = [f["claim"] for f in result.findings]
    assert claims == ["Wq: r=1 is as good as the best rank", "Wq,Wv: r=1 is as good as the best rank",
                      "Wq,Wk,Wv,Wo: r=1 is as good as the best rank", "Wq,Wv beats Wq at the same r",
                      "adapting more weight types beats a larger rank on one", "LoRA matches full fine-tuning"]
    for f in result.findings:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "rank-sweep"
        assert f["verdict"]
    json.dumps(dataclasses.asdict(result))


# ----------------------------------------------------------------------------------------------------
# the verdict logic on synthetic intervals


def synthetic_row(label, r, test_losses, dev_loss, lr=1e-2):
    trainable = 1024 * r * len(rank_sweep.TARGET_SETS[label]) if r is not None else 822_016
    return {"targets": label, "r": r, "trainable": trainable, "lr": lr, "interior": True,
            "dev_scores": {f"{lr / 3:g}": dev_loss + 1, f"{lr:g}": dev_loss, f"{lr * 3:g}": dev_loss + 1},
            "test": dataclasses.asdict(protocol.interval(test_losses)), "losses": list(test_losses)}


def synthetic_result(rows, full):
    result = rank_sweep.RankSweepResult(ranks=[1, 2], seeds=[1, 2, 3],
                                        target_sets={k: list(v) for k, v in rank_sweep.TARGET_SETS.items()},
                                        pretrained_loss=3.0, full=full, lora=rows)
    result.best_rank = {label: rank_sweep.best_rank(rank_sweep.curve(result, label)) for label in result.target_sets}
    result.findings = rank_sweep.findings(result)
    return result


def test_verdicts_follow_the_intervals_and_choices_follow_dev():
    rows = [
        synthetic_row("Wq", 1, [2.00, 2.01, 2.02], dev_loss=2.0),
        synthetic_row("Wq", 2, [1.50, 1.51, 1.52], dev_loss=1.5),            # best on dev, clearly better on test
        synthetic_row("Wq,Wv", 1, [1.40, 1.45, 1.50], dev_loss=1.3),         # best on dev
        synthetic_row("Wq,Wv", 2, [1.41, 1.46, 1.49], dev_loss=1.35),
        synthetic_row("Wq,Wk,Wv,Wo", 1, [1.00, 1.01, 1.02], dev_loss=1.3),   # best on test ...
        synthetic_row("Wq,Wk,Wv,Wo", 2, [1.60, 1.61, 1.62], dev_loss=1.2),   # ... but dev chooses r = 2
    ]
    result = synthetic_result(rows, synthetic_row("full", None, [1.30, 1.31, 1.32], dev_loss=1.1, lr=1e-3))
    assert result.best_rank == {"Wq": 2, "Wq,Wv": 1, "Wq,Wk,Wv,Wo": 2}
    verdicts = {f["claim"]: f["verdict"] for f in result.findings}
    assert verdicts["Wq: r=1 is as good as the best rank"] == "r=2 better"
    assert verdicts["Wq,Wv: r=1 is as good as the best rank"] == "r=1 chosen on dev"
    assert verdicts["Wq,Wk,Wv,Wo: r=1 is as good as the best rank"] == "r=1 better"
    # r = 1: Wq,Wv's interval lies below Wq's; r = 2: Wq,Wv's wide interval contains Wq's mean
    assert verdicts["Wq,Wv beats Wq at the same r"] == "r=1: Wq,Wv better; r=2: not distinguishable"
    assert verdicts["adapting more weight types beats a larger rank on one"] == protocol.NOT_DISTINGUISHABLE
    # the best LoRA on dev is all four weights at r = 2 (dev 1.2), worse on test than full fine-tuning
    assert verdicts["LoRA matches full fine-tuning"] == "full fine-tuning better"


def test_separated_intervals_at_every_rank_give_one_verdict():
    rows = [synthetic_row(label, r, [base + 0.01 * r, base + 0.01 * r + 0.01, base + 0.01 * r + 0.02], dev_loss=base)
            for label, base in (("Wq", 2.0), ("Wq,Wv", 1.5), ("Wq,Wk,Wv,Wo", 1.4)) for r in (1, 2)]
    result = synthetic_result(rows, synthetic_row("full", None, [1.0, 1.01, 1.02], dev_loss=1.0, lr=1e-3))
    verdicts = {f["claim"]: f["verdict"] for f in result.findings}
    assert verdicts["Wq,Wv beats Wq at the same r"] == "Wq,Wv better at every r"
    assert verdicts["adapting more weight types beats a larger rank on one"] == "Wq,Wv r=1 better"


def test_plot_and_summary(result, tmp_path):
    path = tmp_path / "rank_sweep.png"
    rank_sweep.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = rank_sweep.summary(result)
    for row in result.lora:
        assert protocol.as_interval(row["test"]).text() in text and f"{row['trainable']:,}" in text
    assert f"{result.pretrained_loss:.4f}" in text and protocol.as_interval(result.full["test"]).text() in text
    assert f"{common.bits_per_char(result.pretrained_loss):.4f}" in text
    assert f"seeds {result.seeds}" in text
    for f in result.findings:
        assert f"{f['claim']}: {f['verdict']}" in text
