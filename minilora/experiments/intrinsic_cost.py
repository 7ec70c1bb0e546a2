"""What one subspace training step costs: dense vs Fastfood (and sparse) projections as d grows.

Each step of subspace training does one ``project`` (theta = theta_0 + P theta_d, before the forward) and one
``transpose`` (dL/dtheta_d = P^T dL/dtheta, after the backward). This study times exactly that pair, on
D = the tiny GPT's parameter count (its config from pretrained_info, ~0.82M), float64, for d on a log scale;
the model's own forward/backward is the same for every projection and d, so it is left out.

Expected: dense costs O(D d) time and memory, growing linearly in d; Fastfood costs O(D log n), n = the power
of two >= d, nearly flat; sparse (about sqrt(D) non-zeros a column) costs O(d sqrt(D)), cheap at these sizes.
Dense is skipped where its matrix would exceed DENSE_BUDGET bytes (8 D d bytes); the summary says where.

Timing: ``repeats`` project + transpose pairs after one warm-up pair, wall clock (time.perf_counter) on a
shared CPU; each cell reports the mean with its 95% interval over the repeats (protocol.interval; the repeats
are the samples, as seeds are elsewhere) beside the median. Protocol: a timing study selects and tunes nothing,
so it has no dev/test split and no seeds to report over; its verdicts compare intervals of times
(protocol.verdict). Claims: dense's time grows with d (dense at its largest measured d against its smallest);
Fastfood is cheaper than dense at the largest d both are measured at; Fastfood grows far more slowly than d
(protocol.verdict_above: its time at the largest d against its mean time at the smallest scaled by the ratio
of the d's, the cost if it grew linearly).

Default: d = 10, 30, 100, 300, 1000, 3000, 10000, 7 repeats, dense up to 1 GiB (d <= ~160, so d = 10, 30, 100);
about a minute, mostly building the dense matrices and sparse index arrays. ``fast=True``: d = 10, 40,
3 repeats, a few seconds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core.intrinsic import make_projection
from ..core.model import GPT, GPTConfig
from ..io.pretrained import pretrained_info
from . import protocol
from .common import on_the_host

STUDY = "intrinsic-cost"

KINDS = ("dense", "sparse", "fastfood")
DENSE_BUDGET = 1 << 30         # bytes: a dense P above this is not built in this study (time and memory)


@dataclass
class CostResult:
    D: int
    ds: list
    repeats: int
    seconds: dict = field(default_factory=dict)    # kind -> [median seconds per project+transpose, None if skipped]
    build_seconds: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)    # sentences: what was not measured and why
    intervals: dict = field(default_factory=dict)  # kind -> [Interval dict of the repeats' seconds, None if skipped]
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def tiny_gpt_parameters() -> int:
    """The number of parameters of the shipped tiny GPT (built from its config, not loaded)."""
    config = GPTConfig(**pretrained_info()["model_config"])
    return GPT(config, dtype="float32").num_parameters()


def time_pairs(P, repeats: int, seed: int = 0) -> list:
    """Seconds of each of ``repeats`` project + transpose pairs, after one warm-up pair."""
    rng = numpy.random.default_rng(seed)
    theta_d, g = rng.standard_normal(P.d), rng.standard_normal(P.D)
    P.transpose(g), P.project(theta_d)                    # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        P.project(theta_d)
        P.transpose(g)
        times.append(time.perf_counter() - start)
    return times


def time_pair(P, repeats: int, seed: int = 0) -> float:
    """The median of time_pairs."""
    return statistics.median(time_pairs(P, repeats, seed))


@on_the_host
def run(fast: bool = False, seed: int = 0) -> CostResult:
    D = tiny_gpt_parameters()
    ds = [10, 40] if fast else [10, 30, 100, 300, 1000, 3000, 10000]
    repeats = 3 if fast else 7
    budget = DENSE_BUDGET if not fast else (1 << 29)
    result = CostResult(D=D, ds=ds, repeats=repeats)
    for kind in KINDS:
        result.seconds[kind], result.build_seconds[kind], result.intervals[kind] = [], [], []
        for d in ds:
            if kind == "dense" and 8 * D * d > budget:
                result.seconds[kind].append(None)
                result.build_seconds[kind].append(None)
                result.intervals[kind].append(None)
                result.skipped.append(f"dense d={d}: {8 * D * d / 2**30:.2f} GiB > the study's "
                                      f"{budget / 2**30:.2f} GiB budget")
                continue
            start = time.perf_counter()
            P = make_projection(kind, D, d, seed=seed)
            result.build_seconds[kind].append(time.perf_counter() - start)
            times = time_pairs(P, repeats, seed)
            result.seconds[kind].append(statistics.median(times))
            result.intervals[kind].append(asdict(protocol.interval(times)))
            del P
    result.protocol = protocol.protocol_record(
        None, (), None, repeats=repeats,
        timing="wall clock of one project + transpose pair, after a warm-up pair; mean and 95% interval over "
               "the repeats")
    result.protocol["split"] = "none: a timing study selects and tunes nothing, so it needs no dev/test split"
    result.findings = findings(result)
    return result


def _measured(result: CostResult, kind: str):
    """[(d, Interval)] where ``kind`` was measured."""
    return [(d, protocol.as_interval(iv)) for d, iv in zip(result.ds, result.intervals.get(kind, []))
            if iv is not None]


def findings(result: CostResult) -> list:
    out = []
    dense, fastfood = _measured(result, "dense"), _measured(result, "fastfood")
    if len(dense) >= 2:
        (d0, a), (d1, b) = dense[0], dense[-1]
        out.append(protocol.finding(STUDY, f"dense time grows with d (d = {d0} -> {d1})",
                                    "Li et al.: dense P costs O(D d) time and memory",
                                    f"{1e3 * a.mean:.3f} [{1e3 * a.low:.3f}, {1e3 * a.high:.3f}] -> {1e3 * b.mean:.3f} "
                                    f"[{1e3 * b.low:.3f}, {1e3 * b.high:.3f}] ms",
                                    {"d = %s better" % d0: "grows", "d = %s better" % d1: "shrinks"}.get(
                                        protocol.verdict(a, b, f"d = {d0}", f"d = {d1}", True),
                                        protocol.NOT_DISTINGUISHABLE)))
    both = [d for d, _ in dense if d in dict(fastfood)]
    if both:
        d = both[-1]
        f, g = dict(fastfood)[d], dict(dense)[d]
        out.append(protocol.finding(STUDY, f"Fastfood cheaper than dense at d = {d} (the largest d dense is measured "
                                           f"at)", "Li et al.: Fastfood O(D log d) time against dense O(D d)",
                                    f"Fastfood {f.text(5)} s, dense {g.text(5)} s",
                                    protocol.verdict(f, g, "Fastfood", "dense", True)))
    if len(fastfood) >= 2:
        (d0, a), (d1, b) = fastfood[0], fastfood[-1]
        ratio = d1 / d0
        linear = a.mean * ratio                             # what linear growth in d would cost at d1
        out.append(protocol.finding(STUDY, f"Fastfood grows far more slowly than d (d = {d0} -> {d1}, x{ratio:g})",
                                    "Li et al.: Fastfood O(D log d), nearly flat in d",
                                    f"x{b.mean / a.mean:.1f}: {1e3 * a.mean:.3f} -> {1e3 * b.mean:.3f} ms "
                                    f"(linear growth would give {1e3 * linear:.1f} ms)",
                                    protocol.verdict_above(b, linear, lower_is_better=True)))
    return out


def growth(result: CostResult, kind: str) -> float | None:
    """time at the largest measured d / time at the smallest measured d."""
    pairs = [(d, s) for d, s in zip(result.ds, result.seconds[kind]) if s is not None]
    if len(pairs) < 2:
        return None
    return pairs[-1][1] / pairs[0][1]


def summary(result: CostResult) -> str:
    lines = [f"Time per subspace step (one project + one transpose), D = {result.D:,} (the tiny GPT), float64, "
             f"median of {result.repeats}", "",
             f"{'d':>7}" + "".join(f"{kind + ' (ms)':>16}" for kind in result.seconds)]
    for i, d in enumerate(result.ds):
        cells = []
        for kind in result.seconds:
            s = result.seconds[kind][i]
            cells.append(f"{'skipped':>16}" if s is None else f"{1e3 * s:>16.3f}")
        lines.append(f"{d:>7}" + "".join(cells))
    lines.append("")
    for kind in result.seconds:
        measured = [d for d, s in zip(result.ds, result.seconds[kind]) if s is not None]
        g = growth(result, kind)
        if g is not None:
            lines.append(f"{kind}: x{g:.1f} from d={measured[0]} to d={measured[-1]} (d x{measured[-1] / measured[0]:.0f})")
    lines += [f"not measured: {s}" for s in result.skipped]
    lines += ["", f"protocol: {result.protocol.get('split', '')}; {result.protocol.get('timing', '')}", "findings:"]
    lines += [f"  {f['claim']}: {f['paper']}; ours {f['ours']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(lines)


def plot(result: CostResult, path) -> None:
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4.5))
    for i, kind in enumerate(result.seconds):
        pts = _measured(result, kind)
        if pts:
            ds = [d for d, _ in pts]
            ax.errorbar(ds, [1e3 * iv.mean for _, iv in pts],
                        yerr=[[1e3 * (iv.mean - max(iv.low, 0.0)) for _, iv in pts],
                              [1e3 * (iv.high - iv.mean) for _, iv in pts]],
                        fmt="o-", color=f"C{i}", capsize=3, label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(f"ms per project + transpose (mean, 95% CI over {result.repeats} repeats)")
    ax.set_title(f"Projection cost, D = {result.D:,}")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
