"""The methods compared under the protocol (LoRA paper, Tables 1-4 in spirit): what each trains, how well, and
what it costs.

Every method (full fine-tuning, BitFit, adapters, prefix tuning with and without Li and Liang's MLP, prompt
tuning, LoRA, LoRA + adapters, LoRA + prefix) at the budgets of ``methods.MethodSettings``, from the shipped
pretrained GPT, on two tasks, each under the protocol of experiments/protocol.py:

    language modelling  of the unseen code domain: train on python-email's training text; dev and test are the
                        first and the second half of its held-out text (common.split()); the score is bits per
                        character (lower is better) on the first lm_eval_batches x lm_batch windows of seq_len
                        characters of dev (selection) or test (report)
    classification      the prose-or-package task: its held-out snippets cut per class into dev (first half) and
                        test (second half) by protocol.split_task; the score is accuracy (higher is better)
    learning rates      tuned per configuration and per task on dev with the selection seed 0 (protocol.tune):
                        the first three rates of the 1-3-10 series around GRID_CENTRES[method], extended one
                        rate at a time until the best is interior (at most max_extensions times)
    reported            one fresh run per reporting seed (1, 2, 3) at the tuned rate, scored on test: the mean
                        and its 95% interval (protocol.interval); each method's verdict against full
                        fine-tuning from the intervals (protocol.verdict: better only when they do not overlap)
    cost                trainable parameters, step time (mean over the reporting runs), the memory a training
                        step keeps (parameters, gradients, AdamW state, activations), the checkpoint's size
    latency             inference (forward) time at batch 1 and batch 32 against the base model, measured taking
                        turns with it, after making the model as cheap as the method allows (LoRA merged, a
                        prefix MLP baked): the first reporting seed's language-modelling model

Matched budgets. Each method of ``MATCHED`` (BitFit, adapters, prefix and prompt tuning: the methods whose
trained numbers are what they store) is set against LoRA at the rank and target set whose trainable count is
nearest to the method's own (``matched_lora``: ranks 1, 2, ... on the target sets of TARGET_SETS, the paper's
Wq, Wv first; ties go to the earlier target set, i.e. to more matrices at a lower rank, which the paper's
Table 5 favours). Each such LoRA gets its own tuned rates and its own reporting runs; where it coincides with
the ``lora`` method (same rank, targets and scale) that row is reused. LoRA's scale alpha / r is 2 throughout.

Every sequence has 112 real tokens so that the 8 virtual tokens of prefix and prompt tuning fit in the block
of 128; all methods see the same windows.
"""
from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from ..core.lora import LoRAConfig
from ..core.methods import METHODS, MethodSettings, apply_method, check_method, method_state, training_memory
from ..core.methods import method as method_entry
from ..data import get_batch
from ..finetune import finetune, forward_latency
from ..io.files import save_safetensors, write_bytes_atomic, write_json
from ..io.pretrained import load_pretrained
from ..plots import new_figure, save_figure
from ..tasks import accuracy, classifier_config, load_task
from ..train import TrainConfig, evaluate
from . import common, protocol
from .common import bits_per_char, downstream

STUDY = "compare"

# (language modelling, classification): the middle rate of each method's first three; protocol.tune extends the
# grid from there until the best rate is interior, so a centre only decides where the search starts
GRID_CENTRES = {
    "full": (1e-3, 3e-4),
    "bitfit": (1e-1, 1e-2),
    "adapters": (3e-2, 1e-2),
    "prefix": (1e-1, 1e-1),
    "prefix-mlp": (1e-2, 3e-3),
    "prompt": (1e-1, 1e-1),
    "lora": (3e-2, 3e-2),
    "lora+adapters": (3e-2, 3e-3),
    "lora+prefix": (3e-2, 3e-2),
    "dora": (3e-2, 3e-2),
    "vera": (1e-1, 1e-1),
    "loraplus": (1e-2, 1e-2),
    "qlora": (3e-2, 3e-2),
}

# the methods set against LoRA at a matched trainable count, and the target sets LoRA may use to match them
MATCHED = ("bitfit", "adapters", "prefix", "prompt")
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj"),
               ("q_proj",))
LORA_SCALE = 2.0             # alpha / r of every LoRA configuration (the default lora method's 8 / 4)
TASKS = ("lm", "cls")
TASK_NAMES = {"lm": "language modelling", "cls": "classification"}


