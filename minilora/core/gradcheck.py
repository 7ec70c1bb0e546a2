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

Which layers are checked, on which shapes, lives in one registry below: ``PAIRS`` (the forward/backward
pairs) and ``CASES`` (each pair on its inputs, with the edge cases: T = 1, one head, C not a power of two,
dropout, more keys than queries, LoRA with and without bias...), and ``MODEL_CASES`` for whole models.
``minilora gradcheck``, the test suite and the course grader all take their cases from it, so a case added
here is checked, tested and graded at once. The checks run on the reference core (``use_fast(False)``):
the fast path is held to the reference by tests/test_fast.py, the reference to calculus here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy

from . import adapters, backend, dora, lora, lora_extras, prefix, quant, vera
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


def check_layer(name, forward, backward, inputs: dict, seed=0, h=1e-5, threshold=THRESHOLD, wrt=None):
    """Check ``backward`` against centred differences of ``forward`` for each input named in ``wrt``.

    forward: function(**inputs) -> (out, cache); backward: function(dout, cache) -> dict {input name: grad}.
    inputs: {name: array or other argument}; those not checked are passed through unchanged.
    wrt: the names of the float64 array inputs to check; None checks every float64 array among the inputs.
    An input in wrt whose gradient backward leaves out (or returns as None) fails, with an infinite error.
    seed: of the random upstream gradient dout. Returns a list of CheckResult, one per checked input.
    """
    out, cache = forward(**inputs)
    dout = backend.get_array_module(out).asarray(numpy.random.default_rng(seed).standard_normal(out.shape))
    analytic = backward(dout, cache)
    if wrt is None:
        wrt = [key for key, value in inputs.items() if backend.is_array(value) and value.dtype == numpy.float64]
    results = []
    for key in wrt:
        value = inputs[key]
        if not (backend.is_array(value) and value.dtype == numpy.float64):
            raise ValueError(f"{name}: input {key!r} is a {type(value).__name__}; only float64 arrays can be checked")
        f = lambda v, key=key: forward(**{**inputs, key: v})[0]
        numeric = numerical_gradient(f, value, dout, h)
        grad = analytic.get(key)
        results.append(CheckResult(name, key, math.inf if grad is None else rel_error(grad, numeric), threshold))
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
# The registry: the pairs, then every case. `minilora gradcheck`, tests/test_gradcheck.py and the course
# grader (minilora/course/grade.py) all read their cases from here.


@dataclass(frozen=True)
class Pair:
    """A forward/backward pair: ``forward(*inputs, **options) -> (out, cache)`` and
    ``backward(dout, cache, **flags) -> gradients``, in the order ``grads`` names them (one name: a lone array)."""

    forward: Callable
    backward: Callable
    inputs: tuple       # the forward's array arguments, in order
    grads: tuple        # the input each of backward's outputs is the gradient of, in order
    module: str         # where the pair lives: "functional", or the fine-tuning method that adds it


def _cross_entropy_forward(logits, targets, ignore_index=None):
    """Cross-entropy as a layer: its out is the loss (a scalar array), its cache the gradient dlogits."""
    loss, dlogits = F.softmax_cross_entropy(logits, targets, ignore_index)
    return backend.get_array_module(dlogits).asarray(loss), dlogits


def _cross_entropy_backward(dout, dlogits):
    return dlogits * float(dout)            # fwd: out = loss, whose gradient the forward already computed


_ADAPTER = ("h", "W_down", "b_down", "W_up", "b_up")
_PREFIX_ATTENTION = ("q", "k", "v", "prefix_k", "prefix_v")
_PREFIX_MLP = ("E", "W_in", "b_in", "W_out", "b_out")

