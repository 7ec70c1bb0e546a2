"""DoRA: the pair against finite differences (exact gradient) and torch autograd (exact and with the norm
detached, as PEFT computes it), the layer's start, merge and unmerge, and adapters both ways through PEFT."""
import numpy as np
import pytest

import minilora as ml
from minilora import backend
from minilora import gradcheck as gc
from minilora import interop, lora
from minilora.core.dora import DoRALinear, column_norm, dora_backward, dora_forward

CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=3, n_embd=12)


def host(a):
    return backend.to_numpy(a)


def pair_inputs(seed=0, shape=(2, 5, 6), out=7, r=2, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    W = rng.standard_normal((shape[-1], out))
    b = rng.standard_normal(out) if bias else None
    A, B = rng.standard_normal((r, shape[-1])), rng.standard_normal((out, r))
    m = 2.0 + rng.standard_normal(out)            # away from ||V||, so that g = m / ||V|| is not 1
    return {k: None if v is None else backend.asarray(v) for k, v in dict(x=x, W=W, b=b, A=A, B=B, m=m).items()}


def test_the_exact_backward_passes_the_finite_difference_check():
    cases = gc.cases_of("dora")
    assert {case.flags["norm_gradient"] for case in cases} == {True}
    assert {case.options.get("dropout_p", 0.0) > 0 for case in cases} == {True, False}
    assert {case.inputs["b"] is None for case in cases} == {True, False}
    for case in cases:
        for r in gc.run_case(case):
            assert r.rel_error <= gc.THRESHOLD, f"{case.name} d{r.param}: {r.rel_error:.2e}"


def test_the_detached_norm_drops_exactly_the_norm_term():
    """With the norm held constant, the gradients of A and B lose the term through ||V||; dx and dm do not."""
    inputs = pair_inputs()
    y, cache = dora_forward(*inputs.values(), scale=1.3)
    dy = backend.asarray(np.random.default_rng(1).standard_normal(y.shape))
    exact = dora_backward(dy, cache, norm_gradient=True, bias_grad=True)
    detached = dora_backward(dy, cache, norm_gradient=False, bias_grad=True)
    for i in (0, 3, 4):                                        # dx, dm, db
        np.testing.assert_array_equal(host(exact[i]), host(detached[i]))
    assert gc.rel_error(exact[1], detached[1]) > 1e-3 and gc.rel_error(exact[2], detached[2]) > 1e-3


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="the PyTorch reference tests need torch: pip install 'minilora[reference]'")


@pytest.fixture
def hf(torch):
    """(transformers, peft), the reference libraries of the PEFT round trips."""
    return (pytest.importorskip("transformers", reason="needs transformers: pip install 'minilora[reference]'"),
            pytest.importorskip("peft", reason="needs peft: pip install 'minilora[reference]'"))


def torch_dora(torch, x, W, b, A, B, m, scale, detach):
    """PEFT's DoRA forward written out: base + (g - 1) x W + g s x A^T B^T, g = m / ||W + s (BA)^T||_c."""
    V = W + scale * (A.T @ B.T)
    n = torch.linalg.norm(V, dim=0)
    g = m / (n.detach() if detach else n)
    y = x @ W + (g - 1) * (x @ W) + g * scale * ((x @ A.T) @ B.T)
    return y if b is None else y + b


