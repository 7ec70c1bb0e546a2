"""Assignment "lora_layer": a LoRA layer (Hu et al. 2021) as a forward/backward pair, plus merge and unmerge.

A frozen linear layer y = x W + b gets a trainable low-rank update:

    y = x W + b + s * (dropout(x) A^T) B^T      W: (in, out) frozen; b: (out,) or None;
                                                A: (r, in), B: (out, r) trainable; s = alpha / r

A and B are in PEFT's layout (A maps in -> r, B maps r -> out), so that the update to W, in W's own (in, out)
layout, is s (B A)^T. Merging adds it to W once, after which the layer costs exactly what the base layer costs.

The linear and dropout layers are given below (the "layers" assignment has you write a linear backward). The
grader calls your lora_forward and then your lora_backward on your own cache, so the cache may hold whatever
your backward needs; the docstring's tuple is a suggestion that works.

Graded items (one function each): lora_forward, lora_backward, merge, unmerge. Grade yourself with

    python lora_layer.py             (or: minilora assignment grade lora_layer lora_layer.py)

Shapes: N rows (all leading axes of x flattened), in / out the layer's sizes, r the rank.
"""
import numpy as np

# ----------------------------------------------------------------------------------------------------
# given: the frozen linear layer and dropout


def linear_forward(x, W, b=None):
    """y = x @ W + b. x: (..., in); W: (in, out); b: (out,) or None. Returns y and the cache (x, W, has_bias)."""
    y = x.reshape(-1, x.shape[-1]) @ W                     # (N, out)
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], W.shape[1]), (x, W, b is not None)


def linear_backward(dy, cache, weight_grad=True, bias_grad=True):
    """dx: (..., in), dW: (in, out) or None when not weight_grad, db: (out,) or None (not bias_grad, no bias)."""
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])                     # (N, out)
    dx = (dy2 @ W.T).reshape(x.shape)
    dW = x.reshape(-1, x.shape[-1]).T @ dy2 if weight_grad else None
    db = dy2.sum(axis=0) if has_bias and bias_grad else None
    return dx, dW, db


def dropout_forward(x, p, rng=None):
    """Zero each element with probability p and scale the rest by 1 / (1 - p); rng: a seeded generator.
    Returns out and the cache: the scaled keep-mask, or None when p == 0 (then out is x)."""
    if p == 0.0:
        return x, None
    mask = (rng.random(x.shape, dtype=x.dtype) >= p).astype(x.dtype) * (1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, cache):
    """dx = dout * scaled mask (dout itself when there was no dropout)."""
    return dout if cache is None else dout * cache


# ----------------------------------------------------------------------------------------------------
# yours: the LoRA layer


def lora_forward(x, W, b, A, B, scale, dropout_p=0.0, rng=None):
    """y = x W + b + scale * (dropout(x) A^T) B^T.

    x: (..., in); W: (in, out); b: (out,) or None; A: (r, in); B: (out, r); scale: the float s;
    dropout_p, rng: dropout on the adapter's input only (use dropout_forward(x, dropout_p, rng) once).
    Returns y: (..., out) and the cache (base_cache, xd, drop_cache, h, A, B, scale):
        base_cache: linear_forward's cache of x W + b; xd: dropout(x), (..., in);
        drop_cache: dropout_forward's cache; h: (N, r) the down-projection xd A^T, xd flattened to N rows.
    """
    # BEGIN SOLUTION
    y, base_cache = linear_forward(x, W, b)                    # (..., out) the frozen path
    xd, drop_cache = dropout_forward(x, dropout_p, rng)        # (..., in)
    h = xd.reshape(-1, x.shape[-1]) @ A.T                      # (N, r) down-projection
    update = scale * (h @ B.T)                                 # (N, out) up-projection, scaled
    y = y + update.reshape(y.shape)
    return y, (base_cache, xd, drop_cache, h, A, B, scale)
    # END SOLUTION


def lora_backward(dy, cache, weight_grad=False, bias_grad=False):
    """Gradients of lora_forward. dy: (..., out).

    Returns dx: (..., in), dA: (r, in), dB: (out, r), dW, db. W and b are frozen: dW and db are None unless
    weight_grad / bias_grad is True (then dW: (in, out), db: (out,), or db None when there is no bias).
    Hint: linear_backward(dy, base_cache, weight_grad=..., bias_grad=...) does the frozen path.
    """
    base_cache, xd, drop_cache, h, A, B, scale = cache
    # BEGIN SOLUTION
    dx, dW, db = linear_backward(dy, base_cache, weight_grad=weight_grad, bias_grad=bias_grad)  # fwd: y = x W + b
    dy2 = dy.reshape(-1, dy.shape[-1])                         # (N, out)
    dB = scale * (dy2.T @ h)                                   # fwd: y += scale * h B^T       (out, r)
    dh = scale * (dy2 @ B)                                     # fwd: y += scale * h B^T       (N, r)
    dA = dh.T @ xd.reshape(-1, xd.shape[-1])                   # fwd: h = xd A^T               (r, in)
    dxd = (dh @ A).reshape(dx.shape)                           # fwd: h = xd A^T               (..., in)
    dx = dx + dropout_backward(dxd, drop_cache)                # fwd: xd = dropout(x); x feeds both paths
    return dx, dA, dB, dW, db
    # END SOLUTION


def merge(W, A, B, scale):
    """The merged weight W + scale * (B A)^T, in W's (in, out) layout.

    W: (in, out); A: (r, in); B: (out, r). Returns a new (in, out) array; W itself is left unchanged.
    """
    # BEGIN SOLUTION
    return W + scale * (B @ A).T
    # END SOLUTION


def unmerge(W_merged, A, B, scale):
    """Undo merge: W_merged - scale * (B A)^T (equal to the original W up to rounding).

    W_merged: (in, out); A: (r, in); B: (out, r). Returns a new (in, out) array; W_merged is left unchanged.
    """
    # BEGIN SOLUTION
    return W_merged - scale * (B @ A).T
    # END SOLUTION


if __name__ == "__main__":
    from minilora.course import format_report, grade

    print(format_report(grade("lora_layer", __file__)))
