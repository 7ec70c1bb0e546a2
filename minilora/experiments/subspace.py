"""Subspace similarity between LoRA adapters (LoRA paper, section 7.2, Figures 3 and 4).

The question: when LoRA learns a rank-r update, how many of those r directions matter? If the same few
directions come out of a small-rank run and a larger-rank run (or out of two seeds), those directions are
what the task needs, and the remaining ones are noise; a small r would then be enough.

The measure. A LoRA adapter's A is (r, in): it reads r directions out of the layer's input space R^in.
Write A = L S U^T (SVD, singular values in decreasing order); the columns of U (in, r) are A's right
singular vectors, an orthonormal basis of the input directions A uses, most important first. With U_i the
first i of them, the normalized subspace similarity of two adapters is

    phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)                                   in [0, 1].

||U1_i^T U2_j||_F^2 = sum over the i x j pairs of (u1_a . u2_b)^2 is the squared length of the projection of
the smaller subspace onto the larger one, so it is at most min(i, j): phi = 1 when one subspace contains the
other, phi = 0 when they are orthogonal.

What chance gives. If U2_j spans a uniformly random j-dimensional subspace of R^d, its projector P = U2_j U2_j^T
has E[P] = (j / d) I: E[P] commutes with every rotation (the distribution does), so it is a multiple c I of
the identity, and its trace is E[trace P] = j, so c = j / d. Then for any fixed U1_i,

    E ||U1_i^T U2_j||_F^2 = E trace(U1_i^T P U1_i) = trace(U1_i^T (j / d) I U1_i) = i j / d,
    E phi = i j / (d min(i, j)) = max(i, j) / d.

So at d = n_embd = 128 chance gives phi(1, 1) = 1/128 ~ 0.008 and phi(i, 32) = 0.25: a comparison with a
large r_large is high even by chance, which is why r_large stays well below d here.

The study. LoRA on {Wq, Wv} of every layer of the shipped model, three runs: r = 8 (seed s), r = 8 (seed
s + 1) and r = 32 (seed s + 2). Each seed sets both A's random start and the batch order; the r = 32 run gets
its own seed because with a shared seed the first layer's r = 8 start would be the first 8 rows of the
r = 32 start, a shared subspace that training did not make. Compared: r = 8 against r = 32 ("ranks",
the paper's Figure 3) and the two r = 8 runs ("seeds", Figure 4), each

  - after training (the paper's measure),
  - at initialisation (the control: B starts at 0 and A is random, so these are random subspaces and phi
    should sit at max(i, j) / d), and
  - on what training added, A - A_init (short runs leave A's random start inside A; this removes it).

The paper (GPT-3, r = 8 against r = 64) finds the top direction shared, phi > 0.5, and the rest near chance:
the useful subspace of the update is tiny.

``summary`` reports what the run shows: for each pair (ranks, seeds) and each state (trained, init,
learned), phi of the top directions, of the top direction against all of the other's, and of all against
all, averaged over the adapted matrices beside chance; and phi(1, 1) module by module. Trained against init
and chance says whether training makes the subspaces overlap beyond chance; phi(1, 1) against the paper's
> 0.5 says whether a dominant top direction is shared, as in GPT-3.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from ..core.lora import LoRAConfig, apply_lora
from ..io.pretrained import load_pretrained
from .common import RunSettings, adapter_matrices, run_lora

TARGETS = ("q_proj", "v_proj")
R_SMALL, R_LARGE = 8, 32
STEPS = 400                 # LoRA moves A only once B is non-zero; 400 steps let A learn (default 100 is short)
FAST_STEPS = 10

# ----------------------------------------------------------------------------------------------------
# the measure


def subspace_basis(A) -> numpy.ndarray:
    """The right singular vectors of A (r, in) as columns, most important first: U (in, r), U^T U = I."""
    A = numpy.asarray(A, dtype=numpy.float64)
    if A.ndim != 2:
        raise ValueError(f"A must be a 2-D (r, in) matrix; got shape {A.shape}")
    _, _, Vt = numpy.linalg.svd(A, full_matrices=False)    # A = L S Vt, Vt: (min(r, in), in)
    return Vt.T                                              # (in, r)


def phi_matrix(A1, A2) -> numpy.ndarray:
    """phi(A1, A2, i, j) for every i = 1..r1, j = 1..r2, as an (r1, r2) array (entry [i-1, j-1]).

    A1: (r1, in), A2: (r2, in), the same input dimension.
    """
    U1, U2 = subspace_basis(A1), subspace_basis(A2)          # (in, r1), (in, r2)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 must read the same input space; got in = {U1.shape[0]} and {U2.shape[0]}")
    overlap = (U1.T @ U2) ** 2                               # (r1, r2): (u1_a . u2_b)^2
    squared_norms = overlap.cumsum(axis=0).cumsum(axis=1)    # [i-1, j-1] = ||U1_i^T U2_j||_F^2
    i = numpy.arange(1, overlap.shape[0] + 1)[:, None]
    j = numpy.arange(1, overlap.shape[1] + 1)[None, :]
    return numpy.clip(squared_norms / numpy.minimum(i, j), 0.0, 1.0)   # clip: rounding only


def phi(A1, A2, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) with U the right singular vectors of A (r, in)."""
    r1, r2 = numpy.shape(A1)[0], numpy.shape(A2)[0]
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}; got i = {i}, j = {j}")
    return float(phi_matrix(A1, A2)[i - 1, j - 1])


