"""Rank sweep (the LoRA paper's Table 6): how much rank does an adapter need, and which weights should it adapt?

The study fine-tunes the shipped tiny GPT (pretrained on Python's documentation, "pydoc") on a different
domain, Python's email package source ("python-email"), with LoRA on three sets of attention weights

    Wq                  the query projection alone
    Wq, Wv              query and value (the paper's default)
    Wq, Wk, Wv, Wo      all four attention weights

at each of the paper's ranks r = 1, 2, 4, 8, 64, every run from the same pretrained model for the same number
of steps (common.RunSettings: 100 steps of 8 windows, scale alpha / r = 2 at every rank). Beside them sit two
references: the untouched pretrained model (where every run starts) and full fine-tuning of all ~0.8M weights.

LoRA on ``n`` weight types of a d x k shape in each of the model's n_layer blocks trains

    trainable = r * (d + k) * n_layer * n          (here d = k = n_embd = 128, n_layer = 4: 1024 r n)

Protocol (protocol.py). Training reads python-email's training split only. Every configuration (target set and
rank) and full fine-tuning gets its own learning rate, chosen on dev with the selection seed 0 over a grid
extended until the best rate is interior (common.tuned_lora, common.select_and_report). The reported loss of a
configuration is a fresh run per reporting seed (1, 2, 3) at that rate, scored on test: the mean with its 95%
interval. The best rank of a target set is chosen on dev too (the lowest dev loss among its ranks, each at its
own tuned rate); test is read only to report.

Findings (``findings``), each a verdict from the test intervals (protocol.verdict: one side is better only
when the intervals do not overlap), against the paper's numbers (GPT-3 175B, validation accuracy):

- "a small rank already suffices": r = 1 against the best rank chosen on dev, per target set;
- {Wq, Wv} against Wq at the same r;
- "adapting more weight types beats a larger rank on one": {Wq, Wv} at r = 1 against Wq at its best rank;
- the best LoRA configuration (chosen on dev) against full fine-tuning.

Cost (default): 15 LoRA configurations and full fine-tuning, each tuned (five rates, more if the best is at an
edge) and then run with three reporting seeds: about 140 runs of 100 steps. ``fast=True``: ranks 1 and 2, six
steps, three rates (one extension at most) and two reporting seeds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.pretrained import pretrained_info
from . import common, protocol

RANKS = (1, 2, 4, 8, 64)       # the paper's Table 6 ranks
FAST_RANKS = (1, 2)
TARGET_SETS = {                # label (the paper's names) -> module-name suffixes LoRA adapts
    "Wq": ("q_proj",),
    "Wq,Wv": ("q_proj", "v_proj"),
    "Wq,Wk,Wv,Wo": common.ATTENTION,
}

# The paper's Table 6: validation accuracy (%) of GPT-3 175B with LoRA at r = PAPER_RANKS; the spread over seeds
# the paper states for each task is in PAPER_SPREAD. Its Table 4 gives full fine-tuning and LoRA (Wq, Wv, 4.7M).
PAPER_RANKS = (1, 2, 4, 8, 64)
PAPER_TABLE6 = {
    "WikiSQL": {"Wq": (68.8, 69.6, 70.5, 70.4, 70.0), "Wq,Wv": (73.4, 73.3, 73.7, 73.8, 73.5),
                "Wq,Wk,Wv,Wo": (74.1, 73.7, 74.0, 74.0, 73.9)},
    "MultiNLI": {"Wq": (90.7, 90.9, 91.1, 90.7, 90.7), "Wq,Wv": (91.3, 91.4, 91.3, 91.6, 91.4),
                 "Wq,Wk,Wv,Wo": (91.2, 91.7, 91.7, 91.5, 91.4)},
}
PAPER_SPREAD = {"WikiSQL": 0.5, "MultiNLI": 0.1}
PAPER_TABLE4 = {"WikiSQL": {"LoRA": 73.4, "full": 73.8}, "MultiNLI": {"LoRA": 91.7, "full": 89.5}}
STUDY = "rank-sweep"


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class RankSweepResult:
    """The numbers of the study. Losses are cross-entropy in nats per character: dev for selection, test for
    reporting (a test interval as a dict of protocol.Interval)."""

    ranks: list                                # [1, 2, ...]
    seeds: list                                # the reporting seeds
    target_sets: dict                          # {label: [module-name suffix, ...]}
    pretrained_loss: float                     # the shipped model before any fine-tuning, on test
    full: dict                                 # {"trainable", "lr", "interior", "dev_scores", "test", "losses"}
    lora: list = field(default_factory=list)   # [{"targets": label, **common.tuned_lora(...)}]
    best_rank: dict = field(default_factory=dict)  # {label: the rank with the lowest dev loss}
    settings: dict = field(default_factory=dict)   # common.RunSettings as a dict
    protocol: dict = field(default_factory=dict)   # protocol.protocol_record(...)
    findings: list = field(default_factory=list)   # [protocol.finding(...)]


def tuned_full(settings: common.RunSettings, fast: bool, report=None) -> dict:
    """Full fine-tuning under the protocol (select_and_report around settings.full_lr): the same keys as
    common.tuned_lora ("trainable", "lr", "interior", "dev_scores", "test", "losses")."""
    def one(lr, seed, part):
        _, fit = common.run_full(seed, settings, lr=lr, part=part)
        return fit.val_after, fit.trainable

    chosen = common.select_and_report(one, common.lr_grid(settings.full_lr, fast), fast, report=report,
                                      label="full fine-tuning")
    return {"trainable": chosen.payloads[0], "lr": chosen.tuning.best, "interior": chosen.tuning.interior,
            "dev_scores": {f"{lr:g}": v for lr, v in sorted(chosen.tuning.scores.items())},
            "test": asdict(chosen.test), "losses": chosen.test.values}


def run(fast: bool = False, seed: int = 0, *, ranks=None, target_sets=None) -> RankSweepResult:
    """Tune and report every (target set, r) with LoRA and full fine-tuning; choose each target set's best rank
    on dev; test the paper's claims.

    seed: accepted for the command line; the protocol fixes the seeds (selection seed 0, reporting seeds
    protocol.report_seeds). ranks, target_sets: a smaller sweep (default RANKS, or FAST_RANKS when fast; and
    TARGET_SETS)."""
    settings = common.RunSettings.for_mode(fast)
    ranks = tuple(ranks) if ranks is not None else (FAST_RANKS if fast else RANKS)
    target_sets = dict(target_sets) if target_sets is not None else TARGET_SETS
    seeds = protocol.report_seeds(fast)
    config = pretrained_info()["model_config"]      # n_layer, n_embd of the shipped model
    report = common.progress_counter(STUDY, fast, len(seeds) * (len(target_sets) * len(ranks) + 1))
    rows = [{"targets": label,
             **common.tuned_lora(label, targets, r, settings, fast,
                                 common.attention_lora_parameters(r, targets, config["n_layer"], config["n_embd"]),
                                 report=report)}
            for label, targets in target_sets.items() for r in ranks]
    full = tuned_full(settings, fast, report)
    result = RankSweepResult(ranks=list(ranks), seeds=list(seeds),
                             target_sets={k: list(v) for k, v in target_sets.items()},
                             pretrained_loss=common.pretrained_val_loss(settings, "test"), full=full, lora=rows,
                             settings=asdict(settings))
    result.best_rank = {label: best_rank(curve(result, label)) for label in result.target_sets}
    tunings = {f"LoRA {row['targets']} r={row['r']}": tuning_of(row) for row in rows}
    tunings["full fine-tuning"] = tuning_of(full)
    result.protocol = protocol.protocol_record(
        common.split(), seeds, tunings,
        best_rank="per target set, the rank with the lowest dev loss (selection seed, at its tuned rate)",
        pretrained="the shipped model scored on the same test windows")
    result.findings = findings(result)
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def tuning_of(row: dict) -> protocol.Tuning:
    """The protocol.Tuning recorded in a row of tuned_lora or tuned_full."""
    return protocol.Tuning(row["lr"], {float(lr): v for lr, v in row["dev_scores"].items()}, row["interior"], True)


def dev_loss(row: dict) -> float:
    """A configuration's dev loss at its chosen rate (selection seed): what the best rank is chosen by."""
    return row["dev_scores"][f"{row['lr']:g}"]


