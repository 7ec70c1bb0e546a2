"""Li et al. (2018)'s toy problem whose intrinsic dimension is known exactly: 10.

D = 1000 parameters in G = 10 groups of 100; the loss asks each group's sum to hit a seeded target:

    L(theta) = sum_g (sum_{i in group g} theta_i - t_g)^2 = ||A theta - t||^2      A: (10, 1000) of 0/1

Its solution set is an affine subspace of codimension 10. Training only in a random subspace,
theta = theta_0 + P theta_d with P: (D, d) random, the loss is ||A theta_0 - t + (A P) theta_d||^2, a
least-squares problem in theta_d with the 10 x d matrix M = A P. For d >= 10, M has (almost surely) rank 10
and the loss reaches 0 exactly; for d < 10 it cannot (10 - d constraints stay unmet).

Two intrinsic dimensions, both from the exact subspace optimum at each d (start = L(theta_0), full = the
exact full-D optimum, 0 up to rounding):

- d_int100: the smallest d that reaches the full-D optimum (exact loss below SOLVED x start). Li et al.:
  d_int100 = 10, the codimension.
- d90: Li et al.'s 90% rule, the smallest d whose exact loss achieves 90% of the full-D improvement,
  (start - loss_d) >= 0.9 (start - full). A random d-dimensional subspace removes the part of the residual
  A theta_0 - t that its 10 x d matrix M spans; the rest is left, about (10 - d) / 10 of the start for
  random directions, so the 90% rule is met below 10 when the d directions happen to catch most of it: d90
  <= d_int100, and how far below depends on the problem and the directions.

How theta_d is found (both, per d):
- exactly: M is built from 10 calls of the projection's ``transpose`` (row g of M is (P^T a_g)^T, a_g = row g of
  A) and theta_d = lstsq(M, t - A theta_0). This defines the reported losses, d90 and d_int100.
- trained: ``steps`` Adam steps (lr 1.0, cosine-decayed to 0) on theta_d from 0 with the closed-form gradient
  dL/dtheta_d = P^T (2 A^T (A theta - t)), computed with ``project`` and ``transpose`` on the flat vector. This
  shows the gradient path works; near d = 10 the square M is badly conditioned and a few hundred Adam steps
  get close to the optimum but not to SOLVED, so the trained losses define nothing.

Protocol. Nothing is trained to be selected: the exact optimum needs no learning rate, so there is no dev/test
split (the loss is the objective itself). The curves shown are the problem of ``seed`` (its targets, its
theta_0 and its projections); the reported d90 and d_int100 are over the problems of PROBLEM_SEEDS (their own
targets, theta_0 and projections, never seed 0's), each a whole number, summarised by their mean and 95%
interval per projection. Claims: d_int100 = 10 on every problem (verdict "agrees on every seed" or "differs");
d90 below d_int100 = 10 (protocol.verdict_above on the d90 interval against 10).

Cost: default (d = 1..20, 30, 50, 100, 300, 1000 for fastfood and dense, 500 Adam steps each on the shown
problem, exact least squares on 10 more problems): a few seconds. ``fast=True``: d = 1..12, 200 Adam steps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core.intrinsic import make_projection
from . import protocol
from .common import on_the_host

STUDY = "intrinsic-toy"
D, GROUPS = 1000, 10
SOLVED = 1e-6                  # relative loss below which a d reaches the full-D optimum (d_int100)
FRACTION = 0.9                 # Li et al.'s 90% rule (d90)
PAPER_D_INT100 = 10            # Li et al. 2018, section 2: the codimension of the solution set
PROJECTIONS = ("fastfood", "dense")
PROBLEM_SEEDS = tuple(range(1, 11))
LR = 1.0                       # Adam's peak learning rate (cosine-decayed to 0)


@dataclass
class ToyResult:
    D: int
    groups: int
    ds: list
    start_loss: float                        # L(theta_0) of the shown problem
    full_loss: float                         # its exact full-D optimum (0 up to rounding)
    exact: dict = field(default_factory=dict)      # projection -> [loss per d] (exact least squares)
    trained: dict = field(default_factory=dict)    # projection -> [loss per d] (Adam)
    d90: dict = field(default_factory=dict)        # projection -> the shown problem's d90 (90% of the improvement)
    d_int100: dict = field(default_factory=dict)   # projection -> the shown problem's smallest d reaching the optimum
    problem_seeds: list = field(default_factory=list)
    d90_seeds: dict = field(default_factory=dict)        # projection -> [d90 per problem seed]
    d_int100_seeds: dict = field(default_factory=dict)   # projection -> [d_int100 per problem seed]
    d90_interval: dict = field(default_factory=dict)     # projection -> Interval as a dict (over problem seeds)
    d_int100_interval: dict = field(default_factory=dict)
    steps: int = 0
    seed: int = 0
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def problem(seed: int = 0):
    """(A, t, theta_0): the 0/1 group matrix (10, 1000), the targets (10,), the start (1000,)."""
    rng = numpy.random.default_rng(seed)
    A = numpy.zeros((GROUPS, D))
    for g in range(GROUPS):
        A[g, g * (D // GROUPS):(g + 1) * (D // GROUPS)] = 1.0
    t = rng.standard_normal(GROUPS) * 10.0
    theta0 = rng.standard_normal(D) * 0.1
    return A, t, theta0


def loss(A, t, theta) -> float:
    r = A @ theta - t
    return float(r @ r)


def projection_seed(problem_seed: int, d: int) -> int:
    """The seed of the projection at d for a problem: distinct for every (problem, d) with d < 9000."""
    return problem_seed * 10_000 + 1000 + d


def solve_exact(P, A, t, theta0):
    """theta_d minimising ||A (theta_0 + P theta_d) - t||^2, with M = A P built from 10 transposes."""
    M = numpy.stack([P.transpose(a) for a in A])                  # (10, d): row g = (P^T a_g)^T
    theta_d = numpy.linalg.lstsq(M, t - A @ theta0, rcond=None)[0]
    return theta_d


def train_adam(P, A, t, theta0, steps: int, lr: float = LR):
    """Adam on theta_d from 0 with the closed-form gradient P^T (2 A^T (A theta - t)). Returns theta_d."""
    theta_d = numpy.zeros(P.d)
    m, v = numpy.zeros(P.d), numpy.zeros(P.d)
    b1, b2, eps = 0.9, 0.999, 1e-12
    for step in range(1, steps + 1):
        lr_t = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))   # cosine decay to 0
        theta = theta0 + P.project(theta_d)
        g = P.transpose(2.0 * A.T @ (A @ theta - t))              # dL/dtheta_d = P^T dL/dtheta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta_d -= lr_t * (m / (1 - b1 ** step)) / (numpy.sqrt(v / (1 - b2 ** step)) + eps)
    return theta_d


# ----------------------------------------------------------------------------------------------------
# the two intrinsic dimensions


def d_int100(ds, losses, start: float):
    """The smallest d whose loss reaches the full-D optimum (below SOLVED x start), or None."""
    return next((d for d, x in zip(ds, losses) if x < SOLVED * start), None)


def d90(ds, losses, start: float, full: float, fraction: float = FRACTION):
    """Li et al.'s rule: the smallest d with (start - loss_d) >= fraction (start - full), or None."""
    return next((d for d, x in zip(ds, losses) if start - x >= fraction * (start - full)), None)


