"""The main job, ``minilora tour``: from the shipped pretrained GPT (trained on English prose), adapt to two tasks
with full fine-tuning and with LoRA, and compare them in one table, one plot and one line of reading.

    domain shift     language modelling of Python source (python-email): bits per character on test
    classification   the prose-or-package task (tasks.py): accuracy on the test snippets

Rows: full fine-tuning; LoRA at r = 1, 4, 16 on Wq, Wv (the paper's choice); LoRA r = 16 on every linear layer
(how much of a gap to full fine-tuning more targets and rank close). The protocol (experiments/protocol.py):
training reads the training text only; each row's learning rate for each task was tuned on dev with the
selection seed 0 and is read from a record shipped with the package (RATES_FILE, written by ``tune_rates``:
nothing is searched when the tour runs); the tour reports one run per row at a reporting seed on test. One seed
is a demonstration, not a verdict: ``minilora compare`` gives 95% intervals over three seeds.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .core.lora import LoRAConfig
from .data import load_corpus
from .experiments import protocol
from .finetune import FinetuneRun, finetune
from .io.files import read_json, write_bytes_atomic, write_json
from .io.pretrained import load_pretrained
from .plots import new_figure, save_figure
from .tasks import classifier_config, load_task
from .train import TrainConfig

RATES_FILE = Path(__file__).parent / "experiments" / "tour_rates.json"
EVERY_LINEAR = ("all-linear",)
# the middle of each row's first three rates (language modelling, classification); tuning extends from there
FIRST_CENTRES = {"full": (1e-3, 1e-3), "lora": (1e-2, 1e-2)}
RECORDED_SETTINGS = ("corpus", "steps", "batch_size", "cls_task", "cls_steps", "cls_batch", "cls_length",
                     "cls_val_per_class")


@dataclass
class TourConfig:
    """steps/batch_size: each language-modelling run; cls_*: each classification run; quick: a tiny run for
    tests (a few steps, part of the test text). seed: the reporting seed (never the selection seed 0)."""

    out_dir: str = "runs/tour"
    corpus: str = "python-email"
    ranks: tuple = (1, 4, 16)
    targets: tuple = ("q_proj", "v_proj")
    wide_rank: int = 16                # the extra row: LoRA at this rank on every linear layer (0: no such row)
    steps: int = 200
    batch_size: int = 16
    cls_task: str = "prose-or-package"
    cls_steps: int = 300
    cls_batch: int = 8
    cls_length: int = 63
    cls_val_per_class: int = 128       # held-out snippets per class: half dev, half test
    eval_every: int = 50
    eval_batches: int | None = None
    latency_repeats: int = 20
    seed: int = protocol.REPORT_SEEDS[0]
    rates_file: str | None = None      # None: RATES_FILE
    quiet: bool = False

    @classmethod
    def quick(cls, **overrides):
        return cls(**{**dict(steps=6, batch_size=4, cls_steps=4, cls_batch=4, cls_val_per_class=4, eval_every=3,
                             eval_batches=2, latency_repeats=2, quiet=True), **overrides})


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    r: int | None = None
    targets: tuple = ()

    def lora(self) -> LoRAConfig | None:
        return LoRAConfig(r=self.r, alpha=2.0 * self.r, targets=self.targets) if self.method == "lora" else None

    def describe(self) -> str:
        if self.method == "full":
            return "every weight"
        where = "every linear layer" if self.targets == EVERY_LINEAR else ", ".join(self.targets)
        return f"rank {self.r} on {where}, alpha = 2r"


def rows_of(config: TourConfig) -> list:
    """The tour's rows: full fine-tuning, LoRA at each rank on config.targets, LoRA at wide_rank everywhere."""
    rows = [Row("full fine-tuning", "full")] + [Row(f"LoRA r={r}", "lora", r, tuple(config.targets))
                                                for r in config.ranks]
    if config.wide_rank:
        rows.append(Row(f"LoRA r={config.wide_rank} every linear", "lora", config.wide_rank, EVERY_LINEAR))
    return rows


# ----------------------------------------------------------------------------------------------------
# the data, split as the protocol declares


def _data(config: TourConfig):
    """(corpus split, {"dev": corpus scored on dev, "test": on test}, {"dev": task, "test": task})."""
    corpus = load_corpus(config.corpus)
    split = protocol.split_corpus(corpus)
    corpora = {part: dataclasses.replace(corpus, val=getattr(split, part)) for part in ("dev", "test")}
    task = load_task(config.cls_task, length=config.cls_length, val_per_class=config.cls_val_per_class)
    return split, corpora, dict(zip(("dev", "test"), protocol.split_task(task)))


