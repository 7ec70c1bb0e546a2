"""The fast path computes what the reference core computes.

Every function that ``minilora.fast`` registers as the fast version of a reference function is run both ways
on the same float64 inputs (random shapes and edge cases) and every output is compared: forward outputs, every
gradient, and the arrays an in-place update changes. Relative error at most 1e-12: the two differ only in the
order of float operations. Then whole models: logits, gradients and a short training run, fast against
reference.
"""
import subprocess
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import backend, fast, train
from minilora.core import functional as ref
from minilora.core import lora as ref_lora
from minilora.core import optim as ref_optim
from minilora.fast import functional as fastf
from minilora.fast import lora as fast_lora
from minilora.fast import optim as fast_optim
from minilora.gradcheck import rel_error
from helpers import dev, host

TOL = 1e-12


def randn(rng, *shape, scale=1.0):
    return dev(scale * rng.standard_normal(shape))


def assert_same(fast_out, ref_out, what):
    """Nested tuples of arrays (or None, or numbers) agree element by element within TOL."""
    if isinstance(ref_out, (tuple, list)):
        assert isinstance(fast_out, (tuple, list)) and len(fast_out) == len(ref_out), f"{what}: structure differs"
        for i, (a, b) in enumerate(zip(fast_out, ref_out)):
            assert_same(a, b, f"{what}[{i}]")
    elif ref_out is None:
        assert fast_out is None, f"{what}: the reference gives None, the fast path an array"
    elif backend.is_array(ref_out):
        assert tuple(fast_out.shape) == tuple(ref_out.shape), f"{what}: shape {fast_out.shape} != {ref_out.shape}"
        assert fast_out.dtype == ref_out.dtype, f"{what}: dtype {fast_out.dtype} != {ref_out.dtype}"
        err = rel_error(fast_out, ref_out)
        assert err <= TOL, f"{what}: fast against reference, rel_error {err:.2e} > {TOL:.0e}"
    else:
        assert fast_out == pytest.approx(ref_out, rel=TOL, abs=0), f"{what}: {fast_out} != {ref_out}"


def both_pairs(name, forward_args, backward_extra=(), seed=0):
    """Run <name>_forward and <name>_backward both ways on the same inputs; compare outputs and gradients."""
    ref_forward, fast_forward = getattr(ref, f"{name}_forward"), getattr(fastf, f"{name}_forward")
    out_ref, cache_ref = ref_forward(*forward_args)
    out_fast, cache_fast = fast_forward(*forward_args)
    assert_same(out_fast, out_ref, f"{name}_forward output")
    dout = randn(np.random.default_rng(seed + 100), *out_ref.shape)
    grads_ref = getattr(ref, f"{name}_backward")(dout.copy(), cache_ref, *backward_extra)
    grads_fast = getattr(fastf, f"{name}_backward")(dout.copy(), cache_fast, *backward_extra)
    assert_same(grads_fast, grads_ref, f"{name}_backward")
    # the caches are interchangeable: either backward works on either forward's cache
    assert_same(getattr(fastf, f"{name}_backward")(dout.copy(), cache_ref, *backward_extra), grads_ref,
                f"{name}_backward on the reference cache")


def test_every_fast_function_is_registered_with_the_reference_signature():
    import inspect

    assert fast.REPLACES, "the fast path registers nothing"
    for reference_module, functions in fast.REPLACES.items():
        for name, function in functions.items():
            reference = getattr(reference_module, name)
            assert inspect.signature(function) == inspect.signature(reference), name
            with ml.use_fast(True):
                assert getattr(backend.Pairs(reference_module), name) is function
            with ml.use_fast(False):
                assert getattr(backend.Pairs(reference_module), name) is reference


def test_register_fast_refuses_a_function_with_other_parameters():
    with pytest.raises(ValueError, match="takes"):
        backend.register_fast(ref, {"linear_forward": lambda x, W: None})
    with pytest.raises(ValueError, match="no not_a_layer"):
        backend.register_fast(ref, {"not_a_layer": lambda x: None})


LINEAR_SHAPES = [((2, 3, 5), 4), ((1, 1, 1), 1), ((7, 16), 9), ((2, 1, 3, 6), 2)]


