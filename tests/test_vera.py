"""VeRA: the pair against finite differences and torch autograd, where it starts, merging, the shared pair held
once, its configuration, minilora's VeRA files and PEFT's (exported and imported with equal logits)."""
import json

import numpy as np
import pytest

import minilora as ml
from minilora import backend
from minilora import gradcheck as gc
from minilora.core.lora import LoRAConfig, disable_lora, merge_lora, unmerge_lora
from minilora.core.methods import MethodSettings, apply_method, training_memory
from minilora.core.nn import dropout_generators
from minilora.core.vera import (
    VeRAConfig,
    apply_vera,
    parameter_counts,
    projection,
    vera_backward,
    vera_forward,
    vera_modules,
    vera_parameter_count,
)
from minilora.io import interop
from minilora.io.adapter_files import save_lora
from minilora.io.files import load_safetensors, save_safetensors
from minilora.io.vera_files import VERA_CONFIG, VERA_WEIGHTS, load_peft_vera, load_vera, save_peft_vera, save_vera

CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)


def small_model(dtype="float64", seed=0):
    return ml.GPT(ml.GPTConfig(**CFG), seed=seed, dtype=dtype)


def tokens(B=2, T=7, seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], size=(B, T))


def trained_vera(config, dtype="float64", seed=0):
    """A VeRA model whose every parameter (the base, the pair, the vectors) is non-trivial: zeros hide no bug."""
    model = apply_vera(small_model(dtype, seed), config)
    gc.randomize_parameters(model, seed + 1, scale=0.3)
    return model


# ----------------------------------------------------------------------------------------------------
# the pair


def test_every_vera_case_passes_its_gradient_check():
    cases = gc.cases_of("vera")
    names = " ".join(c.name for c in cases)
    assert "dropout" in names and "frozen" in names and "no bias" in names and "r=7 > min(in, out)" in names
    results = [r for case in cases for r in gc.run_case(case)]
    failed = [f"{r.layer} {r.param}: {r.rel_error:.2e}" for r in results if not r.passed]
    assert not failed, failed
    assert {r.param for r in results} >= {"x", "lambda_d", "lambda_b", "W", "b"}


@pytest.mark.parametrize("x_shape,out,r,bias", [((2, 5, 6), 9, 4, True), ((7, 6), 3, 11, False),
                                                  ((1, 1, 6), 6, 1, True)])
def test_pair_matches_torch_autograd(x_shape, out, r, bias):
    pytest.importorskip("torch")
    from torch_helpers import assert_close, torch_reference

    rng = np.random.default_rng(3)
    n_in = x_shape[-1]
    x, W, b = rng.standard_normal(x_shape), rng.standard_normal((n_in, out)), rng.standard_normal(out)
    A, B = rng.standard_normal((r, n_in)), rng.standard_normal((out, r))
    ld, lb = rng.standard_normal(r), rng.standard_normal(out)
    y, cache = vera_forward(x, W, b if bias else None, A, B, ld, lb)
    dy = rng.standard_normal(y.shape)
    dx, dld, dlb, dW, db = vera_backward(dy, cache, weight_grad=True, bias_grad=bias)

    def reference(x, W, b, A, B, ld, lb):       # y = x W + b + lambda_b * ((lambda_d * (x A^T)) B^T)
        return x @ W + (b if bias else 0 * b) + lb * ((ld * (x @ A.T)) @ B.T)

    ref_y, grads = torch_reference(reference, [x, W, b, A, B, ld, lb], dy)
    assert_close(y, ref_y, "y")
    for what, ours, theirs in (("dx", dx, grads[0]), ("dW", dW, grads[1]), ("dlambda_d", dld, grads[5]),
                               ("dlambda_b", dlb, grads[6])):
        assert_close(ours, theirs, what)
    if bias:
        assert_close(db, grads[2], "db")
    else:
        assert db is None
    _, cache = vera_forward(x, W, None, A, B, ld, lb)
    assert vera_backward(dy, cache)[3:] == (None, None), "a frozen W and b get no gradient"


