"""Intrinsic dimension of the tiny GPT on the downstream domain, along its pretraining (Li et al. 2018;
Aghajanyan, Zettlemoyer and Gupta 2020).

Subspace training: every trainable number of a model moves along random directions only (intrinsic.SubspaceModel,
Fastfood projection), d trainable numbers in total: DID trains theta_d (theta = theta_0 + P theta_d); SAID trains
d - m subspace coordinates and one scale per parameter tensor (m of them). The study asks how large d must be to
get 90% of what training all D numbers gets, on python-email (common.split()), and how that changes as
pretraining proceeds.

The metric and d90. A run is scored by its test loss L (nats per character); the score is
``ln V - L`` (V = 96 characters): the nats per character a model saves over guessing uniformly, 0 for a model
that knows nothing (where a random initialisation starts) and higher is better, like the accuracy Li et al. and
Aghajanyan et al. use. The reference ln V is the same for every model, so "90% of full fine-tuning" is an
absolute target per model: d90 of a starting model = the smallest d whose trained score reaches
0.9 x the score of full fine-tuning of that same model, i.e. a test loss at most L_full + 0.1 (ln V - L_full).
It does not depend on where the model started (the convention of measuring each model's improvement over its
own starting loss is not used). d100 (Li et al.'s d_int100) is the same with 1.0: reaching full fine-tuning.
For each reporting seed s, full fine-tuning with seed s sets the target and the DID sweep with seed s (its own
random projection and batches) is read against it: the first d whose score reaches the target, interpolated
linearly in log d between the sweep points around the crossing; "<= the first d" when the first point already
reaches it, 0 when the untrained model does, "> the largest d" when no point does. The d90 interval is the 95%
Student-t interval of log10 d90 over the seeds (a geometric mean); when a seed's d90 is censored (<= first,
> largest) the interval is the range the seeds allow instead (from the smallest lower bound to the largest upper
bound, possibly unbounded), which is what the verdicts then compare.

The pretraining series (pretraining_series.py). The shipped model's recipe (``minilora pretrain`` defaults) is
replayed once and its weights kept at SERIES_STEPS, from the random initialisation (step 0) to the end; the
last one is checked against the shipped model (pretraining_series: the same weights to float32 rounding, or
else a replay of the recipe that ends at the shipped model's validation loss; the study refuses anything else
and prints both differences). The checkpoints are cached under ``cache_dir`` (default CACHE_DIR) keyed by the recipe, so
the replay happens once; later runs read them back. At every checkpoint: full fine-tuning and a DID sweep over
D_VALUES. On the last checkpoint (the shipped model): SAID at SAID_D_VALUES beside DID at the same d, and LoRA
on (q_proj, v_proj) at RANKS (alpha = 2 r).

Training to convergence (CONVERGENCE): batches of 8 windows of 128 characters, AdamW without weight decay,
linear warmup then a constant rate (so that stopping does not depend on a schedule's length), clipping 1.0.
Every ``check_every`` steps the dev loss on the first ``check_windows`` dev windows is measured; a run has
converged when it has not improved by more than ``tolerance`` nats for ``patience`` checks in a row, and stops;
otherwise it stops at its step cap (``full_cap`` for full fine-tuning and LoRA, ``subspace_cap`` for DID and
SAID). The model then goes back to the weights of its best dev check (a run that diverges does too), and is
scored once on the first ``score_windows`` windows of dev (selection) or test (reporting). Every reported run
records its dev curve, the step it stopped at and whether it converged or hit the cap.

Protocol (protocol.py). Learning rates are tuned on dev with the selection seed 0 (common.select_and_report:
protocol.tune over three rates of the 1-3-10 series, extended until the best is interior), then every reporting
seed (1, 2, 3) runs at the chosen rate and is scored on test. Full fine-tuning is tuned at every checkpoint;
LoRA at every rank. DID is tuned at every checkpoint at d = D_REF, and SAID at D_REF on the shipped model; at
the other values of d the subspace rate is scaled by sqrt(k_ref / k) (k = the subspace coordinates, d for DID
and d - m for SAID): AdamW moves each coordinate by about lr per step and P has unit-length columns, so the
weights move by about lr sqrt(k), and the scaling keeps that step the same at every d, where one rate for all
d would diverge at large d or crawl at small d. Verdicts come from the intervals (protocol.verdict).

Plan (default), sized to the 2-core machine the study targets (the caps, not convergence, will end most runs
there; every run records which). Checkpoints SERIES_STEPS (3). Per checkpoint: full fine-tuning, 3 tuning runs
(one more per grid extension) + 3 reporting runs of at most full_cap steps; DID, 3 tuning runs at D_REF + 3
reporting runs at each of the 4 values of d, of at most subspace_cap steps. On the shipped model: SAID, 3 tuning
runs + 3 reporting runs at each of its 2 values of d; LoRA, 3 tuning + 3 reporting runs at each of its 2 ranks.
About 90 runs in all, most of the time in the subspace runs (a Fastfood projection of all D numbers forward
and back at every step costs several full fine-tuning steps). The pretraining replay (1800 steps of 32
windows) is a separate one-off step: the first run does it when the cache is empty (or build the cache alone:
``python -m minilora.experiments.intrinsic_gpt [CACHE_DIR]``); later runs read the checkpoints back. ``fast``:
a 2-step pretraining of the same recipe (no check against the shipped model), checkpoints 0 and 2, d = 100 and
1000, SAID at 1000, LoRA r = 1, two rates tried (centre and 3 x centre, no extension), reporting seeds
(1, 2), runs of 2 steps of 2 windows scored on 2 windows: seconds in all.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.intrinsic import SubspaceModel
from ..core.lora import LoRAConfig, apply_lora
from ..train import TrainConfig, evaluate, fit
from . import common, protocol
from .pretraining_series import Recipe, build_series

STUDY = "intrinsic-gpt"
CACHE_DIR = Path("runs") / "experiments" / STUDY / "cache"
PROJECTION = "fastfood"
FRACTION = 0.9
TARGETS = ("q_proj", "v_proj")

SERIES_STEPS = (0, 300, 1800)
FAST_PRETRAIN_STEPS = 2
FAST_SERIES_STEPS = (0, FAST_PRETRAIN_STEPS)
D_VALUES = (100, 1000, 10000, 100000)
FAST_D_VALUES = (100, 1000)
D_REF = 1000                                 # where the subspace learning rate is tuned (in both sweeps)
SAID_D_VALUES = (1000, 10000)
FAST_SAID_D_VALUES = (1000,)
RANKS = (1, 8)
FAST_RANKS = (1,)
LR_CENTRES = {"full": 1e-3, "subspace": 3e-2, "lora": 1e-2}   # the middle of each three-rate starting grid


@dataclass(frozen=True)
class Convergence:
    """How every run is trained and scored (see the module docstring)."""

    batch_size: int = 8
    warmup_steps: int = 10
    check_every: int = 20
    check_windows: int = 32
    tolerance: float = 0.01
    patience: int = 2
    full_cap: int = 120
    subspace_cap: int = 40
    score_windows: int = 128
    eval_batch: int = 32


CONVERGENCE = Convergence()
FAST_CONVERGENCE = Convergence(batch_size=2, warmup_steps=1, check_every=2, check_windows=2, patience=1,
                               full_cap=2, subspace_cap=2, score_windows=2, eval_batch=2)


# ----------------------------------------------------------------------------------------------------
# the d90 convention


def threshold_crossing(xs, scores, target: float, start: float | None = None):
    """Where ``scores`` (one per x, xs increasing) first reach ``target`` (higher is better).

    Returns (x, how): how = "untrained" (x = 0: ``start``, the untrained model's score, already reaches it),
    "interpolated" (linear in log x between the last point below and the first at or above the target),
    "first point" (the first x already reaches it: the true value is <= x) or "above max" (x = None).
    """
    xs, scores = list(xs), list(scores)
    if len(xs) != len(scores) or not xs:
        raise ValueError(f"need as many scores as xs (>= 1); got {len(xs)} and {len(scores)}")
    if any(b <= a for a, b in zip(xs, xs[1:])) or xs[0] <= 0:
        raise ValueError(f"xs must be positive and increasing; got {xs}")
    if start is not None and start >= target:
        return 0.0, "untrained"
    for i, (x, score) in enumerate(zip(xs, scores)):
        if score >= target:
            if i == 0:
                return float(x), "first point"
            x0, s0 = xs[i - 1], scores[i - 1]                    # s0 < target <= score
            t = (target - s0) / (score - s0)
            return float(math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))), "interpolated"
    return None, "above max"


def crossing_bounds(x, how: str) -> tuple:
    """(low, high) of the true crossing given a threshold_crossing result (high = inf when unbounded)."""
    if how == "untrained":
        return 0.0, 0.0
    if how == "interpolated":
        return x, x
    if how == "first point":
        return 0.0, x
    if how == "above max":
        return None, math.inf
    raise ValueError(f"unknown crossing kind {how!r}")


def d_summary(crossings, xs) -> dict:
    """The d90 (or d100) of a configuration over the reporting seeds: crossings = [(x, how)] one per seed.

    All interpolated: the 95% interval of log10 d over the seeds ("geomean", "low", "high" in d). Otherwise the
    range the seeds allow: "low" the smallest lower bound, "high" the largest upper bound (None: unbounded)."""
    values = [x for x, _ in crossings]
    hows = [how for _, how in crossings]
    if all(how == "interpolated" for how in hows):
        iv = protocol.interval([math.log10(x) for x in values])
        return {"kind": "interval", "values": values, "how": hows, "geomean": 10 ** iv.mean,
                "low": 10 ** iv.low, "high": 10 ** iv.high, "log10": asdict(iv)}
    lows, highs = zip(*(crossing_bounds(x, how) for x, how in crossings))
    low = min(max(xs) if lo is None else lo for lo in lows)
    high = max(highs)
    return {"kind": "range", "values": values, "how": hows, "geomean": None, "low": low,
            "high": None if math.isinf(high) else high, "log10": None}


def d_text(summary: dict) -> str:
    """A d90 summary as text: "1234 [567, 2890]", "<= 100", "> 100000", "0 (untrained)" or "[100, > 100000]"."""
    low, high = summary["low"], summary["high"]
    if summary["kind"] == "interval":
        return f"{summary['geomean']:.0f} [{low:.0f}, {high:.0f}]"
    if high == 0:
        return "0 (the untrained model reaches it)"
    if high is None:
        return f"> {low:g}" if all(h == "above max" for h in summary["how"]) else f"[{low:g}, unbounded)"
    if low == 0:
        return f"<= {high:g}"
    return f"[{low:g}, {high:g}]"


def d_interval(summary: dict) -> protocol.Interval:
    """A d90 summary as a protocol.Interval in log10 d (-inf for 0, +inf unbounded), for protocol.verdict."""
    log = lambda x: -math.inf if x == 0 else math.log10(x)
    if summary["kind"] == "interval":
        return protocol.as_interval(summary["log10"])
    low = log(summary["low"])
    high = math.inf if summary["high"] is None else log(summary["high"])
    return protocol.Interval(mean=math.nan, low=low, high=high, n=len(summary["values"]), sd=math.nan)


def d_verdict(later: dict, earlier: dict, later_name: str, earlier_name: str) -> str:
    """Which d90 is lower (better: fewer numbers reach the target), or "not distinguishable"."""
    return protocol.verdict(d_interval(later), d_interval(earlier), later_name, earlier_name, lower_is_better=True)


# ----------------------------------------------------------------------------------------------------
# one run, trained to convergence


class _Converged(Exception):
    """Raised by the dev check to end a run that has stopped improving."""


def reference_loss(vocab_size: int) -> float:
    """ln V: the loss of guessing uniformly, the zero of the score."""
    return math.log(vocab_size)


def score_of(loss: float, vocab_size: int) -> float:
    return reference_loss(vocab_size) - loss


def _windows(conv: Convergence, windows: int) -> dict:
    batch = min(conv.eval_batch, windows)
    return {"batch_size": batch, "max_batches": max(1, windows // batch)}


def trainable_count(model) -> int:
    return sum(p.size for p in model.parameters(trainable_only=True))


def train_to_convergence(model, lr: float, seed: int, part: str, cap: int, conv: Convergence) -> dict:
    """Train ``model`` (in place) until its dev loss stops improving or ``cap`` steps, go back to its best dev
    check, and score it on ``part`` ("dev" or "test"). Returns the run's record: seed, lr, loss, score, curve
    ([[step, dev loss]], step 0 untrained), stopped_at, best_step, converged, diverged, trainable, seconds."""
    t0 = time.perf_counter()
    dev = common.held_out("dev").val
    check = lambda m: evaluate(m, dev, **_windows(conv, conv.check_windows))
    params = model.parameters(trainable_only=True)
    snapshot = lambda: [p.data.copy() for p in params]
    first = check(model)
    state = {"step": 0, "best": first, "best_step": 0, "weights": snapshot(), "mark": first, "mark_step": 0}
    curve = [[0, first]]

    def validate(m):
        state["step"] = min(state["step"] + conv.check_every, cap)
        loss = check(m)
        curve.append([state["step"], loss])
        if loss < state["best"]:
            state.update(best=loss, best_step=state["step"], weights=snapshot())
        if loss < state["mark"] - conv.tolerance:
            state.update(mark=loss, mark_step=state["step"])
        elif state["step"] - state["mark_step"] >= conv.patience * conv.check_every and state["step"] < cap:
            raise _Converged
        return loss

    config = TrainConfig(steps=cap, batch_size=conv.batch_size, lr=lr, min_lr=lr,
                         warmup_steps=min(conv.warmup_steps, cap), weight_decay=0.0, eval_every=conv.check_every,
                         checkpoint_every=0, seed=seed, quiet=True)
    converged = diverged = False
    try:
        fit(model, common.split().train, None, config, validate=validate)
    except _Converged:
        converged = True
    except FloatingPointError:
        diverged = True
    for p, w in zip(params, state["weights"]):
        p.data[...] = w
    loss = evaluate(model, common.held_out(part).val, **_windows(conv, conv.score_windows))
    return {"seed": seed, "lr": lr, "loss": loss, "score": score_of(loss, model.config.vocab_size), "curve": curve,
            "stopped_at": state["step"], "best_step": state["best_step"], "converged": converged,
            "diverged": diverged, "trainable": trainable_count(model), "seconds": time.perf_counter() - t0}


def _block(lr: float, records: list) -> dict:
    """One configuration's reporting runs (one record per reporting seed): scores, losses and their interval."""
    scores = [r["score"] for r in records]
    return {"lr": lr, "scores": scores, "losses": [r["loss"] for r in records],
            "test": asdict(protocol.interval(scores)), "runs": records}


def _tuned(make_model, cap: int, centre: float, conv: Convergence, fast: bool, report, label: str):
    """select_and_report for one configuration: (block, Tuning)."""
    def one(lr, seed, part):
        record = train_to_convergence(make_model(seed), lr, seed, part, cap, conv)
        return record["score"], record

    grid = common.lr_grid(centre, True)          # centre / 3, centre, 3 centre
    chosen = common.select_and_report(one, grid[1:] if fast else grid, fast, lower_is_better=False,
                                      max_extensions=0 if fast else None, report=report, label=label)
    return _block(chosen.tuning.best, chosen.payloads), chosen.tuning


def _at_rate(make_model, lr: float, cap: int, conv: Convergence, fast: bool, report, label: str) -> dict:
    """The reporting runs of one configuration at a given rate (no tuning of its own)."""
    records = []
    for seed in protocol.report_seeds(fast):
        records.append(train_to_convergence(make_model(seed), lr, seed, "test", cap, conv))
        if report is not None:
            report(f"{label} lr {lr:.3g} seed {seed}: {records[-1]['score']:.4f} (test)")
    return _block(lr, records)


def _subspace_sweep(start, ds, said: bool, conv: Convergence, fast: bool, report, label: str):
    """A subspace configuration over ``ds``: tuned at D_REF, the rate scaled by sqrt(k_ref / k) elsewhere.
    Returns ({d: block}, Tuning at D_REF)."""
    m = len(start().parameters(trainable_only=True)) if said else 0

    def maker(d):
        return lambda seed: SubspaceModel(start(), d, PROJECTION, said=said, seed=seed)

    blocks = {}
    blocks[D_REF], tuning = _tuned(maker(D_REF), conv.subspace_cap, LR_CENTRES["subspace"], conv, fast, report,
                                   f"{label} d={D_REF}")
    for d in ds:
        if d != D_REF:
            lr = tuning.best * math.sqrt((D_REF - m) / (d - m))
            blocks[d] = _at_rate(maker(d), lr, conv.subspace_cap, conv, fast, report, f"{label} d={d}")
    return {d: blocks[d] for d in ds}, tuning


def _fractions(scores, full_scores) -> dict:
    """Per-seed score / full fine-tuning's score (paired by seed) and their interval."""
    values = [s / f for s, f in zip(scores, full_scores)]
    return asdict(protocol.interval(values))


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class IntrinsicGPTResult:
    """The numbers of the study. Scores are ln V - test loss (nats per character, higher is better); every
    interval is the 95% interval over the reporting seeds."""

    fast: bool
    metric: str
    reference_loss: float                        # ln V
    fraction: float
    D: int                                       # trainable numbers of the whole model
    n_tensors: int                               # parameter tensors (SAID's lambdas)
    projection: str
    ds: list
    d_ref: int
    said_ds: list
    ranks: list
    convergence: dict
    series: dict = field(default_factory=dict)   # the pretraining series (pretraining_series.Series, as a dict)
    checkpoints: list = field(default_factory=list)   # one dict per kept pretraining step (see _checkpoint)
    said: list = field(default_factory=list)     # per d of said_ds: {"d", "said": block, "did": block, "verdict"}
    lora: list = field(default_factory=list)     # per rank: {"r", "block", "fraction", "verdict"}
    lora_r90: int | None = None                  # smallest rank whose mean score reaches 90% of full's
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def _checkpoint(step: int, start, ds, conv: Convergence, fast: bool, report, tunings: dict) -> dict:
    """Full fine-tuning and the DID sweep from one starting model; d90 and d100 per seed and over seeds."""
    t0 = time.perf_counter()
    untrained = start()
    vocab = untrained.config.vocab_size
    untrained_test = score_of(evaluate(untrained, common.held_out("test").val,
                                       **_windows(conv, conv.score_windows)), vocab)
    full, tunings[f"full @ step {step}"] = _tuned(lambda seed: start(), conv.full_cap, LR_CENTRES["full"], conv,
                                                  fast, report, f"step {step} full")
    did, tunings[f"DID d={D_REF} @ step {step}"] = _subspace_sweep(start, ds, False, conv, fast, report,
                                                                   f"step {step} DID")
    out = {"step": step, "untrained_score": untrained_test, "full": full,
           "did": [did[d] for d in ds],
           "did_fraction": [_fractions(did[d]["scores"], full["scores"]) for d in ds]}
    for name, fraction in (("d90", FRACTION), ("d100", 1.0)):
        crossings = [threshold_crossing(ds, [did[d]["scores"][k] for d in ds], fraction * full_score,
                                        untrained_test)
                     for k, full_score in enumerate(full["scores"])]
        out[name] = d_summary(crossings, ds)
    out["seconds"] = time.perf_counter() - t0
    return out


def pretraining_series(fast: bool = False, cache_dir=None, report=None):
    """The study's pretraining series (pretraining_series.build_series): read from the cache under
    ``cache_dir`` (default CACHE_DIR), or replayed and cached."""
    recipe = Recipe(steps=FAST_PRETRAIN_STEPS) if fast else Recipe()
    keep = FAST_SERIES_STEPS if fast else SERIES_STEPS
    return build_series(recipe, keep, CACHE_DIR if cache_dir is None else cache_dir, report=report)


def run(fast: bool = False, seed: int = 0, cache_dir=None) -> IntrinsicGPTResult:
    """The pretraining series, then full fine-tuning and the DID sweep at each checkpoint, then SAID and LoRA on
    the last one (the shipped model). ``seed`` is accepted for the common interface: the seeds are the
    protocol's. ``cache_dir``: where the pretraining checkpoints are cached (default CACHE_DIR)."""
    t_start = time.perf_counter()
    conv = FAST_CONVERGENCE if fast else CONVERGENCE
    ds = FAST_D_VALUES if fast else D_VALUES
    said_ds = FAST_SAID_D_VALUES if fast else SAID_D_VALUES
    ranks = FAST_RANKS if fast else RANKS
    say = lambda text: common.progress(STUDY, fast, text)

    series = pretraining_series(fast, cache_dir, report=say)
    keep = series.steps
    if series.shipped_max_abs_diff is not None:
        say(f"the replayed run's last checkpoint differs from the shipped model by at most "
            f"{series.shipped_max_abs_diff:.3g} in any weight and by {series.shipped_loss_diff:+.4f} nats in "
            f"pretraining validation loss")
    probe = series.model(len(keep) - 1)
    params = probe.parameters(trainable_only=True)
    vocab = probe.config.vocab_size
    result = IntrinsicGPTResult(
        fast=fast, metric=f"score = ln {vocab} - test loss (nats/char saved over uniform guessing; higher is "
                          f"better); d90: the smallest d whose score reaches {FRACTION:g} x full fine-tuning's",
        reference_loss=reference_loss(vocab), fraction=FRACTION, D=sum(p.size for p in params),
        n_tensors=len(params), projection=PROJECTION, ds=list(ds), d_ref=D_REF, said_ds=list(said_ds),
        ranks=list(ranks), convergence=asdict(conv))
    result.series = {k: v for k, v in asdict(series).items() if k != "paths"}
    result.seconds["pretraining series"] = 0.0 if series.reused else series.seconds

    tunings = {}
    report = common.progress_counter(STUDY, fast, _run_count(len(keep), ds, said_ds, ranks))
    for i, step in enumerate(series.steps):
        start = lambda i=i: series.model(i)
        result.checkpoints.append(_checkpoint(step, start, ds, conv, fast, report, tunings))
        c = result.checkpoints[-1]
        result.seconds[f"checkpoint {step}"] = c["seconds"]
        say(f"step {step}: d90 {d_text(c['d90'])}, d100 {d_text(c['d100'])}")

    # SAID beside DID at equal d, and LoRA, on the last checkpoint (the shipped model in the full study)
    last = result.checkpoints[-1]
    shipped = lambda: series.model(len(keep) - 1)
    t0 = time.perf_counter()
    said, tunings[f"SAID d={D_REF} @ step {last['step']}"] = _subspace_sweep(shipped, said_ds, True, conv, fast,
                                                                             report, "SAID")
    for d in said_ds:
        did = last["did"][ds.index(d)]
        result.said.append({"d": d, "said": said[d], "did": did,
                            "verdict": protocol.verdict(said[d]["test"], did["test"], "SAID", "DID",
                                                        lower_is_better=False)})
    result.seconds["SAID"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in ranks:
        def make(seed, r=r):
            return apply_lora(shipped(), LoRAConfig(r=r, alpha=2.0 * r, targets=TARGETS), seed=seed)
        block, tunings[f"LoRA r={r}"] = _tuned(make, conv.full_cap, LR_CENTRES["lora"], conv, fast, report,
                                               f"LoRA r={r}")
        fraction = _fractions(block["scores"], last["full"]["scores"])
        result.lora.append({"r": r, "block": block, "fraction": fraction,
                            "verdict": protocol.verdict_above(fraction, FRACTION, lower_is_better=False)})
    reached = [entry["r"] for entry in result.lora if entry["fraction"]["mean"] >= FRACTION]
    result.lora_r90 = reached[0] if reached else None
    result.seconds["LoRA"] = time.perf_counter() - t0

    result.protocol = protocol.protocol_record(
        common.split(), protocol.report_seeds(fast), tunings,
        metric=result.metric, convergence=asdict(conv),
        subspace_rates=f"tuned at d={D_REF}; elsewhere scaled by sqrt(k_ref / k), k = subspace coordinates",
        pretraining_series={"recipe": series.recipe, "steps": series.steps,
                            "shipped_max_abs_diff": series.shipped_max_abs_diff,
                            "shipped_loss_diff": series.shipped_loss_diff})
    result.findings = findings(result)
    result.seconds["total"] = time.perf_counter() - t_start
    return result


def _run_count(n_checkpoints: int, ds, said_ds, ranks) -> int:
    """Reporting runs the study makes (for the progress counter; tuning runs are not counted)."""
    seeds = len(protocol.REPORT_SEEDS)
    return seeds * (n_checkpoints * (1 + len(ds)) + len(said_ds) + len(ranks))


# ----------------------------------------------------------------------------------------------------
# findings


def _interval_text(block_or_interval: dict, digits: int = 3) -> str:
    """A configuration's test interval (a block with "test", or an interval dict) as "mean [low, high]"."""
    return protocol.as_interval(block_or_interval.get("test", block_or_interval)).text(digits)


def findings(result: IntrinsicGPTResult) -> list:
    """The claims the study tests against the papers, each with our numbers and the verdict of the intervals."""
    out = []
    first, last = result.checkpoints[0], result.checkpoints[-1]
    by_step = "; ".join(f"step {c['step']}: {d_text(c['d90'])}" for c in result.checkpoints)
    v = d_verdict(last["d90"], first["d90"], f"step {last['step']}", f"step {first['step']}")
    if v == protocol.NOT_DISTINGUISHABLE:
        verdict = f"{v}: pretraining does not lower d90 measurably here"
    elif v.startswith(f"step {last['step']}"):
        verdict = f"lower after pretraining (step {last['step']} vs {first['step']}), as the paper"
    else:
        verdict = f"HIGHER after pretraining (step {last['step']} vs {first['step']}), against the paper"
    out.append(protocol.finding(
        STUDY, "pretraining lowers d90 (DID, 90% of the same model's full fine-tuning score)",
        "d90 falls as pretraining proceeds (RoBERTa-base pretrained again from scratch, checkpoints along "
        "pretraining, six tasks; Aghajanyan et al. 2020, section 5)",
        f"d90 by pretraining step (geometric mean [95% CI] over seeds, or the range censored seeds allow): "
        f"{by_step}", verdict))
    steps = [(a, b) for a, b in zip(result.checkpoints, result.checkpoints[1:])]
    falls = [d_verdict(b["d90"], a["d90"], "later", "earlier") for a, b in steps]
    out.append(protocol.finding(
        STUDY, "d90 falls at every stage of pretraining",
        "monotone fall along the pretraining checkpoints (Aghajanyan et al. 2020)",
        "; ".join(f"{a['step']} -> {b['step']}: {f}" for (a, b), f in zip(steps, falls)),
        f"lower at {sum(f == 'later better' for f in falls)} of {len(falls)} stages, "
        f"higher at {sum(f == 'earlier better' for f in falls)}, "
        f"not distinguishable at {sum(f == protocol.NOT_DISTINGUISHABLE for f in falls)}"))
    for entry in result.said:
        out.append(protocol.finding(
            STUDY, f"SAID beats DID at equal d (d = {entry['d']} trainable numbers in total, the shipped model)",
            "SAID's d90 is below DID's on every model and task of their Table 1 (Aghajanyan et al. 2020)",
            f"test score SAID {_interval_text(entry['said'])} vs DID {_interval_text(entry['did'])}",
            entry["verdict"]))
    if result.lora:
        smallest = result.lora[0]
        rest = ", ".join(f"r={e['r']}: {protocol.as_interval(e['fraction']).text(3)}" for e in result.lora)
        reach = (f"smallest rank reaching {result.fraction:.0%} on average: r={result.lora_r90}"
                 if result.lora_r90 is not None else f"no rank of {result.ranks} reaches {result.fraction:.0%}")
        out.append(protocol.finding(
            STUDY, f"LoRA at r={smallest['r']} on (Wq, Wv) reaches {result.fraction:.0%} of full fine-tuning's score",
            "r = 1 on Wq, Wv is already competitive with full fine-tuning (Hu et al. 2021, Table 6)",
            f"score / full fine-tuning's: {rest}; {reach}",
            f"{smallest['verdict']} {result.fraction:.0%} at r={smallest['r']}"))
    return out


# ----------------------------------------------------------------------------------------------------
# reading the result


def summary(result: IntrinsicGPTResult) -> str:
    conv = result.convergence
    s = result.series
    built = "read from the cache" if s["reused"] else f"replayed in {s['seconds']:.0f} s"
    shipped = ("not checked (shortened recipe)" if s["shipped_max_abs_diff"] is None else
               f"max |weight difference| from the shipped model {s['shipped_max_abs_diff']:.3g}, pretraining "
               f"validation loss {s.get('shipped_loss_diff') or 0.0:+.4f} nats from the shipped model's (a replay of "
               f"its recipe, not its bits, when the weights differ)")
    rows = [f"Intrinsic dimension of the tiny GPT on python-email along its pretraining: {result.projection} "
            f"projection, D = {result.D:,} ({result.n_tensors} tensors)",
            f"metric: {result.metric}; d100: reaching full fine-tuning's score",
            f"pretraining series: steps {s['steps']} of `minilora pretrain` ({s['recipe']['steps']} steps, batch "
            f"{s['recipe']['batch_size']}, {s['recipe']['threads']} threads), "
            f"{built}; {shipped}",
            f"training: batch {conv['batch_size']}, warmup {conv['warmup_steps']} then a constant rate; dev check "
            f"every {conv['check_every']} steps on {conv['check_windows']} windows, converged when no gain > "
            f"{conv['tolerance']:g} nats for {conv['patience']} checks; caps {conv['full_cap']} (full, LoRA), "
            f"{conv['subspace_cap']} (DID, SAID) steps; best dev check kept; scored on {conv['score_windows']} "
            f"test windows",
            f"protocol: {common.split().describe()}; tuned on dev with seed "
            f"{protocol.SELECTION_SEED}, reported over seeds {result.protocol['report_seeds']}; subspace rate tuned "
            f"at d={result.d_ref}, scaled by sqrt(k_ref / k) elsewhere", ""]
    for name, t in result.protocol.get("tuning", {}).items():
        rows.append(f"  lr {name}: {t['best']:g}{'' if t['interior'] else ' (edge of the grid)'}")
    rows.append("")
    header = f"{'step':>6} {'untrained':>9} {'full FT score':>22} | " + " | ".join(
        f"{'DID d=' + str(d):>22}" for d in result.ds) + f" | {'d90':>22} | {'d100':>22}"
    rows.append(header)
    for c in result.checkpoints:
        cells = [f"{_interval_text(b):>22}" for b in c["did"]]
        rows.append(f"{c['step']:>6} {c['untrained_score']:>9.3f} {_interval_text(c['full']):>22} | "
                    + " | ".join(cells) + f" | {d_text(c['d90']):>22} | {d_text(c['d100']):>22}")
    rows.append("(scores: mean [95% CI] of ln V - test loss over the reporting seeds)")
    capped = [r for c in result.checkpoints for b in [c["full"], *c["did"]] for r in b["runs"]]
    rows.append(f"runs that converged before their cap: {sum(r['converged'] for r in capped)} of {len(capped)}; "
                f"diverged (kept their best dev check): {sum(r['diverged'] for r in capped)}")
    rows.append("")
    for entry in result.said:
        rows.append(f"d={entry['d']}: SAID {_interval_text(entry['said'])} (lr {entry['said']['lr']:.3g}) vs DID "
                    f"{_interval_text(entry['did'])}: {entry['verdict']}")
    for entry in result.lora:
        rows.append(f"LoRA r={entry['r']} ({entry['block']['runs'][0]['trainable']:,} numbers, lr "
                    f"{entry['block']['lr']:g}): score {_interval_text(entry['block'])}, "
                    f"{protocol.as_interval(entry['fraction']).text(3)} of full: {entry['verdict']} "
                    f"{result.fraction:.0%}")
    rows.append("")
    for f in result.findings:
        rows.append(f"- {f['claim']}: paper: {f['paper']}; ours: {f['ours']} => {f['verdict']}")
    return "\n".join(rows)


def plot(result: IntrinsicGPTResult, path) -> None:
    """Four panels: d90 (and d100) against pretraining step with their intervals; fraction of full fine-tuning's
    score against d per checkpoint (SAID and LoRA on the last one); dev curves of the seed-1 runs; the
    pretraining curve with the kept checkpoints."""
    from ..plots import new_figure, save_figure

    fig, axes = new_figure(2, 2, figsize=(13, 9))
    (ax_d90, ax_frac), (ax_curves, ax_pre) = axes
    steps = [c["step"] for c in result.checkpoints]
    x_of = lambda step: max(step, 1)               # step 0 on a log axis
    for name, marker, offset in (("d90", "o", 1.0), ("d100", "s", 1.08)):
        for c in result.checkpoints:
            summ, x = c[name], x_of(c["step"]) * offset
            label = name if c is result.checkpoints[0] else None
            colour = "C0" if name == "d90" else "C1"
            if summ["kind"] == "interval":
                ax_d90.errorbar([x], [summ["geomean"]], yerr=[[summ["geomean"] - summ["low"]],
                                                               [summ["high"] - summ["geomean"]]],
                                marker=marker, color=colour, capsize=3, label=label)
            else:
                low = max(summ["low"], min(result.ds) / 10)
                high = summ["high"] if summ["high"] is not None else max(result.ds) * 10
                ax_d90.plot([x, x], [low, high], color=colour, linewidth=3, alpha=0.5, label=label)
                if summ["high"] is None:
                    ax_d90.annotate("", (x, high), (x, max(low, max(result.ds))),
                                    arrowprops={"arrowstyle": "->", "color": colour})
    ax_d90.axhline(max(result.ds), color="grey", linestyle=":", linewidth=1, label="largest d tried")
    ax_d90.set_xscale("log")
    ax_d90.set_yscale("log")
    ax_d90.set_xlabel("pretraining step (step 0 drawn at 1)")
    ax_d90.set_ylabel("d (trainable numbers)")
    ax_d90.set_title("d90 / d100 along pretraining (95% CI; bars: censored ranges)")

    for i, c in enumerate(result.checkpoints):
        means = [f["mean"] for f in c["did_fraction"]]
        errs = [[f["mean"] - f["low"] for f in c["did_fraction"]], [f["high"] - f["mean"] for f in c["did_fraction"]]]
        ax_frac.errorbar(result.ds, means, yerr=errs, marker="o", capsize=3, color=f"C{i}",
                         label=f"DID, step {c['step']}")
    last = result.checkpoints[-1]
    if result.said:
        fr = [_fraction_of(e["said"]["scores"], last["full"]["scores"]) for e in result.said]
        ax_frac.errorbar([e["d"] for e in result.said], [f.mean for f in fr],
                         yerr=[[f.mean - f.low for f in fr], [f.high - f.mean for f in fr]], marker="^",
                         capsize=3, color="k", linestyle="--", label=f"SAID, step {last['step']}")
    if result.lora:
        fr = [protocol.as_interval(e["fraction"]) for e in result.lora]
        xs = [e["block"]["runs"][0]["trainable"] for e in result.lora]
        ax_frac.errorbar(xs, [f.mean for f in fr], yerr=[[f.mean - f.low for f in fr], [f.high - f.mean for f in fr]],
                         marker="s", capsize=3, color="C9", linestyle="-.", label=f"LoRA q,v, step {last['step']}")
    ax_frac.axhline(result.fraction, color="grey", linestyle=":", linewidth=1, label=f"{result.fraction:.0%}")
    ax_frac.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="full fine-tuning")
    ax_frac.set_xscale("log")
    ax_frac.set_xlabel("trainable numbers (d; LoRA: its parameter count)")
    ax_frac.set_ylabel("score / full fine-tuning's score")
    ax_frac.set_title("fraction of full fine-tuning (95% CI over seeds)")

    for i, c in enumerate(result.checkpoints):
        run = c["full"]["runs"][0]
        ax_curves.plot(*zip(*run["curve"]), color=f"C{i}", linestyle="--", label=f"full, step {c['step']}")
        for d, block in zip(result.ds, c["did"]):
            if d == max(result.ds):
                ax_curves.plot(*zip(*block["runs"][0]["curve"]), color=f"C{i}", label=f"DID d={d}, step {c['step']}")
    ax_curves.set_xlabel("fine-tuning step")
    ax_curves.set_ylabel("dev loss (nats / char)")
    ax_curves.set_title("training curves (first reporting seed)")

    curve = result.series["curve"]
    ax_pre.plot(*zip(*curve), marker=".", color="C0", label="pretraining validation loss")
    for step in steps:
        ax_pre.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax_pre.set_xlabel("pretraining step")
    ax_pre.set_ylabel("validation loss on the pretraining corpus (nats / char)")
    ax_pre.set_title("the pretraining run and its kept checkpoints (dotted)")
    for ax in (ax_d90, ax_frac, ax_curves, ax_pre):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, Path(path))


def _fraction_of(scores, full_scores) -> protocol.Interval:
    return protocol.as_interval(_fractions(scores, full_scores))


if __name__ == "__main__":          # the pretraining cache alone: python -m minilora.experiments.intrinsic_gpt [DIR]
    import sys

    built = pretraining_series(cache_dir=sys.argv[1] if len(sys.argv) > 1 else None, report=print)
    print(f"{len(built.steps)} checkpoints (steps {built.steps}) in {built.folder}; largest |weight difference| from "
          f"the shipped model: {built.shipped_max_abs_diff:.3g}")