def exact_curve(kind: str, ds, problem_seed: int):
    """(start, full, [exact loss per d]) of one problem with the projections of that problem."""
    A, t, theta0 = problem(problem_seed)
    start = loss(A, t, theta0)
    full = loss(A, t, theta0 + numpy.linalg.lstsq(A, t - A @ theta0, rcond=None)[0])
    losses = []
    for d in ds:
        P = make_projection(kind, D, d, seed=projection_seed(problem_seed, d))
        losses.append(loss(A, t, theta0 + P.project(solve_exact(P, A, t, theta0))))
    return start, full, losses


def agreement(values, expected) -> str:
    """The verdict of an exact claim over problem seeds: equal on every seed, or not."""
    if all(v == expected for v in values):
        return f"agrees on every seed ({len(values)} of {len(values)})"
    return f"differs: {values}"


def findings(result: ToyResult) -> list:
    out = []
    seeds = f"over problem seeds {result.problem_seeds[0]}-{result.problem_seeds[-1]}"
    for kind in result.d_int100_seeds:
        values = result.d_int100_seeds[kind]
        ours = (f"{kind}: {protocol.as_interval(result.d_int100_interval[kind]).text(1)} {seeds}"
                if kind in result.d_int100_interval else f"{kind}: {values}")
        out.append(protocol.finding(STUDY, f"d_int100 (smallest d reaching the full-D optimum), {kind}",
                                    f"{PAPER_D_INT100} (the codimension)", ours, agreement(values, PAPER_D_INT100)))
    for kind in result.d90_seeds:
        values = result.d90_seeds[kind]
        if kind in result.d90_interval:
            interval = protocol.as_interval(result.d90_interval[kind])
            ours = f"{kind}: {interval.text(1)} {seeds}"
            verdict = protocol.verdict_above(interval, PAPER_D_INT100, lower_is_better=True)
        else:
            ours, verdict = f"{kind}: {values} {seeds}", "not reached on every seed"
        out.append(protocol.finding(STUDY, f"d90 (90% of the full-D improvement) below d_int100, {kind}",
                                    f"Li et al.'s 90% rule: d90 <= d_int100 = {PAPER_D_INT100} by definition", ours,
                                    verdict))
    return out