PAIRS = {
    "linear": Pair(F.linear_forward, F.linear_backward, ("x", "W", "b"), ("x", "W", "b"), "functional"),
    "embedding": Pair(F.embedding_forward, F.embedding_backward, ("idx", "W"), ("W",), "functional"),
    "layernorm": Pair(F.layernorm_forward, F.layernorm_backward, ("x", "w", "b"), ("x", "w", "b"), "functional"),
    "gelu": Pair(F.gelu_forward, F.gelu_backward, ("x",), ("x",), "functional"),
    "dropout": Pair(F.dropout_forward, F.dropout_backward, ("x",), ("x",), "functional"),
    "attention": Pair(F.attention_forward, F.attention_backward, ("q", "k", "v"), ("q", "k", "v"), "functional"),
    "cross-entropy": Pair(_cross_entropy_forward, _cross_entropy_backward, ("logits", "targets"), ("logits",),
                          "functional"),
    "adapter": Pair(adapters.adapter_forward, adapters.adapter_backward, _ADAPTER, _ADAPTER, "adapters"),
    "prefix attention": Pair(prefix.prefix_attention_forward, prefix.prefix_attention_backward, _PREFIX_ATTENTION,
                             _PREFIX_ATTENTION, "prefix"),
    "prefix MLP": Pair(prefix.prefix_mlp_forward, prefix.prefix_mlp_backward, _PREFIX_MLP, _PREFIX_MLP, "prefix"),
    "lora": Pair(lora.lora_forward, lora.lora_backward, ("x", "W", "b", "A", "B"), ("x", "A", "B", "W", "b"), "lora"),
    "dora": Pair(dora.dora_forward, dora.dora_backward, ("x", "W", "b", "A", "B", "m"), ("x", "A", "B", "m", "b"),
                 "dora"),
    "vera": Pair(vera.vera_forward, vera.vera_backward, ("x", "W", "b", "A", "B", "lambda_d", "lambda_b"),
                 ("x", "lambda_d", "lambda_b", "W", "b"), "vera"),
    # q: the 4-bit weight, a constant of the layer (no gradient); its dequantised W is fixed
    "nf4 linear": Pair(quant.nf4_linear_forward, quant.nf4_linear_backward, ("x", "q", "b"), ("x", "b"), "quant"),
    "qlora": Pair(quant.qlora_forward, quant.qlora_backward, ("x", "q", "b", "A", "B"), ("x", "A", "B", "b"), "quant"),
    "embedding lora": Pair(lora_extras.embedding_lora_forward, lora_extras.embedding_lora_backward,
                           ("idx", "W", "A", "B"), ("A", "B"), "lora_extras"),
    "replace rows": Pair(lora_extras.replace_rows_forward, lora_extras.replace_rows_backward,
                         ("W", "indices", "values"), ("values",), "lora_extras"),
}


@dataclass(frozen=True)
class Normal:
    """A float64 input: standard normal draws of this shape, times scale, plus shift."""

    shape: tuple
    scale: float = 1.0
    shift: float = 0.0

    def draw(self, rng):
        return rng.standard_normal(self.shape) * self.scale + self.shift


@dataclass(frozen=True)
class Ids:
    """An integer input (token ids, targets) in [0, n). ``ignored``, if given, replaces the first and the last
    id, when some other position remains to be counted."""

    n: int
    shape: tuple
    ignored: int | None = None

    def draw(self, rng):
        ids = rng.integers(0, self.n, size=self.shape)
        if self.ignored is not None and ids.size > 2:
            ids.flat[0] = ids.flat[-1] = self.ignored
        return ids


@dataclass(frozen=True)
class Fixed:
    """An integer input that is the same in every case (the token ids of trainable rows)."""

    values: tuple

    def draw(self, rng):
        return numpy.asarray(self.values, dtype=numpy.int64)


@dataclass(frozen=True)
class NF4:
    """A 4-bit weight input: standard normal draws of this shape, quantised (quant.quantize_nf4) on the backend."""

    shape: tuple
    block_size: int = 16
    double_quant: bool = False

    def draw(self, rng):
        W = backend.asarray(rng.standard_normal(self.shape))
        return quant.quantize_nf4(W, self.block_size, self.double_quant)