@dataclass
class CompareSettings:
    """How long each run trains and how much is measured. ``fast()``: seconds, for tests.

    seeds: the reporting seeds (never the selection seed 0; at least two, for an interval)."""

    methods: tuple = METHODS
    seeds: tuple = protocol.REPORT_SEEDS
    seq_len: int = 112                 # real tokens per sequence (leaves room for 8 virtual tokens)
    lm_steps: int = 100
    lm_batch: int = 8
    lm_eval_batches: int = 16          # 16 x 8 windows of 112 characters of dev or test
    cls_task: str = "prose-or-package"
    cls_steps: int = 300
    cls_batch: int = 8
    cls_length: int = 63
    cls_val_per_class: int = 128       # held-out snippets per class: half dev, half test
    latency_repeats: int = 20
    max_extensions: int = 4            # of each learning-rate grid
    matched: tuple = MATCHED
    method_settings: MethodSettings = field(default_factory=MethodSettings)

    @classmethod
    def fast(cls, **overrides):
        return cls(**{**dict(seeds=protocol.FAST_REPORT_SEEDS, lm_steps=3, lm_batch=2, lm_eval_batches=1,
                             cls_steps=3, cls_batch=4, cls_val_per_class=4, latency_repeats=1, max_extensions=1,
                             matched=()),
                      **overrides})


@dataclass(frozen=True)
class Configuration:
    """One row of the comparison: a method, and for LoRA variants the LoRAConfig that replaces the default."""

    label: str
    method: str
    lora: LoRAConfig | None = None


@dataclass
class MethodResult:
    method: str                        # the row's label: a method name, or a matched LoRA such as "lora r=3 q,v"
    trainable: int
    percent: float
    lm: dict                           # test bits per character over the reporting seeds: protocol.Interval
    accuracy: dict                     # test accuracy over the reporting seeds: protocol.Interval
    lm_lr: float                       # the tuned rates
    cls_lr: float
    lm_vs_full: str                    # protocol.verdict against full fine-tuning's interval
    accuracy_vs_full: str
    lm_step_ms: float                  # mean over the reporting runs
    cls_step_ms: float
    memory: dict                       # bytes: parameters, gradients, optimizer, activations, total
    checkpoint_bytes: int
    latency_ms: dict = field(default_factory=dict)     # {"1": ms at batch 1, "32": ms at batch 32}, merged
    latency_ratio: dict = field(default_factory=dict)  # the same over the base model's time, from the same rounds
    latency_unmerged_ms: dict = field(default_factory=dict)     # LoRA methods: before merging
    latency_unmerged_ratio: dict = field(default_factory=dict)
    latency_interval: dict = field(default_factory=dict)        # {"1": [median, low, high]} of the merged ratio
    latency_verdict: dict = field(default_factory=dict)         # {"1": timing.latency_verdict of it}

    @property
    def lm_mean(self) -> float:
        return self.lm["mean"]

    @property
    def acc_mean(self) -> float:
        return self.accuracy["mean"]


@dataclass
class CompareResult:
    settings: dict
    base: dict                         # the pretrained model on test: lm_bpc, accuracy, latency_ms
    rows: list                         # MethodResult per method, in the order of settings["methods"]
    matched_rows: list                 # MethodResult of the matched LoRA configurations that are not a method
    matched: list                      # one dict per matched pair (see matched_pairs)
    protocol: dict
    findings: list


# ----------------------------------------------------------------------------------------------------
# matching budgets


def lora_trainable(r: int, targets, n_layer: int, n_embd: int) -> int:
    """Trainable numbers of LoRA at rank r on ``targets`` (attention projections, C x C each) in every block."""
    return common.attention_lora_parameters(r, targets, n_layer, n_embd)


def matched_lora(budget: int, n_layer: int, n_embd: int) -> tuple:
    """(r, targets) of the LoRA configuration whose trainable count is nearest to ``budget``: every rank from 1
    to n_embd on every target set of TARGET_SETS; a tie goes to the earlier target set."""
    best = None
    for order, targets in enumerate(TARGET_SETS):
        for r in range(1, n_embd + 1):
            key = (abs(lora_trainable(r, targets, n_layer, n_embd) - budget), order)
            if best is None or key < best[0]:
                best = (key, r, targets)
    return best[1], best[2]


def lora_label(r: int, targets) -> str:
    return f"lora r={r} " + ",".join(t.split("_")[0] for t in targets)


