"""Optimizers (SGD with momentum, AdamW), global-norm gradient clipping and the warmup + cosine schedule.

Optimizers keep state only for the parameters that were trainable when they were built, and skip any
parameter without a gradient. ``lr`` is a plain attribute: a schedule sets it before each ``step()``.
"""
from __future__ import annotations

import math
import sys

from . import backend
from .nn import Parameter


def _trainable(params, who):
    params = list(params)
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"{who} expects Parameters (model.parameters()); got {type(p).__name__}")
    return [p for p in params if p.trainable]


def _check_lr(lr):
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"learning rate must be a number >= 0; got {lr!r}")
    return float(lr)


class SGD:
    """v = momentum * v + g; p -= lr * v (plain SGD when momentum = 0)."""

    def __init__(self, params, lr, momentum=0.0):
        self.params = _trainable(params, "SGD")
        self.lr = _check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        self.momentum = float(momentum)
        self.velocity = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None or not p.trainable:
                continue
            if self.momentum:
                if self.velocity[i] is None:
                    self.velocity[i] = backend.get_array_module(p.data).zeros_like(p.data)
                v = self.velocity[i]
                v *= self.momentum
                v += p.grad
                p.data -= self.lr * v
            else:
                p.data -= self.lr * p.grad

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW update of one parameter, in place (param, m and v are changed; nothing is returned).

    param, grad, m, v: arrays of one shape (m, v: the running first and second moments); step: t >= 1, the
    number of updates so far including this one; weight_decay: 0 for a parameter that is not decayed.
    """
    param[...] = param * (1.0 - lr * weight_decay)             # decoupled weight decay: not part of the gradient
    m[...] = beta1 * m + (1.0 - beta1) * grad                  # first moment: a running mean of g
    v[...] = beta2 * v + (1.0 - beta2) * grad ** 2             # second moment: a running mean of g^2
    m_hat = m / (1.0 - beta1 ** step)                          # bias corrections: both start at 0
    v_hat = v / (1.0 - beta2 ** step)
    param[...] = param - lr * m_hat / (backend.get_array_module(v).sqrt(v_hat) + eps)


class AdamW:
    """Adam with decoupled weight decay (Loshchilov and Hutter), as torch.optim.AdamW.

    p -= lr * weight_decay * p            (only parameters with p.decay: matrices, not biases/LayerNorm/embeddings)
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        self.params = _trainable(params, "AdamW")
        self.lr = _check_lr(lr)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1); got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)
        self.t = 0
        self.m = [None] * len(self.params)
        self.v = [None] * len(self.params)

    def step(self) -> None:
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None or not p.trainable:
                continue
            if self.m[i] is None:
                self.m[i] = backend.get_array_module(p.data).zeros_like(p.data)
                self.v[i] = backend.get_array_module(p.data).zeros_like(p.data)
            PAIRS.adamw_update(p.data, p.grad, self.m[i], self.v[i], self.lr, self.betas[0], self.betas[1],
                               self.eps, self.weight_decay if p.decay else 0.0, self.t)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most max_norm; return the norm before."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0; got {max_norm!r}")
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= scale
    return total


def cosine_schedule(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to max_lr, then cosine decay to min_lr at total_steps."""
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1; got {warmup_steps}, {total_steps}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


PAIRS = backend.Pairs(sys.modules[__name__])   # adamw_update above, or its fast version
