"""DoRA (Liu et al. 2024): LoRA's update with the length of every weight column split off and trained apart.

A pretrained weight is a magnitude times a direction, column by column: W = ||W||_c * W / ||W||_c. DoRA keeps
the direction's update low-rank, as LoRA does, and trains the magnitude m (one number per output) freely:

    V  = W + s (B A)^T                 (in, out) the adapted direction, unnormalised; W: (in, out) frozen
    W' = m * V / ||V||_c               ||V||_c: (out,) the Euclidean length of each column (over the in axis)
    y  = x W' + b

m starts at ||W||_c and B at zero, so W' = W: the adapted model starts exactly at the pretrained one. The forward
never forms W' for the product: with g = m / ||V||_c it computes, as PEFT does,

    y = x W + b + (g - 1) * (dropout(x) W) + g * s (dropout(x) A^T) B^T

which is g * (x V) + b without dropout (the column scale g commutes with the product). Only the column norms need
V itself: an (in, out) sum of r outer products, cheap next to the (N, in) x (in, out) product.

The gradient through the norm. ||V||_c depends on A and B, so the exact gradient of A and B has a second term
(dora_backward's ``norm_gradient=True``). The paper (section 4.3) suggests treating ||V||_c as a constant in the
backward, which saves that term's memory and time and barely changes training; PEFT does exactly that
(``weight_norm.detach()`` in ``DoraLinearLayer.forward``), and so does minilora by default
(``LoRAConfig.dora_norm_gradient=False``). Both are checked: the exact one against finite differences and torch
autograd, the detached one against torch with the norm detached (as PEFT computes it).
"""
from __future__ import annotations

import sys

from . import backend, functional
from .lora import LoRALinear
from .nn import Parameter

F = backend.Pairs(functional)


def column_norm(V):
    """||V||_c: the Euclidean length of each column of V (in, out), over the in axis -> (out,)."""
    xp = backend.get_array_module(V)
    return xp.sqrt((V * V).sum(axis=0))


def dora_forward(x, W, b, A, B, m, scale, dropout_p=0.0, rng=None):
    """y = x W + b + (g - 1) * (xd W) + g * s (xd A^T) B^T, with g = m / ||W + s (B A)^T||_c and xd = dropout(x).

    x: (..., in); W: (in, out) frozen; b: (out,) or None; A: (r, in); B: (out, r); m: (out,) the magnitude.
    Returns y: (..., out) and the cache for dora_backward.
    """
    xW, base_cache = F.linear_forward(x, W, None)                 # (..., out) the frozen path, bias apart
    xd, drop_cache = F.dropout_forward(x, dropout_p, rng)         # dropout acts on the adapter's input only
    V = W + scale * (A.T @ B.T)                                   # (in, out) the adapted direction
    n = column_norm(V)                                            # (out,) its column lengths
    g = m / n                                                     # (out,) magnitude over length
    xd2 = xd.reshape(-1, x.shape[-1])                             # (N, in)
    h = xd2 @ A.T                                                 # (N, r) down-projection
    update = scale * (h @ B.T)                                    # (N, out) up-projection, scaled
    xdW = xW.reshape(update.shape) if drop_cache is None else xd2 @ W   # (N, out) without dropout xd = x
    y = xW.reshape(update.shape) + (g - 1.0) * xdW + g * update   # (N, out)
    if b is not None:
        y = y + b
    cache = (base_cache, xd2, drop_cache, h, xdW, update, V, n, g, A, B, scale, b is not None)
    return y.reshape(xW.shape), cache