def _trainable(method: str, settings: MethodSettings) -> int:
    return apply_method(load_pretrained(dropout=0.0), method, settings).num_parameters(trainable_only=True)


def _is_default_lora(r: int, targets, settings: MethodSettings) -> bool:
    lora = settings.lora
    return (lora.r, tuple(lora.targets), lora.scale, lora.use_rslora) == (r, tuple(targets), LORA_SCALE, False)


def plan_matches(s: CompareSettings) -> list:
    """[(method, its trainable count, Configuration of the matched LoRA)] for the methods of s.matched that are
    in s.methods; the Configuration is the ``lora`` method itself where that is the match."""
    config = load_pretrained(dropout=0.0).config
    plans = []
    for m in s.matched:
        if m not in s.methods:
            continue
        budget = _trainable(m, s.method_settings)
        r, targets = matched_lora(budget, config.n_layer, config.n_embd)
        if _is_default_lora(r, targets, s.method_settings):
            lora = Configuration("lora", "lora")
        else:
            lora = Configuration(lora_label(r, targets), "lora", LoRAConfig(r=r, alpha=LORA_SCALE * r, targets=targets))
        plans.append((m, budget, lora))
    return plans


# ----------------------------------------------------------------------------------------------------
# runs


LATENCY_BATCHES = (1, 32)


def _latency_plan(s: CompareSettings) -> dict:
    """{batch size: repeats} of the inference timings; batch 1 gets 5x the repeats (it is short)."""
    return {b: s.latency_repeats * (5 if b == 1 else 1) for b in LATENCY_BATCHES}


def _checkpoint_bytes(model, method) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "method.safetensors"
        save_safetensors(method_state(model, method), path)
        return path.stat().st_size


def _lm_run(config: Configuration, seed: int, part: str, lr: float, s: CompareSettings, latency: bool = False):
    """Fine-tune a fresh copy of the shipped model on the code domain, scored on ``part`` ("dev" or "test");
    returns (model, FinetuneRun): scores in nats per token and, with latency, inference timings."""
    model = load_pretrained(dropout=0.0)
    train_config = TrainConfig.for_finetuning(s.lm_steps, s.lm_batch, lr, warmup_steps=10, block_size=s.seq_len,
                                              eval_every=0, seed=seed, quiet=True)
    run = finetune(model, config.method, common.held_out(part), train_config, config.lora,
                   settings=s.method_settings, seed=seed, eval_batches=s.lm_eval_batches,
                   latency_repeats=_latency_plan(s) if latency else 0, evaluate_before=False)
    return model, run


def _cls_run(config: Configuration, seed: int, task, lr: float, s: CompareSettings):
    """Train a fresh copy of the shipped model on a classification task (its dev or its test copy); the run's
    scores are accuracies on that copy's held-out snippets."""
    train_config = classifier_config(s.cls_steps, s.cls_batch, lr, seed=seed)
    return finetune(load_pretrained(dropout=0.0), config.method, task, train_config, config.lora,
                    settings=s.method_settings, seed=seed, latency_repeats=0, evaluate_before=False)


def _first_rates(centre: float) -> tuple:
    """The three consecutive rates of the 1-3-10 series around ``centre`` (two at either end of the series)."""
    i = protocol.LR_SERIES.index(centre)
    return protocol.LR_SERIES[max(0, i - 1):i + 2]


@dataclass
class _Protocolled:
    tuning: protocol.Tuning
    test: protocol.Interval
    runs: list                 # the reporting runs' FinetuneRuns
    measured: object = None    # the first reporting seed's model (language modelling)


def _select_and_report(config: Configuration, task_key: str, s: CompareSettings, parts: dict, say) -> _Protocolled:
    """Tune the rate on dev with the selection seed (protocol.tune), then one run per reporting seed on test."""
    centre = GRID_CENTRES[config.method][TASKS.index(task_key)]
    lower_is_better = task_key == "lm"
    measure_latency = config.label == config.method          # the methods' own rows, not the matched LoRAs

    def one(lr, seed, part):
        if task_key == "lm":
            first = part == "test" and seed == s.seeds[0]
            model, run = _lm_run(config, seed, part, lr, s, latency=first and measure_latency)
            return bits_per_char(run.val_after), run, (model if first else None)
        run = _cls_run(config, seed, parts[part], lr, s)
        return run.val_after, run, None

    tuning = protocol.tune(lambda lr: one(lr, protocol.SELECTION_SEED, "dev")[0], _first_rates(centre),
                           lower_is_better, max_extensions=s.max_extensions)
    scores, runs, measured = [], [], None
    for seed in s.seeds:
        score, run, model = one(tuning.best, seed, "test")
        scores.append(score)
        runs.append(run)
        measured = measured if model is None else model
    test = protocol.interval(scores)
    say(f"{config.label} {TASK_NAMES[task_key]}: {tuning.describe()}; test {test.text(4 if lower_is_better else 3)}")
    return _Protocolled(tuning, test, runs, measured)


