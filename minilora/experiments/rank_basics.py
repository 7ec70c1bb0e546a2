"""Rank basics: what "low rank" means, and why a rank-r update is cheap.

The LoRA paper rests on three facts of linear algebra, each computed here on small matrices with known answers
and then on a real weight, the shipped model's first query projection Wq (128 x 128):

1. Rank. The rank of M (m x n) is the number of linearly independent rows (equivalently columns), and equals
   the number of non-zero singular values in M = U diag(S) V^T. The 3 x 3 identity has rank 3; a matrix whose
   second row is twice its first has rank 2.

2. Numerical rank. In floating point a singular value is rarely exactly 0, so "non-zero" needs a tolerance.
   NumPy's convention (numpy.linalg.matrix_rank) counts the singular values above

       tol = S.max() * max(m, n) * eps        (eps: the machine epsilon of M's dtype, 2.2e-16 for float64)

   which is the size of the rounding error an SVD can make. A perturbation larger than tol (noise of 1e-10,
   say) makes a rank-deficient matrix numerically full rank unless the tolerance is raised to match it.

3. Eckart-Young(-Mirsky). Keeping the r largest singular values, M_r = U[:, :r] diag(S[:r]) V[:r]^T, gives the
   best rank-r approximation of M in both the Frobenius and the spectral norm, with errors

       ||M - M_r||_F = sqrt(S[r]^2 + S[r+1]^2 + ...)      (the tail of the spectrum)
       ||M - M_r||_2 = S[r]                               (the (r+1)-th singular value, 0-based index r)

   The study computes M_r, measures both errors directly with numpy.linalg.norm, and compares them with
   these formulas.

Parameter count. LoRA writes the update of a d x k weight as Delta W = B A with B (d x r) and A (r x k), so it
trains r (d + k) numbers instead of d k. That is cheaper as long as r < d k / (d + k): r < 64 for the model's
128 x 128 attention weights, r < 102.4 for its 128 x 512 MLP weights.

A trained weight is numerically full rank (all 128 singular values are far above tol), yet its spectrum
decays: a few directions hold a good share of its energy, far more than in a random Gaussian matrix of the
same shape, whose spectrum is flat by comparison (Marchenko-Pastur). "Low rank" in the LoRA sense means this
approximate, energy-based low rank, not exact rank deficiency.

Protocol. Nothing here is trained or chosen: every number is computed exactly from fixed matrices (built from
``seed``) and the shipped model's weights, so there is no split, no tuned rate and no seed to average over.
Each finding is an exact fact checked to float rounding (verdict "holds" or "does not hold").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from ..io.pretrained import load_pretrained
from . import protocol
from .common import weight

RANKS = (1, 2, 4, 8, 16, 32, 64)                      # ranks for the parameter-count table
SHAPES = {"attention 128x128": (128, 128), "mlp 128x512": (128, 512)}
WEIGHT = "h.0.attn.q_proj.weight"                     # the real weight the study looks at
CONSTRUCTED_S = (5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.0, 0.0)   # singular values of the (10 x 8) test matrix
NOISE = 1e-10                                         # perturbation of the rank-deficient example
ERROR_LEVELS = (0.5, 0.25, 0.1)                       # relative Frobenius errors for "rank needed"
EXACT = 1e-12              # |measured - predicted| allowed on the constructed matrix (norm ~6): float64 rounding
EXACT_WEIGHT = 1e-10       # ... on the 128 x 128 weight, whose SVD rounds over more terms
STUDY = "rank-basics"


# ----------------------------------------------------------------------------------------------------
# the measures


def default_tolerance(M, S=None) -> float:
    """NumPy's numerical-rank tolerance for M (m, n): S.max() * max(m, n) * eps of M's dtype.

    S: M's singular values, if already computed."""
    M = numpy.asarray(M)
    S = numpy.linalg.svd(M, compute_uv=False) if S is None else S
    eps = numpy.finfo(M.dtype if numpy.issubdtype(M.dtype, numpy.floating) else numpy.float64).eps
    return float(numpy.max(S, initial=0.0) * max(M.shape) * eps)


