"""Assignment "layers": the backward passes of a GPT-2's layers, by hand.

Every layer is a pair of functions (CS231n's ``layers.py``, llm.c):

    out, cache = <layer>_forward(inputs...)        given: read it, it tells you what the cache holds
    grads...   = <layer>_backward(dout, cache)     yours: every place that raises NotImplementedError

A backward receives dout = dL/dout for some scalar loss L and returns dL/d(each input), each of its input's
shape. Work in NumPy, in float64; no loops over the batch are needed. The grader calls each forward here and
then your backward on that forward's cache (so you may change what a cache holds, as long as the forward's output
stays right), compares both with minilora's reference, and checks your pair against centred differences. Your
code must be your own: a file that imports minilora scores zero.

Graded items (one function each): linear_backward, layernorm_backward, gelu_backward, attention_backward and the
gradient part of softmax_cross_entropy. Grade yourself with

    python layers.py                 (or: minilora assignment grade layers layers.py)

Shapes: B batch, T time, C channels, H heads, hs = C // H head size, V vocabulary, N = B*T rows.
"""
import math

import numpy as np

# ----------------------------------------------------------------------------------------------------
# linear


def linear_forward(x, W, b=None):
    """y = x @ W + b.

    x: (..., in); W: (in, out); b: (out,) or None.
    Returns y: (..., out) and the cache (x, W, has_bias).
    """
    y = x @ W
    if b is not None:
        y = y + b
    return y, (x, W, b is not None)


def linear_backward(dy, cache):
    """Gradients of y = x @ W + b.

    dy: (..., out). Returns dx: (..., in), dW: (in, out), db: (out,) (db is None when there was no bias).
    Hint: flatten the leading axes to N rows first.
    """
    x, W, has_bias = cache
    # BEGIN SOLUTION
    dy2 = dy.reshape(-1, dy.shape[-1])                     # (N, out)
    x2 = x.reshape(-1, x.shape[-1])                        # (N, in)
    dx = (dy2 @ W.T).reshape(x.shape)                      # fwd: y = x @ W
    dW = x2.T @ dy2                                        # fwd: y = x @ W
    db = dy2.sum(axis=0) if has_bias else None             # fwd: y = y + b (b broadcast over N rows)
    return dx, dW, db
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    """Normalise each row of x over its last axis, then scale and shift (GPT-2's LayerNorm).

    x: (..., C); w, b: (C,). Returns out: (..., C) and the cache (xhat, w, rstd), where
    xhat = (x - mean) * rstd: (..., C) and rstd = 1 / sqrt(var + eps): (..., 1) (biased variance).
    """
    mean = x.mean(axis=-1, keepdims=True)                  # (..., 1)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)   # (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)                        # (..., 1)
    xhat = (x - mean) * rstd                               # (..., C)
    out = xhat * w + b                                     # (..., C)
    return out, (xhat, w, rstd)


def layernorm_backward(dout, cache):
    """Gradients of layernorm. dout: (..., C). Returns dx: (..., C), dw: (C,), db: (C,).

    Hint: the mean and the variance depend on every x in the row; llm.c's doc/layernorm derives the
    three paths (direct, through the mean, through the variance) in a few lines.
    """
    xhat, w, rstd = cache
    # BEGIN SOLUTION
    C = xhat.shape[-1]
    rows = dout.reshape(-1, C)                             # (N, C)
    xhat2 = xhat.reshape(-1, C)                            # (N, C)
    db = rows.sum(axis=0)                                  # fwd: out = xhat * w + b
    dw = (rows * xhat2).sum(axis=0)                        # fwd: out = xhat * w + b
    dxhat = rows * w                                       # fwd: out = xhat * w + b
    # fwd: xhat = (x - mean(x)) * rstd(x)
    #   ->  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat2 * (dxhat * xhat2).mean(axis=-1, keepdims=True)
    dx = dx * rstd.reshape(-1, 1)
    return dx.reshape(dout.shape), dw, db
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# gelu (tanh approximation, as GPT-2)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def gelu_forward(x):
    """out = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3), k = sqrt(2 / pi).

    x: any shape. Returns out (same shape) and the cache (x, t) with t = tanh(u).
    """
    u = GELU_K * (x + GELU_C * x ** 3)
    t = np.tanh(u)
    out = 0.5 * x * (1.0 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    """Gradient of the tanh GELU. dout: the shape of x. Returns dx: the shape of x.

    Hint: d tanh(u) / du = 1 - tanh(u)^2.
    """
    x, t = cache
    # BEGIN SOLUTION
    du_dx = GELU_K * (1.0 + 3.0 * GELU_C * x ** 2)         # fwd: u = k (x + 0.044715 x^3)
    dt_dx = (1.0 - t ** 2) * du_dx                         # fwd: t = tanh(u)
    dout_dx = 0.5 * (1.0 + t) + 0.5 * x * dt_dx            # fwd: out = 0.5 x (1 + t)
    return dout * dout_dx
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# dropout (given: attention uses it on its probabilities)


def dropout_forward(x, p, rng=None):
    """Zero each element with probability p and scale the rest by 1 / (1 - p).

    Returns out and the cache: the scaled keep-mask (x's shape), or None when p == 0 (then out is x).
    """
    if p == 0.0:
        return x, None
    mask = (rng.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype) * (1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, cache):
    """dx = dout * scaled mask (dout itself when there was no dropout)."""
    return dout if cache is None else dout * cache


# ----------------------------------------------------------------------------------------------------
# causal multi-head self-attention


def attention_forward(q, k, v, n_head, dropout_p=0.0, rng=None):
    """Causal scaled dot-product attention over n_head heads.

    q, k, v: (B, T, C) projections, C = n_head * hs. Returns y: (B, T, C) (the heads side by side) and the
    cache (qh, kh, vh, att, att_drop, drop_cache, scale):
        qh: (B, H, T, hs) the queries ALREADY multiplied by scale = 1 / sqrt(hs); kh, vh: (B, H, T, hs);
        att: (B, H, T, T) the softmax probabilities (0 above the diagonal: no token sees the future);
        att_drop: att after dropout (att itself when dropout_p == 0); drop_cache: dropout's cache.
    """
    B, T, C = q.shape
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    qh = (q * scale).reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)   # (B, H, T, hs)
    kh = k.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)             # (B, H, T, hs)
    vh = v.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)             # (B, H, T, hs)
    scores = qh @ kh.transpose(0, 1, 3, 2)                             # (B, H, T, T)
    scores = scores + np.triu(np.full((T, T), -np.inf), k=1)           # future positions -> -inf
    scores = scores - scores.max(axis=-1, keepdims=True)               # stable softmax
    att = np.exp(scores)
    att = att / att.sum(axis=-1, keepdims=True)                        # (B, H, T, T) rows sum to 1
    att_drop, drop_cache = dropout_forward(att, dropout_p, rng)
    yh = att_drop @ vh                                                 # (B, H, T, hs)
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, C)                      # (B, T, C)
    return y, (qh, kh, vh, att, att_drop, drop_cache, scale)


