"""Optimizers, clipping and the learning-rate schedule: exact updates on tiny arrays, then training sanity."""
import math

import numpy as np
import pytest

import minilora as ml
from minilora.nn import Embedding, LayerNorm, Linear, Parameter

CFG = ml.GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=32)


def memorisable_batch(cfg, B=4, seed=0):
    """B random sequences with distinct first tokens: every prefix is unique, so every target is learnable."""
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, cfg.vocab_size, size=(B, cfg.block_size + 1))
    seq[:, 0] = rng.permutation(cfg.vocab_size)[:B]
    return seq[:, :-1], seq[:, 1:]


def train_step(model, opt, idx, targets):
    loss, dlogits = ml.cross_entropy(model.forward(idx), targets)
    model.zero_grad()
    model.backward(dlogits)
    opt.step()
    return loss


def train(model, opt, steps, seed=0):
    idx, targets = memorisable_batch(model.config, seed=seed)
    losses = [train_step(model, opt, idx, targets) for _ in range(steps)]
    final = ml.cross_entropy(model.forward(idx), targets)[0]
    return losses[0], final


def test_adamw_overfits_a_tiny_batch():
    model = ml.GPT(CFG, seed=0)
    first, final = train(model, ml.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), steps=200)
    assert first == pytest.approx(math.log(CFG.vocab_size), rel=0.05)   # starts near uniform guessing
    assert final < 0.05


def test_sgd_with_momentum_lowers_the_loss():
    model = ml.GPT(CFG, seed=0)
    first, final = train(model, ml.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=40)
    assert final < 0.5 * first


def test_plain_sgd_step_is_exact():
    p = Parameter(np.array([1.0, -2.0, 3.0]))
    p.grad = np.array([0.5, 0.5, -1.0])
    ml.SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [0.95, -2.05, 3.1], rtol=1e-15)


def test_sgd_momentum_update_is_exact():
    p = Parameter(np.array([1.0, -2.0]))
    opt = ml.SGD([p], lr=0.1, momentum=0.9)
    grads = [np.array([1.0, 2.0]), np.array([-1.0, 0.5])]
    expected, v = p.data.copy(), np.zeros(2)
    for g in grads:
        p.grad = g.copy()
        opt.step()
        v = 0.9 * v + g
        expected -= 0.1 * v
        np.testing.assert_allclose(p.data, expected, rtol=1e-15)


# ----------------------------------------------------------------------------------------------------
# AdamW against hand-computed updates


def reference_adamw(p, grads, lr, betas, eps, weight_decay):
    """The update of Loshchilov and Hutter's AdamW, written out element by element in plain Python."""
    b1, b2 = betas
    p = [float(x) for x in p]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            p[i] *= 1 - lr * weight_decay
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return np.array(p)


def test_adamw_first_step_by_hand():
    p0, g = np.array([0.5, -1.0, 2.0]), np.array([0.1, -0.2, 0.3])
    lr, wd = 0.01, 0.1
    p = Parameter(p0.copy(), decay=True)
    p.grad = g.copy()
    ml.AdamW([p], lr=lr, weight_decay=wd).step()
    # step 1: bias-corrected m = g and v = g^2, so the Adam step is lr * g / (|g| + eps)
    expected = p0 * (1 - lr * wd) - lr * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(p.data, expected, rtol=1e-13)


@pytest.mark.parametrize("decay", [True, False])
def test_adamw_five_steps_match_the_formula(decay):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(6)
    grads = [rng.standard_normal(6) * 10.0 ** k for k in range(-2, 3)]
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)
    p = Parameter(p0.copy(), decay=decay)
    opt = ml.AdamW([p], **kw)
    for g in grads:
        p.grad = g.copy()
        opt.step()
    expected = reference_adamw(p0, grads, **{**kw, "weight_decay": kw["weight_decay"] if decay else 0.0})
    np.testing.assert_allclose(p.data, expected, rtol=1e-12)


def test_adamw_matches_torch_over_five_steps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shapes = {"matrix": ((4, 3), True), "bias": ((3,), False)}
    kw = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ours = {k: Parameter(rng.standard_normal(s), decay=d) for k, (s, d) in shapes.items()}
    theirs = {k: torch.tensor(p.data.copy(), dtype=torch.float64, requires_grad=True) for k, p in ours.items()}
    opt = ml.AdamW(list(ours.values()), **kw)
    topt = torch.optim.AdamW(
        [{"params": [theirs[k]], "weight_decay": kw["weight_decay"] if ours[k].decay else 0.0} for k in ours],
        lr=kw["lr"], betas=kw["betas"], eps=kw["eps"])
    for step in range(5):
        for k, p in ours.items():
            g = rng.standard_normal(p.shape) * (step + 1)
            p.grad = g.copy()
            theirs[k].grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        topt.step()
    for k, p in ours.items():
        np.testing.assert_allclose(p.data, theirs[k].detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=k)


