"""Fixed parameter budget (the LoRA paper's Table 5): which attention weights should LoRA adapt?

With a fixed number of trainable parameters, is it better to give one weight type a high rank, or to spread
the budget over several weight types at a lower rank? The paper fixed 18M parameters on GPT-3 175B, which is
r = 8 on one weight type, r = 4 on two, r = 2 on all four. The tiny model's attention weights are all
n_embd x n_embd (128 x 128) in each of its 4 blocks, so the same ranks give the same budget here too:

    trainable = r * (d + k) * n_layer * (number of weight types)
              = 8 * 256 * 4 * 1 = 4 * 256 * 4 * 2 = 2 * 256 * 4 * 4 = 8192 numbers        (~1% of the model)

``run`` checks this (an assertion), then fine-tunes the shipped model (pretrained on "pydoc") on
"python-email" with each configuration

    Wq, Wk, Wv, Wo at r = 8;   {Wq, Wk}, {Wq, Wv} at r = 4;   {Wq, Wk, Wv, Wo} at r = 2

for the same steps and batches (common.RunSettings: 100 steps, lr 1e-2, scale alpha / r = 2), with a few
seeds, and reports the validation loss (nats and bits per character), mean and standard deviation over seeds.

What the paper found: spreading the budget ({Wq, Wv} at r = 4, or all four at r = 2) beats putting it all
into one weight type at r = 8, and Wq or Wk alone is worst (Wv or Wo alone came close to the best).
``summary`` ranks the configurations from the numbers and says which gaps exceed the spread over seeds. What
the tiny model shows (default run):

- The configurations without Wv or Wo (Wq alone, Wk alone, {Wq, Wk}) rank worst. As in the paper: a budget
  must include Wv or Wo.
- Spreading the budget ({Wq, Wv} at r = 4, all four at r = 2) does not beat the best single weight type by
  more than the spread over seeds: at this size and seed count it is not measurably better than Wv or Wo alone.

Cost (default): 7 configurations x 3 seeds = 21 runs of 100 steps, a few minutes on free CPU cores.
``fast=True``: one seed, 6 steps, a few seconds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.pretrained import pretrained_info
from . import common

CONFIGURATIONS = {             # label (the paper's names) -> (module-name suffixes, rank)
    "Wq": (("q_proj",), 8),
    "Wk": (("k_proj",), 8),
    "Wv": (("v_proj",), 8),
    "Wo": (("o_proj",), 8),
    "Wq,Wk": (("q_proj", "k_proj"), 4),
    "Wq,Wv": (("q_proj", "v_proj"), 4),
    "Wq,Wk,Wv,Wo": (common.ATTENTION, 2),
}
N_SEEDS = 3                    # seeds seed, seed + 1, seed + 2 in default mode (one in fast mode)


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class BudgetResult:
    """The numbers of the study. Losses are validation cross-entropy in nats per character."""

    budget: int                                # trainable parameters of every configuration
    seeds: list                                # [seed, seed + 1, ...]
    pretrained_loss: float                     # the shipped model before any fine-tuning
    configurations: list = field(default_factory=list)
    # [{"label", "targets": [suffix, ...], "r", "trainable", "losses": [per seed], "mean", "spread"}]
    settings: dict = field(default_factory=dict)   # common.RunSettings as a dict


def run(fast: bool = False, seed: int = 0) -> BudgetResult:
    """Check that every configuration trains the same number of parameters, then train each with every seed."""
    settings = common.RunSettings.for_mode(fast)
    seeds = [seed] if fast else [seed + i for i in range(N_SEEDS)]
    config = pretrained_info()["model_config"]      # n_layer, n_embd of the shipped model
    counts = {label: common.attention_lora_parameters(r, targets, config["n_layer"], config["n_embd"])
              for label, (targets, r) in CONFIGURATIONS.items()}
    assert len(set(counts.values())) == 1, f"the configurations do not share one parameter budget: {counts}"
    budget = next(iter(counts.values()))
    pretrained = common.pretrained_val_loss(settings)
    report = common.progress_counter("budget", fast, len(CONFIGURATIONS) * len(seeds))
    rows = [{"label": label, "targets": list(targets),
             **common.lora_over_seeds(label, targets, r, seeds, settings, budget, report)}
            for label, (targets, r) in CONFIGURATIONS.items()]

    return BudgetResult(budget=budget, seeds=seeds, pretrained_loss=pretrained, configurations=rows,
                        settings=asdict(settings))


# ----------------------------------------------------------------------------------------------------
# reading the result


def ranking(result: BudgetResult) -> list:
    """The configurations from best (lowest mean loss) to worst."""
    return sorted(result.configurations, key=lambda row: row["mean"])


def findings(result: BudgetResult) -> list:
    """The paper's claims, checked against this run's numbers (sentences, computed not asserted)."""
    by_label = {row["label"]: row for row in result.configurations}
    singles = [row for row in result.configurations if len(row["targets"]) == 1]
    best_single = min(singles, key=lambda row: row["mean"])
    lines = []
    for label in ("Wq,Wv", "Wq,Wk,Wv,Wo"):
        if label in by_label:
            row = by_label[label]
            verdict = "beats" if row["mean"] < best_single["mean"] else "does not beat"
            gap, noise = abs(row["mean"] - best_single["mean"]), max(row["spread"], best_single["spread"])
            lines.append(f"{label} at r={row['r']} ({row['mean']:.4f}) {verdict} the best single weight type, "
                         f"{best_single['label']} at r={best_single['r']} ({best_single['mean']:.4f}), by "
                         f"{gap:.4f} nats: {'within' if gap <= noise else 'more than'} the spread over seeds "
                         f"({noise:.4f})")
    order = ranking(result)
    worst_two = {row["label"] for row in order[-2:]}
    lines.append(f"worst two: {', '.join(row['label'] for row in order[-2:])} "
                 f"(paper: Wq and Wk alone{'; same here' if worst_two == {'Wq', 'Wk'} else ''})")
    return lines


def summary(result: BudgetResult) -> str:
    """The losses as a text table, best configuration first, then the findings."""
    head = (f"Fixed budget (paper Table 5): {result.budget:,} trainable parameters per configuration; validation "
            f"loss on python-email after {result.settings['steps']} steps, {common.over_seeds(result.seeds)}")
    lines = [head, "", common.loss_table_header("weights")]
    lines += [common.loss_table_row(row["label"], row["r"], row["trainable"], row["mean"], row["spread"])
              for row in ranking(result)]
    lines.append(common.loss_table_row("pretrained", "-", 0, result.pretrained_loss))
    lines += ["", *findings(result)]
    return "\n".join(lines)


def plot(result: BudgetResult, path) -> None:
    """A bar per configuration (in the paper's order): mean validation loss, error bars = sd over seeds, and
    the pretrained model's loss as a dashed line. The y-axis starts near the losses so differences show."""
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(8, 4.5))
    rows = result.configurations
    labels = [f"{row['label']}\nr={row['r']}" for row in rows]
    means, spreads = [row["mean"] for row in rows], [row["spread"] for row in rows]
    colors = [{1: "C0", 2: "C1"}.get(len(row["targets"]), "C2") for row in rows]   # by number of weight types
    ax.bar(range(len(rows)), means, yerr=spreads, capsize=4, color=colors)
    ax.axhline(result.pretrained_loss, color="gray", linestyle="--", label="pretrained (no fine-tuning)")
    ax.set_xticks(range(len(rows)), labels)
    low = min(m - s for m, s in zip(means, spreads))
    high = max(result.pretrained_loss, *(m + s for m, s in zip(means, spreads)))
    ax.set_ylim(low - 0.1 * (high - low), high + 0.05 * (high - low))
    ax.set_ylabel("validation loss (nats/char)")
    ax.secondary_yaxis("right", functions=(common.bits_per_char, lambda b: b * math.log(2))).set_ylabel("bits/char")
    ax.set_title(f"LoRA under a fixed budget of {result.budget:,} trainable parameters")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