def test_whole_model_directional_check_with_dropout():
    cfg = ml.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12, dropout=0.1)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, size=(2, 5)), rng.integers(0, 11, size=(2, 5))
    with ml.use_fast(False):
        for config in (VeRAConfig(r=5, dropout=0.1), VeRAConfig(r=20, targets="all-linear", dropout=0.2)):
            model = apply_vera(ml.GPT(cfg, seed=0, dtype="float64"), config)
            gc.randomize_parameters(model, 0)
            result = gc.directional_check(model, gc.gpt_loss_fn(idx, targets, dropout_generators(model)))
            assert result.passed, f"{config}: {result.rel_error:.2e}"


# ----------------------------------------------------------------------------------------------------
# where it starts, merging, disabling


def test_vera_starts_exactly_at_the_base_model():
    idx = tokens()
    base = small_model()
    gc.randomize_parameters(base, 1)
    expected = base.forward(idx)
    model = apply_vera(base, VeRAConfig(r=16, targets="all-linear"))
    assert np.array_equal(model.forward(idx), expected)
    for _, m in vera_modules(model):
        assert np.all(m.vera_lambda_b.data == 0) and np.all(m.vera_lambda_d.data == 0.1)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w_bit_for_bit():
    model = trained_vera(VeRAConfig(r=6, targets=("q_proj", "v_proj", "fc", "proj")))
    idx = tokens()
    unmerged = model.forward(idx)
    weights = {n: m.weight.data.copy() for n, m in vera_modules(model)}
    merge_lora(model)
    merged = model.forward(idx)
    # x (W + dW) against x W + x dW: the same sums in another order, float64 rounding of relative size ~1e-15 on
    # these few products; 1e-12 leaves room for it and still catches any wrong update, which is of size 1
    assert gc.rel_error(merged, unmerged) <= 1e-12
    for n, m in vera_modules(model):
        assert not np.array_equal(m.weight.data, weights[n]), f"{n}: merge left W unchanged"
    unmerge_lora(model)
    for n, m in vera_modules(model):
        assert np.array_equal(m.weight.data, weights[n]), f"{n}: unmerge did not restore W exactly"
    assert np.array_equal(model.forward(idx), unmerged)


def test_delta_weight_is_the_update_in_w_layout():
    model = trained_vera(VeRAConfig(r=5, targets="fc"))          # in 8, out 32: a transposed layout cannot fit
    name, layer = vera_modules(model)[0]
    x = np.random.default_rng(4).standard_normal((3, 8))
    with disable_lora(model):
        base = layer.forward(x)
    assert layer.delta_weight().shape == (8, 32)
    assert gc.rel_error(layer.forward(x), base + x @ layer.delta_weight()) <= 1e-12


def test_disable_gives_the_base_model():
    idx = tokens()
    base = small_model()
    gc.randomize_parameters(base, 1)
    expected = base.forward(idx)
    model = apply_vera(base, VeRAConfig(r=4))
    for _, m in vera_modules(model):
        m.vera_lambda_b.data[...] = 1.0
    assert not np.array_equal(model.forward(idx), expected)
    with disable_lora(model):
        assert np.array_equal(model.forward(idx), expected)


# ----------------------------------------------------------------------------------------------------
# the shared pair: one pair, frozen, counted once


def test_the_shared_pair_is_one_pair_in_memory():
    config = VeRAConfig(r=6, targets=("q_proj", "fc", "proj"))
    model = apply_vera(small_model(), config)
    layers = vera_modules(model)
    assert len(layers) == 6
    for name, m in layers:
        A_s, B_s = m.sliced_pair()
        assert np.shares_memory(A_s, model.vera_A.data) and np.shares_memory(B_s, model.vera_B.data), name
        assert A_s.shape == (6, m.in_features) and B_s.shape == (m.out_features, 6)
    assert model.vera_A.shape == (6, 32) and model.vera_B.shape == (32, 6)     # in_max = 4C (proj), out_max = 4C (fc)
    A, B = projection(6, 32, 32, config.projection_seed)
    assert np.array_equal(model.vera_A.data, A) and np.array_equal(model.vera_B.data, B)
    bound = np.sqrt(6.0 / 32)        # Kaiming-uniform as PEFT: sqrt(3) sqrt(2) / sqrt(fan_in)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.9 * bound


