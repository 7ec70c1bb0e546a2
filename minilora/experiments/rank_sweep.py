"""Rank sweep (the LoRA paper's Table 6): how much rank does an adapter need, and which weights should it adapt?

The study fine-tunes the shipped tiny GPT (pretrained on Python's documentation, "pydoc") on a different
domain, Python's email package source ("python-email"), with LoRA on three sets of attention weights

    Wq                  the query projection alone
    Wq, Wv              query and value (the paper's default)
    Wq, Wk, Wv, Wo      all four attention weights

at each rank r in RANKS, every run from the same pretrained model for the same number of steps (common.
RunSettings: 100 steps of 8 windows, lr 1e-2, scale alpha / r = 2 at every rank), and repeats every run with
a few seeds (the seed sets the adapters' initial A and the order of the training batches). Beside them sit
two references: the untouched pretrained model (where every run starts) and full fine-tuning of all ~0.8M
weights (lr 1e-3, same steps and batches).

It reports the validation loss after training (nats per character, and bits per character = nats / ln 2),
mean and standard deviation over seeds, against r and against the number of trainable parameters, which for
LoRA on ``n`` weight types of a d x k shape in each of the model's n_layer blocks is

    trainable = r * (d + k) * n_layer * n          (here d = k = n_embd = 128, n_layer = 4: 1024 r n)

What the paper found (GPT-3, Table 6): a very small r (even 1) already captures most of the gain, larger r
helps little; and adapting {Wq, Wv} beats Wq alone at the same r. ``summary`` computes both comparisons from
the numbers rather than assuming them. What the tiny model shows (default run):

- {Wq, Wv} beats Wq alone at every r, as in the paper.
- Unlike the paper, rank matters here: r = 1 gets only part of the gain of the best rank, and the best rank
  is not a small one. The shift from prose to code is large for a model this small, and 100 steps is far
  from convergence; the paper adapted a 175B model to tasks close to what it already knew, where (the paper
  argues) the needed update has a very low rank.
- Full fine-tuning beats every LoRA run here: the best rank gets only part of its gain.

Cost (default): 3 target sets x 6 ranks x 2 seeds = 36 LoRA runs + 2 full fine-tuning runs of 100 steps,
a few minutes on free CPU cores. r = 32 is left out to keep it that short; r = 64 stays because it is the
paper's largest rank and half of n_embd. ``fast=True``: ranks 1 and 2, one seed, 6 steps: a few seconds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.pretrained import pretrained_info
from . import common

RANKS = (1, 2, 4, 8, 16, 64)
FAST_RANKS = (1, 2)
N_SEEDS = 2                    # seeds seed, seed + 1 in default mode (one in fast mode)
TARGET_SETS = {                # label (the paper's names) -> module-name suffixes LoRA adapts
    "Wq": ("q_proj",),
    "Wq,Wv": ("q_proj", "v_proj"),
    "Wq,Wk,Wv,Wo": common.ATTENTION,
}


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class RankSweepResult:
    """The numbers of the study. Losses are validation cross-entropy in nats per character."""

    ranks: list                                # [1, 2, ...]
    seeds: list                                # [seed, seed + 1, ...]
    target_sets: dict                          # {label: [module-name suffix, ...]}
    pretrained_loss: float                     # the shipped model before any fine-tuning
    full: dict                                 # {"trainable", "losses": [per seed], "mean", "spread"}
    lora: list = field(default_factory=list)   # [{"targets": label, "r", "trainable", "losses", "mean", "spread"}]
    settings: dict = field(default_factory=dict)   # common.RunSettings as a dict


def run(fast: bool = False, seed: int = 0) -> RankSweepResult:
    """Train every (target set, r, seed) with LoRA and every seed with full fine-tuning; collect the losses."""
    settings = common.RunSettings.for_mode(fast)
    ranks = FAST_RANKS if fast else RANKS
    seeds = [seed] if fast else [seed + i for i in range(N_SEEDS)]
    config = pretrained_info()["model_config"]      # n_layer, n_embd of the shipped model
    pretrained = common.pretrained_val_loss(settings)
    report = common.progress_counter("rank-sweep", fast, len(seeds) * (len(TARGET_SETS) * len(ranks) + 1))
    rows = [{"targets": label,
             **common.lora_over_seeds(label, targets, r, seeds, settings,
                                      common.attention_lora_parameters(r, targets, config["n_layer"], config["n_embd"]),
                                      report)}
            for label, targets in TARGET_SETS.items() for r in ranks]

    full_losses = []
    for s in seeds:
        _, finetune_run = common.run_full(s, settings)
        full_losses.append(finetune_run.val_after)
        report(f"full fine-tuning seed={s}: {finetune_run.val_after:.4f}")
    mean, spread = common.mean_and_spread(full_losses)
    full = {"trainable": finetune_run.trainable, "losses": full_losses, "mean": mean, "spread": spread}

    return RankSweepResult(ranks=list(ranks), seeds=seeds, target_sets={k: list(v) for k, v in TARGET_SETS.items()},
                           pretrained_loss=pretrained, full=full, lora=rows, settings=asdict(settings))


# ----------------------------------------------------------------------------------------------------
# reading the result


def curve(result: RankSweepResult, label: str):
    """The rows of one target set, in increasing r."""
    return sorted((row for row in result.lora if row["targets"] == label), key=lambda row: row["r"])


def findings(result: RankSweepResult) -> list:
    """The paper's two claims, checked against this run's numbers (sentences, computed not asserted)."""
    lines = []
    pre, full = result.pretrained_loss, result.full["mean"]
    for label in result.target_sets:
        rows = curve(result, label)
        best = min(rows, key=lambda row: row["mean"])
        gain_best = pre - best["mean"]
        share = (pre - rows[0]["mean"]) / gain_best if gain_best > 0 else float("nan")
        of_full = gain_best / (pre - full) if pre > full else float("nan")
        lines.append(f"{label}: r={rows[0]['r']} reaches {100 * share:.0f}% of the gain of the best rank "
                     f"(r={best['r']}, {best['mean']:.4f}); the best rank reaches {100 * of_full:.0f}% of "
                     f"full fine-tuning's gain")
    if "Wq" in result.target_sets and "Wq,Wv" in result.target_sets:
        q = {row["r"]: row["mean"] for row in curve(result, "Wq")}
        qv = {row["r"]: row["mean"] for row in curve(result, "Wq,Wv")}
        better = [r for r in result.ranks if qv[r] < q[r]]
        lines.append(f"Wq,Wv beats Wq alone at the same r for {len(better)} of {len(result.ranks)} ranks "
                     f"(r = {', '.join(map(str, better)) or 'none'})")
    return lines


def summary(result: RankSweepResult) -> str:
    """The losses as a text table: one line per (target set, r), then the references and the findings."""
    head = (f"Rank sweep (paper Table 6): validation loss on python-email after {result.settings['steps']} steps, "
            f"{common.over_seeds(result.seeds)}")
    lines = [head, "", common.loss_table_header("targets")]
    lines += [common.loss_table_row(label, row["r"], row["trainable"], row["mean"], row["spread"])
              for label in result.target_sets for row in curve(result, label)]
    full = result.full
    lines.append(common.loss_table_row("full FT", "-", full["trainable"], full["mean"], full["spread"]))
    lines.append(common.loss_table_row("pretrained", "-", 0, result.pretrained_loss))
    lines += ["", *findings(result)]
    return "\n".join(lines)


def plot(result: RankSweepResult, path) -> None:
    """Left: loss against r (log2) per target set, with error bars (sd over seeds), the pretrained model and
    full fine-tuning as horizontal lines. Right: the same losses against trainable parameters (log)."""
    from ..plots import new_figure, save_figure

    fig, (by_rank, by_params) = new_figure(1, 2, figsize=(12, 4.5))
    full = result.full
    for ax in (by_rank, by_params):
        ax.axhline(result.pretrained_loss, color="gray", linestyle="--", label="pretrained (no fine-tuning)")
        ax.axhline(full["mean"], color="black", linestyle="-", label=f"full fine-tuning ({full['trainable']:,} params)")
        ax.axhspan(full["mean"] - full["spread"], full["mean"] + full["spread"], color="black", alpha=0.1)
        ax.set_ylabel("validation loss (nats/char)")
        ax.secondary_yaxis("right", functions=(common.bits_per_char, lambda b: b * math.log(2))).set_ylabel("bits/char")
    for label in result.target_sets:
        rows = curve(result, label)
        means, spreads = [row["mean"] for row in rows], [row["spread"] for row in rows]
        by_rank.errorbar([row["r"] for row in rows], means, yerr=spreads, marker="o", capsize=3, label=f"LoRA {label}")
        by_params.errorbar([row["trainable"] for row in rows], means, yerr=spreads, marker="o", capsize=3,
                           label=f"LoRA {label}")
    by_params.errorbar([full["trainable"]], [full["mean"]], yerr=[full["spread"]], marker="s", color="black",
                       capsize=3)
    by_rank.set_xscale("log", base=2)
    by_rank.set_xticks(result.ranks, [str(r) for r in result.ranks])
    by_rank.set_xlabel("LoRA rank r")
    by_rank.set_title("loss against rank")
    by_params.set_xscale("log")
    by_params.set_xlabel("trainable parameters")
    by_params.set_title("loss against trainable parameters")
    low = min(full["mean"] - full["spread"], *(row["mean"] - row["spread"] for row in result.lora))
    span = result.pretrained_loss - low
    for ax in (by_rank, by_params):      # room above the pretrained line for the legend
        ax.set_ylim(low - 0.05 * span, result.pretrained_loss + 0.3 * span)
    by_rank.legend(fontsize=8, ncol=2, loc="upper right")
    save_figure(fig, Path(path))
