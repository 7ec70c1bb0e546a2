"""The methods compared (``minilora compare``) in fast mode: the protocol (learning rates chosen on dev with the
selection seed, reported on test with the reporting seeds, for both tasks), intervals and verdicts, the matched
budgets, the Pareto front, the findings, the outputs and the command."""
import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from minilora.core.methods import METHODS
from minilora.experiments import common, compare, compare_methods, protocol
from minilora.tasks import load_task

SETTINGS = dict(matched=("prompt",))
METHODS_RUN = ("full", "lora", "prompt")


def _test_snippets():
    s = compare.CompareSettings.fast()
    return protocol.split_task(load_task(s.cls_task, length=s.cls_length, val_per_class=s.cls_val_per_class))[1].val_x


@pytest.fixture(scope="module")
def recorded():
    """The fast comparison of full fine-tuning, LoRA and prompt tuning (matched: prompt against LoRA), with every
    run checked and recorded: a run inside protocol.tune must be the selection seed on dev, any other run a
    reporting seed on test. Returns (result, calls)."""
    calls, selecting = [], [False]
    test_snippets = _test_snippets()
    real_tune, real_held_out, real_lm, real_cls = protocol.tune, common.held_out, compare._lm_run, compare._cls_run

    def tune(*args, **kwargs):
        selecting[0] = True
        try:
            return real_tune(*args, **kwargs)
        finally:
            selecting[0] = False

    def held_out(part):
        if selecting[0] and part != "dev":
            raise AssertionError(f"a selection run read {part}")
        return real_held_out(part)

    def check(kind, seed, part):
        if selecting[0] and (part != "dev" or seed != protocol.SELECTION_SEED):
            raise AssertionError(f"a selection run ({kind}) used seed {seed} on {part}")
        if not selecting[0] and (part != "test" or seed not in protocol.report_seeds(True)):
            raise AssertionError(f"a reporting run ({kind}) used seed {seed} on {part}")

    def lm_run(config, seed, part, lr, s, latency=False):
        check("language modelling", seed, part)
        calls.append({"task": "lm", "label": config.label, "seed": seed, "part": part, "lr": lr,
                      "selecting": selecting[0]})
        return real_lm(config, seed, part, lr, s, latency)

    def cls_run(config, seed, task, lr, s):
        part = "test" if np.array_equal(task.val_x, test_snippets) else "dev"
        check("classification", seed, part)
        calls.append({"task": "cls", "label": config.label, "seed": seed, "part": part, "lr": lr,
                      "selecting": selecting[0]})
        return real_cls(config, seed, task, lr, s)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "tune", tune)
        patch.setattr(common, "held_out", held_out)
        patch.setattr(compare, "_lm_run", lm_run)
        patch.setattr(compare, "_cls_run", cls_run)
        result = compare_methods(methods=METHODS_RUN, settings=compare.CompareSettings.fast(**SETTINGS))
    return result, calls


@pytest.fixture(scope="module")
def result(recorded):
    return recorded[0]


def test_selection_reads_dev_with_seed_0_and_reports_on_test_with_the_reporting_seeds(recorded):
    result, calls = recorded
    labels = {"full", "lora", "prompt", "lora r=1 q"}
    for task in compare.TASKS:
        for label in labels:
            mine = [c for c in calls if c["task"] == task and c["label"] == label]
            selection = [c for c in mine if c["selecting"]]
            report = [c for c in mine if not c["selecting"]]
            assert len(selection) >= 3 and {c["part"] for c in selection} == {"dev"}
            assert {c["seed"] for c in selection} == {protocol.SELECTION_SEED}
            assert [c["seed"] for c in report] == list(protocol.report_seeds(True))
            assert {c["part"] for c in report} == {"test"}
            # the reporting runs use the rate the selection chose, and it is recorded
            tuning = result.protocol["tuning"][f"{label} ({compare.TASK_NAMES[task]})"]
            assert {c["lr"] for c in report} == {tuning["best"]}
            assert set(tuning["dev_scores"]) == {f"{c['lr']:g}" for c in selection}


