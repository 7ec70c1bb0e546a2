"""The main job and fine-tuning through the CLI, in their quick modes."""
import json

import numpy as np

import minilora as ml
from minilora import cli, finetune, lora
from minilora.tour import TourConfig, run_tour


def test_tour_quick_runs_end_to_end_and_writes_its_table_and_plot(tmp_path):
    runs = run_tour(TourConfig.quick(out_dir=str(tmp_path)))
    assert [r.label for r in runs] == ["full fine-tuning", "LoRA r=1", "LoRA r=4", "LoRA r=16"]
    full, *loras = runs
    assert full.percent == 100.0
    assert [r.trainable for r in loras] == [4 * 2 * r * (128 + 128) for r in (1, 4, 16)]
    assert all(r.optimizer_bytes < full.optimizer_bytes / 10 for r in loras)
    assert all(r.saved_bytes < full.saved_bytes / 10 for r in loras)
    assert all(set(r.latency_ms) == {"base", "unmerged", "merged"} for r in runs)
    assert all(r.val_curve[0] == [0, r.val_before] for r in runs)
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert header.startswith("method,trainable")
    table = json.loads((tmp_path / "table.json").read_text())
    assert len(table["runs"]) == 4 and table["wall_seconds"] > 0
    assert (tmp_path / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "LoRA_r4" / lora.ADAPTER_WEIGHTS).is_file()


def test_lora_finetuning_moves_only_the_adapters(tmp_path):
    from minilora import data, train

    model = ml.load_pretrained(dropout=0.0)
    base = {n: p.data.copy() for n, p in model.named_parameters()}
    corpus = data.load_corpus("python-email")
    run = finetune.finetune(model, "lora", corpus, train.TrainConfig(steps=4, batch_size=2, warmup_steps=1,
                            eval_every=2, eval_batches=1, quiet=True), ml.LoRAConfig(r=2, alpha=4),
                            out_dir=tmp_path, latency_repeats=1, eval_batches=1)
    assert run.trainable == 4 * 2 * 2 * 256 and [s for s, _ in run.val_curve] == [0, 2, 4]
    for n, p in model.named_parameters():
        if n in base:
            assert np.array_equal(p.data, base[n]), n
    fresh = ml.load_pretrained(dropout=0.0)
    ml.load_lora(fresh, tmp_path)
    idx = np.arange(16)[None, :]
    assert np.array_equal(fresh.forward(idx), model.forward(idx))


def test_finetune_cli(tmp_path, capsys):
    args = ["finetune", "--out", str(tmp_path), "--steps", "3", "--batch-size", "2", "--eval-every", "3", "--quiet"]
    assert cli.main(args + ["--method", "lora", "--r", "2"]) == 0
    assert "bits/char" in capsys.readouterr().out and (tmp_path / lora.ADAPTER_WEIGHTS).is_file()
    assert cli.main(args + ["--method", "full"]) == 0
    assert (tmp_path / "model.safetensors").is_file()
    assert cli.main(args + ["--method", "lora", "--targets", "c_attn"]) == 2
    assert "no Linear module matches" in capsys.readouterr().err


def test_tour_cli_quick(tmp_path):
    assert cli.main(["tour", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.csv").is_file()
