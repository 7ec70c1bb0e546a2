"""The protocol every study follows, so that its verdict follows from its design.

1. A declared split. Training reads the training text only. The held-out text is cut in two: **dev** (the first
   half) chooses everything that is chosen (learning rates, the best rank); **test** (the second half) is read
   once per reported run and never by a selection. ``Split`` holds the three arrays and says where each came
   from; a classification task is split the same way (the first half of each class's held-out snippets is dev).
2. Tuned learning rates. ``tune`` scores a grid of learning rates on dev with the selection seed and extends the
   grid, one step of the 1-3-10 series at a time, until the best rate is interior (or the series ends: then the
   result says so). Every method, and every rank where the rank is the variable, gets its own rate.
3. Seeds. The selection seed (0) is never a reporting seed: reported numbers come from REPORT_SEEDS, each a fresh
   run at the chosen rate, scored on test.
4. Intervals. ``interval`` is the mean with its 95% Student-t confidence interval over the reporting seeds.
5. Verdicts from intervals. ``verdict`` compares two intervals: one side is better only when the intervals do not
   overlap; otherwise "not distinguishable". A study writes each claim it tests as a ``finding`` (the paper's
   number, ours with its interval, the verdict) into result.json; ``findings_table`` renders them for the README.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy

SELECTION_SEED = 0
REPORT_SEEDS = (1, 2, 3)
FAST_REPORT_SEEDS = (1, 2)
CONFIDENCE = 0.95
LR_SERIES = tuple(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 3))[:-1]   # 1e-5, 3e-5, ..., 3e-1, 1.0
NOT_DISTINGUISHABLE = "not distinguishable"


# ----------------------------------------------------------------------------------------------------
# the declared split


@dataclass
class Split:
    """train / dev / test token arrays of one corpus; ``describe()`` is the declaration a study prints."""

    name: str
    train: numpy.ndarray
    dev: numpy.ndarray
    test: numpy.ndarray

    def describe(self) -> str:
        return (f"{self.name}: train {len(self.train):,} tokens (the training split); dev {len(self.dev):,} and "
                f"test {len(self.test):,} tokens (first and second half of the held-out split): select on dev, "
                f"report on test")

    def declaration(self) -> dict:
        return {"corpus": self.name, "train_tokens": len(self.train), "dev_tokens": len(self.dev),
                "test_tokens": len(self.test), "dev": "first half of the held-out split",
                "test": "second half of the held-out split"}


def split_corpus(corpus) -> Split:
    """A corpus's train text, and its held-out text cut in half: dev (first half), test (second half)."""
    half = len(corpus.val) // 2
    return Split(corpus.name, corpus.train, corpus.val[:half], corpus.val[half:])