def attention_backward(dy, cache):
    """Gradients of causal attention. dy: (B, T, C). Returns dq, dk, dv: (B, T, C).

    Hint: go through the forward from the bottom up; the softmax's backward is
    dscores = att * (datt - sum_j datt_j att_j) along each row, and dropout_backward is given.
    """
    qh, kh, vh, att, att_drop, drop_cache, scale = cache
    # BEGIN SOLUTION
    B, H, T, hs = qh.shape
    dyh = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)                # fwd: y = yh.transpose(...).reshape(B, T, C)
    datt_drop = dyh @ vh.transpose(0, 1, 3, 2)                         # fwd: yh = att_drop @ vh   (B, H, T, T)
    dvh = att_drop.transpose(0, 1, 3, 2) @ dyh                         # fwd: yh = att_drop @ vh   (B, H, T, hs)
    datt = dropout_backward(datt_drop, drop_cache)                     # fwd: att_drop = dropout(att)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # fwd: att = softmax(scores)
    dqh = (dscores @ kh) * scale                                       # fwd: scores = qh @ kh^T; qh = q * scale
    dkh = dscores.transpose(0, 1, 3, 2) @ qh                           # fwd: scores = qh @ kh^T

    def join(a):                                                       # fwd: (B, T, C) -> (B, H, T, hs)
        return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)

    return join(dqh), join(dkh), join(dvh)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# softmax cross-entropy (loss and gradient in one pass)


def softmax_cross_entropy(logits, targets, ignore_index=None):
    """Mean cross-entropy of softmax(logits) against integer targets, and its gradient.

    logits: (..., V); targets: integers of shape logits.shape[:-1]; ignore_index: a target value whose
    positions count for nothing (neither in the loss nor in the mean), or None.
    Returns loss (a float, the mean over counted positions) and dlogits = d loss / d logits (logits' shape).
    The loss is given; you write dlogits.
    """
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)                                       # (N, V)
    tgt = targets.reshape(-1)                                          # (N,)
    keep = np.ones(tgt.shape, dtype=bool) if ignore_index is None else (tgt != ignore_index)   # (N,)
    tgt = np.where(keep, tgt, 0)                                       # any valid index where ignored
    n_counted = int(keep.sum())
    shifted = rows - rows.max(axis=1, keepdims=True)                   # (N, V)
    probs = np.exp(shifted)
    probs = probs / probs.sum(axis=1, keepdims=True)                   # (N, V) softmax
    n = np.arange(rows.shape[0])
    token_loss = -np.log(probs[n, tgt])                                # (N,)
    loss = float((token_loss * keep).sum()) / n_counted
    # BEGIN SOLUTION
    dlogits = probs.copy()                                             # fwd: probs = softmax(rows)
    dlogits[n, tgt] -= 1.0                                             # fwd: token_loss = -log probs[target]
    dlogits *= keep[:, None] / n_counted                               # fwd: loss = sum(token_loss * keep) / n
    # END SOLUTION
    # BEGIN PLACEHOLDER
    # raise NotImplementedError("softmax_cross_entropy: compute dlogits, (N, V), from probs, tgt, keep, n_counted")
    # END PLACEHOLDER
    return loss, dlogits.reshape(logits.shape)


if __name__ == "__main__":
    from minilora.course import format_report, grade

    print(format_report(grade("layers", __file__)))