def best_rank(rows) -> int:
    """The rank of the row with the lowest dev loss (ties: the smaller rank). Reads no test score."""
    return min(rows, key=lambda row: (dev_loss(row), row["r"]))["r"]


def curve(result: RankSweepResult, label: str):
    """The rows of one target set, in increasing r."""
    return sorted((row for row in result.lora if row["targets"] == label), key=lambda row: row["r"])


def row_of(result: RankSweepResult, label: str, r: int) -> dict:
    """The row of one target set at rank r."""
    return next(row for row in result.lora if row["targets"] == label and row["r"] == r)


def reported(row: dict) -> protocol.Interval:
    """A row's test interval (mean and 95% interval over the reporting seeds)."""
    return protocol.as_interval(row["test"])


def _paper_accuracy(task: str, label: str, r: int) -> float:
    return PAPER_TABLE6[task][label][PAPER_RANKS.index(r)]


def _paper_best_rank(task: str, label: str) -> int:
    values = PAPER_TABLE6[task][label]
    return PAPER_RANKS[max(range(len(values)), key=lambda i: (values[i], -i))]


def _paper_r1_against_best(label: str) -> str:
    parts = []
    for task in PAPER_TABLE6:
        best = _paper_best_rank(task, label)
        parts.append(f"{task} r=1 {_paper_accuracy(task, label, 1)} vs best r={best} "
                     f"{_paper_accuracy(task, label, best)} (+-{PAPER_SPREAD[task]})")
    return "; ".join(parts)