@dataclass(frozen=True)
class Case:
    """One gradient check: a pair of PAIRS on inputs drawn from a seed.

    inputs: {argument: Normal, Ids or None}, one per array argument of the pair; wrt: the inputs whose
    gradients are checked (the others are constants of the layer, as a frozen W is); options: the forward's
    other arguments (n_head, dropout_p, scale...); flags: the backward's keyword arguments (weight_grad...);
    mask_seed: for dropout, the seed of a generator made afresh on every forward call, so that every
    evaluation of the forward draws the same mask.
    """

    pair: str
    name: str
    inputs: dict
    wrt: tuple
    options: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)
    mask_seed: int | None = None

    def draw(self, seed=0) -> dict:
        """The inputs as arrays of the current backend (None stays None), drawn in argument order from seed."""
        rng = numpy.random.default_rng(seed)
        drawn = {name: None if self.inputs[name] is None else self.inputs[name].draw(rng)
                 for name in PAIRS[self.pair].inputs}
        return {name: backend.asarray(v) if isinstance(v, numpy.ndarray) else v for name, v in drawn.items()}

    def arguments(self) -> dict:
        """The forward's arguments besides the inputs, with a fresh dropout generator when there is dropout."""
        return {**self.options, **({} if self.mask_seed is None else {"rng": backend.rng(self.mask_seed)})}

    def forward(self, **inputs):
        """The pair's forward on these inputs: (out, cache)."""
        return PAIRS[self.pair].forward(*(inputs[name] for name in PAIRS[self.pair].inputs), **self.arguments())

    def backward(self, dout, cache) -> tuple:
        """The pair's backward, its outputs always as a tuple (in the order of the pair's ``grads``)."""
        grads = PAIRS[self.pair].backward(dout, cache, **self.flags)
        return grads if isinstance(grads, tuple) else (grads,)

    def gradients(self, dout, cache) -> dict:
        """The pair's backward as {input name: gradient or None}."""
        return dict(zip(PAIRS[self.pair].grads, self.backward(dout, cache)))


SHAPES = ((2, 3, 8), (1, 1, 6), (2, 5, 12), (3, 4, 10), (1, 7, 6))
"""(B, T, C) of the cases made for every shape: T = 1 (one position, so the softmax is constant), B = 1,
and widths that are not powers of two."""