def dora_backward(dy, cache, norm_gradient=False, bias_grad=False):
    """Gradients of dora_forward. dy: (..., out).

    norm_gradient: False treats ||V||_c as a constant (the paper's suggestion, PEFT's choice); True is the exact
    gradient. Returns dx: (..., in), dA: (r, in), dB: (out, r), dm: (out,), db: (out,) or None (unless bias_grad).
    """
    base_cache, xd2, drop_cache, h, xdW, update, V, n, g, A, B, scale, has_bias = cache
    x, W, _ = base_cache
    dy2 = dy.reshape(-1, dy.shape[-1])                            # (N, out)
    db = dy2.sum(axis=0) if bias_grad and has_bias else None      # fwd: y = y + b
    dg = (dy2 * (xdW + update)).sum(axis=0)                       # fwd: y = ... + (g - 1) xdW + g update   (out,)
    dupdate = dy2 * g                                             # fwd: y = ... + g update                 (N, out)
    dB = scale * (dupdate.T @ h)                                  # fwd: update = s h B^T                   (out, r)
    dh = scale * (dupdate @ B)                                    # fwd: update = s h B^T                   (N, r)
    dA = dh.T @ xd2                                               # fwd: h = xd A^T                         (r, in)
    dm = dg / n                                                   # fwd: g = m / n                          (out,)
    if norm_gradient:
        dn = -dg * g / n                                          # fwd: g = m / n                          (out,)
        dV = V * (dn / n)                                         # fwd: n = sqrt(sum_in V^2)               (in, out)
        dA = dA + scale * (B.T @ dV.T)                            # fwd: V = W + s A^T B^T                  (r, in)
        dB = dB + scale * (dV.T @ A.T)                            # fwd: V = W + s A^T B^T                  (out, r)
    if drop_cache is None:                                        # xd = x: both products with W are one
        dx2 = dupdate @ W.T + dh @ A                              # fwd: y = xW + (g - 1) xW + g update; h = x A^T
    else:
        dxd2 = (dy2 * (g - 1.0)) @ W.T + dh @ A                   # fwd: y = ... + (g - 1) xd W; h = xd A^T
        dx2 = dy2 @ W.T + F.dropout_backward(dxd2.reshape(x.shape), drop_cache).reshape(dy2.shape[0], -1)
    return dx2.reshape(x.shape), dA, dB, dm, db


class DoRALinear(LoRALinear):
    """A LoRA layer with DoRA's trained magnitude: lora_A (r, in), lora_B (out, r) and lora_magnitude (out,),
    which starts at the column norms of W (PEFT's ``lora_magnitude_vector``)."""

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False, init="default", rng=None, dropout_rng=None,
                 norm_gradient=False):
        super().__init__(base, r, alpha, dropout, use_rslora, init, rng, dropout_rng)
        self.norm_gradient = bool(norm_gradient)
        self.lora_magnitude = Parameter(column_norm(self.direction()), added_by="dora")
        self.lora_A.added_by = self.lora_B.added_by = "dora"

    def direction(self):
        """V = W + s (B A)^T: (in, out), the adapted weight before its columns are rescaled."""
        return self.weight.data + self.scale * (self.lora_A.data.T @ self.lora_B.data.T)

    def delta_weight(self):
        """W' - W with W' = m * V / ||V||_c: what merging adds to W, in W's (in, out) layout."""
        V = self.direction()
        return V * (self.lora_magnitude.data / column_norm(V)) - self.weight.data

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        if self.merged or self.disabled:
            return super().forward(x)
        p = self.dropout if self.training else 0.0
        y, self._cache = PAIRS.dora_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                                            self.lora_A.data, self.lora_B.data, self.lora_magnitude.data,
                                            self.scale, p, self.dropout_rng)
        return y

    def backward(self, dy):
        if self.merged or self.disabled:
            return super().backward(dy)
        if self.weight.trainable:
            raise RuntimeError("DoRA keeps W frozen: its gradient is not computed (freeze the weight)")
        dx, dA, dB, dm, db = PAIRS.dora_backward(dy, self._pop_cache(), norm_gradient=self.norm_gradient,
                                                 bias_grad=self.bias is not None and self.bias.trainable)
        self.lora_A.accumulate_grad(dA)
        self.lora_B.accumulate_grad(dB)
        self.lora_magnitude.accumulate_grad(dm)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx


PAIRS = backend.Pairs(sys.modules[__name__])   # dora_forward/backward above, or fast versions if registered