@pytest.mark.parametrize("x_shape,out", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["W-trains", "W-frozen"])
def test_linear(x_shape, out, bias, weight_grad):
    rng = np.random.default_rng(1)
    x, W = randn(rng, *x_shape), randn(rng, x_shape[-1], out)
    b = randn(rng, out) if bias else None
    both_pairs("linear", (x, W, b), (weight_grad, True))
    both_pairs("linear", (x, W, b), (weight_grad, False))


@pytest.mark.parametrize("idx_shape,V", [((2, 5), 7), ((1, 1), 3), ((3, 40), 4), ((64,), 1000)], ids=str)
def test_embedding_backward_accumulates_repeated_tokens(idx_shape, V):
    rng = np.random.default_rng(2)
    idx = dev(rng.integers(0, V, size=idx_shape))
    W = randn(rng, V, 6)
    out, cache = ref.embedding_forward(idx, W)
    dout = randn(rng, *out.shape)
    assert_same(fastf.embedding_backward(dout, cache), ref.embedding_backward(dout, cache), "embedding_backward")


@pytest.mark.parametrize("shape", [(2, 3, 8), (1, 1, 1), (4, 5), (2, 2, 2, 7)], ids=str)
@pytest.mark.parametrize("constant_rows", [False, True], ids=["random", "constant-rows"])
def test_layernorm(shape, constant_rows):
    rng = np.random.default_rng(3)
    x = randn(rng, *shape, scale=3.0) + 0.5
    if constant_rows:                     # zero variance: rstd = 1 / sqrt(eps)
        x = x[..., :1] + 0 * x
    w, b = randn(rng, shape[-1]) + 1.0, randn(rng, shape[-1])
    both_pairs("layernorm", (x, w, b, 1e-5))


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0], ids=lambda s: f"x~{s}")
def test_gelu(scale):
    rng = np.random.default_rng(4)
    both_pairs("gelu", (randn(rng, 3, 4, 10, scale=scale),))


ATTENTION_SHAPES = [  # B, T, S, C, n_head
    (2, 5, 5, 12, 3), (1, 1, 1, 4, 1), (3, 4, 4, 8, 1), (2, 6, 9, 16, 4), (1, 1, 4, 6, 2), (2, 7, 7, 18, 6)]


@pytest.mark.parametrize("B,T,S,C,H", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_attention(B, T, S, C, H, dropout_p):
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, B, T, C), randn(rng, B, S, C), randn(rng, B, S, C)
    out_ref, cache_ref = ref.attention_forward(q, k, v, H, dropout_p, backend.rng(7) if dropout_p else None)
    out_fast, cache_fast = fastf.attention_forward(q, k, v, H, dropout_p, backend.rng(7) if dropout_p else None)
    assert_same(out_fast, out_ref, "attention_forward output")
    dy = randn(rng, B, T, C)
    assert_same(fastf.attention_backward(dy, cache_fast), ref.attention_backward(dy, cache_ref), "attention_backward")


@pytest.mark.parametrize("spread", [50.0, 800.0], ids=["large-scores", "scores-that-overflow-exp"])
def test_attention_softmax_stays_finite_when_scores_are_far_apart(spread):
    """The fast softmax shifts by the diagonal score on the CPU; a score far above it must not overflow."""
    rng = np.random.default_rng(6)
    q, k, v = randn(rng, 2, 6, 8, scale=spread ** 0.5), randn(rng, 2, 6, 8, scale=spread ** 0.5), randn(rng, 2, 6, 8)
    both_pairs("attention", (q, k, v, 2))
    out, _ = fastf.attention_forward(q, k, v, 2)
    assert np.isfinite(host(out)).all()


@pytest.mark.parametrize("shape,V", [((2, 5), 7), ((1, 1), 2), ((13,), 96)], ids=str)
@pytest.mark.parametrize("ignore", [None, "some"], ids=["all-counted", "ignore_index"])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["moderate", "extreme-logits"])
def test_softmax_cross_entropy(shape, V, ignore, scale):
    rng = np.random.default_rng(8)
    logits = randn(rng, *shape, V, scale=scale)
    targets = rng.integers(0, V, size=shape)
    ignore_index = None
    if ignore:
        ignore_index = -1
        targets.reshape(-1)[::2] = -1
        targets.reshape(-1)[-1] = 0       # at least one counted position
    targets = dev(targets)
    loss_ref, d_ref = ref.softmax_cross_entropy(logits, targets, ignore_index)
    loss_fast, d_fast = fastf.softmax_cross_entropy(logits, targets, ignore_index)
    assert np.isfinite(loss_ref) and np.isfinite(loss_fast)
    assert loss_fast == pytest.approx(loss_ref, rel=TOL)
    assert_same(d_fast, d_ref, "dlogits")


