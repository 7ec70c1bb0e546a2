"""Intrinsic dimension of a small network (Li et al. 2018's MNIST-FC analogue), and whether it depends on width.

Task (built here with NumPy from DATA_SEED; nothing downloaded): 10 classes, each a mixture of MODES Gaussian
clusters in R^INPUTS (centres N(0, I), points centre + NOISE N(0, I)), classes equally likely. Chance is 10%,
and the clusters are separated enough that a small MLP gets most points right, so 90% of full training's
accuracy lies far above chance (the summary prints both). Declared split: TRAIN_SIZE points to train on,
DEV_SIZE to choose learning rates, TEST_SIZE to report (independent draws of the same task; ``fast`` uses the
first FAST_SIZE of each).

Model: x -> H GELU units -> 10 logits (minilora.functional's linear/gelu pairs, softmax cross-entropy),
D = INPUTS H + H + 10 H + 10, at two widths (WIDTHS). Training: full-batch AdamW, no weight decay, cosine
decay to 0, STEPS steps, from the seeded initialisation theta_0.

- full: all D parameters trained;
- subspace: theta = theta_0 + P theta_d with a Fastfood P (intrinsic.SubspaceModel, DID), only theta_d trained,
  for d on a log grid (DS).

Protocol. The learning rate of every configuration (full, and the subspace at each d, at each width) is chosen
on dev accuracy with the selection seed 0 (protocol.tune through common.select_and_report, starting from
common.lr_grid around FULL_LR and SUBSPACE_LR, extended until interior; equal dev accuracies go to the
smaller rate). Each reporting seed (1, 2, 3; fast:
1, 2) then trains at that rate from its own theta_0 (and its own P) and is scored once on test.
d90 of one seed = the smallest d of the grid whose test accuracy reaches 90% of the same seed's full-training
test accuracy (Li et al.'s rule, on accuracy itself, not on the gain over chance); it is known to the grid
step. Reported: d90's mean and 95% interval over the reporting seeds, per width.

Claims tested (findings): d90 is a small fraction of D (verdict_above against 10% of D); d90 does not depend
on the width (verdict between the two widths' intervals: "not distinguishable" agrees with the paper).

Cost: default (2 widths x (full + 8 values of d), each tuned over 5+ rates and run on 3 seeds; 300 steps on
1,000 training points): a few minutes on 2 CPU cores. ``fast=True``: 500 points of each split, 100 steps,
d = 10, 100, 1000, 3-rate grids with at most one extension, 2 seeds: seconds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core import functional as F
from ..core.intrinsic import SubspaceModel
from ..core.nn import Module, Parameter
from ..core.optim import AdamW
from ..fast.parallel import blas_threads
from . import common, protocol

STUDY = "intrinsic-mlp"
CLASSES, MODES, INPUTS, NOISE = 10, 3, 20, 0.7
DATA_SEED = 2018
TRAIN_SIZE, DEV_SIZE, TEST_SIZE, FAST_SIZE = 1000, 1000, 2000, 500
WIDTHS = (32, 128)
STEPS, FAST_STEPS = 300, 100
DS = (10, 20, 50, 100, 200, 300, 500, 1000)
FAST_DS = (10, 100, 1000)
FULL_LR, SUBSPACE_LR = 1e-2, 1e-1          # centres of the first learning-rate grids (common.lr_grid)
FRACTION = 0.9
SMALL_FRACTION_OF_D = 0.1                  # "a small fraction of D": the threshold of the first claim
PAPER_MNIST = "MNIST FC: d90 = 750 of D = 199,210 (0.4%)"


# ----------------------------------------------------------------------------------------------------
# the task and its declared split


@dataclass
class Task:
    """The synthetic classification task: train / dev / test points (x: (N, INPUTS), y: (N,) ints)."""

    x: dict
    y: dict

    def declaration(self) -> dict:
        return {"task": f"{CLASSES} classes, each {MODES} Gaussian clusters in R^{INPUTS} (centres N(0, I), noise "
                        f"{NOISE} N(0, I)), drawn with seed {DATA_SEED}",
                "train_points": len(self.y["train"]), "dev_points": len(self.y["dev"]),
                "test_points": len(self.y["test"]), "dev": "learning rates (selection seed 0)",
                "test": "reported accuracies and d90 (reporting seeds)"}


def make_task(fast: bool) -> Task:
    """The task's three splits: independent draws from DATA_SEED (the fast task is a prefix of each)."""
    rng = numpy.random.default_rng(DATA_SEED)
    centres = rng.standard_normal((CLASSES, MODES, INPUTS))

    def draw(n):
        y = rng.integers(0, CLASSES, size=n)
        mode = rng.integers(0, MODES, size=n)
        return centres[y, mode] + NOISE * rng.standard_normal((n, INPUTS)), y

    sizes = {"train": TRAIN_SIZE, "dev": DEV_SIZE, "test": TEST_SIZE}
    x, y = {}, {}
    for part, n in sizes.items():
        x[part], y[part] = draw(n)
        if fast:
            x[part], y[part] = x[part][:FAST_SIZE], y[part][:FAST_SIZE]
    return Task(x, y)