def test_every_row_has_test_intervals_tuned_rates_and_a_verdict_against_full(result):
    rows = {r.method: r for r in result.rows + result.matched_rows}
    assert [r.method for r in result.rows] == list(METHODS_RUN)
    assert [r.method for r in result.matched_rows] == ["lora r=1 q"]
    seeds = list(protocol.report_seeds(True))
    for r in rows.values():
        for score in (r.lm, r.accuracy):
            interval = protocol.as_interval(score)
            assert interval.n == len(seeds) and interval.low <= interval.mean <= interval.high
        assert all(0.0 <= a <= 1.0 for a in r.accuracy["values"]) and all(map(math.isfinite, r.lm["values"]))
        assert r.lm_lr in protocol.LR_SERIES and r.cls_lr in protocol.LR_SERIES
        assert r.lm_step_ms > 0 and r.cls_step_ms > 0 and r.memory["total"] > 0 and r.checkpoint_bytes > 0
    assert rows["full"].lm_vs_full == rows["full"].accuracy_vs_full == "(reference)"
    for name in ("lora", "prompt", "lora r=1 q"):
        assert rows[name].lm_vs_full == protocol.verdict(rows[name].lm, rows["full"].lm, name, "full", True)
        assert rows[name].accuracy_vs_full == protocol.verdict(rows[name].accuracy, rows["full"].accuracy, name,
                                                               "full", False)
    assert rows["lora"].trainable == 8192 and rows["prompt"].trainable == rows["lora r=1 q"].trainable == 1024
    # latency from the methods' own rows; merged and unmerged for LoRA
    assert set(rows["lora"].latency_ms) == set(rows["lora"].latency_unmerged_ms) == {"1", "32"}
    assert set(rows["prompt"].latency_ms) == {"1", "32"} and not rows["prompt"].latency_unmerged_ms
    assert not rows["lora r=1 q"].latency_ms
    assert result.protocol["report_seeds"] == seeds and result.protocol["split"]["corpus"] == "python-email"
    assert result.protocol["classification_split"]["test_snippets"] > 0


def test_the_matched_pair_and_its_finding(result):
    (pair,) = result.matched
    assert (pair["method"], pair["lora"], pair["trainable"], pair["lora_trainable"]) == ("prompt", "lora r=1 q",
                                                                                        1024, 1024)
    rows = {r.method: r for r in result.rows + result.matched_rows}
    assert pair["lm_verdict"] == protocol.verdict(rows["lora r=1 q"].lm, rows["prompt"].lm, "lora r=1 q", "prompt",
                                                  True)
    claims = [f["claim"] for f in result.findings]
    assert any(c.startswith("LoRA beats prompt at a matched budget") for c in claims)
    assert any("matches full fine-tuning (language modelling)" in c for c in claims)
    assert all(set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "compare"
               for f in result.findings)