def _lm_config(config: TourConfig, row: Row, lr: float, seed: int, eval_every: int) -> TrainConfig:
    return TrainConfig.for_finetuning(config.steps, config.batch_size, lr,
                                      weight_decay=0.1 if row.method == "full" else 0.0, eval_every=eval_every,
                                      eval_batches=config.eval_batches, seed=seed, quiet=config.quiet)


# ----------------------------------------------------------------------------------------------------
# the recorded learning rates


def tune_rates(config: TourConfig | None = None, max_extensions: int = 3, report=print) -> dict:
    """Tune every row's learning rate for each task on dev with the selection seed (protocol.tune: three rates of
    the 1-3-10 series around FIRST_CENTRES, extended until the best is interior), at config's settings.
    Returns the record that run_tour reads: the settings, and per row and task the chosen rate, whether it is
    interior, and every dev score (bits/char, or accuracy)."""
    config = config or TourConfig()
    split, corpora, tasks = _data(config)
    record = {"settings": {k: getattr(config, k) for k in RECORDED_SETTINGS},
              "selection_seed": protocol.SELECTION_SEED, "split": split.declaration(),
              "classification_split": {"dev_snippets": int(len(tasks["dev"].val_y)),
                                       "dev": "first half of each class's held-out snippets"},
              "first_grid": "three consecutive rates of the 1-3-10 series around the row's centre, extended one "
                            f"rate at a time until the best is interior (at most {max_extensions} extensions)",
              "rows": {}}
    t0 = time.perf_counter()
    for row in rows_of(config):
        entry = {}
        for key, lower in (("lm", True), ("cls", False)):
            def score(lr, row=row, key=key):
                run = _run(config, row, key, lr, protocol.SELECTION_SEED, corpora["dev"], tasks["dev"], 0, 0)
                return run.val_after / math.log(2) if key == "lm" else run.val_after

            centre = FIRST_CENTRES[row.method][0 if key == "lm" else 1]
            i = protocol.LR_SERIES.index(centre)
            tuning = protocol.tune(score, protocol.LR_SERIES[i - 1:i + 2], lower, max_extensions=max_extensions)
            entry[key] = {"lr": tuning.best, "interior": tuning.interior,
                          "dev_scores": {f"{lr:g}": s for lr, s in sorted(tuning.scores.items())}}
            report(f"{row.label} {key}: {tuning.describe()} ({time.perf_counter() - t0:.0f} s)")
        record["rows"][row.label] = {"method": row.method, "r": row.r, "targets": list(row.targets), **entry}
    record["seconds"] = time.perf_counter() - t0
    return record


def load_rates(path=None) -> dict:
    """The recorded rates (RATES_FILE unless ``path``)."""
    return read_json(Path(path) if path else RATES_FILE)


def rate_for(record: dict, row: Row, key: str) -> tuple:
    """(learning rate, note) for a row and task ("lm" or "cls"): the recorded rate of the row, or, for a LoRA
    row the record does not hold, the rate of the recorded LoRA row on the same targets with the nearest rank
    (the note says so)."""
    rows = record["rows"]
    if row.label in rows:
        return rows[row.label][key]["lr"], ""
    same = [(label, entry) for label, entry in rows.items()
            if entry["method"] == row.method and tuple(entry["targets"]) == tuple(row.targets)]
    if not same:
        raise ValueError(f"the recorded rates hold no row like {row.label!r} ({row.describe()}); record one with "
                         f"minilora.tour.tune_rates")
    label, entry = min(same, key=lambda item: abs(math.log(item[1]["r"] / row.r)))
    return entry[key]["lr"], f"rate of {label} (no record for {row.label})"


# ----------------------------------------------------------------------------------------------------
# the tour


def _run(config: TourConfig, row: Row, key: str, lr: float, seed: int, corpus, task, eval_every: int,
         latency_repeats, out_dir=None) -> FinetuneRun:
    """One run of a row on one task: language modelling of ``corpus`` ("lm") or the classification ``task``."""
    if key == "lm":
        return finetune(load_pretrained(dropout=0.0), row.method, corpus, _lm_config(config, row, lr, seed, eval_every),
                        row.lora(), out_dir=out_dir, label=row.label, latency_repeats=latency_repeats,
                        eval_batches=config.eval_batches, seed=seed, evaluate_before=eval_every > 0)
    return finetune(load_pretrained(dropout=0.0), row.method, task,
                    classifier_config(config.cls_steps, config.cls_batch, lr, seed=seed), row.lora(),
                    label=row.label, latency_repeats=0, seed=seed, evaluate_before=False)


