"""Ring 1 of the verification: every hand-written backward against centred differences in float64.

Each functional layer is checked on several (B, T, C) shapes (T = 1, one head, C not a power of two),
each case its own test id; the whole GPT by a directional derivative. The checker itself is checked too:
it must leave its inputs alone and it must catch a deliberately wrong backward.
"""
import math

import numpy as np
import pytest

import minilora as ml
from minilora import cli
from minilora import functional as F
from minilora import gradcheck as gc
from minilora.nn import Linear
from helpers import host, numpy_only

THRESHOLD = 1e-7      # DESIGN.md: CS231n's threshold for a correct backward in float64
CAUGHT = 1e-3         # a wrong backward must be at least this far off

SHAPES = [(2, 3, 8), (1, 1, 6), (2, 5, 12), (3, 4, 10), (1, 7, 6)]   # (B, T, C): T = 1, C = 6, 10, 12


def shape_id(shape):
    return "B{}-T{}-C{}".format(*shape)


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


# ----------------------------------------------------------------------------------------------------
# Each case: (rng, B, T, C) -> (forward(**inputs) -> (out, cache), backward(dout, cache) -> {name: grad}, inputs).
# Only float64 arrays among the inputs are checked; anything else (indices, None) is passed through.


def linear_case(rng, B, T, C):
    return (F.linear_forward,
            lambda d, c: dict(zip(("x", "W", "b"), F.linear_backward(d, c))),
            dict(x=randn(rng, B, T, C), W=randn(rng, C, C + 3), b=randn(rng, C + 3)))


def linear_no_bias_case(rng, B, T, C):
    return (F.linear_forward,
            lambda d, c: dict(zip(("x", "W", "b"), F.linear_backward(d, c))),
            dict(x=randn(rng, B, T, C), W=randn(rng, C, 2 * C - 1), b=None))


def embedding_case(rng, B, T, C):
    V = 3   # fewer rows than tokens, so ids repeat and the scatter-add must accumulate
    return (lambda W, idx: F.embedding_forward(idx, W),
            lambda d, c: {"W": F.embedding_backward(d, c)},
            dict(W=randn(rng, V, C), idx=rng.integers(0, V, size=(B, T))))


def layernorm_case(rng, B, T, C):
    return (F.layernorm_forward,
            lambda d, c: dict(zip(("x", "w", "b"), F.layernorm_backward(d, c))),
            dict(x=randn(rng, B, T, C, scale=2.0) + 1.5, w=randn(rng, C), b=randn(rng, C)))


def gelu_case(rng, B, T, C):
    return (F.gelu_forward,
            lambda d, c: {"x": F.gelu_backward(d, c)},
            dict(x=randn(rng, B, T, C, scale=2.0)))


def dropout_case(rng, B, T, C):
    return (lambda x: F.dropout_forward(x, 0.4, np.random.default_rng(5)),   # same mask every call
            lambda d, c: {"x": F.dropout_backward(d, c)},
            dict(x=randn(rng, B, T, C)))


def attention_case(n_head, dropout_p=0.0):
    """n_head: a number, or a function of C."""
    def case(rng, B, T, C):
        H = n_head(C) if callable(n_head) else n_head
        return (lambda q, k, v: F.attention_forward(q, k, v, H, dropout_p,
                                                    np.random.default_rng(5) if dropout_p else None),
                lambda d, c: dict(zip(("q", "k", "v"), F.attention_backward(d, c))),
                dict(q=randn(rng, B, T, C), k=randn(rng, B, T, C), v=randn(rng, B, T, C)))
    return case


def cross_entropy_case(ignore_index):
    def case(rng, B, T, C):
        targets = rng.integers(0, C, size=(B, T))
        if ignore_index is not None and targets.size > 1:
            targets[0, 0] = ignore_index
        return (lambda logits: ce_as_layer(logits, targets, ignore_index),
                lambda d, c: {"logits": c * float(d)},
                dict(logits=randn(rng, B, T, C, scale=3.0)))
    return case


def ce_as_layer(logits, targets, ignore_index):
    """Cross-entropy as a layer with scalar output; its cache is dlogits (the gradient of the loss itself)."""
    loss, dlogits = F.softmax_cross_entropy(logits, targets, ignore_index)
    return np.asarray(loss), dlogits


