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

for the same steps and batches (common.RunSettings: 100 steps, scale alpha / r = 2).

Protocol (protocol.py). Training reads python-email's training split only. Each configuration gets its own
learning rate, chosen on dev with the selection seed 0 over a grid extended until the best rate is interior
(common.tuned_lora); its reported loss is one fresh run per reporting seed (1, 2, 3) at that rate, scored on
test: the mean with its 95% interval.

The paper's Table 5 (validation accuracy, %; the spread over seeds it states: +-0.5 on WikiSQL, +-0.1 on
MultiNLI):

                 Wq     Wk     Wv     Wo     Wq,Wk  Wq,Wv  Wq,Wk,Wv,Wo
    WikiSQL      70.4   70.0   73.0   73.2   71.4   73.7   73.7
    MultiNLI     91.0   90.8   91.0   91.3   91.3   91.3   91.7

Findings (``findings``): one for each pair of configurations the paper orders, i.e. whose gap on at least one
task exceeds twice the stated spread (so that the paper's +- ranges do not overlap) and is not reversed by as
much on the other (``paper_orders``). Each verdict comes from our test intervals (protocol.verdict: one side is
better only when the intervals do not overlap).

Cost (default): 7 configurations, each tuned (five rates, more if the best is at an edge) and then run with
three reporting seeds: about 60 runs of 100 steps. ``fast=True``: six steps, three rates (one extension at
most), two reporting seeds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.pretrained import pretrained_info
from . import common, protocol
from .rank_sweep import dev_loss, tuning_of

CONFIGURATIONS = {             # label (the paper's names) -> (module-name suffixes, rank)
    "Wq": (("q_proj",), 8),
    "Wk": (("k_proj",), 8),
    "Wv": (("v_proj",), 8),
    "Wo": (("o_proj",), 8),
    "Wq,Wk": (("q_proj", "k_proj"), 4),
    "Wq,Wv": (("q_proj", "v_proj"), 4),
    "Wq,Wk,Wv,Wo": (common.ATTENTION, 2),
}
PAPER_TABLE5 = {               # GPT-3 175B, 18M trainable parameters: validation accuracy (%) per configuration
    "WikiSQL": {"Wq": 70.4, "Wk": 70.0, "Wv": 73.0, "Wo": 73.2, "Wq,Wk": 71.4, "Wq,Wv": 73.7, "Wq,Wk,Wv,Wo": 73.7},
    "MultiNLI": {"Wq": 91.0, "Wk": 90.8, "Wv": 91.0, "Wo": 91.3, "Wq,Wk": 91.3, "Wq,Wv": 91.3, "Wq,Wk,Wv,Wo": 91.7},
}
PAPER_SPREAD = {"WikiSQL": 0.5, "MultiNLI": 0.1}     # the +- the paper states per task
STUDY = "budget"


# ----------------------------------------------------------------------------------------------------
# the paper's order


def paper_orders(table=PAPER_TABLE5, spread=PAPER_SPREAD) -> list:
    """The pairs (better, worse) of configurations that the paper orders: on at least one task the better one
    leads by more than twice that task's spread, and on no task does it trail by more than twice the spread.
    Higher accuracy is better; pairs in the order of ``table``'s first task's keys."""
    labels = list(next(iter(table.values())))
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            gaps = {task: table[task][a] - table[task][b] for task in table}
            ahead = {task for task, gap in gaps.items() if gap > 2 * spread[task] + 1e-9}
            behind = {task for task, gap in gaps.items() if -gap > 2 * spread[task] + 1e-9}
            if ahead and not behind:
                pairs.append((a, b))
            elif behind and not ahead:
                pairs.append((b, a))
    return pairs


def paper_numbers(a: str, b: str, table=PAPER_TABLE5, spread=PAPER_SPREAD) -> str:
    """"WikiSQL 73.7 vs 70.4 (+-0.5); MultiNLI 91.3 vs 91.0 (+-0.1)": the paper's accuracies of a and b."""
    return "; ".join(f"{task} {table[task][a]} vs {table[task][b]} (+-{spread[task]})" for task in table)


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class BudgetResult:
    """The numbers of the study. Losses are cross-entropy in nats per character: dev for selection, test for
    reporting (a test interval as a dict of protocol.Interval)."""

    budget: int                                # trainable parameters of every configuration
    seeds: list                                # the reporting seeds
    pretrained_loss: float                     # the shipped model before any fine-tuning, on test
    configurations: list = field(default_factory=list)
    # [{"label", "targets": [suffix, ...], **common.tuned_lora(...)}]: "r", "trainable", "lr", "interior",
    # "dev_scores", "test", "losses"
    settings: dict = field(default_factory=dict)   # common.RunSettings as a dict
    protocol: dict = field(default_factory=dict)   # protocol.protocol_record(...)
    findings: list = field(default_factory=list)   # [protocol.finding(...)], one per pair the paper orders


def run(fast: bool = False, seed: int = 0) -> BudgetResult:
    """Check that every configuration trains the same number of parameters, then tune and report each under the
    protocol, and test every order the paper gives.

    seed: accepted for the command line; the protocol fixes the seeds (selection seed 0, reporting seeds
    protocol.report_seeds)."""
    settings = common.RunSettings.for_mode(fast)
    seeds = protocol.report_seeds(fast)
    config = pretrained_info()["model_config"]      # n_layer, n_embd of the shipped model
    counts = {label: common.attention_lora_parameters(r, targets, config["n_layer"], config["n_embd"])
              for label, (targets, r) in CONFIGURATIONS.items()}
    assert len(set(counts.values())) == 1, f"the configurations do not share one parameter budget: {counts}"
    budget = next(iter(counts.values()))
    report = common.progress_counter(STUDY, fast, len(CONFIGURATIONS) * len(seeds))
    rows = [{"label": label, "targets": list(targets),
             **common.tuned_lora(label, targets, r, settings, fast, budget, report=report)}
            for label, (targets, r) in CONFIGURATIONS.items()]
    tunings = {f"LoRA {row['label']} r={row['r']}": tuning_of(row) for row in rows}
    record = protocol.protocol_record(common.split(), seeds, tunings,
                                      pretrained="the shipped model on the same test windows")
    pretrained = common.pretrained_val_loss(settings, "test")
    result = BudgetResult(budget=budget, seeds=list(seeds), pretrained_loss=pretrained, configurations=rows,
                          settings=asdict(settings), protocol=record)
    result.findings = findings(result)
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def reported(row: dict) -> protocol.Interval:
    """A configuration's test interval (mean and 95% interval over the reporting seeds)."""
    return protocol.as_interval(row["test"])


def ranking(result: BudgetResult) -> list:
    """The configurations from the lowest mean test loss to the highest (for display; nothing is chosen by it)."""
    return sorted(result.configurations, key=lambda row: reported(row).mean)


def tested_orders(result: BudgetResult) -> list:
    """The pairs of paper_orders() whose two configurations are both in ``result``."""
    labels = {row["label"] for row in result.configurations}
    return [(better, worse) for better, worse in paper_orders() if better in labels and worse in labels]


def findings(result: BudgetResult) -> list:
    """For each pair the paper orders (paper_orders): the paper's accuracies, our test intervals, the verdict."""
    by_label = {row["label"]: row for row in result.configurations}
    out = []
    for better, worse in tested_orders(result):
        a, b = by_label[better], by_label[worse]
        out.append(protocol.finding(
            STUDY, f"{better} (r={a['r']}) beats {worse} (r={b['r']}) at {result.budget:,} parameters",
            paper_numbers(better, worse), f"{better} {reported(a)} vs {worse} {reported(b)}",
            protocol.verdict(reported(a), reported(b), better, worse, lower_is_better=True)))
    return out


def tally(result: BudgetResult) -> dict:
    """How the paper's orders fared: {"agrees", "not distinguishable", "reversed"} counts over the findings."""
    counts = {"agrees": 0, protocol.NOT_DISTINGUISHABLE: 0, "reversed": 0}
    for f, (better, _) in zip(result.findings, tested_orders(result)):
        if f["verdict"] == protocol.NOT_DISTINGUISHABLE:
            counts[protocol.NOT_DISTINGUISHABLE] += 1
        else:
            counts["agrees" if f["verdict"] == f"{better} better" else "reversed"] += 1
    return counts


def summary(result: BudgetResult) -> str:
    """The losses as a text table (best first: test mean [95% interval], chosen lr, dev loss), the protocol, then
    every finding with its verdict."""
    rates = ", ".join(f"{row['label']} {row['lr']:g}" for row in result.configurations)
    edge = sum(not row["interior"] for row in result.configurations)
    head = (f"Fixed budget (paper Table 5): {result.budget:,} trainable parameters per configuration; test loss on "
            f"python-email after {result.settings['steps']} steps, nats per character")
    lines = [head,
             (f"select on dev (seed {protocol.SELECTION_SEED}), report on test (seeds {result.seeds}, mean and 95% "
              f"interval); rates chosen: {rates}; {edge} choice(s) at the edge of the rates tried"),
             "", f"{'weights':<14}{'r':>4}{'lr':>8}   {'test [95% interval]':<26}{'bits/char':>9}{'dev':>9}"]
    for row in ranking(result):
        test = reported(row)
        lines.append(f"{row['label']:<14}{row['r']:>4}{row['lr']:>8g}   {test.text():<26}"
                     f"{common.bits_per_char(test.mean):>9.4f}{dev_loss(row):>9.4f}")
    lines.append(f"{'pretrained':<14}{'-':>4}{'-':>8}   {result.pretrained_loss:<26.4f}"
                 f"{common.bits_per_char(result.pretrained_loss):>9.4f}")
    t = tally(result)
    lines += ["", (f"the paper's {sum(t.values())} orders: {t['agrees']} agree, {t[protocol.NOT_DISTINGUISHABLE]} not "
                   f"distinguishable, {t['reversed']} reversed"), "findings:"]
    lines += [f"- {f['claim']}: {f['verdict']}\n    ours: {f['ours']}\n    paper: {f['paper']}"
              for f in result.findings]
    return "\n".join(lines)


def plot(result: BudgetResult, path) -> None:
    """A bar per configuration (in the paper's order): mean test loss, error bars the 95% intervals over the
    reporting seeds, and the pretrained model's test loss as a dashed line. The y-axis starts near the losses so
    differences show."""
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(8, 4.5))
    rows = result.configurations
    labels = [f"{row['label']}\nr={row['r']}" for row in rows]
    tests = [reported(row) for row in rows]
    means = [t.mean for t in tests]
    errors = [[t.mean - t.low for t in tests], [t.high - t.mean for t in tests]]
    colors = [{1: "C0", 2: "C1"}.get(len(row["targets"]), "C2") for row in rows]   # by number of weight types
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color=colors)
    ax.axhline(result.pretrained_loss, color="gray", linestyle="--", label="pretrained (no fine-tuning)")
    ax.set_xticks(range(len(rows)), labels)
    low = min(t.low for t in tests)
    high = max(result.pretrained_loss, *(t.high for t in tests))
    span = max(high - low, 1e-6)
    ax.set_ylim(low - 0.1 * span, high + 0.05 * span)
    ax.set_ylabel("test loss (nats/char)")
    ax.secondary_yaxis("right", functions=(common.bits_per_char, lambda b: b * math.log(2))).set_ylabel("bits/char")
    ax.set_title(f"LoRA under a fixed budget of {result.budget:,} trainable parameters "
                 f"(95% intervals, seeds {result.seeds})")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
