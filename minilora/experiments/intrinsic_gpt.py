"""Intrinsic dimension of the tiny GPT on the downstream domain (Aghajanyan, Zettlemoyer and Gupta 2020).

Every trainable number of the model moves along d random directions only (intrinsic.SubspaceModel with a
Fastfood projection, theta = theta_0 + P theta_d; SAID adds one learned scale per tensor), and the study asks
how large d must be to get most of what training all D = 822,016 numbers gets, on python-email
(common.downstream()). Three subspace configurations over a sweep of d on a log scale:

    pretrained DID    the shipped model, theta_d only                          (d trainable numbers)
    pretrained SAID   the shipped model, theta_d + one lambda per tensor        (d + 52 trainable numbers)
    random DID        the same architecture randomly initialised (GPT(config, seed)), theta_d only

Baselines: full fine-tuning of the same starting model with the same steps, batches and seed (common.run_full
for the pretrained model; fit on every parameter of the random one, the same lr 1e-3 schedule).

Convention. performance = the starting model's validation loss - the trained model's (nats per character,
higher is better; fraction = performance / full fine-tuning's performance). d90 = the smallest d whose
performance reaches 90% of full fine-tuning's: found by linear interpolation in log d between the last sweep
point below the threshold and the first at or above it. If the first sweep point already reaches it, d90 is
reported as "<= that d" (nothing to interpolate from); if none reaches it, as "> max d" (None in the result).
Beside it, "LoRA's intrinsic dimension": LoRA on (q_proj, v_proj) at r = 1, 2, 4, 8, 16 (common.run_lora), the
smallest r whose performance reaches the same 90% of (pretrained) full fine-tuning's, and its trainable count
(no interpolation: r is an integer).

Settings (default): d = 10, 100, 1000, 10000 (not 100000: at lr 1e-1 pretrained DID diverges there);
60 steps of 8 windows of 128 characters for every run (the subspace runs cost one full backward plus two
Fastfood transforms per step, more than a full fine-tuning step, so the common 100 steps would not fit in a
few minutes with 12 subspace runs); subspace lr 1e-1 (AdamW, weight decay 0, warmup 10 steps, cosine to
lr / 10, clipping 1.0: the common schedule), chosen against 1 and 1e-2 by a short run at d = 1000, where it
lowered the validation loss most. LoRA and full fine-tuning use the common lrs (1e-2, 1e-3). Validation: the
first 128 windows of python-email's validation text. One seed. ``fast=True``: d = 10, 100, r = 1, 2, 4 steps
of 2 windows, 2 validation windows: seconds.

``summary`` reports what the run shows: its findings lines are computed from the numbers, not asserted; at
this tiny scale and with 60 steps the papers' findings need not hold.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.intrinsic import SubspaceModel
from ..core.model import GPT
from ..io.pretrained import load_pretrained
from ..train import evaluate, fit
from . import common

D_VALUES = (10, 100, 1000, 10000)
FAST_D_VALUES = (10, 100)
RANKS = (1, 2, 4, 8, 16)
FAST_RANKS = (1, 2)
TARGETS = ("q_proj", "v_proj")
STEPS = 60
FAST_STEPS, FAST_BATCH = 4, 2
SUBSPACE_LR = 1e-1
PROJECTION = "fastfood"
FRACTION = 0.9
CONFIGS = {                                   # label -> (starting model, said)
    "pretrained DID": ("pretrained", False),
    "pretrained SAID": ("pretrained", True),
    "random DID": ("random", False),
}


# ----------------------------------------------------------------------------------------------------
# the d90 convention


def threshold_crossing(xs, performances, full_performance: float, fraction: float = FRACTION):
    """Where ``performances`` (one per x, xs increasing) first reach fraction * full_performance.

    Returns (x, how): how = "interpolated" (linear in log x between the last point below and the first at or
    above the threshold), "first point" (the first x already reaches it: the true value is <= x), or
    "> max" with x = None (no point reaches it).
    """
    xs, performances = list(xs), list(performances)
    if len(xs) != len(performances) or not xs:
        raise ValueError(f"need as many performances as xs (>= 1); got {len(xs)} and {len(performances)}")
    if any(b <= a for a, b in zip(xs, xs[1:])) or xs[0] <= 0:
        raise ValueError(f"xs must be positive and increasing; got {xs}")
    target = fraction * full_performance
    for i, (x, perf) in enumerate(zip(xs, performances)):
        if perf >= target:
            if i == 0:
                return float(x), "first point"
            x0, p0 = xs[i - 1], performances[i - 1]            # p0 < target <= perf
            t = (target - p0) / (perf - p0)
            return float(math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))), "interpolated"
    return None, "> max"


def describe_crossing(x, how: str, xs) -> str:
    """The crossing as text: "~1234 (interpolated)", "<= 10 (first point)" or "> 10000"."""
    if x is None:
        return f"> {max(xs)}"
    if how == "first point":
        return f"<= {x:g} (first point)"
    return f"~{x:.0f} (interpolated)"


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class IntrinsicGPTResult:
    """The numbers of the study; losses are validation cross-entropy in nats per character. Every
    {config: [...]} list follows ``ds``; every LoRA list follows ``ranks``."""

    ds: list
    ranks: list
    D: int                                             # trainable numbers of the whole model
    n_tensors: int                                     # parameter tensors (one SAID lambda each)
    subspace_lr: float
    projection: str
    fraction: float
    start_loss: dict = field(default_factory=dict)     # {"pretrained"|"random": untouched model's loss}
    full_loss: dict = field(default_factory=dict)      # {"pretrained"|"random": after full fine-tuning}
    full_performance: dict = field(default_factory=dict)
    subspace_start: dict = field(default_factory=dict)  # {config: [loss of the wrapper before training]}
    subspace_loss: dict = field(default_factory=dict)  # {config: [loss after training]}
    subspace_trainable: dict = field(default_factory=dict)  # {config: [trainable numbers of the wrapper]}
    performance: dict = field(default_factory=dict)    # {config: [start - trained]}
    performance_fraction: dict = field(default_factory=dict)  # {config: [performance / full's]}
    d90: dict = field(default_factory=dict)            # {config: d90 or None (> max d)}
    d90_how: dict = field(default_factory=dict)        # {config: "interpolated" | "first point" | "> max"}
    lora_loss: list = field(default_factory=list)
    lora_trainable: list = field(default_factory=list)
    lora_performance: list = field(default_factory=list)
    lora_r90: int | None = None                        # smallest r reaching the threshold (None: none did)
    lora_trainable90: int | None = None
    seconds: dict = field(default_factory=dict)        # wall seconds of every run, by label
    settings: dict = field(default_factory=dict)       # common.RunSettings as a dict


def _trainable(model) -> int:
    return sum(p.size for p in model.parameters(trainable_only=True))


def _starting_model(kind: str, seed: int):
    """A fresh copy of the shipped model, or the same architecture randomly initialised; dropout 0."""
    pretrained = load_pretrained(dropout=0.0)
    if kind == "pretrained":
        return pretrained
    model = GPT(dataclasses.replace(pretrained.config, dropout=0.0), seed=seed, dtype=pretrained.dtype)
    model.set_dropout(0.0)
    return model


def run(fast: bool = False, seed: int = 0) -> IntrinsicGPTResult:
    """Sweep d for every configuration, the two full fine-tuning baselines and the LoRA ranks."""
    settings = (common.RunSettings.for_mode(True, steps=FAST_STEPS, batch_size=FAST_BATCH) if fast else
                common.RunSettings.for_mode(False, steps=STEPS))
    ds = FAST_D_VALUES if fast else D_VALUES
    ranks = FAST_RANKS if fast else RANKS
    corpus = common.downstream()
    val = lambda model: evaluate(model, corpus.val, batch_size=settings.batch_size,
                                 max_batches=settings.eval_batches)
    probe = load_pretrained(dropout=0.0)
    result = IntrinsicGPTResult(ds=list(ds), ranks=list(ranks), D=_trainable(probe),
                                n_tensors=len(probe.parameters(trainable_only=True)), subspace_lr=SUBSPACE_LR,
                                projection=PROJECTION, fraction=FRACTION, settings=asdict(settings))
    say = lambda text: common.progress("intrinsic-gpt", fast, text)

    # starting points and full fine-tuning baselines
    result.start_loss["pretrained"] = common.pretrained_val_loss(settings)
    result.start_loss["random"] = val(_starting_model("random", seed))
    t0 = time.perf_counter()
    _, full = common.run_full(seed, settings)
    result.full_loss["pretrained"] = full.val_after
    result.seconds["full pretrained"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = _starting_model("random", seed)
    fit(model, corpus.train, None, common.train_config(settings, settings.full_lr, seed))
    result.full_loss["random"] = val(model)
    result.seconds["full random"] = time.perf_counter() - t0
    for kind in ("pretrained", "random"):
        result.full_performance[kind] = result.start_loss[kind] - result.full_loss[kind]
        say(f"full fine-tuning ({kind}): {result.start_loss[kind]:.4f} -> {result.full_loss[kind]:.4f}")

    # the subspace sweeps
    sub_config = dataclasses.replace(common.train_config(settings, SUBSPACE_LR, seed), eval_every=0)
    for label, (kind, said) in CONFIGS.items():
        for key in ("subspace_start", "subspace_loss", "subspace_trainable", "performance", "performance_fraction"):
            getattr(result, key)[label] = []
        for d in ds:
            t0 = time.perf_counter()
            wrapper = SubspaceModel(_starting_model(kind, seed), d, PROJECTION, said=said, seed=seed)
            start = val(wrapper)                  # theta_d = 0: exactly the untouched model
            fit(wrapper, corpus.train, None, sub_config)
            loss = val(wrapper)
            perf = result.start_loss[kind] - loss
            result.subspace_start[label].append(start)
            result.subspace_loss[label].append(loss)
            result.subspace_trainable[label].append(_trainable(wrapper))
            result.performance[label].append(perf)
            result.performance_fraction[label].append(perf / result.full_performance[kind])
            result.seconds[f"{label} d={d}"] = time.perf_counter() - t0
            say(f"{label} d={d}: {start:.4f} -> {loss:.4f} "
                f"({100 * perf / result.full_performance[kind]:.0f}% of full, "
                f"{result.seconds[f'{label} d={d}']:.1f} s)")
        x, how = threshold_crossing(ds, result.performance[label], result.full_performance[kind], FRACTION)
        result.d90[label], result.d90_how[label] = x, how

    # LoRA beside it
    for r in ranks:
        t0 = time.perf_counter()
        model, lora = common.run_lora(TARGETS, r, seed, settings)
        result.lora_loss.append(lora.val_after)
        result.lora_trainable.append(lora.trainable)
        result.lora_performance.append(result.start_loss["pretrained"] - lora.val_after)
        result.seconds[f"LoRA r={r}"] = time.perf_counter() - t0
        say(f"LoRA r={r} ({lora.trainable} numbers): {lora.val_after:.4f}")
    target = FRACTION * result.full_performance["pretrained"]
    reached = [i for i, perf in enumerate(result.lora_performance) if perf >= target]
    if reached:
        result.lora_r90 = result.ranks[reached[0]]
        result.lora_trainable90 = result.lora_trainable[reached[0]]
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def findings(result: IntrinsicGPTResult) -> list:
    """What this run shows (sentences computed from the numbers, not asserted)."""
    def key(label):          # for comparing d90s: None (> max d) counts as infinitely large
        return math.inf if result.d90[label] is None else result.d90[label]

    def d90_text(label):
        return describe_crossing(result.d90[label], result.d90_how[label], result.ds)

    lines = []
    pre, rnd = key("pretrained DID"), key("random DID")
    if pre < rnd:
        verdict = "pretraining lowers d90 (as Aghajanyan et al. found)"
    elif pre > rnd:
        verdict = "pretraining RAISES d90 here (against Aghajanyan et al.)"
    else:
        verdict = "pretraining makes no difference to d90 on this sweep"
    lines.append(f"d90 pretrained DID {d90_text('pretrained DID')} vs random-init DID {d90_text('random DID')}: "
                 f"{verdict}; note each is relative to its own full fine-tuning "
                 f"({result.full_performance['pretrained']:.4f} vs {result.full_performance['random']:.4f} nats)")
    said_better = sum(s >= d for s, d in zip(result.performance["pretrained SAID"], result.performance["pretrained DID"]))
    lines.append(f"SAID vs DID (pretrained): d90 {d90_text('pretrained SAID')} vs {d90_text('pretrained DID')}; "
                 f"SAID at least as good at {said_better} of {len(result.ds)} values of d")
    best = max(range(len(result.ds)), key=lambda i: result.performance["pretrained DID"][i])
    lines.append(f"largest d: pretrained DID reaches {100 * result.performance_fraction['pretrained DID'][-1]:.0f}%, "
                 f"random DID {100 * result.performance_fraction['random DID'][-1]:.0f}% of full fine-tuning "
                 f"(best pretrained DID at d={result.ds[best]})")
    if result.lora_r90 is None:
        lines.append(f"LoRA: no r in {result.ranks} reaches {100 * result.fraction:.0f}% of full fine-tuning")
    else:
        lines.append(f"LoRA reaches {100 * result.fraction:.0f}% of full fine-tuning at r={result.lora_r90} "
                     f"({result.lora_trainable90} trainable numbers) vs pretrained DID d90 "
                     f"{d90_text('pretrained DID')}, SAID {d90_text('pretrained SAID')}")
    return lines


def summary(result: IntrinsicGPTResult) -> str:
    s = result.settings
    rows = [f"Intrinsic dimension of the tiny GPT on python-email: {s['steps']} steps of {s['batch_size']} windows, "
            f"{result.projection} projection, D = {result.D:,}, subspace lr {result.subspace_lr:g}, "
            f"full FT lr {s['full_lr']:g}, LoRA lr {s['lora_lr']:g}; validation loss (nats/char)",
            "performance = starting loss - trained loss; d90 = smallest d reaching "
            f"{100 * result.fraction:.0f}% of full fine-tuning's performance (interpolated in log d; "
            "'<= d' if the first d already reaches it, '> max d' if none does)", ""]
    for kind in ("pretrained", "random"):
        rows.append(f"{kind:>10}: start {result.start_loss[kind]:.4f}, full FT {result.full_loss[kind]:.4f} "
                    f"(performance {result.full_performance[kind]:.4f}; 90% threshold loss "
                    f"{result.start_loss[kind] - result.fraction * result.full_performance[kind]:.4f})")
    rows.append("")
    labels = list(CONFIGS)
    rows.append(f"{'d':>7} | " + " | ".join(f"{label:>22}" for label in labels))
    for i, d in enumerate(result.ds):
        rows.append(f"{d:>7} | " + " | ".join(
            f"{result.subspace_loss[label][i]:>8.4f} {result.performance[label][i]:>+7.4f} "
            f"{100 * result.performance_fraction[label][i]:>4.0f}%" for label in labels))
    rows.append(f"{'d90':>7} | " + " | ".join(
        f"{describe_crossing(result.d90[label], result.d90_how[label], result.ds):>22}" for label in labels))
    rows.append("(each cell: loss after training, performance, fraction of full fine-tuning's)")
    rows.append("")
    rows.append(f"LoRA on {', '.join(TARGETS)} (pretrained): " + ", ".join(
        f"r={r} ({n}): {loss:.4f} {100 * perf / result.full_performance['pretrained']:.0f}%"
        for r, n, loss, perf in zip(result.ranks, result.lora_trainable, result.lora_loss, result.lora_performance)))
    rows.append("")
    rows += findings(result)
    return "\n".join(rows)


def plot(result: IntrinsicGPTResult, path) -> None:
    """Left: validation loss against d (log) per configuration, full fine-tuning and 90%-threshold lines, LoRA at
    its parameter counts. Right: the same as fractions of full fine-tuning's performance."""
    from ..plots import new_figure, save_figure

    fig, (left, right) = new_figure(1, 2, figsize=(12, 4.5))
    colours = {"pretrained DID": "C0", "pretrained SAID": "C2", "random DID": "C3"}
    kind_colour = {"pretrained": "C0", "random": "C3"}
    for label, (kind, _) in CONFIGS.items():
        left.plot(result.ds, result.subspace_loss[label], marker="o", color=colours[label], label=label)
        right.plot(result.ds, result.performance_fraction[label], marker="o", color=colours[label], label=label)
    for kind, colour in kind_colour.items():
        left.axhline(result.full_loss[kind], color=colour, linestyle="--", linewidth=1, label=f"full FT ({kind})")
        left.axhline(result.start_loss[kind] - result.fraction * result.full_performance[kind], color=colour,
                     linestyle=":", linewidth=1, label=f"90% of full FT ({kind})")
    lora_fraction = [p / result.full_performance["pretrained"] for p in result.lora_performance]
    left.plot(result.lora_trainable, result.lora_loss, marker="s", linestyle="-", color="C1",
              label="LoRA q,v (pretrained), x = trainable")
    right.plot(result.lora_trainable, lora_fraction, marker="s", linestyle="-", color="C1", label="LoRA q,v (pretrained)")
    for r, x, y in zip(result.ranks, result.lora_trainable, result.lora_loss):
        left.annotate(f"r={r}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="full FT")
    right.axhline(result.fraction, color="grey", linestyle=":", linewidth=1, label="90%")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("d (subspace) / trainable numbers (LoRA)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("validation loss (nats / char)")
    right.set_ylabel("performance / full fine-tuning's")
    left.set_title(f"random-subspace training, {result.settings['steps']} steps")
    right.set_title("fraction of full fine-tuning's improvement")
    save_figure(fig, Path(path))
