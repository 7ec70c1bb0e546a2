"""The benchmark runs and reports ratios (speed goals live in its output, not in timed tests)."""
import importlib.util

import minilora as ml
from minilora import bench, cli


def test_bench_reports_every_figure():
    config = ml.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)
    with_torch = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
    result = bench.run(config, batch_size=2, steps=2, warmup=1, with_torch=with_torch, profile=True, wide_n_embd=64,
                       load_memory=config)
    assert result.minilora_step_s > 0 and result.minilora_gflops > 0
    assert result.lora_step_s > 0 and result.lora_ratio > 0 and result.reference_step_s > 0
    # a ratio is summarised from the same rounds as the two times reported beside it
    assert result.lora_ratio == result.spreads["lora step / full step (with lora)"]["median"]
    assert result.lora_step_s == result.spreads["lora step"]["median"]
    for s in result.spreads.values():
        assert s["q1"] <= s["median"] <= s["q3"] and s["n"] >= 1
    assert set(result.inference_ms) == set(result.wide_inference_ms) == {"batch 1", "batch 32"}
    assert set(result.inference_ratio["batch 1"]) == {"lora unmerged", "lora merged", "adapters"}
    assert result.wide_config["n_embd"] == 64
    assert result.matmul_peak_gflops > 0 and result.cpu and result.blas
    assert "linear_forward" in result.breakdown_s and "AdamW.step" in result.breakdown_s
    if with_torch:        # measured taking turns with PyTorch
        assert result.ratio > 0 and result.torch_step_s > 0 and result.lora_torch_ratio > 0
        assert result.ratio == result.spreads["full step (with torch) / torch step"]["median"]
    text = bench.format_result(result)
    assert "LoRA r=4" in text and "inference batch 1" in text and "reference core" in text and "n_embd 64" in text
    nf4 = result.nf4_memory             # byte counts of the frozen linear weights, not timings
    assert nf4["float32"] == 4 * nf4["numbers"] == 4 * (4 * 16 * 16 + 2 * 16 * 64)     # q, k, v, o; fc, proj
    assert nf4["nf4 / float32"] <= 0.3 and nf4["nf4 double quant"] < nf4["nf4"] and "NF4" in text
    loaded = result.load_memory       # resident-memory figures of loading a checkpoint, reported, not judged here
    assert loaded["weights_bytes"] == 4 * ml.GPT(config).num_parameters()
    for loader in ("minilora", "transformers") if with_torch else ("minilora",):
        assert set(loaded[loader]) >= {"after", "peak", "used", "seconds"}, loader
    assert "minilora load_hf_gpt2" in text and "from_pretrained" in text


def test_load_memory_checkpoint_is_a_gpt2_checkpoint(tmp_path):
    config = ml.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)
    nbytes = bench.write_random_gpt2(tmp_path, config)
    model = ml.interop.load_hf_gpt2(tmp_path, dtype="float32")
    assert model.config == config and nbytes == 4 * model.num_parameters()
    assert all(p.data.std() > 0 for p in model.parameters())
    measured = bench.measure_load_memory(config, with_transformers=False)
    assert "note" in measured["transformers"] and measured["minilora"]["seconds"] > 0
    assert "skipped" in "\n".join(bench.format_load_memory(measured))


def test_step_flops_counts_matrix_products():
    c = ml.GPTConfig(vocab_size=10, n_layer=1, n_embd=4, block_size=3)
    forward = 2 * 2 * 3 * (12 * 16 + 10 * 4) + 4 * 2 * 3 * 3 * 4
    assert bench.step_flops(c, 2, 3) == 3 * forward


def test_bench_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
                     "--batch-size", "2", "--steps", "1", "--no-torch", "--no-profile", "--json", str(out)]) == 0
    assert out.read_text().startswith("{")


def test_scaling_measures_growth_and_attention_memory(tmp_path):
    base = ml.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    grown = bench.scaling(base, batch_size=2, n_embds=(16, 32), block_sizes=(8, 32), batch_sizes=(1, 2), steps=1,
                          warmup=0)
    assert [v for v, _ in grown["n_embd"]] == [16, 32] and all(t > 0 for _, t in grown["batch_size"])
    (_, b8), (_, b32) = grown["attention_bytes"]
    assert b32 > 4 * b8            # more than linear in T: the (B, H, T, T) probabilities grow as T^2
    bench.plot_scaling(grown, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_tour_under_load_times_the_tour_alone_and_beside_a_busy_process():
    """The contention measurement's mechanics, on the quick tour (no figure is asserted: targets live in the
    benchmark's output)."""
    from minilora import bench

    m = bench.tour_under_load(["--quick"], busy=("a busy Python process",))
    assert m["quiet"] > 0 and m["a busy Python process"]["seconds"] > 0
    assert m["a busy Python process"]["ratio"] == m["a busy Python process"]["seconds"] / m["quiet"]
    text = "\n".join(bench.format_contention(m))
    assert "beside a busy Python process" in text and "the quiet time" in text
