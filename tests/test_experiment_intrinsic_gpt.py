"""intrinsic-gpt study: the d90 convention and its intervals, the verdict logic, training to convergence, the
protocol (select on dev, report on test), the pretraining series (same recipe as the CLI, deterministic, cached,
checked against the shipped model) and the fast run's outputs."""
import dataclasses
import json
import math

import numpy as np
import pytest

from minilora import backend
from minilora.core.intrinsic import SubspaceModel
from minilora.experiments import common, intrinsic_gpt, protocol
from minilora.experiments import pretraining_series as ps
from minilora.experiments.intrinsic_gpt import Convergence
from minilora.pretrained import load_pretrained


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("intrinsic-gpt-cache")


@pytest.fixture(scope="module")
def result(cache):
    return intrinsic_gpt.run(fast=True, seed=0, cache_dir=cache)


# ----------------------------------------------------------------------------------------------------
# the d90 convention


def test_threshold_crossing_convention():
    xs = [10, 100, 1000, 10000]
    crossing = intrinsic_gpt.threshold_crossing
    # target 0.9, crossed between 100 (0.5) and 1000 (1.3): halfway in log d
    x, how = crossing(xs, [0.1, 0.5, 1.3, 1.0], 0.9)
    assert how == "interpolated" and x == pytest.approx(10 ** 2.5)
    x, how = crossing(xs, [0.0, 0.45, 0.9, 0.95], 0.9)
    assert how == "interpolated" and x == pytest.approx(1000)
    assert crossing(xs, [0.95, 0.2, 0.3, 0.4], 0.9) == (10.0, "first point")
    assert crossing(xs, [0.1, 0.2, 0.3, 0.89], 0.9) == (None, "above max")
    # the untrained model already reaches the target: d90 = 0, whatever the sweep did
    assert crossing(xs, [0.1, 0.2, 0.3, 0.4], 0.9, start=0.95) == (0.0, "untrained")
    assert crossing(xs, [0.1, 0.2, 0.3, 0.4], 0.9, start=0.5)[1] == "above max"
    # the first crossing counts, even if a later point falls back below
    assert crossing(xs, [0.0, 0.9, 0.1, 1.0], 0.9)[0] == pytest.approx(100)
    with pytest.raises(ValueError):
        crossing([100, 10], [0.1, 0.2], 0.9)
    with pytest.raises(ValueError):
        crossing([10, 100], [0.1], 0.9)


def test_d90_is_an_absolute_target_not_an_improvement_over_the_start():
    """Two models with the same full fine-tuning score get the same target, wherever they started."""
    ln_v = intrinsic_gpt.reference_loss(96)
    assert ln_v == pytest.approx(math.log(96))
    full_loss = 2.0
    target = 0.9 * intrinsic_gpt.score_of(full_loss, 96)
    # the target as a loss: L_full + 0.1 (ln V - L_full)
    assert ln_v - target == pytest.approx(full_loss + 0.1 * (ln_v - full_loss))
    xs = [100, 1000]
    trained = [intrinsic_gpt.score_of(2.5, 96), intrinsic_gpt.score_of(2.1, 96)]
    for start_loss in (ln_v, 2.3):          # a random initialisation and a pretrained model
        start = intrinsic_gpt.score_of(start_loss, 96)
        assert intrinsic_gpt.threshold_crossing(xs, trained, target, start) == \
            intrinsic_gpt.threshold_crossing(xs, trained, target, None)


def test_d_summary_interval_in_log_d_and_censored_ranges():
    xs = [100, 1000, 10000]
    summ = intrinsic_gpt.d_summary([(100.0, "interpolated"), (1000.0, "interpolated"), (10000.0, "interpolated")], xs)
    assert summ["kind"] == "interval" and summ["geomean"] == pytest.approx(1000)
    iv = protocol.interval([2.0, 3.0, 4.0])
    assert summ["low"] == pytest.approx(10 ** iv.low) and summ["high"] == pytest.approx(10 ** iv.high)
    assert intrinsic_gpt.d_text(summ).startswith("1000 [")

    above = intrinsic_gpt.d_summary([(None, "above max")] * 2, xs)
    assert (above["low"], above["high"]) == (10000, None) and intrinsic_gpt.d_text(above) == "> 10000"
    below = intrinsic_gpt.d_summary([(100.0, "first point"), (100.0, "first point")], xs)
    assert (below["low"], below["high"]) == (0.0, 100.0) and intrinsic_gpt.d_text(below) == "<= 100"
    mixed = intrinsic_gpt.d_summary([(300.0, "interpolated"), (None, "above max")], xs)
    assert (mixed["low"], mixed["high"]) == (300.0, None)
    zero = intrinsic_gpt.d_summary([(0.0, "untrained")] * 2, xs)
    assert zero["high"] == 0 and "untrained" in intrinsic_gpt.d_text(zero)
    json.dumps([summ, above, below, mixed, zero], allow_nan=False)


