"""The fast path of ``minilora.core.functional``: the same forward/backward pairs, with the same signatures,
caches and results (up to float rounding; tests/test_fast.py holds each to its reference), computed faster.

What makes them faster: in-place updates instead of fresh temporaries, one pass where the reference makes
several, matrix-vector products for row means, a cheaper softmax shift on the CPU, a sorted scatter-add, and
one GPU kernel per per-element formula on CuPy. Read the reference first: it is the math; this is the
engineering. Backwards return fresh arrays, so a caller may keep them as gradients.

Arrays may be NumPy or CuPy; each function uses the module its inputs belong to and keeps their dtype.

Shapes: B batch, T time, C channels, H heads, hs = C // H head size, V vocabulary, N = B*T rows.
"""
from __future__ import annotations

import math

import numpy

from ..core.backend import get_array_module
from ..core.functional import GELU_C, GELU_K, causal_mask, dropout_backward, dropout_forward
from . import kernels
from .kernels import elementwise_kernel


def _row_dot(a, b):
    """sum(a * b, axis=-1): the row-wise dot products of two arrays of the same shape (..., n) -> (...).

    NumPy's einsum computes them without making the product array a * b. CuPy's einsum is slower than the
    product and the sum (it is bound by Python overhead at these sizes), so there it is those two."""
    xp = get_array_module(a)
    return xp.einsum("...n,...n->...", a, b) if xp is numpy else (a * b).sum(axis=-1)


# ----------------------------------------------------------------------------------------------------
# linear


def linear_forward(x, W, b=None):
    """core.functional.linear_forward, with the bias added in place."""
    x2 = x.reshape(-1, x.shape[-1])      # (N, in): one matrix product instead of one per batch row
    y = x2 @ W                           # (N, out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1]), (x, W, b is not None)


def linear_backward(dy, cache, weight_grad=True, bias_grad=True):
    """core.functional.linear_backward (the same three products)."""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                                  # (N, out)
    dx = (dy2 @ W.T).reshape(x.shape)                                   # fwd: y = x @ W
    dW = x.reshape(-1, x.shape[-1]).T @ dy2 if weight_grad else None    # fwd: y = x @ W
    db = dy2.sum(axis=0) if (has_bias and bias_grad) else None          # fwd: y += b
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------
# embedding