def test_weight_decay_only_where_decay_is_set():
    lr, wd = 0.1, 0.5
    plain, decayed = Parameter(np.ones(4), decay=False), Parameter(np.ones(4), decay=True)
    for p in (plain, decayed):
        p.grad = np.zeros(4)       # no gradient signal: any change is weight decay
    ml.AdamW([plain, decayed], lr=lr, weight_decay=wd).step()
    np.testing.assert_array_equal(plain.data, np.ones(4))
    np.testing.assert_allclose(decayed.data, np.ones(4) * (1 - lr * wd), rtol=1e-15)


def test_gpt_decays_only_linear_weights():
    model = ml.GPT(CFG, seed=0)
    seen = {"linear weight": 0, "other": 0}
    for name, module in model.named_modules():
        for pname, p in module._direct_parameters():
            if isinstance(module, Linear) and pname == "weight":
                assert p.decay, f"{name}.{pname}"
                seen["linear weight"] += 1
            else:
                assert not p.decay, f"{name}.{pname}"   # biases, LayerNorm and (tied) embeddings
                seen["other"] += 1
    assert isinstance(model.wte, Embedding) and isinstance(model.ln_f, LayerNorm)
    assert seen["linear weight"] == 6 * CFG.n_layer and seen["other"] > 0


def freeze(model, prefixes):
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.trainable = False
            frozen.append(p)
    return frozen


def test_adamw_keeps_state_only_for_trainable_parameters_and_never_touches_frozen_ones():
    model = ml.GPT(CFG, seed=0)
    frozen = freeze(model, ("wte", "wpe", "h.0."))
    trainable = model.parameters(trainable_only=True)
    opt = ml.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert [id(p) for p in opt.params] == [id(p) for p in trainable]
    assert len(opt.m) == len(opt.v) == len(trainable)

    before = {id(p): p.data.copy() for p in model.parameters()}
    idx, targets = memorisable_batch(CFG)
    for _ in range(3):
        train_step(model, opt, idx, targets)
    for p in frozen:
        assert p.grad is None
        np.testing.assert_array_equal(ml.backend.to_numpy(p.data), ml.backend.to_numpy(before[id(p)]))
    assert all(m is not None for m in opt.m)
    assert all(not np.array_equal(p.data, before[id(p)]) for p in trainable)

    # a parameter frozen after the optimizer was built is skipped too, even if it holds a gradient
    late = trainable[0]
    late.trainable = False
    late.grad = np.ones_like(late.data)
    kept, m_before = late.data.copy(), opt.m[0].copy()
    opt.step()
    np.testing.assert_array_equal(late.data, kept)
    np.testing.assert_array_equal(opt.m[0], m_before)


def test_optimizers_skip_parameters_without_a_gradient():
    p, q = Parameter(np.ones(3), decay=True), Parameter(np.ones(3))
    q.grad = np.ones(3)
    for opt in (ml.AdamW([p, q], lr=0.1, weight_decay=0.5), ml.SGD([p, q], lr=0.1, momentum=0.5)):
        opt.step()
    np.testing.assert_array_equal(p.data, np.ones(3))
    assert (q.data < 1).all()


# ----------------------------------------------------------------------------------------------------
# clipping and schedule


def params_with_grads(*grads):
    params = []
    for g in grads:
        p = Parameter(np.zeros(np.shape(g)))
        p.grad = None if g is None else np.array(g, dtype=np.float64)
        params.append(p)
    return params


def global_norm(params):
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in params if p.grad is not None))


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before():
    params = params_with_grads([3.0, 4.0], [12.0], None)     # global norm 13; the None is ignored
    originals = [p.grad.copy() for p in params[:2]]
    assert ml.clip_grad_norm(params, 1.3) == pytest.approx(13.0, rel=1e-15)
    assert global_norm(params) == pytest.approx(1.3, rel=1e-6)
    for p, g in zip(params, originals):       # one common factor: directions kept
        np.testing.assert_allclose(p.grad, g * (1.3 / 13.0), rtol=1e-6)
    assert params[2].grad is None


def test_clip_grad_norm_leaves_small_gradients_alone():
    params = params_with_grads([0.3, 0.4])
    assert ml.clip_grad_norm(params, 1.0) == pytest.approx(0.5, rel=1e-15)
    np.testing.assert_array_equal(params[0].grad, [0.3, 0.4])


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),          # warmup: max_lr * (step + 1) / warmup_steps
    (4, 0.5),
    (9, 1.0),          # end of warmup: the peak
    (10, 1.0),         # start of the cosine: still the peak
    (60, 0.55),        # half way through the cosine: (max + min) / 2
    (110, 0.1),        # total_steps: min_lr
    (500, 0.1),        # and after
])
def test_cosine_schedule_values(step, expected):
    assert ml.cosine_schedule(step, max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1) == pytest.approx(expected)


def test_cosine_schedule_shape():
    lrs = [ml.cosine_schedule(s, 3e-4, warmup_steps=5, total_steps=50) for s in range(60)]
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5]))            # rising during warmup
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))            # never rising after
    assert max(lrs) == pytest.approx(3e-4) and lrs[-1] == 0.0
    assert ml.cosine_schedule(0, 1.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)
