"""Full fine-tuning's update is low-rank too.

LoRA constrains the update of a weight to rank r. The paper's motivation (section 4.1, after Aghajanyan et al.
2020) is a hypothesis: the change a weight undergoes during adaptation has a low "intrinsic rank" anyway, so
the constraint costs little. This study tests the hypothesis without LoRA: it fine-tunes every weight of the
shipped model (full fine-tuning, common.run_full) on the downstream corpus and looks at the update itself,

    Delta W = W_finetuned - W_pretrained        (d, k): (128, 128) for q, k, v, o; (128, 512), (512, 128) for the MLP

through its singular values S (decreasing, p = min(d, k) of them), with two scale-free measures:

    energy_fraction(S, r) = (S[0]^2 + ... + S[r-1]^2) / (S[0]^2 + ... + S[p-1]^2)
        the share of ||Delta W||_F^2 that the best rank-r approximation keeps (Eckart-Young: see rank_basics);
    stable_rank(M) = ||M||_F^2 / ||M||_2^2 = sum(S^2) / S[0]^2
        a continuous stand-in for the rank: 1 for a rank-one matrix, p when all singular values are equal,
        never above the rank.

Each number stands beside the same number for a reference without structure: a Gaussian matrix of the same
shape rescaled to the same Frobenius norm (seeded). Its spectrum follows the Marchenko-Pastur law; its stable
rank is about d k / (sqrt(d) + sqrt(k))^2, i.e. 32 for 128 x 128 and 57 for 128 x 512, and its top-r energy is
only a little above r / p. The finding to look for: Delta W's energy sits in few directions (top-r energy far
above the random matrix's, stable rank far below).

A third column gives the same numbers for the pretrained W itself, so that one can tell whether Delta W is
low-rank in its own right or merely shares the shape of W's spectrum.

What the tiny model shows (default run; ``summary`` prints the counts and means it rests on). Delta W is far
from random: in all or nearly all weights its top direction holds several times the Gaussian's energy and its
stable rank is several times lower. But it is not *very* low-rank: 90% of its energy needs a sizeable share of
the directions, more in the MLP than in attention, and it is about as concentrated as the pretrained W itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from ..io.pretrained import load_pretrained
from .common import ATTENTION, RunSettings, run_full, weight

RANKS = (1, 2, 4, 8, 16)
MLP = ("fc", "proj")
ENERGY_LEVEL = 0.9          # "rank for 90% of the energy"


# ----------------------------------------------------------------------------------------------------
# the measures


def singular_values(M):
    """The singular values of M (d, k), decreasing: (min(d, k),) float64."""
    return numpy.linalg.svd(numpy.asarray(M, dtype=numpy.float64), compute_uv=False)


def energy_fraction(S, r: int) -> float:
    """The share of the squared Frobenius norm held by the r largest singular values of S (any order):
    sum of the top r S^2 / sum of all S^2."""
    S2 = numpy.sort(numpy.asarray(S, dtype=numpy.float64) ** 2)[::-1]        # decreasing
    total = S2.sum()
    if not total > 0:
        raise ValueError("energy_fraction of an all-zero spectrum is undefined")
    return float(S2[:r].sum() / total)


def stable_rank(M) -> float:
    """||M||_F^2 / ||M||_2^2 of a matrix M (d, k): sum(S^2) / max(S)^2, between 1 and rank(M)."""
    S = singular_values(M)
    if not S[0] > 0:
        raise ValueError("stable_rank of an all-zero matrix is undefined")
    return float(numpy.sum(S ** 2) / S[0] ** 2)


def rank_for_energy(S, level: float = ENERGY_LEVEL) -> int:
    """The smallest r whose top-r energy fraction reaches ``level``."""
    S2 = numpy.sort(numpy.asarray(S, dtype=numpy.float64) ** 2)[::-1]
    cumulative = numpy.cumsum(S2) / S2.sum()                                  # (p,)
    return int(numpy.searchsorted(cumulative, level - 1e-12) + 1)


def gaussian_like(M, rng):
    """A Gaussian matrix of M's shape, rescaled to M's Frobenius norm."""
    R = rng.standard_normal(numpy.shape(M))
    return R * (numpy.linalg.norm(M) / numpy.linalg.norm(R))


def weight_names(n_layer: int):
    """The weights the study looks at, layer by layer: attention q, k, v, o, then the MLP's fc and proj."""
    return [name for i in range(n_layer)
            for name in [f"h.{i}.attn.{a}.weight" for a in ATTENTION] + [f"h.{i}.mlp.{m}.weight" for m in MLP]]


