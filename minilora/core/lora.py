"""LoRA (Hu et al. 2021): adapt a frozen linear layer W with a trainable low-rank update.

    y = x W + b + s * (dropout(x) A^T) B^T        W: (in, out) frozen;  A: (r, in), B: (out, r) trainable

s = alpha / r (or alpha / sqrt(r) with rsLoRA). B starts at zero, so the adapted model starts exactly at the
pretrained one; only r (in + out) numbers per layer are trained instead of in * out, and W's own gradient,
the largest matrix product of a linear layer's backward, is never computed. Merging folds s * (B A)^T into W,
after which inference costs exactly what the base model costs.

The layout of A and B is PEFT's and loralib's, so adapters move to and from Hugging Face PEFT unchanged
(see ``interop.save_peft_adapter``).
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass

import numpy

from . import backend, functional
from .nn import Linear, Module, Parameter, freeze_pretrained

INITS = ("default", "gaussian", "pissa")
BIAS_MODES = ("none", "all", "lora_only")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

F = backend.Pairs(functional)     # the reference pairs, or their fast versions (see nn.py)

# ----------------------------------------------------------------------------------------------------
# the math: a forward/backward pair


def lora_forward(x, W, b, A, B, scale, dropout_p=0.0, rng=None):
    """y = x W + b + scale * (dropout(x) A^T) B^T: the frozen path and the low-rank path side by side.

    x: (..., in); W: (in, out); b: (out,) or None; A: (r, in); B: (out, r). Returns y: (..., out) and the
    cache (base_cache, xd, drop_cache, h, A, B, scale), h: (N, r) the down-projection. The adapter is never added into W here: that is what merge_lora does, once, for inference.
    """
    y, base_cache = F.linear_forward(x, W, b)                 # (..., out) the frozen path
    xd, drop_cache = F.dropout_forward(x, dropout_p, rng)     # (..., in) dropout acts on the adapter's input only
    h = xd.reshape(-1, x.shape[-1]) @ A.T                     # (N, r) down-projection, xd flattened to N rows
    update = scale * (h @ B.T)                                # (N, out) up-projection, scaled
    y = y + update.reshape(y.shape)
    return y, (base_cache, xd, drop_cache, h, A, B, scale)


def lora_backward(dy, cache, weight_grad=False, bias_grad=False):
    """Gradients of lora_forward. dy: (..., out).

    Returns dx: (..., in), dA: (r, in), dB: (out, r), dW (None unless weight_grad), db (None unless bias_grad).
    """
    base_cache, xd, drop_cache, h, A, B, scale = cache
    dx, dW, db = F.linear_backward(dy, base_cache, weight_grad=weight_grad, bias_grad=bias_grad)  # fwd: y = x W + b
    dy2 = dy.reshape(-1, dy.shape[-1])                        # (N, out)
    xd2 = xd.reshape(-1, xd.shape[-1])                        # (N, in)
    dB = scale * (dy2.T @ h)                                  # fwd: update = s h B^T      (out, r)
    dh = scale * (dy2 @ B)                                    # fwd: update = s h B^T      (N, r)
    dA = dh.T @ xd2                                           # fwd: h = xd A^T            (r, in)
    dxd = (dh @ A).reshape(dx.shape)                          # fwd: h = xd A^T            (..., in)
    dx = dx + F.dropout_backward(dxd, drop_cache)             # fwd: xd = dropout(x)
    return dx, dA, dB, dW, db


# ----------------------------------------------------------------------------------------------------
# the module


def initial_adapter(init: str, r: int, in_features: int, out_features: int, rng):
    """(A (r, in), B (out, r)) as float64 host arrays for the inits that leave W alone; B = 0, so the adapted
    layer starts exactly at the base. init: "default" or "gaussian" (PiSSA needs W: LoRALinear._pissa_init)."""
    if init == "default":           # loralib / PEFT: kaiming-uniform A (bound 1/sqrt(in)), B = 0
        bound = 1.0 / math.sqrt(in_features)
        A = rng.uniform(-bound, bound, size=(r, in_features))
    elif init == "gaussian":        # PEFT's init_lora_weights="gaussian": A ~ N(0, 1/r^2), B = 0
        A = rng.normal(0.0, 1.0 / r, size=(r, in_features))
    else:
        raise ValueError(f"unknown LoRA init {init!r}; expected one of {INITS}")
    return A, numpy.zeros((out_features, r))


class LoRALinear(Linear):
    """A Linear whose weight and bias stay frozen, plus the trainable pair lora_A (r, in), lora_B (out, r).

    It keeps the wrapped layer's own Parameters under the same names (weight, bias), so the base model's
    state_dict names do not change; the adapter adds "<name>.lora_A" and "<name>.lora_B".
    """

    lora_bias = None    # PEFT's lora_bias: a trained bias b_B of the up-projection (out,), or None

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default", rng=None, dropout_rng=None, lora_bias: bool = False):
        in_features, out_features = base.weight.shape
        self.weight = base.weight
        self.bias = base.bias
        self.weight.trainable = False
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = float(dropout)
        self.dropout_rng = dropout_rng
        self.merged = False
        self.disabled = False
        dtype = self.weight.data.dtype
        rng = rng if rng is not None else numpy.random.default_rng(0)
        if init == "pissa":         # PiSSA: the top-r singular directions of W move into A and B
            A, B = self._pissa_init(r)
        else:
            A, B = initial_adapter(init, r, in_features, out_features, rng)
        self.lora_A = Parameter(backend.asarray(A.astype(dtype)), added_by="lora")
        self.lora_B = Parameter(backend.asarray(B.astype(dtype)), added_by="lora")
        if lora_bias:           # zero, as PEFT starts it, so the adapted layer still starts at the base
            self.lora_bias = Parameter(backend.asarray(numpy.zeros(out_features, dtype=dtype)), added_by="lora")
        self.init = init

    def _pissa_init(self, r):
        """A, B from the top-r SVD of W (in PEFT's (out, in) layout), and W replaced by the residual.

        W^T = U S V^T;  A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s);  W <- W - s (B A)^T.
        The starting pair is kept as ``pissa_initial = (A0, B0)`` (float64 host arrays, neither trained nor in
        the state_dict): with it the trained adapter can be rewritten for the original W
        (``pissa_for_original_base``).
        """
        W_out_in = backend.to_numpy(self.weight.data).astype(numpy.float64).T      # (out, in)
        U, S, Vt = numpy.linalg.svd(W_out_in, full_matrices=False)
        root = numpy.sqrt(S[:r] / self.scale)
        A = root[:, None] * Vt[:r]                      # (r, in)
        B = U[:, :r] * root[None, :]                    # (out, r)
        residual = W_out_in - self.scale * (B @ A)
        self.weight.data[...] = backend.asarray(residual.T.astype(self.weight.data.dtype))
        self.pissa_initial = (A.copy(), B.copy())
        return A, B

    def generators(self) -> list:
        return [self.dropout_rng]

    def delta_weight(self):
        """The update the adapter adds to W, in W's (in, out) layout: scale * (B A)^T = scale * A^T B^T."""
        return (self.lora_A.data.T @ self.lora_B.data.T) * self.scale

    def load_refusal(self):
        if self.merged:
            return ("is a merged LoRA layer: its W holds the update, which new weights would silently replace or "
                    "double; unmerge_lora(model) first")
        return None

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        if self.merged or self.disabled:          # merged: W already holds the update; disabled: base output
            return super().forward(x)
        p = self.dropout if self.training else 0.0
        y, self._cache = PAIRS.lora_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                                            self.lora_A.data, self.lora_B.data, self.scale, p, self.dropout_rng)
        if self.lora_bias is not None:            # y = x W + b + s ((xd A^T) B^T + b_B): b_B is inside the scale
            y = y + self.scale * self.lora_bias.data
        return y

    def backward(self, dy):
        if self.merged:
            raise RuntimeError("cannot backpropagate through a merged LoRA layer: unmerge_lora(model) before training")
        if self.disabled:
            return super().backward(dy)
        dx, dA, dB, dW, db = PAIRS.lora_backward(dy, self._pop_cache(), weight_grad=self.weight.trainable,
                                                 bias_grad=self.bias is not None and self.bias.trainable)
        self.lora_A.accumulate_grad(dA)
        self.lora_B.accumulate_grad(dB)
        if self.lora_bias is not None:            # fwd: y = y + s b_B (b_B broadcast over every row)
            self.lora_bias.accumulate_grad(self.scale * dy.reshape(-1, dy.shape[-1]).sum(axis=0))
        if dW is not None:
            self.weight.accumulate_grad(dW)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx


