"""GPU kernels of the fast path: one CuPy ``ElementwiseKernel`` per per-element formula.

At minilora's sizes a GPU step is bound by kernel launches (each costs microseconds of Python and driver
work), so a formula of ten array operations costs ten launches where one kernel costs one. Only code that
runs on CuPy arrays calls these; the reference formulas they implement are in ``minilora.core``.
"""
from __future__ import annotations

from ..core import backend

_kernels = {}


def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str):
    """A CuPy ``ElementwiseKernel``, made once per name and compiled on its first call. Called with arrays (and
    scalars) it returns the output array(s).

    in_params / out_params: "T g, float64 lr" / "T p, T m" (T: the arrays' dtype); operation: the CUDA C
    statement(s) for one element.
    """
    if name not in _kernels:
        cupy = backend._import_cupy()
        _kernels[name] = cupy.ElementwiseKernel(in_params, out_params, operation, name)
    return _kernels[name]


# GELU (tanh approximation): out = 0.5 x (1 + t), t = tanh(k (x + c x^3)), and its derivative
GELU_FORWARD = "t = tanh(x * ((T)k + (T)ck * (x * x)));  out = (T)0.5 * x * ((T)1 + t);"
GELU_BACKWARD = """
    T du = (T)k + (T)three_ck * (x * x);
    T a = (t * t - (T)1) * x * du;
    dx = (T)0.5 * ((T)1 + t - a) * dout;
"""

# LayerNorm: rstd = 1 / sqrt(var + eps); xhat = (x - mean) rstd, out = xhat w + b; and its input gradient
LAYERNORM_RSTD = "rstd = (T)1 / sqrt(sum_sq * (T)inv_c + (T)eps);"
LAYERNORM_OUT = "xhat = centred * rstd;  out = xhat * w + b;"
LAYERNORM_BACKWARD = "dx = rstd * (dout * w - (T)inv_c * sum_dxhat - xhat * ((T)inv_c * sum_dxhat_xhat));"

# AdamW's update of one parameter (the formula of core.optim.adamw_update, per element)
ADAMW = """
    p = p * (T)decay;                                                   // p -= lr * weight_decay * p
    m = (T)b1 * m + (T)(1.0 - b1) * g;                                  // m = b1 m + (1 - b1) g
    v = (T)b2 * v + (T)(1.0 - b2) * (g * g);                            // v = b2 v + (1 - b2) g^2
    p = p - (T)step_size * (m / (sqrt(v) * (T)inv_bias2_sqrt + (T)eps));
"""