def _heads(C):
    """The head counts checked at width C: one, two and three heads, and heads of size 2, where they divide C."""
    return sorted({H for H in (1, 2, 3, C // 2) if H > 0 and C % H == 0})


def gradient_cases(shapes=SHAPES) -> list:
    """Every gradient-check case: each pair on every (B, T, C) of ``shapes``, then the cases of fixed shapes."""
    cases = []
    for B, T, C in shapes:
        at = f"(B={B},T={T},C={C})"
        btc = Normal((B, T, C))
        even = C % 2 == 0
        cases += [
            Case("linear", f"linear {at}", dict(x=btc, W=Normal((C, C + 3)), b=Normal((C + 3,))), ("x", "W", "b")),
            Case("linear", f"linear no bias {at}", dict(x=btc, W=Normal((C, 2 * C - 1)), b=None), ("x", "W")),
            # V = 3: ids repeat, so the scatter-add must accumulate; V = 7: some rows unused get a zero gradient
            Case("embedding", f"embedding V=3 {at}", dict(idx=Ids(3, (B, T)), W=Normal((3, C))), ("W",)),
            Case("embedding", f"embedding V=7 {at}", dict(idx=Ids(7, (B, T)), W=Normal((7, C))), ("W",)),
            # a mean away from 0 and a spread away from 1, so that neither step of the normalisation is a no-op
            Case("layernorm", f"layernorm {at}",
                 dict(x=Normal((B, T, C), scale=2.0, shift=1.5), w=Normal((C,)), b=Normal((C,))), ("x", "w", "b")),
            Case("gelu", f"gelu {at}", dict(x=Normal((B, T, C), scale=2.0)), ("x",)),
            Case("dropout", f"dropout 0.5 {at}", dict(x=btc), ("x",), options=dict(p=0.5), mask_seed=5),
        ]
        cases += [Case("attention", f"attention H={H} {at}", dict(q=btc, k=btc, v=btc), ("q", "k", "v"),
                       options=dict(n_head=H)) for H in _heads(C)]
        cases += [Case("attention", f"attention H={H} dropout 0.3 {at}", dict(q=btc, k=btc, v=btc), ("q", "k", "v"),
                       options=dict(n_head=H, dropout_p=0.3), mask_seed=5) for H in ((1, 2) if even else (1,))]
        # logits scaled by 3 so that the softmax is far from uniform; ignore_index at the first and last position
        cases += [
            Case("cross-entropy", f"cross-entropy {at}",
                 dict(logits=Normal((B, T, C), scale=3.0), targets=Ids(C, (B, T))), ("logits",)),
            Case("cross-entropy", f"cross-entropy ignore_index {at}",
                 dict(logits=Normal((B, T, C), scale=3.0), targets=Ids(C, (B, T), ignored=-100)), ("logits",),
                 options=dict(ignore_index=-100)),
        ]

        # the layers the fine-tuning methods add
        H = 2 if even else 1
        cases.append(Case("adapter", f"adapter m=3 {at}", dict(h=btc, W_down=Normal((C, 3)), b_down=Normal((3,)),
                                                               W_up=Normal((3, C)), b_up=Normal((C,))), _ADAPTER))
        # P prefix keys in front of the T keys: more keys than queries (S = P + T > T), one prefix row and several
        cases += [Case("prefix attention", f"prefix attention P={P} H={H}" + (f" dropout {p}" if p else "") + f" {at}",
                       dict(q=btc, k=btc, v=btc, prefix_k=Normal((P, C)), prefix_v=Normal((P, C))), _PREFIX_ATTENTION,
                       options=dict(n_head=H, dropout_p=p), mask_seed=5 if p else None)
                  for P, p in ((1, 0.0), (3, 0.0), (3, 0.3))]
        # LoRA with in != out and r > 1, so that a transposed A or B cannot have the right shape; W and b trainable
        # (weight_grad, bias_grad) or frozen, as LoRA usually leaves them (backward must then skip their gradients)
        cases += [Case("lora", "lora r=2" + (f" dropout {p}" if p else "") + ("" if trained else " W, b frozen")
                       + f" {at}",
                       dict(x=btc, W=Normal((C, C + 1)), b=Normal((C + 1,)), A=Normal((2, C)), B=Normal((C + 1, 2))),
                       ("x", "A", "B", "W", "b") if trained else ("x", "A", "B"),
                       options=dict(scale=1.5, dropout_p=p), flags=dict(weight_grad=trained, bias_grad=trained),
                       mask_seed=5 if p else None)
                  for p in (0.0, 0.3) for trained in (True, False)]
        # DoRA: the exact backward (through the column norm) is the derivative finite differences measure; the
        # magnitude away from the norms (m shifted to 2 +- 1) so that g = m / ||V|| is not 1
        cases += [Case("dora", "dora r=2" + (f" dropout {p}" if p else "") + f" {at}",
                       dict(x=btc, W=Normal((C, C + 1)), b=Normal((C + 1,)), A=Normal((2, C)), B=Normal((C + 1, 2)),
                            m=Normal((C + 1,), shift=2.0)),
                       ("x", "A", "B", "m", "b"), options=dict(scale=1.5, dropout_p=p),
                       flags=dict(norm_gradient=True, bias_grad=True), mask_seed=5 if p else None)
                  for p in (0.0, 0.3)]
        # VeRA with in != out and r = 3 (A, B the layer's slices of the shared pair, frozen: no gradient); W and b
        # trained or frozen, as LoRA's
        cases += [Case("vera", "vera r=3" + (f" dropout {p}" if p else "") + ("" if trained else " W, b frozen")
                       + f" {at}",
                       dict(x=btc, W=Normal((C, C + 1)), b=Normal((C + 1,)), A=Normal((3, C)), B=Normal((C + 1, 3)),
                            lambda_d=Normal((3,)), lambda_b=Normal((C + 1,))),
                       ("x", "lambda_d", "lambda_b", "W", "b") if trained else ("x", "lambda_d", "lambda_b"),
                       options=dict(dropout_p=p), flags=dict(weight_grad=trained, bias_grad=trained),
                       mask_seed=5 if p else None)
                  for p in (0.0, 0.3) for trained in (True, False)]
        # NF4: C (C + 1) weights in blocks of 16, so that the last block is padded; plain and double-quantised
        # absmax; the frozen 4-bit path alone and with LoRA beside it (x, b, A, B checked; the codes are constants)
        cases += [Case("nf4 linear", "nf4 linear" + (" double quant" if dq else "") + f" {at}",
                       dict(x=btc, q=NF4((C, C + 1), 16, dq), b=Normal((C + 1,))), ("x", "b"),
                       flags=dict(bias_grad=True)) for dq in (False, True)]
        cases += [Case("qlora", "qlora r=2" + (f" dropout {p}" if p else "") + f" {at}",
                       dict(x=btc, q=NF4((C, C + 1), 16, True), b=Normal((C + 1,)), A=Normal((2, C)),
                            B=Normal((C + 1, 2))), ("x", "A", "B", "b"), options=dict(scale=1.5, dropout_p=p),
                       flags=dict(bias_grad=True), mask_seed=5 if p else None)
                  for p in (0.0, 0.3)]

        # LoRA on a table of 7 tokens (r = 2 < C, so a transposed A or B cannot fit) and trainable rows 1 and 5
        cases += [Case("embedding lora", f"embedding lora V=7 r=2 {at}",
                       dict(idx=Ids(7, (B, T)), W=Normal((7, C)), A=Normal((2, 7)), B=Normal((C, 2))), ("A", "B"),
                       options=dict(scale=1.5)),
                  Case("replace rows", f"replace rows 1, 5 of V=7 {at}",
                       dict(W=Normal((7, C)), indices=Fixed((1, 5)), values=Normal((2, C))), ("values",))]

    # fixed shapes: inputs with fewer axes than (B, T, C), a wide GELU input, an odd vocabulary, LoRA without
    # bias and of rank 1
    cases += [
        Case("linear", "linear x (5, 4)", dict(x=Normal((5, 4)), W=Normal((4, 3)), b=Normal((3,))), ("x", "W", "b")),
        Case("layernorm", "layernorm x (4, 10)",
             dict(x=Normal((4, 10), scale=2.0, shift=1.5), w=Normal((10,)), b=Normal((10,))), ("x", "w", "b")),
        # scale 4 reaches both tails of the tanh, where its derivative is nearly 0
        Case("gelu", "gelu x (7,) scale 4", dict(x=Normal((7,), scale=4.0)), ("x",)),
        Case("cross-entropy", "cross-entropy ignore_index logits (3, 4, 7)",
             dict(logits=Normal((3, 4, 7), scale=3.0), targets=Ids(7, (3, 4), ignored=-100)), ("logits",),
             options=dict(ignore_index=-100)),
        Case("lora", "lora r=3 x (6, 5), no bias",
             dict(x=Normal((6, 5)), W=Normal((5, 3)), b=None, A=Normal((3, 5)), B=Normal((3, 3))), ("x", "A", "B", "W"),
             options=dict(scale=1.5), flags=dict(weight_grad=True, bias_grad=True)),
        Case("lora", "lora r=3 x (6, 5), no bias, W frozen",
             dict(x=Normal((6, 5)), W=Normal((5, 3)), b=None, A=Normal((3, 5)), B=Normal((3, 3))), ("x", "A", "B"),
             options=dict(scale=1.5)),
        Case("lora", "lora r=1 (B=1,T=1,C=6)",
             dict(x=Normal((1, 1, 6)), W=Normal((6, 6)), b=Normal((6,)), A=Normal((1, 6)), B=Normal((6, 1))),
             ("x", "A", "B", "W", "b"), options=dict(scale=0.5), flags=dict(weight_grad=True, bias_grad=True)),
        Case("dora", "dora r=1 x (6, 5), no bias",
             dict(x=Normal((6, 5)), W=Normal((5, 3)), b=None, A=Normal((1, 5)), B=Normal((3, 1)),
                  m=Normal((3,), shift=2.0)), ("x", "A", "B", "m"), options=dict(scale=0.5),
             flags=dict(norm_gradient=True)),
        Case("nf4 linear", "nf4 linear x (6, 5), no bias, block 4",
             dict(x=Normal((6, 5)), q=NF4((5, 3), 4), b=None), ("x",)),
        Case("qlora", "qlora r=1 x (6, 5), no bias, block 4",
             dict(x=Normal((6, 5)), q=NF4((5, 3), 4, True), b=None, A=Normal((1, 5)), B=Normal((3, 1))),
             ("x", "A", "B"), options=dict(scale=0.5)),
        Case("prefix MLP", "prefix MLP (P=3,C=8,hidden=5)",
             dict(E=Normal((3, 8)), W_in=Normal((8, 5)), b_in=Normal((5,)), W_out=Normal((5, 16)), b_out=Normal((16,))),
             _PREFIX_MLP),
        # VeRA's rank is not limited by the layer: r = 7 > min(in, out) = 3
        Case("vera", "vera r=7 > min(in, out) x (6, 5), no bias",
             dict(x=Normal((6, 5)), W=Normal((5, 3)), b=None, A=Normal((7, 5)), B=Normal((3, 7)), lambda_d=Normal((7,)),
                  lambda_b=Normal((3,))), ("x", "lambda_d", "lambda_b", "W"), flags=dict(weight_grad=True)),
        Case("vera", "vera r=7 > min(in, out) x (6, 5), no bias, W frozen",
             dict(x=Normal((6, 5)), W=Normal((5, 3)), b=None, A=Normal((7, 5)), B=Normal((3, 7)), lambda_d=Normal((7,)),
                  lambda_b=Normal((3,))), ("x", "lambda_d", "lambda_b")),
    ]
    return cases


CASES = gradient_cases()


def cases_of(pair: str) -> list:
    """The cases of one pair of PAIRS, in registry order."""
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; expected one of {', '.join(PAIRS)}")
    return [case for case in CASES if case.pair == pair]


def run_case(case: Case, seed=0, h=1e-5, threshold=THRESHOLD) -> list:
    """Check one case on the reference core. Returns one CheckResult per input of case.wrt, in that order."""
    with backend.use_fast(False):     # the methods' pairs call functional's: the reference pairs here too
        # dout from a stream of its own: drawn from the inputs' stream it would repeat them (gelu's dout = x / 2)
        return check_layer(case.name, case.forward, case.gradients, case.draw(seed), seed=seed + 1, h=h,
                           threshold=threshold, wrt=case.wrt)


def layer_checks(seed=0, shapes=SHAPES):
    """The cases of the functional pairs (the transformer's layers), on these (B, T, C) and the fixed shapes."""
    return [r for case in gradient_cases(shapes) if PAIRS[case.pair].module == "functional"
            for r in run_case(case, seed)]


def method_layer_checks(seed=0, shapes=SHAPES):
    """The cases of the pairs the fine-tuning methods add: adapter, prefix attention, prefix MLP and LoRA."""
    return [r for case in gradient_cases(shapes) if PAIRS[case.pair].module != "functional"
            for r in run_case(case, seed)]


# ----------------------------------------------------------------------------------------------------
# Whole models: a directional derivative per case and direction.


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


@dataclass(frozen=True)
class ModelCase:
    """A whole GPT in float64 for the directional check: its config, on a batch of 2 sequences of block_size."""

    name: str
    config: dict        # GPTConfig's fields

    def build(self, seed=0):
        """(model, loss_fn): the model with every parameter randomised, and gpt_loss_fn on a batch drawn from seed."""
        from .model import GPT, GPTConfig

        cfg = GPTConfig(**self.config)
        model = GPT(cfg, seed=seed, dtype="float64")
        randomize_parameters(model, seed)
        rng = numpy.random.default_rng(seed)
        idx = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, cfg.block_size)))
        targets = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, cfg.block_size)))
        return model, gpt_loss_fn(idx, targets, model.dropout_rng if cfg.dropout else None)