def random_expectation(r1: int, r2: int, d: int) -> numpy.ndarray:
    """E phi for uniformly random subspaces of R^d: max(i, j) / d as an (r1, r2) array (see the module docstring)."""
    i = numpy.arange(1, r1 + 1)[:, None]
    j = numpy.arange(1, r2 + 1)[None, :]
    return numpy.maximum(i, j) / d


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class SubspaceResult:
    """What run() measured. Heatmaps are (r1, r2) lists of lists, entry [i-1][j-1] = phi(A1, A2, i, j).

    runs: {label: {"r", "seed", "val_before", "val_after"}}.
    heatmaps: {"<pair>/<state>/<target>": matrix} for the chosen layer; pair "ranks" (r_small vs r_large) or
      "seeds" (two r_small runs), state "trained", "init" or "learned" (A - A_init), target "q_proj"/"v_proj".
    layers: {"<pair>/<state>": {module name: {"top1": phi(1, 1), "top1_in_all": phi(1, r2),
      "square": phi(r1, r1), "all": phi(r1, r2), "mean": mean of the heatmap}}} for every adapted module.
    """

    d: int
    r_small: int
    r_large: int
    steps: int
    layer: int
    runs: dict = field(default_factory=dict)
    heatmaps: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    random: dict = field(default_factory=dict)      # chance values max(i, j) / d at the same (i, j)


def _initial_A(r: int, seed: int) -> dict:
    """{module name: A} at initialisation, exactly as run_lora(seed=seed) starts (apply_lora with that seed)."""
    model = load_pretrained(dropout=0.0)
    apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, targets=TARGETS), seed=seed)
    return {name: adapter_matrices(model, name)[0] for name in _module_names(model)}


def _module_names(model) -> list:
    return [f"h.{i}.attn.{t}" for i in range(model.config.n_layer) for t in TARGETS]


def run(fast: bool = False, seed: int = 0) -> SubspaceResult:
    """Train the three adapters (r_small twice, r_large once) and compare their A's subspaces."""
    settings = RunSettings.for_mode(fast, steps=FAST_STEPS if fast else STEPS)
    specs = {"small": (R_SMALL, seed), "small2": (R_SMALL, seed + 1), "large": (R_LARGE, seed + 2)}
    trained, initial, runs = {}, {}, {}
    for key, (r, s) in specs.items():
        model, fit = run_lora(TARGETS, r, s, settings)
        trained[key] = {name: adapter_matrices(model, name)[0] for name in _module_names(model)}
        initial[key] = _initial_A(r, s)
        runs[f"r={r} seed={s}"] = {"r": r, "seed": s, "val_before": fit.val_before, "val_after": fit.val_after}
    names = _module_names(model)
    n_layer, d = model.config.n_layer, model.config.n_embd
    layer = n_layer // 2                                     # the paper shows a middle layer (48 of 96)
    result = SubspaceResult(d=d, r_small=R_SMALL, r_large=R_LARGE, steps=settings.steps, layer=layer, runs=runs)
    pairs = {"ranks": ("small", "large"), "seeds": ("small", "small2")}
    states = {"trained": lambda k, n: trained[k][n], "init": lambda k, n: initial[k][n],
              "learned": lambda k, n: trained[k][n] - initial[k][n]}
    for pair, (k1, k2) in pairs.items():
        for state, get in states.items():
            per_module = {}
            for name in names:
                m = phi_matrix(get(k1, name), get(k2, name))
                per_module[name] = _stats(m)
                if name.startswith(f"h.{layer}."):
                    result.heatmaps[f"{pair}/{state}/{name.rsplit('.', 1)[1]}"] = m.tolist()
            result.layers[f"{pair}/{state}"] = per_module
        r2 = R_LARGE if pair == "ranks" else R_SMALL
        chance = random_expectation(R_SMALL, r2, d)
        result.random[pair] = _stats(chance)
    return result


def _stats(m) -> dict:
    """The numbers the summary reports from a phi heatmap m (r1, r2), r1 <= r2."""
    r1 = m.shape[0]
    return {"top1": float(m[0, 0]), "top1_in_all": float(m[0, -1]), "square": float(m[r1 - 1, r1 - 1]),
            "all": float(m[-1, -1]), "mean": float(m.mean())}


# ----------------------------------------------------------------------------------------------------
# report


