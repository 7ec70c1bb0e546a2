"""VeRA (Kopiczko et al. 2024): one frozen random pair shared by every adapted layer, two trained vectors each.

    y = x W + b + lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T)

    A: (r, in_max), B: (out_max, r)   ONE frozen random pair for the whole model, drawn from a seed
    A_s = A[:, :in], B_s = B[:out, :]  each layer's slice of it (views: the pair is held once)
    lambda_d: (r,)    trained, starts at d_initial
    lambda_b: (out,)  trained, starts at 0, so the adapted model starts exactly at the base model

LoRA trains r (in + out) numbers per layer; VeRA trains r + out, however large r is: the rank comes from the
frozen random pair, and the layer only learns how much of each random direction to keep (lambda_d) and how much
of each output to let through (lambda_b). As LoRA's, the update is linear in x, so it merges into W:

    Delta W = (A_s^T diag(lambda_d)) B_s^T diag(lambda_b)      in W's (in, out) layout

The pair is drawn as PEFT draws it (Kaiming-uniform, bound sqrt(6 / fan_in), fan_in = its shape[1]), sized to
the largest input and output over the targets as PEFT's ``_find_dim``, but from NumPy's generator: files for
PEFT carry the pair itself (``save_projection=True``), see ``minilora.io.vera_files``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import numpy

from . import backend, functional
from .lora import LoRALinear, _matches, linear_modules, lora_modules
from .nn import Linear, Module, Parameter, freeze_pretrained

F = backend.Pairs(functional)     # the reference pairs, or their fast versions (see nn.py)

# ----------------------------------------------------------------------------------------------------
# the math: a forward/backward pair


def vera_forward(x, W, b, A, B, lambda_d, lambda_b, dropout_p=0.0, rng=None):
    """y = x W + b + lambda_b * ((lambda_d * (dropout(x) A^T)) B^T).

    x: (..., in); W: (in, out); b: (out,) or None; A: (r, in) and B: (out, r), the layer's slices of the shared
    pair; lambda_d: (r,); lambda_b: (out,). Returns y: (..., out) and the cache (base_cache, xd, drop_cache, h, u,
    A, B, lambda_d, lambda_b), h: (N, r) the random down-projection, u: (N, out) the up-projection before lambda_b.
    """
    y, base_cache = F.linear_forward(x, W, b)                 # (..., out) the frozen path
    xd, drop_cache = F.dropout_forward(x, dropout_p, rng)     # (..., in) dropout acts on the adapter's input only
    h = xd.reshape(-1, x.shape[-1]) @ A.T                     # (N, r) frozen random down-projection
    hd = h * lambda_d                                         # (N, r) each random direction scaled
    u = hd @ B.T                                              # (N, out) frozen random up-projection
    update = u * lambda_b                                     # (N, out) each output scaled
    y = y + update.reshape(y.shape)
    return y, (base_cache, xd, drop_cache, h, u, A, B, lambda_d, lambda_b)


def vera_backward(dy, cache, weight_grad=False, bias_grad=False):
    """Gradients of vera_forward. dy: (..., out).

    Returns dx: (..., in), dlambda_d: (r,), dlambda_b: (out,), dW (None unless weight_grad), db (None unless
    bias_grad). The shared A and B are frozen: they get no gradient.
    """
    base_cache, xd, drop_cache, h, u, A, B, lambda_d, lambda_b = cache
    dx, dW, db = F.linear_backward(dy, base_cache, weight_grad=weight_grad, bias_grad=bias_grad)  # fwd: y = x W + b
    dy2 = dy.reshape(-1, dy.shape[-1])                        # (N, out)
    dlambda_b = (dy2 * u).sum(axis=0)                         # fwd: update = u * lambda_b   (out,)
    du = dy2 * lambda_b                                       # fwd: update = u * lambda_b   (N, out)
    dhd = du @ B                                              # fwd: u = hd B^T              (N, r)
    dlambda_d = (dhd * h).sum(axis=0)                         # fwd: hd = h * lambda_d       (r,)
    dh = dhd * lambda_d                                       # fwd: hd = h * lambda_d       (N, r)
    dxd = (dh @ A).reshape(dx.shape)                          # fwd: h = xd A^T              (..., in)
    dx = dx + F.dropout_backward(dxd, drop_cache)             # fwd: xd = dropout(x)
    return dx, dlambda_d, dlambda_b, dW, db


# ----------------------------------------------------------------------------------------------------
# the shared random pair


def projection(r: int, in_max: int, out_max: int, seed: int):
    """The shared pair as float64 host arrays: A (r, in_max), B (out_max, r), Kaiming-uniform as PEFT's
    ``_kaiming_init`` (bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]), drawn A first from
    ``numpy.random.default_rng(seed)``: the same seed and shapes give the same bits everywhere."""
    rng = numpy.random.default_rng(seed)
    bound_A = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(in_max)
    A = rng.uniform(-bound_A, bound_A, size=(r, in_max))
    bound_B = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(r)
    B = rng.uniform(-bound_B, bound_B, size=(out_max, r))
    return A, B


# ----------------------------------------------------------------------------------------------------
# the module


def _no_lora_pair(name):
    def refuse(self):
        raise ValueError(f"a VeRA layer has no {name}: its update is lambda_b * B_s diag(lambda_d) A_s over a frozen "
                         "pair shared by every layer, so this LoRA-only operation does not apply; VeRA's files are "
                         "minilora.io.vera_files.save_vera / save_peft_vera")
    return property(refuse)


class VeRALinear(LoRALinear):
    """A Linear whose weight and bias stay frozen, plus VeRA's trainable vectors lambda_d (r,) and lambda_b (out,)
    over the model's shared frozen pair.

    It keeps the wrapped layer's Parameters under the same names (weight, bias) and adds "<name>.vera_lambda_d"
    and "<name>.vera_lambda_b". The shared pair (vera_A, vera_B: Parameters of the model, frozen, counted once)
    is held here under private names, so it is neither a parameter of this layer nor copied: every forward
    slices views of the one pair. A LoRALinear as far as merge_lora, unmerge_lora and disable_lora go
    (delta_weight, merged, disabled); it has no lora_A / lora_B, and LoRA-only code that asks for them gets a
    ValueError saying so.
    """

    lora_A = _no_lora_pair("lora_A")
    lora_B = _no_lora_pair("lora_B")
    scale = _no_lora_pair("LoRA scale")

    def __init__(self, base: Linear, vera_A: Parameter, vera_B: Parameter, d_initial: float = 0.1,
                 dropout: float = 0.0, dropout_rng=None):
        in_features, out_features = base.weight.shape
        r = vera_A.shape[0]
        if vera_A.shape[1] < in_features or vera_B.shape[0] < out_features or vera_B.shape[1] != r:
            raise ValueError(f"the shared pair A {tuple(vera_A.shape)}, B {tuple(vera_B.shape)} cannot be sliced for "
                             f"a layer of W {tuple(base.weight.shape)}: it needs A (r, >= {in_features}) and "
                             f"B (>= {out_features}, r)")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.trainable = False
        self.r = int(r)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dropout = float(dropout)
        self.dropout_rng = dropout_rng
        self.merged = False
        self.disabled = False
        self.init = "vera"
        dtype = self.weight.data.dtype
        self._vera_A, self._vera_B = vera_A, vera_B           # private: the model owns the pair, once
        xp = backend.get_array_module(self.weight.data)
        self.vera_lambda_d = Parameter(xp.full((self.r,), d_initial, dtype=dtype), added_by="vera")
        self.vera_lambda_b = Parameter(xp.zeros((self.out_features,), dtype=dtype), added_by="vera")

    def sliced_pair(self):
        """(A_s, B_s): views of the shared pair, A[:, :in] (r, in) and B[:out, :] (out, r)."""
        return self._vera_A.data[:, :self.in_features], self._vera_B.data[:self.out_features, :]

    def delta_weight(self):
        """The update VeRA adds to W, in W's (in, out) layout: (A_s^T diag(lambda_d)) B_s^T diag(lambda_b)."""
        A, B = self.sliced_pair()
        return ((A.T * self.vera_lambda_d.data) @ B.T) * self.vera_lambda_b.data      # (in, r) (r, out) -> (in, out)

    def load_refusal(self):
        if self.merged:
            return ("is a merged VeRA layer: its W holds the update, which new weights would silently replace or "
                    "double; unmerge_lora(model) first")
        return None

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        if self.merged or self.disabled:          # merged: W already holds the update; disabled: base output
            return Linear.forward(self, x)
        p = self.dropout if self.training else 0.0
        A, B = self.sliced_pair()
        y, self._cache = PAIRS.vera_forward(x, self.weight.data, None if self.bias is None else self.bias.data, A, B,
                                            self.vera_lambda_d.data, self.vera_lambda_b.data, p, self.dropout_rng)
        return y

    def backward(self, dy):
        if self.merged:
            raise RuntimeError("cannot backpropagate through a merged VeRA layer: unmerge_lora(model) before training")
        if self.disabled:
            return Linear.backward(self, dy)
        dx, dlambda_d, dlambda_b, dW, db = PAIRS.vera_backward(
            dy, self._pop_cache(), weight_grad=self.weight.trainable,
            bias_grad=self.bias is not None and self.bias.trainable)
        self.vera_lambda_d.accumulate_grad(dlambda_d)
        self.vera_lambda_b.accumulate_grad(dlambda_b)
        if dW is not None:
            self.weight.accumulate_grad(dW)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx


# ----------------------------------------------------------------------------------------------------
# applying VeRA to a model


def _is_count(value) -> bool:
    return isinstance(value, (int, numpy.integer)) and not isinstance(value, bool)


@dataclass
class VeRAConfig:
    """Which linear layers get VeRA and how (PEFT's VeraConfig, minus what minilora's models do not need).

    r: the rank of the shared random pair (no limit by the layers' sizes: a larger r gives more random
    directions to choose from, at r trained numbers per layer); targets: module-name suffixes as LoRAConfig's,
    or "all-linear"; d_initial: the starting value of every lambda_d; dropout: on the adapter's input;
    projection_seed: the seed the shared pair is drawn from (PEFT's projection_prng_key).
    """

    r: int = 256
    targets: tuple = ("q_proj", "v_proj")
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0

    def __post_init__(self):
        if not _is_count(self.r) or self.r < 1:
            raise ValueError(f"VeRAConfig.r must be an int >= 1; got {self.r!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not isinstance(self.targets, (tuple, list)):
            raise ValueError(f"VeRAConfig.targets must be module-name suffixes (a tuple of str); got {self.targets!r}")
        self.targets = tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"VeRAConfig.targets must be non-empty module-name suffixes; got {self.targets!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) \
                or not math.isfinite(self.d_initial):
            raise ValueError(f"VeRAConfig.d_initial must be a finite number; got {self.d_initial!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VeRAConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if not _is_count(self.projection_seed) or self.projection_seed < 0:
            raise ValueError(f"VeRAConfig.projection_seed must be an int >= 0; got {self.projection_seed!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def vera_modules(model):
    """[(name, VeRALinear)] of a model, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, VeRALinear)]


def _targets(model, config):
    linears = linear_modules(model)
    chosen = [entry for entry in linears if _matches(entry[0], config.targets)]
    if not chosen:
        raise ValueError(f"no Linear module matches targets {list(config.targets)}; available: "
                         f"{sorted({name.split('.')[-1] for name, *_ in linears})} (full names like {linears[0][0]!r})")
    return chosen


def projection_shape(model, config) -> tuple:
    """(in_max, out_max): the largest input and output width over the layers ``config`` targets (PEFT's _find_dim)."""
    chosen = _targets(model, config)
    return (max(lin.weight.shape[0] for *_, lin in chosen), max(lin.weight.shape[1] for *_, lin in chosen))


def apply_vera(model: Module, config: VeRAConfig | None = None, seed: int = 0) -> Module:
    """Freeze the pretrained weights, draw the shared pair (model.vera_A, model.vera_B: frozen Parameters, held
    once) and wrap every target Linear in a VeRALinear (in place); returns the model.

    seed: the dropout masks' generator (the pair comes from config.projection_seed, the vectors start at fixed
    values). Validates everything before changing anything.
    """
    config = config or VeRAConfig()
    if not isinstance(config, VeRAConfig):
        raise TypeError(f"config must be a VeRAConfig; got {type(config).__name__}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA or VeRA layers: adapting them again would stack two updates; "
                         "start from a fresh model first")
    if "vera_A" in vars(model) or "vera_B" in vars(model):
        raise ValueError("the model already holds a VeRA pair (vera_A, vera_B); start from a fresh model first")
    chosen = _targets(model, config)
    in_max, out_max = projection_shape(model, config)
    dtype = chosen[0][3].weight.data.dtype
    A, B = projection(config.r, in_max, out_max, config.projection_seed)
    freeze_pretrained(model)     # adapters, prefixes or prompts added before VeRA stay trainable
    model.vera_A = Parameter(backend.asarray(A.astype(dtype)), trainable=False, added_by="vera")
    model.vera_B = Parameter(backend.asarray(B.astype(dtype)), trainable=False, added_by="vera")
    dropout_rng = backend.rng(seed + 1)
    for name, parent, attr, lin in chosen:
        wrapped = VeRALinear(lin, model.vera_A, model.vera_B, config.d_initial, config.dropout, dropout_rng)
        wrapped.training = lin.training
        setattr(parent, attr, wrapped)
    model.vera_config = config
    return model


# ----------------------------------------------------------------------------------------------------
# what VeRA costs, against LoRA


def vera_parameter_count(model: Module, config: VeRAConfig | None = None) -> dict:
    """What VeRA would add to ``model`` (left unchanged): {"trainable": sum over targets of r + out,
    "projection": r (in_max + out_max), the frozen shared pair, held once}."""
    config = config or VeRAConfig()
    chosen = _targets(model, config)
    in_max, out_max = projection_shape(model, config)
    return {"trainable": sum(config.r + lin.weight.shape[1] for *_, lin in chosen),
            "projection": config.r * (in_max + out_max)}


def parameter_counts(model: Module, lora_config, vera_config: VeRAConfig | None = None) -> dict:
    """Trainable numbers of LoRA (r (in + out) per target) and of VeRA (r + out per target) on ``model`` (left
    unchanged), and VeRA's frozen shared pair: {"lora", "vera", "vera_projection"}; e.g.
    ``"LoRA r=4 on q,v: {lora:,}; VeRA r=256: {vera:,}"``."""
    lora_layers = _targets(model, lora_config)
    vera = vera_parameter_count(model, vera_config)
    return {"lora": sum(lora_config.r * (lin.weight.shape[0] + lin.weight.shape[1]) for *_, lin in lora_layers),
            "vera": vera["trainable"], "vera_projection": vera["projection"]}


PAIRS = backend.Pairs(sys.modules[__name__])   # vera_forward/backward above, or their fast versions
