"""LoRA: the layer's gradients, exact start at the base model, merge/unmerge, freezing, adapter files, errors."""
import numpy as np
import pytest

import minilora as ml
from helpers import dev
from minilora import gradcheck as gc
from minilora import lora, train

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12)


def base_and_adapted(config=None, seed=1, **model_kwargs):
    """A randomized float64 base GPT and a copy of it with LoRA applied."""
    cfg = ml.GPTConfig(**{**CFG, **model_kwargs})
    base = ml.GPT(cfg, seed=0, dtype="float64")
    gc.randomize_parameters(base, seed)
    adapted = ml.GPT(cfg, seed=0, dtype="float64")
    adapted.load_state_dict({k: v.copy() for k, v in base.state_dict().items()})
    ml.apply_lora(adapted, config or ml.LoRAConfig(r=3, alpha=6))
    return base, adapted


def randomize_adapters(model, seed=2, scale=0.3):
    rng = np.random.default_rng(seed)
    for _, m in lora.lora_modules(model):
        m.lora_A.data[...] = dev(rng.standard_normal(m.lora_A.shape) * scale)
        m.lora_B.data[...] = dev(rng.standard_normal(m.lora_B.shape) * scale)


def tokens(seed=0, shape=(2, 8)):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], shape)


# ----------------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("shape, r, scale", [((2, 3, 5, 4), 2, 1.7), ((1, 1, 6, 6), 1, 0.5), ((3, 4, 7, 9), 5, 2.0)])
@pytest.mark.parametrize("frozen", [True, False])
def test_lora_layer_gradients_against_finite_differences(shape, r, scale, frozen):
    B_, T, n_in, n_out = shape
    rng = np.random.default_rng(0)
    inputs = dict(x=rng.standard_normal((B_, T, n_in)), W=rng.standard_normal((n_in, n_out)),
                  b=rng.standard_normal(n_out), A=rng.standard_normal((r, n_in)), B=rng.standard_normal((n_out, r)))
    names = ("x", "A", "B", "W", "b")

    def backward(d, c):
        grads = dict(zip(names, lora.lora_backward(d, c, weight_grad=not frozen, bias_grad=not frozen)))
        if frozen:
            assert grads.pop("W") is None and grads.pop("b") is None
        return grads

    if frozen:   # W and b are constants of the layer: check only x, A, B
        forward = lambda x, A, B: lora.lora_forward(x, inputs["W"], inputs["b"], A, B, scale)
        checked = {k: inputs[k] for k in ("x", "A", "B")}
    else:
        forward = lambda **kw: lora.lora_forward(kw["x"], kw["W"], kw["b"], kw["A"], kw["B"], scale)
        checked = inputs
    results = gc.check_layer("lora", forward, backward, checked)
    assert len(results) == len(checked)
    for res in results:
        assert res.passed, (res.param, res.rel_error)


def test_lora_layer_with_dropout_against_finite_differences():
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((2, 4, 6)), rng.standard_normal((6, 5))
    A, B = rng.standard_normal((3, 6)), rng.standard_normal((5, 3))
    forward = lambda x, A, B: lora.lora_forward(x, W, None, A, B, 1.3, 0.4, np.random.default_rng(7))
    backward = lambda d, c: dict(zip(("x", "A", "B"), lora.lora_backward(d, c)[:3]))
    for res in gc.check_layer("lora+dropout", forward, backward, dict(x=x, A=A, B=B)):
        assert res.passed, (res.param, res.rel_error)


@pytest.mark.parametrize("use_rslora, expected", [(False, 8 / 4), (True, 8 / 2)])
def test_scaling(use_rslora, expected):
    _, model = base_and_adapted(ml.LoRAConfig(r=4, alpha=8, use_rslora=use_rslora))
    assert all(m.scale == expected for _, m in lora.lora_modules(model))


def test_whole_model_with_lora_passes_the_directional_check():
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=3, targets="all-linear", dropout=0.2))
    randomize_adapters(model)
    idx = tokens()
    for seed in range(3):
        res = gc.directional_check(model, gc.gpt_loss_fn(idx, tokens(1), model.h[0].attn.q_proj.dropout_rng), seed=seed)
        assert res.passed, res.rel_error


