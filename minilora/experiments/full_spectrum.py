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

Protocol (protocol.py). Full fine-tuning trains on python-email's training split; its learning rate is chosen
on dev with the selection seed 0 over a grid around common.RunSettings.full_lr, extended until the best rate is
interior (common.select_and_report). Each reporting seed (1, 2, 3) then fine-tunes afresh at that rate (scored on
test), and its Delta W is measured beside its own Gaussian reference. A group's measure (attention: q, k, v, o;
MLP: fc, proj) is its mean over the group's weights in one run; reported is the mean over the reporting runs
with its 95% interval. The pretrained W has no seed: its measures are single numbers.

Findings (``findings``), per group: whether Delta W's stable rank lies below the Gaussian's (protocol.verdict:
one side lower only when the intervals do not overlap), and whether 90% of Delta W's energy lies within the
ranks LoRA uses (LORA_RANK; protocol.verdict_above).

Cost (default): full fine-tuning tuned (five rates, more if the best is at an edge) and three reporting runs of
100 steps, and 24 x 3 SVDs per reporting run. ``fast=True``: six steps, three rates, two reporting seeds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy

from ..io.pretrained import load_pretrained
from . import common, protocol
from .common import ATTENTION, RunSettings, weight

RANKS = (1, 2, 4, 8, 16)
MLP = ("fc", "proj")
ENERGY_LEVEL = 0.9          # "rank for 90% of the energy"
LORA_RANK = 8               # the largest rank the paper's Table 6 needed for LoRA's update on GPT-3
GROUPS = {"attention": ".attn.", "MLP": ".mlp."}
GROUP_MEASURES = ("E1", f"E{LORA_RANK}", "stable_rank", "rank_90")   # what a group reports, with intervals
STUDY = "full-spectrum"


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
    """Per reporting run, the spectrum measures of every weight's Delta W and of a Gaussian of the same shape and
    norm; the pretrained W's measures; per group, the intervals over the reporting runs."""

    seeds: list                                   # the reporting seeds
    steps: int
    lr: float                                     # full fine-tuning's rate, chosen on dev
    tuning: dict                                  # {"interior", "dev_scores": {lr: dev loss}}
    val_before: float                             # the pretrained model's test loss
    val_after: dict                               # test loss after fine-tuning: protocol.Interval as a dict
    ranks: list
    names: list
    pretrained: dict = field(default_factory=dict)   # {name: spectrum_report(W)}
    runs: list = field(default_factory=list)
    # runs[i] = {"seed", "val_after", "weights": {name: {"shape": [d, k], "relative_update": ||dW||_F / ||W||_F,
    #            "delta": spectrum_report(dW), "random": spectrum_report(Gaussian)}}}
    groups: dict = field(default_factory=dict)
    # groups[group] = {"delta": {measure: Interval dict}, "random": {...}, "pretrained": {measure: number}}
    settings: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def measures(reports) -> dict:
    """The group measures (GROUP_MEASURES) of a list of spectrum_reports: the means of the top-r energy fraction
    ("E1": r = 1, ...), of the stable rank and of the directions for 90% of the energy."""
    reports = list(reports)
    out = {}
    for measure in GROUP_MEASURES:
        if measure.startswith("E"):
            i = RANKS.index(int(measure[1:]))
            out[measure] = float(numpy.mean([rep["energy"][i] for rep in reports]))
        else:
            out[measure] = float(numpy.mean([rep[measure] for rep in reports]))
    return out


def group_names(names, group: str) -> list:
    """The weights of ``names`` in one group of GROUPS."""
    return [name for name in names if GROUPS[group] in name]


def group_intervals(result: FullSpectrumResult) -> dict:
    """Per group: the interval over the reporting runs of each measure of Delta W and of the Gaussian, and the
    pretrained W's measures."""
    out = {}
    for group in GROUPS:
        names = group_names(result.names, group)
        if not names:
            continue
        entry = {}
        for key in ("delta", "random"):
            per_run = [measures(run["weights"][n][key] for n in names) for run in result.runs]
            entry[key] = {m: dataclasses.asdict(protocol.interval([values[m] for values in per_run]))
                          for m in per_run[0]}
        entry["pretrained"] = measures(result.pretrained[n] for n in names)
        out[group] = entry
    return out