def _row(config: Configuration, lm: _Protocolled, cls: _Protocolled, s: CompareSettings, total: int) -> MethodResult:
    model = lm.measured
    idx, targets = get_batch(downstream().train, s.lm_batch, s.seq_len, numpy.random.default_rng(0))
    trainable = model.num_parameters(trainable_only=True)
    row = MethodResult(
        config.label, trainable, 100.0 * trainable / total, asdict(lm.test), asdict(cls.test),
        lm.tuning.best, cls.tuning.best, "", "",
        float(numpy.mean([1e3 * r.step_seconds for r in lm.runs])),
        float(numpy.mean([1e3 * r.step_seconds for r in cls.runs])),
        training_memory(model, idx, targets), _checkpoint_bytes(model, config.method))
    timings = lm.runs[0].latency_ms
    if timings:
        # each ratio from the same rounds as the times: the base model took turns with the adapted one
        row.latency_ms = {b: t["merged"] for b, t in timings.items()}
        row.latency_ratio = {b: t["ratio"]["merged"][0] for b, t in timings.items()}
        row.latency_interval = {b: t["ratio"]["merged"] for b, t in timings.items()}
        row.latency_verdict = {b: t["verdict"]["merged"] for b, t in timings.items()}
        if method_entry(config.method).merges:
            row.latency_unmerged_ms = {b: t["unmerged"] for b, t in timings.items()}
            row.latency_unmerged_ratio = {b: t["ratio"]["unmerged"][0] for b, t in timings.items()}
    return row


def _check(s: CompareSettings) -> None:
    for m in s.methods:
        check_method(m)
    if not s.methods:
        raise ValueError("need at least one method")
    if len(s.seeds) < 2 or protocol.SELECTION_SEED in s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise ValueError(f"reporting seeds must be at least two different seeds, none of them the selection seed "
                         f"{protocol.SELECTION_SEED}; got {tuple(s.seeds)}")
    for m in s.matched:
        check_method(m)


def compare_methods(methods=None, seeds=None, fast: bool = False, settings: CompareSettings | None = None,
                    quiet: bool | None = None) -> CompareResult:
    """Run the comparison (see the module docstring); methods / seeds (reporting seeds) override the settings'."""
    s = settings or (CompareSettings.fast() if fast else CompareSettings())
    if methods is not None:
        s.methods = tuple(methods)
    if seeds is not None:
        s.seeds = tuple(seeds)
    _check(s)
    quiet = fast if quiet is None else quiet
    say = lambda text: common.progress(STUDY, quiet, text)
    task = load_task(s.cls_task, length=s.cls_length, val_per_class=s.cls_val_per_class)
    parts = dict(zip(common.PARTS, protocol.split_task(task)))
    base_model = load_pretrained(dropout=0.0)
    total = base_model.num_parameters()
    base = {
        "lm_bpc": bits_per_char(evaluate(base_model, common.held_out("test").val, batch_size=s.lm_batch,
                                         block_size=s.seq_len, max_batches=s.lm_eval_batches)),
        "accuracy": accuracy(base_model, parts["test"]),
        "latency_ms": {str(b): 1e3 * forward_latency(base_model, b, repeats, s.seq_len)
                       for b, repeats in _latency_plan(s).items()},
    }
    say(f"base model (test): {base['lm_bpc']:.4f} bits/char, accuracy {base['accuracy']:.3f}")
    plans = plan_matches(s)
    configurations = [Configuration(m, m) for m in s.methods]
    configurations += list({lora.label: lora for _, _, lora in plans if lora.label not in s.methods}.values())
    tunings, by_label = {}, {}
    for config in configurations:
        done = {key: _select_and_report(config, key, s, parts, say) for key in TASKS}
        tunings.update({f"{config.label} ({TASK_NAMES[key]})": done[key].tuning for key in TASKS})
        by_label[config.label] = _row(config, done["lm"], done["cls"], s, total)
    full = by_label.get("full")
    for row in by_label.values():
        row.lm_vs_full = _versus(row, full, "lm")
        row.accuracy_vs_full = _versus(row, full, "accuracy")
    rows = [by_label[m] for m in s.methods]
    matched_rows = [by_label[c.label] for c in configurations if c.label not in s.methods]
    matched = matched_pairs(plans, by_label)
    result = CompareResult(asdict(s), base, rows, matched_rows, matched, {}, [])
    result.protocol = protocol.protocol_record(
        common.split(), s.seeds, tunings,
        classification_split={"task": s.cls_task, "snippet_length": s.cls_length,
                              "dev_snippets": int(len(parts["dev"].val_y)),
                              "test_snippets": int(len(parts["test"].val_y)),
                              "dev": "first half of each class's held-out snippets",
                              "test": "second half of each class's held-out snippets"},
        first_grid="three consecutive rates of the 1-3-10 series around GRID_CENTRES; extended until interior "
                   f"(at most {s.max_extensions} extension{'' if s.max_extensions == 1 else 's'})",
        steps={"language_modelling": f"{s.lm_steps} steps of {s.lm_batch} x {s.seq_len} characters",
               "classification": f"{s.cls_steps} steps of {s.cls_batch} snippets"},
        matched_budget="LoRA at the rank and target set (of TARGET_SETS) whose trainable count is nearest to the "
                       "method's; alpha / r = 2; its own tuned rates")
    result.findings = findings(result)
    return result