def _paper_qv_against_q() -> str:
    parts = []
    for task in PAPER_TABLE6:
        gaps = [_paper_accuracy(task, "Wq,Wv", r) - _paper_accuracy(task, "Wq", r) for r in PAPER_RANKS]
        parts.append(f"{task}: Wq,Wv ahead by {min(gaps):.1f} to {max(gaps):.1f} points at r = "
                     f"{', '.join(map(str, PAPER_RANKS))} (+-{PAPER_SPREAD[task]})")
    return "; ".join(parts)


def _paper_qv1_against_q_best() -> str:
    parts = []
    for task in PAPER_TABLE6:
        best = _paper_best_rank(task, "Wq")
        parts.append(f"{task} Wq,Wv r=1 {_paper_accuracy(task, 'Wq,Wv', 1)} vs Wq r={best} "
                     f"{_paper_accuracy(task, 'Wq', best)}")
    return "; ".join(parts)


def findings(result: RankSweepResult) -> list:
    """The paper's claims tested with this result's test intervals; choices (best ranks) come from dev."""
    out = []
    for label in result.target_sets:
        rows = curve(result, label)
        if rows[0]["r"] != 1 or label not in PAPER_TABLE6["WikiSQL"]:
            continue
        best = result.best_rank[label]
        one = reported(rows[0])
        if best == 1:
            ours, verdict = f"r=1 is the best rank on dev; test {one}", "r=1 chosen on dev"
        else:
            other = reported(row_of(result, label, best))
            ours = f"r=1 {one} vs r={best} (best on dev) {other}"
            verdict = protocol.verdict(one, other, "r=1", f"r={best}", lower_is_better=True)
        out.append(protocol.finding(STUDY, f"{label}: r=1 is as good as the best rank", _paper_r1_against_best(label),
                                    ours, verdict))
    if "Wq" in result.target_sets and "Wq,Wv" in result.target_sets:
        per_rank = {r: protocol.verdict(reported(row_of(result, "Wq,Wv", r)), reported(row_of(result, "Wq", r)),
                                        "Wq,Wv", "Wq", lower_is_better=True)
                    for r in result.ranks}
        gaps = [reported(row_of(result, "Wq", r)).mean - reported(row_of(result, "Wq,Wv", r)).mean
                for r in result.ranks]
        ours = (f"Wq,Wv lower by {min(gaps):.4f} to {max(gaps):.4f} nats at r = "
                f"{', '.join(map(str, result.ranks))}")
        if len(set(per_rank.values())) == 1:
            verdict = f"{next(iter(per_rank.values()))} at every r"
        else:
            verdict = "; ".join(f"r={r}: {v}" for r, v in per_rank.items())
        out.append(protocol.finding(STUDY, "Wq,Wv beats Wq at the same r", _paper_qv_against_q(), ours, verdict))

        if 1 in result.ranks:
            qv1 = row_of(result, "Wq,Wv", 1)
            q_best = row_of(result, "Wq", result.best_rank["Wq"])
            a, b = reported(qv1), reported(q_best)
            out.append(protocol.finding(
                STUDY, "adapting more weight types beats a larger rank on one", _paper_qv1_against_q_best(),
                f"Wq,Wv r=1 ({qv1['trainable']:,} numbers) {a} vs Wq r={q_best['r']} (best on dev, "
                f"{q_best['trainable']:,} numbers) {b}",
                protocol.verdict(a, b, "Wq,Wv r=1", f"Wq r={q_best['r']}", lower_is_better=True)))

    best = min(result.lora, key=lambda row: (dev_loss(row), row["trainable"]))
    a, b = reported(best), protocol.as_interval(result.full["test"])
    paper = "; ".join(f"{task} LoRA {v['LoRA']} vs full {v['full']}" for task, v in PAPER_TABLE4.items())
    out.append(protocol.finding(
        STUDY, "LoRA matches full fine-tuning", f"GPT-3 (Table 4, LoRA on Wq,Wv): {paper}",
        f"best LoRA on dev ({best['targets']} r={best['r']}) {a} vs full fine-tuning {b}",
        protocol.verdict(a, b, f"LoRA {best['targets']} r={best['r']}", "full fine-tuning", lower_is_better=True)))
    return out