MODEL_CASES = (
    ModelCase("GPT(L=2,H=2,C=12)", dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12)),
    ModelCase("GPT(L=1,H=1,C=6)", dict(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=6)),
    ModelCase("GPT(L=2,H=3,C=15)", dict(vocab_size=11, block_size=6, n_layer=2, n_head=3, n_embd=15)),   # odd head size
    ModelCase("GPT(L=2,H=3,C=18) dropout 0.2",
              dict(vocab_size=13, block_size=6, n_layer=2, n_head=3, n_embd=18, dropout=0.2)),
    ModelCase("GPT(L=2,H=2,C=10) dropout 0.2",
              dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=10, dropout=0.2)),
    ModelCase("GPT(L=2,H=2,C=10) T=1", dict(vocab_size=11, block_size=1, n_layer=2, n_head=2, n_embd=10)),
)
DIRECTIONS = 3      # random directions per model: each one checks a different combination of every gradient


def run_model_case(case: ModelCase, direction_seed=0, seed=0) -> CheckResult:
    """The directional check of one model case along one random direction, on the reference core."""
    with backend.use_fast(False):
        model, loss_fn = case.build(seed)
        result = directional_check(model, loss_fn, seed=direction_seed)
    result.layer, result.param = case.name, f"direction {direction_seed}"
    return result