def run(fast: bool = False, seed: int = 0, *, steps: int | None = None) -> FullSpectrumResult:
    """Tune full fine-tuning's learning rate on dev, fine-tune once per reporting seed at that rate, and measure
    the spectrum of every weight's update beside a Gaussian reference.

    fast: a few steps on small batches (seconds); default: common.RunSettings (100 steps).
    steps: overrides the number of steps of either mode.
    seed: seeds the Gaussian references (with the run's own seed); the protocol fixes the training seeds.
    """
    settings = RunSettings.for_mode(fast, **({} if steps is None else {"steps": steps}))
    base = load_pretrained(dropout=0.0)
    names = weight_names(base.config.n_layer)
    pretrained = {name: spectrum_report(weight(base, name)) for name in names}

    def one(lr, run_seed, part):
        model, fit = common.run_full(run_seed, settings, lr=lr, part=part)
        if part == "dev":
            return fit.val_after
        rng = numpy.random.default_rng([seed, run_seed])
        weights = {}
        for name in names:
            W = weight(base, name)                       # (d, k) pretrained
            dW = weight(model, name) - W                 # (d, k) what full fine-tuning changed
            weights[name] = {"shape": list(dW.shape),
                             "relative_update": float(numpy.linalg.norm(dW) / numpy.linalg.norm(W)),
                             "delta": spectrum_report(dW), "random": spectrum_report(gaussian_like(dW, rng))}
        return fit.val_after, {"seed": run_seed, "val_before": fit.val_before, "val_after": fit.val_after,
                               "weights": weights}

    report = common.progress_counter(STUDY, fast, len(protocol.report_seeds(fast)))
    chosen = common.select_and_report(one, common.lr_grid(settings.full_lr, fast), fast, report=report,
                                      label="full fine-tuning")
    seeds = protocol.report_seeds(fast)
    result = FullSpectrumResult(
        seeds=list(seeds), steps=settings.steps, lr=chosen.tuning.best,
        tuning={"interior": chosen.tuning.interior,
                "dev_scores": {f"{lr:g}": v for lr, v in sorted(chosen.tuning.scores.items())}},
        val_before=common.pretrained_val_loss(settings, "test"), val_after=dataclasses.asdict(chosen.test),
        ranks=list(RANKS), names=names, pretrained=pretrained, runs=chosen.payloads,
        settings=dataclasses.asdict(settings),
        protocol=protocol.protocol_record(common.split(), seeds, {"full fine-tuning": chosen.tuning},
                                          measures="per group, the mean over its weights in one run; the interval "
                                                   "is over the reporting runs",
                                          reference="a Gaussian of each Delta W's shape and norm, drawn per run"))
    result.groups = group_intervals(result)
    result.findings = findings(result)
    return result


def findings(result: FullSpectrumResult) -> list:
    """Per group: Delta W's stable rank against the Gaussian's, and its directions for 90% of the energy against
    LORA_RANK, each a verdict from the intervals over the reporting runs."""
    paper = ("hypothesis (section 4.1, after Aghajanyan et al. 2020): the update has a low intrinsic rank; "
             "no number for full fine-tuning")
    out = []
    for group, entry in result.groups.items():
        delta, random = (protocol.as_interval(entry[k]["stable_rank"]) for k in ("delta", "random"))
        out.append(protocol.finding(
            STUDY, f"{group}: full fine-tuning's Delta W has a lower stable rank than a Gaussian of its shape and norm",
            paper, f"stable rank {delta.text(2)} vs Gaussian {random.text(2)} (pretrained W "
                   f"{entry['pretrained']['stable_rank']:.2f})",
            protocol.verdict(delta, random, "Delta W", "Gaussian", lower_is_better=True).replace(" better", " lower")))
        needed = protocol.as_interval(entry["delta"]["rank_90"])
        random_needed = protocol.as_interval(entry["random"]["rank_90"])
        out.append(protocol.finding(
            STUDY, f"{group}: 90% of Delta W's energy lies within r <= {LORA_RANK}",
            f"Table 6: r = 1 to {LORA_RANK} suffice for LoRA's update on GPT-3",
            f"directions for 90% of the energy {needed.text(1)} (Gaussian {random_needed.text(1)}, pretrained W "
            f"{entry['pretrained']['rank_90']:.1f})",
            protocol.verdict_above(needed, LORA_RANK, lower_is_better=True)))
    return out


