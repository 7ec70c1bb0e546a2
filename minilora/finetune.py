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

A fine-tune checkpoints and resumes like pretraining: give ``train_config.out_dir`` and fit writes
``<train_config.out_dir>/checkpoint.safetensors`` (every checkpoint_every steps and at the end), which also
records what the run belongs with (method, settings, seed, data, the base model's sha256) and the untouched
model's score; ``finetune(..., resume_from=that file)`` with the same base model and arguments ends exactly
where the uninterrupted run would have: the same weights, curves, scores and saved file, bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy

from .core.lora import ADAPTER_WEIGHTS, LoRAConfig, parameter_report
from .core import backend
from .core.methods import METHODS, MethodSettings, apply_method, check_method, for_inference
from .core.methods import method as method_entry
from .core.methods import part_settings
from .core.model import GPT
from .data import Corpus
from .io.adapter_files import adapter_state, save_lora
from .io.vera_files import VERA_WEIGHTS, save_vera, vera_state
from .io.checkpoints import read_checkpoint, save_checkpoint
from .io.files import remove_stale_temporaries
from .timing import latency_verdict, paired_forward_samples, ratio_interval, spread
from .tasks import IGNORE, ClassificationTask, accuracy, task_batches
from .train import TrainConfig, check_finite, check_resumable, evaluate, fit


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


def _save_vera(model, out_dir: Path, meta: dict) -> Path:
    save_vera(model, out_dir)
    return out_dir / VERA_WEIGHTS


# the methods whose result is saved as a file minilora loads back: full fine-tuning as a checkpoint
# (train.load_checkpoint), LoRA as an adapter of kilobytes (load_lora; PEFT's format through interop)
SAVERS = {
    "full": Saver(check=_anything_goes, save=_save_full),
    "lora": Saver(check=adapter_state, save=_save_lora),     # adapter_state refuses what an adapter cannot hold
    "dora": Saver(check=adapter_state, save=_save_lora),     # LoRA's adapter with each layer's magnitude
    "vera": Saver(check=vera_state, save=_save_vera),        # the vectors; the shared pair comes from its seed
    "loraplus": Saver(check=adapter_state, save=_save_lora),  # LoRA's adapter; its config records the ratio
    "qlora": Saver(check=adapter_state, save=_save_lora),     # LoRA's adapter; loads onto the base quantised alike
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


# a measurement of at least this many rounds keeps going (up to LATENCY_MAX_FACTOR times as many rounds, or
# LATENCY_TIME_CAP_S seconds per batch size) until both ratios' 95% intervals are within LATENCY_PRECISION of
# their medians: a short measurement is a smoke test, a long one should settle what it reports
LATENCY_ADAPTIVE_FROM = 10
LATENCY_MAX_FACTOR = 4
LATENCY_TIME_CAP_S = 20.0
LATENCY_PRECISION = 0.02


def inference_latency(base: GPT, model: GPT, method: str, plan: dict, seq_len: int | None = None) -> dict:
    """{str(batch size): {"base", "unmerged", "merged", "ratio", "verdict", "rounds", "iqr_ms"}}: median ms of one
    evaluation-mode forward pass of the untouched model, the fine-tuned model (LoRA unmerged: the two-step
    adapter), and a copy of it made as cheap as the method allows (for_inference: LoRA merged, a prefix MLP baked;
    the same model again where nothing merges), the three taking turns round by round on the same tokens after a
    warm-up; "ratio": {"unmerged", "merged"} each [median, low, high] of the per-round ratio to the base, with
    its 95% interval (timing.ratio_interval); "verdict": what each interval says (timing.latency_verdict);
    "rounds": how many rounds were timed; "iqr_ms": each model's [q1, q3].
    plan: {batch size: repeats}; from LATENCY_ADAPTIVE_FROM repeats on, more rounds are taken until the
    intervals are narrow (see the constants above)."""
    ready = for_inference(copy.deepcopy(model), method)
    names = ("base", "unmerged", "merged")
    out = {}
    for batch, repeats in plan.items():
        samples = dict(zip(names, paired_forward_samples([base, model, ready], batch, repeats, seq_len)))
        start = time.perf_counter()
        while repeats >= LATENCY_ADAPTIVE_FROM and len(samples["base"]) < LATENCY_MAX_FACTOR * repeats \
                and time.perf_counter() - start < LATENCY_TIME_CAP_S:
            intervals = [ratio_interval(samples[name], samples["base"]) for name in ("unmerged", "merged")]
            if all(r.high - r.low <= 2 * LATENCY_PRECISION * r.median for r in intervals):
                break
            more = paired_forward_samples([base, model, ready], batch, repeats, seq_len)
            for name, extra in zip(names, more):
                samples[name] += extra
        timings = {name: 1e3 * spread(t).median for name, t in samples.items()}
        # each ratio from the same rounds as the times: [median, low, high] with its 95% interval
        intervals = {name: ratio_interval(samples[name], samples["base"]) for name in ("unmerged", "merged")}
        timings["ratio"] = {name: [r.median, r.low, r.high] for name, r in intervals.items()}
        timings["verdict"] = {name: latency_verdict(r) for name, r in intervals.items()}
        timings["rounds"] = len(samples["base"])
        timings["iqr_ms"] = {name: [1e3 * spread(t).low, 1e3 * spread(t).high] for name, t in samples.items()}
        out[str(batch)] = timings
    return out


def model_fingerprint(model: GPT) -> str:
    """sha256 of every parameter of ``model`` (names, shapes, dtypes and values, in name order): which base
    model a fine-tuning checkpoint was trained from."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        array = numpy.ascontiguousarray(backend.to_numpy(p.data))
        digest.update(json.dumps([name, list(array.shape), str(array.dtype)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _arrays_sha256(arrays) -> str:
    """sha256 of token arrays (shapes, dtypes and values, in order): the data a run trained and scored on."""
    digest = hashlib.sha256()
    for array in arrays:
        array = numpy.ascontiguousarray(backend.to_numpy(array))
        digest.update(json.dumps([list(array.shape), str(array.dtype)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _jsonable(value):
    """``value`` as it reads back from a checkpoint's JSON metadata (tuples become lists)."""
    return json.loads(json.dumps(value))


def run_record(model: GPT, method: str, settings: MethodSettings, seed: int, data, eval_batches) -> dict:
    """What a fine-tuning checkpoint belongs with, as JSON: the method, the settings of its parts, the seed of
    its initialisation, the data (its name and the sha256 of its token arrays), eval_batches, and
    the untouched base model (``model``, before the method is applied): its dtype and sha256."""
    parts = {part: dataclasses.asdict(part_settings(settings, part)) for part in method_entry(method).parts
             if dataclasses.is_dataclass(part_settings(settings, part))}
    if isinstance(data, ClassificationTask):
        source = {"task": data.name, "classes": list(data.classes), "length": data.length,
                  "sha256": _arrays_sha256([data.label_ids, *data.train, data.val_x, data.val_y])}
    else:
        source = {"corpus": data.name, "sha256": _arrays_sha256([data.train, data.val])}
    return _jsonable({"method": method, "settings": parts, "seed": seed, "data": source,
                      "eval_batches": eval_batches, "base_dtype": model.dtype,
                      "base_sha256": model_fingerprint(model)})


def _first_difference(saved, here, where: str):
    """(dotted key, saved value, this value) of the first difference between two JSON values, or None."""
    if isinstance(saved, dict) and isinstance(here, dict):
        for key in sorted(set(saved) | set(here), key=str):
            found = _first_difference(saved.get(key), here.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if saved == here else (where, saved, here)


def _check_finetune_checkpoint(path, meta: dict, record: dict) -> None:
    """A ValueError naming the first difference between the run a checkpoint belongs with and this one."""
    saved = meta.get("finetune")
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume {path} as a fine-tune: it records no fine-tuning run (a pretraining "
                         "checkpoint? resume it with train.fit, or start the fine-tune from its weights)")
    found = _first_difference(saved, record, "")
    if found:
        key, was, now = found
        what = "the base model's weights" if key == "base_sha256" else key
        raise ValueError(f"cannot resume {path}: it belongs with a fine-tune with {key}={was!r}, this run has "
                         f"{key}={now!r} ({what} differs: resume with the same base model, method, settings, "
                         "seed and data)")


def finetune(model: GPT, method: str, data: Corpus | ClassificationTask, train_config: TrainConfig,
             lora: LoRAConfig | None = None, out_dir=None, label: str | None = None, latency_repeats=20,
             eval_batches: int | None = None, seed: int = 0, *, settings: MethodSettings | None = None,
             evaluate_before: bool = True, resume_from=None) -> FinetuneRun:
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

    Checkpoints and resume:
        train_config.out_dir   where fit writes the run's checkpoint, ``checkpoint.safetensors`` (train.
                               CHECKPOINT_NAME) and its readable ``checkpoint.json``, every
                               train_config.checkpoint_every steps and at the end (0: only at the end); None: no
                               checkpoint. It may be out_dir itself: the names differ from the result's files
                               (adapter.safetensors / adapter_config.json, model.safetensors / model.json).
                               Its metadata holds run_record(...) under "finetune" and val_before; it keeps
                               the weights and AdamW moments of every parameter (the frozen base included).
        resume_from            such a checkpoint: continue the interrupted run. Give the same untouched base
                               model and the same method, settings, seed, data, eval_batches and train_config
                               (anything else is a ValueError naming the difference, before any evaluation or
                               training); the method is applied again as at the start, val_before is read from
                               the checkpoint, and fit restores weights, moments, generators and curves, so the
                               FinetuneRun (step_seconds and latency_ms aside: timings of this call) and the saved
                               file are bit-identical to the uninterrupted run's. A finished checkpoint resumes to
                               the end at once.
    Nothing non-finite is written: every parameter is checked before each checkpoint and before the result is
    saved (train.check_finite: a FloatingPointError, the last checkpoint untouched). When training starts, the
    stale temporaries of a killed run's atomic writes are cleared from out_dir and train_config.out_dir.
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

    checkpointing = train_config.out_dir is not None or resume_from is not None
    # which run a checkpoint belongs with; the base model's sha256 is taken before the method touches it
    record = run_record(model, method, settings, seed, data, eval_batches) if checkpointing else None
    base = copy.deepcopy(model) if evaluate_before or plan else None      # the untouched model, to compare with
    apply_method(model, method, settings, seed=seed)
    if out_dir is not None:
        SAVERS[method].check(model)
    saved_before = None
    if resume_from is not None:       # refuse another run's checkpoint before evaluating or training anything
        _, resumed = read_checkpoint(resume_from)
        _check_finetune_checkpoint(resume_from, resumed, record)
        check_resumable(resume_from, resumed, model, train_config)
        saved_before = resumed.get("val_before")
    if out_dir is not None:
        remove_stale_temporaries(out_dir)     # what a killed run's atomic writes left behind
    if not evaluate_before:
        val_before = None
    elif saved_before is not None:    # the score of this very base model and data, as the first run measured it
        val_before = saved_before
    else:
        val_before = score(base)
    # the checkpoint's metadata: what the run belongs with, and the score that resuming it will not recompute
    checkpoint_meta = dict(meta, finetune=record, val_before=val_before) if checkpointing else meta
    report = parameter_report(model)
    if task is None:
        result = fit(model, data.train, data.val, train_config, resume_from=resume_from, meta=checkpoint_meta)
    else:
        result = fit(model, config=train_config, resume_from=resume_from, meta=checkpoint_meta,
                     batches=task_batches(task, train_config.batch_size), ignore_index=IGNORE, validate=score)
    run = FinetuneRun(
        label=label or method, method=method, trainable=report["trainable"], total=report["total"],
        percent=report["percent"], val_before=val_before, val_after=score(model), metric=metric,
        val_curve=([[0, val_before]] if evaluate_before else []) + result.val, train_curve=result.train,
        optimizer_bytes=optimizer_state_bytes(model),
        # the steps this call ran (a resumed run: those after the checkpoint; none: 0.0)
        step_seconds=(result.seconds - result.eval_seconds) / result.steps_run if result.steps_run else 0.0,
    )
    if out_dir is not None:
        check_finite(model, result.steps, last_checkpoint=result.checkpoint)     # never save a NaN
        run.saved_bytes = SAVERS[method].save(model, Path(out_dir), meta).stat().st_size
    if plan:
        run.latency_ms = inference_latency(base, model, method, plan, seq_len)
    return run
