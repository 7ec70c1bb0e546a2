"""Gradient checking: is a hand-written backward the derivative of its forward?

Centred differences (float64):  df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / 2h, error O(h^2).
For a layer with array output we check the scalar L = sum(out * dout) for a random dout, whose gradient
is exactly what ``<layer>_backward(dout, cache)`` returns (CS231n's ``eval_numerical_gradient_array``).

``rel_error(a, b) = max|a - b| / max(1e-8, max(|a| + |b|))``: the largest difference measured against the
scale of the gradient (CS231n grades: > 1e-2 wrong, ~1e-4 only at kinks, <= 1e-7 correct). Dividing by the
gradient's scale rather than element by element keeps an entry that should be ~0 from turning
float64 rounding noise into a huge "relative" error.

Whole models get a directional-derivative check (Chainer's ``check_backward``): along a random direction u
over all parameters, (L(theta + h u) - L(theta - h u)) / 2h must equal <grad L, u>.

Nothing here modifies its inputs: perturbations are made on copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy

from . import backend
from . import functional as F

THRESHOLD = 1e-7


def rel_error(a, b) -> float:
    """max|a - b| / max(1e-8, max(|a| + |b|)), computed in float64 on the host."""
    a = backend.to_numpy(a).astype(numpy.float64)
    b = backend.to_numpy(b).astype(numpy.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error needs arrays of one shape; got {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    return float(numpy.max(numpy.abs(a - b)) / max(1e-8, float(numpy.max(numpy.abs(a) + numpy.abs(b)))))


def numerical_gradient(f, x, dout=None, h=1e-5):
    """Centred-difference gradient of sum(f(x) * dout) (or of the scalar f(x) when dout is None) w.r.t. x.

    f: a function of one array; x: float array (left unchanged: f sees a perturbed copy).
    Returns an array of x's shape.
    """
    xp = backend.get_array_module(x)
    xc = x.copy()
    flat = xc.reshape(-1)      # a view into the copy
    grad = xp.zeros(x.size, dtype=xp.float64)

    def objective():
        out = f(xc)
        return float((out * dout).sum()) if dout is not None else float(out)

    for i in range(x.size):
        old = float(flat[i])
        flat[i] = old + h
        plus = objective()
        flat[i] = old - h
        minus = objective()
        flat[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad.reshape(x.shape)


@dataclass
class CheckResult:
    """One row of a gradient check: which layer, which input, the relative error and whether it passes."""

    layer: str
    param: str
    rel_error: float
    threshold: float = THRESHOLD

    @property
    def passed(self) -> bool:
        return bool(self.rel_error <= self.threshold)


def check_layer(name, forward, backward, inputs: dict, seed=0, h=1e-5, threshold=THRESHOLD):
    """Check ``backward`` against centred differences of ``forward`` for each float input.

    forward: function(**inputs) -> (out, cache); backward: function(dout, cache) -> dict {input name: grad}.
    inputs: {name: array or other argument}; float64 arrays are checked, anything else is passed through.
    Returns a list of CheckResult, one per checked input.
    """
    out, cache = forward(**inputs)
    dout = backend.get_array_module(out).asarray(numpy.random.default_rng(seed).standard_normal(out.shape))
    analytic = backward(dout, cache)
    results = []
    for key, value in inputs.items():
        if not (backend.is_array(value) and value.dtype == numpy.float64):
            continue
        f = lambda v, key=key: forward(**{**inputs, key: v})[0]
        numeric = numerical_gradient(f, value, dout, h)
        results.append(CheckResult(name, key, rel_error(analytic[key], numeric), threshold))
    return results


def directional_check(model, loss_fn, seed=0, h=1e-5, threshold=THRESHOLD):
    """Directional-derivative check of a whole model's backward.

    model: a Module in float64; loss_fn: function(model, backward=True) -> loss (a float) that runs forward,
    the loss and, when asked, backward (filling .grad). Compares <grad, u> with (L(theta + h u) - L(theta - h u)) / 2h along a
    random unit direction u over every trainable parameter. Parameters are restored afterwards.
    Returns a CheckResult.
    """
    params = model.parameters(trainable_only=True)
    model.zero_grad()
    loss_fn(model)
    rng = numpy.random.default_rng(seed)
    directions = [backend.asarray(rng.standard_normal(p.shape)) for p in params]
    norm = numpy.sqrt(sum(float((u * u).sum()) for u in directions))
    directions = [u / norm for u in directions]
    analytic = sum(float((p.grad * u).sum()) for p, u in zip(params, directions) if p.grad is not None)
    originals = [p.data.copy() for p in params]
    try:
        losses = []
        for sign in (+1.0, -1.0):
            for p, u, p0 in zip(params, directions, originals):
                p.data[...] = p0 + sign * h * u
            losses.append(loss_fn(model, backward=False))
    finally:
        for p, p0 in zip(params, originals):
            p.data[...] = p0
    numeric = (losses[0] - losses[1]) / (2 * h)
    model.zero_grad()
    return CheckResult(type(model).__name__, "directional", rel_error(numpy.array(analytic), numpy.array(numeric)), threshold)


# ----------------------------------------------------------------------------------------------------
# The checks `minilora gradcheck` runs: every functional pair, then the whole GPT.


def _f64(rng, *shape, scale=1.0):
    return backend.asarray(rng.standard_normal(shape) * scale)


def layer_checks(seed=0, shapes=((2, 3, 8), (1, 1, 6), (2, 5, 12))):
    """Every functional layer on several (B, T, C) shapes, including T = 1 and C not a power of two."""
    rng = numpy.random.default_rng(seed)
    results = []
    for B, T, C in shapes:
        tag = f"(B={B},T={T},C={C})"
        results += check_layer(
            f"linear {tag}",
            lambda x, W, b: F.linear_forward(x, W, b),
            lambda d, c: dict(zip(("x", "W", "b"), F.linear_backward(d, c))),
            dict(x=_f64(rng, B, T, C), W=_f64(rng, C, C + 3), b=_f64(rng, C + 3)), seed)
        V = 7
        idx = backend.asarray(rng.integers(0, V, size=(B, T)))
        results += check_layer(
            f"embedding {tag}",
            lambda W, idx: F.embedding_forward(idx, W),
            lambda d, c: {"W": F.embedding_backward(d, c)},
            dict(W=_f64(rng, V, C), idx=idx), seed)
        results += check_layer(
            f"layernorm {tag}",
            lambda x, w, b: F.layernorm_forward(x, w, b),
            lambda d, c: dict(zip(("x", "w", "b"), F.layernorm_backward(d, c))),
            dict(x=_f64(rng, B, T, C, scale=2.0), w=_f64(rng, C), b=_f64(rng, C)), seed)
        results += check_layer(
            f"gelu {tag}",
            lambda x: F.gelu_forward(x),
            lambda d, c: {"x": F.gelu_backward(d, c)},
            dict(x=_f64(rng, B, T, C, scale=2.0)), seed)
        for n_head in sorted({1, C // 2 if C % 2 == 0 else 1, 2 if C % 2 == 0 else 1}):
            results += check_layer(
                f"attention {tag} H={n_head}",
                lambda q, k, v, n_head=n_head: F.attention_forward(q, k, v, n_head),
                lambda d, c: dict(zip(("q", "k", "v"), F.attention_backward(d, c))),
                dict(q=_f64(rng, B, T, C), k=_f64(rng, B, T, C), v=_f64(rng, B, T, C)), seed)
        results += check_layer(
            f"attention+dropout {tag}",
            lambda q, k, v: F.attention_forward(q, k, v, 1, 0.3, backend.rng(seed)),
            lambda d, c: dict(zip(("q", "k", "v"), F.attention_backward(d, c))),
            dict(q=_f64(rng, B, T, C), k=_f64(rng, B, T, C), v=_f64(rng, B, T, C)), seed)
        results += check_layer(
            f"dropout {tag}",
            lambda x: F.dropout_forward(x, 0.5, backend.rng(seed)),
            lambda d, c: {"x": F.dropout_backward(d, c)},
            dict(x=_f64(rng, B, T, C)), seed)
        targets = rng.integers(0, C, size=(B, T))
        if targets.size > 1:
            targets[0, 0] = -100   # one ignored position (keep at least one counted)
        for ignore in (None, -100):
            tgt = backend.asarray(targets if ignore is not None else numpy.abs(targets) % C)
            results += check_layer(
                f"cross-entropy {tag}" + (" ignore_index" if ignore is not None else ""),
                lambda logits, tgt=tgt, ignore=ignore: _ce_pair(logits, tgt, ignore),
                lambda d, c: {"logits": c * float(d)},
                dict(logits=_f64(rng, B, T, C, scale=3.0)), seed)
    return results


def method_layer_checks(seed=0, shapes=((2, 3, 8), (1, 1, 6), (2, 5, 12))):
    """The layers the fine-tuning methods add: adapter, attention with prefix keys (prefix length 1 and 3,
    with and without dropout), the prefix MLP, and LoRA."""
    from .adapters import adapter_backward, adapter_forward
    from .lora import lora_backward, lora_forward
    from .prefix import prefix_attention_backward, prefix_attention_forward, prefix_mlp_backward, prefix_mlp_forward

    rng = numpy.random.default_rng(seed)
    results = []
    for B, T, C in shapes:
        tag = f"(B={B},T={T},C={C})"
        m = 3
        results += check_layer(
            f"adapter {tag} m={m}",
            lambda h, W_down, b_down, W_up, b_up: adapter_forward(h, W_down, b_down, W_up, b_up),
            lambda d, c: dict(zip(("h", "W_down", "b_down", "W_up", "b_up"), adapter_backward(d, c))),
            dict(h=_f64(rng, B, T, C), W_down=_f64(rng, C, m), b_down=_f64(rng, m), W_up=_f64(rng, m, C),
                 b_up=_f64(rng, C)), seed)
        n_head = 2 if C % 2 == 0 else 1
        for P, p in ((1, 0.0), (3, 0.0), (3, 0.3)):
            results += check_layer(
                f"prefix attention {tag} P={P} H={n_head}" + (f" dropout {p}" if p else ""),
                lambda q, k, v, prefix_k, prefix_v, p=p: prefix_attention_forward(
                    q, k, v, prefix_k, prefix_v, n_head, p, backend.rng(seed) if p else None),
                lambda d, c: dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), prefix_attention_backward(d, c))),
                dict(q=_f64(rng, B, T, C), k=_f64(rng, B, T, C), v=_f64(rng, B, T, C), prefix_k=_f64(rng, P, C),
                     prefix_v=_f64(rng, P, C)), seed)
        r = 2
        for p in (0.0, 0.3):          # without dropout the adapter is folded into the frozen product
            results += check_layer(
                f"lora {tag} r={r}" + (f" dropout {p}" if p else ""),
                lambda x, W, b, A, B_, p=p: lora_forward(x, W, b, A, B_, 1.5, p, backend.rng(seed) if p else None),
                lambda d, c: dict(zip(("x", "A", "B_", "W", "b"), lora_backward(d, c, weight_grad=True, bias_grad=True))),
                dict(x=_f64(rng, B, T, C), W=_f64(rng, C, C + 1), b=_f64(rng, C + 1), A=_f64(rng, r, C),
                     B_=_f64(rng, C + 1, r)), seed)
    P, C, hidden = 3, 8, 5
    results += check_layer(
        f"prefix MLP (P={P},C={C},hidden={hidden})",
        lambda E, W_in, b_in, W_out, b_out: prefix_mlp_forward(E, W_in, b_in, W_out, b_out),
        lambda d, c: dict(zip(("E", "W_in", "b_in", "W_out", "b_out"), prefix_mlp_backward(d, c))),
        dict(E=_f64(rng, P, C), W_in=_f64(rng, C, hidden), b_in=_f64(rng, hidden), W_out=_f64(rng, hidden, 2 * C),
             b_out=_f64(rng, 2 * C)), seed)
    return results


def _ce_pair(logits, targets, ignore_index):
    """Cross-entropy as a (scalar out, cache = dlogits) pair so that check_layer can treat it as a layer."""
    loss, dlogits = F.softmax_cross_entropy(logits, targets, ignore_index)
    return backend.xp().asarray(loss), dlogits


def randomize_parameters(model, seed=0, scale=0.1):
    """Give every parameter (biases and LayerNorm included) non-trivial values, so that zeros hide no bug."""
    rng = numpy.random.default_rng(seed)
    for _, p in model.named_parameters():
        noise = backend.asarray(rng.standard_normal(p.shape).astype(p.data.dtype))
        p.data[...] = p.data + scale * noise


def gpt_loss_fn(idx, targets, dropout_rng=None):
    """A loss function for ``directional_check``: forward, cross-entropy and (optionally) backward.

    dropout_rng: the model's dropout generator, or a list of generators (``nn.dropout_generators(model)``
    when LoRA layers have their own); their states are rewound before every forward so that each evaluation
    of L(theta) draws the same dropout masks (otherwise L would change with every call).
    """
    from .model import cross_entropy

    generators = [] if dropout_rng is None else list(dropout_rng) if isinstance(dropout_rng, (list, tuple)) \
        else [dropout_rng]
    starts = [backend.generator_state(g) for g in generators]

    def run(model, backward=True):
        for g, state in zip(generators, starts):
            backend.set_generator_state(g, state)
        logits = model.forward(idx)
        loss, dlogits = cross_entropy(logits, targets)
        if backward:
            model.backward(dlogits)
        return loss

    return run


def model_checks(seed=0):
    """The whole GPT in float64: directional derivative along random directions, on a few small configs."""
    from .model import GPT, GPTConfig

    results = []
    configs = [
        GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12),
        GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=6),
        GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=3, n_embd=18, dropout=0.2),
    ]
    rng = numpy.random.default_rng(seed)
    for cfg in configs:
        model = GPT(cfg, seed=seed, dtype="float64")
        randomize_parameters(model, seed)
        idx = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, cfg.block_size)))
        targets = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, cfg.block_size)))
        for direction_seed in range(3):
            loss_fn = gpt_loss_fn(idx, targets, model.dropout_rng if cfg.dropout else None)
            r = directional_check(model, loss_fn, seed=direction_seed)
            r.layer = f"GPT(L={cfg.n_layer},H={cfg.n_head},C={cfg.n_embd})"
            r.param = f"direction {direction_seed}"
            results.append(r)
    return results


def format_table(results) -> str:
    """A plain-text table: layer, parameter, relative error, pass/fail."""
    rows = [("layer", "parameter", "rel. error", "result")]
    rows += [(r.layer, r.param, f"{r.rel_error:.2e}", "pass" if r.passed else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def method_model_checks(seed=0):
    """Every fine-tuning method on a small float64 GPT with dropout: directional derivative over exactly the
    parameters the method trains (its additions are randomised first, so zero initialisations hide nothing)."""
    from .adapters import AdapterConfig
    from .lora import LoRAConfig
    from .methods import METHODS, MethodSettings, apply_method
    from .model import GPT, GPTConfig
    from .prefix import PrefixConfig, PromptConfig
    from .nn import dropout_generators

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12, dropout=0.1)
    settings = MethodSettings(lora=LoRAConfig(r=2, alpha=3.0, dropout=0.1), adapters=AdapterConfig(bottleneck=3),
                              prefix=PrefixConfig(length=2), prefix_mlp=PrefixConfig(length=2, reparameterize=True, hidden=5),
                              prompt=PromptConfig(length=2))
    rng = numpy.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, 5)))
    targets = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, 5)))
    results = []
    for name in METHODS:
        model = GPT(cfg, seed=seed, dtype="float64")
        apply_method(model, name, settings, seed=seed)
        randomize_parameters(model, seed)
        r = directional_check(model, gpt_loss_fn(idx, targets, dropout_generators(model)), seed=seed)
        r.layer, r.param = f"GPT + {name}", f"{model.num_parameters(trainable_only=True)} trainable"
        results.append(r)
    return results