# ----------------------------------------------------------------------------------------------------
# PiSSA: the trained adapter, rewritten for the original weights


def _pissa_start(layer):
    """(A0 (r, in), B0 (out, r)): the pair a PiSSA layer started from; a clear error for any other layer."""
    if getattr(layer, "init", None) != "pissa":
        raise ValueError(f"the layer was initialised with init={getattr(layer, 'init', None)!r}, not 'pissa': "
                         "its weight is the original one already")
    if getattr(layer, "pissa_initial", None) is None:
        raise ValueError("the PiSSA layer has no record of its starting A0, B0 (pissa_initial), so its original "
                         "weight cannot be recovered")
    if layer.merged:
        raise ValueError("the PiSSA layer is merged (its W holds the update): unmerge_lora(model) first")
    return layer.pissa_initial


def pissa_for_original_base(layer):
    """A PiSSA layer's adapter rewritten for the original weight W0: (A' (2r, in), B' (out, 2r)), float64 host
    arrays, used at the layer's own scale s.

    PiSSA moved the top-r part of W0 into the adapter and trains over what is left:
        W0 = W_res + s (B0 A0)^T        (A0, B0: the start, layer.pissa_initial)
    After training, the layer computes with W_res + s (B A)^T. Over W0 instead:
        W_res + s (B A)^T = W0 + s (B A - B0 A0)^T = W0 + s (B' A')^T,
        A' = [A; A0]   (2r, in),      B' = [B, -B0]   (out, 2r),
    because B' A' = B A + (-B0) A0. So a plain rank-2r LoRA at the same scale over the original weights gives the
    trained PiSSA layer's outputs; PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)
    writes the same pair.
    """
    A0, B0 = _pissa_start(layer)
    A = backend.to_numpy(layer.lora_A.data).astype(numpy.float64)          # (r, in)
    B = backend.to_numpy(layer.lora_B.data).astype(numpy.float64)          # (out, r)
    return numpy.concatenate([A, A0], axis=0), numpy.concatenate([B, -B0], axis=1)