def spectrum_report(M, ranks=RANKS) -> dict:
    """The measures of one matrix M (d, k): {"energy": [per r], "stable_rank", "rank_90", "singular_values"}."""
    S = singular_values(M)
    return {"energy": [energy_fraction(S, r) for r in ranks], "stable_rank": float(numpy.sum(S ** 2) / S[0] ** 2),
            "rank_90": rank_for_energy(S), "singular_values": S.tolist()}


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class FullSpectrumResult:
    """Per weight, the spectrum measures of Delta W, of a Gaussian of the same shape and norm, and of W."""

    seed: int
    steps: int
    lr: float
    val_before: float
    val_after: float
    ranks: list
    names: list
    weights: dict = field(default_factory=dict)
    # weights[name] = {"shape": [d, k], "relative_update": ||dW||_F / ||W||_F, "delta": spectrum_report(dW),
    #                  "random": spectrum_report(Gaussian), "pretrained": spectrum_report(W)}


def run(fast: bool = False, seed: int = 0, *, steps: int | None = None) -> FullSpectrumResult:
    """Full fine-tune the shipped model, then measure the spectrum of every weight's update.

    fast: a few steps on small batches (seconds); default: common.RunSettings (100 steps, lr 1e-3).
    steps: overrides the number of steps of either mode.
    """
    settings = RunSettings.for_mode(fast, **({} if steps is None else {"steps": steps}))
    model, run_ = run_full(seed, settings)
    base = load_pretrained(dropout=0.0)
    rng = numpy.random.default_rng(seed)
    names = weight_names(base.config.n_layer)
    weights = {}
    for name in names:
        W = weight(base, name)                       # (d, k) pretrained
        dW = weight(model, name) - W                 # (d, k) what full fine-tuning changed
        weights[name] = {"shape": list(dW.shape),
                         "relative_update": float(numpy.linalg.norm(dW) / numpy.linalg.norm(W)),
                         "delta": spectrum_report(dW),
                         "random": spectrum_report(gaussian_like(dW, rng)),
                         "pretrained": spectrum_report(W)}
    return FullSpectrumResult(seed=seed, steps=settings.steps, lr=settings.full_lr, val_before=run_.val_before,
                              val_after=run_.val_after, ranks=list(RANKS), names=names, weights=weights)


def counts(result: FullSpectrumResult) -> dict:
    """How many weights show the finding: {"weights", "top1_above_random", "stable_rank_below_random",
    "stable_rank_below_pretrained"}."""
    w = [result.weights[n] for n in result.names]
    return {"weights": len(w),
            "top1_above_random": sum(x["delta"]["energy"][0] > x["random"]["energy"][0] for x in w),
            "stable_rank_below_random": sum(x["delta"]["stable_rank"] < x["random"]["stable_rank"] for x in w),
            "stable_rank_below_pretrained": sum(x["delta"]["stable_rank"] < x["pretrained"]["stable_rank"] for x in w)}


# ----------------------------------------------------------------------------------------------------
# the report


def _short(name: str) -> str:
    """"h.2.attn.q_proj.weight" -> "h2 q"; "h.2.mlp.fc.weight" -> "h2 fc"."""
    parts = name.split(".")
    return f"h{parts[1]} {parts[3].replace('_proj', '')}"


def _means(group, key) -> dict:
    """Means over a group of weights of one spectrum_report ("delta", "random" or "pretrained")."""
    reports = [w[key] for w in group]
    return {"energy": numpy.mean([r["energy"] for r in reports], axis=0).tolist(),
            "stable_rank": float(numpy.mean([r["stable_rank"] for r in reports])),
            "rank_90": float(numpy.mean([r["rank_90"] for r in reports]))}


