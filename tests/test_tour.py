"""The main job, the fine-tune recipe, and fine-tuning through the CLI, in their quick modes."""
import json
import math

import numpy as np
import pytest

import minilora as ml
from minilora import cli, finetune, lora, tour, train
from minilora.experiments import common
from minilora.tour import TourConfig, run_tour


def test_tour_quick_runs_end_to_end_and_writes_its_table_and_plot(tmp_path):
    runs = run_tour(TourConfig.quick(out_dir=str(tmp_path)))
    assert [r.label for r in runs] == ["full fine-tuning", "LoRA r=1", "LoRA r=4", "LoRA r=16",
                                       "LoRA r=16 every linear"]
    full, *loras = runs
    assert full.percent == 100.0
    assert [r.trainable for r in loras[:3]] == [4 * 2 * r * (128 + 128) for r in (1, 4, 16)]
    assert loras[3].trainable == 4 * 16 * (4 * (128 + 128) + 2 * (128 + 512))     # q, k, v, o, fc, proj
    assert all(r.optimizer_bytes < full.optimizer_bytes / 5 for r in loras)
    assert all(r.saved_bytes < full.saved_bytes / 5 for r in loras)
    assert all(set(r.latency_ms) == {"1"} and {"base", "unmerged", "merged", "ratio"} <= set(r.latency_ms["1"]) for r in runs)
    assert all(r.val_curve[0] == [0, r.val_before] for r in runs)
    header = (tmp_path / "table.csv").read_text().splitlines()[0]
    assert header.startswith("method,setting,trainable") and "test accuracy" in header and ",lr," in header
    table = json.loads((tmp_path / "table.json").read_text())
    assert len(table["runs"]) == 5 and table["wall_seconds"] > 0 and table["reading"].startswith("reading")
    assert [c["label"] for c in table["classification"]] == [r.label for r in runs]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in table["classification"])
    assert (tmp_path / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "LoRA_r4" / lora.ADAPTER_WEIGHTS).is_file()


def test_the_tour_reads_its_rates_and_reports_on_test_only(tmp_path, monkeypatch, capsys):
    """Nothing is tuned when the tour runs; every run uses its row's recorded rate, the reporting seed, and the
    test half (language modelling) or the test snippets (classification)."""
    from minilora.experiments import protocol

    def no_tuning(*args, **kwargs):
        raise AssertionError("the tour searched learning rates at run time")

    monkeypatch.setattr(protocol, "tune", no_tuning)
    config = TourConfig.quick(out_dir=str(tmp_path), quiet=False, latency_repeats=1)
    split, _, tasks = tour._data(config)
    record = tour.load_rates()
    seen = []
    recipe = finetune.finetune

    def spy(model, method, data, train_config, lora_config=None, *args, label=None, seed=0, **kwargs):
        if isinstance(data, ml.data.Corpus):
            assert data.val is split.test or np.array_equal(data.val, split.test)
            key = "lm"
        else:
            assert np.array_equal(data.val_x, tasks["test"].val_x)
            key = "cls"
        assert seed == config.seed != protocol.SELECTION_SEED
        seen.append((label, key, train_config.lr))
        return recipe(model, method, data, train_config, lora_config, *args, label=label, seed=seed, **kwargs)

    monkeypatch.setattr(tour, "finetune", spy)
    run_tour(config)
    for label, key, lr in seen:
        assert lr == record["rows"][label][key]["lr"]
    assert len(seen) == 2 * len(tour.rows_of(config))
    out = capsys.readouterr().out
    assert f"{config.steps} steps of {config.batch_size} x 128" in out and f"{config.cls_steps} steps of" in out
    for text in ("domain shift: language modelling", "classification: prose-or-package", "tuned on dev with seed 0",
                 "one seed is a demonstration", "reading (one seed", "rates were recorded at other settings"):
        assert text in out, text
    with pytest.raises(ValueError, match="selection seed"):
        run_tour(TourConfig.quick(out_dir=str(tmp_path), seed=protocol.SELECTION_SEED))