def pissa_original_weight(layer):
    """W0 = W_res + s (B0 A0)^T: the weight a PiSSA layer was built from, (in, out) float64 host array (equal to
    it up to the rounding of W_res to the model's dtype)."""
    A0, B0 = _pissa_start(layer)
    W_res = backend.to_numpy(layer.weight.data).astype(numpy.float64)     # (in, out)
    return W_res + layer.scale * (A0.T @ B0.T)


# ----------------------------------------------------------------------------------------------------
# applying LoRA to a model


@dataclass
class LoRAConfig:
    """Which linear layers get adapters and how.

    r: rank; alpha: scale numerator (s = alpha / r, or alpha / sqrt(r) with use_rslora); targets: module-name
    suffixes as PEFT's target_modules (a name matches if it equals a target or ends with "." + target), or
    "all-linear"; dropout: on the adapter's input; init: "default", "gaussian" or "pissa"; bias: which biases
    train, as loralib ("none", "all", "lora_only"); use_dora: DoRA's trained magnitude over the column norm of
    W + s (BA)^T (dora.py); dora_norm_gradient: backpropagate through that norm exactly (True), or treat it as a
    constant as the DoRA paper suggests and PEFT does (False); loraplus_ratio: LoRA+ (Hayou et al. 2024), B
    trains at lambda = loraplus_ratio times the learning rate of A (loraplus.py; None: one rate for all).

    What PEFT's LoRA trains besides (lora_extras.py): a target "wte" (or any Embedding) puts LoRA on the token
    table; lora_bias: a trained bias of each up-projection B; modules_to_save: module-name suffixes (as targets,
    plus "lm_head" for the output head) trained in full copies; trainable_token_indices: token ids whose rows of
    wte train (the tied head reads them too); ensure_weight_tying: with "lm_head" in modules_to_save, one trained
    copy of the table serves the embedding and the head (otherwise a saved lm_head is a new, untied head, and a
    saved wte leaves the head reading the original table, as in PEFT).
    """

    r: int = 8
    alpha: float = 8.0
    targets: tuple = ("q_proj", "v_proj")
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    bias: str = "none"
    use_dora: bool = False
    dora_norm_gradient: bool = False
    loraplus_ratio: float | None = None
    lora_bias: bool = False
    modules_to_save: tuple = ()
    trainable_token_indices: tuple = ()
    ensure_weight_tying: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, numpy.integer)) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an int >= 1; got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be a number > 0; got {self.alpha!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not all(isinstance(t, str) and t for t in self.targets) or not (
                self.targets or self.modules_to_save or self.trainable_token_indices):
            raise ValueError(f"LoRAConfig.targets must be non-empty module-name suffixes (empty only when "
                             f"modules_to_save or trainable_token_indices train something); got {self.targets!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1); got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}; got {self.init!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_MODES}; got {self.bias!r}")
        for flag in ("use_dora", "dora_norm_gradient", "lora_bias", "ensure_weight_tying"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig.{flag} must be True or False; got {getattr(self, flag)!r}")
        if self.dora_norm_gradient and not self.use_dora:
            raise ValueError("LoRAConfig.dora_norm_gradient=True needs use_dora=True: only DoRA has a column norm")
        ratio = self.loraplus_ratio
        if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool)
                                  or not 0 < ratio < math.inf):
            raise ValueError(f"LoRAConfig.loraplus_ratio must be None or a finite number > 0 (lambda = eta_B / "
                             f"eta_A); got {self.loraplus_ratio!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("LoRAConfig.lora_bias=True with use_dora=True is not supported (nor is it by PEFT)")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())
        if not all(isinstance(t, str) and t for t in self.modules_to_save):
            raise ValueError(f"LoRAConfig.modules_to_save must be module-name suffixes; got {self.modules_to_save!r}")
        tokens = tuple(self.trainable_token_indices or ())
        if not all(isinstance(t, (int, numpy.integer)) and not isinstance(t, bool) and t >= 0 for t in tokens) \
                or len(set(tokens)) != len(tokens):
            raise ValueError(f"LoRAConfig.trainable_token_indices must be distinct token ids (ints >= 0); got "
                             f"{self.trainable_token_indices!r}")
        self.trainable_token_indices = tuple(int(t) for t in tokens)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("targets", "modules_to_save", "trainable_token_indices"):
            d[key] = list(getattr(self, key))
        return d


def _matches(name: str, targets) -> bool:
    return any(t == "all-linear" or name == t or name.endswith("." + t) for t in targets)


def linear_modules(model):
    """(name, parent, attribute, module) of every Linear in the model."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent._named_children():
            if isinstance(child, Linear):
                found.append((f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child))
    return found


def lora_modules(model):
    """[(name, LoRALinear)] of a model, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: Module, config: LoRAConfig | None = None, seed: int = 0) -> Module:
    """Freeze the pretrained weights and wrap every target Linear in a LoRALinear (in place); returns the model.

    Validates everything (targets found, rank within each layer's size, LoRA not already applied) before
    changing anything.
    """
    config = config or LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig; got {type(config).__name__}")
    from .lora_extras import apply_extras, extra_modules, plan_extras   # what PEFT trains besides linear LoRA

    if lora_modules(model) or extra_modules(model) or getattr(model, "lm_head", None) is not None:
        raise ValueError("the model already has LoRA adapters: apply_lora twice would stack them; "
                         "start from a fresh model (or unload the adapters) first")
    linears = linear_modules(model)
    chosen = [entry for entry in linears if _matches(entry[0], config.targets)]
    extras = plan_extras(model, config, [name for name, *_ in chosen])
    if not chosen and not extras["embeddings"] and config.targets:
        raise ValueError(f"no Linear module matches targets {list(config.targets)}; available: "
                         f"{sorted({name.split('.')[-1] for name, *_ in linears})} (full names like {linears[0][0]!r})")
    if config.lora_bias and any(getattr(lin, "quantized", False) for *_, lin in chosen):
        raise ValueError("lora_bias=True is not supported on a 4-bit NF4 base (QLoRA)")
    for name, _, _, lin in chosen:
        limit = min(lin.weight.shape)
        if config.r > limit:
            raise ValueError(f"LoRA rank r={config.r} exceeds min(in, out) = {limit} of {name} {tuple(lin.weight.shape)}")
        if getattr(lin, "quantized", False):      # an NF4 base (quant.py): LoRA on it is QLoRA
            from .quant import qlora_refusal
            if qlora_refusal(config):
                raise ValueError(f"{name} is a 4-bit NF4 layer: {qlora_refusal(config)}")
    freeze_pretrained(model)     # adapters, prefixes or prompts added before LoRA stay trainable
    rng = numpy.random.default_rng(seed)
    dropout_rng = backend.rng(seed + 1)
    layer_class, extra = LoRALinear, {}
    if config.use_dora:
        from .dora import DoRALinear       # dora.py builds on this module
        layer_class, extra = DoRALinear, {"norm_gradient": config.dora_norm_gradient}
    for name, parent, attr, lin in chosen:
        if getattr(lin, "quantized", False):
            from .quant import QLoRALinear     # the frozen path dequantises the 4-bit W; the adapter is LoRA's
            wrapped = QLoRALinear(lin, config.r, config.alpha, config.dropout, config.use_rslora, config.init, rng,
                                  dropout_rng)
        else:
            wrapped = layer_class(lin, config.r, config.alpha, config.dropout, config.use_rslora, config.init, rng,
                                  dropout_rng, **extra, **({"lora_bias": True} if config.lora_bias else {}))
        wrapped.training = lin.training
        setattr(parent, attr, wrapped)
    apply_extras(model, config, extras, rng)
    # loralib's bias modes: "all" trains every linear layer's bias, "lora_only" those of the adapted layers
    with_bias = [m for _, m in model.named_modules() if isinstance(m, Linear)] if config.bias == "all" else \
        [m for _, m in lora_modules(model)] if config.bias == "lora_only" else []
    for m in with_bias:
        if m.bias is not None:
            m.bias.trainable = True
    model.lora_config = config
    return model


