"""LoRA+ (Hayou et al. 2024): does giving B a larger learning rate than A, eta_B = lambda * eta_A, speed LoRA up?

LoRA's update s B A starts with B = 0. The paper's analysis as the width grows: with one rate for both, the
largest rate that keeps training stable is too small for B to learn its part efficiently; lambda > 1 fixes it,
and the paper reports faster fine-tuning (up to about 2x) and a little better final scores at the same cost,
recommending lambda = 2^4 = 16. Here it is trained through the optimizer's two parameter groups
(core/loraplus.py): A and everything else at the scheduled rate eta_A, lora_B at lambda times it.

The study: LoRA r = 4 (alpha = 8) on (q_proj, v_proj) of the shipped tiny GPT, python-email's declared split
(common.split: train on train, select on dev, report on test), for lambda in RATIOS, a short fixed budget of
STEPS steps of 8 windows (warmup 10, cosine decay to a tenth):

  1. For each lambda, eta_A is tuned on dev with the selection seed (protocol.tune on the 1-3-10 series, a grid
     of three rates extended until the best is interior; the first grid is centred on common.RunSettings.
     lora_lr for lambda = 1 and on the rate chosen for the previous lambda after that, which only saves runs:
     every lambda is extended until its own best is interior), then one run per reporting seed at that rate,
     scored on test, with the test loss every CURVE_EVAL_EVERY steps: the learning curves.
  2. Convergence speed, two declared measures:
       - the test loss after the budget (each lambda at its own tuned eta_A);
       - steps to target: the first step (linear interpolation between curve points) at which a run's test loss
         reaches TARGET, the pretrained loss minus TARGET_FRACTION of the improvement that plain LoRA
         (lambda = 1) reaches on test at the end of the budget (mean over the reporting seeds). "Not reached"
         when a run's curve never gets there.
  3. Findings, verdicts from the 95% intervals (protocol.verdict: "better" only when they do not overlap):
     lambda = 16 against lambda = 1 on both measures, and the lambda chosen on dev (the best dev score over
     every lambda and rate) against lambda = 1 on test.

Scores are test cross-entropy in nats per character on the first eval_batches x batch_size windows of the test
half (16 x 8 = 128 windows), the same windows at every point of every curve.

Cost (default): 6 values of lambda x (3 to 5 dev runs + 3 test runs) of 40 steps: about 40 runs, under ten
minutes on 2 CPU cores. ``fast=True``: lambda = 1 and 16, 6 steps of 4 windows, 2 reporting seeds: seconds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..io.pretrained import load_pretrained
from . import common, protocol

STUDY = "lora-plus"
RATIOS = (1, 2, 4, 8, 16, 32)
FAST_RATIOS = (1, 16)
COMPARED = (16, 1)                    # the paper's recommended lambda against plain LoRA
STEPS = 40
CURVE_EVAL_EVERY = 5
FAST_CURVE_EVAL_EVERY = 2
R, ALPHA = 4, 8.0
TARGETS = ("q_proj", "v_proj")
TARGET_FRACTION = 0.5
PAPER = "LoRA+ (lambda = 16) fine-tunes faster (up to ~2x) and a little better than LoRA at the same cost"


@dataclass
class LoraPlusResult:
    ratios: list
    r: int
    alpha: float
    targets: list
    settings: dict = field(default_factory=dict)           # the dev (tuning) runs
    curve_settings: dict = field(default_factory=dict)     # the test runs: the same, with curve points
    pretrained_loss: float = 0.0                           # test loss of the untouched model (step 0 of a curve)
    tuned: list = field(default_factory=list)              # per lambda: {"ratio", "lr", "lr_B", "interior",
                                                           # "dev_scores", "test" (Interval dict), "losses",
                                                           # "curves" (per seed), "steps_to_target" (per seed),
                                                           # "steps_interval" (Interval dict or None)}
    target_loss: float = 0.0
    target_fraction: float = TARGET_FRACTION
    dev_choice: dict = field(default_factory=dict)          # {"ratio", "lr", "dev"}: the best dev score of all
    findings: list = field(default_factory=list)
    protocol: dict = field(default_factory=dict)


def steps_to(curve, target: float):
    """The first step at which a curve [[step, loss], ...] reaches ``target`` (loss <= target), interpolated
    linearly between the two curve points around the crossing; None if it never does."""
    for k, (step, loss) in enumerate(curve):
        if loss <= target:
            if k == 0:
                return float(step)
            s0, l0 = curve[k - 1]
            return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
    return None


def _interval_or_none(values):
    return asdict(protocol.interval(values)) if all(v is not None for v in values) else None


def run(fast: bool = False, seed: int = 0) -> LoraPlusResult:
    """Tune eta_A for every lambda, report on test with learning curves, measure steps to target (see the module
    docstring). ``seed`` is accepted for the CLI; the protocol fixes the seeds (selection 0, reporting
    protocol.report_seeds)."""
    settings = common.RunSettings.for_mode(fast) if fast else common.RunSettings(steps=STEPS)
    curve_settings = dataclasses.replace(settings, eval_every=FAST_CURVE_EVAL_EVERY if fast else CURVE_EVAL_EVERY)
    ratios = FAST_RATIOS if fast else RATIOS
    seeds = protocol.report_seeds(fast)
    base = load_pretrained(dropout=0.0).config
    trainable = common.attention_lora_parameters(R, TARGETS, base.n_layer, base.n_embd)
    report = common.progress_counter(STUDY, fast, len(ratios) * len(seeds))
    result = LoraPlusResult(ratios=list(ratios), r=R, alpha=ALPHA, targets=list(TARGETS), settings=asdict(settings),
                            curve_settings=asdict(curve_settings),
                            pretrained_loss=common.pretrained_val_loss(curve_settings, "test"))
    tunings = {}
    centre = settings.lora_lr
    for ratio in ratios:
        def one(lr, s, part, ratio=ratio):
            model, finetune_run = common.run_lora(TARGETS, R, s, curve_settings if part == "test" else settings,
                                                  ALPHA, lr=lr, part=part, loraplus_ratio=float(ratio))
            if finetune_run.trainable != trainable:
                raise AssertionError(f"LoRA+ lambda={ratio} trains {finetune_run.trainable} numbers, expected "
                                     f"{trainable}")
            curve = [[int(step), float(v)] for step, v in finetune_run.val_curve]
            return finetune_run.val_after, curve

        i = protocol.LR_SERIES.index(centre)
        grid = protocol.LR_SERIES[max(0, i - 1):i + 2]
        chosen = common.select_and_report(one, grid, fast, report=report, label=f"LoRA+ lambda={ratio}")
        centre = chosen.tuning.best
        tunings[f"lambda={ratio}"] = chosen.tuning
        result.tuned.append({"ratio": ratio, "lr": chosen.tuning.best, "lr_B": chosen.tuning.best * ratio,
                             "interior": chosen.tuning.interior,
                             "dev_scores": {f"{lr:g}": v for lr, v in sorted(chosen.tuning.scores.items())},
                             "test": asdict(chosen.test), "losses": chosen.test.values, "curves": chosen.payloads})

    # steps to target: half of plain LoRA's improvement on test at the end of the budget
    plain = result.tuned[list(ratios).index(1)]
    result.target_loss = result.pretrained_loss - TARGET_FRACTION * (result.pretrained_loss - plain["test"]["mean"])
    for tuned in result.tuned:
        tuned["steps_to_target"] = [steps_to(curve, result.target_loss) for curve in tuned["curves"]]
        tuned["steps_interval"] = _interval_or_none(tuned["steps_to_target"])
    best = min(((t["ratio"], float(lr), v) for t in result.tuned for lr, v in t["dev_scores"].items()),
               key=lambda x: x[2])
    result.dev_choice = {"ratio": best[0], "lr": best[1], "dev": best[2]}
    result.protocol = protocol.protocol_record(
        common.split(), seeds, tunings, r=R, alpha=ALPHA, targets=list(TARGETS),
        tuned_runs="each lambda: eta_A tuned on dev (seed 0) after the fixed budget, one test run per reporting seed",
        convergence=f"test loss after {settings.steps} steps; steps to reach the target loss (pretrained minus "
                    f"{TARGET_FRACTION:g} of lambda=1's mean improvement on test), test loss every "
                    f"{curve_settings.eval_every} steps, linear interpolation between points")
    result.findings = findings_of(result)
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def _tuned(result: LoraPlusResult, ratio) -> dict:
    return next(t for t in result.tuned if t["ratio"] == ratio)


def _steps_text(tuned: dict) -> str:
    if tuned["steps_interval"] is None:
        reached = sum(s is not None for s in tuned["steps_to_target"])
        return f"reached by {reached} of {len(tuned['steps_to_target'])} seeds"
    return protocol.as_interval(tuned["steps_interval"]).text(1)


def findings_of(result: LoraPlusResult) -> list:
    """The claims this study tests (protocol.finding dicts), each verdict from the 95% intervals."""
    out = []
    fast_ratio, slow_ratio = COMPARED
    if fast_ratio not in result.ratios or slow_ratio not in result.ratios:
        return out
    lp, plain = _tuned(result, fast_ratio), _tuned(result, slow_ratio)
    names = (f"lambda={fast_ratio}", f"lambda={slow_ratio}")
    steps = result.settings["steps"]
    out.append(protocol.finding(
        STUDY, f"LoRA+ lambda={fast_ratio} vs LoRA (lambda=1), each at its own eta_A tuned on dev: test loss after "
               f"{steps} steps (nats/char)", PAPER,
        f"lambda={fast_ratio} {protocol.as_interval(lp['test']).text()} (eta_A {lp['lr']:g}) vs lambda=1 "
        f"{protocol.as_interval(plain['test']).text()} (eta_A {plain['lr']:g})",
        protocol.verdict(lp["test"], plain["test"], *names, lower_is_better=True)))
    if lp["steps_interval"] is None or plain["steps_interval"] is None:
        steps_verdict = "not measurable: the target was not reached by every seed"
    else:
        steps_verdict = protocol.verdict(lp["steps_interval"], plain["steps_interval"], *names, lower_is_better=True)
    out.append(protocol.finding(
        STUDY, f"LoRA+ lambda={fast_ratio} vs LoRA: steps to reach the target test loss {result.target_loss:.4f} "
               f"(half of LoRA's improvement in {steps} steps)", PAPER,
        f"lambda={fast_ratio} {_steps_text(lp)} vs lambda=1 {_steps_text(plain)}", steps_verdict))
    chosen = _tuned(result, result.dev_choice["ratio"])
    if chosen["ratio"] == 1:
        chosen_verdict = "lambda = 1 chosen on dev: LoRA+ not preferred"
    else:
        chosen_verdict = protocol.verdict(chosen["test"], plain["test"], f"lambda={chosen['ratio']}", "lambda=1",
                                          lower_is_better=True)
    out.append(protocol.finding(
        STUDY, f"the lambda chosen on dev (best dev loss over every lambda and eta_A) vs LoRA: test loss after "
               f"{steps} steps", PAPER,
        f"lambda={chosen['ratio']} {protocol.as_interval(chosen['test']).text()} vs lambda=1 "
        f"{protocol.as_interval(plain['test']).text()}", chosen_verdict))
    return out


def summary(result: LoraPlusResult) -> str:
    s, c = result.settings, result.curve_settings
    seeds = result.protocol.get("report_seeds", [])
    split = result.protocol.get("split", {})
    rows = [f"LoRA+ against LoRA: r = {result.r}, alpha = {result.alpha:g} on {', '.join(result.targets)}, "
            f"{s['steps']} steps of {s['batch_size']} windows; test loss (nats/char), pretrained "
            f"{result.pretrained_loss:.4f}",
            f"protocol: train on {split.get('corpus', '?')} train, eta_A chosen on dev for every lambda (seed "
            f"{result.protocol.get('selection_seed', 0)}), reported on test over seeds {seeds} (mean [95% CI])",
            f"target loss {result.target_loss:.4f} (pretrained minus {result.target_fraction:g} of lambda=1's "
            f"improvement); test loss every {c['eval_every']} steps", "",
            f"{'lambda':>6} | {'eta_A':>7} {'eta_B':>7} | {'test loss after budget':>26} | {'steps to target':>22}"]
    for t in result.tuned:
        rows.append(f"{t['ratio']:>6g} | {t['lr']:>7g} {t['lr_B']:>7g}{'' if t['interior'] else '*'} | "
                    f"{protocol.as_interval(t['test']).text():>26} | {_steps_text(t):>22}")
    if not all(t["interior"] for t in result.tuned):
        rows.append("* eta_A at the edge of the rates tried (not interior)")
    rows.append(f"chosen on dev: lambda = {result.dev_choice['ratio']:g} at eta_A {result.dev_choice['lr']:g} "
                f"(dev {result.dev_choice['dev']:.4f})")
    rows += ["", "findings:"]
    rows += [f"  - {f['claim']}: ours {f['ours']}; paper {f['paper']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(rows)


def plot(result: LoraPlusResult, path) -> None:
    """Left: test loss against step for every lambda at its tuned eta_A (mean over seeds, 95% band) and the
    target; middle: test loss after the budget against lambda; right: steps to target against lambda."""
    import matplotlib

    from ..plots import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(16, 4.6))
    colours = matplotlib.colormaps["viridis"](numpy.linspace(0.0, 0.85, len(result.tuned)))
    ax = axes[0]
    for colour, t in zip(colours, result.tuned):
        steps, mean, low, high = protocol.mean_curve(t["curves"])
        ax.plot(steps, mean, marker="o", markersize=2.5, color=colour, label=f"lambda = {t['ratio']:g} "
                                                                            f"(eta_A {t['lr']:g})")
        ax.fill_between(steps, low, high, color=colour, alpha=0.2)
    ax.axhline(result.pretrained_loss, color="grey", linestyle=":", linewidth=1, label="pretrained")
    ax.axhline(result.target_loss, color="black", linestyle="--", linewidth=1, label="target")
    ax.set(xlabel="step", ylabel="test loss (nats / char), mean and 95% interval",
           title="learning curves, each lambda at its tuned eta_A")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    x = numpy.array([t["ratio"] for t in result.tuned], dtype=float)
    tests = [protocol.as_interval(t["test"]) for t in result.tuned]
    mean = numpy.array([t.mean for t in tests])
    axes[1].errorbar(x, mean, yerr=[mean - [t.low for t in tests], [t.high for t in tests] - mean], marker="o",
                     capsize=3)
    axes[1].set(xlabel="lambda = eta_B / eta_A", ylabel="test loss after the budget (nats / char)",
                title=f"after {result.settings['steps']} steps")
    reached = [(r, protocol.as_interval(t["steps_interval"])) for r, t in zip(x, result.tuned)
               if t["steps_interval"] is not None]
    if reached:
        xs = numpy.array([r for r, _ in reached])
        means = numpy.array([i.mean for _, i in reached])
        axes[2].errorbar(xs, means, yerr=[means - [i.low for _, i in reached], [i.high for _, i in reached] - means],
                         marker="o", capsize=3)
    axes[2].set(xlabel="lambda = eta_B / eta_A", ylabel="steps to the target test loss",
                title=f"steps to {result.target_loss:.3f} (every seed reaching it)")
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{r:g}" for r in x])
        ax.grid(alpha=0.3)
    save_figure(fig, Path(path))
