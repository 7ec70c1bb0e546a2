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
With Adam, then, the scale acts much like a factor on the learning rate: one lr for every rank confounds the
scaling rule with the effective step size, and a rate tuned per rank can undo much of the difference.

The study separates the two. LoRA on (q_proj, v_proj) of the shipped tiny GPT, python-email's declared split
(common.split: train on train, select on dev, report on test), ALPHA = 8 for both rules, ranks RANKS:

  1. Tuned comparison. At every rank, each rule gets its own learning rate, chosen on dev with the selection
     seed (common.tuned_lora: the 1-3-10 grid around common.RunSettings.lora_lr, extended until interior),
     then one run per reporting seed on test; the verdict per rank (rsLoRA against standard) comes from the
     two 95% intervals (protocol.verdict). r = 1 is the same run under both rules (s = alpha) and is tuned once.
  2. Learning curves at one fixed rate: the rate tuned at r = 1 (where the rules coincide), held fixed as r
     grows, as a practitioner who tunes once and then raises the rank would. Every rank under both rules,
     one run per reporting seed on test, the test loss every CURVE_EVAL_EVERY steps (fit's eval_every). The
     improvement over the pretrained model at the end of the curve, and the ratio of the improvement at the
     largest rank to that at the smallest rank where the rules differ (RATIO_RANKS: 64 against 4), per seed,
     with its interval: a ratio above 1 means the larger rank learned more at the same rate; the paper's
     "standard scaling collapses" predicts a ratio near or below 1 under alpha / r and above 1 under rsLoRA.
     The size of the update ||s B A||_F (mean over the adapted layers) is recorded beside it.

Scores are test cross-entropy in nats per character on the first eval_batches x batch_size windows of the
test half (common.RunSettings: 16 x 8 = 128 windows), the same windows at every point of every curve.

Cost (default, 100 steps of 8 windows per run): tuning 7 configurations (r = 1 once, then 4, 16, 64 under
both rules) of about 5 to 7 dev runs each plus 3 test runs each, and 7 x 3 curve runs: about 90 runs.
``fast=True``: r = 1, 4, 16, 6 steps of 4 windows, the fast grid and 2 reporting seeds: seconds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core.lora import lora_modules
from ..io.pretrained import load_pretrained
from . import common, protocol

STUDY = "rslora"
RANKS = (1, 4, 16, 64)
FAST_RANKS = (1, 4, 16)
ALPHA = 8.0
TARGETS = ("q_proj", "v_proj")
CURVE_EVAL_EVERY = 10
FAST_CURVE_EVAL_EVERY = 2
SCALINGS = {"standard": False, "rslora": True}    # label -> LoRAConfig.use_rslora
LABELS = {"standard": "s = alpha / r", "rslora": "s = alpha / sqrt(r) (rsLoRA)"}
PAPER_TUNED = "rsLoRA lower loss at large r (one lr for all ranks; Kalajdzievski 2023, Fig. 2)"
PAPER_RATIO = {"standard": "about 1: larger r does not learn more (gradient collapse)",
               "rslora": "above 1: larger r learns more"}


def scale_for(scaling: str, r: int, alpha: float) -> float:
    """The adapter scale s of a scaling ("standard" or "rslora") at rank r."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {list(SCALINGS)}")
    return alpha / math.sqrt(r) if SCALINGS[scaling] else alpha / r


def ratio_ranks(ranks) -> tuple:
    """(reference, largest): the smallest rank where the two rules differ (the second rank; the first is 1) and
    the largest rank."""
    if len(ranks) < 3 or ranks[0] != 1:
        raise ValueError(f"ranks must start at 1 and hold at least 3 ranks; got {list(ranks)}")
    return ranks[1], ranks[-1]


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class RsLoRAResult:
    """The numbers of the study. Every {scaling: [...]} list follows ``ranks``; losses are test cross-entropy
    in nats per character; intervals are protocol.Interval dicts over the reporting seeds."""

    ranks: list                                        # [1, 4, 16, 64]
    alpha: float
    targets: list                                      # ["q_proj", "v_proj"]
    pretrained_loss: float                             # where every curve starts (step 0), same test windows
    tuned: dict = field(default_factory=dict)          # {scaling: [common.tuned_lora dict per rank]}
    tuned_verdicts: list = field(default_factory=list)  # per rank: rsLoRA against standard, each at its own lr
    fixed_lr: float = 0.0                              # the curves' one rate: tuned at r = 1
    scales: dict = field(default_factory=dict)         # {scaling: [s of the trained LoRALinear layers]}
    curves: dict = field(default_factory=dict)         # {scaling: [[[[step, loss], ...] per seed] per rank]}
    final_loss: dict = field(default_factory=dict)     # {scaling: [Interval of the curves' last point]}
    improvement: dict = field(default_factory=dict)    # {scaling: [Interval of pretrained - final]}
    rank_gain_ratio: dict = field(default_factory=dict)  # {scaling: Interval of improvement(hi) / improvement(ref)}
    ratio_ranks: list = field(default_factory=list)    # [ref, hi]
    update_norm: dict = field(default_factory=dict)    # {scaling: [mean over seeds and layers of ||s B A||_F]}
    shared: list = field(default_factory=list)         # ranks trained once for both scalings (s is the same)
    settings: dict = field(default_factory=dict)       # common.RunSettings of the tuned runs, as a dict
    curve_settings: dict = field(default_factory=dict)  # ... of the curve runs (eval_every set)
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def _trained_scale(model) -> float:
    """The scale of the model's LoRA layers (all the same in one run)."""
    scales = {m.scale for _, m in lora_modules(model)}
    assert len(scales) == 1, f"LoRA layers with different scales: {sorted(scales)}"
    return scales.pop()


def _update_norm(model) -> float:
    """Mean over the adapted layers of ||dW||_F, dW = s B A."""
    return float(numpy.mean([numpy.linalg.norm(common.adapter_matrices(model, name)[2])
                             for name, _ in lora_modules(model)]))


def _configurations(ranks):
    """[(r, scaling, shared_with)]: every rank under both rules; shared_with names the rule whose run this one
    is (same scale, same run), else None."""
    out = []
    for r in ranks:
        out.append((r, "standard", None))
        same = scale_for("rslora", r, ALPHA) == scale_for("standard", r, ALPHA)
        out.append((r, "rslora", "standard" if same else None))
    return out


def _tuning_of(tuned: dict) -> protocol.Tuning:
    """The protocol.Tuning that common.tuned_lora's dict describes."""
    return protocol.Tuning(best=tuned["lr"], scores={float(lr): v for lr, v in tuned["dev_scores"].items()},
                           interior=tuned["interior"], lower_is_better=True)


def run(fast: bool = False, seed: int = 0) -> RsLoRAResult:
    """The tuned comparison at every rank, then the learning curves at one fixed rate (see the module docstring).
    ``seed`` is accepted for the CLI; the protocol fixes the seeds (selection 0, reporting protocol.report_seeds)."""
    settings = common.RunSettings.for_mode(fast)
    curve_settings = dataclasses.replace(settings, eval_every=FAST_CURVE_EVAL_EVERY if fast else CURVE_EVAL_EVERY)
    ranks = FAST_RANKS if fast else RANKS
    seeds = protocol.report_seeds(fast)
    base = load_pretrained(dropout=0.0).config
    configurations = _configurations(ranks)
    own_runs = sum(1 for *_, shared in configurations if shared is None)
    report = common.progress_counter(STUDY, fast, 2 * own_runs * len(seeds))
    pretrained = common.pretrained_val_loss(settings, "test")   # step 0 of every curve, on the curves' windows
    result = RsLoRAResult(ranks=list(ranks), alpha=ALPHA, targets=list(TARGETS), pretrained_loss=pretrained,
                          settings=asdict(settings), curve_settings=asdict(curve_settings),
                          ratio_ranks=list(ratio_ranks(ranks)))
    for key in ("tuned", "scales", "curves", "final_loss", "improvement", "update_norm"):
        getattr(result, key).update({scaling: [] for scaling in SCALINGS})

    # 1. each rule at each rank with its own rate, tuned on dev, reported on test
    for r, scaling, shared in configurations:
        if shared is not None:
            result.tuned[scaling].append(result.tuned[shared][-1])
            result.shared.append(r)
            continue
        trainable = common.attention_lora_parameters(r, TARGETS, base.n_layer, base.n_embd)
        result.tuned[scaling].append(common.tuned_lora(f"{scaling} alpha={ALPHA:g}", TARGETS, r, settings, fast,
                                                       trainable, alpha=ALPHA, use_rslora=SCALINGS[scaling],
                                                       report=report))
    for i, r in enumerate(ranks):
        result.tuned_verdicts.append(protocol.verdict(result.tuned["rslora"][i]["test"],
                                                      result.tuned["standard"][i]["test"], "rsLoRA", "standard",
                                                      lower_is_better=True))

    # 2. the curves at the rate tuned at r = 1, held fixed
    result.fixed_lr = result.tuned["standard"][0]["lr"]
    measured = {}
    for r, scaling, shared in configurations:
        if shared is None:
            runs = []
            for s in seeds:
                model, finetune_run = common.run_lora(TARGETS, r, s, curve_settings, alpha=ALPHA,
                                                      use_rslora=SCALINGS[scaling], lr=result.fixed_lr, part="test")
                curve = [[int(step), float(v)] for step, v in finetune_run.val_curve]
                assert curve[-1][0] == curve_settings.steps, "the curve must end at the last step"
                runs.append({"scale": _trained_scale(model), "curve": curve, "norm": _update_norm(model)})
                report(f"curve {scaling} r={r} lr {result.fixed_lr:g} seed {s}: {curve[-1][1]:.4f} (test)")
            measured[r, scaling] = runs
        runs = measured[r, shared or scaling]
        finals = [one["curve"][-1][1] for one in runs]
        result.scales[scaling].append(runs[0]["scale"])
        result.curves[scaling].append([one["curve"] for one in runs])
        result.final_loss[scaling].append(asdict(protocol.interval(finals)))
        result.improvement[scaling].append(asdict(protocol.interval([pretrained - f for f in finals])))
        result.update_norm[scaling].append(float(numpy.mean([one["norm"] for one in runs])))
    ref, hi = ranks.index(result.ratio_ranks[0]), ranks.index(result.ratio_ranks[1])
    for scaling in SCALINGS:
        gains = [[pretrained - curve[-1][1] for curve in result.curves[scaling][k]] for k in (ref, hi)]
        result.rank_gain_ratio[scaling] = asdict(protocol.interval([g_hi / g_ref for g_ref, g_hi in zip(*gains)]))

    tunings = {f"{scaling} r={r}": _tuning_of(result.tuned[scaling][i])
               for i, r in enumerate(ranks) for scaling in SCALINGS if not (scaling == "rslora" and r in result.shared)}
    result.protocol = protocol.protocol_record(
        common.split(), seeds, tunings, alpha=ALPHA, targets=list(TARGETS),
        tuned_runs="each rule and rank: lr tuned on dev (seed 0), one test run per reporting seed",
        curves=f"lr fixed at the rate tuned at r = 1 ({result.fixed_lr:g}); test loss every "
               f"{curve_settings.eval_every} steps; one run per reporting seed")
    result.findings = findings_of(result)
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def against_one(ratio) -> str:
    """Where a ratio's interval stands against 1: "above 1", "below 1" or "not distinguishable"."""
    text = protocol.verdict_above(ratio, 1.0, lower_is_better=False)
    return {"meets": "above 1", "misses": "below 1"}.get(text, text)


def findings_of(result: RsLoRAResult) -> list:
    """The claims this study tests (protocol.finding dicts), each verdict from the 95% intervals."""
    out = []
    for i, r in enumerate(result.ranks):
        if r in result.shared:
            continue
        rs, std = (protocol.as_interval(result.tuned[s][i]["test"]) for s in ("rslora", "standard"))
        out.append(protocol.finding(
            STUDY, f"r={r}: rsLoRA vs standard LoRA, each with its own lr tuned on dev (test loss, nats/char)",
            PAPER_TUNED, f"rsLoRA {rs.text()} (lr {result.tuned['rslora'][i]['lr']:g}) vs standard {std.text()} "
                         f"(lr {result.tuned['standard'][i]['lr']:g})", result.tuned_verdicts[i]))
    ref, hi = result.ratio_ranks
    for scaling in SCALINGS:
        ratio = protocol.as_interval(result.rank_gain_ratio[scaling])
        out.append(protocol.finding(
            STUDY, f"{LABELS[scaling]}, one lr for all ranks ({result.fixed_lr:g}): improvement over the pretrained "
                   f"model at r={hi} / at r={ref}", PAPER_RATIO[scaling], ratio.text(3), against_one(ratio)))
    out.append(protocol.finding(
        STUDY, f"one lr for all ranks: rank gain ratio (r={hi} / r={ref}), rsLoRA vs standard",
        "rsLoRA gains more from rank", f"rsLoRA {protocol.as_interval(result.rank_gain_ratio['rslora']).text(3)} vs "
                                       f"standard {protocol.as_interval(result.rank_gain_ratio['standard']).text(3)}",
        protocol.verdict(result.rank_gain_ratio["rslora"], result.rank_gain_ratio["standard"], "rsLoRA", "standard",
                         lower_is_better=False)))
    return out


def summary(result: RsLoRAResult) -> str:
    s, c = result.settings, result.curve_settings
    seeds = result.protocol.get("report_seeds", [])
    split = result.protocol.get("split", {})
    lrs = "; ".join(f"{scaling} " + ", ".join(f"r={r}: {t['lr']:g}{'' if t['interior'] else ' (edge)'}"
                                              for r, t in zip(result.ranks, result.tuned[scaling]))
                    for scaling in SCALINGS)
    rows = [f"rsLoRA against standard LoRA scaling: alpha = {result.alpha:g}, LoRA on {', '.join(result.targets)}, "
            f"{s['steps']} steps of {s['batch_size']} windows; test loss (nats/char), pretrained "
            f"{result.pretrained_loss:.4f}",
            f"protocol: train on {split.get('corpus', '?')} train, lr chosen on dev (seed "
            f"{result.protocol.get('selection_seed', 0)}), reported on test over seeds {seeds} (mean [95% CI])",
            f"tuned lrs: {lrs}", "",
            "1. each rule at its own tuned lr:",
            f"{'r':>4} | {'s=a/r':>7} {'lr':>7} {'test loss':>26} | {'s=a/sqrt(r)':>11} {'lr':>7} {'test loss':>26} | "
            f"verdict"]
    for i, r in enumerate(result.ranks):
        std, rs = result.tuned["standard"][i], result.tuned["rslora"][i]
        rows.append(f"{r:>4} | {scale_for('standard', r, result.alpha):>7.3g} {std['lr']:>7g} "
                    f"{protocol.as_interval(std['test']).text():>26} | {scale_for('rslora', r, result.alpha):>11.3g} "
                    f"{rs['lr']:>7g} {protocol.as_interval(rs['test']).text():>26} | "
                    f"{'(one run: s is the same)' if r in result.shared else result.tuned_verdicts[i]}")
    ref, hi = result.ratio_ranks
    rows += ["", f"2. one lr for every rank ({result.fixed_lr:g}, tuned at r = 1), {c['steps']} steps, test loss "
                 f"every {c['eval_every']} steps; improvement = pretrained - final:",
             f"{'r':>4} | {'s=a/r':>7} {'improvement':>26} {'||dW||':>8} | {'s=a/sqrt(r)':>11} {'improvement':>26} "
             f"{'||dW||':>8}"]
    for i, r in enumerate(result.ranks):
        rows.append(f"{r:>4} | {result.scales['standard'][i]:>7.3g} "
                    f"{protocol.as_interval(result.improvement['standard'][i]).text():>26} "
                    f"{result.update_norm['standard'][i]:>8.3f} | {result.scales['rslora'][i]:>11.3g} "
                    f"{protocol.as_interval(result.improvement['rslora'][i]).text():>26} "
                    f"{result.update_norm['rslora'][i]:>8.3f}")
    rows.append(f"improvement at r={hi} / at r={ref}: " + "; ".join(
        f"{scaling} {protocol.as_interval(result.rank_gain_ratio[scaling]).text(3)}" for scaling in SCALINGS))
    rows += ["", "findings:"]
    rows += [f"  - {f['claim']}: ours {f['ours']}; paper {f['paper']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(rows)


def plot(result: RsLoRAResult, path) -> None:
    """Test loss against step at the one fixed lr, one line per rank (mean over seeds, 95% band): s = alpha / r
    (left), alpha / sqrt(r) (middle); right: test loss against r with each rule at its own tuned lr."""
    import matplotlib

    from ..plots import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(16, 4.6), sharey=True)
    colours = matplotlib.colormaps["viridis"](numpy.linspace(0.0, 0.85, len(result.ranks)))
    for ax, scaling in zip(axes[:2], SCALINGS):
        for colour, r, s, curves in zip(colours, result.ranks, result.scales[scaling], result.curves[scaling]):
            steps, mean, low, high = protocol.mean_curve(curves)
            ax.plot(steps, mean, marker="o", markersize=2.5, color=colour, label=f"r = {r} (s = {s:.3g})")
            ax.fill_between(steps, low, high, color=colour, alpha=0.2)
        ax.axhline(result.pretrained_loss, color="grey", linestyle=":", linewidth=1, label="pretrained")
        ax.set_title(f"{LABELS[scaling]}, alpha = {result.alpha:g}, lr {result.fixed_lr:g} (fixed)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss (nats / char), mean and 95% interval")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for offset, scaling in zip((-0.04, 0.04), SCALINGS):
        tests = [protocol.as_interval(t["test"]) for t in result.tuned[scaling]]
        x = numpy.array(result.ranks, dtype=float) * (1 + offset)
        mean = numpy.array([t.mean for t in tests])
        ax.errorbar(x, mean, yerr=[mean - [t.low for t in tests], [t.high for t in tests] - mean], marker="o",
                    capsize=3, label=f"{LABELS[scaling]}, lr tuned per rank")
    ax.set_xscale("log")
    ax.set_xticks(result.ranks, [str(r) for r in result.ranks])
    ax.set(xlabel="rank r", ylabel="test loss (nats / char), mean and 95% interval",
           title="each rule at its own tuned lr")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
