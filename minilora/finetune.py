"""The fine-tune recipe: every fine-tuning run in minilora (the ``minilora finetune`` command, the tour, the
studies, the comparison of methods) is one call of ``finetune``.

    run = finetune(ml.load_pretrained(dropout=0.0), "lora", corpus, TrainConfig.for_finetuning(300, 16, 1e-2),
                   lora=ml.LoRAConfig(r=4, alpha=8))

1. score the untouched model: the validation loss on a corpus, or the accuracy on a classification task
2. apply the method (any of ``methods.METHODS``, sized by ``MethodSettings``)
3. train with ``train.fit`` (language modelling on the corpus, or the task's label tokens)
4. score again; count trainable parameters, optimizer state and the time of a step
5. save what the method trained (the methods of SAVERS) and time inference against the untouched model

Returns a FinetuneRun of plain numbers, ready for a table or JSON; the model is left trained, in place.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy

from .core.lora import ADAPTER_WEIGHTS, LoRAConfig, parameter_report
from .core.methods import METHODS, MethodSettings, apply_method, check_method, for_inference
from .core.model import GPT
from .data import Corpus
from .io.adapter_files import adapter_state, save_lora
from .io.checkpoints import save_checkpoint
from .timing import paired_forward_samples, ratio_spread, spread
from .tasks import IGNORE, ClassificationTask, accuracy, task_batches
from .train import TrainConfig, evaluate, fit


@dataclass
class FinetuneRun:
    """Everything one fine-tuning run measured (plain numbers, ready for a table or JSON)."""

    label: str
    method: str
    trainable: int
    total: int
    percent: float
    val_before: float | None                           # the untouched model's score (None: not measured)
    val_after: float
    metric: str = "loss"      # what val_* hold: "loss" (nats per token, lower is better) or "accuracy" (higher)
    val_curve: list = field(default_factory=list)      # [[step, score], ...], step 0 = before training
    train_curve: list = field(default_factory=list)    # [[step, training loss], ...]
    optimizer_bytes: int = 0
    step_seconds: float = 0.0
    saved_bytes: int = 0
    latency_ms: dict = field(default_factory=dict)     # {batch size: {"base": .., "unmerged": .., "merged": ..}}


@dataclass(frozen=True)
class Saver:
    """How finetune writes a method's result to out_dir. check(model) raises, before training, what save would
    refuse; save(model, out_dir, meta) writes it and returns the path of the file whose size is reported."""

    check: Callable
    save: Callable


def _anything_goes(model) -> None:
    """A checkpoint of the whole model holds any model."""


def _save_full(model, out_dir: Path, meta: dict) -> Path:
    return save_checkpoint(out_dir / "model.safetensors", model, None, meta)


def _save_lora(model, out_dir: Path, meta: dict) -> Path:
    save_lora(model, out_dir)
    return out_dir / ADAPTER_WEIGHTS


# the methods whose result is saved as a file minilora loads back: full fine-tuning as a checkpoint
# (train.load_checkpoint), LoRA as an adapter of kilobytes (load_lora; PEFT's format through interop)
SAVERS = {
    "full": Saver(check=_anything_goes, save=_save_full),
    "lora": Saver(check=adapter_state, save=_save_lora),     # adapter_state refuses what an adapter cannot hold
}
SAVABLE_METHODS = tuple(m for m in METHODS if m in SAVERS)    # the choices of ``minilora finetune --method``


def optimizer_state_bytes(model: GPT) -> int:
    """What AdamW keeps: two moments (m and v) per trainable number."""
    return sum(2 * p.data.nbytes for p in model.parameters(trainable_only=True))


def forward_latency(model: GPT, batch_size: int = 1, repeats: int = 20, seq_len: int | None = None) -> float:
    """Median seconds of one evaluation-mode forward pass over seq_len tokens (None: a full block)."""
    return spread(paired_forward_samples([model], batch_size, repeats, seq_len)[0]).median


def paired_forward_latency(models, batch_size: int = 1, repeats: int = 20, seq_len: int | None = None) -> list:
    """Median seconds of one evaluation-mode forward pass of each model, the models taking turns round by round
    (timing.paired_forward_samples has the samples themselves)."""
    return [spread(t).median for t in paired_forward_samples(models, batch_size, repeats, seq_len)]


def _latency_plan(latency_repeats) -> dict:
    """{batch size: repeats} from finetune's latency_repeats (an int: that many repeats at batch 1)."""
    plan = latency_repeats if isinstance(latency_repeats, dict) else {1: latency_repeats}

    def at_least(x, least):
        return isinstance(x, (int, numpy.integer)) and not isinstance(x, bool) and x >= least

    if not all(at_least(b, 1) and at_least(r, 0) for b, r in plan.items()):
        raise ValueError("latency_repeats must be an int >= 0 (repeats at batch 1) or a dict {batch size >= 1: "
                         f"repeats >= 0}}; got {latency_repeats!r}")
    return {int(b): int(r) for b, r in plan.items() if r > 0}