def test_summary_table_json_and_plot(result, tmp_path):
    text = compare.summary(result)
    assert "protocol: select on dev, report on test" in text and "findings:" in text
    assert "matched budgets" in text and "lora before merging" in text and "base (no training)" in text
    for f in result.findings:
        assert f["verdict"] in text
    paths = compare.save(result, tmp_path / "out")
    with open(paths[0]) as f:
        table = list(csv.DictReader(f))
    assert [row["method"] for row in table] == ["base (no training)", *METHODS_RUN, "lora r=1 q"]
    saved = json.loads(paths[1].read_text())
    assert saved["findings"] == result.findings and saved["protocol"]["tuning"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compare.plot(compare.CompareResult(**saved), tmp_path / "again.png")      # from result.json too


# ----------------------------------------------------------------------------------------------------
# the logic, on synthetic numbers


def test_matched_lora_is_the_nearest_count_with_ties_to_the_earlier_target_set():
    for budget in (1024, 5760, 8192, 9248, 75840, 3000):
        r, targets = compare.matched_lora(budget, 4, 128)
        best = min(abs(compare.lora_trainable(q, t, 4, 128) - budget)
                   for t in compare.TARGET_SETS for q in range(1, 129))
        assert abs(compare.lora_trainable(r, targets, 4, 128) - budget) == best
    assert compare.matched_lora(8192, 4, 128) == (4, ("q_proj", "v_proj"))          # the paper's targets first
    assert compare.matched_lora(1024, 4, 128) == (1, ("q_proj",))
    # 6,144 = r 3 on Wq, Wv = r 2 on Wq, Wk, Wv = r 6 on Wq: the paper's target set wins the tie
    assert compare.matched_lora(5760, 4, 128) == (3, ("q_proj", "v_proj"))
    # 9,216 = r 3 on Wq, Wk, Wv = r 9 on Wq: more matrices at a lower rank win
    assert compare.matched_lora(9248, 4, 128) == (3, ("q_proj", "k_proj", "v_proj"))


def test_plan_matches_reuses_the_lora_method_where_it_is_the_match():
    plans = {m: (budget, lora) for m, budget, lora in compare.plan_matches(compare.CompareSettings())}
    assert set(plans) == set(compare.MATCHED)
    assert plans["prefix"] == (8192, compare.Configuration("lora", "lora"))
    budget, lora = plans["bitfit"]
    assert budget == 5760 and lora.label == "lora r=3 q,v" and lora.lora.scale == compare.LORA_SCALE
    only = compare.plan_matches(compare.CompareSettings(methods=("lora", "adapters")))
    assert [m for m, _, _ in only] == ["adapters"]


def test_pareto_front():
    points = [(10, 3.0), (100, 2.5), (50, 2.8), (60, 2.9), (1000, 2.5), (5, 3.5)]
    assert compare.pareto_front(points, lower_is_better=True) == [5, 0, 2, 1]
    accuracies = [(10, 0.3), (100, 0.6), (50, 0.3), (1000, 0.7)]
    assert compare.pareto_front(accuracies, lower_is_better=False) == [0, 1, 3]


def _synthetic_row(name, lm_values, acc_values, trainable=1000):
    return compare.MethodResult(name, trainable, 1.0, dataclasses.asdict(protocol.interval(lm_values)),
                                dataclasses.asdict(protocol.interval(acc_values)), 1e-2, 1e-2, "", "", 1.0, 1.0,
                                {"total": 1, "activations": 1}, 1)


def test_verdicts_and_findings_follow_the_intervals():
    full = _synthetic_row("full", [2.50, 2.51, 2.52], [0.60, 0.61, 0.62])
    lora = _synthetic_row("lora", [2.80, 2.81, 2.82], [0.59, 0.61, 0.63])      # worse LM, overlapping accuracy
    prompt = _synthetic_row("prompt", [3.10, 3.11, 3.12], [0.20, 0.21, 0.22])
    matched = _synthetic_row("lora r=1 q", [2.90, 2.91, 2.92], [0.30, 0.31, 0.32])
    assert compare._versus(lora, full, "lm") == "full better"
    assert compare._versus(lora, full, "accuracy") == protocol.NOT_DISTINGUISHABLE
    assert compare._versus(full, full, "lm") == "(reference)" and compare._versus(lora, None, "lm").startswith("no ")
    by_label = {r.method: r for r in (full, lora, prompt, matched)}
    pairs = compare.matched_pairs([("prompt", 1024, compare.Configuration("lora r=1 q", "lora"))], by_label)
    assert pairs[0]["lm_verdict"] == pairs[0]["accuracy_verdict"] == "lora r=1 q better"
    result = compare.CompareResult({"seeds": [1, 2, 3]}, {}, [full, lora, prompt], [matched], pairs, {}, [])
    found = {f["claim"]: f["verdict"] for f in compare.findings(result)}
    assert found["LoRA (r=4 on Wq, Wv) matches full fine-tuning (language modelling)"] == "full fine-tuning better"
    assert found["LoRA (r=4 on Wq, Wv) matches full fine-tuning (classification)"] == protocol.NOT_DISTINGUISHABLE
    (matched_claim,) = [c for c in found if c.startswith("LoRA beats prompt")]
    assert found[matched_claim] == "language modelling: lora r=1 q better; classification: lora r=1 q better"


def test_reporting_seeds_are_never_the_selection_seed_and_make_an_interval():
    for seeds in ((0, 1), (1,), (2, 2)):
        with pytest.raises(ValueError, match="reporting seeds"):
            compare_methods(methods=("bitfit",), settings=compare.CompareSettings.fast(seeds=seeds))
    assert 0 not in compare.CompareSettings().seeds and 0 not in compare.CompareSettings.fast().seeds


def test_every_method_has_a_grid_centre_in_the_rate_series():
    assert tuple(compare.GRID_CENTRES) == METHODS and compare.CompareSettings().methods == METHODS
    assert all(lr in protocol.LR_SERIES for pair in compare.GRID_CENTRES.values() for lr in pair)


# ----------------------------------------------------------------------------------------------------
# the one recipe, the command


def test_compare_fine_tunes_through_the_one_recipe(monkeypatch):
    from minilora import finetune

    calls = []

    def spy(model, method, data, *args, **kwargs):
        calls.append((method, type(data).__name__))
        return finetune.finetune(model, method, data, *args, **kwargs)

    monkeypatch.setattr(compare, "finetune", spy)
    result = compare_methods(methods=("bitfit",), fast=True)
    assert {c[0] for c in calls} == {"bitfit"}
    assert {c[1] for c in calls} == {"Corpus", "ClassificationTask"}
    runs = len(result.protocol["tuning"]["bitfit (language modelling)"]["dev_scores"]) + 2
    assert [c[1] for c in calls].count("Corpus") == runs
    row = result.rows[0]
    assert row.latency_ratio["1"] > 0 and not row.latency_unmerged_ms


def test_compare_command_and_bad_method(tmp_path, capsys):
    from minilora.cli import main

    assert main(["compare", "--fast", "--methods", "bitfit", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bitfit" in out and "findings:" in out and (tmp_path / "table.csv").exists()
    assert main(["compare", "--fast", "--methods", "bitfit,lora9", "--out", str(tmp_path)]) == 2
    assert "unknown fine-tuning method 'lora9'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        compare_methods(methods=("lora9",), fast=True)
