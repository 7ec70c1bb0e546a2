"""Wall-clock timing that a reader can trust: paired measurements, medians with their spread.

Two things timed apart see different machines (clock speed, caches, other processes), so every comparison
here takes turns: round after round, each contender runs once (or a short block) in the same order. A ratio is
computed from the same samples as the times printed beside it, round by round, and carries its own spread.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass

import numpy

from .core import backend


def timed(fn) -> float:
    """Seconds of one call of fn, the GPU's queued work included. Python's garbage collector is paused during
    the call, as timeit does: a collection set off by objects another contender made would land here."""
    backend.synchronize()
    collecting = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        return time.perf_counter() - t0
    finally:
        if collecting:
            gc.enable()


@dataclass
class Spread:
    """The median of some samples and their interquartile range (the middle half of the samples)."""

    median: float
    low: float
    high: float
    n: int

    def scaled(self, factor: float) -> "Spread":
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.n)

    def format(self, unit: str = "", digits: int = 2) -> str:
        return f"{self.median:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict:
        return {"median": self.median, "q1": self.low, "q3": self.high, "n": self.n}


def spread(samples) -> Spread:
    """Median and quartiles of the samples (the quartiles are the median itself for fewer than 4 samples)."""
    samples = sorted(samples)
    if not samples:
        raise ValueError("no samples to summarise")
    if len(samples) < 4:
        middle = statistics.median(samples)
        return Spread(middle, middle, middle, len(samples))
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return Spread(q2, q1, q3, len(samples))


def median_interval(samples, level: float = 0.95) -> Spread:
    """The median of the samples and a distribution-free interval for it: the order statistics x_(k) and
    x_(n+1-k), k the largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so that the interval covers the
    true median with probability at least ``level`` whatever the distribution (the whole range when n is too
    small for that: n < 6 at 95%)."""
    samples = sorted(samples)
    n = len(samples)
    if not n:
        raise ValueError("no samples to summarise")
    tail, k, below = (1 - level) / 2, 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n            # P(Binomial(n, 1/2) <= k)
        if below > tail:
            break
        k += 1
    return Spread(statistics.median(samples), samples[max(k - 1, 0)] if k else samples[0],
                  samples[n - k] if k else samples[-1], n)


def ratio_interval(samples_a, samples_b, level: float = 0.95) -> Spread:
    """a / b round by round (both lists from ``take_turns``): the median ratio and its ``level`` interval."""
    return median_interval([a / b for a, b in zip(samples_a, samples_b)], level)


def latency_verdict(ratio: Spread, equivalence: float = 0.05) -> str:
    """What a ratio to the base model's latency says, read from its 95% interval (median_interval): "no added
    latency" when the whole interval lies within +-equivalence of 1, "slower" or "faster" when it excludes 1, "not
    distinguishable" when noise hides whether there is a difference, and nothing from fewer than 6 rounds."""
    if ratio.n < 6:                                  # no pair of order statistics reaches 95% yet
        return f"too few rounds ({ratio.n}) to tell"
    if 1 - equivalence <= ratio.low and ratio.high <= 1 + equivalence:
        return f"no added latency (within {equivalence:.0%})"
    if ratio.low > 1:
        return f"slower: {ratio.median - 1:.0%} added"
    if ratio.high < 1:
        return f"faster: {1 - ratio.median:.0%} less"
    return "not distinguishable from the base"


def take_turns(fns, rounds: int, warmup: int = 1, block: int = 1) -> list:
    """Samples (seconds) of each function in ``fns``, timed taking turns: each round runs every function
    ``block`` times in a row; the first call of a block is not timed when block > 1 (it would pay for the
    previous contender's worker threads, which keep spinning for a while: PyTorch's OpenMP pool does).
    Returns one list of samples per function, sample i of every list from the same round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples = [[] for _ in fns]
    for _ in range(max(1, rounds)):
        for fn, out in zip(fns, samples):
            if block > 1:
                fn()
            times = [timed(fn) for _ in range(block)]
            out.append(statistics.median(times))
    return samples


def ratio_spread(samples_a, samples_b) -> Spread:
    """a / b round by round (both lists from ``take_turns``), summarised."""
    return spread([a / b for a, b in zip(samples_a, samples_b)])


def paired_forward_samples(models, batch_size: int = 1, repeats: int = 20, seq_len: int | None = None) -> list:
    """Seconds of one evaluation-mode forward pass of each model, the models taking turns round by round
    (after two untimed rounds that warm caches and allocators); one list of ``repeats`` samples per model.

    Every model sees the same tokens: seq_len of them per sequence (None: a full block), batch_size sequences."""
    seq_len = seq_len or models[0].config.block_size
    idx = backend.asarray(numpy.random.default_rng(0).integers(0, models[0].config.vocab_size,
                                                                size=(batch_size, seq_len)))
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        return take_turns([lambda m=m: m.forward(idx) for m in models], repeats, warmup=2)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