def numerical_rank(M, tol: float | None = None) -> int:
    """The number of singular values of M (m, n) above tol (None: default_tolerance(M), NumPy's choice)."""
    M = numpy.asarray(M)
    S = numpy.linalg.svd(M, compute_uv=False)                 # (min(m, n),) in decreasing order
    tol = default_tolerance(M, S) if tol is None else tol
    return int((S > tol).sum())


def best_rank_r(M, r: int):
    """The best rank-r approximation of M (m, n) by truncated SVD, with its measured errors.

    Returns (M_r, fro_error, spectral_error): M_r (m, n) = U[:, :r] diag(S[:r]) V[:r]^T, and
    ||M - M_r||_F and ||M - M_r||_2 measured with numpy.linalg.norm (not from the formulas, so that they can
    be compared with them: see eckart_young_errors).
    """
    M = numpy.asarray(M, dtype=numpy.float64)
    if not 0 <= r <= min(M.shape):
        raise ValueError(f"rank r must be in [0, {min(M.shape)}] for a {M.shape} matrix; got {r}")
    U, S, Vt = numpy.linalg.svd(M, full_matrices=False)      # U (m, p), S (p,), Vt (p, n), p = min(m, n)
    M_r = (U[:, :r] * S[:r]) @ Vt[:r]                        # (m, n)
    residual = M - M_r
    return M_r, float(numpy.linalg.norm(residual, "fro")), float(numpy.linalg.norm(residual, 2))


def eckart_young_errors(S, r: int):
    """What Eckart-Young predicts for the rank-r truncation of a matrix with singular values S (decreasing).

    Returns (sqrt(sum of S[r:]^2), S[r]), with S[r] = 0 when r = len(S)."""
    S = numpy.asarray(S, dtype=numpy.float64)
    return float(numpy.sqrt(numpy.sum(S[r:] ** 2))), float(S[r]) if r < S.size else 0.0


def lora_parameter_count(d: int, k: int, r: int) -> int:
    """Trainable numbers of a rank-r update B A of a d x k weight: B (d, r) and A (r, k), so r (d + k)."""
    return r * (d + k)


def break_even_rank(d: int, k: int) -> float:
    """The rank at which r (d + k) = d k: a rank-r update is cheaper than the full matrix below it."""
    return d * k / (d + k)


def matrix_with_singular_values(m: int, n: int, s, seed: int = 0):
    """A matrix (m, n) = U diag(s) V^T with random orthonormal U (m, p), V (n, p), p = len(s) <= min(m, n)."""
    rng = numpy.random.default_rng(seed)
    s = numpy.asarray(s, dtype=numpy.float64)
    U, _ = numpy.linalg.qr(rng.standard_normal((m, s.size)))   # (m, p) orthonormal columns
    V, _ = numpy.linalg.qr(rng.standard_normal((n, s.size)))   # (n, p)
    return (U * s) @ V.T


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class RankBasicsResult:
    """The numbers of the study (plain lists and numbers; see the module docstring for the math)."""

    seed: int
    identity_rank: int
    deficient_matrix: list                 # 3 x 3, second row = 2 * first row
    deficient_singular_values: list
    deficient_rank: int
    deficient_tolerance: float
    noisy_singular_values: list            # the same matrix + NOISE * Gaussian
    noisy_rank_default_tol: int
    noisy_rank_loose_tol: int
    loose_tolerance: float
    constructed_shape: list                # [m, n]
    constructed_singular_values: list      # the s it was built with
    constructed_rank: int
    eckart_young: dict = field(default_factory=dict)      # {"r", "fro_measured", "fro_predicted",
    #                                                        "spectral_measured", "spectral_predicted"}: lists
    eckart_young_max_discrepancy: float = 0.0
    parameter_counts: dict = field(default_factory=dict)  # {shape name: {"d", "k", "full", "break_even",
    #                                                        "r", "lora", "percent"}}
    weight_name: str = WEIGHT
    weight_shape: list = field(default_factory=list)
    weight_singular_values: list = field(default_factory=list)
    weight_tolerance: float = 0.0
    weight_numerical_rank: int = 0
    weight_eckart_young_ranks: list = field(default_factory=list)
    weight_eckart_young_max_discrepancy: float = 0.0
    random_singular_values: list = field(default_factory=list)   # Gaussian of the same shape and Frobenius norm
    relative_error: dict = field(default_factory=dict)    # {"r": 0..p, "weight", "random", "weight_spectral",
    #                                                        "weight_random_projection"}: lists over r
    rank_needed: dict = field(default_factory=dict)       # {"weight"/"random": {str(level): smallest r
    #                                                        whose relative error <= level}}
    protocol: dict = field(default_factory=dict)          # no training, no selection: see PROTOCOL
    findings: list = field(default_factory=list)          # [protocol.finding(...)]: exact facts checked


