"""The intrinsic-dimension studies in fast mode: the toy's d_int100 is exactly 10 and its d90 follows Li et al.'s
90% rule; the MLP study selects on dev only and reports d90 over the reporting seeds; the cost study's verdicts
follow from intervals; every study plots and summarises, and records its protocol and findings."""
import dataclasses
import math

import pytest

from minilora.experiments import intrinsic_cost, intrinsic_mlp, intrinsic_toy, protocol, study

PNG = b"\x89PNG\r\n\x1a\n"
VERDICTS = {"meets", "misses", protocol.NOT_DISTINGUISHABLE}


@pytest.fixture(scope="module")
def toy():
    return intrinsic_toy.run(fast=True, seed=0)


@pytest.fixture(scope="module")
def mlp():
    return intrinsic_mlp.run(fast=True, seed=0)


@pytest.fixture(scope="module")
def cost():
    return intrinsic_cost.run(fast=True, seed=0)


def test_the_cli_names_resolve():
    assert study("intrinsic-toy") is intrinsic_toy
    assert study("intrinsic-mlp") is intrinsic_mlp
    assert study("intrinsic-cost") is intrinsic_cost


def interval(values):
    return dataclasses.asdict(protocol.interval(values))


# ----------------------------------------------------------------------------------------------------
# toy


def test_toy_d_int100_is_exactly_ten_on_every_problem(toy):
    assert toy.d_int100 == {"fastfood": 10, "dense": 10}
    assert toy.d_int100_seeds == {kind: [10] * len(toy.problem_seeds) for kind in intrinsic_toy.PROJECTIONS}
    assert toy.full_loss < 1e-20 * toy.start_loss
    for kind, losses in toy.exact.items():
        for d, loss in zip(toy.ds, losses):
            if d >= 10:
                assert loss < 1e-20 * toy.start_loss, (kind, d, loss)
            else:
                assert loss > 1e-3 * toy.start_loss, (kind, d, loss)
        assert len(toy.trained[kind]) == len(toy.ds) and all(math.isfinite(x) for x in toy.trained[kind])
        # the exact optimum is a lower bound for what Adam reaches in the same subspace
        assert all(t >= e - 1e-9 for t, e in zip(toy.trained[kind], losses))


def test_toy_d90_is_the_ninety_percent_rule_and_at_most_d_int100(toy):
    for kind, losses in toy.exact.items():
        d90 = toy.d90[kind]
        i = toy.ds.index(d90)
        improvement = toy.start_loss - toy.full_loss
        assert toy.start_loss - losses[i] >= 0.9 * improvement
        assert all(toy.start_loss - x < 0.9 * improvement for x in losses[:i])
        assert all(a <= b for a, b in zip(toy.d90_seeds[kind], toy.d_int100_seeds[kind]))
        assert toy.d90_interval[kind]["values"] == toy.d90_seeds[kind]


def test_toy_rules_on_synthetic_curves():
    ds = [1, 2, 3, 4]
    # start 100, full 0: 90% of the improvement means loss <= 10, and the boundary counts
    assert intrinsic_toy.d90(ds, [80, 10, 1, 0], start=100, full=0) == 2
    assert intrinsic_toy.d90(ds, [80, 10.5, 1, 0], start=100, full=0) == 3
    # the rule is on the improvement, not the loss: full = 20 makes 28 enough
    assert intrinsic_toy.d90(ds, [50, 28, 25, 20], start=100, full=20) == 2
    assert intrinsic_toy.d90(ds, [90, 80, 70, 60], start=100, full=0) is None
    assert intrinsic_toy.d_int100(ds, [80, 10, 1e-5, 1e-7], start=100) == 3
    assert intrinsic_toy.d_int100(ds, [80, 10, 1, 1e-3], start=100) is None
    assert intrinsic_toy.agreement([10, 10, 10], 10).startswith("agrees")
    assert intrinsic_toy.agreement([10, 9, 10], 10).startswith("differs")


def test_toy_protocol_and_findings(toy):
    assert 0 not in toy.protocol["report_seeds"] and toy.protocol["report_seeds"] == toy.problem_seeds
    assert toy.protocol["split"].startswith("none")
    assert len(toy.findings) == 2 * len(intrinsic_toy.PROJECTIONS)
    for f in toy.findings:
        assert set(f) == {"study", "claim", "paper", "ours", "verdict"} and f["study"] == "intrinsic-toy"
    d100 = [f for f in toy.findings if f["claim"].startswith("d_int100")]
    assert all(f["verdict"].startswith("agrees") for f in d100)
    d90 = [f for f in toy.findings if f["claim"].startswith("d90")]
    assert all(f["verdict"] in VERDICTS for f in d90)