def _versus(row: MethodResult, full: MethodResult | None, score: str) -> str:
    """The row's verdict against full fine-tuning on one score ("lm" or "accuracy")."""
    if full is None:
        return "no full fine-tuning run"
    if row is full:
        return "(reference)"
    return protocol.verdict(getattr(row, score), getattr(full, score), row.method, "full",
                            lower_is_better=score == "lm")


def matched_pairs(plans, by_label: dict) -> list:
    """One dict per matched pair: the method and its trainable count, the LoRA configuration and its count, the
    relative difference of the counts, and the verdicts of LoRA against the method on each task."""
    out = []
    for method, budget, lora in plans:
        mine, theirs = by_label[lora.label], by_label[method]
        out.append({"method": method, "trainable": budget, "lora": lora.label, "lora_trainable": mine.trainable,
                    "difference": (mine.trainable - budget) / budget,
                    "lm_verdict": protocol.verdict(mine.lm, theirs.lm, lora.label, method, lower_is_better=True),
                    "accuracy_verdict": protocol.verdict(mine.accuracy, theirs.accuracy, lora.label, method,
                                                         lower_is_better=False)})
    return out


# ----------------------------------------------------------------------------------------------------
# findings: each claim of the paper tested here

PAPER_VERSUS_FULL = {
    "lm": "GPT-2 M on E2E (Table 3): LoRA 70.4 BLEU with 0.35M trainable vs full fine-tuning 68.2 with 354.92M",
    "cls": "RoBERTa-base on GLUE (Table 2): LoRA 87.2 average with 0.3M trainable vs full fine-tuning 86.4 with 125M",
}
PAPER_MATCHED = {
    "adapters": "GPT-2 M on E2E (Table 3): LoRA 70.4 BLEU (0.35M) vs Adapter-L 66.3 (0.37M)",
    "prefix": "GPT-2 M on E2E (Table 3): LoRA 70.4 BLEU (0.35M) vs prefix-layer tuning 69.7 (0.35M)",
    "bitfit": "RoBERTa-base on GLUE (Table 2): LoRA 87.2 average (0.3M) vs BitFit 85.2 (0.1M)",
    "prompt": "GPT-3 on WikiSQL (Table 4): LoRA 73.4 (4.7M) vs prefix-embedding tuning 63.1 (3.2M)",
}
PAPER_LATENCY = ("GPT-2 M, batch 1, 128 tokens (Table 1): adapters add 20.7% (Adapter-L) and 30.3% (Adapter-H); "
                 "merged LoRA adds none")


def _interval_text(value: dict, lower_is_better: bool) -> str:
    """bits/char to 4 decimals, accuracies to 3."""
    return protocol.as_interval(value).text(4 if lower_is_better else 3)