PROTOCOL = {"training": "none", "selection": "none: no learning rate, rank or seed is chosen",
            "data": "fixed matrices built from the seed, and the shipped model's pretrained weights",
            "verdict_rule": "an exact fact, checked to float rounding: holds or does not hold"}


def run(fast: bool = False, seed: int = 0) -> RankBasicsResult:
    """Compute every number of the study. No training, so it takes seconds; ``fast`` checks Eckart-Young on the
    real weight at r = 1, 8, 64 only, instead of at every r in RANKS.

    seed: for the random orthonormal factors of the constructed matrix, the noise, and the random references.
    """
    rng = numpy.random.default_rng(seed)

    # 1. rank: the identity, and a matrix whose second row is twice the first
    identity_rank = numerical_rank(numpy.eye(3))
    D = numpy.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]])
    D_S = numpy.linalg.svd(D, compute_uv=False)

    # 2. numerical rank: noise above the default tolerance hides the deficiency; a looser tolerance finds it
    noisy = D + NOISE * rng.standard_normal(D.shape)
    loose = 1e-6 * float(numpy.linalg.svd(noisy, compute_uv=False).max())

    # 3. Eckart-Young on a matrix with chosen singular values
    m, n = 10, 8
    C = matrix_with_singular_values(m, n, CONSTRUCTED_S, seed=seed)
    table = {"r": [], "fro_measured": [], "fro_predicted": [], "spectral_measured": [], "spectral_predicted": []}
    for r in range(min(m, n) + 1):
        _, fro, spectral = best_rank_r(C, r)
        fro_pred, spectral_pred = eckart_young_errors(CONSTRUCTED_S, r)   # from the s it was built with
        for key, value in zip(table, (r, fro, fro_pred, spectral, spectral_pred)):
            table[key].append(value)
    discrepancy = max(max(abs(a - b) for a, b in zip(table["fro_measured"], table["fro_predicted"])),
                      max(abs(a - b) for a, b in zip(table["spectral_measured"], table["spectral_predicted"])))

    # 4. parameter counts of a rank-r update at the model's real shapes
    counts = {}
    for label, (d, k) in SHAPES.items():
        lora = [lora_parameter_count(d, k, r) for r in RANKS]
        counts[label] = {"d": d, "k": k, "full": d * k, "break_even": break_even_rank(d, k), "r": list(RANKS),
                         "lora": lora, "percent": [100.0 * p / (d * k) for p in lora]}

    # 5. a real weight: Wq of the first layer, against a Gaussian matrix of the same shape and Frobenius norm
    W = weight(load_pretrained(dropout=0.0), WEIGHT)                 # (128, 128) float64
    W_S = numpy.linalg.svd(W, compute_uv=False)                      # (128,) decreasing
    R = rng.standard_normal(W.shape)
    R *= numpy.linalg.norm(W) / numpy.linalg.norm(R)
    R_S = numpy.linalg.svd(R, compute_uv=False)
    W_norm = numpy.linalg.norm(W)
    p = min(W.shape)
    curve = {"r": list(range(p + 1)), "weight": [], "random": [], "weight_random_projection": [],
             "weight_spectral": []}
    # a rival rank-r approximation: project W's rows on r random orthonormal directions Q_r (k, r). As
    # Q_r Q_r^T is a projection, ||W - W Q_r Q_r^T||_F^2 = ||W||_F^2 - ||W Q_r||_F^2, a sum over Q's columns.
    Q, _ = numpy.linalg.qr(rng.standard_normal((W.shape[1], W.shape[1])))   # (k, k); Q[:, :r] = Q_r
    captured = numpy.concatenate([[0.0], numpy.cumsum(numpy.sum((W @ Q) ** 2, axis=0))])   # (k + 1,)
    for r in range(p + 1):                 # the whole curve from the spectrum, by Eckart-Young ...
        curve["weight"].append(eckart_young_errors(W_S, r)[0] / W_norm)
        curve["weight_spectral"].append(eckart_young_errors(W_S, r)[1] / W_S[0])
        curve["random"].append(eckart_young_errors(R_S, r)[0] / W_norm)
        curve["weight_random_projection"].append(float(numpy.sqrt(max(W_norm ** 2 - captured[r], 0.0)) / W_norm))
    W_discrepancy = 0.0
    for r in (1, 8, 64) if fast else RANKS:   # ... checked against truncated SVDs measured directly
        _, fro, spectral = best_rank_r(W, r)
        fro_pred, spectral_pred = eckart_young_errors(W_S, r)
        W_discrepancy = max(W_discrepancy, abs(fro - fro_pred), abs(spectral - spectral_pred))
    needed = {key: {str(level): next(r for r, e in enumerate(curve[key]) if e <= level) for level in ERROR_LEVELS}
              for key in ("weight", "random")}

    result = RankBasicsResult(
        seed=seed, identity_rank=identity_rank,
        deficient_matrix=D.tolist(), deficient_singular_values=D_S.tolist(), deficient_rank=numerical_rank(D),
        deficient_tolerance=default_tolerance(D),
        noisy_singular_values=numpy.linalg.svd(noisy, compute_uv=False).tolist(),
        noisy_rank_default_tol=numerical_rank(noisy), noisy_rank_loose_tol=numerical_rank(noisy, loose),
        loose_tolerance=loose,
        constructed_shape=[m, n], constructed_singular_values=list(CONSTRUCTED_S),
        constructed_rank=numerical_rank(C), eckart_young=table, eckart_young_max_discrepancy=float(discrepancy),
        parameter_counts=counts,
        weight_name=WEIGHT, weight_shape=list(W.shape), weight_singular_values=W_S.tolist(),
        weight_tolerance=default_tolerance(W, W_S), weight_numerical_rank=numerical_rank(W),
        weight_eckart_young_ranks=list((1, 8, 64) if fast else RANKS),
        weight_eckart_young_max_discrepancy=float(W_discrepancy),
        random_singular_values=R_S.tolist(), relative_error=curve, rank_needed=needed, protocol=dict(PROTOCOL),
    )
    result.findings = findings(result)
    return result


