"""PiSSA adapters leave minilora for the weights they belong to.

A PiSSA layer trains over W_res = W0 - s (B0 A0)^T. ``save_peft_adapter`` writes, by default, the adapter converted
for the ORIGINAL weights W0 (rank 2r: A' = [A; A0], B' = [B, -B0]), an ordinary LoRA adapter; with
``base="residual"`` it writes the rank-r adapter for the residual weights that ``save_hf_gpt2`` writes from the same
model, marked so that no loader applies it as an ordinary adapter. Both are checked against PEFT (float64, max
|dlogit| <= 1e-9), and PEFT's own conversion is checked to load in minilora.
"""
import json

import numpy as np
import pytest

import minilora as ml
from minilora import gradcheck as gc
from minilora import interop, lora
from minilora.io.peft_files import PISSA_RESIDUAL

CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=3, n_embd=12)
TOL = 1e-9            # max |dlogit|: float64 logits of order 1, two orders of summation apart

CONFIGS = {           # c_attn thirds (q, v) and an MLP layer; rsLoRA on every linear layer
    "q,v,fc": ml.LoRAConfig(r=2, alpha=5, targets=("q_proj", "v_proj", "fc"), init="pissa"),
    "all-linear rsLoRA": ml.LoRAConfig(r=2, alpha=3, targets="all-linear", use_rslora=True, init="pissa"),
}


def reference():
    """torch, transformers and peft, or a skip: only the tests against PEFT need them."""
    reason = "the PEFT reference tests need torch, transformers and peft: pip install 'minilora[reference]'"
    return (pytest.importorskip("torch", reason=reason), pytest.importorskip("transformers", reason=reason),
            pytest.importorskip("peft", reason=reason))


def original_base(seed=0):
    model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    gc.randomize_parameters(model, seed)
    return model


def copy_of(model):
    fresh = ml.GPT(model.config, seed=0, dtype="float64")
    fresh.load_state_dict({k: v.copy() for k, v in model.state_dict().items() if "lora_" not in k})
    return fresh


def trained_pissa(config, seed=0):
    """(the original base, a copy of it with PiSSA applied and A, B moved as training would move them)."""
    base = original_base(seed)
    model = ml.apply_lora(copy_of(base), config, seed=seed)
    perturb(model, seed)
    return base, model


def perturb(model, seed):
    rng = np.random.default_rng(seed + 10)
    for _, m in lora.lora_modules(model):
        m.lora_A.data[...] = m.lora_A.data + ml.backend.asarray(0.2 * rng.standard_normal(m.lora_A.shape))
        m.lora_B.data[...] = m.lora_B.data + ml.backend.asarray(0.2 * rng.standard_normal(m.lora_B.shape))


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], (2, 8))