@dataclass
class TourRow:
    """One row of the tour: its language-modelling run (with latency) and its classification accuracy."""

    run: FinetuneRun
    lm_lr: float
    accuracy: float
    cls_lr: float
    setting: str
    note: str = ""


def run_tour(config: TourConfig | None = None) -> list[FinetuneRun]:
    """Run every row on both tasks at its recorded rates; write table.csv, table.json and val_curves.png into
    config.out_dir and print the table and its reading. Returns the language-modelling runs, in row order."""
    config = config or TourConfig()
    if config.seed == protocol.SELECTION_SEED:
        raise ValueError(f"the tour reports on test; seed {config.seed} is the selection seed the rates were tuned "
                         f"with: give another")
    record = load_rates(config.rates_file)
    split, corpora, tasks = _data(config)
    out = Path(config.out_dir)
    rows, plans = [], rows_of(config)
    say = (lambda text: None) if config.quiet else print
    say(header(config, record, split))
    t0 = time.perf_counter()
    for i, row in enumerate(plans):
        say(f"[{i + 1}/{len(plans)}] {row.label}")
        lm_lr, lm_note = rate_for(record, row, "lm")
        cls_lr, cls_note = rate_for(record, row, "cls")
        run = _run(config, row, "lm", lm_lr, config.seed, corpora["test"], None, config.eval_every,
                   config.latency_repeats, out_dir=out / row.label.replace(" ", "_").replace("=", ""))
        cls = _run(config, row, "cls", cls_lr, config.seed, None, tasks["test"], 0, 0)
        rows.append(TourRow(run, lm_lr, cls.val_after, cls_lr, row.describe(), "; ".join(filter(None, (lm_note,
                                                                                                        cls_note)))))
    wall = time.perf_counter() - t0
    write_results(rows, out, wall, config, record)
    if not config.quiet:
        print()
        print(format_table(rows))
        for r in rows:
            verdict = r.run.latency_ms.get("1", {}).get("verdict", {}).get("merged")
            if verdict and r.run.method == "lora":
                print(f"{r.run.label}, merged, batch 1: {verdict}")
            if r.note:
                print(f"{r.run.label}: {r.note}")
        print()
        print(reading(rows))
        print(f"\nwall time {wall:.0f} s; wrote {out / 'table.csv'}, {out / 'table.json'}, {out / 'val_curves.png'}")
    return [r.run for r in rows]


def header(config: TourConfig, record: dict, split) -> str:
    """What the tour runs, stated before it runs: tasks, steps, targets, rates, split, seed."""
    recorded = record["settings"]
    differs = [k for k in RECORDED_SETTINGS if recorded.get(k) != getattr(config, k)]
    lines = ["The tour: the shipped GPT (pretrained on English prose) adapted to two tasks by each row, at the "
             "row's own learning rate for each task.",
             f"  domain shift: language modelling of {config.corpus}, {config.steps} steps of {config.batch_size} x "
             f"128 characters; bits/char on test",
             f"  classification: {config.cls_task}, {config.cls_steps} steps of {config.cls_batch} snippets of "
             f"{config.cls_length} characters; accuracy on the test snippets",
             "  rows: " + "; ".join(f"{row.label} ({row.describe()})" for row in rows_of(config)),
             f"  split: {split.describe()}",
             f"  learning rates: tuned on dev with seed {protocol.SELECTION_SEED} and recorded in "
             f"{Path(config.rates_file or RATES_FILE).name} (by `python -m minilora.tour`); one run per row with seed "
             f"{config.seed}, scored on test: one seed is a demonstration, `minilora compare` gives 95% intervals"]
    if differs:
        lines.append(f"  note: the rates were recorded at other settings ({', '.join(f'{k} {recorded.get(k)}' for k in differs)}); "
                     f"this run's numbers are a smoke test, not a comparison")
    return "\n".join(lines)


def _gap_text(best, wide, full, unit: str, lower_is_better: bool, digits: int) -> str:
    """How far the best LoRA on the paper's targets is from full fine-tuning, and what the wide row does."""
    sign = 1 if lower_is_better else -1
    name, value = best
    if sign * (value - full) <= 0:
        text = f"LoRA on Wq, Wv ({name}) reaches full fine-tuning ({value:.{digits}f} vs {full:.{digits}f} {unit})"
    else:
        text = f"LoRA on Wq, Wv falls short (best {name}: {value:.{digits}f} vs full {full:.{digits}f} {unit})"
        if wide is not None:
            wide_name, wide_value = wide
            closed = (value - wide_value) / (value - full)
            text += (f"; {wide_name} reaches {wide_value:.{digits}f}, " +
                     ("matching or passing full fine-tuning" if closed >= 1 else
                      f"closing {closed:.0%} of the gap" if closed > 0 else "which does not close it"))
    return text


