"""rsLoRA (Kalajdzievski 2023): scale the adapter by alpha / sqrt(r) instead of alpha / r.

LoRA adds dW = s B A to a frozen weight (in the paper's (out, in) layout; B: (out, r), zero at the start;
A: (r, in), random rows a_k of roughly equal length). Write G = dL/d(dW) (out, in). The adapter's gradients
both carry the factor s:

    dL/dB = s G A^T   (out, r)          dL/dA = s B^T G   (r, in)

SGD (the paper's analysis). Early on A barely moves, so after t steps of rate lr, B = -lr t s G A^T and

    dW = s B A = -lr t s^2 G A^T A,      loss decrease ~ lr t s^2 ||G A^T||^2 ~ lr t s^2 r

(each of the r random rows of A catches a similar share of G). With s = alpha / r the rate is alpha^2 / r
and |dL/dB| ~ s sqrt(r) = alpha / sqrt(r): learning slows and the gradients collapse as r grows.
s = alpha / sqrt(r) is the one scaling that keeps s^2 r, and the gradients, independent of r: the adapter is
"rank-stabilised", so a larger r adds directions without losing speed, and higher ranks can help.

Adam (what is trained here). Adam divides each gradient by its own running size, so every entry of A and
B moves about lr per step whatever s is: early on B = -lr t sign(G A^T) does not depend on s; dW = s B A
does. dW is a sum of r rank-one terms s b_k a_k^T. Their directions are nearly orthogonal (random a_k), so

    ||dW||_F ~ s sqrt(r) lr t,   but its part along -G adds up:  <-G, dW> = s lr t sum_k ||G a_k||_1 ~ s r lr t

(once A moves as well, ~lr per entry per step and coherently, a term ~ s r (lr t)^2 joins the same way). So
under alpha / r the first-order loss decrease is independent of r, while ||dW|| shrinks like 1/sqrt(r): a
larger r adds directions but spreads the same step over them, so extra rank buys little. Under alpha /
sqrt(r) the decrease grows like sqrt(r) and ||dW|| stays put: at a fixed lr, higher ranks take larger
effective steps. At r = 1 the two scalings are the same (s = alpha); at rank r, early in training, B is
nearly the same in both runs, so rsLoRA's dW is standard LoRA's times sqrt(r), the ratio of the scales.
The study measures that (``update_norm``) beside the losses.

The study fine-tunes the shipped tiny GPT on the python-email corpus with LoRA on (q_proj, v_proj) at each
r in RANKS, once with s = alpha / r and once with s = alpha / sqrt(r), the same alpha (ALPHA = 8), the same
lr (common.RunSettings: 1e-2, warmup 10 steps then cosine to 1e-3), seed, batches and steps. It records the
validation-loss curve of every run, the final loss (the curve's last point), the update's size ||s B A||_F
(mean over the adapted layers), and, per scaling, the final loss at the largest rank minus at the smallest
(negative: rank helped; about 0 or positive: "learning slows as r grows" wins).

Validation: the first 128 windows (16k characters) of the python-email validation text, the windows of
common.pretrained_val_loss with the default settings, at every point of every curve (16 batches of the
training batch size 8, which is how fit() batches its evaluations).

Cost (default): r = 1, 4, 16, 64 (64 = n_embd / 2, the paper's largest) under both scalings, 240 steps of 8
windows each, validation every 30 steps: 9 points per curve. r = 1 is trained once and shared, since both
scalings give s = alpha there, so 7 runs: about 3-4 minutes on 2 free CPU cores. ``fast=True``: r = 1 and 16,
6 steps of 4 windows, validation on 4 windows every 2 steps: a few seconds.

What the tiny model shows (default run, one seed; ``summary`` computes each point from the run's numbers):
higher rank lowers the final loss under both scalings, so standard LoRA does not slow down in absolute terms,
but it gains less than rsLoRA, which ends lower at the largest rank. The ratio of the two ||dW|| is near
sqrt(r) after a few steps (the fast mode) but far below it after the full run: the early-training argument
above holds only early.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core.lora import lora_modules
from . import common

RANKS = (1, 4, 16, 64)
FAST_RANKS = (1, 16)
ALPHA = 8.0
TARGETS = ("q_proj", "v_proj")
STEPS, EVAL_EVERY = 240, 30
FAST_EVAL_EVERY = 2
SCALINGS = {"standard": False, "rslora": True}    # label -> LoRAConfig.use_rslora
LABELS = {"standard": "s = alpha / r", "rslora": "s = alpha / sqrt(r) (rsLoRA)"}


def scale_for(scaling: str, r: int, alpha: float) -> float:
    """The adapter scale s of a scaling ("standard" or "rslora") at rank r."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {list(SCALINGS)}")
    return alpha / math.sqrt(r) if SCALINGS[scaling] else alpha / r


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class RsLoRAResult:
    """The numbers of the study. Every {scaling: [...]} list follows ``ranks``; losses are validation
    cross-entropy in nats per character."""

    ranks: list                                        # [1, 4, 16, 64]
    alpha: float
    targets: list                                      # ["q_proj", "v_proj"]
    pretrained_loss: float                             # where every curve starts (step 0), same windows
    scales: dict = field(default_factory=dict)         # {scaling: [s of the trained LoRALinear layers]}
    curves: dict = field(default_factory=dict)         # {scaling: [[[step, loss], ...] per rank]}
    final_loss: dict = field(default_factory=dict)     # {scaling: [loss after training = curve's end]}
    update_norm: dict = field(default_factory=dict)    # {scaling: [mean over layers of ||s B A||_F]}
    rank_gain: dict = field(default_factory=dict)      # {scaling: final loss at max(ranks) - at min(ranks)}
    shared: list = field(default_factory=list)         # ranks trained once for both scalings (s is the same)
    settings: dict = field(default_factory=dict)       # common.RunSettings as a dict