def parameter_report(model: Module) -> dict:
    """Trainable versus total parameters: {"trainable", "total", "percent"}."""
    total = model.num_parameters()
    trainable = model.num_parameters(trainable_only=True)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


def format_report(model: Module) -> str:
    r = parameter_report(model)
    return f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || trainable%: {r['percent']:.4f}"


# ----------------------------------------------------------------------------------------------------
# merge, unmerge, disable


def merge_lora(model: Module) -> None:
    """Fold every adapter into its weight: W <- W + s (B A)^T. Refused (nothing changes) if any layer is
    already merged or any merged weight would be non-finite."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    if any(m.merged for _, m in layers):
        raise ValueError("the LoRA adapters are already merged; merging twice would add the update twice")
    for name, m in layers:
        if getattr(m, "quantized", False):    # QLoRA (quant.py): the base is 4-bit codes, not a float W
            raise ValueError(f"cannot merge: {name} {m.merge_refusal()}; nothing was merged")
        if m.lora_bias is not None and m.bias is None:
            raise ValueError(f"cannot merge: {name} has a lora_bias but no bias to fold it into; nothing was merged")
    from .lora_extras import LoRAEmbedding, extra_modules
    for name, m in extra_modules(model):
        if isinstance(m, LoRAEmbedding):     # wte: the head reads the original table, so folding would move it
            raise ValueError(f"cannot merge: {name} has LoRA on an embedding table, which merge_lora does not fold "
                             "(into wte it would also move the output head that reads it); nothing was merged")
    merged = []
    for name, m in layers:
        with numpy.errstate(over="ignore", invalid="ignore"):   # non-finite results are reported below
            new = m.weight.data + m.delta_weight()
        if not bool(backend.get_array_module(new).isfinite(new).all()):
            raise ValueError(f"merging {name} would give non-finite weights; nothing was merged")
        merged.append(new)
    for (_, m), new in zip(layers, merged):
        m._weight_before_merge = m.weight.data.copy()
        m.weight.data[...] = new
        if m.lora_bias is not None:          # b <- b + s b_B
            m._bias_before_merge = m.bias.data.copy()
            m.bias.data[...] = m.bias.data + m.scale * m.lora_bias.data
        m.merged = True


def unmerge_lora(model: Module) -> None:
    """Take the adapters back out of the weights, restoring W exactly.

    W - s (B A)^T would give W back only up to rounding (float32: ~1e-7 relative per merge), so the merge
    keeps the weight it replaced and unmerging puts it back bit for bit (one extra copy of each adapted W
    while merged).
    """
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to unmerge")
    if not all(m.merged for _, m in layers):
        raise ValueError("the LoRA adapters are not merged; there is nothing to unmerge")
    for _, m in layers:
        m.weight.data[...] = m.__dict__.pop("_weight_before_merge")
        if "_bias_before_merge" in m.__dict__:
            m.bias.data[...] = m.__dict__.pop("_bias_before_merge")
        m.merged = False


@contextlib.contextmanager
def disable_lora(model: Module):
    """``with disable_lora(model):`` the model computes the base model's output; the adapters stay in place."""
    from .lora_extras import extra_modules

    if any(m.merged for _, m in lora_modules(model)):
        raise ValueError("cannot disable merged adapters: unmerge_lora(model) first")
    layers = lora_modules(model) + extra_modules(model)      # every adapted module, full copies included
    previous = [m.disabled for _, m in layers]
    for _, m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for (_, m), flag in zip(layers, previous):
            m.disabled = flag


PAIRS = backend.Pairs(sys.modules[__name__])   # lora_forward/backward above, or their fast versions
