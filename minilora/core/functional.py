"""The math of a GPT-2: forward/backward pairs, pure functions of arrays (the reference core).

Every layer is two functions, as in CS231n's ``layers.py`` and llm.c:

    out, cache = <layer>_forward(x, params...)
    dx, dparams... = <layer>_backward(dout, cache)

The cache holds exactly what the backward needs. Each backward line names the forward line it
differentiates ("fwd: ..."). A backward can skip the gradient of a frozen weight (``weight_grad=False``
returns ``None`` in its place): that skipped matrix product is the saving LoRA exists for.

This file is written to be read: each function is the derivation, line by line, in plain array code.
``minilora.fast.functional`` computes the same pairs faster (in-place updates, fused and reordered
arithmetic, GPU kernels); a test holds every fast pair to the one here.

Arrays may be NumPy or CuPy; each function uses the module its inputs belong to and keeps their dtype
(Python float constants never upcast a float32 array).

Shapes: B batch, T time, C channels, H heads, hs = C // H head size, V vocabulary, N = B*T rows.
"""
from __future__ import annotations

import math

from .backend import get_array_module

# ----------------------------------------------------------------------------------------------------
# linear


def linear_forward(x, W, b=None):
    """y = x @ W + b.

    x: (..., in) inputs; W: (in, out) weight; b: (out,) bias or None.
    Returns y: (..., out) and the cache (x, W, has_bias).
    """
    x2 = x.reshape(-1, x.shape[-1])                        # (N, in): every leading axis is a row
    y = x2 @ W                                             # (N, out) one matrix product for all rows
    if b is not None:
        y = y + b                                          # b broadcast over the N rows
    return y.reshape(*x.shape[:-1], W.shape[1]), (x, W, b is not None)


def linear_backward(dy, cache, weight_grad=True, bias_grad=True):
    """Gradients of y = x @ W + b.

    dy: (..., out). Returns dx: (..., in), dW: (in, out), db: (out,); dW is None when not weight_grad (a
    frozen weight), db is None when not bias_grad or when there is no bias.
    """
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                     # (N, out) every leading axis is a row
    x2 = x.reshape(-1, x.shape[-1])                        # (N, in)
    dx = (dy2 @ W.T).reshape(x.shape)                      # fwd: y = x @ W
    dW = x2.T @ dy2 if weight_grad else None               # fwd: y = x @ W
    db = dy2.sum(axis=0) if has_bias and bias_grad else None   # fwd: y = y + b (b was broadcast over N rows)
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------
# embedding


def embedding_forward(idx, W):
    """out = W[idx]: one row of the table per token.

    idx: integer array of any shape S; W: (V, C) table. Returns out: (*S, C) and the cache (idx, W's shape).
    """
    return W[idx], (idx, W.shape)


def embedding_backward(dout, cache):
    """Gradient of the table: each row collects the sum of dout over every position that looked it up.

    dout: (*S, C). Returns dW: (V, C). A token repeated in idx accumulates (scatter-add, not assignment).
    """
    idx, table_shape = cache
    xp = get_array_module(dout)
    dW = xp.zeros(table_shape, dtype=dout.dtype)
    xp.add.at(dW, idx.reshape(-1), dout.reshape(-1, table_shape[1]))   # fwd: out = W[idx]
    return dW


