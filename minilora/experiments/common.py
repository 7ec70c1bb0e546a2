"""What the studies share: the downstream corpus and its declared split, and short LoRA / full fine-tuning runs
from the shipped model, each scored on dev (for selection) or on test (for reporting); see protocol.py.

Defaults (a few minutes for a whole study on 2 CPU cores): batch 8 windows of 128 characters, 100 steps,
scored on the first 16 batches of 8 windows (128 windows = 16k characters) of the dev or the test half of
python-email's held-out text. ``lora_lr`` and ``full_lr`` are the starting points of the learning-rate grids
(``lr_grid``); the rate a run uses is chosen on dev (``select_and_report``). ``fast`` shrinks steps, scoring
and grids for tests.
"""
from __future__ import annotations

import functools
import math
import sys
import dataclasses
from dataclasses import dataclass

import numpy

from ..core import backend
from ..data import load_corpus
from ..finetune import finetune
from ..core.lora import LoRAConfig, lora_modules
from ..core.methods import MethodSettings
from ..io.pretrained import load_pretrained
from ..train import TrainConfig, evaluate
from . import protocol

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def on_the_host(run):
    """Run a study on NumPy whatever the selected backend: for the small host-array studies (the intrinsic-
    dimension toy, MLP and projection-cost studies build their data with NumPy and time the CPU)."""
    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        with backend.backend("numpy"):
            return run(*args, **kwargs)
    return wrapped


@dataclass
class RunSettings:
    steps: int = 100
    batch_size: int = 8
    lora_lr: float = 1e-2
    full_lr: float = 1e-3
    eval_batches: int = 16       # of batch_size windows: 16 x 8 = the first 128 validation windows
    eval_every: int = 0          # 0: only before and after

    @classmethod
    def for_mode(cls, fast: bool, **overrides):
        base = dict(steps=6, batch_size=4, eval_batches=1) if fast else {}
        return cls(**{**base, **overrides})


@functools.lru_cache(maxsize=None)
def downstream():
    """The downstream domain (python-email), loaded once."""
    return load_corpus("python-email")


@functools.lru_cache(maxsize=None)
def split() -> protocol.Split:
    """The declared split of the downstream domain: train, dev (select), test (report)."""
    return protocol.split_corpus(downstream())


PARTS = ("dev", "test")


def held_out(part: str):
    """The downstream corpus with ``val`` set to its dev or its test half: what a run is scored on."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}; got {part!r}")
    return dataclasses.replace(downstream(), val=getattr(split(), part))


def pretrained_val_loss(settings: RunSettings, part: str) -> float:
    """The untouched pretrained model on the same dev or test windows as the runs."""
    return evaluate(load_pretrained(dropout=0.0), held_out(part).val, batch_size=settings.batch_size,
                    max_batches=settings.eval_batches)


def run_lora(targets, r: int, seed: int, settings: RunSettings, alpha: float | None = None,
             use_rslora: bool = False, *, lr: float, part: str, loraplus_ratio: float | None = None,
             nf4: bool = False):
    """Fine-tune a fresh copy of the shipped model with LoRA at peak rate lr, scored on ``part`` ("dev" or
    "test"); returns (model, FinetuneRun).

    alpha: None means 2 r (scale 2 at every rank). loraplus_ratio: LoRA+ (the "loraplus" method), lora_B at
    that multiple of lr; None: plain LoRA. nf4: LoRA on the model's linear weights frozen in 4-bit NF4 (the
    "qlora" method, MethodSettings.nf4's blocks)."""
    model = load_pretrained(dropout=0.0)
    config = LoRAConfig(r=r, alpha=2.0 * r if alpha is None else alpha, targets=tuple(targets),
                        use_rslora=use_rslora)
    method, label = ("lora", f"LoRA r={r}") if loraplus_ratio is None else ("loraplus", f"LoRA+ r={r} "
                                                                                       f"lambda={loraplus_ratio:g}")
    extra = {} if loraplus_ratio is None else {"settings": MethodSettings(loraplus_ratio=loraplus_ratio)}
    if nf4:
        if loraplus_ratio is not None:
            raise ValueError("run_lora: nf4 (QLoRA) and loraplus_ratio (LoRA+) are separate methods; give one")
        method, label = "qlora", f"QLoRA r={r}"
    run = finetune(model, method, held_out(part), train_config(settings, lr, seed), config,
                   latency_repeats=0, eval_batches=settings.eval_batches, seed=seed, label=label, **extra)
    return model, run


def run_full(seed: int, settings: RunSettings, *, lr: float, part: str):
    """Full fine-tuning of a fresh copy of the shipped model at peak rate lr, scored on ``part``; returns
    (model, FinetuneRun)."""
    model = load_pretrained(dropout=0.0)
    run = finetune(model, "full", held_out(part), train_config(settings, lr, seed),
                   latency_repeats=0, eval_batches=settings.eval_batches, seed=seed, label="full")
    return model, run


def lr_grid(centre: float, fast: bool) -> tuple:
    """The first learning rates tried around ``centre`` (a rate of protocol.LR_SERIES): centre / 10 .. centre x
    10 (five rates), or centre / 3 .. centre x 3 when fast; protocol.tune extends it until the best is interior."""
    i = protocol.LR_SERIES.index(centre)
    reach = 1 if fast else 2
    return protocol.LR_SERIES[max(0, i - reach):i + reach + 1]