def findings(result: CompareResult) -> list:
    """The claims this comparison tests, each with the paper's number, ours and the verdict of the intervals."""
    rows = {r.method: r for r in map(_as_row, result.rows + result.matched_rows)}
    n = len(result.settings["seeds"])
    out = []
    if "lora" in rows and "full" in rows:
        lora, full = rows["lora"], rows["full"]
        for key, score, unit, lower in (("lm", "lm", "bits/char", True), ("cls", "accuracy", "accuracy", False)):
            out.append(protocol.finding(
                STUDY, f"LoRA (r=4 on Wq, Wv) matches full fine-tuning ({TASK_NAMES[key]})", PAPER_VERSUS_FULL[key],
                f"{unit} on test, {n} seeds: LoRA {_interval_text(getattr(lora, score), lower)} vs full "
                f"{_interval_text(getattr(full, score), lower)}",
                protocol.verdict(getattr(lora, score), getattr(full, score), "LoRA", "full fine-tuning", lower)))
    for pair in result.matched:
        mine, theirs = rows[pair["lora"]], rows[pair["method"]]
        out.append(protocol.finding(
            STUDY, f"LoRA beats {pair['method']} at a matched budget ({pair['lora']}, {pair['lora_trainable']:,} "
                   f"trainable vs {pair['trainable']:,})", PAPER_MATCHED.get(pair["method"], ""),
            f"bits/char {_interval_text(mine.lm, True)} vs {_interval_text(theirs.lm, True)}; accuracy "
            f"{_interval_text(mine.accuracy, False)} vs {_interval_text(theirs.accuracy, False)}",
            f"language modelling: {pair['lm_verdict']}; classification: {pair['accuracy_verdict']}"))
    timed = [name for name in ("lora", "adapters") if name in rows and rows[name].latency_interval.get("1")]
    if timed:
        ours = "; ".join(f"{name} {'merged' if name == 'lora' else '(nothing to merge)'} "
                         f"x{rows[name].latency_interval['1'][0]:.3f} "
                         f"[{rows[name].latency_interval['1'][1]:.3f}, {rows[name].latency_interval['1'][2]:.3f}] "
                         f"of the base at batch 1" for name in timed)
        out.append(protocol.finding(STUDY, "merged LoRA adds no inference latency; adapters do", PAPER_LATENCY, ours,
                                    "; ".join(f"{name}: {rows[name].latency_verdict['1']}" for name in timed)))
    return out


# ----------------------------------------------------------------------------------------------------
# output: table, CSV, plots


def run(fast: bool = False, seed: int = 0) -> CompareResult:
    """``minilora experiment compare``: every method under the protocol (reporting seeds 1, 2, 3; 1, 2 when
    fast). ``seed`` offsets the reporting seeds (0: the protocol's own)."""
    seeds = tuple(seed + s for s in protocol.report_seeds(fast))
    return compare_methods(seeds=seeds, fast=fast)


COLUMNS = ("method", "trainable", "percent", "lm_lr", "lm_bpc_mean", "lm_bpc_low", "lm_bpc_high", "lm_vs_full",
           "cls_lr", "accuracy_mean", "accuracy_low", "accuracy_high", "accuracy_vs_full", "lm_step_ms",
           "cls_step_ms", "train_memory_mb", "activations_mb", "checkpoint_kb", "latency_b1_ms", "latency_b1_vs_base",
           "latency_b32_ms", "latency_b32_vs_base")


def _as_row(r) -> MethodResult:
    return r if isinstance(r, MethodResult) else MethodResult(**r)


def table_rows(result: CompareResult) -> list:
    """One dict per row with the COLUMNS: the base model first, then every method, then the matched LoRAs."""
    base_lat = result.base["latency_ms"]
    rows = [{"method": "base (no training)", "trainable": 0, "percent": 0.0, "lm_bpc_mean": result.base["lm_bpc"],
             "accuracy_mean": result.base["accuracy"], "latency_b1_ms": base_lat["1"], "latency_b1_vs_base": 1.0,
             "latency_b32_ms": base_lat["32"], "latency_b32_vs_base": 1.0}]
    for r in map(_as_row, list(result.rows) + list(result.matched_rows)):
        row = {"method": r.method, "trainable": r.trainable, "percent": r.percent, "lm_lr": r.lm_lr,
               "lm_bpc_mean": r.lm["mean"], "lm_bpc_low": r.lm["low"], "lm_bpc_high": r.lm["high"],
               "lm_vs_full": r.lm_vs_full, "cls_lr": r.cls_lr, "accuracy_mean": r.accuracy["mean"],
               "accuracy_low": r.accuracy["low"], "accuracy_high": r.accuracy["high"],
               "accuracy_vs_full": r.accuracy_vs_full, "lm_step_ms": r.lm_step_ms, "cls_step_ms": r.cls_step_ms,
               "train_memory_mb": r.memory["total"] / 2**20, "activations_mb": r.memory["activations"] / 2**20,
               "checkpoint_kb": r.checkpoint_bytes / 1024}
        if r.latency_ms:
            row.update({"latency_b1_ms": r.latency_ms["1"], "latency_b1_vs_base": r.latency_ratio["1"],
                        "latency_b32_ms": r.latency_ms["32"], "latency_b32_vs_base": r.latency_ratio["32"]})
        rows.append(row)
    return rows