# ----------------------------------------------------------------------------------------------------
# layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    """Normalise each row of x over its last axis, then scale and shift (GPT-2's LayerNorm, eps 1e-5).

    x: (..., C); w, b: (C,). Returns out: (..., C) and the cache (xhat, w, rstd), where
    xhat = (x - mean) * rstd: (..., C) and rstd = 1 / sqrt(var + eps): (..., 1) (biased variance, as torch).
    """
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)                  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)   # (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)                        # (..., 1)
    xhat = (x - mean) * rstd                               # (..., C)
    out = xhat * w + b                                     # (..., C)
    return out, (xhat, w, rstd)


def layernorm_backward(dout, cache, param_grad=True):
    """Gradients of layernorm. dout: (..., C). Returns dx: (..., C), dw: (C,), db: (C,); dw and db are None
    when not param_grad (a frozen LayerNorm)."""
    xhat, w, rstd = cache
    C = xhat.shape[-1]
    rows = dout.reshape(-1, C)                             # (N, C)
    xhat2 = xhat.reshape(-1, C)                            # (N, C)
    db = rows.sum(axis=0) if param_grad else None          # fwd: out = xhat * w + b
    dw = (rows * xhat2).sum(axis=0) if param_grad else None   # fwd: out = xhat * w + b
    dxhat = rows * w                                       # fwd: out = xhat * w + b
    # fwd: xhat = (x - mean(x)) * rstd(x): three paths from x (directly, through the mean, through the
    # variance; llm.c doc/layernorm) give  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat2 * (dxhat * xhat2).mean(axis=-1, keepdims=True)
    dx = dx * rstd.reshape(-1, 1)
    return dx.reshape(dout.shape), dw, db


# ----------------------------------------------------------------------------------------------------
# gelu (tanh approximation, as GPT-2's "gelu_new")

GELU_K = math.sqrt(2.0 / math.pi)   # Python floats: they never upcast a float32 array
GELU_C = 0.044715


def gelu_forward(x):
    """out = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3), k = sqrt(2/pi).

    x: any shape. Returns out (same shape) and the cache (x, t) with t = tanh(u).
    """
    xp = get_array_module(x)
    u = GELU_K * (x + GELU_C * x * x * x)
    t = xp.tanh(u)
    out = 0.5 * x * (1.0 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    """Gradient of the tanh GELU. dout: the shape of x. Returns dx: the shape of x."""
    x, t = cache
    du_dx = GELU_K * (1.0 + 3.0 * GELU_C * x * x)          # fwd: u = k (x + 0.044715 x^3)
    dt_dx = (1.0 - t * t) * du_dx                          # fwd: t = tanh(u), d tanh(u)/du = 1 - tanh(u)^2
    dout_dx = 0.5 * (1.0 + t) + 0.5 * x * dt_dx            # fwd: out = 0.5 x (1 + t)
    return dout * dout_dx


# ----------------------------------------------------------------------------------------------------
# dropout (inverted: scaled at training time, identity at evaluation)


def dropout_forward(x, p, rng=None):
    """Zero each element with probability p and scale the rest by 1/(1-p).

    x: any shape; p: float in [0, 1); rng: a seeded generator (needed when p > 0).
    Returns out and the cache (the scaled keep-mask, or None when p == 0).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1); got {p!r}")
    if p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout with p > 0 needs a seeded random generator (rng)")
    keep = rng.random(x.shape, dtype=x.dtype) >= p           # True with probability 1 - p
    scaled_mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))   # the expected value of out stays x
    return x * scaled_mask, scaled_mask


def dropout_backward(dout, cache):
    """dx = dout * mask / (1 - p) (dout itself when there was no dropout)."""
    if cache is None:
        return dout
    return dout * cache                                    # fwd: out = x * scaled_mask


# ----------------------------------------------------------------------------------------------------
# causal multi-head self-attention


def causal_mask(xp, T, S, dtype):
    """(T, S) additive mask, S >= T: query t sees every key up to its own position S - T + t, and no later one.

    With S = T this is the usual causal mask (0 on and below the diagonal, -inf above); the S - T extra keys
    at the front are a prefix that every query sees (prefix tuning)."""
    return xp.triu(xp.full((T, S), -xp.inf, dtype=dtype), k=S - T + 1)


