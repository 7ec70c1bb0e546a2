"""The methods compared (LoRA paper, Tables 1-4 in spirit): what each trains, how well, and what it costs.

For every method (full fine-tuning, BitFit, adapters, prefix tuning with and without Li and Liang's MLP,
prompt tuning, LoRA, LoRA + adapters, LoRA + prefix) at the budgets of ``methods.MethodSettings``, starting
from the shipped pretrained GPT, over several seeds:

    task scores   language modelling of the unseen code domain (validation bits per character, lower is
                  better) and the prose-or-package classification task (accuracy, higher is better)
    cost          trainable parameters, training step time, the memory a training step keeps (parameters,
                  gradients, AdamW state, activations), the checkpoint's size
    latency       inference (forward) time at batch 1 and batch 32 against the base model, after making the
                  model as cheap as the method allows (LoRA merged, a prefix MLP baked)

Every sequence has 112 real tokens so that the 8 virtual tokens of prefix and prompt tuning fit in the
block of 128; all methods see the same windows. Each method's learning rates (LEARNING_RATES) are the best of
{1e-3, 3e-3, 1e-2, 3e-2, 1e-1} on seed 0 at the default steps, separately for the two tasks
(``sweep_learning_rates`` reruns that choice).
"""
from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..data import get_batch
from ..io.files import save_safetensors, write_bytes_atomic, write_json
from ..finetune import FinetuneRun, finetune, forward_latency
from ..core.methods import METHODS, MethodSettings, check_method, method_state, training_memory
from ..core.methods import method as method_entry
from ..plots import new_figure, save_figure
from ..io.pretrained import load_pretrained
from ..tasks import accuracy, classifier_config, load_task
from ..train import TrainConfig, evaluate
from .common import bits_per_char, downstream, mean_and_spread, progress_counter

# (language modelling, classification) peak learning rates, picked on seed 0 (see the module docstring)
LEARNING_RATES = {
    "full": (1e-3, 1e-3),
    "bitfit": (1e-1, 1e-2),
    "adapters": (3e-2, 1e-2),
    "prefix": (1e-1, 1e-1),
    "prefix-mlp": (1e-2, 3e-3),
    "prompt": (1e-1, 1e-1),
    "lora": (3e-2, 1e-2),
    "lora+adapters": (3e-2, 3e-3),
    "lora+prefix": (3e-2, 3e-2),
}


@dataclass
class CompareSettings:
    """How long each run trains and how much is measured. ``fast()``: seconds, for tests."""

    methods: tuple = METHODS
    seeds: tuple = (0, 1, 2)
    seq_len: int = 112                 # real tokens per sequence (leaves room for 8 virtual tokens)
    lm_steps: int = 100
    lm_batch: int = 8
    lm_eval_batches: int = 16          # 16 x 8 validation windows of 112 characters
    cls_task: str = "prose-or-package"
    cls_steps: int = 300
    cls_batch: int = 16
    cls_length: int = 63
    cls_val_per_class: int = 128
    latency_repeats: int = 20
    method_settings: MethodSettings = field(default_factory=MethodSettings)

    @classmethod
    def fast(cls, **overrides):
        return cls(**{**dict(seeds=(0,), lm_steps=3, lm_batch=2, lm_eval_batches=1, cls_steps=3, cls_batch=4,
                             cls_val_per_class=2, latency_repeats=1), **overrides})


@dataclass
class MethodResult:
    method: str
    trainable: int
    percent: float
    lm_bpc: list                       # validation bits per character, one per seed
    lm_mean: float
    lm_spread: float
    accuracy: list                     # classification accuracy, one per seed
    acc_mean: float
    acc_spread: float
    lm_step_ms: float                  # mean over seeds
    cls_step_ms: float
    memory: dict                       # bytes: parameters, gradients, optimizer, activations, total
    checkpoint_bytes: int
    latency_ms: dict                   # {"1": ms at batch 1, "32": ms at batch 32}, as the method runs inference
    latency_ratio: dict                # the same over the base model's time, measured in turns with it
    latency_unmerged_ms: dict = field(default_factory=dict)     # LoRA methods: before merging
    latency_unmerged_ratio: dict = field(default_factory=dict)


@dataclass
class CompareResult:
    settings: dict
    base: dict                         # the pretrained model: lm_bpc, accuracy, latency_ms
    rows: list                         # MethodResult per method


LATENCY_BATCHES = (1, 32)


def _latency_plan(s: CompareSettings) -> dict:
    """{batch size: repeats} of the inference timings; batch 1 gets 5x the repeats (it is short)."""
    return {b: s.latency_repeats * (5 if b == 1 else 1) for b in LATENCY_BATCHES}