def max_gap(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def peft_logits(base_dir, adapter_dir, idx, config=None, dtype="float64"):
    torch, transformers, peft = reference()
    hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    theirs = peft.PeftModel.from_pretrained(hf, adapter_dir, config=config).eval()
    with torch.no_grad():
        return theirs(torch.from_numpy(idx)).logits.numpy()


# ----------------------------------------------------------------------------------------------------
# minilora alone


def test_the_converted_pair_over_the_original_weight_is_the_trained_pissa_layer():
    base, model = trained_pissa(CONFIGS["q,v,fc"])
    for name, m in lora.lora_modules(model):
        W0 = dict(base.named_modules())[name].weight.data
        assert gc.rel_error(lora.pissa_original_weight(m), W0) <= 1e-14, name
        A2, B2 = lora.pissa_for_original_base(m)
        assert A2.shape == (2 * m.r, W0.shape[0]) and B2.shape == (W0.shape[1], 2 * m.r)
        trained = m.weight.data + m.delta_weight()                       # W_res + s (B A)^T
        assert gc.rel_error(W0 + m.scale * (A2.T @ B2.T), trained) <= 1e-13, name
    assert "pissa_initial" not in " ".join(model.state_dict())          # a record, not a parameter
    assert not any("pissa" in n for n, _ in model.named_parameters())


def test_the_default_export_loads_into_a_fresh_original_base_as_a_rank_2r_lora(tmp_path):
    base, model = trained_pissa(CONFIGS["q,v,fc"])
    interop.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["use_rslora"] is False
    assert config["rank_pattern"] == {f"transformer.h.{i}.{mod}": rank for i in range(2)
                                      for mod, rank in (("attn.c_attn", 8), ("mlp.c_fc", 4))}
    assert config["alpha_pattern"] == {k: 2.5 * rank for k, rank in config["rank_pattern"].items()}   # s = 5/2
    fresh = copy_of(base)
    interop.load_peft_adapter(fresh, tmp_path)
    assert {n: m.r for n, m in lora.lora_modules(fresh)} == {n: 4 for n, _ in lora.lora_modules(model)}
    assert max_gap(fresh.forward(tokens()), model.forward(tokens())) <= TOL


def test_the_residual_export_is_refused_by_minilora_as_an_ordinary_adapter(tmp_path):
    base, model = trained_pissa(CONFIGS["q,v,fc"])
    interop.save_peft_adapter(model, tmp_path, base="residual")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == PISSA_RESIDUAL
    assert config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 4       # q's r + v's r, unconverted
    with pytest.raises(ValueError, match=f"adapter_config.json: init_lora_weights='{PISSA_RESIDUAL}'"):
        interop.load_peft_adapter(copy_of(base), tmp_path)


def test_mixed_pissa_and_plain_layers_share_c_attn(tmp_path):
    # q and v start from PiSSA; k is an ordinary LoRA layer of another rank and scale in the same c_attn
    base, model = trained_pissa(CONFIGS["q,v,fc"])
    for block in model.h:
        block.attn.k_proj = lora.LoRALinear(block.attn.k_proj, r=3, alpha=2.0, rng=np.random.default_rng(1))
        block.attn.k_proj.lora_B.data[...] = np.random.default_rng(2).standard_normal(block.attn.k_proj.lora_B.shape)
    interop.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"]["transformer.h.0.attn.c_attn"] == 4 + 3 + 4    # q 2r, k r, v 2r
    fresh = copy_of(base)
    interop.load_peft_adapter(fresh, tmp_path)
    assert {n.split(".", 2)[2]: m.r for n, m in lora.lora_modules(fresh) if n.startswith("h.0.")} == \
        {"attn.q_proj": 4, "attn.k_proj": 3, "attn.v_proj": 4, "mlp.fc": 4}
    assert max_gap(fresh.forward(tokens()), model.forward(tokens())) <= TOL


def test_a_bad_base_or_an_unconvertible_pissa_layer_is_a_clear_error(tmp_path):
    _, model = trained_pissa(CONFIGS["q,v,fc"])
    with pytest.raises(ValueError, match="base='merged'; expected 'original'"):
        interop.save_peft_adapter(model, tmp_path / "a", base="merged")
    model.h[1].mlp.fc.pissa_initial = None                 # its start forgotten
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.fc is a PiSSA layer with no record .* base='residual'"):
        interop.save_peft_adapter(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    interop.save_peft_adapter(model, tmp_path / "c", base="residual")     # as it trains: needs no record
    with pytest.raises(ValueError, match="not 'pissa'"):
        lora.pissa_for_original_base(ml.apply_lora(original_base(), ml.LoRAConfig(r=2)).h[0].attn.q_proj)


# ----------------------------------------------------------------------------------------------------
# against PEFT


@pytest.mark.parametrize("name", CONFIGS)
def test_peft_over_the_original_base_gives_the_pissa_models_logits(name, tmp_path):
    base, model = trained_pissa(CONFIGS[name])
    interop.save_hf_gpt2(base, tmp_path / "original")
    interop.save_peft_adapter(model, tmp_path / "adapter")
    idx = tokens()
    assert max_gap(peft_logits(tmp_path / "original", tmp_path / "adapter", idx), model.forward(idx)) <= TOL


def test_the_residual_export_is_exact_in_peft_over_the_residual_base_and_refused_as_it_stands(tmp_path):
    peft = reference()[2]
    base, model = trained_pissa(CONFIGS["all-linear rsLoRA"])
    interop.save_hf_gpt2(base, tmp_path / "original")
    interop.save_hf_gpt2(model, tmp_path / "residual")                   # W_res in every PiSSA layer
    interop.save_peft_adapter(model, tmp_path / "adapter", base="residual")
    idx = tokens()
    told = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    told.init_lora_weights = True                                        # "the base is the residual one already"
    assert max_gap(peft_logits(tmp_path / "residual", tmp_path / "adapter", idx, told), model.forward(idx)) <= TOL
    # as it stands PEFT takes the value for a PiSSA init to run: refused in float64 and float32 alike
    with pytest.raises(TypeError, match="PiSSA"):
        peft_logits(tmp_path / "residual", tmp_path / "adapter", idx)
    with pytest.raises(ValueError, match=PISSA_RESIDUAL):
        peft_logits(tmp_path / "residual", tmp_path / "adapter", idx, dtype="float32")
    # the trap it guards against: the rank-r adapter over the original weights is far off
    assert max_gap(peft_logits(tmp_path / "original", tmp_path / "adapter", idx, told), model.forward(idx)) > 1e-2


def test_dora_with_pissa_converts_exactly(tmp_path):
    # DoRA's direction V = W + s (B A)^T is the same matrix over W0 with the converted pair, so the same m applies
    base, model = trained_pissa(ml.LoRAConfig(r=2, alpha=5, targets=("q_proj", "v_proj", "fc"), init="pissa",
                                              use_dora=True))
    rng = np.random.default_rng(5)
    for _, m in lora.lora_modules(model):
        m.lora_magnitude.data[...] = m.lora_magnitude.data * (1 + 0.1 * rng.standard_normal(m.lora_magnitude.shape))
    interop.save_hf_gpt2(base, tmp_path / "original")
    interop.save_peft_adapter(model, tmp_path / "adapter")
    idx = tokens()
    assert max_gap(peft_logits(tmp_path / "original", tmp_path / "adapter", idx), model.forward(idx)) <= TOL
    fresh = copy_of(base)
    interop.load_peft_adapter(fresh, tmp_path / "adapter")
    assert max_gap(fresh.forward(idx), model.forward(idx)) <= TOL


def peft_pissa(tmp_path, use_rslora):
    """A PEFT PiSSA model on the original base (c_attn fused, as PEFT adapts it), with A and B moved as training
    would, and its initial adapter saved the way PEFT's docs say (init_lora_weights set to True first)."""
    torch, transformers, peft = reference()
    base = original_base(3)
    interop.save_hf_gpt2(base, tmp_path / "original")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "original", dtype=torch.float32)  # PEFT's SVD
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             use_rslora=use_rslora, init_lora_weights="pissa")
    theirs = peft.get_peft_model(hf, config).double().eval()
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "pissa_init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return base, theirs


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rsLoRA"])
def test_an_adapter_converted_by_peft_loads_in_minilora_over_the_original_base(use_rslora, tmp_path):
    torch = reference()[0]
    base, theirs = peft_pissa(tmp_path, use_rslora)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "pissa_init")
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4
    assert config["lora_alpha"] == pytest.approx(3 * 2 ** 0.5 if use_rslora else 6)
    idx = tokens(2)
    expected = peft_logits(tmp_path / "original", tmp_path / "converted", idx)
    with torch.no_grad():      # PEFT's PiSSA model itself, on its residual base rounded to float32 by the SVD
        assert max_gap(theirs(torch.from_numpy(idx)).logits.numpy(), expected) <= 1e-5
    interop.load_peft_adapter(base, tmp_path / "converted")
    assert all(m.r == 4 for _, m in lora.lora_modules(base))
    assert max_gap(base.forward(idx), expected) <= TOL


def test_peft_unconverted_pissa_save_is_refused_with_both_ways_out(tmp_path):
    base, theirs = peft_pissa(tmp_path, use_rslora=False)
    theirs.save_pretrained(tmp_path / "unconverted")
    file = tmp_path / "unconverted" / "adapter_config.json"
    assert json.loads(file.read_text())["init_lora_weights"] == "pissa"
    with pytest.raises(ValueError) as refused:
        interop.load_peft_adapter(base, tmp_path / "unconverted")
    message = str(refused.value)
    assert str(file) in message and "init_lora_weights='pissa'" in message
    assert "residual" in message and "path_initial_model_for_weight_conversion" in message
    assert not lora.lora_modules(base)