@pytest.mark.parametrize("detach", [True, False], ids=["norm detached (PEFT)", "exact"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,out,r", [((2, 5, 6), 7, 2), ((1, 1, 6), 6, 1), ((4, 9), 3, 3)])
def test_pair_matches_torch_autograd(torch, shape, out, r, bias, detach):
    inputs = pair_inputs(shape=shape, out=out, r=r, bias=bias)
    y, cache = dora_forward(*inputs.values(), scale=0.7)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    dx, dA, dB, dm, db = dora_backward(backend.asarray(dy), cache, norm_gradient=not detach, bias_grad=True)
    leaves = {k: None if v is None else torch.tensor(host(v), requires_grad=k != "W") for k, v in inputs.items()}
    ref = torch_dora(torch, *leaves.values(), 0.7, detach)
    (ref * torch.from_numpy(dy)).sum().backward()
    assert gc.rel_error(y, ref.detach().numpy()) <= 1e-12
    for name, ours in (("x", dx), ("A", dA), ("B", dB), ("m", dm)) + ((("b", db),) if bias else ()):
        assert gc.rel_error(ours, leaves[name].grad.numpy()) <= 1e-9, name
    if not bias:
        assert db is None


def adapted_model(config, seed=0, dtype="float64"):
    model = ml.GPT(ml.GPTConfig(**CFG), seed=seed, dtype=dtype)
    gc.randomize_parameters(model, seed)
    ml.apply_lora(model, config, seed=seed)
    rng = np.random.default_rng(seed + 10)
    for _, m in lora.lora_modules(model):          # trained-looking A, B and magnitude
        m.lora_A.data[...] = backend.asarray(rng.standard_normal(m.lora_A.shape) * 0.3)
        m.lora_B.data[...] = backend.asarray(rng.standard_normal(m.lora_B.shape) * 0.3)
        if isinstance(m, DoRALinear):
            m.lora_magnitude.data[...] = m.lora_magnitude.data * backend.asarray(1 + 0.2 * rng.standard_normal(m.lora_magnitude.shape))
    return model


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], (2, 8))


def test_dora_starts_at_the_base_model_and_trains_a_magnitude():
    base = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    gc.randomize_parameters(base, 0)
    expected = host(base.forward(tokens()))
    ml.apply_lora(base, ml.LoRAConfig(r=2, alpha=4, use_dora=True), seed=0)
    layers = lora.lora_modules(base)
    assert layers and all(isinstance(m, DoRALinear) for _, m in layers)
    for _, m in layers:
        np.testing.assert_array_equal(host(m.lora_magnitude.data), host(column_norm(m.weight.data)))
        assert m.lora_magnitude.trainable and not m.weight.trainable
    # g = ||W|| / ||W|| is 1 up to rounding, so the start equals the base to float64 rounding, not bit for bit
    assert gc.rel_error(base.forward(tokens()), expected) <= 1e-14
    trainable = {n for n, p in base.named_parameters() if p.trainable}
    assert trainable == {f"h.{l}.attn.{t}.lora_{k}" for l in range(2) for t in ("q_proj", "v_proj")
                         for k in ("A", "B", "magnitude")}


def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w_exactly():
    model = adapted_model(ml.LoRAConfig(r=2, alpha=4, use_dora=True, targets="all-linear"))
    model.eval()
    weights = {n: host(p.data).copy() for n, p in model.named_parameters()}
    unmerged = host(model.forward(tokens()))
    ml.merge_lora(model)
    # W' = m V / ||V|| computed once versus g (x V) per row: the same math in another order (float64 rounding)
    assert gc.rel_error(model.forward(tokens()), unmerged) <= 1e-12
    ml.unmerge_lora(model)
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(host(p.data), weights[n], err_msg=n)
    np.testing.assert_array_equal(host(model.forward(tokens())), unmerged)


def test_exact_norm_gradient_trains_through_the_norm_and_config_errors_are_named():
    model = adapted_model(ml.LoRAConfig(r=2, alpha=4, use_dora=True, dora_norm_gradient=True))
    assert all(m.norm_gradient for _, m in lora.lora_modules(model))
    with pytest.raises(ValueError, match="needs use_dora=True"):
        ml.LoRAConfig(dora_norm_gradient=True)
    with pytest.raises(ValueError, match="use_dora must be True or False; got 'yes'"):
        ml.LoRAConfig(use_dora="yes")


