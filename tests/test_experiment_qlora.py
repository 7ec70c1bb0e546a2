"""QLoRA study (fast): the protocol (selection on dev only, reports on test seeds), LoRA on each base, the
untrained bases, the counted memory, the verdict from the intervals, and the outputs."""
import dataclasses
import json

import pytest

from helpers import record_protocol_runs
from minilora.experiments import STUDIES, common, protocol, qlora


@pytest.fixture(scope="module")
def recorded():
    """The fast study, every training run checked against the protocol and recorded: (result, calls)."""
    return record_protocol_runs(qlora.run, seed=0)


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_the_study_is_registered():
    assert STUDIES["qlora"] == "qlora"


def test_selection_reads_dev_only_and_each_base_reports_at_its_tuned_rate(recorded):
    result, calls = recorded
    assert {(c["targets"], c["r"], c["kind"]) for c in calls} == {(qlora.TARGETS, qlora.R, "lora")}
    for base, nf4 in qlora.BASES.items():
        mine = [c for c in calls if c["nf4"] == nf4]
        dev = {c["lr"] for c in mine if c["part"] == "dev"}
        assert all(c["seed"] == protocol.SELECTION_SEED for c in mine if c["part"] == "dev")
        assert {float(lr) for lr in result.tuned[base]["dev_scores"]} == dev
        tests = [c for c in mine if c["part"] == "test"]
        assert sorted(c["seed"] for c in tests) == sorted(protocol.FAST_REPORT_SEEDS)
        assert {c["lr"] for c in tests} == {result.tuned[base]["lr"]}


def test_the_verdict_and_the_paired_difference_follow_the_intervals(result):
    q, f = (protocol.as_interval(result.tuned[b]["test"]) for b in ("nf4", "float32"))
    assert result.verdict == protocol.verdict(q, f, "QLoRA", "LoRA", lower_is_better=True)
    assert result.verdict == protocol.NOT_DISTINGUISHABLE or not q.overlaps(f)
    diff = protocol.as_interval(result.difference)
    assert diff.values == pytest.approx([a - b for a, b in zip(q.values, f.values)])


def test_the_untrained_bases_differ_only_by_rounding(result):
    loss = result.pretrained_loss
    assert loss["float32"] == pytest.approx(common.pretrained_val_loss(common.RunSettings.for_mode(True), "test"))
    assert loss["nf4"] != loss["float32"] and abs(loss["nf4"] - loss["float32"]) < 0.1


def test_memory_is_counted_and_the_4_bit_base_is_smaller(result):
    fb = result.frozen_bytes
    assert fb["float32"] == 4 * fb["numbers"] and fb["nf4"] <= 0.3 * fb["float32"]
    assert fb["nf4 bits per weight"] == pytest.approx(4.127, abs=0.01)
    lora, q = result.memory["float32"], result.memory["nf4"]
    assert lora["gradients"] == q["gradients"] and lora["optimizer"] == q["optimizer"]   # the same adapters
    assert lora["parameters"] - q["parameters"] == fb["float32"] - fb["nf4"]
    assert q["total"] < lora["total"]


def test_findings_protocol_json_summary_and_plot(result, tmp_path):
    assert [f["study"] for f in result.findings] == ["qlora", "qlora"]
    assert result.findings[0]["verdict"] == result.verdict
    assert result.protocol["report_seeds"] == list(protocol.FAST_REPORT_SEEDS)
    assert set(result.protocol["tuning"]) == set(qlora.BASES)
    json.dumps(dataclasses.asdict(result), allow_nan=False)
    text = qlora.summary(result)
    assert "QLoRA - LoRA, paired by seed" in text and result.verdict in text and "bits/weight" in text
    path = tmp_path / "plot.png"
    qlora.plot(result, path)
    assert path.stat().st_size > 0
