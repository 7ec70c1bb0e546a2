"""Optimizers (SGD with momentum, AdamW), global-norm gradient clipping and the warmup + cosine schedule.

Optimizers keep state only for the parameters that were trainable when they were built, and skip any
parameter without a gradient. ``lr`` is a plain attribute: a schedule sets it before each ``step()``.

Parameter groups. An optimizer takes either Parameters (one group) or a list of groups, each a dict

    {"params": [Parameter, ...], "lr_ratio": 1.0, "weight_decay": <the optimizer's>}     (AdamW)
    {"params": [Parameter, ...], "lr_ratio": 1.0}                                         (SGD)

and a group's parameters step with the rate ``lr * lr_ratio``. The ratio is relative on purpose: torch's
groups carry absolute rates (``{"params": ..., "lr": 1e-3}``), which a schedule has to rewrite group by group;
here the one ``lr`` the schedule sets drives every group, and the groups keep their proportions through warmup
and decay (LoRA+ trains B at lambda times A's rate at every step: ``loraplus.loraplus_groups``). A group with
ratio 1 and the optimizer's weight decay computes exactly what the same Parameters without groups compute.
"""
from __future__ import annotations

import math
import sys

from . import backend
from .nn import Parameter

GROUP_KEYS = {"SGD": ("params", "lr_ratio"), "AdamW": ("params", "lr_ratio", "weight_decay")}


def _number(value, what, low_ok):
    """A finite float > 0 (or >= 0 with low_ok) named ``what`` in the error."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not (value >= 0 if low_ok else value > 0):
        raise ValueError(f"{what} must be a finite number {'>= 0' if low_ok else '> 0'}; got {value!r}")
    return float(value)


def param_groups(params, who, weight_decay=None) -> list:
    """The groups of an optimizer's ``params``: [{"params": [trainable Parameters], "lr_ratio": float, ...}].

    params: Parameters (one group, ratio 1) or a list of dicts (see the module's docstring). weight_decay: the
    optimizer's default, filled into groups that do not give their own (None: the optimizer has none). Every
    Parameter may appear once in all the groups together; frozen ones are dropped, as without groups.
    """
    params = [params] if isinstance(params, (Parameter, dict)) else list(params)
    plain = not any(isinstance(g, dict) for g in params)
    if plain:
        groups = [{"params": params}]
    elif all(isinstance(g, dict) for g in params):
        groups = params
    else:
        raise TypeError(f"{who} expects Parameters or a list of parameter groups (dicts), not a mixture; got "
                        f"{[type(g).__name__ for g in params]}")
    allowed = GROUP_KEYS[who]
    out, seen = [], set()
    for i, group in enumerate(groups):
        unknown = sorted(set(group) - set(allowed))
        if unknown:
            hint = (" (a group's rate is relative: lr_ratio multiplies the optimizer's lr, which the schedule "
                    "sets)") if "lr" in unknown else ""
            raise ValueError(f"{who} parameter group {i} has unknown keys {unknown}; expected {list(allowed)}{hint}")
        if "params" not in group:
            raise ValueError(f"{who} parameter group {i} has no 'params'")
        members = group["params"]
        members = [members] if isinstance(members, Parameter) else list(members)
        for p in members:
            if not isinstance(p, Parameter):
                where = "" if plain else f" in parameter group {i}"
                raise TypeError(f"{who} expects Parameters (model.parameters()){where}; got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"{who}: a Parameter of shape {tuple(p.shape)} appears twice (in group {i}); "
                                 "every parameter belongs to one group only")
            seen.add(id(p))
        entry = {"params": [p for p in members if p.trainable],
                 "lr_ratio": _number(group.get("lr_ratio", 1.0), f"{who} parameter group {i}'s lr_ratio", False)}
        if weight_decay is not None:
            entry["weight_decay"] = _number(group.get("weight_decay", weight_decay),
                                            f"{who} parameter group {i}'s weight_decay", True)
        out.append(entry)
    return out


def stepped(groups, lr):
    """(i, p, lr * the group's lr_ratio, group) for every parameter that has a gradient to step with; i is p's
    index in the optimizer's flat params list (and in its velocity or moments)."""
    i = -1
    for group in groups:
        group_lr = lr * group["lr_ratio"]
        for p in group["params"]:
            i += 1
            if p.grad is not None and p.trainable:
                yield i, p, group_lr, group


def _check_lr(lr):
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"learning rate must be a number >= 0; got {lr!r}")
    return float(lr)


class SGD:
    """v = momentum * v + g; p -= lr * lr_ratio * v (plain SGD when momentum = 0).

    params: Parameters, or parameter groups {"params": [...], "lr_ratio": float} (see the module's docstring).
    """

    def __init__(self, params, lr, momentum=0.0):
        self.groups = param_groups(params, "SGD")
        self.params = [p for group in self.groups for p in group["params"]]
        self.lr = _check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        self.momentum = float(momentum)
        self.velocity = [None] * len(self.params)

    def step(self) -> None:
        for i, p, lr, _ in stepped(self.groups, self.lr):
            if self.momentum:
                if self.velocity[i] is None:
                    self.velocity[i] = backend.get_array_module(p.data).zeros_like(p.data)
                v = self.velocity[i]
                v *= self.momentum
                v += p.grad
                p.data -= lr * v
            else:
                p.data -= lr * p.grad

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

    with lr = self.lr * lr_ratio of the parameter's group. params: Parameters, or parameter groups
    {"params": [...], "lr_ratio": float, "weight_decay": float} (see the module's docstring). ``params``, ``m``
    and ``v`` are flat lists in the groups' order (a checkpoint stores the moments by parameter name, so the
    grouping never changes what is saved).
    """

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
        self.groups = param_groups(params, "AdamW", weight_decay=weight_decay)
        self.params = [p for group in self.groups for p in group["params"]]
        self.lr = _check_lr(lr)
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1); got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps!r}")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)
        self.t = 0
        self.m = [None] * len(self.params)
        self.v = [None] * len(self.params)

    def step(self) -> None:
        self.t += 1
        for i, p, lr, group in stepped(self.groups, self.lr):
            if self.m[i] is None:
                self.m[i] = backend.get_array_module(p.data).zeros_like(p.data)
                self.v[i] = backend.get_array_module(p.data).zeros_like(p.data)
            PAIRS.adamw_update(p.data, p.grad, self.m[i], self.v[i], lr, self.betas[0], self.betas[1],
                               self.eps, group["weight_decay"] if p.decay else 0.0, self.t)

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