def held_out(task: Task, part: str):
    """(x, y) of "dev" or "test": the only way a run reads held-out points."""
    if part not in common.PARTS:
        raise ValueError(f"part must be one of {common.PARTS}; got {part!r}")
    return task.x[part], task.y[part]


# ----------------------------------------------------------------------------------------------------
# the network


class MLP(Module):
    """logits = gelu(x W1 + b1) W2 + b2; x: (N, INPUTS) floats -> (N, CLASSES)."""

    def __init__(self, hidden: int, seed: int = 0, inputs: int = INPUTS, classes: int = CLASSES):
        rng = numpy.random.default_rng(seed)
        self.w1 = Parameter(rng.standard_normal((inputs, hidden)) / math.sqrt(inputs), decay=True)
        self.b1 = Parameter(numpy.zeros(hidden))
        self.w2 = Parameter(rng.standard_normal((hidden, classes)) / math.sqrt(hidden), decay=True)
        self.b2 = Parameter(numpy.zeros(classes))

    def forward(self, x):
        h, c1 = F.linear_forward(x, self.w1.data, self.b1.data)          # (N, H)
        a, cg = F.gelu_forward(h)                                         # (N, H)
        logits, c2 = F.linear_forward(a, self.w2.data, self.b2.data)      # (N, CLASSES)
        self._cache = (c1, cg, c2)
        return logits

    def backward(self, dlogits):
        c1, cg, c2 = self._pop_cache()
        da, dw2, db2 = F.linear_backward(dlogits, c2)                     # fwd: logits = a W2 + b2
        _, dw1, db1 = F.linear_backward(F.gelu_backward(da, cg), c1)      # fwd: a = gelu(x W1 + b1)
        for p, g in ((self.w1, dw1), (self.b1, db1), (self.w2, dw2), (self.b2, db2)):
            p.accumulate_grad(g)
        return None


def parameters_of(hidden: int) -> int:
    """D of the MLP at a width."""
    return INPUTS * hidden + hidden + hidden * CLASSES + CLASSES


def accuracy(model, x, y) -> float:
    correct = float((model.forward(x).argmax(axis=1) == y).mean())
    model.__dict__.pop("_cache", None)                                    # scoring needs no backward
    return correct


def train(model, x, y, steps: int, lr: float) -> float:
    """Full-batch AdamW (no weight decay, cosine lr to 0); returns the final training loss."""
    opt = AdamW(model.parameters(trainable_only=True), lr=lr, weight_decay=0.0)
    loss = float("nan")
    for step in range(steps):
        opt.lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        model.zero_grad()
        loss, dlogits = F.softmax_cross_entropy(model.forward(x), y)
        model.backward(dlogits)
        opt.step()
    return loss


def build(hidden: int, d: int | None, seed: int):
    """The network of a run: the MLP from seed (theta_0), wrapped in a Fastfood subspace of dimension d
    (its own P for every seed and d) unless d is None."""
    net = MLP(hidden, seed=seed)
    return net if d is None else SubspaceModel(net, d, projection="fastfood", seed=seed * 10_000 + d)