def _holds(fact: bool) -> str:
    return "holds" if fact else "does not hold"


def findings(result: RankBasicsResult) -> list:
    """The facts the paper builds on, each checked exactly on this result (verdict "holds" or "does not hold")."""
    attention = result.parameter_counts["attention 128x128"]
    counts_exact = all(n == r * (c["d"] + c["k"]) for c in result.parameter_counts.values()
                       for r, n in zip(c["r"], c["lora"]))
    break_even_exact = all(abs(c["break_even"] * (c["d"] + c["k"]) - c["d"] * c["k"]) <= 1e-9 * c["d"] * c["k"]
                           for c in result.parameter_counts.values())
    p = min(result.weight_shape)
    fewer = all(result.rank_needed["weight"][level] < result.rank_needed["random"][level]
                for level in result.rank_needed["weight"])
    levels = ", ".join(f"{level}: {result.rank_needed['weight'][level]} vs {result.rank_needed['random'][level]}"
                       for level in result.rank_needed["weight"])
    return [
        protocol.finding(
            STUDY, "rank = number of non-zero singular values; noise above the tolerance hides a deficiency",
            "background (numpy.linalg.matrix_rank's tolerance S.max * max(m, n) * eps)",
            (f"rank(I_3) = {result.identity_rank}; repeated row: {result.deficient_rank}; + {NOISE:g} noise: "
             f"{result.noisy_rank_default_tol} at the default tolerance, {result.noisy_rank_loose_tol} at "
             f"{result.loose_tolerance:.1e}"),
            _holds((result.identity_rank, result.deficient_rank, result.noisy_rank_default_tol,
                    result.noisy_rank_loose_tol) == (3, 2, 3, 2))),
        protocol.finding(
            STUDY, "Eckart-Young: the truncated SVD's errors are sqrt(sum of S[r:]^2) (Frobenius) and S[r] (spectral)",
            "background (the best rank-r approximation; section 7 of the paper reads updates through it)",
            (f"largest abs(measured - predicted): {result.eckart_young_max_discrepancy:.1e} on a "
             f"{'x'.join(map(str, result.constructed_shape))} matrix (every r), "
             f"{result.weight_eckart_young_max_discrepancy:.1e} on {result.weight_name} "
             f"(r = {', '.join(map(str, result.weight_eckart_young_ranks))})"),
            _holds(result.eckart_young_max_discrepancy < EXACT and result.weight_eckart_young_max_discrepancy
                   < EXACT_WEIGHT)),
        protocol.finding(
            STUDY, "a rank-r update B A of a d x k weight trains r (d + k) numbers, fewer than d k below "
                   "r = d k / (d + k)",
            "section 5.1: trainable = 2 x L_LoRA x d_model x r",
            (f"128 x 128: {attention['r'][0]} (d + k) = {attention['lora'][0]:,} at r = {attention['r'][0]}, "
             f"d k = {attention['full']:,}, break-even r = {attention['break_even']:g}"),
            _holds(counts_exact and break_even_exact)),
        protocol.finding(
            STUDY, "a pretrained weight is numerically full rank, yet needs fewer directions than a Gaussian",
            "background (section 4.1: 'low intrinsic rank' is approximate, not exact rank deficiency)",
            (f"{result.weight_name}: numerical rank {result.weight_numerical_rank} of {p}; rank for relative "
             f"error {levels} (weight vs Gaussian of the same shape and norm)"),
            _holds(result.weight_numerical_rank == p and fewer)),
    ]