@on_the_host
def run(fast: bool = False, seed: int = 0) -> ToyResult:
    ds = list(range(1, 13)) if fast else list(range(1, 21)) + [30, 50, 100, 300, 1000]
    steps = 200 if fast else 500
    A, t, theta0 = problem(seed)
    start = loss(A, t, theta0)
    full = loss(A, t, theta0 + numpy.linalg.lstsq(A, t - A @ theta0, rcond=None)[0])
    result = ToyResult(D=D, groups=GROUPS, ds=ds, start_loss=start, full_loss=full, steps=steps, seed=seed,
                       problem_seeds=list(PROBLEM_SEEDS))
    for kind in PROJECTIONS:
        exact, trained = [], []
        for d in ds:
            P = make_projection(kind, D, d, seed=projection_seed(seed, d))
            exact.append(loss(A, t, theta0 + P.project(solve_exact(P, A, t, theta0))))
            trained.append(loss(A, t, theta0 + P.project(train_adam(P, A, t, theta0, steps))))
        result.exact[kind], result.trained[kind] = exact, trained
        result.d90[kind] = d90(ds, exact, start, full)
        result.d_int100[kind] = d_int100(ds, exact, start)
        per90, per100 = [], []
        for problem_seed in PROBLEM_SEEDS:
            s, f, losses = exact_curve(kind, ds, problem_seed)
            per90.append(d90(ds, losses, s, f))
            per100.append(d_int100(ds, losses, s))
        result.d90_seeds[kind], result.d_int100_seeds[kind] = per90, per100
        if None not in per90:
            result.d90_interval[kind] = asdict(protocol.interval(per90))
        if None not in per100:
            result.d_int100_interval[kind] = asdict(protocol.interval(per100))
    result.protocol = protocol.protocol_record(
        None, PROBLEM_SEEDS, None,
        reported=f"d90 and d_int100 over problem seeds {list(PROBLEM_SEEDS)} (targets, theta_0 and projections "
                 f"of each); the curves shown are problem seed {seed}'s",
        fixed=f"Adam lr {LR} (cosine to 0), {steps} steps: shown beside the exact optimum, it defines nothing")
    result.protocol["split"] = ("none: the loss is the objective itself and the exact subspace optimum (least "
                                "squares) selects nothing, so there is nothing to tune and no dev/test split")
    result.findings = findings(result)
    return result