def _protocol_lines(result: CompareResult) -> list:
    p, st = result.protocol, result.settings
    split, cls = p["split"], p["classification_split"]
    return [f"protocol: select on dev, report on test; selection seed {p['selection_seed']}, reporting seeds "
            f"{p['report_seeds']}; mean [95% CI]; a verdict says 'better' only when the intervals do not overlap",
            f"  language modelling: {split['corpus']}, train {split['train_tokens']:,} / dev {split['dev_tokens']:,}"
            f" / test {split['test_tokens']:,} characters; {p['steps']['language_modelling']}; scored on "
            f"{st['lm_eval_batches'] * st['lm_batch']} windows",
            f"  classification: {cls['task']}, dev {cls['dev_snippets']} / test {cls['test_snippets']} snippets of "
            f"{cls['snippet_length']} characters; {p['steps']['classification']}",
            f"  learning rates tuned per row and task on dev: {p['first_grid']}"]


def summary(result: CompareResult) -> str:
    """The comparison as text: the protocol, the table (test scores with 95% intervals, verdicts against full
    fine-tuning, tuned rates, costs, latency), the matched budgets and the findings."""
    lines = _protocol_lines(result) + [""]
    lines.append(f"{'method':<19}{'trainable':>10}{'%':>8}  {'LM bits/char [95% CI]':<25}{'vs full':<21}"
                 f"{'accuracy [95% CI]':<22}{'vs full':<21}{'step ms':>8}{'mem MB':>8}{'ckpt KB':>9}"
                 f"{'b1 ms':>8}{'x base':>7}{'b32 ms':>8}{'x base':>7}")
    for row in table_rows(result):
        lm = (f"{row['lm_bpc_mean']:.4f} [{row['lm_bpc_low']:.3f}, {row['lm_bpc_high']:.3f}]"
              if "lm_bpc_low" in row else f"{row['lm_bpc_mean']:.4f}")
        acc = (f"{row['accuracy_mean']:.3f} [{row['accuracy_low']:.3f}, {row['accuracy_high']:.3f}]"
               if "accuracy_low" in row else f"{row['accuracy_mean']:.3f}")
        cost = (f"{row['lm_step_ms']:>8.1f}{row['train_memory_mb']:>8.1f}{row['checkpoint_kb']:>9.1f}"
                if "lm_step_ms" in row else f"{'':>8}{'':>8}{'':>9}")
        latency = (f"{row['latency_b1_ms']:>8.2f}{row['latency_b1_vs_base']:>7.2f}{row['latency_b32_ms']:>8.1f}"
                   f"{row['latency_b32_vs_base']:>7.2f}" if "latency_b1_ms" in row else "")
        lines.append(f"{row['method']:<19}{row['trainable']:>10,}{row['percent']:>8.3f}  {lm:<25}"
                     f"{row.get('lm_vs_full', ''):<21}{acc:<22}{row.get('accuracy_vs_full', ''):<21}{cost}{latency}")
    rates = ", ".join(f"{r.method} {r.lm_lr:g}/{r.cls_lr:g}" for r in map(_as_row, result.rows + result.matched_rows))
    lines.append(f"tuned learning rates (language modelling / classification): {rates}")
    edges = [name for name, t in result.protocol.get("tuning", {}).items() if not t["interior"]]
    if edges:
        lines.append(f"  not interior (the grid reached its extension limit or the series' end): {', '.join(edges)}")
    for r in map(_as_row, result.rows):
        if r.latency_unmerged_ms:
            lines.append(f"  {r.method} before merging: batch 1 {r.latency_unmerged_ms['1']:.2f} ms "
                         f"(x{r.latency_unmerged_ratio['1']:.2f}), batch 32 {r.latency_unmerged_ms['32']:.1f} ms "
                         f"(x{r.latency_unmerged_ratio['32']:.2f})")
    st = result.settings
    lines.append(f"(step ms is the LM step; memory is what a training step keeps; latency after merging LoRA / baking "
                 f"a prefix MLP, x base measured taking turns with the base model, over {st['latency_repeats']}+ "
                 f"rounds at batch 32)")
    if result.matched:
        lines += ["", "matched budgets: LoRA at the rank and targets whose trainable count is nearest the method's "
                      "(alpha / r = 2, own tuned rates)",
                  f"{'method':<12}{'trainable':>10}  {'LoRA':<18}{'trainable':>10}{'diff':>8}  "
                  f"{'language modelling':<36}{'classification'}"]
        for p in result.matched:
            lines.append(f"{p['method']:<12}{p['trainable']:>10,}  {p['lora']:<18}{p['lora_trainable']:>10,}"
                         f"{p['difference']:>+8.1%}  {p['lm_verdict']:<36}{p['accuracy_verdict']}")
    lines += ["", "findings:"]
    for f in result.findings:
        lines.append(f"  {f['claim']}: {f['verdict']}")
        lines.append(f"      ours: {f['ours']}")
        lines.append(f"      paper: {f['paper']}")
    return "\n".join(lines)


