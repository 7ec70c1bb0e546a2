"""What one subspace training step costs: dense vs Fastfood (and sparse) projections as d grows.

Each step of subspace training does one ``project`` (theta = theta_0 + P theta_d, before the forward) and one
``transpose`` (dL/dtheta_d = P^T dL/dtheta, after the backward). This study times exactly that pair, on
D = the tiny GPT's parameter count (its config from pretrained_info, ~0.82M), float64, for d on a log scale;
the model's own forward/backward is the same for every projection and d, so it is left out.

Expected: dense costs O(D d) time and memory, growing linearly in d; Fastfood costs O(D log n), n = the power
of two >= d, nearly flat; sparse (about sqrt(D) non-zeros a column) costs O(d sqrt(D)), cheap at these sizes.
Dense is skipped where its matrix would exceed DENSE_BUDGET bytes (8 D d bytes); the summary says where.

Timing: the median of ``repeats`` project + transpose pairs after one warm-up pair, wall clock
(time.perf_counter) on a shared CPU, so absolute numbers are noisy; the ratios are the point.
Default: d = 10, 30, 100, 300, 1000, 3000, 10000, 7 repeats, dense up to 1 GiB (d <= ~160, so d = 10, 30, 100);
about a minute,
mostly building the dense matrices and sparse index arrays. ``fast=True``: d = 10, 40, 3 repeats, a few seconds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..core.intrinsic import make_projection
from ..core.model import GPT, GPTConfig
from ..io.pretrained import pretrained_info
from .common import on_the_host

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


def tiny_gpt_parameters() -> int:
    """The number of parameters of the shipped tiny GPT (built from its config, not loaded)."""
    config = GPTConfig(**pretrained_info()["model_config"])
    return GPT(config, dtype="float32").num_parameters()


def time_pair(P, repeats: int, seed: int = 0) -> float:
    rng = numpy.random.default_rng(seed)
    theta_d, g = rng.standard_normal(P.d), rng.standard_normal(P.D)
    P.transpose(g), P.project(theta_d)                    # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        P.project(theta_d)
        P.transpose(g)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@on_the_host
def run(fast: bool = False, seed: int = 0) -> CostResult:
    D = tiny_gpt_parameters()
    ds = [10, 40] if fast else [10, 30, 100, 300, 1000, 3000, 10000]
    repeats = 3 if fast else 7
    budget = DENSE_BUDGET if not fast else (1 << 29)
    result = CostResult(D=D, ds=ds, repeats=repeats)
    for kind in KINDS:
        result.seconds[kind], result.build_seconds[kind] = [], []
        for d in ds:
            if kind == "dense" and 8 * D * d > budget:
                result.seconds[kind].append(None)
                result.build_seconds[kind].append(None)
                result.skipped.append(f"dense d={d}: {8 * D * d / 2**30:.2f} GiB > the study's "
                                      f"{budget / 2**30:.2f} GiB budget")
                continue
            start = time.perf_counter()
            P = make_projection(kind, D, d, seed=seed)
            result.build_seconds[kind].append(time.perf_counter() - start)
            result.seconds[kind].append(time_pair(P, repeats, seed))
            del P
    return result


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
    return "\n".join(lines)


def plot(result: CostResult, path) -> None:
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4.5))
    for i, kind in enumerate(result.seconds):
        pts = [(d, 1e3 * s) for d, s in zip(result.ds, result.seconds[kind]) if s is not None]
        if pts:
            ax.loglog(*zip(*pts), "o-", color=f"C{i}", label=kind)
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("ms per project + transpose")
    ax.set_title(f"Projection cost, D = {result.D:,}")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