def counts(result: FullSpectrumResult) -> dict:
    """Over every (reporting run, weight): {"weights" (per run), "cases", "top1_above_random",
    "stable_rank_below_random", "stable_rank_below_pretrained"}."""
    cases = [(run["weights"][n], result.pretrained[n]) for run in result.runs for n in result.names]
    return {"weights": len(result.names), "cases": len(cases),
            "top1_above_random": sum(x["delta"]["energy"][0] > x["random"]["energy"][0] for x, _ in cases),
            "stable_rank_below_random": sum(x["delta"]["stable_rank"] < x["random"]["stable_rank"] for x, _ in cases),
            "stable_rank_below_pretrained": sum(x["delta"]["stable_rank"] < w["stable_rank"] for x, w in cases)}


# ----------------------------------------------------------------------------------------------------
# the report


def _short(name: str) -> str:
    """"h.2.attn.q_proj.weight" -> "h2 q"; "h.2.mlp.fc.weight" -> "h2 fc"."""
    parts = name.split(".")
    return f"h{parts[1]} {parts[3].replace('_proj', '')}"


def _per_weight(result: FullSpectrumResult, name: str, key: str, pick) -> protocol.Interval:
    """The interval over the reporting runs of pick(spectrum_report) for one weight's Delta W or Gaussian."""
    return protocol.interval([pick(run["weights"][name][key]) for run in result.runs])


def plot(result: FullSpectrumResult, path) -> None:
    """Two panels: cumulative energy against r for every Delta W of every reporting run (and the references);
    stable rank per weight, Delta W and Gaussian as means with error bars the 95% intervals over the reporting
    runs, W as its single value."""
    from ..plots import new_figure, save_figure

    fig, (ax_e, ax_s) = new_figure(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.6]})

    def cumulative(S):
        S2 = numpy.asarray(S) ** 2
        return numpy.cumsum(S2) / S2.sum()

    seen = set()

    def draw(S, style, color, label, alpha):
        c = cumulative(S)
        ax_e.plot(numpy.arange(1, c.size + 1), c, style, color=color, lw=0.8, alpha=alpha,
                  label=label if label not in seen else None)
        seen.add(label)

    for name in result.names:
        kind = "attention" if ".attn." in name else "MLP"
        for run in result.runs:
            w = run["weights"][name]
            draw(w["delta"]["singular_values"], "-", "C0" if kind == "attention" else "C2", f"Delta W, {kind}", 0.6)
            draw(w["random"]["singular_values"], "--", "grey", "Gaussian, same shape and norm", 0.25)
        draw(result.pretrained[name]["singular_values"], "-", "C1", "pretrained W", 0.35)
    ax_e.set_xscale("log", base=2)
    ax_e.set(title=f"energy in the top r directions (full fine-tuning, {result.steps} steps, lr {result.lr:g}, "
                   f"seeds {result.seeds})", xlabel="r", ylabel="sum of top-r S^2 / sum of S^2", ylim=(0, 1.02))
    ax_e.title.set_fontsize(9)
    ax_e.legend(fontsize=8)

    x = numpy.arange(len(result.names))
    width = 0.27
    for i, (key, color, label) in enumerate((("delta", "C0", "Delta W"), ("pretrained", "C1", "pretrained W"),
                                             ("random", "grey", "Gaussian"))):
        if key == "pretrained":
            ax_s.bar(x + (i - 1) * width, [result.pretrained[n]["stable_rank"] for n in result.names], width,
                     color=color, label=label)
            continue
        intervals = [_per_weight(result, n, key, lambda rep: rep["stable_rank"]) for n in result.names]
        ax_s.bar(x + (i - 1) * width, [t.mean for t in intervals], width, color=color, label=label,
                 yerr=[[t.mean - t.low for t in intervals], [t.high - t.mean for t in intervals]], capsize=2)
    ax_s.set_xticks(x, [_short(n) for n in result.names], rotation=90, fontsize=8)
    ax_s.set(title="stable rank ||M||_F^2 / ||M||_2^2 (95% intervals over the reporting runs)", xlabel="weight",
             ylabel="stable rank")
    ax_s.legend(fontsize=8)
    save_figure(fig, path)