def model_checks(seed=0):
    """Every model case along DIRECTIONS random directions."""
    return [run_model_case(case, direction, seed) for case in MODEL_CASES for direction in range(DIRECTIONS)]


def format_table(results) -> str:
    """A plain-text table: layer, parameter, relative error, pass/fail."""
    rows = [("layer", "parameter", "rel. error", "result")]
    rows += [(r.layer, r.param, f"{r.rel_error:.2e}", "pass" if r.passed else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def method_model_checks(seed=0):
    """Every fine-tuning method on a small float64 GPT with dropout, on the reference core: directional
    derivative over exactly the parameters the method trains (its additions are randomised first, so zero
    initialisations hide nothing)."""
    from .adapters import AdapterConfig
    from .dora import DoRALinear
    from .lora import LoRAConfig
    from .methods import METHODS, MethodSettings, apply_method
    from .model import GPT, GPTConfig
    from .prefix import PrefixConfig, PromptConfig
    from .nn import dropout_generators
    from .vera import VeRAConfig

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12, dropout=0.1)
    settings = MethodSettings(lora=LoRAConfig(r=2, alpha=3.0, dropout=0.1), adapters=AdapterConfig(bottleneck=3),
                              prefix=PrefixConfig(length=2), prefix_mlp=PrefixConfig(length=2, reparameterize=True, hidden=5),
                              prompt=PromptConfig(length=2), vera=VeRAConfig(r=5, dropout=0.1))
    rng = numpy.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, 5)))
    targets = backend.asarray(rng.integers(0, cfg.vocab_size, size=(2, 5)))
    results = []
    with backend.use_fast(False):
        for name in METHODS:
            model = GPT(cfg, seed=seed, dtype="float64")
            apply_method(model, name, settings, seed=seed)
            for _, layer in model.named_modules():
                # the directional derivative measures the exact gradient: DoRA's default treats its column norm
                # as a constant (as PEFT does; tests/test_dora.py checks that one against torch)
                if isinstance(layer, DoRALinear):
                    layer.norm_gradient = True
            randomize_parameters(model, seed)
            r = directional_check(model, gpt_loss_fn(idx, targets, dropout_generators(model)), seed=seed)
            r.layer, r.param = f"GPT + {name}", f"{model.num_parameters(trainable_only=True)} trainable"
            results.append(r)
    return results
