"""Adapters (Houlsby et al. 2019): a small trainable bottleneck inserted after each sublayer of a frozen model.

    out = h + gelu(h W_down + b_down) W_up + b_up        h: (..., C);  W_down: (C, m);  W_up: (m, C);  m << C

The bottleneck projects the sublayer's output down to m numbers, applies a nonlinearity, projects back up and
adds the result to its own input. W_up starts at zero, so every adapter starts as the identity and the adapted
model starts exactly at the pretrained one. Each adapter trains 2 C m + m + C numbers.

Where they sit: Houlsby put one adapter after the attention sublayer and one after the feed-forward
sublayer, on the sublayer's output after its dropout and before the residual addition. In minilora's Block
those outputs leave through ``attn.resid_drop`` and ``mlp.drop``, so an adapter module takes the place of each
of those two dropout modules: it applies the same dropout, then the bottleneck. No model code changes, and
LoRA on any projection still composes with it.

The cost the LoRA paper points at: the adapters' small matrix products run in sequence after the sublayer,
so they add inference latency that cannot be merged away (most visible at batch size 1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

from . import backend, functional
from .nn import Dropout, Module, Parameter, freeze_pretrained, zeros

# where adapters go: the dropout modules that carry each sublayer's output to the residual addition
PLACES = {"attn": "attn.resid_drop", "mlp": "mlp.drop"}

F = backend.Pairs(functional)     # the reference pairs, or their fast versions (see nn.py)


# ----------------------------------------------------------------------------------------------------
# the math: a forward/backward pair


def adapter_forward(h, W_down, b_down, W_up, b_up):
    """out = h + gelu(h W_down + b_down) W_up + b_up.

    h: (..., C); W_down: (C, m); b_down: (m,); W_up: (m, C); b_up: (C,). Returns out: (..., C) and the cache.
    """
    z, down_cache = F.linear_forward(h, W_down, b_down)     # (..., m) down-projection
    a, gelu_cache = F.gelu_forward(z)                       # (..., m) nonlinearity
    out, up_cache = F.linear_forward(a, W_up, b_up)         # (..., C) up-projection
    out = out + h                                           # the adapter's own skip connection
    return out, (down_cache, gelu_cache, up_cache)


def adapter_backward(dout, cache, param_grad=True):
    """Gradients of adapter_forward. dout: (..., C).

    Returns dh: (..., C) and dW_down, db_down, dW_up, db_up (all None when param_grad is False: a frozen
    adapter still passes the gradient through).
    """
    down_cache, gelu_cache, up_cache = cache
    da, dW_up, db_up = F.linear_backward(dout, up_cache, weight_grad=param_grad, bias_grad=param_grad)  # fwd: out = a W_up + b_up + h
    dz = F.gelu_backward(da, gelu_cache)                                                              # fwd: a = gelu(z)
    dh, dW_down, db_down = F.linear_backward(dz, down_cache, weight_grad=param_grad, bias_grad=param_grad)  # fwd: z = h W_down + b_down
    dh = dh + dout                                                                                     # fwd: out = out + h
    return dh, dW_down, db_down, dW_up, db_up


# ----------------------------------------------------------------------------------------------------
# the module


class DropoutAndAdapter(Module):
    """A sublayer's output dropout followed by an adapter: out = adapter(dropout(x)).

    It takes the place of a Dropout module of the model and holds that module unchanged (``drop``), so the
    model computes what it computed before plus the adapter. Parameters: adapter_down (C, m),
    adapter_down_bias (m,), adapter_up (m, C) (zero at the start), adapter_up_bias (C,).
    """

    def __init__(self, dropout: Dropout, n_embd: int, bottleneck: int, rng, dtype):
        self.drop = dropout
        self.training = dropout.training
        bound = 1.0 / math.sqrt(n_embd)          # as a fresh nn.Linear (and LoRA's A): uniform(-1/sqrt(C), 1/sqrt(C))
        self.adapter_down = Parameter(backend.asarray(rng.uniform(-bound, bound, (n_embd, bottleneck)).astype(dtype)),
                                      decay=True, added_by="adapters")
        self.adapter_down_bias = Parameter(zeros((bottleneck,), dtype), added_by="adapters")
        self.adapter_up = Parameter(zeros((bottleneck, n_embd), dtype), decay=True,   # zero: starts as the identity
                                    added_by="adapters")
        self.adapter_up_bias = Parameter(zeros((n_embd,), dtype), added_by="adapters")

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        h = self.drop.forward(x)
        out, self._cache = adapter_forward(h, self.adapter_down.data, self.adapter_down_bias.data,
                                           self.adapter_up.data, self.adapter_up_bias.data)
        return out

    def backward(self, dout):
        dh, dW_down, db_down, dW_up, db_up = adapter_backward(dout, self._pop_cache(),
                                                              param_grad=self.adapter_down.trainable)
        for p, g in ((self.adapter_down, dW_down), (self.adapter_down_bias, db_down), (self.adapter_up, dW_up),
                     (self.adapter_up_bias, db_up)):
            if g is not None:
                p.accumulate_grad(g)
        return self.drop.backward(dh)                 # fwd: h = dropout(x)


# ----------------------------------------------------------------------------------------------------
# applying adapters to a model


@dataclass
class AdapterConfig:
    """bottleneck: m, the adapter's inner width; places: after which sublayers ("attn", "mlp" or both, as
    Houlsby); train_layernorm: also train every LayerNorm's weight and bias (Houlsby did)."""

    bottleneck: int = 4
    places: tuple = ("attn", "mlp")
    train_layernorm: bool = False

    def __post_init__(self):
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, (int, numpy.integer)) or self.bottleneck < 1:
            raise ValueError(f"AdapterConfig.bottleneck must be an int >= 1; got {self.bottleneck!r}")
        if isinstance(self.places, str):
            self.places = (self.places,)
        self.places = tuple(self.places)
        unknown = [p for p in self.places if p not in PLACES]
        if not self.places or unknown:
            raise ValueError(f"AdapterConfig.places must be a non-empty subset of {tuple(PLACES)}; got {self.places!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["places"] = list(self.places)
        return d


def adapter_modules(model):
    """[(name, DropoutAndAdapter)] of a model, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DropoutAndAdapter)]


def apply_adapters(model: Module, config: AdapterConfig | None = None, seed: int = 0) -> Module:
    """Freeze the pretrained weights and insert an adapter after the chosen sublayers of every block (in
    place); returns the model. The model must have blocks ``model.h`` with ``attn.resid_drop``/``mlp.drop``."""
    config = config or AdapterConfig()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig; got {type(config).__name__}")
    if adapter_modules(model):
        raise ValueError("the model already has adapters: applying them twice would stack them")
    n_embd = model.config.n_embd
    if config.bottleneck > n_embd:
        raise ValueError(f"AdapterConfig.bottleneck {config.bottleneck} exceeds n_embd {n_embd}: "
                         "a bottleneck is narrower than the layer it adapts")
    freeze_pretrained(model)
    rng = numpy.random.default_rng(seed)
    for block in model.h:
        for place in config.places:
            sublayer_name, drop_name = PLACES[place].split(".")
            sublayer = getattr(block, sublayer_name)
            drop = getattr(sublayer, drop_name)
            setattr(sublayer, drop_name, DropoutAndAdapter(drop, n_embd, config.bottleneck, rng, model.dtype))
    if config.train_layernorm:
        for name, p in model.named_parameters():
            if ".ln_" in f".{name}":
                p.trainable = True
    model.adapter_config = config
    return model


def adapter_parameter_count(config: AdapterConfig, n_layer: int, n_embd: int) -> int:
    """Trainable numbers the adapters add: (2 C m + m + C) per adapter, one per place per block."""
    m = config.bottleneck
    return (2 * n_embd * m + m + n_embd) * len(config.places) * n_layer