def inference_latency(base: GPT, model: GPT, method: str, plan: dict, seq_len: int | None = None) -> dict:
    """{str(batch size): {"base", "unmerged", "merged", "ratio", "iqr_ms"}}: median ms of one evaluation-mode
    forward pass of the untouched model, the fine-tuned model (LoRA unmerged: the two-step adapter), and a copy
    of it made as cheap as the method allows (for_inference: LoRA merged, a prefix MLP baked; the same model
    again where nothing merges), the three taking turns round by round; "ratio": {"unmerged", "merged"} each
    [median, q1, q3] of the per-round ratio to the base; "iqr_ms": each model's [q1, q3].
    plan: {batch size: repeats}."""
    ready = for_inference(copy.deepcopy(model), method)
    out = {}
    for batch, repeats in plan.items():
        samples = dict(zip(("base", "unmerged", "merged"), paired_forward_samples([base, model, ready], batch,
                                                                               repeats, seq_len)))
        timings = {name: 1e3 * spread(t).median for name, t in samples.items()}
        # each ratio from the same rounds as the times, with its interquartile range: [median, q1, q3]
        timings["ratio"] = {name: [r.median, r.low, r.high] for name in ("unmerged", "merged")
                            for r in [ratio_spread(samples[name], samples["base"])]}
        timings["iqr_ms"] = {name: [1e3 * spread(t).low, 1e3 * spread(t).high] for name, t in samples.items()}
        out[str(batch)] = timings
    return out


def finetune(model: GPT, method: str, data: Corpus | ClassificationTask, train_config: TrainConfig,
             lora: LoRAConfig | None = None, out_dir=None, label: str | None = None, latency_repeats=20,
             eval_batches: int | None = None, seed: int = 0, *, settings: MethodSettings | None = None,
             evaluate_before: bool = True) -> FinetuneRun:
    """Fine-tune ``model`` (in place) with ``method`` on ``data``; measure and save.

    method: one of METHODS, applied with ``settings`` (None: MethodSettings()) and ``seed``; lora, when given,
        replaces settings.lora.
    data: a Corpus (language modelling; score: validation loss on its val text, windows of train_config's
        batch_size and block_size) or a ClassificationTask (score: accuracy on its validation snippets).
    eval_batches: validation batches for the corpus's before/after scores (None: the whole validation text);
        the curve in between is fit's own validation (train_config.eval_every, eval_batches).
    evaluate_before: score the untouched model (val_before, the first point of val_curve).
    out_dir: where the result is saved (methods of SAVERS only: LoRA's adapter, full fine-tuning's weights);
        its size is reported.
    latency_repeats: inference timing after training at batch 1 with that many repeats, or a dict {batch
        size: repeats}; 0 or {}: none. Sequences of train_config's block_size (a task: its snippet length).
    Arguments are checked, and the method applied, before any evaluation or training.
    """
    check_method(method)
    if not isinstance(data, (Corpus, ClassificationTask)):
        raise TypeError(f"finetune trains on a data.Corpus or a tasks.ClassificationTask; got {type(data).__name__}")
    if out_dir is not None and method not in SAVERS:
        raise ValueError(f"finetune can save the result of {SAVABLE_METHODS}, not of method {method!r}; "
                         f"give out_dir=None (got {str(out_dir)!r}) or one of those methods")
    plan = _latency_plan(latency_repeats)
    settings = settings or MethodSettings()
    if lora is not None:
        settings = dataclasses.replace(settings, lora=lora)
    task = data if isinstance(data, ClassificationTask) else None
    if task is not None:
        metric, seq_len, meta = "accuracy", task.length, {"task": task.name, "method": method}

        def score(m):
            return accuracy(m, task)
    else:
        metric, seq_len, meta = "loss", train_config.block_size, {"corpus": data.name, "method": method}

        def score(m):         # fit's validation windows too, so the curve is one curve when the counts agree
            return evaluate(m, data.val, batch_size=train_config.batch_size, block_size=train_config.block_size,
                            max_batches=eval_batches)

    base = copy.deepcopy(model) if evaluate_before or plan else None      # the untouched model, to compare with
    apply_method(model, method, settings, seed=seed)
    if out_dir is not None:
        SAVERS[method].check(model)
    val_before = score(base) if evaluate_before else None
    report = parameter_report(model)
    if task is None:
        result = fit(model, data.train, data.val, train_config, meta=meta)
    else:
        result = fit(model, config=train_config, meta=meta, batches=task_batches(task, train_config.batch_size),
                     ignore_index=IGNORE, validate=score)
    run = FinetuneRun(
        label=label or method, method=method, trainable=report["trainable"], total=report["total"],
        percent=report["percent"], val_before=val_before, val_after=score(model), metric=metric,
        val_curve=([[0, val_before]] if evaluate_before else []) + result.val, train_curve=result.train,
        optimizer_bytes=optimizer_state_bytes(model),
        step_seconds=(result.seconds - result.eval_seconds) / max(1, result.steps),
    )
    if out_dir is not None:
        run.saved_bytes = SAVERS[method].save(model, Path(out_dir), meta).stat().st_size
    if plan:
        run.latency_ms = inference_latency(base, model, method, plan, seq_len)
    return run