def test_parameters_and_memory_count_the_pair_once_and_train_only_the_vectors():
    base_total = small_model().num_parameters()
    config = VeRAConfig(r=6, targets=("q_proj", "v_proj", "fc"))
    model = apply_vera(small_model(dtype="float32"), config)
    trainable = dict(model.named_parameters(trainable_only=True))
    assert set(trainable) == {f"h.{l}.{t}.vera_lambda_{v}" for l in range(2)
                              for t in ("attn.q_proj", "attn.v_proj", "mlp.fc") for v in "db"}
    counts = vera_parameter_count(small_model(), config)
    assert counts == {"trainable": 2 * ((6 + 8) + (6 + 8) + (6 + 32)), "projection": 6 * (8 + 32)}
    assert model.num_parameters(trainable_only=True) == counts["trainable"]
    assert model.num_parameters() == base_total + counts["trainable"] + counts["projection"]
    assert not model.vera_A.trainable and not model.vera_B.trainable
    memory = training_memory(model, tokens(T=8), tokens(T=8))
    assert memory["parameters"] == 4 * model.num_parameters()
    assert memory["gradients"] == 4 * counts["trainable"]


def test_parameter_counts_against_lora_on_the_default_model():
    counts = parameter_counts(ml.GPT(ml.GPTConfig(), seed=0), LoRAConfig(r=4), VeRAConfig(r=256))
    assert counts == {"lora": 8192, "vera": 8 * (256 + 128), "vera_projection": 256 * (128 + 128)}
    assert apply_method(ml.GPT(ml.GPTConfig(), seed=0), "vera", MethodSettings()).num_parameters(True) == 3072


def test_training_moves_only_the_vectors():
    model = apply_vera(small_model(dtype="float32"), VeRAConfig(r=4, dropout=0.1))
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    ids = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=300).astype(np.uint8)
    ml.train.fit(model, ids, None, ml.train.TrainConfig(steps=3, batch_size=2, block_size=6, lr=1e-2, min_lr=1e-3,
                                                        warmup_steps=0, eval_every=0, checkpoint_every=0, quiet=True))
    for n, p in model.named_parameters():
        assert np.array_equal(p.data, before[n]) != p.trainable, n


# ----------------------------------------------------------------------------------------------------
# configuration and refusals


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"VeRAConfig.r .*got 0"), (dict(r=2.5), r"VeRAConfig.r .*got 2.5"), (dict(r=True), "got True"),
    (dict(targets=()), r"targets .*got \(\)"), (dict(targets=("q_proj", "")), "targets"),
    (dict(d_initial=float("nan")), "d_initial .*got nan"), (dict(d_initial="0.1"), "d_initial .*got '0.1'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\); got 1.0"), (dict(dropout=-0.1), "got -0.1"),
    (dict(projection_seed=-1), "projection_seed .*got -1"), (dict(projection_seed=1.5), "got 1.5"),
])
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VeRAConfig(**kwargs)


def test_apply_refusals_change_nothing():
    model = small_model()
    with pytest.raises(TypeError, match="VeRAConfig"):
        apply_vera(model, LoRAConfig())
    with pytest.raises(ValueError, match=r"no Linear module matches targets \['c_attn'\]"):
        apply_vera(model, VeRAConfig(targets="c_attn"))
    assert not vera_modules(model) and "vera_A" not in vars(model)
    assert all(p.trainable for p in model.parameters())
    apply_vera(model, VeRAConfig(r=4))
    with pytest.raises(ValueError, match="already has LoRA or VeRA layers"):
        apply_vera(model, VeRAConfig(r=4))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        ml.apply_lora(model, LoRAConfig(r=2))


