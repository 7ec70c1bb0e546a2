"""Timing helpers: the median's distribution-free interval and the verdict read from a ratio's interval."""
import math

import numpy as np
import pytest

from minilora.timing import Spread, latency_verdict, median_interval, ratio_interval


@pytest.mark.parametrize("n, low, high", [(3, 0, 2), (5, 0, 4), (6, 0, 5), (10, 1, 8), (20, 5, 14), (50, 17, 32)])
def test_median_interval_is_the_binomial_order_statistics(n, low, high):
    """The textbook 95% interval for a median: x_(k), x_(n+1-k) with P(Bin(n, 1/2) < k) <= 2.5%; the whole range
    for n < 6, where no narrower pair of order statistics reaches 95%."""
    interval = median_interval(list(range(n)))
    assert (interval.low, interval.high, interval.n) == (low, high, n)
    k = low + 1
    tail = sum(math.comb(n, j) for j in range(k)) / 2 ** n
    assert n < 6 or (tail <= 0.025 < tail + math.comb(n, k) / 2 ** n)


def test_median_interval_covers_the_median_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 4000
    covered = 0
    for _ in range(trials):
        x = rng.exponential(size=15)                       # skewed: the median (ln 2) is not the mean
        interval = median_interval(x)
        covered += interval.low <= math.log(2) <= interval.high
    assert covered / trials >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / trials)


def test_ratio_interval_pairs_the_rounds():
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
    assert ratio_interval(a, b) == Spread(2.0, 2.0, 2.0, 3)


@pytest.mark.parametrize("low, high, verdict", [
    (0.98, 1.02, "no added latency (within 5%)"),
    (1.10, 1.40, "slower: 25% added"),
    (0.60, 0.80, "faster: 30% less"),
    (0.97, 1.20, "not distinguishable from the base"),
])
def test_the_verdict_follows_from_the_interval(low, high, verdict):
    assert latency_verdict(Spread((low + high) / 2, low, high, 20)) == verdict
    assert latency_verdict(Spread((low + high) / 2, low, high, 5)) == "too few rounds (5) to tell"