LAYERS = {
    "linear": linear_case,
    "linear-no-bias": linear_no_bias_case,
    "embedding": embedding_case,
    "layernorm": layernorm_case,
    "gelu": gelu_case,
    "dropout": dropout_case,
    "attention-1-head": attention_case(1),
    "attention-2-heads": attention_case(2),
    "attention-head-size-2": attention_case(lambda C: C // 2),
    "attention-2-heads-dropout": attention_case(2, dropout_p=0.3),
    "cross-entropy": cross_entropy_case(None),
    "cross-entropy-ignore-index": cross_entropy_case(-100),
}


def run_case(layer, shape, seed=0):
    B, T, C = shape
    rng = np.random.default_rng(seed)
    forward, backward, inputs = LAYERS[layer](rng, B, T, C)
    return gc.check_layer(layer, forward, backward, inputs, seed=seed)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_backward_matches_finite_differences(layer, shape):
    results = run_case(layer, shape)
    expected = {"linear-no-bias": 2, "embedding": 1, "layernorm": 3, "gelu": 1, "dropout": 1,
                "cross-entropy": 1, "cross-entropy-ignore-index": 1}.get(layer, 3)
    assert len(results) == expected, [r.param for r in results]    # every float input was checked
    for r in results:
        assert r.rel_error <= THRESHOLD, f"{layer} {shape} d{r.param}: rel error {r.rel_error:.2e}"
        assert r.passed


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_pairs_are_pure_functions(layer):
    """Neither half writes into its arguments, and a cache can be used twice (in-place speed-ups stay inside)."""
    B, T, C = 2, 4, 6
    rng = np.random.default_rng(3)
    forward, backward, inputs = LAYERS[layer](rng, B, T, C)
    saved = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    out, cache = forward(**inputs)
    dout = rng.standard_normal(np.shape(out))
    dout_saved = dout.copy()
    first = backward(dout, cache)
    second = backward(dout, cache)
    for k, v in saved.items():
        np.testing.assert_array_equal(inputs[k], v, err_msg=f"forward or backward changed input {k}")
    np.testing.assert_array_equal(dout, dout_saved, err_msg="backward changed dout")
    for k, g in first.items():
        if g is not None:
            np.testing.assert_array_equal(second[k], g, err_msg=f"a second backward gave another d{k}")


def test_library_layer_checks_cover_every_layer_and_pass():
    results = gc.layer_checks()
    names = {r.layer.split(" ")[0] for r in results}
    assert {"linear", "embedding", "layernorm", "gelu", "attention", "attention+dropout", "dropout",
            "cross-entropy"} <= names
    assert any("T=1" in r.layer for r in results)
    failed = [(r.layer, r.param, r.rel_error) for r in results if not r.passed]
    assert not failed
    assert max(r.rel_error for r in results) <= THRESHOLD


def test_frozen_flags_skip_gradients_but_keep_the_rest():
    rng = np.random.default_rng(1)
    x, W, b = randn(rng, 2, 3, 5), randn(rng, 5, 4), randn(rng, 4)
    dy = randn(rng, 2, 3, 4)
    _, cache = F.linear_forward(x, W, b)
    dx, dW, db = F.linear_backward(dy, cache)
    dx2, dW2, db2 = F.linear_backward(dy, cache, weight_grad=False)
    assert dW2 is None
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(db2, db)
    assert F.linear_backward(dy, cache, bias_grad=False)[2] is None


@numpy_only
def test_frozen_weight_in_linear_module_gets_no_grad():
    lin = Linear(5, 4, rng=np.random.default_rng(0), dtype="float64")
    lin.bias.data[...] = 0.3
    lin.weight.trainable = False
    x = np.random.default_rng(1).standard_normal((2, 3, 5))
    dy = np.random.default_rng(2).standard_normal((2, 3, 4))
    lin.forward(x)
    dx = lin.backward(dy)
    assert lin.weight.grad is None
    np.testing.assert_allclose(lin.bias.grad, dy.sum(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(dx, dy @ lin.weight.data.T, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# The checker itself


def test_numerical_gradient_is_correct_and_leaves_its_input_alone():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 3))
    x = base.T                      # a non-contiguous view: writes through it would change base
    before = base.copy()
    seen = []

    def f(v):
        seen.append(np.shares_memory(v, base))
        return v ** 3

    dout = rng.standard_normal(x.shape)
    grad = gc.numerical_gradient(f, x, dout)
    np.testing.assert_array_equal(base, before)
    assert seen and not any(seen)   # f never saw the caller's array, only a copy
    assert gc.rel_error(grad, 3 * x ** 2 * dout) < 1e-8
    # scalar objective (dout=None)
    assert gc.rel_error(gc.numerical_gradient(lambda v: (v ** 2).sum(), x), 2 * x) < 1e-8
    np.testing.assert_array_equal(base, before)


def test_rel_error_scale():
    a = np.array([1.0, -2.0, 0.0])
    assert gc.rel_error(a, a) == 0.0
    assert gc.rel_error(a, a * (1 + 1e-3)) == pytest.approx(1e-3 / (2 + 1e-3), rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        gc.rel_error(a, a[:2])


def with_input_cache(forward):
    """The library's forward, but caching just its inputs: the buggy backwards below rely on no internals."""
    return lambda **inputs: (forward(**inputs)[0], inputs)


def layernorm_backward_without_variance_term(dout, inputs):
    """A classic bug: forgets that the variance depends on x."""
    x, w = inputs["x"], inputs["w"]
    C = x.shape[-1]
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt((xc ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    dxhat = dout * w
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)) * rstd
    return {"x": dx, "w": (dout * xc * rstd).reshape(-1, C).sum(0), "b": dout.reshape(-1, C).sum(0)}


def attention_backward_without_scale(dout, cache, n_head, C):
    """Another: dq misses the 1/sqrt(head size) of the forward."""
    dq, dk, dv = F.attention_backward(dout, cache)
    return {"q": dq * math.sqrt(C // n_head), "k": dk, "v": dv}


def gelu_backward_without_tanh_derivative(dout, inputs):
    """d/dx 0.5 x (1 + tanh u) with the tanh term treated as a constant."""
    x = inputs["x"]
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    return {"x": dout * 0.5 * (1 + np.tanh(u))}


def test_checker_catches_a_layernorm_backward_missing_a_term():
    rng = np.random.default_rng(0)
    inputs = dict(x=randn(rng, 2, 3, 6, scale=2.0) + 1.0, w=randn(rng, 6), b=randn(rng, 6))
    results = {r.param: r for r in gc.check_layer("ln", with_input_cache(F.layernorm_forward),
                                                  layernorm_backward_without_variance_term, inputs)}
    assert results["x"].rel_error > CAUGHT and not results["x"].passed
    assert results["w"].passed and results["b"].passed     # the parts that are right still pass


@pytest.mark.parametrize("n_head", [1, 2])
def test_checker_catches_an_attention_backward_with_the_wrong_scale(n_head):
    rng = np.random.default_rng(0)
    B, T, C = 2, 4, 8
    inputs = dict(q=randn(rng, B, T, C), k=randn(rng, B, T, C), v=randn(rng, B, T, C))
    results = {r.param: r for r in gc.check_layer(
        "attn", lambda q, k, v: F.attention_forward(q, k, v, n_head),
        lambda d, c: attention_backward_without_scale(d, c, n_head, C), inputs)}
    assert results["q"].rel_error > CAUGHT and not results["q"].passed
    assert results["k"].passed and results["v"].passed


def test_checker_catches_a_gelu_backward_missing_a_term():
    rng = np.random.default_rng(0)
    [r] = gc.check_layer("gelu", with_input_cache(F.gelu_forward), gelu_backward_without_tanh_derivative,
                         dict(x=randn(rng, 2, 3, 6, scale=2.0)))
    assert r.rel_error > CAUGHT and not r.passed


def test_checker_threshold_is_tight():
    """A gradient off by only one part in 10^4 already fails (threshold 1e-7)."""
    rng = np.random.default_rng(0)
    [r] = gc.check_layer("gelu", F.gelu_forward,
                         lambda d, c: {"x": F.gelu_backward(d, c) * (1 + 1e-4)},
                         dict(x=randn(rng, 2, 3, 6)))
    assert 1e-6 < r.rel_error < 1e-3 and not r.passed


# ----------------------------------------------------------------------------------------------------
# The whole GPT


def tiny_gpt(seed=0, **overrides):
    cfg = dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=10)
    cfg.update(overrides)
    model = ml.GPT(ml.GPTConfig(**cfg), seed=seed, dtype="float64")
    gc.randomize_parameters(model, seed)   # non-trivial biases and LayerNorm weights
    return model


def batch(model, B=2, T=None, seed=0):
    cfg = model.config
    rng = np.random.default_rng(seed + 100)
    T = cfg.block_size if T is None else T
    return (rng.integers(0, cfg.vocab_size, size=(B, T)), rng.integers(0, cfg.vocab_size, size=(B, T)))


def test_library_model_checks_pass():
    results = gc.model_checks()
    assert len(results) >= 3
    assert all(r.passed for r in results), [(r.layer, r.param, r.rel_error) for r in results]


MODEL_VARIANTS = {
    "2-layers-2-heads": dict(),
    "1-head": dict(n_layer=1, n_head=1, n_embd=6),
    "C=15-3-heads": dict(n_head=3, n_embd=15),
    "dropout": dict(dropout=0.2),
    "T=1": dict(block_size=1),
}


@pytest.mark.parametrize("direction_seed", [0, 1])
@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_gpt_directional_derivative(variant, direction_seed):
    model = tiny_gpt(**MODEL_VARIANTS[variant])
    idx, targets = batch(model)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    loss_fn = gc.gpt_loss_fn(idx, targets, model.dropout_rng if model.config.dropout else None)
    r = gc.directional_check(model, loss_fn, seed=direction_seed)
    assert r.rel_error <= THRESHOLD, r.rel_error
    for name, value in model.state_dict().items():   # parameters restored exactly
        np.testing.assert_array_equal(host(value), host(before[name]), err_msg=name)


def test_gpt_directional_derivative_with_frozen_parameters():
    model = tiny_gpt()
    frozen = [p for name, p in model.named_parameters() if name.startswith(("wte", "h.0", "ln_f"))]
    for p in frozen:
        p.trainable = False
    idx, targets = batch(model)
    r = gc.directional_check(model, gc.gpt_loss_fn(idx, targets))
    assert r.rel_error <= THRESHOLD
    gc.gpt_loss_fn(idx, targets)(model)
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters(trainable_only=True))


def test_directional_check_catches_a_wrong_backward_inside_the_model(monkeypatch):
    model = tiny_gpt()
    idx, targets = batch(model)
    real_forward = F.gelu_forward
    monkeypatch.setattr(F, "gelu_forward", lambda x: (real_forward(x)[0], {"x": x}))
    monkeypatch.setattr(F, "gelu_backward", lambda d, c: gelu_backward_without_tanh_derivative(d, c)["x"])
    with ml.use_fast(False):              # the model then calls the (patched) reference pairs
        r = gc.directional_check(model, gc.gpt_loss_fn(idx, targets))
    assert r.rel_error > CAUGHT and not r.passed


@numpy_only
def test_tied_embedding_gradient_is_the_sum_of_both_uses():
    """wte is both the input table and the output head: its gradient must add the two contributions."""
    model = tiny_gpt(vocab_size=7, n_embd=6, n_head=2, block_size=5)
    idx, targets = batch(model, T=4)
    wte = model.wte.weight
    V, C = wte.shape

    logits = model.forward(idx)
    head_input = model._cache[0]                        # ln_f output, (B, T, C): logits = head_input @ wte^T
    _, dlogits = ml.cross_entropy(logits, targets)
    model.backward(dlogits)
    analytic = wte.grad.copy()
    head_use = dlogits.reshape(-1, V).T @ head_input.reshape(-1, C)    # (V, C), by hand
    input_use = analytic - head_use

    original = wte.data.copy()

    def loss_of(table):
        wte.data[...] = table
        return np.asarray(ml.cross_entropy(model.forward(idx), targets)[0])

    numeric = gc.numerical_gradient(loss_of, original)
    wte.data[...] = original

    assert gc.rel_error(analytic, numeric) <= THRESHOLD
    # both uses matter: either alone is far from the true gradient
    assert gc.rel_error(head_use, numeric) > CAUGHT
    assert gc.rel_error(input_use, numeric) > CAUGHT
    # and the input use is exactly the embedding lookup's scatter-add: rows of unused tokens get only the head part
    unused = sorted(set(range(V)) - set(idx.ravel().tolist()))
    if unused:
        np.testing.assert_allclose(analytic[unused], head_use[unused], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------------
# The command line


def test_cli_gradcheck_passes_and_prints_a_table(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "rel. error" in out and "pass" in out
    assert "FAIL" not in out
    rows = [line for line in out.splitlines() if line.rstrip().endswith("pass")]
    assert len(rows) >= 20
    assert any(line.startswith("GPT") for line in rows)