def protocol_line(result: RankSweepResult) -> str:
    """The design in one line: split, seeds, how the rates were chosen."""
    rates = sorted({row["lr"] for row in result.lora})
    edge = sum(not row["interior"] for row in [*result.lora, result.full])
    return (f"select on dev (seed {protocol.SELECTION_SEED}), report on test (seeds {result.seeds}, mean and 95% "
            f"interval); LoRA rates chosen: {', '.join(f'{lr:g}' for lr in rates)}; full fine-tuning "
            f"{result.full['lr']:g}; {edge} choice(s) at the edge of the rates tried")


def _loss_row(label: str, r, trainable: int, lr, interval: protocol.Interval, dev=None) -> str:
    lr_text = "-" if lr is None else f"{lr:g}"
    dev_text = "" if dev is None else f"{dev:>9.4f}"
    return (f"{label:<14}{r!s:>4}{trainable:>11,}{lr_text:>8}   {interval.text():<26}"
            f"{common.bits_per_char(interval.mean):>9.4f}{dev_text}")


def summary(result: RankSweepResult) -> str:
    """The losses as a text table (one line per configuration, test mean [95% interval], the dev loss that chose
    its rank), the references, the protocol and the findings with their verdicts."""
    head = (f"Rank sweep (paper Table 6): test loss on python-email after {result.settings['steps']} steps, nats "
            f"per character")
    lines = [head, protocol_line(result), "",
             f"{'targets':<14}{'r':>4}{'trainable':>11}{'lr':>8}   {'test [95% interval]':<26}{'bits/char':>9}"
             f"{'dev':>9}"]
    for label in result.target_sets:
        for row in curve(result, label):
            mark = " *" if result.best_rank.get(label) == row["r"] else ""
            lines.append(_loss_row(label, row["r"], row["trainable"], row["lr"], reported(row), dev_loss(row))
                         + mark)
    full = result.full
    lines.append(_loss_row("full FT", "-", full["trainable"], full["lr"], protocol.as_interval(full["test"]),
                           dev_loss(full)))
    lines.append(f"{'pretrained':<14}{'-':>4}{0:>11,}{'-':>8}   {result.pretrained_loss:<26.4f}"
                 f"{common.bits_per_char(result.pretrained_loss):>9.4f}")
    lines.append("* the best rank of its target set, chosen on dev")
    below = [row for row in result.lora
             if protocol.verdict_above(row["test"], result.pretrained_loss, lower_is_better=True) == "meets"]
    lines.append(f"test interval below the pretrained loss: {len(below)} of {len(result.lora)} LoRA configurations")
    lines += ["", "findings:"]
    lines += [f"- {f['claim']}: {f['verdict']}\n    ours: {f['ours']}\n    paper: {f['paper']}"
              for f in result.findings]
    return "\n".join(lines)