def summary(result: SubspaceResult) -> str:
    """phi of the top direction, of the top direction against all of the other's, and of all against all,
    per pair of runs and state, averaged over the adapted modules, beside chance."""
    title = (f"Subspace similarity phi of LoRA's A (paper 7.2): r={result.r_small} vs r={result.r_large} "
             f"('ranks') and two seeds at r={result.r_small} ('seeds'); d={result.d}, {result.steps} steps")
    lines = [title,
             "runs: " + "; ".join(f"{k}: val {v['val_before']:.3f} -> {v['val_after']:.3f}"
                                  for k, v in sorted(result.runs.items(), key=lambda kv: (kv[1]["r"], kv[1]["seed"]))),
             "",
             "mean over all adapted Wq, Wv (and min..max):"]
    stats = ("top1", "top1_in_all", "square", "all")
    lines.append(f"{'pair':6s} {'A':8s} " + " ".join(f"{h:>20s}" for h in (
        "phi(1,1)", "phi(1,r2)", "phi(r1,r1)", "phi(r1,r2)")))
    for pair in ("ranks", "seeds"):
        for state in ("trained", "init", "learned"):
            cells = []
            for stat in stats:
                values = [v[stat] for v in result.layers[f"{pair}/{state}"].values()]
                cells.append(f"{numpy.mean(values):.3f} ({min(values):.2f}..{max(values):.2f})")
            lines.append(f"{pair:6s} {state:8s} " + " ".join(f"{c:>20s}" for c in cells))
        chance = result.random[pair]
        lines.append(f"{pair:6s} {'chance':8s} " + " ".join(
            f"{chance[s]:>20.3f}" for s in stats))
    note = (f"(r1, r2) = ({result.r_small}, {result.r_large}) for ranks, ({result.r_small}, {result.r_small}) "
            "for seeds; 'learned' is A - A_init")
    chance = result.random["ranks"]["top1"]
    lines += ["", note, "", f"per module, ranks pair, phi(1,1) trained / init / learned (chance {chance:.3f}):"]
    for name in result.layers["ranks/trained"]:
        trained, init, learned = (result.layers[f"ranks/{s}"][name]["top1"] for s in ("trained", "init", "learned"))
        seeds = result.layers["seeds/trained"][name]["top1"]
        lines.append(f"  {name:16s} {trained:.3f} / {init:.3f} / {learned:.3f}   (seeds, trained: {seeds:.3f})")
    return "\n".join(lines)


def plot(result: SubspaceResult, path) -> None:
    """Heatmaps of phi for the chosen layer's Wq and Wv (ranks pair, seeds pair; trained, learned, init) beside
    chance max(i, j) / d, and phi(1, 1) for every adapted module."""
    from ..plots import new_figure, save_figure

    fig, axes = new_figure(3, 4, figsize=(20, 11))
    L = result.layer
    rows = [("ranks", f"r={result.r_small} vs r={result.r_large}"), ("seeds", f"r={result.r_small}, two seeds")]
    for row, (pair, title) in enumerate(rows):
        panels = [("trained", "q_proj"), ("trained", "v_proj"), ("learned", "q_proj"), ("init", "q_proj")]
        for col, (state, target) in enumerate(panels):
            ax = axes[row, col]
            m = numpy.asarray(result.heatmaps[f"{pair}/{state}/{target}"])
            _heatmap(ax, m, f"{title}: W{target[0]} layer {L}, {'A - A_init' if state == 'learned' else 'A ' + state}")
    # chance, at the ranks pair's grid
    ax = axes[2, 0]
    image = _heatmap(ax, random_expectation(result.r_small, result.r_large, result.d),
                     f"chance: max(i, j) / d, d = {result.d}")
    fig.colorbar(image, ax=ax, label="phi (every heatmap: same 0..1 scale)")
    # phi(1, 1) per module
    for col, (pair, stat, label) in enumerate([("ranks", "top1", "phi(1, 1)"), ("ranks", "top1_in_all",
                                                f"phi(1, {result.r_large})"), ("seeds", "top1", "phi(1, 1)")]):
        ax = axes[2, col + 1]
        names = list(result.layers[f"{pair}/trained"])
        x = numpy.arange(len(names))
        for offset, state in zip((-0.27, 0.0, 0.27), ("trained", "learned", "init")):
            ax.bar(x + offset, [result.layers[f"{pair}/{state}"][n][stat] for n in names], width=0.27,
                   label=f"A {state}" if state != "learned" else "A - A_init")
        ax.axhline(result.random[pair][stat], color="k", linestyle="--", label="chance")
        ax.set_xticks(x, [n.replace(".attn.", ".").replace("_proj", "") for n in names], rotation=45)
        ax.set_ylim(0, 1)
        ax.set_title(f"{pair}: {label}, every adapted module")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def _heatmap(ax, m, title):
    image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                      extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    ax.set_title(title, fontsize=9)
    return image