def one_run(task: Task, hidden: int, d: int | None, steps: int, lr: float, seed: int, part: str) -> float:
    """Train one configuration at lr from seed on the training points; its accuracy on ``part``."""
    model = build(hidden, d, seed)
    train(model, task.x["train"], task.y["train"], steps, lr)
    return accuracy(model, *held_out(task, part))


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class MLPResult:
    widths: list
    D: list                            # per width
    ds: list
    steps: int
    n_train: int
    n_dev: int
    n_test: int
    chance: float                      # test accuracy of always answering the most frequent training class
    init_accuracy: list = field(default_factory=list)    # per width: Interval dict of the test accuracy at theta_0
    full: list = field(default_factory=list)       # per width: {"lr", "interior", "dev_scores", "test": Interval}
    subspace: list = field(default_factory=list)   # per width: [{"d", "lr", "interior", "dev_scores", "test"}] per d
    d90_values: list = field(default_factory=list)     # per width: [d90 per reporting seed, None: not reached]
    d90: list = field(default_factory=list)            # per width: Interval as a dict, or None
    seeds: list = field(default_factory=list)
    seed: int = 0
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def d90_of(ds, accuracies, full_accuracy: float, fraction: float = FRACTION):
    """The smallest d whose accuracy reaches fraction x full_accuracy, or None."""
    return next((d for d, a in zip(ds, accuracies) if a >= fraction * full_accuracy), None)


def describe_d90(values, interval, D: int) -> str:
    if interval is None:
        return f"not reached on every seed: {values}"
    iv = protocol.as_interval(interval)
    return f"{iv.text(0)} ({100 * iv.mean / D:.1f}% of D = {D:,}; per seed {values})"


def findings(result: MLPResult) -> list:
    out = []
    for hidden, D, values, interval in zip(result.widths, result.D, result.d90_values, result.d90):
        threshold = SMALL_FRACTION_OF_D * D
        verdict = ("misses (not reached within the sweep on every seed)" if interval is None
                   else protocol.verdict_above(interval, threshold, lower_is_better=True))
        out.append(protocol.finding(STUDY, f"d90 is a small fraction of D (below {SMALL_FRACTION_OF_D:.0%} of D), "
                                           f"H = {hidden}", PAPER_MNIST, describe_d90(values, interval, D), verdict))
    (h1, h2), (i1, i2) = result.widths[:2], result.d90[:2]
    if i1 is None or i2 is None:
        verdict = "undetermined: d90 not reached within the sweep on every seed"
    else:
        verdict = protocol.verdict(i1, i2, f"H = {h1} (lower d90)", f"H = {h2} (lower d90)", lower_is_better=True)
    ours = "; ".join(f"H = {h} (D = {D:,}): {protocol.as_interval(iv).text(0) if iv is not None else 'not reached'}"
                     for h, D, iv in zip(result.widths, result.D, result.d90))
    out.append(protocol.finding(STUDY, "d90 does not depend on the width", "MNIST FC: d90 about the same across "
                                "widths and depths (Li et al. 2018)", ours, verdict))
    return out


@common.on_the_host
def run(fast: bool = False, seed: int = 0) -> MLPResult:
    task = make_task(fast)
    steps = FAST_STEPS if fast else STEPS
    ds = list(FAST_DS if fast else DS)
    seeds = protocol.report_seeds(fast)
    chance = float((task.y["test"] == numpy.bincount(task.y["train"], minlength=CLASSES).argmax()).mean())
    result = MLPResult(widths=list(WIDTHS), D=[parameters_of(h) for h in WIDTHS], ds=ds, steps=steps,
                       n_train=len(task.y["train"]), n_dev=len(task.y["dev"]), n_test=len(task.y["test"]),
                       chance=chance, seeds=list(seeds), seed=seed)
    report = common.progress_counter(STUDY, fast, len(WIDTHS) * (1 + len(ds)) * len(seeds))
    tunings = {}

    def tuned(hidden, d, centre):
        label = f"H={hidden} " + ("full" if d is None else f"d={d}")
        chosen = common.select_and_report(
            lambda lr, s, part: one_run(task, hidden, d, steps, lr, s, part),
            common.lr_grid(centre, fast), fast, lower_is_better=False, report=report, label=label)
        tunings[label] = chosen.tuning
        return {"d": d, "lr": chosen.tuning.best, "interior": chosen.tuning.interior,
                "dev_scores": {f"{lr:g}": v for lr, v in sorted(chosen.tuning.scores.items())},
                "test": asdict(chosen.test)}

    with blas_threads(1):                      # matrices this small run fastest on one thread
        for hidden in WIDTHS:
            result.init_accuracy.append(asdict(protocol.interval(
                [accuracy(build(hidden, None, s), *held_out(task, "test")) for s in seeds])))
            full = tuned(hidden, None, FULL_LR)
            sub = [tuned(hidden, d, SUBSPACE_LR) for d in ds]
            result.full.append(full)
            result.subspace.append(sub)
            values = [d90_of(ds, [s["test"]["values"][k] for s in sub], full["test"]["values"][k])
                      for k in range(len(seeds))]
            result.d90_values.append(values)
            result.d90.append(asdict(protocol.interval(values)) if None not in values else None)
    result.protocol = protocol.protocol_record(
        None, seeds, tunings,
        selection="every configuration's lr on dev accuracy, selection seed 0, grid extended until interior",
        d90=f"per reporting seed: the smallest d of {ds} with test accuracy >= {FRACTION:g} x that seed's "
            f"full-training test accuracy (known to the grid step); mean and 95% interval over the seeds")
    result.protocol["split"] = task.declaration()
    result.findings = findings(result)
    return result