def _checkpoint_bytes(model, method) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "method.safetensors"
        save_safetensors(method_state(model, method), path)
        return path.stat().st_size


def _lm_run(method, seed, s: CompareSettings, lr=None, latency: bool = False) -> tuple:
    """Fine-tune a fresh copy of the shipped model on the code domain; returns (model, FinetuneRun), the run's
    scores in nats per token and, with latency, its inference timings at LATENCY_BATCHES."""
    model = load_pretrained(dropout=0.0)
    lr = lr or LEARNING_RATES[method][0]
    config = TrainConfig.for_finetuning(s.lm_steps, s.lm_batch, lr, warmup_steps=10, block_size=s.seq_len,
                                        eval_every=0, seed=seed, quiet=True)
    run = finetune(model, method, downstream(), config, settings=s.method_settings, seed=seed,
                   eval_batches=s.lm_eval_batches, latency_repeats=_latency_plan(s) if latency else 0,
                   evaluate_before=False)
    return model, run


def _cls_run(method, seed, task, s: CompareSettings, lr=None) -> FinetuneRun:
    """Train a fresh copy of the shipped model on the classification task; the run's scores are accuracies."""
    config = classifier_config(s.cls_steps, s.cls_batch, lr or LEARNING_RATES[method][1], seed=seed)
    return finetune(load_pretrained(dropout=0.0), method, task, config, settings=s.method_settings, seed=seed,
                    latency_repeats=0, evaluate_before=False)


def compare_methods(methods=None, seeds=None, fast: bool = False, settings: CompareSettings | None = None,
                    quiet: bool | None = None) -> CompareResult:
    """Run the comparison (see the module docstring); methods/seeds override the settings' own."""
    s = settings or (CompareSettings.fast() if fast else CompareSettings())
    if methods is not None:
        s.methods = tuple(methods)
    if seeds is not None:
        s.seeds = tuple(seeds)
    for m in s.methods:
        check_method(m)
    if not s.seeds:
        raise ValueError("need at least one seed")
    report = progress_counter("compare", fast if quiet is None else quiet, len(s.methods) * len(s.seeds) + 1)
    task = load_task(s.cls_task, length=s.cls_length, val_per_class=s.cls_val_per_class)
    base_model = load_pretrained(dropout=0.0)
    base = {
        "lm_bpc": bits_per_char(evaluate(base_model, downstream().val, batch_size=s.lm_batch, block_size=s.seq_len,
                                         max_batches=s.lm_eval_batches)),
        "accuracy": accuracy(base_model, task),
        "latency_ms": {str(b): 1e3 * forward_latency(base_model, b, repeats, s.seq_len)
                       for b, repeats in _latency_plan(s).items()},
    }
    report(f"base model: {base['lm_bpc']:.4f} bits/char, accuracy {base['accuracy']:.3f}")
    rows = []
    for method in s.methods:
        bpcs, accs, lm_ms, cls_ms = [], [], [], []
        for seed in s.seeds:
            first = seed == s.seeds[0]    # memory, checkpoint and latency from the first seed's LM model
            model, lm = _lm_run(method, seed, s, latency=first)
            cls = _cls_run(method, seed, task, s)
            bpcs.append(bits_per_char(lm.val_after))
            accs.append(cls.val_after)
            lm_ms.append(1e3 * lm.step_seconds)
            cls_ms.append(1e3 * cls.step_seconds)
            report(f"{method} seed {seed}: {bpcs[-1]:.4f} bits/char, accuracy {accs[-1]:.3f}")
            if first:
                measured, timings = model, lm.latency_ms
        idx, targets = get_batch(downstream().train, s.lm_batch, s.seq_len, numpy.random.default_rng(0))
        memory = training_memory(measured, idx, targets)
        trainable = measured.num_parameters(trainable_only=True)
        percent = 100.0 * trainable / base_model.num_parameters()
        checkpoint = _checkpoint_bytes(measured, method)
        # each ratio from the same rounds as the times: the base model took turns with the adapted one
        merges = method_entry(method).merges
        latency = {b: t["merged"] for b, t in timings.items()}
        latency_ratio = {b: t["ratio"]["merged"][0] for b, t in timings.items()}
        unmerged = {b: t["unmerged"] for b, t in timings.items()} if merges else {}
        unmerged_ratio = {b: t["ratio"]["unmerged"][0] for b, t in timings.items()} if merges else {}
        lm_mean, lm_spread = mean_and_spread(bpcs)
        acc_mean, acc_spread = mean_and_spread(accs)
        rows.append(MethodResult(method, trainable, percent, bpcs, lm_mean, lm_spread, accs, acc_mean, acc_spread,
                                 float(numpy.mean(lm_ms)), float(numpy.mean(cls_ms)), memory, checkpoint, latency,
                                 latency_ratio, unmerged, unmerged_ratio))
    settings_dict = asdict(s)
    return CompareResult(settings_dict, base, rows)


