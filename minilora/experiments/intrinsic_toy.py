"""Li et al. (2018)'s toy problem whose intrinsic dimension is known exactly: 10.

D = 1000 parameters in G = 10 groups of 100; the loss asks each group's sum to hit a seeded target:

    L(theta) = sum_g (sum_{i in group g} theta_i - t_g)^2 = ||A theta - t||^2      A: (10, 1000) of 0/1

Its solution set is an affine subspace of codimension 10. Training only in a random subspace,
theta = theta_0 + P theta_d with P: (D, d) random, the loss is ||A theta_0 - t + (A P) theta_d||^2, a
least-squares problem in theta_d with the 10 x d matrix M = A P. For d >= 10, M has (almost surely) rank 10
and the loss reaches 0 exactly; for d < 10 it cannot (10 - d constraints stay unmet). So d_int = 10.

How theta_d is found (both, per d):
- exactly: M is built from 10 calls of the projection's ``transpose`` (row g of M is (P^T a_g)^T, a_g = row g of
  A) and theta_d = lstsq(M, t - A theta_0). This defines the reported loss and d90.
- trained: ``steps`` Adam steps (lr 1.0, cosine-decayed to 0) on theta_d from 0 with the closed-form gradient
  dL/dtheta_d = P^T (2 A^T (A theta - t)), computed with ``project`` and ``transpose`` on the flat vector. This
  shows the gradient path works; Adam in a few hundred steps reaches small but not always 1e-6-small losses on
  ill-conditioned d (near d = 10 the square M is badly conditioned), so it does not define d90.

d90 convention for this toy: the full-D optimum is loss 0, so "90% of the improvement" would be met by
solving ~9 of 10 constraints; we use the stricter "solved" criterion of the toy: the smallest d whose exact
loss is below 1e-6 x the starting loss (at theta_d = 0). Expected: d90 = 10 for both projections; ``summary``
prints what the run finds.

Cost: default (d = 1..20, 30, 50, 100, 300, 1000 for fastfood and dense, 500 Adam steps each): a few seconds.
``fast=True``: d = 1..12, 200 Adam steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import math

import numpy

from ..core.intrinsic import make_projection
from .common import on_the_host

D, GROUPS = 1000, 10
SOLVED = 1e-6                  # relative loss below which a d counts as solving the problem
PROJECTIONS = ("fastfood", "dense")
LR = 1.0                       # Adam's peak learning rate (cosine-decayed to 0)


@dataclass
class ToyResult:
    D: int
    groups: int
    ds: list
    start_loss: float                        # L(theta_0)
    full_loss: float                         # the exact full-D optimum (0 up to rounding)
    exact: dict = field(default_factory=dict)      # projection -> [loss per d] (exact least squares)
    trained: dict = field(default_factory=dict)    # projection -> [loss per d] (Adam)
    d90: dict = field(default_factory=dict)        # projection -> smallest d with exact loss < SOLVED x start
    steps: int = 0
    seed: int = 0


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


@on_the_host
def run(fast: bool = False, seed: int = 0) -> ToyResult:
    ds = list(range(1, 13)) if fast else list(range(1, 21)) + [30, 50, 100, 300, 1000]
    steps = 200 if fast else 500
    A, t, theta0 = problem(seed)
    start = loss(A, t, theta0)
    full = loss(A, t, theta0 + numpy.linalg.lstsq(A, t - A @ theta0, rcond=None)[0])
    result = ToyResult(D=D, groups=GROUPS, ds=ds, start_loss=start, full_loss=full, steps=steps, seed=seed)
    for kind in PROJECTIONS:
        exact, trained = [], []
        for d in ds:
            P = make_projection(kind, D, d, seed=seed + 1000 + d)
            exact.append(loss(A, t, theta0 + P.project(solve_exact(P, A, t, theta0))))
            trained.append(loss(A, t, theta0 + P.project(train_adam(P, A, t, theta0, steps))))
        result.exact[kind], result.trained[kind] = exact, trained
        result.d90[kind] = next((d for d, x in zip(ds, exact) if x < SOLVED * start), None)
    return result


def summary(result: ToyResult) -> str:
    lines = [f"Toy problem (Li et al. 2018): D = {result.D}, {result.groups} groups; loss = sum_g (group sum - t_g)^2",
             f"start loss {result.start_loss:.4g}; full-D optimum {result.full_loss:.3g}; 'solved' = exact loss < "
             f"{SOLVED:g} x start; trained = {result.steps} Adam steps (lr {LR}, cosine decay) from theta_d = 0", "",
             f"{'d':>5}" + "".join(f"{kind + ' exact':>17}{kind + ' Adam':>16}" for kind in result.exact)]
    for i, d in enumerate(result.ds):
        lines.append(f"{d:>5}" + "".join(f"{result.exact[k][i]:>17.3e}{result.trained[k][i]:>16.3e}"
                                         for k in result.exact))
    lines.append("")
    for kind, d90 in result.d90.items():
        lines.append(f"d90 ({kind}) = {d90}   (Li et al.: exactly 10)")
    return "\n".join(lines)


def plot(result: ToyResult, path) -> None:
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4.5))
    floor = 1e-30
    for i, kind in enumerate(result.exact):
        ax.semilogy(result.ds, [max(x / result.start_loss, floor) for x in result.exact[kind]], "o-",
                    color=f"C{i}", label=f"{kind}: exact least squares")
        ax.semilogy(result.ds, [max(x / result.start_loss, floor) for x in result.trained[kind]], "x--",
                    color=f"C{i}", alpha=0.6, label=f"{kind}: {result.steps} Adam steps")
    ax.axvline(10, color="gray", linestyle=":", label="d = 10 (codimension)")
    ax.axhline(SOLVED, color="red", linestyle=":", label=f"solved: {SOLVED:g} x start")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("final loss / start loss")
    ax.set_title(f"Toy problem, D = {result.D}: d90 = " + ", ".join(f"{d} ({k})" for k, d in result.d90.items()))
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