def test_toy_d90_verdict_follows_the_interval():
    base = dict(D=1000, groups=10, ds=[1], start_loss=1.0, full_loss=0.0, problem_seeds=[1, 2, 3])
    below = intrinsic_toy.ToyResult(**base, d90_seeds={"dense": [8, 8, 9]}, d90_interval={"dense": interval([8, 8, 9])},
                                    d_int100_seeds={"dense": [10, 10, 10]})
    around = intrinsic_toy.ToyResult(**base, d90_seeds={"dense": [8, 10, 10]},
                                     d90_interval={"dense": interval([8, 10, 10])},
                                     d_int100_seeds={"dense": [10, 10, 10]})
    verdicts = lambda r: {f["claim"].split(",")[0]: f["verdict"] for f in intrinsic_toy.findings(r)}
    assert verdicts(below)["d90 (90% of the full-D improvement) below d_int100"] == "meets"
    assert verdicts(around)["d90 (90% of the full-D improvement) below d_int100"] == protocol.NOT_DISTINGUISHABLE


# ----------------------------------------------------------------------------------------------------
# MLP


def test_mlp_task_is_declared_and_far_above_chance(mlp):
    assert mlp.D == [intrinsic_mlp.parameters_of(h) for h in mlp.widths]
    assert mlp.D == [20 * h + h + h * 10 + 10 for h in mlp.widths]
    split = mlp.protocol["split"]
    assert (split["train_points"], split["dev_points"], split["test_points"]) == (mlp.n_train, mlp.n_dev, mlp.n_test)
    assert mlp.chance < 0.2
    for i in range(len(mlp.widths)):
        full = protocol.as_interval(mlp.full[i]["test"])
        assert 0.9 * full.mean > 3 * mlp.chance                        # the 90% line is far above chance
        assert full.mean > protocol.as_interval(mlp.init_accuracy[i]).mean
        assert [s["d"] for s in mlp.subspace[i]] == mlp.ds
        assert all(0.0 <= v <= 1.0 for s in mlp.subspace[i] for v in s["test"]["values"])


def test_mlp_d90_per_seed_is_the_rule_on_that_seeds_runs(mlp):
    for i in range(len(mlp.widths)):
        assert len(mlp.d90_values[i]) == len(mlp.seeds)
        for k, value in enumerate(mlp.d90_values[i]):
            accs = [s["test"]["values"][k] for s in mlp.subspace[i]]
            assert value == intrinsic_mlp.d90_of(mlp.ds, accs, mlp.full[i]["test"]["values"][k])
        if None not in mlp.d90_values[i]:
            assert mlp.d90[i]["values"] == mlp.d90_values[i]


def test_mlp_d90_rule_on_synthetic_accuracies():
    assert intrinsic_mlp.d90_of([10, 100, 1000], [0.2, 0.9, 0.95], full_accuracy=1.0) == 100     # boundary counts
    assert intrinsic_mlp.d90_of([10, 100, 1000], [0.2, 0.89, 0.95], full_accuracy=1.0) == 1000
    assert intrinsic_mlp.d90_of([10, 100], [0.2, 0.5], full_accuracy=0.9) is None


def test_mlp_selection_never_reads_test_and_reports_only_report_seeds(monkeypatch):
    """A small copy of the study (tiny widths, few steps) with every run and every held-out read recorded."""
    monkeypatch.setattr(intrinsic_mlp, "WIDTHS", (4, 8))
    monkeypatch.setattr(intrinsic_mlp, "FAST_DS", (10, 100))
    monkeypatch.setattr(intrinsic_mlp, "FAST_STEPS", 5)
    runs = []
    real_one_run = intrinsic_mlp.one_run

    def recorded(task, hidden, d, steps, lr, seed, part):
        runs.append((hidden, d, lr, seed, part))
        return real_one_run(task, hidden, d, steps, lr, seed, part)

    monkeypatch.setattr(intrinsic_mlp, "one_run", recorded)
    result = intrinsic_mlp.run(fast=True)
    assert {part for *_, seed, part in runs if seed == protocol.SELECTION_SEED} == {"dev"}
    assert {seed for *_, seed, part in runs if part == "test"} == set(protocol.report_seeds(True))
    for i, hidden in enumerate(result.widths):
        for config in [result.full[i], *result.subspace[i]]:
            tested = [(lr, seed) for h, d, lr, seed, part in runs
                      if h == hidden and d == config["d"] and part == "test"]
            assert tested == [(config["lr"], s) for s in protocol.report_seeds(True)]
            tuned = {lr for h, d, lr, seed, part in runs if h == hidden and d == config["d"] and part == "dev"}
            assert {float(lr) for lr in config["dev_scores"]} == tuned
    assert set(result.protocol["tuning"]) == {f"H={h} " + ("full" if d is None else f"d={d}")
                                               for h in (4, 8) for d in (None, 10, 100)}


def test_mlp_held_out_refuses_other_parts():
    task = intrinsic_mlp.make_task(fast=True)
    with pytest.raises(ValueError, match="part"):
        intrinsic_mlp.held_out(task, "train")


