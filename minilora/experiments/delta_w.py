"""How the LoRA update Delta W relates to the pretrained W (LoRA paper, section 7.3, Table 7).

The question: does the update repeat what W already does (its top singular directions), point somewhere
random, or amplify directions that W has but does not emphasise?

The measure. Project W onto an r-dimensional pair of subspaces and take the Frobenius norm:

    projection_norm(W, U, V) = ||U^T W V||_F          W: (m, n); U: (m, r), V: (n, r), orthonormal columns.

Layout. minilora stores a linear layer's W as (in, out) (y = x W), so here U spans directions of the input
space R^in and V of the output space R^out, and Delta W = s A^T B^T (in, out) is in the same layout. The paper
writes W as (d, k) acting as h = W x (W is (out, in)) and computes U^T W V^T with U (d, r) and V^T (r, k); it is
the same number: both are the norm of W restricted to the same input and output subspaces, our
||U_in^T W_(in,out) V_out||_F = ||V_out^T W_(out,in) U_in||_F. What matters is that U, V are the left and right
singular vectors of a matrix in W's own layout.

Three choices of U, V, each of rank r:
  - Delta W's top-r singular vectors (Delta W from a rank-r adapter has rank r, so these are all of it),
  - W's own top-r singular vectors: then ||U^T W V||_F = sqrt(sigma_1^2 + ... + sigma_r^2), the largest value
    any orthonormal rank-r U, V can give (the singular values of U^T W V are at most W's, one by one),
  - random orthonormal U, V: E ||U^T W V||_F^2 = trace(W^T E[P_U] W E[P_V]) = (r / m)(r / n) ||W||_F^2, since
    the projector onto a uniformly random r-dimensional subspace of R^m has mean (r / m) I.

The amplification factor ||Delta W||_F / ||U^T W V||_F (U, V from Delta W) says how much the update
magnifies the part of W that lies in its own directions.

The paper (GPT-3, layer 48 Wq): at r = 4, ||U^T W V||_F is 0.32 for Delta W's directions, 21.67 for W's and
0.02 for random (||W||_F = 61.95, ||Delta W||_F = 6.91): Delta W correlates with W more than chance but mostly
amplifies directions W does not emphasise, by a factor of about 6.91 / 0.32 ~ 21.5; at r = 64 the factor is
about 2. The paper keeps alpha fixed, so its scale alpha / r (and ||Delta W||) shrinks as r grows; here
run_lora keeps alpha = 2 r (scale 2 at every rank), so any shrinking of the factor with r comes from the
denominator, the larger subspace taking in more of W.

The study: LoRA on {Wq, Wv} of every layer at r = 1, 2, 4, 8, 16, 32 (200 steps, one run per rank), the table
for every adapted module; the summary and plot show the middle layer (the paper shows layer 48 of 96) and the
geometric mean over modules.

``summary`` reports what the run shows: the three numbers and ||Delta W||_F for the middle layer at every
rank, and per rank the geometric means over all modules of the amplification factor, of Delta W's directions
against random and of W's directions against Delta W's. They say whether the paper's ordering (W's directions
above Delta W's, Delta W's above random) holds here and how the amplification factor changes with r. W's own
directions are the largest by the theorem above; the rest is the run's finding. Unlike the paper's update,
these runs move W far (200 AdamW steps at lr 1e-2 and scale 2 on a 128-wide model), so ||Delta W||_F need not
be small beside ||W||_F.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from .common import RunSettings, adapter_matrices, run_lora, weight

TARGETS = ("q_proj", "v_proj")
RANKS = (1, 2, 4, 8, 16, 32)
FAST_RANKS = (2, 8)
STEPS = 200
FAST_STEPS = 10
RANDOM_DRAWS = 16           # random U, V pairs averaged per rank and module

# ----------------------------------------------------------------------------------------------------
# the measure


def projection_norm(W, U, V) -> float:
    """||U^T W V||_F: the size of W between the subspaces spanned by U's and V's columns.

    W: (m, n); U: (m, r); V: (n, r), orthonormal columns. Returns a float.
    """
    W, U, V = (numpy.asarray(x, dtype=numpy.float64) for x in (W, U, V))
    if W.ndim != 2 or U.ndim != 2 or V.ndim != 2 or U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(f"need W (m, n), U (m, r), V (n, r); got W {W.shape}, U {U.shape}, V {V.shape}")
    return float(numpy.linalg.norm(U.T @ W @ V))             # (r, m) (m, n) (n, r) -> (r, r)


def top_singular_vectors(M, r: int):
    """The top-r left and right singular vectors of M (m, n): U (m, r), V (n, r), with M ~ U diag(S) V^T."""
    M = numpy.asarray(M, dtype=numpy.float64)
    if not 1 <= r <= min(M.shape):
        raise ValueError(f"need 1 <= r <= {min(M.shape)} for a {M.shape} matrix; got r = {r}")
    U, _, Vt = numpy.linalg.svd(M, full_matrices=False)
    return U[:, :r], Vt[:r].T


def random_orthonormal(n: int, r: int, rng) -> numpy.ndarray:
    """A uniformly random (Haar) n x r matrix with orthonormal columns: QR of a Gaussian, signs fixed."""
    Q, R = numpy.linalg.qr(rng.standard_normal((n, r)))
    return Q * numpy.sign(numpy.diag(R))[None, :]            # the sign fix makes Q exactly Haar-distributed


def random_projection_expectation(W, r: int) -> float:
    """sqrt(E ||U^T W V||_F^2) for random orthonormal U (m, r), V (n, r): r ||W||_F / sqrt(m n)."""
    m, n = numpy.shape(W)
    return float(r * numpy.linalg.norm(W) / numpy.sqrt(m * n))


def compare(W, delta, r: int, rng, draws: int = RANDOM_DRAWS) -> dict:
    """The Table 7 numbers for one W (m, n) and its update delta (m, n) at rank r.

    Returns {"delta_dirs", "w_dirs", "random" (mean over draws), "random_expected", "w_norm", "delta_norm",
    "amplification" = ||Delta W||_F / delta_dirs}.
    """
    U, V = top_singular_vectors(delta, r)
    delta_dirs = projection_norm(W, U, V)
    w_dirs = projection_norm(W, *top_singular_vectors(W, r))
    m, n = numpy.shape(W)
    random = float(numpy.mean([projection_norm(W, random_orthonormal(m, r, rng), random_orthonormal(n, r, rng))
                               for _ in range(draws)]))
    delta_norm = float(numpy.linalg.norm(delta))
    return {"delta_dirs": delta_dirs, "w_dirs": w_dirs, "random": random,
            "random_expected": random_projection_expectation(W, r), "w_norm": float(numpy.linalg.norm(W)),
            "delta_norm": delta_norm, "amplification": delta_norm / delta_dirs}


# ----------------------------------------------------------------------------------------------------
# the study

GEOMEAN_HEADER = ("over all adapted modules: geometric mean of the amplification factor, of (Delta W dirs / random) "
                  "and of (W dirs / Delta W dirs):")
COLUMNS = ("delta_dirs", "w_dirs", "random", "random_expected", "w_norm", "delta_norm", "amplification")


@dataclass
class DeltaWResult:
    """What run() measured.

    modules: {module name: {column: [value at each rank]}} with the columns of compare().
    runs: {"r=R": {"val_before", "val_after"}}.
    """

    ranks: list
    steps: int
    layer: int
    shape: list                     # W's (in, out)
    seed: int
    runs: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)


def run(fast: bool = False, seed: int = 0) -> DeltaWResult:
    """One LoRA run per rank; the Table 7 numbers for every adapted module at every rank."""
    ranks = FAST_RANKS if fast else RANKS
    settings = RunSettings.for_mode(fast, steps=FAST_STEPS if fast else STEPS)
    rng = numpy.random.default_rng(seed)
    result = None
    for r in ranks:
        model, fit = run_lora(TARGETS, r, seed, settings)
        names = [f"h.{i}.attn.{t}" for i in range(model.config.n_layer) for t in TARGETS]
        if result is None:
            W0 = weight(model, names[0] + ".weight")
            result = DeltaWResult(ranks=list(ranks), steps=settings.steps, layer=model.config.n_layer // 2,
                                  shape=list(W0.shape), seed=seed,
                                  modules={n: {c: [] for c in COLUMNS} for n in names})
        result.runs[f"r={r}"] = {"val_before": fit.val_before, "val_after": fit.val_after}
        for name in names:
            _, _, delta = adapter_matrices(model, name)      # (in, out), W's layout
            row = compare(weight(model, name + ".weight"), delta, r, rng)
            for c in COLUMNS:
                result.modules[name][c].append(row[c])
    return result


# ----------------------------------------------------------------------------------------------------
# report


def _layer_modules(result: DeltaWResult) -> list:
    return [n for n in result.modules if n.startswith(f"h.{result.layer}.")]


def summary(result: DeltaWResult) -> str:
    """The Table 7 analogue for the middle layer's Wq and Wv, and the amplification factor over all modules."""
    title = (f"Delta W against W (paper 7.3, Table 7): LoRA on Wq, Wv, W {tuple(result.shape)} (in, out), "
             f"{result.steps} steps, seed {result.seed}")
    legend = ("||U^T W V||_F with U, V the top-r singular vectors of Delta W / of W / random (mean of "
              f"{RANDOM_DRAWS}; chance sqrt(E) = r ||W|| / sqrt(in out))")
    runs = "runs: " + "; ".join(f"r={r}: val {result.runs[f'r={r}']['val_before']:.3f} -> "
                                f"{result.runs[f'r={r}']['val_after']:.3f}" for r in result.ranks)
    header = (f"{'r':>4s} {'Delta W dirs':>13s} {'W dirs':>9s} {'random':>9s} {'(chance)':>9s} "
              f"{'||Delta W||':>12s} {'amplification':>14s}")
    lines = [title, runs, legend]
    for name in _layer_modules(result):
        m = result.modules[name]
        lines += ["", f"{name}   ||W||_F = {m['w_norm'][0]:.2f}", header]
        for k, r in enumerate(result.ranks):
            lines.append(f"{r:4d} {m['delta_dirs'][k]:13.3f} {m['w_dirs'][k]:9.3f} {m['random'][k]:9.3f} "
                         f"{m['random_expected'][k]:9.3f} {m['delta_norm'][k]:12.3f} {m['amplification'][k]:14.2f}")
    lines += ["", GEOMEAN_HEADER]
    for k, r in enumerate(result.ranks):
        amp, above_random, below_w = _geomeans(result, k)
        lines.append(f"  r={r:<3d} amplification {amp:6.2f}   Delta W dirs / random {above_random:5.2f}   "
                     f"W dirs / Delta W dirs {below_w:5.2f}")
    return "\n".join(lines)