def test_lora_only_operations_refuse_a_vera_model_clearly(tmp_path):
    model = apply_vera(small_model(), VeRAConfig(r=4))
    with pytest.raises(ValueError, match="VeRA layer has no lora_A"):
        save_lora(model, tmp_path / "lora")
    with pytest.raises(ValueError, match="VeRA layer has no LoRA scale"):
        model.h[0].attn.q_proj.scale
    merge_lora(model)
    with pytest.raises(ValueError, match="merged VeRA layer"):
        model.load_state_dict(model.state_dict())
    model.forward(tokens())
    with pytest.raises(RuntimeError, match="merged VeRA layer"):
        model.backward(np.ones((2, 7, CFG["vocab_size"])))


# ----------------------------------------------------------------------------------------------------
# minilora's VeRA files


def test_native_round_trip_is_bit_exact(tmp_path):
    model = trained_vera(VeRAConfig(r=6, targets=("q_proj", "v_proj", "fc"), projection_seed=7), dtype="float32")
    save_vera(model, tmp_path / "v")
    # the base the adapter was trained on (randomised above), without the adapter
    base = small_model(dtype="float32")
    base.load_state_dict({n: p for n, p in model.state_dict().items() if n in dict(base.named_parameters())})
    loaded = load_vera(base, tmp_path / "v")
    idx = tokens()
    assert np.array_equal(loaded.forward(idx), model.forward(idx))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_file_of_a_drawn_pair_stores_no_pair(tmp_path, dtype):
    config = VeRAConfig(r=6, targets=("q_proj", "proj"), projection_seed=3)
    model = apply_vera(small_model(dtype), config)
    for i, (_, m) in enumerate(vera_modules(model)):
        m.vera_lambda_b.data[...] = 0.1 * (i + 1)
    save_vera(model, tmp_path / "v")
    tensors, _ = load_safetensors(tmp_path / "v" / VERA_WEIGHTS)
    assert sorted(tensors) == sorted(f"{n}.vera_lambda_{v}" for n, _ in vera_modules(model) for v in "db")
    for target in (small_model(dtype), apply_vera(small_model(dtype), config)):    # a base, or the same VeRA layers
        loaded = load_vera(target, tmp_path / "v")
        assert np.array_equal(loaded.vera_A.data, model.vera_A.data)
        assert np.array_equal(loaded.forward(tokens()), model.forward(tokens()))


def test_native_file_with_a_stored_pair_round_trips(tmp_path):
    model = trained_vera(VeRAConfig(r=6))        # randomised pair: not the seed's, so the file carries it
    save_vera(model, tmp_path / "v")
    assert "vera_A" in load_safetensors(tmp_path / "v" / VERA_WEIGHTS)[0]
    base = small_model()
    base.load_state_dict({n: p for n, p in model.state_dict().items() if n in dict(base.named_parameters())})
    assert np.array_equal(load_vera(base, tmp_path / "v").forward(tokens()), model.forward(tokens()))