def test_the_recorded_rates_are_complete_and_interior():
    """The shipped record: made at the tour's own settings, a rate for every row and task, each the best of its
    dev scores and interior of the rates tried."""
    from minilora.experiments import protocol

    record = tour.load_rates()
    default = TourConfig()
    assert record["settings"] == {k: getattr(default, k) for k in tour.RECORDED_SETTINGS}
    assert record["selection_seed"] == protocol.SELECTION_SEED and record["split"]["corpus"] == default.corpus
    assert record["command"].startswith("python -m minilora.tour") and record["seconds"] > 0
    assert set(record["rows"]) == {row.label for row in tour.rows_of(default)}
    for label, entry in record["rows"].items():
        for key, lower_is_better in (("lm", True), ("cls", False)):
            tuned = entry[key]
            tried = sorted(float(lr) for lr in tuned["dev_scores"])
            assert all(lr in protocol.LR_SERIES for lr in tried), label
            assert tried == [lr for lr in protocol.LR_SERIES if tried[0] <= lr <= tried[-1]], label   # consecutive
            scores = {float(lr): score for lr, score in tuned["dev_scores"].items()}
            best = (min if lower_is_better else max)(scores.values())
            assert scores[tuned["lr"]] == best, (label, key)
            assert tuned["interior"] and tried[0] < tuned["lr"] < tried[-1], (label, key)


def _tour_row(label, method, bits, accuracy, setting):
    run = finetune.FinetuneRun(label, method, 1, 10, 10.0, None, bits * math.log(2))
    return tour.TourRow(run, 1e-2, accuracy, 1e-2, setting)


def test_the_reading_says_what_the_numbers_say():
    full = _tour_row("full fine-tuning", "full", 2.50, 0.60, "every weight")
    short = _tour_row("LoRA r=4", "lora", 2.80, 0.40, "rank 4 on q_proj, v_proj, alpha = 2r")
    wide = _tour_row("LoRA r=16 every linear", "lora", 2.56, 0.65, "rank 16 on every linear layer, alpha = 2r")
    text = tour.reading([full, short, wide])
    assert text.count("\n") == 0 and "one seed" in text
    assert "falls short (best LoRA r=4: 2.800 vs full 2.500 bits/char)" in text
    assert "LoRA r=16 every linear reaches 2.560, closing 80% of the gap" in text
    assert "reaches 0.650, matching or passing full fine-tuning" in text
    good = _tour_row("LoRA r=4", "lora", 2.40, 0.61, "rank 4 on q_proj, v_proj, alpha = 2r")
    assert "code domain: LoRA on Wq, Wv (LoRA r=4) reaches full fine-tuning" in tour.reading([full, good, wide])


def test_a_row_without_a_recorded_rate_borrows_the_nearest_rank_and_says_so():
    record = tour.load_rates()
    lr, note = tour.rate_for(record, tour.Row("LoRA r=2", "lora", 2, ("q_proj", "v_proj")), "lm")
    assert lr == record["rows"]["LoRA r=1"]["lm"]["lr"] and "LoRA r=1" in note
    assert tour.rate_for(record, tour.Row("LoRA r=4", "lora", 4, ("q_proj", "v_proj")), "cls") == (
        record["rows"]["LoRA r=4"]["cls"]["lr"], "")
    with pytest.raises(ValueError, match="no row like"):
        tour.rate_for(record, tour.Row("LoRA r=4 on Wk", "lora", 4, ("k_proj",)), "lm")


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
    assert finetune.SAVABLE_METHODS == ("full", "lora", "dora", "vera", "loraplus", "qlora")
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
    run_tour(TourConfig.quick(out_dir=str(tmp_path / "tour"), ranks=(2,), wide_rank=0, steps=2, cls_steps=2,
                              latency_repeats=1))
    common.run_lora(("q_proj",), 1, 0, common.RunSettings.for_mode(True, steps=2), lr=1e-2, part="dev")
    assert calls == ["full", "full", "full", "lora", "lora", "lora"]      # the tour: each row on both tasks


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
    with pytest.raises(ValueError, match="unknown fine-tuning method 'lora9'"):
        finetune.finetune(untouched, "lora9", corpus, config)
    with pytest.raises(TypeError, match="got str"):
        finetune.finetune(untouched, "lora", "python-email", config)
    with pytest.raises(ValueError, match="latency_repeats"):
        finetune.finetune(untouched, "lora", corpus, config, latency_repeats={0: 3})
    assert untouched.num_parameters() == sum(b.size for b in before.values())     # no method was applied
    assert all(np.array_equal(p.data, before[n]) for n, p in untouched.named_parameters())


def test_tour_cli_quick(tmp_path):
    assert cli.main(["tour", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.csv").is_file()