# ----------------------------------------------------------------------------------------------------
# starting point, merge, disable


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_adapted_model_starts_exactly_at_the_base(init):
    base, model = base_and_adapted(ml.LoRAConfig(r=3, alpha=6, init=init))
    assert np.array_equal(model.forward(tokens()), base.forward(tokens()))
    A = [m.lora_A.data for _, m in lora.lora_modules(model)]
    assert all(np.abs(a).max() > 0 for a in A)                     # A is random, B is zero
    assert all(not m.lora_B.data.any() for _, m in lora.lora_modules(model))


def test_default_init_follows_loralib_bounds():
    _, model = base_and_adapted(ml.LoRAConfig(r=3, alpha=6))
    for _, m in lora.lora_modules(model):
        assert np.abs(m.lora_A.data).max() <= 1 / np.sqrt(m.weight.shape[0])


def test_pissa_starts_at_the_base_and_holds_the_top_singular_directions():
    base, model = base_and_adapted(ml.LoRAConfig(r=3, alpha=6, init="pissa"))
    assert gc.rel_error(model.forward(tokens()), base.forward(tokens())) <= 1e-12
    W0 = dict(base.named_parameters())["h.0.attn.q_proj.weight"].data
    m = model.h[0].attn.q_proj
    top = np.linalg.svd(W0, compute_uv=False)[:3]
    assert np.allclose(np.linalg.svd(m.delta_weight(), compute_uv=False)[:3], top)
    assert gc.rel_error(m.weight.data + m.delta_weight(), W0) <= 1e-14


def test_merged_equals_unmerged_and_unmerge_restores_w():
    base, model = base_and_adapted(ml.LoRAConfig(r=3, alpha=6, targets="all-linear"))
    randomize_adapters(model)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    unmerged = model.forward(tokens())
    ml.merge_lora(model)
    assert gc.rel_error(model.forward(tokens()), unmerged) <= 1e-12
    assert not np.array_equal(model.h[0].attn.q_proj.weight.data, before["h.0.attn.q_proj.weight"])
    ml.unmerge_lora(model)
    for n, p in model.named_parameters():
        assert np.array_equal(p.data, before[n]), n     # bit for bit


def test_merge_and_unmerge_misuse_are_clear_errors():
    base, model = base_and_adapted()
    with pytest.raises(ValueError, match="not merged"):
        ml.unmerge_lora(model)
    ml.merge_lora(model)
    with pytest.raises(ValueError, match="already merged"):
        ml.merge_lora(model)
    with pytest.raises(RuntimeError, match="merged"):
        model.backward(np.ones_like(model.forward(tokens())))
    with pytest.raises(ValueError, match="no LoRA"):
        ml.merge_lora(base)


def test_non_finite_merge_is_refused_and_changes_nothing():
    _, model = base_and_adapted()
    randomize_adapters(model)
    model.h[1].attn.v_proj.lora_B.data[0, 0] = np.inf
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        ml.merge_lora(model)
    assert not any(m.merged for _, m in lora.lora_modules(model))
    for n, p in model.named_parameters():
        assert np.array_equal(p.data, before[n]), n


def test_disable_gives_the_base_output_and_keeps_the_adapters():
    base, model = base_and_adapted()
    randomize_adapters(model)
    adapted = model.forward(tokens())
    with ml.disable_lora(model):
        assert np.array_equal(model.forward(tokens()), base.forward(tokens()))
    assert np.array_equal(model.forward(tokens()), adapted)


# ----------------------------------------------------------------------------------------------------
# freezing and training


@pytest.mark.parametrize("bias, trainable_biases", [
    ("none", set()),
    ("lora_only", {"h.0.attn.q_proj.bias", "h.0.attn.v_proj.bias", "h.1.attn.q_proj.bias", "h.1.attn.v_proj.bias"}),
])
def test_only_adapters_and_chosen_biases_train(bias, trainable_biases):
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4, bias=bias))
    names = {n for n, _ in model.named_parameters(trainable_only=True)}
    adapters = {f"h.{i}.attn.{p}.lora_{x}" for i in range(2) for p in ("q_proj", "v_proj") for x in "AB"}
    assert names == adapters | trainable_biases
    opt = ml.AdamW(model.parameters())
    assert {id(p) for p in opt.params} == {id(p) for n, p in model.named_parameters() if n in names}


def test_bias_all_trains_every_linear_bias_but_not_layernorm():
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4, bias="all"))
    names = {n for n, _ in model.named_parameters(trainable_only=True)}
    assert "h.0.mlp.fc.bias" in names and "h.1.attn.o_proj.bias" in names
    assert not any(".ln_" in n or n.startswith("ln_f") for n in names)