def _geomeans(result: DeltaWResult, k: int):
    def gm(values):
        return float(numpy.exp(numpy.mean(numpy.log(values))))
    mods = result.modules.values()
    return (gm([m["amplification"][k] for m in mods]),
            gm([m["delta_dirs"][k] / m["random"][k] for m in mods]),
            gm([m["w_dirs"][k] / m["delta_dirs"][k] for m in mods]))


def plot(result: DeltaWResult, path) -> None:
    """||U^T W V||_F against r for the three choices of U, V (middle layer's Wq and Wv), and the amplification
    factor against r for every adapted module."""
    from matplotlib.ticker import NullLocator

    from ..plots import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(17, 5))
    r = result.ranks
    for ax, name in zip(axes[:2], _layer_modules(result)):
        m = result.modules[name]
        ax.plot(r, m["w_dirs"], "o-", label="U, V of W (top r)")
        ax.plot(r, m["delta_dirs"], "o-", label="U, V of Delta W")
        ax.plot(r, m["random"], "o-", label="random U, V")
        ax.plot(r, m["random_expected"], "k:", label="chance: sqrt(E ||.||^2) = r ||W|| / sqrt(in out)")
        ax.plot(r, m["delta_norm"], "s--", color="gray", label="||Delta W||_F")
        ax.axhline(m["w_norm"][0], color="k", linestyle="--", linewidth=0.8, label="||W||_F")
        ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="||U^T W V||_F", title=name)
        ax.set_xticks(r, [str(x) for x in r])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=8)
    ax = axes[2]
    for name, m in result.modules.items():
        ax.plot(r, m["amplification"], "o-", linewidth=1, markersize=3, label=name.replace(".attn.", ".")
                .replace("_proj", ""))
    ax.plot(r, [_geomeans(result, k)[0] for k in range(len(r))], "k-", linewidth=3, label="geometric mean")
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="||Delta W||_F / ||U^T W V||_F",
           title="amplification factor (U, V of Delta W)")
    ax.set_xticks(r, [str(x) for x in r])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