def summary(result: MLPResult) -> str:
    lines = [f"Intrinsic dimension of an MLP ({INPUTS} -> H GELU -> {CLASSES}) on a synthetic {CLASSES}-class task "
             f"({MODES} Gaussian clusters a class, noise {NOISE})",
             f"protocol: split {result.n_train:,} train / {result.n_dev:,} dev (lr of every configuration, seed 0, "
             f"grid extended until interior) / {result.n_test:,} test (reported, seeds {result.seeds}); tuned lrs "
             f"below; {result.steps} full-batch AdamW steps per run; Fastfood P",
             f"chance (most frequent class) {result.chance:.3f}; d90 = smallest d with test accuracy >= "
             f"{FRACTION:g} x full (per seed)"]
    for i, hidden in enumerate(result.widths):
        full = protocol.as_interval(result.full[i]["test"])
        init = protocol.as_interval(result.init_accuracy[i])
        lines += ["", f"H = {hidden}, D = {result.D[i]:,}: theta_0 {init.text(3)}; 90% of full = "
                      f"{FRACTION * full.mean:.3f} ({FRACTION * full.mean / max(result.chance, 1e-12):.1f} x chance)",
                  f"{'run':>10}{'lr':>8}  {'test accuracy (95% CI)':<26}{'dev accuracy by lr'}",
                  f"{'full':>10}{result.full[i]['lr']:>8g}  {full.text(3):<26}"
                  + ", ".join(f"{lr}: {v:.3f}" for lr, v in result.full[i]["dev_scores"].items())]
        for s in result.subspace[i]:
            iv = protocol.as_interval(s["test"])
            edge = "" if s["interior"] else " (edge)"
            lines.append(f"{'d=' + str(s['d']):>10}{s['lr']:>8g}  {iv.text(3):<26}"
                         + ", ".join(f"{lr}: {v:.3f}" for lr, v in s["dev_scores"].items()) + edge)
        lines.append(f"d90: {describe_d90(result.d90_values[i], result.d90[i], result.D[i])}")
    lines += ["", "findings:"]
    lines += [f"  {f['claim']}: paper {f['paper']}; ours {f['ours']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(lines)


def plot(result: MLPResult, path) -> None:
    """Test accuracy against d per width (mean and 95% interval over the reporting seeds), with full training
    and its 90% line, chance, and each width's d90."""
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(7.5, 4.8))
    for i, hidden in enumerate(result.widths):
        color = f"C{i}"
        tests = [protocol.as_interval(s["test"]) for s in result.subspace[i]]
        ax.errorbar(result.ds, [t.mean for t in tests], yerr=[[t.mean - t.low for t in tests],
                                                                [t.high - t.mean for t in tests]],
                    fmt="o-", color=color, capsize=3, label=f"subspace, H = {hidden} (D = {result.D[i]:,})")
        full = protocol.as_interval(result.full[i]["test"])
        ax.axhspan(full.low, full.high, color=color, alpha=0.15)
        ax.axhline(full.mean, color=color, linewidth=1, label=f"full training, H = {hidden}")
        ax.axhline(FRACTION * full.mean, color=color, linestyle="--", linewidth=1, label=f"90% of full, H = {hidden}")
        if result.d90[i] is not None:
            ax.axvline(protocol.as_interval(result.d90[i]).mean, color=color, linestyle=":",
                       label=f"d90 mean, H = {hidden}")
    ax.axhline(result.chance, color="gray", linestyle=":", label="chance (most frequent class)")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.05)                   # accuracy's range; an interval reaching past it is cut at the edge
    ax.set_title(f"MLP on a {CLASSES}-class task: accuracy against d (95% CI over seeds {result.seeds})")
    ax.legend(fontsize=7)
    save_figure(fig, Path(path))