def _trained_scale(model) -> float:
    """The scale of the model's LoRA layers (all the same in one run)."""
    scales = {m.scale for _, m in lora_modules(model)}
    assert len(scales) == 1, f"LoRA layers with different scales: {sorted(scales)}"
    return scales.pop()


def _update_norm(model) -> float:
    """Mean over the adapted layers of ||dW||_F, dW = s B A."""
    return float(numpy.mean([numpy.linalg.norm(common.adapter_matrices(model, name)[2])
                             for name, _ in lora_modules(model)]))


def run(fast: bool = False, seed: int = 0) -> RsLoRAResult:
    """Train LoRA at every rank under both scalings (same alpha, lr, seed, batches); collect the curves."""
    settings = (common.RunSettings.for_mode(True, eval_every=FAST_EVAL_EVERY) if fast else
                common.RunSettings.for_mode(False, steps=STEPS, eval_every=EVAL_EVERY))
    ranks = FAST_RANKS if fast else RANKS
    pretrained = common.pretrained_val_loss(settings)   # step 0 of every curve, on the curves' windows
    result = RsLoRAResult(ranks=list(ranks), alpha=ALPHA, targets=list(TARGETS),
                          pretrained_loss=pretrained, settings=asdict(settings))
    for key in ("scales", "curves", "final_loss", "update_norm"):
        getattr(result, key).update({scaling: [] for scaling in SCALINGS})
    total = sum(1 for r in ranks for scaling in SCALINGS
                if scaling == "standard" or scale_for("rslora", r, ALPHA) != scale_for("standard", r, ALPHA))
    done = 0
    for r in ranks:
        previous = None                    # (scale, measurements) of this rank's runs so far
        for scaling, use_rslora in SCALINGS.items():
            if previous is not None and previous[0] == scale_for(scaling, r, ALPHA):
                measured = previous[1]     # the same scale, seed and batches: the same run
                result.shared.append(r)
            else:
                model, finetune_run = common.run_lora(TARGETS, r, seed, settings, alpha=ALPHA, use_rslora=use_rslora)
                curve = [[int(s), float(v)] for s, v in finetune_run.val_curve]
                assert curve[-1][0] == settings.steps, "the curve must end at the last step"
                measured = {"scale": _trained_scale(model), "curve": curve, "final": curve[-1][1],
                            "norm": _update_norm(model)}
                previous = (measured["scale"], measured)
                done += 1
                if not fast:
                    print(f"rslora [{done}/{total}] {scaling} r={r} s={measured['scale']:.3g}: "
                          f"{measured['final']:.4f}", file=sys.stderr, flush=True)
            result.scales[scaling].append(measured["scale"])
            result.curves[scaling].append(measured["curve"])
            result.final_loss[scaling].append(measured["final"])
            result.update_norm[scaling].append(measured["norm"])
    result.rank_gain = {scaling: losses[-1] - losses[0] for scaling, losses in result.final_loss.items()}
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def findings(result: RsLoRAResult) -> list:
    """What this run shows (sentences computed from the numbers, not asserted)."""
    lines = []
    lo, hi = result.ranks[0], result.ranks[-1]
    for scaling, gain in result.rank_gain.items():
        verb = "lowers" if gain < 0 else "raises"
        lines.append(f"{LABELS[scaling]}: going from r={lo} to r={hi} {verb} the final loss by {abs(gain):.4f}")
    std, rs = result.final_loss["standard"][-1], result.final_loss["rslora"][-1]
    lines.append(f"at r={hi}: rsLoRA {rs:.4f} vs standard {std:.4f} "
                 f"({'rsLoRA lower' if rs < std else 'standard lower or equal'} by {abs(std - rs):.4f})")
    ratios = [n_rs / n_std for n_rs, n_std in zip(result.update_norm["rslora"], result.update_norm["standard"])]
    lines.append("||dW|| rsLoRA / standard: " + ", ".join(
        f"r={r}: {q:.2f} (sqrt(r) = {math.sqrt(r):.2f})" for r, q in zip(result.ranks, ratios)))
    return lines