def plot(result: FullSpectrumResult, path) -> None:
    """Two panels: cumulative energy against r for every Delta W (and the references), stable rank per weight."""
    from ..plots import new_figure, save_figure

    fig, (ax_e, ax_s) = new_figure(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})

    def cumulative(S):
        S2 = numpy.asarray(S) ** 2
        return numpy.cumsum(S2) / S2.sum()

    seen = set()
    for name in result.names:
        w = result.weights[name]
        kind = "attention" if ".attn." in name else "MLP"
        for key, style, color, label in (("delta", "-", "C0" if kind == "attention" else "C2", f"Delta W, {kind}"),
                                         ("pretrained", "-", "C1", "pretrained W"),
                                         ("random", "--", "grey", "Gaussian, same shape and norm")):
            c = cumulative(w[key]["singular_values"])
            show = label not in seen
            seen.add(label)
            ax_e.plot(numpy.arange(1, c.size + 1), c, style, color=color, lw=0.8,
                      alpha=0.9 if key == "delta" else 0.35, label=label if show else None)
    ax_e.set_xscale("log", base=2)
    ax_e.set(title=f"energy in the top r directions (full fine-tuning, {result.steps} steps)", xlabel="r",
             ylabel="sum of top-r S^2 / sum of S^2", ylim=(0, 1.02))
    ax_e.legend(fontsize=8)

    x = numpy.arange(len(result.names))
    width = 0.27
    for i, (key, color, label) in enumerate((("delta", "C0", "Delta W"), ("pretrained", "C1", "pretrained W"),
                                             ("random", "grey", "Gaussian"))):
        ax_s.bar(x + (i - 1) * width, [result.weights[n][key]["stable_rank"] for n in result.names], width,
                 color=color, label=label)
    ax_s.set_xticks(x, [_short(n) for n in result.names], rotation=90, fontsize=8)
    ax_s.set(title="stable rank ||M||_F^2 / ||M||_2^2", ylabel="stable rank")
    ax_s.legend(fontsize=8)
    save_figure(fig, path)


def summary(result: FullSpectrumResult) -> str:
    """The per-weight numbers as a text table, then the counts and the means."""
    ranks = result.ranks
    shown = [i for i, r in enumerate(ranks) if r in (1, 4, 16)]
    head = "  ".join(f"{'E' + str(ranks[i]) + ' dW/rand':>12}" for i in shown)
    lines = [(f"Full fine-tuning's Delta W: {result.steps} steps, lr {result.lr:g}, seed {result.seed}; "
              f"validation loss {result.val_before:.4f} -> {result.val_after:.4f}"),
             "E_r: energy fraction of the top r directions; sr: stable rank; r90: directions for 90% of the energy",
             "",
             f"{'weight':<7} {'shape':>8} {'|dW|/|W|':>8}  {head}  {'sr dW / W / rand':>18}  {'r90 dW/rand':>11}"]
    for name in result.names:
        w = result.weights[name]
        d, r_, p = w["delta"], w["random"], w["pretrained"]
        energies = "  ".join(f"{d['energy'][i]:>5.3f}/{r_['energy'][i]:<6.3f}" for i in shown)
        lines.append(f"{_short(name):<7} {'x'.join(map(str, w['shape'])):>8} {w['relative_update']:>8.4f}  "
                     f"{energies}  {d['stable_rank']:>5.1f} / {p['stable_rank']:>4.1f} / {r_['stable_rank']:>4.1f}  "
                     f"{d['rank_90']:>4}/{r_['rank_90']}")
    c = counts(result)
    lines += ["", "means over the weights:"]
    for kind, test in (("attention", ".attn."), ("MLP", ".mlp.")):
        group = [result.weights[n] for n in result.names if test in n]
        if not group:
            continue
        m = {key: _means(group, key) for key in ("delta", "random", "pretrained")}
        energies = "  ".join(f"E{r} {m['delta']['energy'][i]:.3f} (rand {m['random']['energy'][i]:.3f}, "
                             f"W {m['pretrained']['energy'][i]:.3f})" for i, r in enumerate(ranks) if r in (1, 8))
        lines.append(f"  {kind:<9} {energies}")
        lines.append(f"  {'':<9} stable rank {m['delta']['stable_rank']:.1f} (rand {m['random']['stable_rank']:.1f}, "
                     f"W {m['pretrained']['stable_rank']:.1f}); r90 {m['delta']['rank_90']:.0f} "
                     f"(rand {m['random']['rank_90']:.0f})")
    lines.append("")
    for key, text in (("top1_above_random", "top-1 energy of Delta W above the Gaussian's"),
                      ("stable_rank_below_random", "stable rank of Delta W below the Gaussian's"),
                      ("stable_rank_below_pretrained", "stable rank of Delta W below W's own")):
        lines.append(f"{text + ':':<45} {c[key]}/{c['weights']} weights")
    return "\n".join(lines)
