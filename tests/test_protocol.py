"""The studies' protocol: the declared split, intervals, verdicts from intervals, learning-rate tuning, findings."""
import math

import numpy
import pytest

from minilora.experiments import common, protocol


# ----------------------------------------------------------------------------------------------------
# the split


def test_the_downstream_split_is_disjoint_and_covers_the_held_out_text():
    corpus, split = common.downstream(), common.split()
    assert numpy.array_equal(split.train, corpus.train)
    assert numpy.array_equal(numpy.concatenate([split.dev, split.test]), corpus.val)
    assert abs(len(split.dev) - len(split.test)) <= 1
    assert numpy.array_equal(common.held_out("dev").val, split.dev)
    assert numpy.array_equal(common.held_out("test").val, split.test)
    assert "select on dev, report on test" in split.describe()


def test_held_out_refuses_an_unknown_part():
    with pytest.raises(ValueError, match="'validation'"):
        common.held_out("validation")


def test_a_classification_task_splits_per_class_in_order():
    from minilora.tasks import load_task

    task = load_task("prose-or-package", length=31, val_per_class=6)
    dev, test = protocol.split_task(task)
    for k in range(len(task.classes)):
        rows = task.val_x[task.val_y == k]
        assert numpy.array_equal(numpy.concatenate([dev.val_x[dev.val_y == k], test.val_x[test.val_y == k]]), rows)
        assert (dev.val_y == k).sum() == 3 and (test.val_y == k).sum() == 3


# ----------------------------------------------------------------------------------------------------
# intervals and verdicts


@pytest.mark.parametrize("df, expected", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (30, 2.0422725)])
def test_t_quantiles_match_the_tables(df, expected):
    assert protocol.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_an_interval_is_the_student_t_interval_of_the_mean():
    values = [1.0, 2.0, 4.0]
    got = protocol.interval(values)
    half = 4.3026527 * numpy.std(values, ddof=1) / math.sqrt(3)
    assert got.mean == pytest.approx(7 / 3)
    assert (got.low, got.high) == pytest.approx((7 / 3 - half, 7 / 3 + half), abs=1e-6)
    assert got.values == values and got.n == 3


@pytest.mark.parametrize("values", [[1.0], [], [1.0, float("nan")], [1.0, float("inf")]])
def test_an_interval_refuses_too_few_or_non_finite_values(values):
    with pytest.raises(ValueError, match="interval needs"):
        protocol.interval(values)


def test_verdicts_follow_the_intervals():
    low = protocol.interval([1.0, 1.1, 0.9])
    high = protocol.interval([2.0, 2.1, 1.9])
    wide = protocol.interval([0.0, 3.0, 1.5])
    assert protocol.verdict(low, high, "A", "B", lower_is_better=True) == "A better"
    assert protocol.verdict(low, high, "A", "B", lower_is_better=False) == "B better"
    assert protocol.verdict(low, wide, "A", "B", lower_is_better=True) == protocol.NOT_DISTINGUISHABLE
    # the dict form read back from result.json gives the same verdict
    import dataclasses
    assert protocol.verdict(dataclasses.asdict(high), dataclasses.asdict(low), "A", "B", True) == "B better"
    assert protocol.verdict_above(high, 1.5, lower_is_better=False) == "meets"
    assert protocol.verdict_above(high, 1.5, lower_is_better=True) == "misses"
    assert protocol.verdict_above(wide, 1.5, lower_is_better=True) == protocol.NOT_DISTINGUISHABLE


# ----------------------------------------------------------------------------------------------------
# tuning


def bowl(best):
    return lambda lr: (math.log10(lr) - math.log10(best)) ** 2


@pytest.mark.parametrize("best", [1e-4, 3e-3, 1e-2, 0.3])
def test_tuning_extends_the_grid_until_the_best_rate_is_interior(best):
    tuning = protocol.tune(bowl(best), (1e-3, 3e-3, 1e-2))
    assert tuning.best == best and tuning.interior
    rates = sorted(tuning.scores)
    assert rates[0] < best < rates[-1]
    assert all(protocol.LR_SERIES.index(b) - protocol.LR_SERIES.index(a) == 1 for a, b in zip(rates, rates[1:]))