# ----------------------------------------------------------------------------------------------------
# the report


def plot(result: RankBasicsResult, path) -> None:
    """Four panels: Wq's spectrum, its rank-r error curve, Eckart-Young measured vs predicted, parameter counts."""
    from ..plots import new_figure, save_figure

    fig, axes = new_figure(2, 2, figsize=(11, 8))
    (ax_s, ax_e), (ax_ey, ax_p) = axes

    index = numpy.arange(1, len(result.weight_singular_values) + 1)
    ax_s.semilogy(index, result.weight_singular_values, label=f"pretrained {result.weight_name}")
    ax_s.semilogy(index, result.random_singular_values, "--", label="Gaussian, same shape and norm")
    ax_s.axhline(result.weight_tolerance, color="grey", lw=0.8, ls=":", label="numerical-rank tolerance")
    ax_s.set(title="singular values", xlabel="index i", ylabel="S[i]")
    ax_s.legend(fontsize=8)

    curve = result.relative_error
    ax_e.plot(curve["r"], curve["weight"], label="best rank r (truncated SVD)")
    ax_e.plot(curve["r"], curve["weight_random_projection"], ":", label="projection on r random directions")
    ax_e.plot(curve["r"], curve["random"], "--", label="Gaussian, best rank r")
    ax_e.set(title=f"rank-r approximation of {result.weight_name}", xlabel="rank r",
             ylabel="||W - W_r||_F / ||W||_F", ylim=(0, 1.02))
    ax_e.legend(fontsize=8)

    ey = result.eckart_young
    ax_ey.plot(ey["r"], ey["fro_predicted"], "-", color="C0", label="Frobenius: sqrt(sum S[r:]^2)")
    ax_ey.plot(ey["r"], ey["fro_measured"], "o", color="C0", label="Frobenius: measured")
    ax_ey.plot(ey["r"], ey["spectral_predicted"], "-", color="C1", label="spectral: S[r]")
    ax_ey.plot(ey["r"], ey["spectral_measured"], "s", mfc="none", color="C1", label="spectral: measured")
    ax_ey.set(title=f"Eckart-Young on a {'x'.join(map(str, result.constructed_shape))} matrix, "
                    f"s = {', '.join(f'{s:g}' for s in result.constructed_singular_values)}",
              xlabel="rank r", ylabel="||M - M_r||")
    ax_ey.title.set_fontsize(9)
    ax_ey.legend(fontsize=8)

    for i, (label, c) in enumerate(result.parameter_counts.items()):
        ax_p.plot(c["r"], c["lora"], "o-", color=f"C{i}", label=f"r (d + k), {label}")
        ax_p.axhline(c["full"], color=f"C{i}", ls="--", lw=0.8, label=f"d k = {c['full']:,}")
    ax_p.set_xscale("log", base=2)
    ax_p.set_yscale("log")
    ax_p.set(title="trainable numbers of a rank-r update", xlabel="rank r", ylabel="parameters")
    ax_p.legend(fontsize=8)
    save_figure(fig, path)