def test_frozen_weights_get_no_gradient_and_do_not_change_in_training():
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4))
    randomize_adapters(model)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.trainable}
    ids = (np.arange(400) * 3) % CFG["vocab_size"]          # a learnable pattern
    logits = model.forward(tokens())
    model.backward(ml.cross_entropy(logits, tokens(1))[1])
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    model.zero_grad()
    result = train.fit(model, ids, None, train.TrainConfig(steps=20, batch_size=4, warmup_steps=2, lr=1e-2,
                                                           min_lr=1e-3, eval_every=0, quiet=True))
    assert np.mean([l for _, l in result.train[-3:]]) < np.mean([l for _, l in result.train[:3]])
    for n, p in model.named_parameters():
        if n in frozen:
            assert np.array_equal(p.data, frozen[n]), n


@pytest.mark.parametrize("targets, expected", [
    (("q_proj", "v_proj"), {"q_proj", "v_proj"}),
    ("k_proj", {"k_proj"}),
    (("attn.o_proj", "fc"), {"o_proj", "fc"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "fc", "proj"}),
])
def test_targets_match_by_suffix(targets, expected):
    _, model = base_and_adapted(ml.LoRAConfig(r=1, alpha=1, targets=targets))
    found = {name.split(".")[-1] for name, _ in lora.lora_modules(model)}
    assert found == expected and len(lora.lora_modules(model)) == 2 * len(expected)


def test_parameter_report():
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4))
    report = ml.parameter_report(model)
    assert report["trainable"] == 2 * 2 * (2 * 12 + 12 * 2)
    assert report["total"] == model.num_parameters()
    assert report["percent"] == pytest.approx(100 * report["trainable"] / report["total"])
    assert "trainable%" in lora.format_report(model)


# ----------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be an int >= 1"),
    (dict(r=-2), "r must be an int >= 1"),
    (dict(r=2.5), "r must be an int"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(init="svd"), "init"),
    (dict(bias="some"), "bias"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ml.LoRAConfig(**kwargs)


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"exceeds min\(in, out\) = 12"):
        base_and_adapted(ml.LoRAConfig(r=13, alpha=1))


def test_unknown_targets_list_what_is_available():
    with pytest.raises(ValueError, match=r"no Linear module matches.*available: \['fc', 'k_proj', 'o_proj', 'proj', 'q_proj', 'v_proj'\]"):
        base_and_adapted(ml.LoRAConfig(targets=("c_attn",)))


def test_applying_twice_is_refused():
    _, model = base_and_adapted()
    with pytest.raises(ValueError, match="already has LoRA"):
        ml.apply_lora(model, ml.LoRAConfig())


# ----------------------------------------------------------------------------------------------------
# adapter files


def test_adapter_file_round_trip_is_small_and_exact(tmp_path):
    base, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4, bias="lora_only"))
    randomize_adapters(model)
    model.h[0].attn.q_proj.bias.data += 0.5
    ml.save_lora(model, tmp_path)
    size = (tmp_path / lora.ADAPTER_WEIGHTS).stat().st_size
    assert size < 0.2 * sum(p.data.nbytes for p in base.parameters())
    fresh = ml.GPT(base.config, seed=0, dtype="float64")
    fresh.load_state_dict({k: v.copy() for k, v in base.state_dict().items()})
    ml.load_lora(fresh, tmp_path)
    assert np.array_equal(fresh.forward(tokens()), model.forward(tokens()))


def test_adapter_of_the_wrong_rank_or_model_is_refused(tmp_path):
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4))
    ml.save_lora(model, tmp_path)
    _, rank3 = base_and_adapted(ml.LoRAConfig(r=3, alpha=4))
    before = {n: p.data.copy() for n, p in rank3.named_parameters()}
    with pytest.raises(ValueError, match=r"h.0.attn.q_proj.lora_A has shape \(2, 12\), the model needs \(3, 12\)"):
        ml.load_lora(rank3, tmp_path)
    assert all(np.array_equal(p.data, before[n]) for n, p in rank3.named_parameters())
    other = ml.GPT(ml.GPTConfig(**{**CFG, "n_embd": 16}), seed=0, dtype="float64")
    with pytest.raises(ValueError, match="trained on a model with config"):
        ml.load_lora(other, tmp_path)


def test_pissa_adapters_are_not_saved_alone(tmp_path):
    _, model = base_and_adapted(ml.LoRAConfig(r=2, alpha=4, init="pissa"))
    with pytest.raises(ValueError, match="PiSSA"):
        ml.save_lora(model, tmp_path)
