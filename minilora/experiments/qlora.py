"""QLoRA (Dettmers et al. 2023): does LoRA lose anything when its frozen base is stored in 4 bits?

QLoRA freezes the pretrained linear weights as 4-bit NormalFloat codes (NF4, blocks of 64, double-quantised
absmax: ~4.13 bits per weight instead of 32) and trains LoRA beside them in the compute dtype; the forward
dequantises W on the fly. The paper reports that this matches 16-bit LoRA on its benchmarks while the frozen
weights take about a quarter of their 16-bit memory. Here the baseline is float32, so the frozen weights shrink
about 7.8x.

Two things can move the fine-tuned loss: the quantisation error of the base itself (the pretrained model's
loss changes when its weights are rounded to NF4, before any training) and whether LoRA's adapter, trained on
the rounded weights, recovers it. The study measures both:

  1. The base alone: the pretrained model's test loss in float32 and with its linear layers in NF4 (no
     training; one number each, there is no seed).
  2. LoRA on Wq, Wv at r = R, alpha = ALPHA on the float base (method "lora") and on the NF4 base ("qlora"),
     python-email's declared split: each gets its own learning rate tuned on dev with the selection seed
     (common.select_and_report: the 1-3-10 grid around common.RunSettings.lora_lr, extended until interior),
     then one run per reporting seed on test. The verdict comes from the two 95% intervals (protocol.verdict:
     "not distinguishable" unless they separate); the paired difference per seed (QLoRA - LoRA, the same seed
     and data order) is reported with its interval too.
  3. Memory, counted from the arrays (not timed): the bytes of the frozen linear weights in float32 and in NF4,
     and methods.training_memory of one training step of each (parameters, gradients, AdamW moments,
     activations) on a batch of the run's size.

Scores are test cross-entropy in nats per character on the first eval_batches x batch_size windows of the
test half (common.RunSettings). Cost (default, 100 steps of 8 windows): about 5 to 7 dev runs and 3 test runs
per base, about 20 runs. ``fast=True``: 6 steps of 4 windows, the fast grid and 2 reporting seeds: seconds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core import backend
from ..core.lora import LoRAConfig
from ..core.methods import MethodSettings, apply_method, training_memory
from ..io.pretrained import load_pretrained
from ..train import evaluate
from . import common, protocol

STUDY = "qlora"
R = 4
ALPHA = 8.0
TARGETS = ("q_proj", "v_proj")
BASES = {"float32": False, "nf4": True}          # label -> common.run_lora's nf4
LABELS = {"float32": "LoRA, float32 base", "nf4": "QLoRA, NF4 base (double quant)"}
PAPER_LOSS = "QLoRA matches 16-bit LoRA (Dettmers et al. 2023, Tables 3 and 4)"
PAPER_MEMORY = "4-bit frozen weights: ~4.127 bits per weight with double quantisation (paper section 3)"


@dataclass
class QLoRAResult:
    """The numbers of the study; losses are test cross-entropy in nats per character, intervals are
    protocol.Interval dicts over the reporting seeds, bytes are counted from the arrays."""

    r: int
    alpha: float
    targets: list
    nf4: dict                                          # MethodSettings.nf4 as a dict: block_size, double_quant
    pretrained_loss: dict = field(default_factory=dict)   # {"float32": .., "nf4": ..}: the base before training
    tuned: dict = field(default_factory=dict)          # {base: {"lr", "interior", "dev_scores", "test", "losses"}}
    verdict: str = ""                                  # QLoRA against LoRA, from the two test intervals
    difference: dict = field(default_factory=dict)     # Interval of QLoRA - LoRA per reporting seed
    frozen_bytes: dict = field(default_factory=dict)   # {"float32": .., "nf4": .., "numbers": ..}
    memory: dict = field(default_factory=dict)         # {base: methods.training_memory}
    settings: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def frozen_bytes(model) -> dict:
    """{"numbers", "float32", "nf4", "nf4 bits per weight"} of a model's NF4 weights (packed_weights): how many
    numbers they hold, what those would take as float32, and what the codes and scales take."""
    packed = [w for _, m in model.named_modules() for w in m.packed_weights().values()]
    if not packed:
        raise ValueError("the model has no NF4 weights; quantise it first (quant.quantize_base)")
    numbers = sum(w.size for w in packed)
    stored = sum(w.nbytes for w in packed)
    return {"numbers": numbers, "float32": 4 * numbers, "nf4": stored, "nf4 bits per weight": 8 * stored / numbers}


def _memory(base: str, settings: common.RunSettings) -> dict:
    """methods.training_memory of one step of LoRA on the float32 or the NF4 base, on the first batch_size
    windows of the training text."""
    model = load_pretrained(dropout=0.0)
    apply_method(model, "qlora" if BASES[base] else "lora", _method_settings())
    T = model.config.block_size
    ids = common.downstream().train[:settings.batch_size * T + 1].astype(numpy.int64)
    idx = backend.asarray(ids[:-1].reshape(settings.batch_size, T))
    targets = backend.asarray(ids[1:].reshape(settings.batch_size, T))
    return training_memory(model, idx, targets)


def _method_settings() -> MethodSettings:
    return MethodSettings(lora=LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS))


def run(fast: bool = False, seed: int = 0) -> QLoRAResult:
    """The base alone, then LoRA on each base with its own tuned rate, then memory (see the module docstring).
    ``seed`` is accepted for the CLI; the protocol fixes the seeds (selection 0, reporting protocol.report_seeds)."""
    settings = common.RunSettings.for_mode(fast)
    seeds = protocol.report_seeds(fast)
    method_settings = _method_settings()
    report = common.progress_counter(STUDY, fast, len(BASES) * len(seeds))
    result = QLoRAResult(r=R, alpha=ALPHA, targets=list(TARGETS), nf4=asdict(method_settings.nf4),
                         settings=asdict(settings))

    # 1. the base alone: what rounding the pretrained weights to NF4 costs before any training
    test = common.held_out("test").val
    for base, nf4 in BASES.items():
        model = load_pretrained(dropout=0.0)
        if nf4:
            apply_method(model, "qlora", method_settings)      # B = 0: exactly the quantised base
            result.frozen_bytes = frozen_bytes(model)
        result.pretrained_loss[base] = evaluate(model, test, batch_size=settings.batch_size,
                                                max_batches=settings.eval_batches)

    # 2. LoRA on each base, its lr tuned on dev, reported on test
    tunings = {}
    for base, nf4 in BASES.items():
        def one(lr, seed, part, nf4=nf4):
            _, finetune_run = common.run_lora(TARGETS, R, seed, settings, ALPHA, lr=lr, part=part, nf4=nf4)
            return finetune_run.val_after

        chosen = common.select_and_report(one, common.lr_grid(settings.lora_lr, fast), fast, report=report,
                                          label=LABELS[base])
        tunings[base] = chosen.tuning
        result.tuned[base] = {"lr": chosen.tuning.best, "interior": chosen.tuning.interior,
                              "dev_scores": {f"{lr:g}": v for lr, v in sorted(chosen.tuning.scores.items())},
                              "test": asdict(chosen.test), "losses": chosen.test.values}
    result.verdict = protocol.verdict(result.tuned["nf4"]["test"], result.tuned["float32"]["test"], "QLoRA", "LoRA",
                                      lower_is_better=True)
    result.difference = asdict(protocol.interval(
        [q - f for q, f in zip(result.tuned["nf4"]["losses"], result.tuned["float32"]["losses"])]))

    # 3. memory of a training step, counted from the arrays
    result.memory = {base: _memory(base, settings) for base in BASES}
    result.protocol = protocol.protocol_record(
        common.split(), seeds, tunings, r=R, alpha=ALPHA, targets=list(TARGETS), nf4=result.nf4,
        runs="each base: lr tuned on dev (seed 0), one test run per reporting seed")
    result.findings = findings_of(result)
    return result


# ----------------------------------------------------------------------------------------------------
# reading the result


def findings_of(result: QLoRAResult) -> list:
    """The claims this study tests (protocol.finding dicts), each verdict from the 95% intervals."""
    q, f = (protocol.as_interval(result.tuned[b]["test"]) for b in ("nf4", "float32"))
    diff = protocol.as_interval(result.difference)
    fb = result.frozen_bytes
    return [
        protocol.finding(STUDY, f"LoRA r={result.r} on {', '.join(result.targets)}: NF4 base vs float32 base, each "
                                "with its own lr tuned on dev (test loss, nats/char)", PAPER_LOSS,
                         f"QLoRA {q.text()} (lr {result.tuned['nf4']['lr']:g}) vs LoRA {f.text()} "
                         f"(lr {result.tuned['float32']['lr']:g}); paired difference {diff.text()}", result.verdict),
        protocol.finding(STUDY, "bytes of the frozen linear weights, NF4 / float32 (counted)", PAPER_MEMORY,
                         f"{fb['nf4']:,} / {fb['float32']:,} = {fb['nf4'] / fb['float32']:.3f} "
                         f"({fb['nf4 bits per weight']:.3f} bits per weight)", "measured exactly (no spread)"),
    ]


def summary(result: QLoRAResult) -> str:
    s = result.settings
    split = result.protocol.get("split", {})
    fb = result.frozen_bytes
    rows = [f"QLoRA against LoRA: r = {result.r}, alpha = {result.alpha:g} on {', '.join(result.targets)}; NF4 blocks "
            f"of {result.nf4['block_size']}, double quantisation {result.nf4['double_quant']}; {s['steps']} steps of "
            f"{s['batch_size']} windows; test loss (nats/char)",
            f"protocol: train on {split.get('corpus', '?')} train, lr chosen on dev (seed "
            f"{result.protocol.get('selection_seed', 0)}), reported on test over seeds "
            f"{result.protocol.get('report_seeds', [])} (mean [95% CI])", "",
            f"pretrained model, no training: float32 {result.pretrained_loss['float32']:.4f}, NF4 "
            f"{result.pretrained_loss['nf4']:.4f} (rounding the base costs "
            f"{result.pretrained_loss['nf4'] - result.pretrained_loss['float32']:+.4f})", "",
            f"{'':34}{'lr':>8} {'test loss':>26}"]
    for base in BASES:
        t = result.tuned[base]
        rows.append(f"{LABELS[base]:34}{t['lr']:>8g}{'' if t['interior'] else '*'} "
                    f"{protocol.as_interval(t['test']).text():>26}")
    rows += [f"QLoRA - LoRA, paired by seed: {protocol.as_interval(result.difference).text()} -> {result.verdict}",
             "", f"frozen linear weights ({fb['numbers']:,} numbers): float32 {fb['float32']:,} bytes, NF4 "
                 f"{fb['nf4']:,} bytes = {fb['nf4'] / fb['float32']:.3f}x "
                 f"({fb['nf4 bits per weight']:.3f} bits/weight)",
             f"one training step (bytes): {'':14}" + "".join(f"{k:>13}" for k in result.memory["float32"])]
    for base in BASES:
        rows.append(f"  {LABELS[base]:38}" + "".join(f"{v:>13,}" for v in result.memory[base].values()))
    rows += ["", "findings:"]
    rows += [f"  - {f['claim']}: ours {f['ours']}; paper {f['paper']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(rows)


def plot(result: QLoRAResult, path) -> None:
    """Left: test loss of LoRA on each base (mean and 95% interval, each seed a dot) with the untrained bases as
    lines; right: the bytes of one training step of each, by part."""
    from ..plots import new_figure, save_figure

    fig, (left, right) = new_figure(1, 2, figsize=(12, 4.4))
    for i, base in enumerate(BASES):
        t = protocol.as_interval(result.tuned[base]["test"])
        left.errorbar([i], [t.mean], yerr=[[t.mean - t.low], [t.high - t.mean]], marker="o", capsize=5,
                      color=f"C{i}", label=f"{LABELS[base]} (lr {result.tuned[base]['lr']:g})")
        left.scatter([i] * len(t.values), t.values, color=f"C{i}", alpha=0.4, s=12)
        left.axhline(result.pretrained_loss[base], color=f"C{i}", linestyle=":", linewidth=1,
                     label=f"pretrained, {base}, untrained")
    left.set_xticks(range(len(BASES)), list(BASES))
    left.set(ylabel="test loss (nats / char)", title=f"LoRA r={result.r}: {result.verdict}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    parts = [k for k in result.memory["float32"] if k != "total"]
    bottom = numpy.zeros(len(BASES))
    for part in parts:
        values = numpy.array([result.memory[base][part] for base in BASES]) / 2 ** 20
        right.bar(list(BASES), values, bottom=bottom, label=part)
        bottom += values
    right.set(ylabel="MiB", title="one training step, by part (counted)")
    right.legend(fontsize=8)
    save_figure(fig, Path(path))
