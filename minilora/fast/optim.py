"""The fast path of ``minilora.core.optim.adamw_update``: in place on the CPU (no temporaries for the moments),
one GPU kernel per parameter on CuPy (where eleven array operations would cost eleven kernel launches)."""
from __future__ import annotations

import math

import numpy

from ..core.backend import get_array_module
from . import kernels


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW update of one parameter, in place; the same numbers as the reference up to rounding."""
    xp = get_array_module(param)
    decay = 1.0 - lr * weight_decay
    step_size = lr / (1.0 - beta1 ** step)
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    if xp is not numpy:
        kernel = kernels.elementwise_kernel(
            "T g, float64 decay, float64 b1, float64 b2, float64 step_size, float64 inv_bias2_sqrt, float64 eps",
            "T p, T m, T v", kernels.ADAMW, "minilora_adamw")
        kernel(grad, decay, beta1, beta2, step_size, 1.0 / bias2_sqrt, eps, param, m, v)
        return
    if decay != 1.0:
        param *= decay
    m *= beta1
    m += (1.0 - beta1) * grad
    v *= beta2
    v += (1.0 - beta2) * (grad * grad)
    # torch's form: denom = sqrt(v) / sqrt(1 - b2^t) + eps; p -= lr / (1 - b1^t) * m / denom
    denom = xp.sqrt(v)
    denom *= 1.0 / bias2_sqrt
    denom += eps
    param -= step_size * (m / denom)
