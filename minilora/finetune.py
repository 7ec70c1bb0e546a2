"""Fine-tuning a pretrained GPT on a new domain: full fine-tuning or LoRA, with the figures that compare them.

    run = finetune(ml.load_pretrained(dropout=0.0), "lora", corpus, steps=300, lora=ml.LoRAConfig(r=4, alpha=8))

Returns a FinetuneRun: validation loss before and after (and its curve), trainable parameters, optimizer-state
bytes, step time, saved size, and inference latency of the adapted model against the base model.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .core import backend
from .data import Corpus
from .core.lora import LoRAConfig, apply_lora, merge_lora, parameter_report, unmerge_lora
from .io.adapter_files import save_lora
from .core.model import GPT
from .io.checkpoints import save_checkpoint
from .train import TrainConfig, evaluate, fit

METHODS = ("full", "lora")


@dataclass
class FinetuneRun:
    """Everything one fine-tuning run measured (plain numbers, ready for a table or JSON)."""

    label: str
    method: str
    trainable: int
    total: int
    percent: float
    val_before: float
    val_after: float
    val_curve: list = field(default_factory=list)      # [[step, loss], ...], step 0 = before training
    optimizer_bytes: int = 0
    step_seconds: float = 0.0
    saved_bytes: int = 0
    latency_ms: dict = field(default_factory=dict)     # {"base": .., "unmerged": .., "merged": ..} at batch 1


def optimizer_state_bytes(model: GPT) -> int:
    """What AdamW keeps: two moments (m and v) per trainable number."""
    return sum(2 * p.data.nbytes for p in model.parameters(trainable_only=True))


def forward_latency(model: GPT, batch_size: int = 1, repeats: int = 20, seq_len: int | None = None) -> float:
    """Median seconds of one evaluation-mode forward pass over seq_len tokens (None: a full block)."""
    return paired_forward_latency([model], batch_size, repeats, seq_len)[0]


def paired_forward_latency(models, batch_size: int = 1, repeats: int = 20, seq_len: int | None = None) -> list:
    """Median seconds of one evaluation-mode forward pass of each model, the models taking turns.

    Taking turns (a, b, a, b, ...) exposes every model to the same machine state (clock speed, caches, other
    load), so the ratio of two medians is much steadier than two separate measurements."""
    seq_len = seq_len or models[0].config.block_size
    idx = backend.asarray(numpy.random.default_rng(0).integers(0, models[0].config.vocab_size,
                                                                size=(batch_size, seq_len)))
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    times = [[] for _ in models]
    for i in range(repeats + 2):
        for model, seconds in zip(models, times):
            backend.synchronize()
            t0 = time.perf_counter()
            model.forward(idx)
            backend.synchronize()
            if i >= 2:                 # the first calls warm caches and allocators
                seconds.append(time.perf_counter() - t0)
    for m, mode in zip(models, modes):
        m.train(mode)
    return [statistics.median(t) for t in times]


def finetune(model: GPT, method: str, corpus: Corpus, train_config: TrainConfig, lora: LoRAConfig | None = None,
             out_dir=None, label: str | None = None, latency_repeats: int = 20, eval_batches: int | None = None,
             seed: int = 0) -> FinetuneRun:
    """Fine-tune ``model`` (in place) on ``corpus`` with "full" fine-tuning or "lora"; measure and save.

    out_dir: where the adapter (LoRA) or the weights (full) are saved; their size is reported.
    eval_batches: validation batches for the before/after losses (None: the whole validation text).
    """
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; expected one of {METHODS}")
    base_latency = forward_latency(model, repeats=latency_repeats) if latency_repeats else 0.0
    # the same windows as fit's periodic validation, so that val_curve is one consistent curve
    val_of = lambda: evaluate(model, corpus.val, batch_size=train_config.batch_size, max_batches=eval_batches)
    val_before = val_of()
    if method == "lora":
        apply_lora(model, lora or LoRAConfig(), seed=seed)
    report = parameter_report(model)
    result = fit(model, corpus.train, corpus.val, train_config, meta={"corpus": corpus.name, "method": method})
    val_after = val_of()
    run = FinetuneRun(
        label=label or method, method=method, trainable=report["trainable"], total=report["total"],
        percent=report["percent"], val_before=val_before, val_after=val_after,
        val_curve=[[0, val_before]] + result.val, optimizer_bytes=optimizer_state_bytes(model),
        step_seconds=(result.seconds - result.eval_seconds) / max(1, result.steps),
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        if method == "lora":
            save_lora(model, out_dir)
            run.saved_bytes = (out_dir / "adapter.safetensors").stat().st_size
        else:
            path = save_checkpoint(out_dir / "model.safetensors", model, None, {"method": "full", "corpus": corpus.name})
            run.saved_bytes = path.stat().st_size
    if latency_repeats:
        run.latency_ms["base"] = 1e3 * base_latency
        if method == "lora":
            run.latency_ms["unmerged"] = 1e3 * forward_latency(model, repeats=latency_repeats)
            merge_lora(model)
            run.latency_ms["merged"] = 1e3 * forward_latency(model, repeats=latency_repeats)
            unmerge_lora(model)
        else:
            run.latency_ms["merged"] = run.latency_ms["unmerged"] = 1e3 * forward_latency(model, repeats=latency_repeats)
    return run
