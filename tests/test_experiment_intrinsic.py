"""The intrinsic-dimension studies in fast mode: the toy's d90 is exactly 10, the MLP and cost studies give sane
numbers, and every study plots and summarises."""
import math

import pytest

from minilora.experiments import intrinsic_cost, intrinsic_mlp, intrinsic_toy, study

PNG = b"\x89PNG\r\n\x1a\n"


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


def test_toy_intrinsic_dimension_is_exactly_ten(toy):
    assert toy.d90 == {"fastfood": 10, "dense": 10}
    assert toy.full_loss < 1e-20 * toy.start_loss
    for kind, losses in toy.exact.items():
        for d, loss in zip(toy.ds, losses):
            if d >= 10:
                assert loss < 1e-20 * toy.start_loss, (kind, d, loss)
            else:
                assert loss > 1e-3 * toy.start_loss, (kind, d, loss)
        assert len(toy.trained[kind]) == len(toy.ds) and all(math.isfinite(x) for x in toy.trained[kind])
        # the trained path follows the exact one where the problem is well posed: large d reaches ~0
        assert all(t >= e - 1e-9 for t, e in zip(toy.trained[kind], losses))


def test_mlp_accuracies_are_sane(mlp):
    assert mlp.D == 3 * 96 * mlp.hidden + mlp.hidden + mlp.hidden * 96 + 96
    assert mlp.ds and len(mlp.accuracies) == len(mlp.ds)
    for a in [mlp.full_accuracy, mlp.init_accuracy, mlp.chance, *mlp.accuracies]:
        assert 0.0 <= a <= 1.0
    assert mlp.full_accuracy > mlp.init_accuracy
    assert all(math.isfinite(x) for x in mlp.train_losses)
    assert mlp.d90 is None or mlp.d90 in mlp.ds


def test_cost_numbers_are_sane(cost):
    """Wall-clock times on a shared CPU: the study prints how each projection's time grows with d, and the test
    checks only what load cannot change (a timing verdict belongs to the study's output, not to a test)."""
    assert cost.D > 500_000
    for kind in intrinsic_cost.KINDS:
        assert len(cost.seconds[kind]) == len(cost.ds)
        assert all(s is None or s > 0 for s in cost.seconds[kind])
    assert all(s is not None for s in cost.seconds["fastfood"])
    assert intrinsic_cost.growth(cost, "dense") is not None


def test_growth_is_the_time_at_the_largest_measured_d_over_the_smallest():
    result = intrinsic_cost.CostResult(D=100, ds=[10, 30, 100], repeats=1,
                                       seconds={"dense": [1.0, 3.0, None], "fastfood": [2.0, 2.5, 3.0],
                                                "sparse": [None, None, 4.0]})
    assert intrinsic_cost.growth(result, "dense") == 3.0
    assert intrinsic_cost.growth(result, "fastfood") == 1.5
    assert intrinsic_cost.growth(result, "sparse") is None


@pytest.mark.parametrize("name", ["toy", "mlp", "cost"])
def test_plot_and_summary(name, request, tmp_path):
    module = {"toy": intrinsic_toy, "mlp": intrinsic_mlp, "cost": intrinsic_cost}[name]
    result = request.getfixturevalue(name)
    path = tmp_path / f"{name}.png"
    module.plot(result, path)
    assert path.read_bytes()[:8] == PNG
    text = module.summary(result)
    assert any(ch.isdigit() for ch in text)
    if name == "toy":
        assert "d90 (fastfood) = 10" in text and "d90 (dense) = 10" in text
    if name == "mlp":
        assert f"{mlp_full(result):.4f}" in text
    if name == "cost":
        assert f"{cost_d(result):,}" in text


def mlp_full(result):
    return result.full_accuracy


def cost_d(result):
    return result.D
