"""Ring 1 of the verification: every hand-written backward against centred differences in float64.

The cases are the registry of minilora.gradcheck (``gc.CASES``: every pair on several (B, T, C) shapes with
T = 1, one head, C not a power of two, dropout, prefix keys, LoRA with and without bias and with W frozen or
trained...), each case its own test id; whole GPTs (``gc.MODEL_CASES``) by a directional derivative. The same
registry drives ``minilora gradcheck`` and the course grader. The checker itself is checked too: it must
leave its inputs alone and it must catch a deliberately wrong backward.
"""
import math

import numpy as np
import pytest

import minilora as ml
from minilora import cli
from minilora import functional as F
from minilora import gradcheck as gc
from minilora.nn import Linear
from helpers import dev, host, numpy_only

THRESHOLD = 1e-7      # CS231n's threshold for a correct backward in float64
CAUGHT = 1e-3         # a wrong backward must be at least this far off


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def case_id(case):
    return case.name


# ----------------------------------------------------------------------------------------------------
# every case of the registry


@pytest.mark.parametrize("case", gc.CASES, ids=case_id)
def test_backward_matches_finite_differences(case):
    results = gc.run_case(case)
    assert [r.param for r in results] == list(case.wrt)     # every input that gets a gradient was checked
    for r in results:
        assert r.rel_error <= THRESHOLD, f"{case.name} d{r.param}: rel error {r.rel_error:.2e}"
        assert r.passed


@pytest.mark.parametrize("case", gc.CASES, ids=case_id)
def test_pair_is_pure_and_returns_exactly_the_gradients_of_wrt(case):
    """Neither half writes into its arguments, a cache can be used twice (in-place speed-ups stay inside), and
    backward returns a gradient for exactly the inputs the case checks (None for a constant or absent one)."""
    with ml.use_fast(False):
        inputs = case.draw(seed=3)
        saved = {k: host(v).copy() for k, v in inputs.items() if v is not None}
        out, cache = case.forward(**inputs)
        dout = dev(np.random.default_rng(4).standard_normal(np.shape(out)))
        dout_saved = host(dout).copy()
        first = case.gradients(dout, cache)
        second = case.gradients(dout, cache)
    for k, v in saved.items():
        np.testing.assert_array_equal(host(inputs[k]), v, err_msg=f"forward or backward changed input {k}")
    np.testing.assert_array_equal(host(dout), dout_saved, err_msg="backward changed dout")
    for k, g in first.items():
        if g is not None:
            assert g.shape == inputs[k].shape, k
            np.testing.assert_array_equal(host(second[k]), host(g), err_msg=f"a second backward gave another d{k}")
    assert {k for k, g in first.items() if g is not None} == set(case.wrt)


def first_shape(case):
    """The shape of the case's first input: (B, T, C), or (B, T) for token ids, for the cases made per shape."""
    return next(spec.shape for spec in case.inputs.values() if spec is not None)


def test_registry_covers_every_pair_and_the_edge_cases():
    names = [case.name for case in gc.CASES]
    assert len(set(names)) == len(names), "case names are test ids: each must be unique"
    assert {case.pair for case in gc.CASES} == set(gc.PAIRS)
    for case in gc.CASES:
        assert list(case.inputs) == list(gc.PAIRS[case.pair].inputs), case.name
        assert set(case.wrt) <= set(gc.PAIRS[case.pair].grads), case.name
    single_position = {case.pair for case in gc.CASES if len(first_shape(case)) >= 2 and first_shape(case)[1] == 1}
    assert single_position == set(gc.PAIRS) - {"prefix MLP", "replace rows"}     # T = 1 (those two have no positions)
    assert {"dropout", "attention", "prefix attention", "lora", "dora", "vera"} <= \
        {case.pair for case in gc.CASES if case.mask_seed is not None}
    heads = {(case.options["n_head"], first_shape(case)[2]) for case in gc.cases_of("attention")}
    assert {1, 2, 3} <= {H for H, _ in heads} and any((C // H) % 2 for H, C in heads)         # odd head size
    assert any(case.inputs["prefix_k"].shape[0] > 1 for case in gc.cases_of("prefix attention"))    # S > T + 1
    assert any(case.options.get("ignore_index") is not None for case in gc.cases_of("cross-entropy"))
    lora = gc.cases_of("lora")
    assert {case.inputs["b"] is None for case in lora} == {True, False}                    # with and without bias
    assert {"W" in case.wrt for case in lora} == {True, False}                             # W trained and frozen
    assert {case.inputs["A"].shape[0] for case in lora} >= {1, 2}                          # rank 1 and more
    for pair in ("linear", "layernorm", "gelu", "lora"):                                  # fewer axes than (B, T, C)
        assert any(len(first_shape(case)) < 3 for case in gc.cases_of(pair)), pair


def test_library_layer_checks_are_the_registry_cases():
    shapes = ((1, 1, 6),)
    results = gc.layer_checks(shapes=shapes) + gc.method_layer_checks(shapes=shapes)
    expected = [(case.name, name) for case in gc.gradient_cases(shapes) for name in case.wrt]
    assert sorted((r.layer, r.param) for r in results) == sorted(expected)
    assert all(r.passed for r in results), [(r.layer, r.param, r.rel_error) for r in results if not r.passed]


def test_a_missing_gradient_fails_the_check():
    rng = np.random.default_rng(0)
    inputs = dict(x=dev(randn(rng, 2, 3, 5)), W=dev(randn(rng, 5, 4)), b=dev(randn(rng, 4)))
    backward = lambda d, c: dict(zip(("x", "W", "b"), F.linear_backward(d, c, bias_grad=False)))
    results = {r.param: r for r in gc.check_layer("linear", F.linear_forward, backward, inputs, wrt=("x", "b"))}
    assert results["x"].passed and results["b"].rel_error == math.inf and not results["b"].passed
    assert "W" not in results
    with pytest.raises(ValueError, match="float64"):
        gc.check_layer("linear", F.linear_forward, backward, {**inputs, "b": None}, wrt=("b",))


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


def test_library_model_checks_are_the_registry_cases():
    results = gc.model_checks()
    assert [(r.layer, r.param) for r in results] == [(case.name, f"direction {d}") for case in gc.MODEL_CASES
                                                     for d in range(gc.DIRECTIONS)]
    assert all(r.passed for r in results), [(r.layer, r.param, r.rel_error) for r in results]


@pytest.mark.parametrize("direction_seed", range(gc.DIRECTIONS))
@pytest.mark.parametrize("case", gc.MODEL_CASES, ids=case_id)
def test_gpt_directional_derivative(case, direction_seed):
    with ml.use_fast(False):
        model, loss_fn = case.build()
        before = {k: v.copy() for k, v in model.state_dict().items()}
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
    head_input = model._cache[0][0]                     # ln_f output, (B, T, C): logits = head_input @ wte^T
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
