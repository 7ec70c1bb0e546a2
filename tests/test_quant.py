"""NF4 (4-bit NormalFloat) and QLoRA: the levels from the normal quantiles, blockwise quantisation and its
bounds, packing, double quantisation, storage, the NF4 and QLoRA pairs against finite differences and torch,
the quantised model and its errors."""
import tempfile

import numpy as np
import pytest

import minilora as ml
from helpers import dev, host
from minilora import gradcheck as gc
from minilora.core import quant
from minilora.core.lora import LoRAConfig, apply_lora, disable_lora, linear_modules, lora_modules, merge_lora
from minilora.core.methods import MethodSettings, apply_method, training_memory
from minilora.core.quant import (
    ABSMAX_BLOCK,
    LEVELS,
    NF4Config,
    NF4Linear,
    QLoRALinear,
    dequantize_base,
    dequantize_nf4,
    nf4_bytes,
    nf4_levels,
    nf4_linear_backward,
    nf4_linear_forward,
    normal_cdf,
    normal_quantile,
    qlora_backward,
    qlora_forward,
    quantize_base,
    quantize_nf4,
)

# the QLoRA paper's appendix / bitsandbytes' NF4 table (float32 numbers)
PUBLISHED = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])

CFG = dict(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=8)


def weight(shape, seed=0, scale=0.02, dtype="float32"):
    return dev((scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


# ----------------------------------------------------------------------------------------------------
# the levels


@pytest.mark.parametrize("p,x", [
    (0.5, 0.0), (0.975, 1.959963984540054), (0.025, -1.959963984540054), (0.9, 1.2815515655446004),
    (0.995, 2.5758293035489004), (0.999, 3.090232306167813), (0.8413447460685429, 1.0), (1e-10, -6.361340902404056),
])
def test_normal_quantile_at_known_values(p, x):
    assert normal_quantile(p) == pytest.approx(x, rel=1e-14, abs=1e-15)


def test_normal_quantile_inverts_the_cdf_and_matches_torch():
    ps = np.concatenate([np.linspace(1e-6, 1 - 1e-6, 401), [1e-300, 1e-20, 1e-12, 0.02425, 1 - 1e-12]])
    for p in ps:
        x = normal_quantile(float(p))
        assert normal_cdf(x) == pytest.approx(p, rel=1e-13), p
    torch = pytest.importorskip("torch")
    ours = np.array([normal_quantile(float(p)) for p in ps])
    theirs = torch.special.ndtri(torch.tensor(ps, dtype=torch.float64)).numpy()
    assert np.max(np.abs(ours - theirs) / np.maximum(1.0, np.abs(theirs))) <= 1e-14
    for bad in (0.0, 1.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="probability strictly between 0 and 1"):
            normal_quantile(bad)


def test_nf4_levels_derived_from_quantiles_equal_the_published_table():
    levels = nf4_levels()
    assert levels.shape == (16,) and np.all(np.diff(levels) > 0)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and levels[7] == 0.0     # exact ends and an exact zero
    assert np.sum(levels > 0) == 8 and np.sum(levels < 0) == 7
    # float32 precision: within 2 units in the last place of a float32 number in [0.5, 1) (2^-24 each);
    # bitsandbytes spaced the probabilities in float32, which is where its table's last bits come from
    assert np.max(np.abs(levels - PUBLISHED)) <= 2 * 2.0 ** -24
    assert np.array_equal(LEVELS, levels)
    # the offset is 1 - delta, delta = 1/2 (1/32 + 1/30), to the 7 digits bitsandbytes writes
    assert abs(quant.NF4_OFFSET - (1 - 0.5 * (1 / 32 + 1 / 30))) < 5e-8
    assert np.max(np.abs(nf4_levels(1 - quant.NF4_DELTA) - PUBLISHED)) < 3e-7


# ----------------------------------------------------------------------------------------------------
# quantisation


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,block", [((128, 512), 64), ((12, 7), 16), ((5, 3), 4), ((33,), 64)])
def test_dequantisation_error_is_within_half_the_largest_gap_times_the_absmax(shape, block, double_quant):
    W = weight(shape, seed=1)
    q = quantize_nf4(W, block, double_quant)
    D = dequantize_nf4(q)
    assert D.shape == W.shape and D.dtype == W.dtype
    n = W.size
    padded = np.zeros(-(-n // block) * block)
    padded[:n] = host(W).reshape(-1)
    absmax = np.abs(padded.reshape(-1, block)).max(axis=1)
    err = np.zeros_like(padded)
    err[:n] = np.abs(host(D) - host(W)).reshape(-1)
    half_gap = np.max(np.diff(LEVELS)) / 2
    # double quantisation moves each absmax by at most half an 8-bit step of its group (the bound below)
    slack = np.abs(quant._dequantize_absmax(q) - absmax) if double_quant else 0.0
    bound = (half_gap * absmax + slack) * (1 + 1e-6)
    assert np.all(err.reshape(-1, block).max(axis=1) <= bound)
    # and each code is the nearest level of w / absmax (brute force over the 16 levels)
    if not double_quant:
        stored = host(q.absmax).astype(np.float64)
        normalised = padded.reshape(-1, block) / np.where(stored == 0, 1, stored)[:, None]
        nearest = np.abs(normalised[..., None] - LEVELS).argmin(axis=-1).reshape(-1)
        assert np.array_equal(host(quant.unpack_codes(q.codes)), nearest)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantising_the_dequantised_weight_gives_the_same_codes(double_quant):
    q = quantize_nf4(weight((64, 96), seed=2), 64, double_quant)
    again = quantize_nf4(dequantize_nf4(q), 64, double_quant)
    assert np.array_equal(host(again.codes), host(q.codes))                  # the 4-bit codes, exactly
    if not double_quant:     # and the absmax; double quantised, their mean moves, so their 8-bit codes may too
        assert np.array_equal(host(again.absmax), host(q.absmax))
        assert np.array_equal(host(dequantize_nf4(again)), host(dequantize_nf4(q)))


def test_packing_puts_two_codes_in_a_byte_high_nibble_first():
    codes = dev(np.array([0, 15, 3, 12, 7, 7, 1, 0], dtype=np.uint8))
    packed = quant.pack_codes(codes)
    assert host(packed).tolist() == [0x0F, 0x3C, 0x77, 0x10] and packed.dtype == np.uint8
    assert np.array_equal(host(quant.unpack_codes(packed)), host(codes))
    every = dev(np.random.default_rng(0).integers(0, 16, size=1000).astype(np.uint8))
    assert np.array_equal(host(quant.unpack_codes(quant.pack_codes(every))), host(every))


def test_sizes_that_are_not_a_multiple_of_the_block_are_padded_and_trimmed():
    W = weight((7, 5), seed=3)                     # 35 numbers: 3 blocks of 16, the last padded with 13 zeros
    q = quantize_nf4(W, 16)
    assert q.codes.shape == (24,) and q.absmax.shape == (3,) and q.size == 35
    assert host(quant.unpack_codes(q.codes))[35:].tolist() == [7] * 13          # padding is level 0.0 exactly
    assert dequantize_nf4(q).shape == (7, 5)
    zeros = quantize_nf4(dev(np.zeros((4, 4))), 8)                               # absmax 0: no division by zero
    assert np.array_equal(host(dequantize_nf4(zeros)), np.zeros((4, 4)))


def test_double_quantisation_keeps_each_absmax_within_half_an_8_bit_step():
    W = weight((256, 300), seed=4)       # 1200 blocks of 64: 5 groups of 256 absmax values, the last one part full
    plain, double = quantize_nf4(W, 64), quantize_nf4(W, 64, double_quant=True)
    absmax = host(plain.absmax).astype(np.float64)
    assert double.absmax is None and double.absmax_codes.dtype == np.int8 and double.absmax_scale.dtype == np.float32
    assert double.absmax_codes.shape == (1200,) and double.absmax_scale.shape == (5,)
    mean = absmax.mean()
    assert double.absmax_mean == pytest.approx(mean, rel=1e-6)
    centred = np.zeros(5 * ABSMAX_BLOCK)
    centred[:1200] = absmax - double.absmax_mean
    step = np.abs(centred.reshape(5, ABSMAX_BLOCK)).max(axis=1) / 127            # one 8-bit step per group
    err = np.abs(host(quant._dequantize_absmax(double)).astype(np.float64) - absmax)
    assert np.all(err <= np.repeat(step, ABSMAX_BLOCK)[:1200] / 2 * (1 + 1e-5) + 1e-9)
    assert np.max(np.abs(host(double.absmax_codes))) == 127        # each group's extreme uses the full range


def test_bytes_per_parameter():
    W = weight((128, 512), seed=5)
    plain, double = quantize_nf4(W, 64), quantize_nf4(W, 64, double_quant=True)
    assert plain.bits_per_parameter == 4.5                                     # 4 + 32 / 64
    assert double.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)   # ~4.127
    assert plain.nbytes == nf4_bytes(W.shape, 64) and double.nbytes == nf4_bytes(W.shape, 64, True)
    # the 4-bit frozen weights take at most 0.3x the bytes of float32 ones (from the byte counts)
    assert plain.nbytes <= 0.3 * W.nbytes and double.nbytes <= 0.3 * W.nbytes
    assert double.nbytes < plain.nbytes


def test_quantisation_errors_are_named():
    with pytest.raises(ValueError, match=r"block_size must be an even int >= 2 \(two 4-bit codes .*\); got 63"):
        quantize_nf4(weight((4, 4)), 63)
    for bad in (0, 1, True, 2.0):
        with pytest.raises(ValueError, match="block_size"):
            quantize_nf4(weight((4, 4)), bad)
    with pytest.raises(TypeError, match="float array; got ndarray of dtype int64"):
        quantize_nf4(dev(np.arange(8)), 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(dev(np.array([1.0, np.nan])), 2)
    with pytest.raises(TypeError, match="NF4Weight"):
        dequantize_nf4(weight((4, 4)))
    with pytest.raises(ValueError, match="block_size"):
        NF4Config(block_size=5)


# ----------------------------------------------------------------------------------------------------
# the pairs


def test_the_nf4_and_qlora_pairs_pass_their_gradient_checks():
    results = [r for pair in ("nf4 linear", "qlora") for case in gc.cases_of(pair) for r in gc.run_case(case)]
    assert {r.param for r in results} == {"x", "b", "A", "B"}
    failed = [f"{r.layer} {r.param}: {r.rel_error:.2e}" for r in results if not r.passed]
    assert not failed, failed


def test_the_nf4_cache_holds_no_activation_and_no_float_weight():
    x = dev(np.random.default_rng(0).standard_normal((2, 3, 8)))
    q = quantize_nf4(weight((8, 5), dtype="float64"), 16)
    y, cache = nf4_linear_forward(x, q, dev(np.zeros(5)))
    assert cache[0] is q and not any(gc.backend.is_array(c) for c in cache)
    dx, db = nf4_linear_backward(dev(np.ones(y.shape)), cache)
    assert db is None and dx.shape == x.shape


def test_the_pairs_match_torch_autograd():
    torch = pytest.importorskip("torch")
    from torch_helpers import assert_close, torch_reference

    rng = np.random.default_rng(6)
    x, b, A, B = (rng.standard_normal(s) for s in ((2, 5, 12), (13,), (3, 12), (13, 3)))
    q = quantize_nf4(dev(rng.standard_normal((12, 13))), 16, double_quant=True)
    W = torch.from_numpy(host(dequantize_nf4(q)))                      # the frozen W: a constant
    dout = rng.standard_normal((2, 5, 13))

    y, cache = nf4_linear_forward(dev(x), q, dev(b))
    dx, db = nf4_linear_backward(dev(dout), cache, bias_grad=True)
    ref_y, (rdx, rdb) = torch_reference(lambda x, b: x @ W + b, [x, b], dout)
    for what, ours, theirs in (("y", y, ref_y), ("dx", dx, rdx), ("db", db, rdb)):
        assert_close(ours, theirs, f"nf4 linear {what}")

    y, cache = qlora_forward(dev(x), q, dev(b), dev(A), dev(B), 1.5)
    grads = qlora_backward(dev(dout), cache, bias_grad=True)
    ref_y, ref_grads = torch_reference(lambda x, b, A, B: x @ W + b + 1.5 * ((x @ A.T) @ B.T), [x, b, A, B], dout)
    assert_close(y, ref_y, "qlora y")
    dx, dA, dB, db = grads
    for what, ours, theirs in zip(("dx", "db", "dA", "dB"), (dx, db, dA, dB), ref_grads):
        assert_close(ours, theirs, f"qlora {what}")


# ----------------------------------------------------------------------------------------------------
# the quantised model


def small(dtype="float64", seed=0):
    model = ml.GPT(ml.GPTConfig(**CFG), seed=seed, dtype=dtype)
    gc.randomize_parameters(model, seed=seed + 1, scale=0.1)
    return model


def test_quantize_base_replaces_every_linear_and_keeps_the_counts_honest():
    base = small()
    model = quantize_base(small(), block_size=16)
    layers = [(name, m) for name, _, _, m in linear_modules(model)]
    assert len(layers) == 6 * CFG["n_layer"] and all(isinstance(m, NF4Linear) for _, m in layers)
    assert model.num_parameters() == base.num_parameters()                     # the codes count as their numbers
    packed = sum(m.weight.nbytes for _, m in layers)
    assert packed == sum(nf4_bytes(m.weight.shape, 16, True) for _, m in layers)
    idx = np.random.default_rng(0).integers(0, 13, size=(2, 8))
    float_memory = training_memory(apply_method(small(dtype="float32"), "lora"), idx, idx)["parameters"]
    nf4_memory = training_memory(apply_method(small(dtype="float32"), "qlora"), idx, idx)["parameters"]
    linear_bytes = sum(m.weight.data.nbytes for _, _, _, m in linear_modules(small(dtype="float32")))
    quantised = apply_method(small(dtype="float32"), "qlora")
    stored = sum(m.weight.nbytes for _, _, _, m in linear_modules(quantised))
    assert nf4_memory == float_memory - linear_bytes + stored
    # the quantised model computes with the dequantised weights: close to the float model, not equal
    diff = np.abs(host(model.forward(idx)) - host(base.forward(idx))).max()
    assert 0 < diff < 0.5


def test_qlora_model_matches_a_torch_model_with_the_dequantised_weights():
    torch = pytest.importorskip("torch")
    model = apply_lora(quantize_base(small(), 16), LoRAConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj", "fc")))
    for _, m in lora_modules(model):
        m.lora_B.data[...] = dev(np.random.default_rng(3).standard_normal(m.lora_B.shape) * 0.3)
    idx = np.random.default_rng(1).integers(0, 13, size=(2, 7))
    logits = model.forward(idx)
    loss, dlogits = ml.cross_entropy(logits, idx)
    model.backward(dlogits)
    # the same model as float64 Linear layers holding the dequantised W, each adapter on top: torch autograd
    from test_methods_torch import t_attention, t_gelu, t_layernorm

    P = {n: torch.tensor(host(p.data), requires_grad=p.trainable) for n, p in model.named_parameters()}
    Wq = {f"{n}.weight": torch.from_numpy(host(dequantize_nf4(m.weight))) for n, _, _, m in linear_modules(model)}

    def linear(x, name):
        y = x @ Wq[f"{name}.weight"] + P[f"{name}.bias"]
        if f"{name}.lora_A" in P:
            y = y + 2.0 * ((x @ P[f"{name}.lora_A"].T) @ P[f"{name}.lora_B"].T)
        return y

    x = P["wte.weight"][torch.from_numpy(idx)] + P["wpe.weight"][:7]
    for l in range(CFG["n_layer"]):
        b = f"h.{l}"
        h = t_layernorm(x, P[f"{b}.ln_1.weight"], P[f"{b}.ln_1.bias"], 1e-5)
        q, k, v = (linear(h, f"{b}.attn.{n}") for n in ("q_proj", "k_proj", "v_proj"))
        x = x + linear(t_attention(q, k, v, CFG["n_head"]), f"{b}.attn.o_proj")
        h = t_layernorm(x, P[f"{b}.ln_2.weight"], P[f"{b}.ln_2.bias"], 1e-5)
        x = x + linear(t_gelu(linear(h, f"{b}.mlp.fc")), f"{b}.mlp.proj")
    ref = t_layernorm(x, P["ln_f.weight"], P["ln_f.bias"], 1e-5) @ P["wte.weight"].T
    torch.nn.functional.cross_entropy(ref.reshape(-1, 13), torch.from_numpy(idx).reshape(-1)).backward()
    assert gc.rel_error(logits, ref.detach().numpy()) <= 1e-9
    trained = [(n, p) for n, p in model.named_parameters() if p.trainable]
    assert len(trained) == 6 * CFG["n_layer"] and all(".lora_" in n for n, _ in trained)
    for n, p in trained:
        assert gc.rel_error(p.grad, P[n].grad.numpy()) <= 1e-9, n


def test_qlora_starts_at_the_quantised_base_and_disable_gives_it_back():
    idx = np.random.default_rng(2).integers(0, 13, size=(2, 6))
    base = quantize_base(small(), 16)
    expected = base.forward(idx)
    model = apply_method(small(), "qlora", MethodSettings(nf4=NF4Config(16)))
    assert all(isinstance(m, QLoRALinear) for _, m in lora_modules(model))
    assert np.array_equal(host(model.forward(idx)), host(expected))            # B = 0: exactly the 4-bit base
    for _, m in lora_modules(model):
        m.lora_B.data[...] = m.lora_B.data + 0.5
    assert not np.allclose(host(model.forward(idx)), host(expected))
    with disable_lora(model):
        assert np.array_equal(host(model.forward(idx)), host(expected))


def test_merging_is_refused_and_dequantize_base_gives_a_mergeable_model():
    idx = np.random.default_rng(3).integers(0, 13, size=(2, 6))
    model = apply_method(small(), "qlora")
    for _, m in lora_modules(model):
        m.lora_B.data[...] = m.lora_B.data + 0.5
    before = model.forward(idx)
    with pytest.raises(ValueError, match="cannot merge: h.0.attn.q_proj is LoRA on a 4-bit NF4 weight"):
        merge_lora(model)
    assert not any(m.merged for _, m in lora_modules(model))
    dequantize_base(model)
    assert not any(getattr(m, "quantized", False) for _, _, _, m in linear_modules(model))
    assert gc.rel_error(model.forward(idx), before) <= 1e-12
    merge_lora(model)
    assert gc.rel_error(model.forward(idx), before) <= 1e-12


def test_a_qlora_adapter_saves_and_loads_onto_a_base_quantised_the_same_way():
    from minilora.io.adapter_files import save_lora, load_lora

    idx = np.random.default_rng(4).integers(0, 13, size=(2, 6))
    model = apply_method(small(), "qlora")
    for _, m in lora_modules(model):
        m.lora_B.data[...] = m.lora_B.data + 0.5
    with tempfile.TemporaryDirectory() as d:
        save_lora(model, d)
        loaded = load_lora(quantize_base(small()), d)
        assert np.array_equal(host(loaded.forward(idx)), host(model.forward(idx)))
        # the fingerprint is of the dequantised W the adapter trained on: the float base or another block size differ
        for other in (small(), quantize_base(small(), block_size=32)):
            with pytest.raises(ValueError, match="trained on other base weights"):
                load_lora(other, d)


def test_quantised_model_errors_are_named_and_change_nothing():
    with pytest.raises(ValueError, match="already quantised"):
        quantize_base(quantize_base(small()))
    lora_model = apply_lora(small(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="h.0.attn.q_proj is a LoRALinear: quantise the base first"):
        quantize_base(lora_model)
    assert not any(isinstance(m, NF4Linear) for _, _, _, m in linear_modules(lora_model))
    for bad in (0, 7, True, "64"):
        with pytest.raises(ValueError, match="block_size must be an even int"):
            quantize_base(small(), block_size=bad)
    with pytest.raises(ValueError, match="double_quant must be True or False"):
        quantize_base(small(), double_quant=1)
    model = quantize_base(small())
    with pytest.raises(ValueError, match="4-bit NF4 layer: init 'pissa'"):
        apply_lora(model, LoRAConfig(r=2, init="pissa"))
    assert not lora_modules(model) and not any(p.trainable is False for p in model.parameters())