def summary(result: FullSpectrumResult) -> str:
    """The protocol line, the per-weight means over the reporting runs, the group intervals, the counts and the
    findings with their verdicts."""
    ranks = result.ranks
    shown = [i for i, r in enumerate(ranks) if r in (1, 4, 16)]
    head = "  ".join(f"{'E' + str(ranks[i]) + ' dW/rand':>12}" for i in shown)
    after = protocol.as_interval(result.val_after)
    edge = "" if result.tuning["interior"] else " (at the edge of the rates tried)"
    lines = [(f"Full fine-tuning's Delta W: {result.steps} steps, lr {result.lr:g}{edge} chosen on dev (seed "
              f"{protocol.SELECTION_SEED}) of {', '.join(result.tuning['dev_scores'])}; reported on test with seeds "
              f"{result.seeds}: loss {result.val_before:.4f} -> {after}"),
             "E_r: energy fraction of the top r directions; sr: stable rank; r90: directions for 90% of the energy",
             f"per weight: means over the {len(result.runs)} reporting runs", "",
             f"{'weight':<7} {'shape':>8} {'|dW|/|W|':>8}  {head}  {'sr dW / W / rand':>18}  {'r90 dW/rand':>11}"]
    for name in result.names:
        ws = [run["weights"][name] for run in result.runs]
        mean = lambda key, pick: float(numpy.mean([pick(w[key]) for w in ws]))
        energies = "  ".join(f"{mean('delta', lambda s: s['energy'][i]):>5.3f}/"
                             f"{mean('random', lambda s: s['energy'][i]):<6.3f}" for i in shown)
        lines.append(f"{_short(name):<7} {'x'.join(map(str, ws[0]['shape'])):>8} "
                     f"{float(numpy.mean([w['relative_update'] for w in ws])):>8.4f}  {energies}  "
                     f"{mean('delta', lambda s: s['stable_rank']):>5.1f} / "
                     f"{result.pretrained[name]['stable_rank']:>4.1f} / "
                     f"{mean('random', lambda s: s['stable_rank']):>4.1f}  "
                     f"{mean('delta', lambda s: s['rank_90']):>4.0f}/{mean('random', lambda s: s['rank_90']):.0f}")
    lines += ["", "per group: mean over its weights, 95% interval over the reporting runs"]
    for group, entry in result.groups.items():
        for measure in GROUP_MEASURES:
            digits = 3 if measure.startswith("E") else 1
            delta, random = (protocol.as_interval(entry[key][measure]).text(digits) for key in ("delta", "random"))
            lines.append(f"  {group:<9} {measure:<11} Delta W {delta}   Gaussian {random}"
                         f"   W {entry['pretrained'][measure]:.{digits}f}")
    c = counts(result)
    lines.append("")
    for key, text in (("top1_above_random", "top-1 energy of Delta W above the Gaussian's"),
                      ("stable_rank_below_random", "stable rank of Delta W below the Gaussian's"),
                      ("stable_rank_below_pretrained", "stable rank of Delta W below W's own")):
        lines.append(f"{text + ':':<45} {c[key]}/{c['cases']} (run, weight) pairs")
    lines += ["", "findings:"]
    lines += [f"- {f['claim']}: {f['verdict']}\n    ours: {f['ours']}\n    paper: {f['paper']}"
              for f in result.findings]
    return "\n".join(lines)
