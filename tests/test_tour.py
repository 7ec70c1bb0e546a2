"""The main job, the fine-tune recipe, and fine-tuning through the CLI, in their quick modes."""
import json

import numpy as np
import pytest

import minilora as ml
from minilora import cli, finetune, lora, tour, train
from minilora.experiments import common
from minilora.tour import TourConfig, run_tour


def test_tour_quick_runs_end_to_end_and_writes_its_table_and_plot(tmp_path):
    runs = run_tour(TourConfig.quick(out_dir=str(tmp_path)))
    assert [r.label for r in runs] == ["full fine-tuning", "LoRA r=1", "LoRA r=4", "LoRA r=16"]
    full, *loras = runs
    assert full.percent == 100.0
    assert [r.trainable for r in loras] == [4 * 2 * r * (128 + 128) for r in (1, 4, 16)]
    assert all(r.optimizer_bytes < full.optimizer_bytes / 10 for r in loras)
    assert all(r.saved_bytes < full.saved_bytes / 10 for r in loras)
    assert all(set(r.latency_ms) == {"1"} and {"base", "unmerged", "merged", "ratio"} <= set(r.latency_ms["1"]) for r in runs)
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
    args = ["finetune", "--out", str(tmp_path), "--steps", "3", "--batch-size", "2", "--eval-every", "3", "--quiet",
            "--latency-repeats", "1"]
    assert cli.main(args + ["--method", "lora", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "bits/char" in out and (tmp_path / lora.ADAPTER_WEIGHTS).is_file()
    assert "batch 1: base" in out and "LoRA unmerged (two-step)" in out and "batch 32" in out
    assert cli.main(args + ["--method", "lora", "--latency-repeats", "-1"]) == 2
    assert "latency_repeats" in capsys.readouterr().err
    assert cli.main(args + ["--method", "full"]) == 0
    assert (tmp_path / "model.safetensors").is_file()
    assert cli.main(args + ["--method", "lora", "--targets", "c_attn"]) == 2
    assert "no Linear module matches" in capsys.readouterr().err


def test_finetune_cli_offers_the_methods_it_can_save_and_refuses_before_training(tmp_path, capsys, monkeypatch):
    assert finetune.SAVABLE_METHODS == ("full", "lora")
    assert set(finetune.SAVABLE_METHODS) <= set(ml.METHODS)
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--method", "adapters", "--out", str(tmp_path)])
    assert "invalid choice: 'adapters'" in capsys.readouterr().err

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(finetune, "fit", no_training)
    args = ["finetune", "--out", str(tmp_path), "--steps", "3", "--batch-size", "2", "--quiet", "--r", "2"]
    assert cli.main(args + ["--init", "pissa"]) == 2       # an adapter file cannot hold PiSSA's changed weights
    assert "PiSSA" in capsys.readouterr().err
    assert cli.main(args + ["--targets", "c_attn"]) == 2
    assert "no Linear module matches" in capsys.readouterr().err


def test_cli_tour_and_studies_fine_tune_through_the_one_recipe(tmp_path, monkeypatch, capsys):
    calls = []
    recipe = finetune.finetune

    def spy(model, method, data, train_config, *args, **kwargs):
        calls.append(method)
        return recipe(model, method, data, train_config, *args, **kwargs)

    for module in (finetune, tour, common):   # the CLI imports it from finetune when the command runs
        monkeypatch.setattr(module, "finetune", spy)
    assert cli.main(["finetune", "--out", str(tmp_path / "cli"), "--steps", "2", "--batch-size", "2", "--quiet",
                     "--method", "full", "--latency-repeats", "0"]) == 0
    assert "bits/char" in capsys.readouterr().out
    run_tour(TourConfig.quick(out_dir=str(tmp_path / "tour"), ranks=(2,), steps=2, latency_repeats=1))
    common.run_lora(("q_proj",), 1, 0, common.RunSettings.for_mode(True, steps=2))
    assert calls == ["full", "full", "lora", "lora"]


def test_the_recipe_takes_every_method_and_checks_its_arguments_first(tmp_path):
    corpus = ml.data.load_corpus("python-email")
    config = train.TrainConfig.for_finetuning(2, 2, 1e-2, block_size=32, eval_every=1, eval_batches=1, quiet=True)
    model = ml.load_pretrained(dropout=0.0)
    run = finetune.finetune(model, "adapters", corpus, config, eval_batches=1, latency_repeats={1: 1, 2: 1})
    assert run.method == run.label == "adapters" and run.metric == "loss"
    assert run.trainable == model.num_parameters(trainable_only=True) < run.total
    assert [s for s, _ in run.val_curve] == [0, 1, 2] and [s for s, _ in run.train_curve] == [1, 2]
    assert run.val_curve[-1][1] == run.val_after and np.isfinite(run.val_before)
    assert set(run.latency_ms) == {"1", "2"} and all(t["base"] > 0 for t in run.latency_ms.values())
    quiet = finetune.finetune(ml.load_pretrained(dropout=0.0), "bitfit", corpus, config, eval_batches=1,
                              latency_repeats=0, evaluate_before=False)
    assert quiet.val_before is None and quiet.latency_ms == {} and [s for s, _ in quiet.val_curve] == [1, 2]

    untouched = ml.load_pretrained(dropout=0.0)
    before = {n: p.data.copy() for n, p in untouched.named_parameters()}
    with pytest.raises(ValueError, match=r"not of method 'prompt'"):
        finetune.finetune(untouched, "prompt", corpus, config, out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown fine-tuning method 'dora'"):
        finetune.finetune(untouched, "dora", corpus, config)
    with pytest.raises(TypeError, match="got str"):
        finetune.finetune(untouched, "lora", "python-email", config)
    with pytest.raises(ValueError, match="latency_repeats"):
        finetune.finetune(untouched, "lora", corpus, config, latency_repeats={0: 3})
    assert untouched.num_parameters() == sum(b.size for b in before.values())     # no method was applied
    assert all(np.array_equal(p.data, before[n]) for n, p in untouched.named_parameters())


def test_tour_cli_quick(tmp_path):
    assert cli.main(["tour", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.csv").is_file()