def peft_logits(torch, hf, model, tmp_path, dtype):
    transformers, peft = hf
    interop.save_hf_gpt2(model, tmp_path / "base")
    interop.save_peft_adapter(model, tmp_path / "adapter")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=dtype)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        return theirs(torch.from_numpy(tokens())).logits.double().numpy()


DORA_CONFIGS = {
    "q,v (paper)": ml.LoRAConfig(r=2, alpha=5, use_dora=True),
    "all-linear": ml.LoRAConfig(r=2, alpha=3, targets="all-linear", use_dora=True),
    "k,o rsLoRA": ml.LoRAConfig(r=3, alpha=2, targets=("k_proj", "o_proj"), use_rslora=True, use_dora=True),
}


@pytest.mark.parametrize("name", DORA_CONFIGS)
def test_exported_dora_adapter_gives_peft_the_same_logits(torch, hf, name, tmp_path):
    model = adapted_model(DORA_CONFIGS[name])
    assert np.abs(peft_logits(torch, hf, model, tmp_path, torch.float64) - host(model.forward(tokens()))).max() <= 1e-9


def test_exported_float32_dora_adapter_gives_peft_the_same_logits(torch, hf, tmp_path):
    model = adapted_model(ml.LoRAConfig(r=2, alpha=5, use_dora=True), dtype="float32")
    assert np.abs(peft_logits(torch, hf, model, tmp_path, torch.float32) - host(model.forward(tokens()))).max() <= 1e-5


def test_a_dora_adapter_trained_in_peft_loads_into_minilora(torch, hf, tmp_path):
    transformers, peft = hf
    base = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    gc.randomize_parameters(base, 3)
    interop.save_hf_gpt2(base, tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False, use_dora=True)
    theirs = peft.get_peft_model(hf, config)
    with torch.no_grad():    # a trained magnitude, the k third's included (it has no update of its own below)
        for name, p in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
            if "c_attn.lora_B" in name:
                p[12:24] = 0.0
    theirs.eval()
    theirs.save_pretrained(tmp_path / "adapter")
    idx = tokens(2)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(idx)).logits.numpy()
    interop.load_peft_adapter(base, tmp_path / "adapter")
    layers = dict(lora.lora_modules(base))
    assert all(isinstance(m, DoRALinear) for m in layers.values())
    assert layers["h.0.attn.k_proj"].r == 1 and not host(layers["h.0.attn.k_proj"].lora_B.data).any()
    assert np.abs(host(base.forward(idx)) - expected).max() <= 1e-9


def test_round_trip_through_peft_files_keeps_dora(tmp_path):
    model = adapted_model(ml.LoRAConfig(r=2, alpha=5, use_dora=True))
    interop.save_peft_adapter(model, tmp_path)
    fresh = ml.GPT(model.config, seed=0, dtype="float64")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    interop.load_peft_adapter(fresh, tmp_path)
    assert [n for n, _ in lora.lora_modules(fresh)] == [n for n, _ in lora.lora_modules(model)]
    assert fresh.lora_config.use_dora
    assert gc.rel_error(fresh.forward(tokens()), model.forward(tokens())) <= 1e-12


def test_a_dora_adapter_saves_and_loads_with_its_magnitudes(tmp_path):
    model = adapted_model(ml.LoRAConfig(r=2, alpha=5, use_dora=True))
    ml.save_lora(model, tmp_path)
    fresh = ml.GPT(model.config, seed=0, dtype="float64")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    ml.load_lora(fresh, tmp_path)
    assert all(isinstance(m, DoRALinear) for _, m in lora.lora_modules(fresh))
    np.testing.assert_array_equal(host(fresh.forward(tokens())), host(model.forward(tokens())))
    plain_fresh = ml.GPT(model.config, seed=0, dtype="float64")
    ml.apply_lora(plain_fresh, ml.LoRAConfig(r=2, alpha=5))
    with pytest.raises(ValueError, match="is DoRA; the model's LoRA layers are not"):
        ml.load_lora(plain_fresh, tmp_path)