LM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
CLS_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def sweep_learning_rates(methods=None, fast: bool = False, settings: CompareSettings | None = None,
                         seed: int = 0, quiet: bool | None = None) -> dict:
    """How LEARNING_RATES were chosen: for each method, one seed at every rate of LM_GRID (language
    modelling) and CLS_GRID (classification). Returns {method: {"lm": {lr: bits/char}, "cls": {lr: accuracy},
    "best": (lm lr, cls lr)}}; a run that diverges counts as the worst score."""
    s = settings or (CompareSettings.fast() if fast else CompareSettings())
    methods = tuple(methods or s.methods)
    for m in methods:
        check_method(m)
    task = load_task(s.cls_task, length=s.cls_length, val_per_class=s.cls_val_per_class)
    report = progress_counter("sweep", fast if quiet is None else quiet, len(methods) * (len(LM_GRID) + len(CLS_GRID)))
    out = {}
    for method in methods:
        lm, cls = {}, {}
        for lr in LM_GRID:
            try:
                lm[lr] = bits_per_char(_lm_run(method, seed, s, lr=lr)[1].val_after)
            except FloatingPointError:
                lm[lr] = float("inf")
            report(f"{method} LM lr {lr:g}: {lm[lr]:.4f} bits/char")
        for lr in CLS_GRID:
            try:
                cls[lr] = _cls_run(method, seed, task, s, lr=lr).val_after
            except FloatingPointError:
                cls[lr] = 0.0
            report(f"{method} classification lr {lr:g}: accuracy {cls[lr]:.3f}")
        out[method] = {"lm": lm, "cls": cls, "best": (min(lm, key=lm.get), max(cls, key=cls.get))}
    return out


def run(fast: bool = False, seed: int = 0) -> CompareResult:
    """``minilora experiment compare``: every method over three seeds (one when fast)."""
    seeds = (seed,) if fast else (seed, seed + 1, seed + 2)
    return compare_methods(seeds=seeds, fast=fast)


# ----------------------------------------------------------------------------------------------------
# output: table, CSV, plots

COLUMNS = ("method", "trainable", "percent", "lm_bpc_mean", "lm_bpc_spread", "accuracy_mean", "accuracy_spread",
           "lm_step_ms", "cls_step_ms", "train_memory_mb", "activations_mb", "checkpoint_kb", "latency_b1_ms",
           "latency_b1_vs_base", "latency_b32_ms", "latency_b32_vs_base")


def table_rows(result: CompareResult) -> list:
    """One dict per method with the COLUMNS (plus a first row for the base model)."""
    base_lat = result.base["latency_ms"]
    rows = [{"method": "base (no training)", "trainable": 0, "percent": 0.0, "lm_bpc_mean": result.base["lm_bpc"],
             "accuracy_mean": result.base["accuracy"], "latency_b1_ms": base_lat["1"], "latency_b1_vs_base": 1.0,
             "latency_b32_ms": base_lat["32"], "latency_b32_vs_base": 1.0}]
    for r in result.rows:
        r = r if isinstance(r, MethodResult) else MethodResult(**r)
        rows.append({
            "method": r.method, "trainable": r.trainable, "percent": r.percent, "lm_bpc_mean": r.lm_mean,
            "lm_bpc_spread": r.lm_spread, "accuracy_mean": r.acc_mean, "accuracy_spread": r.acc_spread,
            "lm_step_ms": r.lm_step_ms, "cls_step_ms": r.cls_step_ms, "train_memory_mb": r.memory["total"] / 2**20,
            "activations_mb": r.memory["activations"] / 2**20, "checkpoint_kb": r.checkpoint_bytes / 1024,
            "latency_b1_ms": r.latency_ms["1"], "latency_b1_vs_base": r.latency_ratio["1"],
            "latency_b32_ms": r.latency_ms["32"], "latency_b32_vs_base": r.latency_ratio["32"],
        })
    return rows