@pytest.mark.parametrize("x_shape,out,r", [((2, 3, 5), 4, 2), ((1, 1, 6), 6, 1), ((9, 8), 3, 3)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["W-frozen", "W-trains"])
def test_lora_pair(x_shape, out, r, bias, dropout_p, weight_grad):
    rng = np.random.default_rng(9)
    x, W, A, B = randn(rng, *x_shape), randn(rng, x_shape[-1], out), randn(rng, r, x_shape[-1]), randn(rng, out, r)
    b = randn(rng, out) if bias else None
    runs = []
    for module in (ref_lora, fast_lora):
        y, cache = module.lora_forward(x, W, b, A, B, 1.7, dropout_p, backend.rng(3) if dropout_p else None)
        dy = randn(np.random.default_rng(10), *y.shape)
        runs.append((y, module.lora_backward(dy, cache, weight_grad, bias)))
    assert_same(runs[1][0], runs[0][0], "lora_forward output")
    assert_same(runs[1][1], runs[0][1], "lora_backward")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
def test_adamw_update(weight_decay):
    rng = np.random.default_rng(11)
    p0 = randn(rng, 5, 3)
    state = {name: [p0.copy(), dev(np.zeros((5, 3))), dev(np.zeros((5, 3)))] for name in ("ref", "fast")}
    for step in range(1, 6):
        g = randn(rng, 5, 3, scale=10.0 ** (step - 3))
        ref_optim.adamw_update(*state["ref"][:1], g, *state["ref"][1:], 3e-3, 0.9, 0.99, 1e-8, weight_decay, step)
        fast_optim.adamw_update(*state["fast"][:1], g, *state["fast"][1:], 3e-3, 0.9, 0.99, 1e-8, weight_decay, step)
        for what, a, b in zip(("param", "m", "v"), state["fast"], state["ref"]):
            assert_same(a, b, f"AdamW {what} after step {step}")


# ----------------------------------------------------------------------------------------------------
# whole models, both ways

SMALL = dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=12)


def _model_and_batch(method, dropout=0.0):
    model = ml.apply_method(ml.GPT(ml.GPTConfig(**SMALL, dropout=dropout), seed=0, dtype="float64"), method)
    for p in model.parameters():          # non-zero everywhere, so no path hides behind a zero (B = 0 in LoRA)
        p.data[...] = p.data + dev(0.05 * np.random.default_rng(1).standard_normal(p.shape))
    rng = np.random.default_rng(2)
    return model, rng.integers(0, 13, size=(3, 6)), rng.integers(0, 13, size=(3, 6))


def _logits_and_grads(model, idx, targets):
    logits = model.forward(idx)
    loss, dlogits = ml.cross_entropy(logits, targets)
    model.backward(dlogits)
    grads = {name: p.grad.copy() for name, p in model.named_parameters(trainable_only=True)}
    model.zero_grad()
    return logits, loss, grads


@pytest.mark.parametrize("method", ml.METHODS)
def test_model_logits_and_gradients_are_the_same_both_ways(method):
    model, idx, targets = _model_and_batch(method)
    with ml.use_fast(True):
        logits_f, loss_f, grads_f = _logits_and_grads(model, idx, targets)
    with ml.use_fast(False):
        logits_r, loss_r, grads_r = _logits_and_grads(model, idx, targets)
    assert_same(logits_f, logits_r, f"{method}: logits")
    assert loss_f == pytest.approx(loss_r, rel=TOL)
    assert grads_f.keys() == grads_r.keys()
    # measured against the scale of the whole gradient: some gradients are zero in exact arithmetic (a key
    # bias shifts every score of a row alike, which the softmax ignores), so on their own they are rounding noise
    scale = max(float(np.max(np.abs(host(grads_f[n])) + np.abs(host(grads_r[n])))) for n in grads_r)
    for name in grads_r:
        diff = float(np.max(np.abs(host(grads_f[name]) - host(grads_r[name]))))
        assert diff <= TOL * scale, f"{method}: gradient of {name} differs by {diff:.2e} (scale {scale:.2e})"