ONE_HOT_LIMIT = 2**24      # on the GPU, scatter_add uses a one-hot matrix of up to this many elements


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (unbuffered), in place.

    target: (V, ...); indices: (N,) integers in [0, V); values: (N, ...)."""
    module = get_array_module(target)
    if module is numpy:
        # numpy.add.at is correct but slow; sorting the indices and summing each run of equal ones
        # (add.reduceat) gives the same sums faster
        if len(indices) == 0:
            return
        order = numpy.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        starts = numpy.flatnonzero(numpy.r_[True, sorted_indices[1:] != sorted_indices[:-1]])
        target[sorted_indices[starts]] += numpy.add.reduceat(values[order], starts, axis=0)
    elif len(indices) * target.shape[0] <= ONE_HOT_LIMIT:
        # On the GPU: target += onehot(indices)^T @ values, one matrix product. The usual scatter-add (atomic
        # additions) sums each row's values in whatever order the threads arrive, so the result would change
        # in the last bits from run to run; the product gives the same bits every time.
        onehot = (indices[:, None] == module.arange(target.shape[0])[None, :]).astype(values.dtype)  # (N, V)
        target += (onehot.T @ values.reshape(len(indices), -1)).reshape(target.shape)
    else:                                    # a large table: atomic additions (fast, not bit-reproducible)
        module.add.at(target, indices, values)


def embedding_backward(dout, cache):
    """core.functional.embedding_backward with the sorted scatter-add above."""
    idx, table_shape = cache
    xp = get_array_module(dout)
    dW = xp.zeros(table_shape, dtype=dout.dtype)
    scatter_add(dW, idx.reshape(-1), dout.reshape(-1, table_shape[1]))  # fwd: out = W[idx]
    return dW


# ----------------------------------------------------------------------------------------------------
# layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    """core.functional.layernorm_forward in place, the variance as row dot products."""
    xp = get_array_module(x)
    if xp is not numpy:
        return _layernorm_forward_gpu(x, w, b, eps)
    mean = x.mean(axis=-1, keepdims=True)          # (..., 1)
    xhat = x - mean                                # (..., C) centred
    var = _row_dot(xhat, xhat)[..., None] * (1.0 / x.shape[-1])   # (..., 1) biased variance, as torch
    rstd = 1.0 / xp.sqrt(var + eps)                # (..., 1)
    xhat *= rstd                                   # (..., C) xhat = (x - mean) * rstd
    out = xhat * w
    out += b                                       # out = xhat * w + b
    return out, (xhat, w, rstd)


def layernorm_backward(dout, cache, param_grad=True):
    """core.functional.layernorm_backward, the row means as matrix-vector products."""
    xhat, w, rstd = cache
    xp = get_array_module(dout)
    C = xhat.shape[-1]
    rows, xhat_rows = dout.reshape(-1, C), xhat.reshape(-1, C)     # (N, C)
    if xp is not numpy:
        return _layernorm_backward_gpu(dout, rows, xhat_rows, w, rstd, param_grad)
    dout_xhat = rows * xhat_rows                                   # (N, C)
    db = rows.sum(axis=0) if param_grad else None                  # fwd: out = xhat * w + b
    dw = dout_xhat.sum(axis=0) if param_grad else None             # fwd: out = xhat * w + b
    # fwd: out = xhat * w + b                    ->  dxhat = dout * w
    # fwd: xhat = (x - mean(x)) * rstd(x)        ->  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    # (the direct path, the path through the mean, the path through the variance; llm.c doc/layernorm).
    # The two row means are matrix-vector products: mean(dxhat) = dout @ w / C, mean(dxhat * xhat) =
    # (dout * xhat) @ w / C, which BLAS computes faster than a product followed by a row sum.
    mean_dxhat = (rows @ w)[:, None] * (1.0 / C)                   # (N, 1)
    mean_dxhat_xhat = (dout_xhat @ w)[:, None] * (1.0 / C)         # (N, 1)
    dx = rows * w
    dx -= mean_dxhat
    dx -= xp.multiply(xhat_rows, mean_dxhat_xhat, out=dout_xhat)   # reuses dout * xhat's memory, no longer needed
    dx *= rstd.reshape(-1, 1)
    return dx.reshape(dout.shape), dw, db


# The same two functions with fewer GPU kernels: on CuPy a step is bound by kernel launches, so the
# per-element tails of the formulas above run as one kernel each.


def _layernorm_forward_gpu(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)                          # (..., 1)
    centred = x - mean                                             # (..., C)
    sum_sq = (centred * centred).sum(axis=-1, keepdims=True)      # (..., 1)
    rstd = elementwise_kernel("T sum_sq, float64 inv_c, float64 eps", "T rstd", kernels.LAYERNORM_RSTD,
                              "minilora_layernorm_rstd")(sum_sq, 1.0 / x.shape[-1], eps)
    xhat, out = elementwise_kernel("T centred, T rstd, T w, T b", "T xhat, T out", kernels.LAYERNORM_OUT,
                                   "minilora_layernorm_out")(centred, rstd, w, b)
    return out, (xhat, w, rstd)


def _layernorm_backward_gpu(dout, rows, xhat_rows, w, rstd, param_grad):
    dout_xhat = rows * xhat_rows                                   # (N, C)
    db, dw = (rows.sum(axis=0), dout_xhat.sum(axis=0)) if param_grad else (None, None)
    # dx = rstd * (dout * w - mean(dxhat) - xhat * mean(dxhat * xhat)), the row sums as matrix-vector products
    dx = elementwise_kernel(
        "T dout, T xhat, T w, T sum_dxhat, T sum_dxhat_xhat, T rstd, float64 inv_c", "T dx",
        kernels.LAYERNORM_BACKWARD, "minilora_layernorm_backward")(
            rows, xhat_rows, w, (rows @ w)[:, None], (dout_xhat @ w)[:, None], rstd.reshape(-1, 1),
            1.0 / rows.shape[1])
    return dx.reshape(dout.shape), dw, db


# ----------------------------------------------------------------------------------------------------
# gelu (tanh approximation, as GPT-2's "gelu_new")

_GELU_K = GELU_K
_GELU_C = GELU_C


def gelu_forward(x):
    """core.functional.gelu_forward in place (one GPU kernel on CuPy)."""
    xp = get_array_module(x)
    if xp is not numpy:
        out, t = elementwise_kernel("T x, float64 k, float64 ck", "T out, T t", kernels.GELU_FORWARD,
                                    "minilora_gelu_forward")(x, _GELU_K, _GELU_C * _GELU_K)
        return out, (x, t)
    inner = x * x                        # x^2
    inner *= _GELU_C * _GELU_K
    inner += _GELU_K
    inner *= x                           # u = k (x + 0.044715 x^3) = x (k + 0.044715 k x^2)
    t = xp.tanh(inner, out=inner)        # t = tanh(u)
    out = t + 1.0
    out *= x
    out *= 0.5                           # out = 0.5 x (1 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    """core.functional.gelu_backward in place (one GPU kernel on CuPy)."""
    x, t = cache
    xp = get_array_module(x)
    if xp is not numpy:
        return elementwise_kernel("T x, T t, T dout, float64 k, float64 three_ck", "T dx", kernels.GELU_BACKWARD,
                                  "minilora_gelu_backward")(x, t, dout, _GELU_K, 3.0 * _GELU_C * _GELU_K)
    # fwd: u = k (x + 0.044715 x^3)  ->  du/dx = k (1 + 3 * 0.044715 x^2)
    du = x * x
    du *= 3.0 * _GELU_C * _GELU_K
    du += _GELU_K
    # fwd: t = tanh(u)  ->  dt/du = 1 - t^2;  a = (t^2 - 1) x du/dx = -x dt/dx
    dx = t * t
    dx -= 1.0
    dx *= x
    dx *= du
    # fwd: out = 0.5 x (1 + t)  ->  d out/dx = 0.5 (1 + t) + 0.5 x dt/dx = 0.5 (1 + t - a)
    xp.subtract(t, dx, out=dx)
    dx += 1.0
    dx *= 0.5
    dx *= dout
    return dx


# ----------------------------------------------------------------------------------------------------
# causal multi-head self-attention

_causal_mask_cache = {}


def _causal_mask(xp, T, S, dtype):
    """core.functional.causal_mask, made once per shape and dtype (it is a constant)."""
    key = (xp.__name__, T, S, str(dtype))
    if key not in _causal_mask_cache:
        _causal_mask_cache[key] = causal_mask(xp, T, S, dtype)
    return _causal_mask_cache[key]


def attention_forward(q, k, v, n_head, dropout_p=0.0, rng=None):
    """core.functional.attention_forward: the scale applied to q, k^T made contiguous, a
    cheaper softmax shift on the CPU, a cached mask."""
    xp = get_array_module(q)
    B, T, C = q.shape
    S = k.shape[1]
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    # (B, T, C) -> (B, H, T, hs); q is scaled here (B*T*C multiplies) rather than the scores (B*H*T*T)
    qh = (q * scale).reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    kh = k.reshape(B, S, n_head, hs).transpose(0, 2, 1, 3)   # (B, H, S, hs)
    vh = v.reshape(B, S, n_head, hs).transpose(0, 2, 1, 3)
    # k^T is made contiguous: NumPy's batched product is slower when its right operand is a transposed view,
    # and this copy costs less than it saves.
    khT = xp.ascontiguousarray(kh.transpose(0, 1, 3, 2))   # (B, H, hs, S)
    att = qh @ khT                                 # (B, H, T, S) scores, already divided by sqrt(hs)
    att += _causal_mask(xp, T, S, att.dtype)       # future positions -> -inf
    # Softmax, stabilised. Any shift of a row leaves its softmax unchanged; the usual one, the row's max, is
    # slow to find in NumPy (a reduction along the short last axis), so on the CPU the row's own diagonal score
    # (query t against key t, always visible) is subtracted instead. exp then stays <= 1 unless some score
    # exceeds the diagonal by ~88 (float32 overflow): the sums show it, and only then is the max used. On a GPU
    # the max is one fast reduction, and checking the sums would make the CPU wait for the GPU.
    on_cpu = xp is numpy
    shift = xp.diagonal(att, offset=S - T, axis1=-2, axis2=-1)[..., None] if on_cpu else att.max(axis=-1, keepdims=True)
    probs = att - shift                            # (B, H, T, S); att is kept
    with numpy.errstate(over="ignore"):            # an overflow is caught just below
        xp.exp(probs, out=probs)
    sums = probs.sum(axis=-1, keepdims=True)       # >= 1: the shift's own entry contributes exp(0)
    if on_cpu and not bool(xp.isfinite(sums).all()):
        xp.subtract(att, att.max(axis=-1, keepdims=True), out=probs)
        xp.exp(probs, out=probs)
        sums = probs.sum(axis=-1, keepdims=True)
    att = probs
    att *= 1.0 / sums                              # (B, H, T, S) probabilities, rows sum to 1
    att_drop, drop_cache = dropout_forward(att, dropout_p, rng)
    yh = att_drop @ vh                             # (B, H, T, hs)
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C) heads side by side
    return y, (qh, kh, vh, att, att_drop, drop_cache, scale)


def attention_backward(dy, cache):
    """core.functional.attention_backward with in-place softmax arithmetic."""
    xp = get_array_module(dy)
    qh, kh, vh, att, att_drop, drop_cache, scale = cache
    B, H, T, hs = qh.shape
    dyh = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)      # fwd: y = yh.transpose(...).reshape(B, T, C)
    vhT = xp.ascontiguousarray(vh.transpose(0, 1, 3, 2))     # (B, H, hs, S), contiguous as khT in the forward
    datt = dyh @ vhT                                          # fwd: yh = att_drop @ vh
    dvh = att_drop.transpose(0, 1, 3, 2) @ dyh                # fwd: yh = att_drop @ vh
    datt = dropout_backward(datt, drop_cache)                 # fwd: att_drop = dropout(att)
    # fwd: att = softmax(scores): dscores = att * (datt - sum_j datt_j att_j). Masked entries have att = 0,
    # so they get no gradient, as the constant mask deserves.
    row_dot = _row_dot(datt, att)[..., None]                 # (B, H, T, 1) sum_j datt_j att_j
    datt -= row_dot
    dscores = datt
    dscores *= att
    dqh = dscores @ kh                                        # fwd: scores = qh @ kh^T
    dkh = dscores.transpose(0, 1, 3, 2) @ qh                  # fwd: scores = qh @ kh^T
    dqh *= scale                                              # fwd: qh = q * scale (kh was not scaled)
    join = lambda a: a.transpose(0, 2, 1, 3).reshape(B, a.shape[2], H * hs)  # fwd: (B, T, C) -> (B, H, T, hs)
    return join(dqh), join(dkh), join(dvh)


# ----------------------------------------------------------------------------------------------------
# softmax cross-entropy (fused forward and backward)


def softmax_cross_entropy(logits, targets, ignore_index=None):
    """core.functional.softmax_cross_entropy in place."""
    xp = get_array_module(logits)
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)                                    # (N, V)
    tgt = targets.reshape(-1)                                       # (N,)
    keep = None if ignore_index is None else (tgt != ignore_index)
    if keep is not None:
        tgt = xp.where(keep, tgt, 0)                                # any valid index; masked out below
    n_counted = rows.shape[0] if keep is None else int(keep.sum())
    if n_counted == 0:
        raise ValueError("every target equals ignore_index: the mean cross-entropy over no tokens is undefined")
    shifted = rows - rows.max(axis=1, keepdims=True)                # (N, V) stable: max logit is 0
    probs = xp.exp(shifted)
    sums = probs.sum(axis=1, keepdims=True)                         # (N, 1)
    n_rows = xp.arange(rows.shape[0])
    token_loss = xp.log(sums[:, 0]) - shifted[n_rows, tgt]          # (N,) -log softmax(logits)[target]
    if keep is not None:
        token_loss = token_loss * keep
    loss = float(token_loss.sum()) / n_counted
    # d loss / d logits = (softmax(logits) - onehot(target)) / n_counted, zero on ignored rows
    probs /= sums
    probs[n_rows, tgt] -= 1.0
    if keep is not None:
        probs *= keep[:, None]
    probs *= 1.0 / n_counted
    return loss, probs.reshape(logits.shape)