def summary(result: ToyResult) -> str:
    lines = [f"Toy problem (Li et al. 2018): D = {result.D}, {result.groups} groups; loss = sum_g (group sum - t_g)^2",
             f"problem seed {result.seed}: start loss {result.start_loss:.4g}; full-D optimum {result.full_loss:.3g}; "
             f"trained = {result.steps} Adam steps (lr {LR}, cosine decay) from theta_d = 0",
             f"d_int100: smallest d with exact loss < {SOLVED:g} x start; d90: smallest d with (start - loss) >= "
             f"{FRACTION:g} (start - full)", "",
             f"{'d':>5}" + "".join(f"{kind + ' exact':>17}{kind + ' Adam':>16}" for kind in result.exact)]
    for i, d in enumerate(result.ds):
        lines.append(f"{d:>5}" + "".join(f"{result.exact[k][i]:>17.3e}{result.trained[k][i]:>16.3e}"
                                         for k in result.exact))
    lines.append("")
    for kind in result.exact:
        lines.append(f"problem seed {result.seed}, {kind}: d90 = {result.d90[kind]}, "
                     f"d_int100 = {result.d_int100[kind]}")
    seeds = result.problem_seeds
    for kind in result.d90_seeds:
        lines.append(f"problem seeds {seeds}, {kind}: d90 {result.d90_seeds[kind]}, "
                     f"d_int100 {result.d_int100_seeds[kind]}")
    lines += ["", f"protocol: {result.protocol.get('split', '')}; {result.protocol.get('reported', '')}", "findings:"]
    lines += [f"  {f['claim']}: paper {f['paper']}; ours {f['ours']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(lines)


def plot(result: ToyResult, path) -> None:
    """Left: exact (and Adam) loss / start loss against d for the shown problem, with the two criteria.
    Right: d90 and d_int100 per projection over the problem seeds, mean with 95% interval."""
    from ..plots import new_figure, save_figure

    fig, (ax, bx) = new_figure(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    floor = 1e-30
    for i, kind in enumerate(result.exact):
        ax.semilogy(result.ds, [max(x / result.start_loss, floor) for x in result.exact[kind]], "o-",
                    color=f"C{i}", label=f"{kind}: exact least squares")
        ax.semilogy(result.ds, [max(x / result.start_loss, floor) for x in result.trained[kind]], "x--",
                    color=f"C{i}", alpha=0.6, label=f"{kind}: {result.steps} Adam steps")
    ax.axvline(PAPER_D_INT100, color="gray", linestyle=":", label=f"d = {PAPER_D_INT100} (codimension)")
    ninety = 1 - FRACTION * (1 - result.full_loss / result.start_loss)
    ax.axhline(ninety, color="C2", linestyle="--", label="90% of the improvement (d90)")
    ax.axhline(SOLVED, color="red", linestyle=":", label=f"optimum reached: {SOLVED:g} x start (d_int100)")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("final loss / start loss")
    ax.set_title(f"Toy problem (seed {result.seed}), D = {result.D}: " + ", ".join(
        f"{k} d90 {result.d90[k]}, d_int100 {result.d_int100[k]}" for k in result.exact), fontsize=9)
    ax.legend(fontsize=7)

    labels, means, lows, highs = [], [], [], []
    for kind in result.d90_seeds:
        for name, store in (("d90", result.d90_interval), ("d_int100", result.d_int100_interval)):
            if kind in store:
                iv = protocol.as_interval(store[kind])
                labels.append(f"{kind}\n{name}")
                means.append(iv.mean)
                lows.append(iv.mean - iv.low)
                highs.append(iv.high - iv.mean)
    x = numpy.arange(len(labels))
    bx.errorbar(x, means, yerr=[lows, highs], fmt="o", capsize=4)
    bx.axhline(PAPER_D_INT100, color="gray", linestyle=":", label=f"paper d_int100 = {PAPER_D_INT100}")
    bx.set_xticks(x)
    bx.set_xticklabels(labels, fontsize=8)
    bx.set_ylabel("subspace dimension d")
    bx.set_title(f"over problem seeds {result.problem_seeds[0]}-{result.problem_seeds[-1]} (95% CI)", fontsize=9)
    bx.legend(fontsize=7)
    save_figure(fig, Path(path))