def plot(result: RankSweepResult, path) -> None:
    """Left: test loss against r (log2) per target set, error bars the 95% intervals over the reporting seeds,
    with the pretrained model and full fine-tuning (its interval shaded) as horizontal lines. Right: the same
    losses against trainable parameters (log)."""
    from ..plots import new_figure, save_figure

    def bars(intervals):
        return [[i.mean - i.low for i in intervals], [i.high - i.mean for i in intervals]]

    fig, (by_rank, by_params) = new_figure(1, 2, figsize=(12, 4.5))
    full = result.full
    full_test = protocol.as_interval(full["test"])
    for ax in (by_rank, by_params):
        ax.axhline(result.pretrained_loss, color="gray", linestyle="--", label="pretrained (no fine-tuning)")
        ax.axhline(full_test.mean, color="black", linestyle="-",
                   label=f"full fine-tuning ({full['trainable']:,} params)")
        ax.axhspan(full_test.low, full_test.high, color="black", alpha=0.1)
        ax.set_ylabel("test loss (nats/char)")
        ax.secondary_yaxis("right", functions=(common.bits_per_char, lambda b: b * math.log(2))).set_ylabel("bits/char")
    for label in result.target_sets:
        rows = curve(result, label)
        intervals = [reported(row) for row in rows]
        means = [i.mean for i in intervals]
        by_rank.errorbar([row["r"] for row in rows], means, yerr=bars(intervals), marker="o", capsize=3,
                         label=f"LoRA {label}")
        by_params.errorbar([row["trainable"] for row in rows], means, yerr=bars(intervals), marker="o", capsize=3,
                           label=f"LoRA {label}")
    by_params.errorbar([full["trainable"]], [full_test.mean], yerr=bars([full_test]), marker="s", color="black",
                       capsize=3)
    by_rank.set_xscale("log", base=2)
    by_rank.set_xticks(result.ranks, [str(r) for r in result.ranks])
    by_rank.set_xlabel("LoRA rank r")
    by_rank.set_title(f"test loss against rank (95% intervals, seeds {result.seeds})")
    by_params.set_xscale("log")
    by_params.set_xlabel("trainable parameters")
    by_params.set_title("test loss against trainable parameters")
    low = min(full_test.low, *(reported(row).low for row in result.lora))
    high = max(result.pretrained_loss, *(reported(row).high for row in result.lora))
    span = max(high - low, 1e-6)
    for ax in (by_rank, by_params):      # room above the highest line for the legend
        ax.set_ylim(low - 0.05 * span, high + 0.3 * span)
    by_rank.legend(fontsize=8, ncol=2, loc="upper right")
    save_figure(fig, Path(path))