def test_d_verdicts_follow_the_intervals():
    xs = [100, 1000, 10000, 100000]
    interval = lambda *values: intrinsic_gpt.d_summary([(v, "interpolated") for v in values], xs)
    above = intrinsic_gpt.d_summary([(None, "above max")] * 3, xs)
    below = intrinsic_gpt.d_summary([(100.0, "first point")] * 3, xs)
    low, high = interval(300, 310, 320), interval(30000, 31000, 32000)
    assert intrinsic_gpt.d_verdict(low, high, "late", "early") == "late better"
    assert intrinsic_gpt.d_verdict(high, low, "late", "early") == "early better"
    assert intrinsic_gpt.d_verdict(interval(300, 30000, 3000), low, "late", "early") == protocol.NOT_DISTINGUISHABLE
    # censored: "> 100000" is above any interval that ends below 100000; "<= 100" overlaps an interval reaching 100
    assert intrinsic_gpt.d_verdict(high, above, "late", "early") == "late better"
    assert intrinsic_gpt.d_verdict(above, above, "late", "early") == protocol.NOT_DISTINGUISHABLE
    assert intrinsic_gpt.d_verdict(below, low, "late", "early") == "late better"
    assert intrinsic_gpt.d_verdict(below, interval(50, 90, 200), "late", "early") == protocol.NOT_DISTINGUISHABLE


def _synthetic_result(d90s, said_pairs=(), lora_fractions=()):
    """A result holding only what findings() reads."""
    xs = [100, 1000, 10000]
    result = intrinsic_gpt.IntrinsicGPTResult(
        fast=True, metric="", reference_loss=math.log(96), fraction=0.9, D=1, n_tensors=1, projection="fastfood",
        ds=xs, d_ref=1000, said_ds=[1000], ranks=[1], convergence={})
    for step, values in d90s:
        result.checkpoints.append({"step": step, "d90": intrinsic_gpt.d_summary(
            [(v, "interpolated") if v is not None else (None, "above max") for v in values], xs)})
    for said, did in said_pairs:
        block = lambda v: {"test": dataclasses.asdict(protocol.interval(v))}
        result.said.append({"d": 1000, "said": block(said), "did": block(did),
                            "verdict": protocol.verdict(protocol.interval(said), protocol.interval(did), "SAID",
                                                        "DID", lower_is_better=False)})
    for r, values in lora_fractions:
        fraction = dataclasses.asdict(protocol.interval(values))
        result.lora.append({"r": r, "fraction": fraction,
                            "verdict": protocol.verdict_above(fraction, 0.9, lower_is_better=False)})
    return result


def test_findings_verdicts_from_synthetic_intervals():
    falls = _synthetic_result([(0, [None] * 3), (300, [5000, 6000, 7000]), (1800, [300, 310, 320])],
                              said_pairs=[([1.0, 1.1, 1.05], [0.5, 0.55, 0.6])],
                              lora_fractions=[(1, [0.95, 0.96, 0.97])])
    found = intrinsic_gpt.findings(falls)
    assert found[0]["verdict"].startswith("lower after pretraining")
    assert found[1]["verdict"].startswith("lower at 2 of 2 stages")
    assert found[2]["verdict"] == "SAID better"
    assert found[3]["verdict"].startswith("meets 90%")
    for f in found:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "intrinsic-gpt"

    rises = _synthetic_result([(0, [300, 310, 320]), (1800, [None] * 3)],
                              said_pairs=[([1.0, 1.5, 0.5], [1.0, 1.1, 0.9])], lora_fractions=[(1, [0.5, 0.6, 0.55])])
    found = intrinsic_gpt.findings(rises)
    assert found[0]["verdict"].startswith("HIGHER after pretraining")
    assert found[2]["verdict"] == protocol.NOT_DISTINGUISHABLE
    assert found[3]["verdict"].startswith("misses 90%")
    same = intrinsic_gpt.findings(_synthetic_result([(0, [300, 3000, 30000]), (1800, [1000, 1100, 1200])]))
    assert same[0]["verdict"].startswith(protocol.NOT_DISTINGUISHABLE)


# ----------------------------------------------------------------------------------------------------
# training to convergence, and the protocol


TINY = Convergence(batch_size=2, warmup_steps=0, check_every=1, check_windows=2, tolerance=0.0, patience=100,
                   full_cap=3, subspace_cap=3, score_windows=2, eval_batch=2)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("lr", [1e-3, 0.3])