def summary(result: CompareResult) -> str:
    """The comparison as a text table (mean +- standard deviation over seeds)."""
    n = len(result.settings["seeds"])
    lines = [f"{'method':<19}{'trainable':>10}{'%':>8}  {'LM bits/char':<17}{'accuracy':<15}"
             f"{'step ms':>8}{'mem MB':>8}{'ckpt KB':>9}{'b1 ms':>8}{'x base':>7}{'b32 ms':>8}{'x base':>7}"]
    for row in table_rows(result):
        lm = f"{row['lm_bpc_mean']:.4f}" + (f" +- {row['lm_bpc_spread']:.4f}" if "lm_bpc_spread" in row else "")
        acc = f"{row['accuracy_mean']:.3f}" + (f" +- {row['accuracy_spread']:.3f}" if "accuracy_spread" in row else "")
        cost = (f"{row['lm_step_ms']:>8.1f}{row['train_memory_mb']:>8.1f}{row['checkpoint_kb']:>9.1f}"
                if "lm_step_ms" in row else f"{'':>8}{'':>8}{'':>9}")
        lines.append(f"{row['method']:<19}{row['trainable']:>10,}{row['percent']:>8.3f}  {lm:<17}{acc:<15}{cost}"
                     f"{row['latency_b1_ms']:>8.2f}{row['latency_b1_vs_base']:>7.2f}"
                     f"{row['latency_b32_ms']:>8.1f}{row['latency_b32_vs_base']:>7.2f}")
    for r in result.rows:
        r = r if isinstance(r, MethodResult) else MethodResult(**r)
        if r.latency_unmerged_ms:
            lines.append(f"  {r.method} before merging: batch 1 {r.latency_unmerged_ms['1']:.2f} ms "
                         f"(x{r.latency_unmerged_ratio['1']:.2f}), batch 32 {r.latency_unmerged_ms['32']:.1f} ms "
                         f"(x{r.latency_unmerged_ratio['32']:.2f})")
    lines.append(f"({n} seed{'s' if n > 1 else ''}; LM: {result.settings['lm_steps']} steps of "
                 f"{result.settings['lm_batch']} x {result.settings['seq_len']}; classification: "
                 f"{result.settings['cls_steps']} steps of {result.settings['cls_batch']} snippets; step ms is the "
                 f"LM step; memory is what a training step keeps; latency after merging LoRA / baking a prefix MLP, x base "
                 f"measured taking turns with the base model)")
    return "\n".join(lines)


def write_csv(result: CompareResult, path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table_rows(result):
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    write_bytes_atomic(path, out.getvalue().encode())


def plot(result: CompareResult, path) -> None:
    """Three panels: LM bits/char and accuracy against trainable parameters (log scale), and latency bars at
    batch 1 and 32 relative to the base model."""
    rows = [r if isinstance(r, MethodResult) else MethodResult(**r) for r in result.rows]
    fig, axes = new_figure(1, 3, figsize=(17, 5))
    for ax, key, spread, label, base in ((axes[0], "lm_mean", "lm_spread", "validation bits/char (lower is better)",
                                          result.base["lm_bpc"]),
                                         (axes[1], "acc_mean", "acc_spread", "classification accuracy",
                                          result.base["accuracy"])):
        for r in rows:
            ax.errorbar(r.trainable, getattr(r, key), yerr=getattr(r, spread), fmt="o", capsize=3)
            ax.annotate(r.method, (r.trainable, getattr(r, key)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(base, color="gray", linestyle=":", label="pretrained, no training")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    bars = [(r.method, r.latency_ratio) for r in rows]
    bars += [(f"{r.method} (unmerged)", r.latency_unmerged_ratio) for r in rows if r.latency_unmerged_ratio]
    x = numpy.arange(len(bars))
    for offset, batch in ((-0.2, "1"), (0.2, "32")):
        axes[2].bar(x + offset, [ratio[batch] for _, ratio in bars], width=0.4, label=f"batch {batch}")
    highest = max(max(ratio.values()) for _, ratio in bars)
    axes[2].set_ylim(min(0.9, min(min(ratio.values()) for _, ratio in bars) - 0.02), highest + 0.05)
    axes[2].axhline(1.0, color="gray", linestyle=":")
    axes[2].set_xticks(x, [name for name, _ in bars], rotation=45, ha="right")
    axes[2].set_ylabel("inference latency / base model (taking turns)")
    axes[2].legend()
    axes[2].set_title("inference cost after merging LoRA / baking the prefix MLP")
    save_figure(fig, path)


def save(result: CompareResult, out_dir) -> list:
    """table.csv, result.json and plot.png in out_dir; returns the paths."""
    out = Path(out_dir)
    paths = [out / "table.csv", out / "result.json", out / "plot.png"]
    write_csv(result, paths[0])
    write_json(paths[1], asdict(result))
    plot(result, paths[2])
    return paths