def test_native_refusals(tmp_path):
    model = apply_vera(small_model(), VeRAConfig(r=6))
    save_vera(model, tmp_path / "v")
    # another base model: refused (the fingerprint), loaded with force=True
    with pytest.raises(ValueError, match="other base weights"):
        load_vera(small_model(seed=1), tmp_path / "v")
    load_vera(small_model(seed=1), tmp_path / "v", force=True)
    # another architecture
    other = ml.GPT(ml.GPTConfig(**{**CFG, "n_embd": 12, "n_head": 3}), seed=0, dtype="float64")
    with pytest.raises(ValueError, match="trained on a model with config"):
        load_vera(other, tmp_path / "v")
    # a model with other VeRA layers
    with pytest.raises(ValueError, match="made with"):
        load_vera(apply_vera(small_model(), VeRAConfig(r=6, projection_seed=1)), tmp_path / "v")
    # an edited readable copy
    meta = json.loads((tmp_path / "v" / VERA_CONFIG).read_text())
    meta["vera_config"]["r"] = 5
    (tmp_path / "v" / VERA_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match the configuration sealed .*differing: \['vera_config'\]"):
        load_vera(small_model(), tmp_path / "v")
    # a file sealed with a wrong shape, and one with NaN
    tensors, header = load_safetensors(tmp_path / "v" / VERA_WEIGHTS)
    (tmp_path / "v" / VERA_CONFIG).unlink()
    bad = dict(tensors)
    bad["h.0.attn.q_proj.vera_lambda_d"] = np.zeros(5)
    save_safetensors(bad, tmp_path / "v" / VERA_WEIGHTS, metadata={k: v for k, v in header.items()
                                                                  if k != "minilora_sha256"})
    with pytest.raises(ValueError, match=r"h.0.attn.q_proj.vera_lambda_d has shape \(5,\), the model needs \(6,\)"):
        load_vera(small_model(), tmp_path / "v")
    raw = bytearray((tmp_path / "v" / VERA_WEIGHTS).read_bytes())
    raw[-8:] = np.array([np.nan]).tobytes()
    (tmp_path / "v" / VERA_WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="non-finite"):
        load_vera(small_model(), tmp_path / "v")
    # nothing to save
    with pytest.raises(ValueError, match="no VeRA layers"):
        save_vera(small_model(), tmp_path / "w")
    model.h[0].attn.q_proj.vera_lambda_b.data[0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_vera(model, tmp_path / "w")
    assert not (tmp_path / "w" / VERA_WEIGHTS).exists()


def test_a_drawn_pair_that_differs_from_the_record_is_refused(tmp_path, monkeypatch):
    model = apply_vera(small_model(), VeRAConfig(r=6))
    save_vera(model, tmp_path / "v")
    import minilora.io.vera_files as vf

    monkeypatch.setattr(vf, "projection", lambda r, i, o, seed: projection(r, i, o, seed + 1))
    with pytest.raises(ValueError, match="drawn again .* differs from the one the adapter was trained with"):
        load_vera(small_model(), tmp_path / "v")


# ----------------------------------------------------------------------------------------------------
# PEFT's files

PEFT_TARGETS = {
    "q,v (paper)": ("q_proj", "v_proj"),
    "unfused": ("o_proj", "fc", "proj"),
    "q,k,v + fc": ("q_proj", "k_proj", "v_proj", "fc"),
    "all-linear": "all-linear",
}


def peft_of(model, tmp_path, dtype="float64"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    interop.save_hf_gpt2(model, tmp_path / "base")
    interop.save_peft_adapter(model, tmp_path / "adapter")        # goes to save_peft_vera
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=getattr(torch, dtype))
    return peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()


def peft_logits(theirs, idx):
    import torch

    with torch.no_grad():
        return theirs(torch.from_numpy(idx)).logits.numpy()


@pytest.mark.parametrize("name", PEFT_TARGETS)
def test_exported_vera_gives_peft_the_same_logits(name, tmp_path):
    model = trained_vera(VeRAConfig(r=5, targets=PEFT_TARGETS[name]))
    theirs = peft_of(model, tmp_path)
    idx = tokens()
    assert gc.rel_error(model.forward(idx), peft_logits(theirs, idx)) <= 1e-9
    # and back: minilora reads its own export exactly, q, k, v blocks included
    back = interop.load_peft_adapter(interop.load_hf_gpt2(tmp_path / "base", dtype="float64"), tmp_path / "adapter")
    assert sorted(n for n, _ in vera_modules(back)) == sorted(n for n, _ in vera_modules(model))
    assert np.array_equal(back.vera_A.data, model.vera_A.data) and np.array_equal(back.vera_B.data, model.vera_B.data)
    assert np.array_equal(back.forward(idx), model.forward(idx))          # the same arrays, the same computation


def test_exported_vera_in_float32(tmp_path):
    model = trained_vera(VeRAConfig(r=5, targets=("q_proj", "v_proj", "fc")), dtype="float32")
    theirs = peft_of(model, tmp_path, dtype="float32")
    idx = tokens()
    assert np.abs(backend.to_numpy(model.forward(idx)) - peft_logits(theirs, idx)).max() <= 1e-5


def peft_native(tmp_path, targets, save_projection=True, dtype="float64"):
    """A VeRA adapter made and saved by PEFT itself (its own pair, from torch's generator), non-zero vectors, for
    the GPT-2 of a randomised minilora base; returns (minilora base, PEFT model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = small_model(dtype)
    gc.randomize_parameters(base, 2)
    interop.save_hf_gpt2(base, tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=getattr(torch, dtype))
    theirs = peft.get_peft_model(hf, peft.VeraConfig(r=7, target_modules=targets, save_projection=save_projection,
                                                     projection_prng_key=3))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    theirs.save_pretrained(tmp_path / "peft")
    return base, theirs.eval()


def test_a_peft_made_adapter_loads_with_the_same_logits_and_gradients(tmp_path):
    base, theirs = peft_native(tmp_path, ["attn.c_proj", "c_fc", "mlp.c_proj"])
    model = interop.load_peft_adapter(base, tmp_path / "peft")        # goes to load_peft_vera
    assert len(vera_modules(model)) == 6 and model.vera_A.shape == (7, 32)
    idx, targets = tokens(), tokens(seed=1)
    logits = model.forward(idx)
    assert gc.rel_error(logits, peft_logits(theirs, idx)) <= 1e-9
    import torch

    loss, dlogits = ml.cross_entropy(logits, targets)
    model.backward(dlogits)
    theirs.zero_grad()
    out = theirs(torch.from_numpy(idx))           # the loss minilora computes (HF's labels= would shift them)
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, CFG["vocab_size"]),
                                      torch.from_numpy(targets).reshape(-1)).backward()
    grads = {n: p.grad.numpy() for n, p in theirs.named_parameters() if p.grad is not None}
    hf_names = {"attn.o_proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for name, m in vera_modules(model):
        block, ours = name.split(".", 2)[:2], name.split(".", 2)[2]
        hf = f"base_model.model.transformer.{'.'.join(block)}.{hf_names[ours]}"
        assert gc.rel_error(m.vera_lambda_d.grad, grads[f"{hf}.vera_lambda_d.default"]) <= 1e-9, name
        assert gc.rel_error(m.vera_lambda_b.grad, grads[f"{hf}.vera_lambda_b.default"]) <= 1e-9, name
    # a PEFT pair is not the one minilora's seed draws: the native file carries it, and loads back exactly
    save_vera(model, tmp_path / "native")
    assert "vera_A" in load_safetensors(tmp_path / "native" / VERA_WEIGHTS)[0]


def test_peft_refusals(tmp_path):
    _, _ = peft_native(tmp_path / "fused", ["c_attn", "c_fc"])
    with pytest.raises(ValueError, match="c_attn is GPT-2's fused q, k, v projection.* cannot be loaded exactly"):
        load_peft_vera(small_model(), tmp_path / "fused" / "peft")
    _, _ = peft_native(tmp_path / "seedonly", ["c_fc"], save_projection=False)
    with pytest.raises(ValueError, match="save_projection=false.*torch's generator"):
        load_peft_vera(small_model(), tmp_path / "seedonly" / "peft")
    # a file whose blocks were mixed (as training in PEFT would: c_attn's lambda_d grows into the unfused layers'
    # block) is refused, not loaded approximately
    model = trained_vera(VeRAConfig(r=3, targets=("q_proj", "fc")))
    save_peft_vera(model, tmp_path / "blocks")
    tensors, header = load_safetensors(tmp_path / "blocks" / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.vera_lambda_d"
    tensors[key] = tensors[key] + 0.5
    save_safetensors(tensors, tmp_path / "blocks" / "adapter_model.safetensors",
                     metadata={k: v for k, v in header.items() if k != "minilora_sha256"})
    with pytest.raises(ValueError, match="c_attn uses the unfused layers' block, so the pair no longer has the blocks"):
        load_peft_vera(small_model(), tmp_path / "blocks")
    # exports that cannot be written
    with pytest.raises(ValueError, match="no VeRA layers to export"):
        save_peft_vera(small_model(), tmp_path / "x")
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        save_peft_vera(model, tmp_path / "x")
    with pytest.raises(ValueError, match="already has LoRA or VeRA layers"):
        load_peft_vera(model, tmp_path / "blocks")