def test_a_run_is_scored_at_its_best_dev_check(lr):
    """Scored on dev with the check's windows, the run's loss is the lowest of its dev curve, whatever the rate
    (0.3 makes the full model worse after its first step: then the untrained weights are the best)."""
    record = intrinsic_gpt.train_to_convergence(load_pretrained(dropout=0.0), lr, 1, "dev", 3, TINY)
    losses = [loss for _, loss in record["curve"]]
    assert [step for step, _ in record["curve"]] == [0, 1, 2, 3]
    assert record["loss"] == pytest.approx(min(losses), abs=1e-6)
    assert record["best_step"] == record["curve"][int(np.argmin(losses))][0]
    assert record["score"] == pytest.approx(math.log(96) - record["loss"])
    assert not record["converged"] and record["stopped_at"] == 3


def test_a_run_stops_when_the_dev_loss_stops_improving():
    stalls = dataclasses.replace(TINY, tolerance=100.0, patience=1)       # no gain can beat 100 nats
    record = intrinsic_gpt.train_to_convergence(load_pretrained(dropout=0.0), 1e-3, 1, "dev", 3, stalls)
    assert record["converged"] and record["stopped_at"] == 1 and len(record["curve"]) == 2


def test_runs_select_on_dev_and_report_on_test(monkeypatch):
    """A selection run (part "dev") never reads the test half; a reporting run does, for its score only."""
    real = common.held_out
    read = []

    def guarded(part):
        read.append(part)
        if part == "test":
            raise AssertionError("a selection run read the test half")
        return real(part)

    monkeypatch.setattr(common, "held_out", guarded)
    model = SubspaceModel(load_pretrained(dropout=0.0), 200, "fastfood", seed=0)
    intrinsic_gpt.train_to_convergence(model, 0.03, protocol.SELECTION_SEED, "dev", 2, TINY)
    assert set(read) == {"dev"}
    with pytest.raises(AssertionError, match="test half"):
        intrinsic_gpt.train_to_convergence(load_pretrained(dropout=0.0), 1e-3, 1, "test", 2, TINY)


def test_fast_run_follows_the_protocol(result):
    seeds = list(protocol.report_seeds(True))
    record = result.protocol
    assert record["report_seeds"] == seeds and protocol.SELECTION_SEED not in seeds
    assert record["split"]["corpus"] == "python-email"
    steps = result.series["steps"]
    expected = {f"full @ step {s}" for s in steps} | {f"DID d={result.d_ref} @ step {s}" for s in steps}
    expected |= {f"SAID d={result.d_ref} @ step {steps[-1]}"} | {f"LoRA r={r}" for r in result.ranks}
    assert set(record["tuning"]) == expected
    blocks = [b for c in result.checkpoints for b in [c["full"], *c["did"]]]
    blocks += [e["said"] for e in result.said] + [e["block"] for e in result.lora]
    for block in blocks:
        assert [run["seed"] for run in block["runs"]] == seeds
        assert block["test"]["n"] == len(seeds) and block["scores"] == [run["score"] for run in block["runs"]]
    for c in result.checkpoints:
        # the tuned rate at D_REF, scaled by sqrt(d_ref / d) elsewhere
        tuned = record["tuning"][f"DID d={result.d_ref} @ step {c['step']}"]["best"]
        for d, block in zip(result.ds, c["did"]):
            assert block["lr"] == pytest.approx(tuned * math.sqrt(result.d_ref / d))
        assert c["full"]["lr"] == record["tuning"][f"full @ step {c['step']}"]["best"]


def test_fast_run_trains_the_right_numbers(result):
    for c in result.checkpoints:
        for d, block in zip(result.ds, c["did"]):
            assert {run["trainable"] for run in block["runs"]} == {d}
        assert {run["trainable"] for run in c["full"]["runs"]} == {result.D}
    for entry in result.said:          # SAID: d numbers in total (d - m subspace coordinates and m lambdas)
        assert {run["trainable"] for run in entry["said"]["runs"]} == {entry["d"]}
        assert entry["did"] is result.checkpoints[-1]["did"][result.ds.index(entry["d"])]
    config = load_pretrained().config
    for entry in result.lora:
        expected = common.attention_lora_parameters(entry["r"], intrinsic_gpt.TARGETS, config.n_layer, config.n_embd)
        assert {run["trainable"] for run in entry["block"]["runs"]} == {expected}
    assert result.n_tensors == len(load_pretrained().parameters(trainable_only=True))


def test_fast_run_d90_from_per_seed_sweeps(result):
    for c in result.checkpoints:
        assert len(c["d90"]["values"]) == len(protocol.report_seeds(True))
        for k, full_score in enumerate(c["full"]["scores"]):
            x, how = intrinsic_gpt.threshold_crossing(result.ds, [b["scores"][k] for b in c["did"]],
                                                      0.9 * full_score, c["untrained_score"])
            assert (c["d90"]["values"][k], c["d90"]["how"][k]) == (x, how)
        for run in [*c["full"]["runs"], *[r for b in c["did"] for r in b["runs"]]]:
            assert run["curve"][0][0] == 0 and math.isfinite(run["loss"])
    json.dumps(dataclasses.asdict(result), allow_nan=False)