def test_tuning_says_when_the_best_rate_stays_at_the_edge():
    tuning = protocol.tune(lambda lr: lr, (1e-3, 3e-3), max_extensions=2)
    assert tuning.best == 1e-4 and not tuning.interior          # two extensions downwards: 1e-4 is the lowest tried
    assert sorted(tuning.scores) == [1e-4, 3e-4, 1e-3, 3e-3]
    assert "not interior" in tuning.describe()
    at_the_end = protocol.tune(lambda lr: lr, (0.3, 1.0), lower_is_better=False)
    assert at_the_end.best == 1.0 and not at_the_end.interior   # the series ends at 1.0


def test_a_diverged_run_scores_as_the_worst():
    def score(lr):
        if lr >= 0.1:
            raise FloatingPointError("diverged")
        return float("nan") if lr == 0.03 else -lr
    tuning = protocol.tune(score, (1e-3, 3e-3, 1e-2, 3e-2, 0.1), lower_is_better=True)
    assert tuning.best == 1e-2 and tuning.interior
    assert tuning.scores[0.1] == math.inf and tuning.scores[0.03] == math.inf


def test_a_grid_off_the_series_is_refused():
    with pytest.raises(ValueError, match="1-3-10 series"):
        protocol.tune(bowl(1e-3), (2e-3, 5e-3))
    with pytest.raises(ValueError, match="consecutive"):
        protocol.tune(bowl(1e-3), (1e-3, 1e-2))


def test_selection_reads_dev_with_the_selection_seed_and_reporting_reads_test_with_other_seeds():
    calls = []

    def run(lr, seed, part):
        calls.append((lr, seed, part))
        return bowl(3e-3)(lr) + (0.01 * seed if part == "test" else 0.0), seed

    chosen = common.select_and_report(run, (1e-3, 3e-3, 1e-2), fast=False)
    selection = [c for c in calls if c[2] == "dev"]
    reporting = [c for c in calls if c[2] == "test"]
    assert {seed for _, seed, _ in selection} == {protocol.SELECTION_SEED}
    assert [seed for _, seed, _ in reporting] == list(protocol.REPORT_SEEDS)
    assert protocol.SELECTION_SEED not in protocol.REPORT_SEEDS and len(protocol.REPORT_SEEDS) >= 3
    assert all(lr == chosen.tuning.best == 3e-3 for lr, _, _ in reporting)
    assert chosen.payloads == list(protocol.REPORT_SEEDS)
    assert chosen.test.n == 3


def test_the_findings_table_lists_every_finding():
    results = [{"result": {"findings": [protocol.finding("s", "a claim", "1.0", "0.9 [0.8, 1.0]", "supported")]}},
               {"result": {"findings": []}}]
    table = protocol.findings_table(results).splitlines()
    assert table[0].startswith("| study | claim | paper")
    assert table[2] == "| s | a claim | 1.0 | 0.9 [0.8, 1.0] | supported |"


# ----------------------------------------------------------------------------------------------------
# the README's findings table


def write_result(folder, name, findings, fast=False, wall=90.0):
    import json
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "result.json").write_text(json.dumps(
        {"experiment": name, "fast": fast, "wall_seconds": wall, "result": {"findings": findings}}))


def test_the_readme_table_is_regenerated_between_its_markers(tmp_path):
    from minilora.experiments import findings

    write_result(tmp_path, "rslora", [protocol.finding("rslora", "claim B", "p", "o", "not distinguishable")])
    write_result(tmp_path, "budget", [protocol.finding("budget", "claim A", "p", "o", "A better")], fast=True)
    text = findings.render(findings.collect(tmp_path))
    assert text.index("claim A") < text.index("claim B")            # the studies' order, not the folder's
    assert "| budget | fast (a smoke test, not a finding) | 1.5 min |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{findings.BEGIN}\nold table\n{findings.END}\nafter\n")
    findings.update_readme(readme, text)
    content = readme.read_text()
    assert "old table" not in content and "claim B" in content
    assert content.startswith("# x\nbefore\n") and content.endswith(f"{findings.END}\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="findings:begin"):
        findings.update_readme(readme, text)


def test_a_damaged_result_file_is_named(tmp_path):
    from minilora.experiments import findings

    (tmp_path / "budget").mkdir()
    (tmp_path / "budget" / "result.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="budget/result.json"):
        findings.collect(tmp_path)
    with pytest.raises(ValueError, match="no result.json"):
        findings.render(findings.collect(tmp_path / "empty"))