@dataclass
class Selected:
    """One configuration's protocol: its learning rate chosen on dev, then one run per reporting seed on test."""

    tuning: protocol.Tuning
    test: protocol.Interval          # the reported score over the reporting seeds
    payloads: list                   # what each reporting run returned beside its score (e.g. a model)


def select_and_report(run, grid, fast: bool, lower_is_better: bool = True, max_extensions: int | None = None,
                      report=None, label: str = "") -> Selected:
    """run(lr, seed, part) -> score or (score, payload). Tune lr on dev with the selection seed over ``grid``
    (extended until interior; at most one extension when fast), then run every reporting seed at that rate on
    test. ``report(text)`` is told of each reporting run."""
    score_of = lambda value: value[0] if isinstance(value, tuple) else value
    tuning = protocol.tune(lambda lr: score_of(run(lr, protocol.SELECTION_SEED, "dev")), grid, lower_is_better,
                           max_extensions=(1 if fast else 4) if max_extensions is None else max_extensions)
    scores, payloads = [], []
    for seed in protocol.report_seeds(fast):
        value = run(tuning.best, seed, "test")
        scores.append(score_of(value))
        payloads.append(value[1] if isinstance(value, tuple) else None)
        if report is not None:
            report(f"{label} lr {tuning.best:g} seed {seed}: {scores[-1]:.4f} (test)")
    return Selected(tuning, protocol.interval(scores), payloads)


def train_config(settings: RunSettings, lr: float, seed: int) -> TrainConfig:
    """The TrainConfig of a study run: the settings, a peak lr with a tenfold cosine decay, no weight decay."""
    return TrainConfig.for_finetuning(settings.steps, settings.batch_size, lr, warmup_steps=10,
                                      eval_every=settings.eval_every, eval_batches=settings.eval_batches, seed=seed,
                                      quiet=True)


def adapter_matrices(model, name: str):
    """(A, B, delta W) of the LoRA layer called ``name`` as float64 NumPy arrays; delta W in (in, out) layout."""
    layer = dict(lora_modules(model))[name]
    A = backend.to_numpy(layer.lora_A.data).astype(numpy.float64)
    B = backend.to_numpy(layer.lora_B.data).astype(numpy.float64)
    return A, B, backend.to_numpy(layer.delta_weight()).astype(numpy.float64)


def weight(model, name: str):
    """A parameter of the model as a float64 NumPy array (e.g. "h.0.attn.q_proj.weight")."""
    return backend.to_numpy(dict(model.named_parameters())[name].data).astype(numpy.float64)


def bits_per_char(nats: float) -> float:
    """Cross-entropy in nats per character -> bits per character."""
    return nats / math.log(2)


def attention_lora_parameters(r: int, targets, n_layer: int, n_embd: int) -> int:
    """Trainable numbers of LoRA at rank r on ``targets`` (each an n_embd x n_embd weight) in every block."""
    return r * (n_embd + n_embd) * n_layer * len(targets)


def progress(study: str, fast: bool, text: str) -> None:
    """One line per finished run on stderr in default mode (minutes long); silent in fast mode."""
    if not fast:
        print(f"{study} {text}", file=sys.stderr, flush=True)


def progress_counter(study: str, fast: bool, total: int):
    """A function report(text) printing "<study> [i/total] text" on stderr in default mode (silent when fast)."""
    done = [0]

    def report(text: str) -> None:
        done[0] += 1
        progress(study, fast, f"[{done[0]}/{total}] {text}")

    return report


def tuned_lora(label: str, targets, r: int, settings: RunSettings, fast: bool, expected_trainable: int,
               alpha: float | None = None, use_rslora: bool = False, report=None, keep_models: bool = False) -> dict:
    """LoRA on ``targets`` at rank r under the protocol (select_and_report around settings.lora_lr):
    {"r", "trainable", "lr", "interior", "dev_scores", "test": Interval as a dict, "losses" (test, one per
    reporting seed)} and, with keep_models, "models" (the reporting runs' models, not for JSON).

    Checks that every run trains exactly ``expected_trainable`` numbers."""
    def one(lr, seed, part):
        model, run = run_lora(targets, r, seed, settings, alpha, use_rslora, lr=lr, part=part)
        if run.trainable != expected_trainable:
            raise AssertionError(f"LoRA {label} r={r} trains {run.trainable} numbers, expected {expected_trainable}")
        return run.val_after, (model if keep_models else None)

    chosen = select_and_report(one, lr_grid(settings.lora_lr, fast), fast, report=report, label=f"LoRA {label} r={r}")
    out = {"r": r, "trainable": expected_trainable, "lr": chosen.tuning.best, "interior": chosen.tuning.interior,
           "dev_scores": {f"{lr:g}": v for lr, v in sorted(chosen.tuning.scores.items())},
           "test": dataclasses.asdict(chosen.test), "losses": chosen.test.values}
    if keep_models:
        out["models"] = chosen.payloads
    return out