def summary(result: RankBasicsResult) -> str:
    """The numbers as short text tables."""
    lines = ["Rank basics", "",
             f"rank(I_3) = {result.identity_rank}",
             f"rank([[1,2,3],[2,4,6],[1,0,1]]) = {result.deficient_rank}   singular values "
             + ", ".join(f"{s:.3g}" for s in result.deficient_singular_values)
             + f"   (tol = S.max * max(m, n) * eps = {result.deficient_tolerance:.2e})",
             (f"  + {NOISE:g} noise: numerical rank {result.noisy_rank_default_tol} at the default tol, "
              f"{result.noisy_rank_loose_tol} at tol {result.loose_tolerance:.1e}   (smallest S "
              f"{min(result.noisy_singular_values):.1e})"),
             "",
             (f"Eckart-Young on a {result.constructed_shape[0]}x{result.constructed_shape[1]} matrix U diag(s) V^T, "
              f"s = {', '.join(f'{s:g}' for s in result.constructed_singular_values)} "
              f"(numerical rank {result.constructed_rank})"),
             f"{'r':>3} {'||M-M_r||_F':>12} {'sqrt(sum tail^2)':>17} {'||M-M_r||_2':>12} {'S[r]':>8}"]
    ey = result.eckart_young
    for r, fm, fp, sm, sp in zip(ey["r"], ey["fro_measured"], ey["fro_predicted"], ey["spectral_measured"],
                                 ey["spectral_predicted"]):
        lines.append(f"{r:>3} {fm:>12.6f} {fp:>17.6f} {sm:>12.6f} {sp:>8.4f}")
    lines += [f"largest |measured - predicted|: {result.eckart_young_max_discrepancy:.1e}", "",
              "parameters of a rank-r update r (d + k) against d k"]
    for label, c in result.parameter_counts.items():
        lines.append(f"  {label}: d k = {c['full']:,}, cheaper below r = {c['break_even']:.1f}")
        lines.append("    " + "  ".join(f"r={r}: {n:,} ({pct:.1f}%)" for r, n, pct in
                                        zip(c["r"], c["lora"], c["percent"])))
    S = result.weight_singular_values
    curve = result.relative_error
    lines += ["",
              (f"{result.weight_name} {result.weight_shape[0]}x{result.weight_shape[1]} of the shipped model: "
               f"numerical rank {result.weight_numerical_rank} (tol {result.weight_tolerance:.1e}); "
               f"S from {S[0]:.3g} down to {S[-1]:.2g}"),
              (f"  Eckart-Young on it (r = {', '.join(map(str, result.weight_eckart_young_ranks))}): "
               f"largest |measured - predicted| error {result.weight_eckart_young_max_discrepancy:.1e}"),
              f"{'r':>5} {'Wq best':>8} {'Wq random dirs':>15} {'Gaussian best':>14} {'Wq spectral':>12}"]
    for r in (1, 2, 4, 8, 16, 32, 64):
        if r < len(curve["r"]):
            lines.append(f"{r:>5} {curve['weight'][r]:>8.3f} {curve['weight_random_projection'][r]:>15.3f} "
                         f"{curve['random'][r]:>14.3f} {curve['weight_spectral'][r]:>12.3f}")
    lines.append("(relative Frobenius error ||W - W_r||_F / ||W||_F; spectral: S[r] / S[0])")
    for key, name in (("weight", "Wq"), ("random", "Gaussian")):
        lines.append("  rank needed for relative error <= "
                     + ", ".join(f"{level}: {r}" for level, r in result.rank_needed[key].items()) + f"  ({name})")
    lines += ["", "protocol: no training and no selection; exact facts checked to float rounding", "findings:"]
    lines += [f"- {f['claim']}: {f['verdict']}\n    ours: {f['ours']}" for f in result.findings]
    return "\n".join(lines)
