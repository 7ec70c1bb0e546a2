"""The fast path of ``minilora.core.lora``'s pair: the same two-step LoRA forward (the adapter is never added
into W in the forward: its unmerged latency is the two-step adapter's), with the adapter's product added in
place.

In the backward, without dropout, the input gradient's two products dy W^T + (s dy B) A are computed as one,
dy (W + s A^T B^T)^T: equal in exact arithmetic, and forming the (in, out) sum costs in*out*r multiplies where
the separate product and the addition cost passes over the (N, in) gradient."""
from __future__ import annotations

from ..core.functional import dropout_backward, dropout_forward
from .functional import linear_backward, linear_forward


def lora_forward(x, W, b, A, B, scale, dropout_p=0.0, rng=None):
    """y = x W + b + scale * (dropout(x) A^T) B^T. x: (..., in) -> y: (..., out), and the cache."""
    y, base_cache = linear_forward(x, W, b)                   # (..., out) fresh: safe to add into
    xd, drop_cache = dropout_forward(x, dropout_p, rng)
    # the thin products run faster on contiguous (in, r) and (r, out) operands than on transposed views, and
    # the scale rides on the (r, out) matrix, the smallest array of the four
    h = xd.reshape(-1, x.shape[-1]) @ A.T.copy()             # (N, r)
    y.reshape(-1, y.shape[-1])[...] += h @ (scale * B).T.copy()   # (N, out)
    return y, (base_cache, xd, drop_cache, h, A, B, scale)


def lora_backward(dy, cache, weight_grad=False, bias_grad=False):
    """Gradients of lora_forward: dx, dA, dB, dW (or None), db (or None)."""
    base_cache, xd, drop_cache, h, A, B, scale = cache
    x, W, has_bias = base_cache
    dy2 = dy.reshape(-1, dy.shape[-1])                        # (N, out)
    dB = dy2.T @ h                                            # fwd: y += s h B^T
    dB *= scale
    dh = dy2 @ B                                              # fwd: y += s h B^T   (N, r)
    dh *= scale
    dA = dh.T @ xd.reshape(-1, xd.shape[-1])                  # fwd: h = xd A^T
    if drop_cache is None:
        W_adapted = A.T @ B.T                                 # (in, out)
        W_adapted *= scale
        W_adapted += W                                        # fwd: y = x W + b + s (x A^T) B^T
        dx = (dy2 @ W_adapted.T).reshape(x.shape)
        dW = x.reshape(-1, x.shape[-1]).T @ dy2 if weight_grad else None   # fwd: y = x W
        db = dy2.sum(axis=0) if has_bias and bias_grad else None          # fwd: y += b
    else:
        dx, dW, db = linear_backward(dy, base_cache, weight_grad=weight_grad, bias_grad=bias_grad)
        dx += dropout_backward((dh @ A).reshape(dx.shape), drop_cache)   # fwd: h = dropout(x) A^T
    return dx, dA, dB, dW, db