def test_summary_and_findings(result):
    text = intrinsic_gpt.summary(result)
    for c in result.checkpoints:
        assert intrinsic_gpt.d_text(c["d90"]) in text
    assert "ln 96 - test loss" in text and "select on dev, report on test" in text
    assert len(result.findings) == 2 + len(result.said) + (1 if result.lora else 0)
    for f in result.findings:
        assert f["verdict"] in text


def test_plot_writes_a_png(result, tmp_path):
    path = tmp_path / "plot.png"
    intrinsic_gpt.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# the pretraining series


def test_recipe_is_what_minilora_pretrain_runs(monkeypatch, tmp_path):
    """The recipe's model and TrainConfig are those `minilora pretrain` (defaults) trains, but for the thread
    count, which the recipe fixes to the shipped run's, and the fields that do not change the weights."""
    from minilora import cli, train

    captured = {}

    class Captured(Exception):
        pass

    def fake_fit(model, train_ids, val_ids, config, **kwargs):
        captured.update(model=model, config=config)
        raise Captured

    monkeypatch.setattr(train, "fit", fake_fit)
    args = cli.build_parser().parse_args(["pretrain", "--out", str(tmp_path)])
    with pytest.raises(Captured):
        args.func(args)
    recipe = ps.Recipe()
    ours, theirs = recipe.train_config(), captured["config"]
    for name in ("steps", "batch_size", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1",
                 "beta2", "grad_clip", "seed"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert theirs.threads is None and ours.threads == ps.SHIPPED_THREADS
    model = recipe.initial_model()
    assert model.config == captured["model"].config
    for (name, a), (_, b) in zip(model.named_parameters(), captured["model"].named_parameters()):
        assert np.array_equal(backend.to_numpy(a.data), backend.to_numpy(b.data)), name
    info = load_pretrained().config
    assert dataclasses.replace(info, dropout=recipe.dropout) == recipe.model_config()


def test_series_replay_is_deterministic_and_cached(tmp_path):
    recipe = ps.Recipe(steps=2, batch_size=2)
    first = ps.build_series(recipe, (0, 1, 2), tmp_path / "a")
    again = ps.build_series(recipe, (0, 1, 2), tmp_path / "b")
    assert not first.reused and first.steps == [0, 1, 2] and first.shipped_max_abs_diff is None
    assert [step for step, _ in first.curve] == [0, 1, 2]
    for i in range(3):
        a = dict(first.model(i).named_parameters())
        b = dict(again.model(i).named_parameters())
        assert all(np.array_equal(backend.to_numpy(a[k].data), backend.to_numpy(b[k].data)) for k in a)
    start = dict(first.model(0).named_parameters())
    init = dict(recipe.initial_model().named_parameters())
    assert all(np.array_equal(backend.to_numpy(start[k].data), backend.to_numpy(init[k].data)) for k in init)
    cached = ps.build_series(recipe, (0, 1, 2), tmp_path / "a")
    assert cached.reused and cached.paths == first.paths and cached.curve == first.curve
    with pytest.raises(ValueError, match="keep"):
        ps.build_series(recipe, (1, 2), tmp_path / "c")


def test_a_series_that_misses_the_shipped_model_is_refused():
    assert ps.check_against_shipped(load_pretrained()) == 0.0
    with pytest.raises(RuntimeError, match="does not end where the shipped model did"):
        ps._refuse_if_not_shipped(ps.Recipe(), 1e-3, 2 * ps.SHIPPED_LOSS_TOLERANCE)
    with pytest.raises(RuntimeError, match="does not end where the shipped model did"):
        ps._refuse_if_not_shipped(ps.Recipe(), 1e-3, -2 * ps.SHIPPED_LOSS_TOLERANCE)
    ps._refuse_if_not_shipped(ps.Recipe(), 0.0, 1.0)                      # the same weights: the same run
    ps._refuse_if_not_shipped(ps.Recipe(), 0.5, ps.SHIPPED_LOSS_TOLERANCE / 2)   # a replay that ends as good
    ps._refuse_if_not_shipped(ps.Recipe(steps=2), None, None)    # a shortened recipe is not checked
    assert abs(ps.loss_difference(load_pretrained(), ps.Recipe())) == 0.0
    assert ps.Recipe().is_shipped() and not ps.Recipe(steps=2).is_shipped()
    from minilora.io.pretrained import pretrained_info

    info = pretrained_info()
    recipe = ps.Recipe()
    assert (info["corpus"], info["steps"], info["batch_size"], info["seed"]) == \
        (recipe.corpus, recipe.steps, recipe.batch_size, recipe.seed)