def write_csv(result: CompareResult, path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table_rows(result):
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    write_bytes_atomic(path, out.getvalue().encode())


def pareto_front(points, lower_is_better: bool) -> list:
    """The indices of the points (trainable, score) that no other point dominates (no more parameters and a
    better score, or fewer parameters and a score at least as good), ordered by trainable count."""
    sign = 1.0 if lower_is_better else -1.0
    front = []
    for i, (n, score) in enumerate(points):
        dominated = any((m <= n and sign * other < sign * score) or (m < n and sign * other <= sign * score)
                        for j, (m, other) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], sign * points[i][1]))


def plot(result: CompareResult, path) -> None:
    """Three panels: test bits/char and test accuracy against trainable parameters (log scale; error bars are the
    95% intervals; the Pareto front of the means drawn; matched LoRAs as open markers), and latency bars at
    batch 1 and 32 relative to the base model."""
    rows = [_as_row(r) for r in result.rows]
    extra = [_as_row(r) for r in result.matched_rows]
    fig, axes = new_figure(1, 3, figsize=(19, 5.5))
    for ax, score, label, base, lower in ((axes[0], "lm", "test bits/char (lower is better)",
                                           result.base["lm_bpc"], True),
                                          (axes[1], "accuracy", "test accuracy (higher is better)",
                                           result.base["accuracy"], False)):
        every = rows + extra
        for i, r in enumerate(every):
            value = getattr(r, score)
            style = dict(fmt="o") if i < len(rows) else dict(fmt="s", mfc="none")     # matched LoRAs: open squares
            ax.errorbar(r.trainable, value["mean"], yerr=[[value["mean"] - value["low"]], [value["high"] - value["mean"]]],
                        capsize=3, **style)
            ax.annotate(r.method, (r.trainable, value["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        points = [(r.trainable, getattr(r, score)["mean"]) for r in every]
        front = pareto_front(points, lower)
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="black",
                alpha=0.5, label="Pareto front (means)")
        ax.axhline(base, color="gray", linestyle=":", label="pretrained, no training")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.set_title(f"{'language modelling' if lower else 'classification'}: mean and 95% CI over "
                     f"{len(result.settings['seeds'])} seeds")
        ax.legend(fontsize=8)
    bars = [(r.method, r.latency_ratio) for r in rows if r.latency_ratio]
    bars += [(f"{r.method} (unmerged)", r.latency_unmerged_ratio) for r in rows if r.latency_unmerged_ratio]
    x = numpy.arange(len(bars))
    for offset, batch in ((-0.2, "1"), (0.2, "32")):
        axes[2].bar(x + offset, [ratio[batch] for _, ratio in bars], width=0.4, label=f"batch {batch}")
    if bars:
        highest = max(max(ratio.values()) for _, ratio in bars)
        axes[2].set_ylim(min(0.9, min(min(ratio.values()) for _, ratio in bars) - 0.02), highest + 0.05)
    axes[2].axhline(1.0, color="gray", linestyle=":")
    axes[2].set_xticks(x, [name for name, _ in bars], rotation=45, ha="right")
    axes[2].set_xlabel("method")
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