def test_a_short_fit_gives_the_same_losses_both_ways():
    """The fast path (data-parallel threads, fast pairs, in-place AdamW) against the reference core's plain loop."""
    ids = np.random.default_rng(0).integers(0, 13, size=600).astype(np.uint8)
    losses = {}
    for fast_on in (True, False):
        with ml.use_fast(fast_on):
            model = ml.apply_lora(ml.GPT(ml.GPTConfig(**SMALL), seed=0, dtype="float64"), ml.LoRAConfig(r=2, alpha=4))
            config = train.TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=4,
                                       eval_batches=2, quiet=True, threads=2 if fast_on else None)
            result = train.fit(model, ids[:500], ids[500:], config)
            losses[fast_on] = np.array([loss for _, loss in result.train + result.val])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-9, atol=0)


def test_use_fast_is_a_switch_and_a_context_manager():
    before = ml.fast_enabled()
    try:
        with ml.use_fast(False):
            assert not ml.fast_enabled()
            with ml.use_fast(True):
                assert ml.fast_enabled()
            assert not ml.fast_enabled()
        assert ml.fast_enabled() == before
        ml.use_fast(False)
        assert not ml.fast_enabled()
    finally:
        ml.use_fast(before)
    with pytest.raises(ValueError, match="use_fast"):
        ml.use_fast("sometimes")


def _python(code, **env):
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_the_environment_variable_selects_the_reference_core():
    assert _python("import minilora, sys; sys.exit(minilora.fast_enabled())", MINILORA_FAST="0").returncode == 0
    assert _python("import minilora, sys; sys.exit(minilora.fast_enabled())", MINILORA_FAST="1").returncode == 1
    bad = _python("import minilora as ml; ml.GPT(ml.GPTConfig()).forward([[1, 2]])", MINILORA_FAST="maybe")
    assert bad.returncode != 0 and "MINILORA_FAST" in bad.stderr and "'maybe'" in bad.stderr
    # the command says so in one line, without a traceback
    run = _python("import sys; from minilora import cli; sys.exit(cli.main(['gradcheck']))", MINILORA_FAST="maybe")
    assert run.returncode == 2 and "Traceback" not in run.stderr and "'maybe'" in run.stderr


def test_importing_minilora_changes_nothing_process_wide():
    """No allocator setting (no C library is loaded to call mallopt), no thread limits, no threads started."""
    code = """
import ctypes, threading
import numpy, safetensors, tqdm          # what minilora imports, loaded first: only minilora's own effects count
from threadpoolctl import threadpool_info
before = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
threads = threading.active_count()
loaded = []
real = ctypes.CDLL
ctypes.CDLL = lambda *a, **k: loaded.append(a) or real(*a, **k)
import minilora
ctypes.CDLL = real
assert loaded == [], loaded
assert [(i["internal_api"], i["num_threads"]) for i in threadpool_info()] == before
assert threading.active_count() == threads
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr


def test_old_import_paths_are_the_moved_modules():
    import importlib

    for old, new in ml.MOVED_MODULES.items():
        assert importlib.import_module(f"minilora.{old}") is importlib.import_module(f"minilora.{new}"), old
    from minilora.functional import linear_forward
    from minilora.assignments import grade
    assert linear_forward is ref.linear_forward and grade is ml.course.grade
    for name in ml.__all__:
        assert hasattr(ml, name), name


def test_replacing_a_reference_function_takes_effect_on_the_reference_core(monkeypatch):
    """A planted bug in the reference module reaches the model at once (notebooks and tests rely on it)."""
    model, idx, _ = _model_and_batch("full")
    with ml.use_fast(False):
        clean = host(model.forward(idx))
        monkeypatch.setattr(ref, "gelu_forward", lambda x: (0.0 * x, (x, x)))
        assert not np.allclose(host(model.forward(idx)), clean)
