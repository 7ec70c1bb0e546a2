"""The main job, ``minilora tour``: from the shipped pretrained GPT, fine-tune on the unseen code domain with
full fine-tuning and with LoRA at r = 1, 4 and 16 on Wq and Wv, and compare them in one table and one plot.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import load_corpus
from .io.files import write_bytes_atomic, write_json
from .finetune import FinetuneRun, finetune
from .core.lora import LoRAConfig
from .plots import new_figure, save_figure
from .io.pretrained import load_pretrained
from .train import TrainConfig


@dataclass
class TourConfig:
    """steps/batch_size per run; quick: a tiny run for tests (a few steps, part of the validation text)."""

    out_dir: str = "runs/tour"
    corpus: str = "python-email"
    ranks: tuple = (1, 4, 16)
    targets: tuple = ("q_proj", "v_proj")
    steps: int = 300
    batch_size: int = 16
    full_lr: float = 1e-3
    lora_lr: float = 1e-2
    eval_every: int = 50
    eval_batches: int | None = None
    latency_repeats: int = 20
    seed: int = 0
    quiet: bool = False

    @classmethod
    def quick(cls, **overrides):
        return cls(**{**dict(steps=6, batch_size=4, eval_every=3, eval_batches=2, latency_repeats=2, quiet=True),
                      **overrides})


def run_tour(config: TourConfig | None = None) -> list[FinetuneRun]:
    """Run every method, then write table.csv, table.json and val_curves.png into config.out_dir."""
    config = config or TourConfig()
    corpus = load_corpus(config.corpus)
    out = Path(config.out_dir)
    runs = []
    plans = [("full", None)] + [("lora", r) for r in config.ranks]
    t0 = time.perf_counter()
    for method, r in plans:
        label = "full fine-tuning" if method == "full" else f"LoRA r={r}"
        if not config.quiet:
            print(f"[{len(runs) + 1}/{len(plans)}] {label}")
        train_config = TrainConfig.for_finetuning(
            config.steps, config.batch_size, config.full_lr if method == "full" else config.lora_lr,
            weight_decay=0.1 if method == "full" else 0.0, eval_every=config.eval_every,
            eval_batches=config.eval_batches, seed=config.seed, quiet=config.quiet)
        lora = LoRAConfig(r=r, alpha=2.0 * r, targets=config.targets) if method == "lora" else None
        runs.append(finetune(load_pretrained(dropout=0.0), method, corpus, train_config, lora,
                             out_dir=out / label.replace(" ", "_").replace("=", ""), label=label,
                             latency_repeats=config.latency_repeats, eval_batches=config.eval_batches,
                             seed=config.seed))
    wall = time.perf_counter() - t0
    write_results(runs, out, wall)
    if not config.quiet:
        print()
        print(format_table(runs))
        for r in runs:
            verdict = r.latency_ms.get("1", {}).get("verdict", {}).get("merged")
            if verdict and r.method == "lora":
                print(f"{r.label}, merged, batch 1: {verdict}")
        print(f"\nwall time {wall:.0f} s; wrote {out / 'table.csv'}, {out / 'table.json'}, {out / 'val_curves.png'}")
    return runs


COLUMNS = ("method", "trainable", "trainable %", "val before (bits/char)", "val after (bits/char)",
           "optimizer state (KB)", "step (ms)", "saved (KB)", "latency base (ms)", "latency unmerged (ms)",
           "latency merged (ms)", "merged / base [95%]")


def table_rows(runs):
    bits = 1.0 / math.log(2)
    rows = []
    for r in runs:
        latency = r.latency_ms.get("1", {})          # batch 1; merged and unmerged mean something for LoRA only
        rows.append((r.label, r.trainable, round(r.percent, 3), round(r.val_before * bits, 4),
                     round(r.val_after * bits, 4), round(r.optimizer_bytes / 1024, 1), round(1e3 * r.step_seconds, 1),
                     round(r.saved_bytes / 1024, 1), *(round(latency[k], 2) if k in latency and applies else ""
                                                       for k, applies in (("base", True),
                                                                          ("unmerged", r.method == "lora"),
                                                                          ("merged", r.method == "lora"))),
                     "{:.2f}x [{:.2f}, {:.2f}]".format(*latency["ratio"]["merged"])
                     if "ratio" in latency and r.method == "lora" else ""))
    return rows


def format_table(runs) -> str:
    rows = [COLUMNS] + [tuple(str(v) for v in row) for row in table_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(runs, out: Path, wall_seconds: float) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    writer.writerows(table_rows(runs))
    write_bytes_atomic(out / "table.csv", buffer.getvalue().encode())
    write_json(out / "table.json", {"wall_seconds": wall_seconds, "runs": [asdict(r) for r in runs]})
    plot_curves(runs, out / "val_curves.png")


def plot_curves(runs, path: Path) -> None:
    """Validation loss (bits per character) against step, one line per method."""
    fig, ax = new_figure(figsize=(6, 4))
    for r in runs:
        steps, losses = zip(*r.val_curve)
        ax.plot(steps, [v / math.log(2) for v in losses], marker="o", markersize=3, label=f"{r.label} ({r.trainable:,} params)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss (bits per character)")
    ax.set_title("Fine-tuning the pretrained tiny GPT on Python code")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