def test_mlp_verdicts_follow_the_intervals():
    def result(d90s):
        return intrinsic_mlp.MLPResult(widths=[32, 128], D=[1002, 3978], ds=[10, 100, 1000], steps=1, n_train=1,
                                       n_dev=1, n_test=1, chance=0.1, d90_values=[list(v) for v in d90s],
                                       d90=[interval(v) if None not in v else None for v in d90s], seeds=[1, 2, 3])

    small, width = intrinsic_mlp.findings(result([(100, 100, 100), (100, 200, 200)]))[1:]
    assert small["verdict"] == "meets"                                  # 167 [23, 310] < 10% of 3978
    assert width["verdict"] == protocol.NOT_DISTINGUISHABLE
    first, _, width = intrinsic_mlp.findings(result([(300, 300, 300), (100, 100, 100)]))
    assert first["verdict"] == "misses"                                 # 300 > 10% of 1002
    assert width["verdict"] == "H = 128 (lower d90) better"
    first, _, width = intrinsic_mlp.findings(result([(100, None, 100), (100, 100, 100)]))
    assert first["verdict"].startswith("misses") and width["verdict"].startswith("undetermined")


# ----------------------------------------------------------------------------------------------------
# cost


def test_cost_numbers_are_sane(cost):
    """Wall-clock times on a shared CPU: the study prints how each projection's time grows with d, and the test
    checks only what load cannot change (a timing verdict belongs to the study's output, not to a test)."""
    assert cost.D > 500_000
    for kind in intrinsic_cost.KINDS:
        assert len(cost.seconds[kind]) == len(cost.ds) == len(cost.intervals[kind])
        assert all(s is None or s > 0 for s in cost.seconds[kind])
        for s, iv in zip(cost.seconds[kind], cost.intervals[kind]):
            assert (s is None) == (iv is None)
            if iv is not None:
                assert iv["n"] == cost.repeats and min(iv["values"]) <= s <= max(iv["values"])
    assert all(s is not None for s in cost.seconds["fastfood"])
    assert intrinsic_cost.growth(cost, "dense") is not None
    assert cost.protocol["split"].startswith("none") and cost.protocol["repeats"] == cost.repeats
    assert len(cost.findings) == 3


def test_growth_is_the_time_at_the_largest_measured_d_over_the_smallest():
    result = intrinsic_cost.CostResult(D=100, ds=[10, 30, 100], repeats=1,
                                       seconds={"dense": [1.0, 3.0, None], "fastfood": [2.0, 2.5, 3.0],
                                                "sparse": [None, None, 4.0]})
    assert intrinsic_cost.growth(result, "dense") == 3.0
    assert intrinsic_cost.growth(result, "fastfood") == 1.5
    assert intrinsic_cost.growth(result, "sparse") is None


def test_cost_verdicts_follow_the_intervals():
    times = lambda centre: interval([centre * 0.99, centre, centre * 1.01])
    result = intrinsic_cost.CostResult(D=100, ds=[10, 100, 1000], repeats=3,
                                       intervals={"dense": [times(1.0), times(10.0), None],
                                                  "fastfood": [times(2.0), times(2.0), times(3.0)],
                                                  "sparse": [None, None, None]})
    grows, cheaper, flat = intrinsic_cost.findings(result)
    assert grows["verdict"] == "grows"
    assert cheaper["claim"].startswith("Fastfood cheaper than dense at d = 100")
    assert cheaper["verdict"] == "Fastfood better"
    assert flat["verdict"] == "meets"                                   # 3 << 2 x 100
    result.intervals["fastfood"][-1] = times(200.0)
    assert intrinsic_cost.findings(result)[2]["verdict"] == "not distinguishable"


# ----------------------------------------------------------------------------------------------------
# every study


@pytest.mark.parametrize("name", ["toy", "mlp", "cost"])
def test_plot_summary_protocol_and_findings(name, request, tmp_path):
    module = {"toy": intrinsic_toy, "mlp": intrinsic_mlp, "cost": intrinsic_cost}[name]
    result = request.getfixturevalue(name)
    path = tmp_path / f"{name}.png"
    module.plot(result, path)
    assert path.read_bytes()[:8] == PNG
    text = module.summary(result)
    assert "findings:" in text and "protocol" in text
    for f in result.findings:
        assert f["verdict"] in text
    assert protocol.SELECTION_SEED not in result.protocol["report_seeds"]
    data = dataclasses.asdict(result)
    assert set(data) >= {"protocol", "findings"}
    if name == "toy":
        assert "d90 = " in text and "d_int100 = 10" in text
    if name == "mlp":
        assert f"{protocol.as_interval(result.full[0]['test']).text(3)}" in text
    if name == "cost":
        assert f"{result.D:,}" in text