def attention_forward(q, k, v, n_head, dropout_p=0.0, rng=None):
    """Causal scaled dot-product attention over n_head heads.

    q: (B, T, C); k, v: (B, S, C) with S >= T (S = T for ordinary self-attention; S - T > 0 leading keys
    and values form a prefix every query may attend to). C = n_head * hs. Returns y: (B, T, C) (heads joined,
    before the output projection) and the cache (qh, kh, vh, att, att_drop, drop_cache, scale):
        qh: (B, H, T, hs) the queries already multiplied by scale = 1 / sqrt(hs); kh, vh: (B, H, S, hs);
        att: (B, H, T, S) the softmax probabilities; att_drop: att after dropout.
    """
    xp = get_array_module(q)
    B, T, C = q.shape
    S = k.shape[1]
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    qh = (q * scale).reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)   # (B, H, T, hs)
    kh = k.reshape(B, S, n_head, hs).transpose(0, 2, 1, 3)             # (B, H, S, hs)
    vh = v.reshape(B, S, n_head, hs).transpose(0, 2, 1, 3)             # (B, H, S, hs)
    scores = qh @ kh.transpose(0, 1, 3, 2)                             # (B, H, T, S) q.k / sqrt(hs)
    scores = scores + causal_mask(xp, T, S, scores.dtype)              # future positions -> -inf
    scores = scores - scores.max(axis=-1, keepdims=True)               # softmax(s) = softmax(s - max s): stable
    att = xp.exp(scores)
    att = att / att.sum(axis=-1, keepdims=True)                        # (B, H, T, S) rows sum to 1
    att_drop, drop_cache = dropout_forward(att, dropout_p, rng)
    yh = att_drop @ vh                                                 # (B, H, T, hs)
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, C)                      # (B, T, C) heads side by side
    return y, (qh, kh, vh, att, att_drop, drop_cache, scale)


def attention_backward(dy, cache):
    """Gradients of causal attention. dy: (B, T, C). Returns dq: (B, T, C) and dk, dv: (B, S, C)."""
    qh, kh, vh, att, att_drop, drop_cache, scale = cache
    B, H, T, hs = qh.shape
    dyh = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)                # fwd: y = yh.transpose(...).reshape(B, T, C)
    datt_drop = dyh @ vh.transpose(0, 1, 3, 2)                         # fwd: yh = att_drop @ vh   (B, H, T, S)
    dvh = att_drop.transpose(0, 1, 3, 2) @ dyh                         # fwd: yh = att_drop @ vh   (B, H, S, hs)
    datt = dropout_backward(datt_drop, drop_cache)                     # fwd: att_drop = dropout(att)
    # fwd: att = softmax(scores) -> dscores = att * (datt - sum_j datt_j att_j) along each row. Masked
    # entries have att = 0, so they get no gradient, as the constant mask deserves.
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dqh = (dscores @ kh) * scale                                       # fwd: scores = qh @ kh^T; qh = q * scale
    dkh = dscores.transpose(0, 1, 3, 2) @ qh                           # fwd: scores = qh @ kh^T

    def join(a):                                                       # fwd: (B, T, C) -> (B, H, T, hs)
        return a.transpose(0, 2, 1, 3).reshape(B, a.shape[2], H * hs)

    return join(dqh), join(dkh), join(dvh)


# ----------------------------------------------------------------------------------------------------
# softmax cross-entropy (loss and gradient in one pass)


def softmax_cross_entropy(logits, targets, ignore_index=None):
    """Mean cross-entropy of softmax(logits) against integer targets, and its gradient in one pass.

    logits: (..., V) scores; targets: integer array of shape logits.shape[:-1]; ignore_index: a target
    value whose positions count for nothing (neither in the loss nor in the mean), or None.
    Returns loss (Python float, mean over counted positions) and dlogits (same shape as logits).
    """
    xp = get_array_module(logits)
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)                                       # (N, V)
    tgt = targets.reshape(-1)                                          # (N,)
    keep = xp.ones(tgt.shape, dtype=bool) if ignore_index is None else tgt != ignore_index   # (N,)
    tgt = xp.where(keep, tgt, 0)                                       # any valid index where ignored
    n_counted = int(keep.sum())
    if n_counted == 0:
        raise ValueError("every target equals ignore_index: the mean cross-entropy over no tokens is undefined")
    shifted = rows - rows.max(axis=1, keepdims=True)                   # (N, V) the same softmax, stable
    log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))   # (N, V) log softmax
    n = xp.arange(rows.shape[0])
    token_loss = -log_probs[n, tgt]                                    # (N,) -log softmax(logits)[target]
    loss = float((token_loss * keep).sum()) / n_counted
    dlogits = xp.exp(log_probs)                                        # fwd: log_probs = log softmax(rows)
    dlogits[n, tgt] -= 1.0                                             # fwd: token_loss = -log_probs[target]
    dlogits = dlogits * keep[:, None] * (1.0 / n_counted)              # fwd: loss = sum(token_loss * keep) / n
    return loss, dlogits.reshape(logits.shape)