def split_task(task):
    """(dev, test): copies of a classification task whose held-out snippets are the first and the second half of
    each class's (the snippets of a class run through its held-out text in order, so the halves do not mix)."""
    import dataclasses

    dev_rows, test_rows = [], []
    for k in range(len(task.classes)):
        rows = numpy.flatnonzero(task.val_y == k)
        if rows.size < 2:
            raise ValueError(f"class {task.classes[k]!r} has {rows.size} held-out snippet(s); a dev/test split "
                             f"needs at least 2")
        dev_rows.append(rows[:rows.size // 2])
        test_rows.append(rows[rows.size // 2:])
    pick = lambda rows: dataclasses.replace(task, val_x=task.val_x[numpy.concatenate(rows)],
                                            val_y=task.val_y[numpy.concatenate(rows)])
    return pick(dev_rows), pick(test_rows)


# ----------------------------------------------------------------------------------------------------
# intervals


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (Simpson's rule on the density; exact enough for
    quantiles to 1e-6)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
    n = 2000
    h = t / n
    total = density(0.0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df >= 1 degrees of freedom (bisection on the distribution function)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1; got p={p!r}, df={df!r}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Interval:
    """The mean of n numbers with its two-sided confidence interval [low, high] (Student t, n - 1 df)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    values: list = field(default_factory=list)

    def __str__(self) -> str:
        return self.text()

    def text(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


def interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence interval of at least two finite numbers (one per seed)."""
    x = numpy.asarray(list(values), dtype=numpy.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"an interval needs at least 2 values (one per seed); got {x.size}")
    if not numpy.all(numpy.isfinite(x)):
        raise ValueError(f"an interval needs finite values; got {x.tolist()}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2, x.size - 1) * sd / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), sd, x.tolist())


def as_interval(value) -> Interval:
    """An Interval from itself or from its dict form (as read back from result.json)."""
    return value if isinstance(value, Interval) else Interval(**value)


def verdict(a, b, a_name: str, b_name: str, lower_is_better: bool) -> str:
    """Which of two intervals is better, or "not distinguishable" when they overlap."""
    a, b = as_interval(a), as_interval(b)
    if a.overlaps(b):
        return NOT_DISTINGUISHABLE
    a_better = (a.high < b.low) if lower_is_better else (a.low > b.high)
    return f"{a_name} better" if a_better else f"{b_name} better"


def verdict_above(a, threshold: float, lower_is_better: bool) -> str:
    """Where an interval stands against a fixed threshold: "meets", "misses" or "not distinguishable"."""
    a = as_interval(a)
    if a.low <= threshold <= a.high:
        return NOT_DISTINGUISHABLE
    meets = a.high < threshold if lower_is_better else a.low > threshold
    return "meets" if meets else "misses"


# ----------------------------------------------------------------------------------------------------
# learning rates tuned on dev


@dataclass
class Tuning:
    """The dev scores of every learning rate tried (selection seed only) and the one chosen."""

    best: float
    scores: dict                 # {lr: dev score}; a diverged run scores +inf (or -inf when higher is better)
    interior: bool               # the best rate has a tried neighbour on each side
    lower_is_better: bool

    def describe(self) -> str:
        edge = "" if self.interior else " (at the edge of the rates tried: not interior)"
        return f"lr {self.best:g}{edge} of {', '.join(f'{lr:g}' for lr in sorted(self.scores))}"


def _series_index(lr: float) -> int:
    for i, x in enumerate(LR_SERIES):
        if math.isclose(x, lr, rel_tol=1e-9):
            return i
    raise ValueError(f"learning rate {lr!r} is not in the 1-3-10 series {[f'{x:g}' for x in LR_SERIES]}")


def tune(score, grid, lower_is_better: bool = True, max_extensions: int = 4) -> Tuning:
    """Choose a learning rate on dev: score(lr) -> dev score of one run with the selection seed.

    grid: consecutive rates of LR_SERIES to try first. While the best rate is the lowest or the highest tried,
    the next rate of the series beyond it is tried (up to max_extensions times, and never past the series' ends:
    1e-5 and 1.0). A run that diverges (FloatingPointError or a non-finite score) scores as the worst possible."""
    indices = sorted({_series_index(lr) for lr in grid})
    if not indices or indices != list(range(indices[0], indices[-1] + 1)):
        raise ValueError(f"grid must be consecutive rates of the 1-3-10 series; got {list(grid)}")
    worst = math.inf if lower_is_better else -math.inf
    scores = {}

    def tried(i):
        lr = LR_SERIES[i]
        if lr not in scores:
            try:
                value = float(score(lr))
            except FloatingPointError:
                value = worst
            scores[lr] = value if math.isfinite(value) else worst
        return scores[lr]

    for i in indices:
        tried(i)
    lo, hi = indices[0], indices[-1]
    rank = lambda i: scores[LR_SERIES[i]] if lower_is_better else -scores[LR_SERIES[i]]
    extensions = 0
    while True:
        best = min(range(lo, hi + 1), key=rank)
        if extensions == max_extensions or lo < best < hi:
            break
        if best == lo and lo > 0:
            lo -= 1
            tried(lo)
        elif best == hi and hi < len(LR_SERIES) - 1:
            hi += 1
            tried(hi)
        else:
            break
        extensions += 1
    interior = lo < best < hi
    return Tuning(LR_SERIES[best], {LR_SERIES[i]: scores[LR_SERIES[i]] for i in range(lo, hi + 1)}, interior,
                  lower_is_better)


# ----------------------------------------------------------------------------------------------------
# findings


def finding(study: str, claim: str, paper: str, ours: str, verdict_text: str) -> dict:
    """One tested claim: the paper's number, ours (with its interval), and the verdict the intervals support."""
    return {"study": study, "claim": claim, "paper": paper, "ours": ours, "verdict": verdict_text}


def protocol_record(split, report_seeds, tunings: dict | None = None, **extra) -> dict:
    """What a study's result.json records about its design: the split (a Split, or a dict or sentence that
    declares another data set's split, or None), the seeds, every tuning."""
    record = {"selection_seed": SELECTION_SEED, "report_seeds": list(report_seeds),
              "confidence": CONFIDENCE, "verdict_rule": "better only when the 95% intervals do not overlap"}
    if split is not None:
        record["split"] = split.declaration() if isinstance(split, Split) else split
    if tunings:
        record["tuning"] = {name: {"best": t.best, "interior": t.interior, "lower_is_better": t.lower_is_better,
                                   "dev_scores": {f"{lr:g}": s for lr, s in sorted(t.scores.items())}}
                            for name, t in tunings.items()}
    record.update(extra)
    return record


def findings_table(results) -> str:
    """A Markdown table of every finding in ``results`` (result.json contents, each with "result" holding
    "findings"), in the order given."""
    lines = ["| study | claim | paper | ours (95% CI) | verdict |", "|---|---|---|---|---|"]
    for data in results:
        body = data.get("result", data)
        for f in body.get("findings", []):
            cells = (f["study"], f["claim"], f["paper"], f["ours"], f["verdict"])
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def report_seeds(fast: bool) -> tuple:
    """The seeds whose runs are reported: never the selection seed."""
    return FAST_REPORT_SEEDS if fast else REPORT_SEEDS


__all__ = ["Split", "split_corpus", "split_task", "interval", "Interval", "as_interval", "verdict", "verdict_above",
           "tune", "Tuning", "finding", "findings_table", "protocol_record", "report_seeds", "t_quantile",
           "SELECTION_SEED", "REPORT_SEEDS", "FAST_REPORT_SEEDS", "LR_SERIES", "NOT_DISTINGUISHABLE"]


def mean_curve(curves) -> tuple:
    """(steps, mean, low, high) of per-seed curves [[step, value], ...] that share their steps: the mean and its
    95% interval at every step, as arrays (for a line with a band)."""
    steps = [step for step, _ in curves[0]]
    per_step = [interval([curve[k][1] for curve in curves]) for k in range(len(steps))]
    return (numpy.array(steps), numpy.array([p.mean for p in per_step]), numpy.array([p.low for p in per_step]),
            numpy.array([p.high for p in per_step]))