def summary(result: RsLoRAResult) -> str:
    s = result.settings
    head = (f"rsLoRA: alpha = {result.alpha:g}, lr = {s['lora_lr']:g}, {s['steps']} steps of {s['batch_size']} "
            f"windows, LoRA on {', '.join(result.targets)}; validation loss (nats/char), pretrained "
            f"{result.pretrained_loss:.4f}")
    rows = [head, "",
            f"{'r':>4} | {'s=a/r':>7} {'final':>8} {'||dW||':>8} | {'s=a/sqrt(r)':>11} {'final':>8} {'||dW||':>8}"]
    for i, r in enumerate(result.ranks):
        rows.append(f"{r:>4} | {result.scales['standard'][i]:>7.3g} {result.final_loss['standard'][i]:>8.4f} "
                    f"{result.update_norm['standard'][i]:>8.3f} | {result.scales['rslora'][i]:>11.3g} "
                    f"{result.final_loss['rslora'][i]:>8.4f} {result.update_norm['rslora'][i]:>8.3f}")
    rows.append(f"{'r=' + str(result.ranks[-1]) + ' - r=' + str(result.ranks[0]):>4} | {'':>7} "
                f"{result.rank_gain['standard']:>+8.4f} {'':>8} | {'':>11} {result.rank_gain['rslora']:>+8.4f}")
    if result.shared:
        rows.append(f"(r = {', '.join(map(str, result.shared))}: one run for both scalings, s is the same)")
    rows.append("")
    rows += findings(result)
    return "\n".join(rows)


def plot(result: RsLoRAResult, path) -> None:
    """Validation loss against step, one line per rank: s = alpha / r (left) and alpha / sqrt(r) (right)."""
    from ..plots import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharey=True)
    import matplotlib

    colours = matplotlib.colormaps["viridis"](numpy.linspace(0.0, 0.85, len(result.ranks)))
    for ax, scaling in zip(axes, SCALINGS):
        for colour, r, s, curve in zip(colours, result.ranks, result.scales[scaling], result.curves[scaling]):
            steps, losses = zip(*curve)
            ax.plot(steps, losses, marker="o", markersize=3, color=colour, label=f"r = {r} (s = {s:.3g})")
        ax.axhline(result.pretrained_loss, color="grey", linestyle=":", linewidth=1, label="pretrained")
        ax.set_title(f"{LABELS[scaling]}, alpha = {result.alpha:g}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"validation loss (nats / char), first "
                       f"{result.settings['batch_size'] * result.settings['eval_batches']} windows")
    save_figure(fig, Path(path))