def reading(rows: list) -> str:
    """One line: what this run's numbers say about LoRA against full fine-tuning on each task."""
    full = next((r for r in rows if r.run.method == "full"), None)
    paper = [r for r in rows if r.run.method == "lora" and "every linear" not in r.setting]
    wide = next((r for r in rows if "every linear" in r.setting), None)
    if full is None or not paper:
        return "reading: needs full fine-tuning and a LoRA row on the paper's targets"
    bits = 1 / math.log(2)
    best_lm = min(paper, key=lambda r: r.run.val_after)
    best_acc = max(paper, key=lambda r: r.accuracy)
    lm = _gap_text((best_lm.run.label, best_lm.run.val_after * bits),
                   (wide.run.label, wide.run.val_after * bits) if wide else None, full.run.val_after * bits,
                   "bits/char", True, 3)
    acc = _gap_text((best_acc.run.label, best_acc.accuracy), (wide.run.label, wide.accuracy) if wide else None,
                    full.accuracy, "accuracy", False, 3)
    return f"reading (one seed; `minilora compare` has intervals): code domain: {lm}. classification: {acc}."


# ----------------------------------------------------------------------------------------------------
# outputs


COLUMNS = ("method", "setting", "trainable", "trainable %", "lr", "test before (bits/char)", "test after (bits/char)",
           "classification lr", "test accuracy", "optimizer state (KB)", "step (ms)", "saved (KB)",
           "latency base (ms)", "latency unmerged (ms)", "latency merged (ms)", "merged / base [95%]")


def table_rows(rows):
    bits = 1.0 / math.log(2)
    out = []
    for row in rows:
        r = row.run
        latency = r.latency_ms.get("1", {})          # batch 1; merged and unmerged mean something for LoRA only
        before = round(r.val_before * bits, 4) if r.val_before is not None else ""
        out.append((r.label, row.setting, r.trainable, round(r.percent, 3), f"{row.lm_lr:g}", before,
                    round(r.val_after * bits, 4), f"{row.cls_lr:g}", round(row.accuracy, 3),
                    round(r.optimizer_bytes / 1024, 1), round(1e3 * r.step_seconds, 1), round(r.saved_bytes / 1024, 1),
                    *(round(latency[k], 2) if k in latency and applies else ""
                      for k, applies in (("base", True), ("unmerged", r.method == "lora"),
                                         ("merged", r.method == "lora"))),
                    "{:.2f}x [{:.2f}, {:.2f}]".format(*latency["ratio"]["merged"])
                    if "ratio" in latency and r.method == "lora" else ""))
    return out


def format_table(rows) -> str:
    shown = [i for i, c in enumerate(COLUMNS) if c != "setting"]
    cells = [[COLUMNS[i] for i in shown]] + [[str(row[i]) for i in shown] for row in table_rows(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(shown))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(rows, out: Path, wall_seconds: float, config: TourConfig | None = None, record=None) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    writer.writerows(table_rows(rows))
    write_bytes_atomic(out / "table.csv", buffer.getvalue().encode())
    write_json(out / "table.json", {
        "wall_seconds": wall_seconds, "reading": reading(rows),
        "config": asdict(config) if config else None,
        "rates": {"file": str(Path(config.rates_file or RATES_FILE).name) if config else None,
                  "settings": record["settings"] if record else None},
        "runs": [asdict(r.run) for r in rows],
        "classification": [{"label": r.run.label, "accuracy": r.accuracy, "lr": r.cls_lr} for r in rows]})
    plot_curves([r.run for r in rows], out / "val_curves.png")


def plot_curves(runs, path: Path) -> None:
    """Test loss (bits per character) against step, one line per row."""
    fig, ax = new_figure(figsize=(6, 4))
    for r in runs:
        steps, losses = zip(*r.val_curve)
        ax.plot(steps, [v / math.log(2) for v in losses], marker="o", markersize=3,
                label=f"{r.label} ({r.trainable:,} params)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test loss (bits per character)")
    ax.set_title("Fine-tuning the pretrained tiny GPT on Python code")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> int:
    """``python -m minilora.tour [PATH]``: tune the tour's learning rates at its default settings and write the
    record (PATH, default RATES_FILE)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else RATES_FILE
    record = tune_rates(TourConfig())
    record["command"] = "python -m minilora.tour" + (f" {path}" if argv else "")
    write_json(path, record)
    print(f"wrote {path} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
