"""4-bit NormalFloat (NF4) weights and QLoRA (Dettmers et al. 2023): LoRA on a base stored in 4 bits.

Pretrained weights are close to normally distributed, so QLoRA spends its 16 four-bit codes on equal-probability
slices of N(0, 1) rather than on equally spaced numbers. The 16 levels are quantiles of the normal, scaled to
[-1, 1], with an exact zero (so zero padding and zero weights stay zero):

    8 positive levels: Phi^-1 at 8 points evenly spaced from 1 - delta down to 1/2 (the last, 1/2, excluded)
    7 negative levels: -Phi^-1 at 7 points evenly spaced from 1 - delta down to 1/2 (the last excluded)
    levels = sorted(positive + [0] + negative) / max;     delta = 1/2 (1/32 + 1/30)

(delta keeps the outermost quantile finite, Phi^-1(1) being infinite: it is the mean of half a slice of 16 and
of 15 equal-probability slices. 1 - delta = 0.96770833...; bitsandbytes' ``create_normal_map`` uses it rounded
to 0.9677083, and so does minilora, whose levels then equal the published table to float32 precision.)

Blockwise quantisation. W is flattened and cut into blocks of ``block_size`` numbers (64 in the paper); each
block keeps its absmax c (float32) and, per number, the index of the level nearest to w / c:

    code = argmin_k |w / c - level_k|          w ~ level_code * c          (4 bits per number, two per byte)

That is 4 + 32/64 = 4.5 bits per weight. Double quantisation quantises the absmax values themselves: their mean
is subtracted (so they are centred on zero) and they are stored as 8-bit integers in blocks of 256, each block
with a float32 scale: 4 + 8/64 + 32/(64 * 256) ~ 4.127 bits per weight. (The paper stores them as 8-bit floats
through bitsandbytes' dynamic map; minilora uses symmetric 8-bit integers, which cost the same bits and read
more simply.)

The frozen path of a layer computes with the dequantised W and never keeps it: ``nf4_linear_forward``
dequantises, multiplies and forgets W; ``nf4_linear_backward`` dequantises again for dx = dy W^T. W gets no
gradient, and its cache holds no activation at all (the input gradient of x W needs W, not x). QLoRA adds
LoRA's two steps beside it (``qlora_forward``/``qlora_backward``), in the compute dtype of the model: only the
frozen weights are 4-bit. What it saves is memory, not time: without a fused 4-bit kernel each forward and
backward pays for dequantising W.

Merging a LoRA update into a 4-bit base would round it to the nearest of 16 levels per block, erasing most
of it, so ``merge_lora`` refuses a QLoRA model; ``dequantize_base`` turns the base back into float weights
(the dequantised ones, the numbers the adapter was trained on), after which merging works as for LoRA.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy

from . import backend, functional
from .lora import LoRALinear, initial_adapter
from .nn import Linear, Module, Parameter

F = backend.Pairs(functional)

NF4_DELTA = 0.5 * (1 / 32 + 1 / 30)       # 0.0322917: where the outermost quantile sits
NF4_OFFSET = 0.9677083                    # 1 - NF4_DELTA to 7 digits, as bitsandbytes' create_normal_map
ABSMAX_BLOCK = 256                        # the absmax values are double-quantised in blocks of this many

# ----------------------------------------------------------------------------------------------------
# the 16 NF4 levels, derived from the normal distribution

# Acklam's rational approximation of the normal quantile (relative error below 1.2e-9), then refined by Halley
_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
      -3.066479806614716e+01, 2.506628277459239e+00)
_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
      -1.328068155288572e+01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
      4.374664141464968e+00, 2.938163982698783e+00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
_P_LOW = 0.02425


def _polynomial(coefficients, t):
    """c0 t^n + c1 t^(n-1) + ... + cn (Horner)."""
    value = 0.0
    for c in coefficients:
        value = value * t + c
    return value


def normal_cdf(x: float) -> float:
    """Phi(x) = P(Z <= x) for Z ~ N(0, 1), through erfc (accurate in the lower tail too)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """Phi^-1(p): the x with P(Z <= x) = p, for 0 < p < 1, to about 1e-15.

    Acklam's rational approximation (a central piece and the lower tail), then two Halley steps on
    f(x) = Phi(x) - p, whose derivatives are phi(x) and -x phi(x): each step roughly triples the correct digits.
    Above 1/2 it uses Phi^-1(p) = -Phi^-1(1 - p): 1 - p is exact there, while Phi(x) - p near 1 would cancel.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile needs a probability strictly between 0 and 1; got {p!r}")
    if p > 0.5:
        return -normal_quantile(1.0 - p)
    if p < _P_LOW:                                 # lower tail
        q = math.sqrt(-2.0 * math.log(p))
        x = _polynomial(_C, q) / (_polynomial(_D, q) * q + 1.0)
    else:                                          # central region
        q = p - 0.5
        r = q * q
        x = _polynomial(_A, r) * q / (_polynomial(_B, r) * r + 1.0)
    for _ in range(2):
        e = normal_cdf(x) - p                                     # f(x)
        u = e * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)  # f / f' = e / phi(x)
        x = x - u / (1.0 + 0.5 * x * u)                           # Halley: f'' / f' = -x
    return x


def nf4_levels(offset: float = NF4_OFFSET):
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact 0: a float64 NumPy array (16,). offset: the
    highest probability, 1 - delta."""
    positive = [normal_quantile(float(p)) for p in numpy.linspace(offset, 0.5, 9)[:-1]]    # 8 quantiles above 0
    negative = [-normal_quantile(float(p)) for p in numpy.linspace(offset, 0.5, 8)[:-1]]   # 7 below 0
    values = numpy.array(sorted(negative + [0.0] + positive))
    return values / values.max()        # the outermost positive and negative quantiles become exactly 1 and -1


LEVELS = nf4_levels()


# ----------------------------------------------------------------------------------------------------
# blockwise quantisation


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight in NF4: what a quantised layer keeps instead of its float W.

    codes: (n_padded // 2,) uint8, two 4-bit level indices per byte (the first in the high nibble), n_padded =
    the number of weights rounded up to whole blocks; absmax: (n_blocks,) float32, or None with double
    quantisation, which keeps instead absmax_codes: (n_blocks,) int8, absmax_scale: (n_groups,) float32 (one
    per ABSMAX_BLOCK absmax values) and absmax_mean (a float32 number); shape, dtype: of the original W (and
    of the dequantised one); block_size: weights per absmax.

    It is never changed after quantize_nf4 made it, so copies of a model (data-parallel replicas) share it.
    """

    codes: object
    absmax: object
    absmax_codes: object
    absmax_scale: object
    absmax_mean: float
    shape: tuple
    dtype: str
    block_size: int

    @property
    def size(self) -> int:
        """How many weights it stands for (the numbers of W)."""
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def nbytes(self) -> int:
        """Bytes it stores: the codes, and the absmax values (or their 8-bit codes, scales and mean)."""
        if not self.double_quant:
            return int(self.codes.nbytes + self.absmax.nbytes)
        return int(self.codes.nbytes + self.absmax_codes.nbytes + self.absmax_scale.nbytes + 4)

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.nbytes / self.size

    def __deepcopy__(self, memo):
        return self            # immutable: a copy of a model shares its frozen codes, as it shares nothing else


def _check_block_size(block_size):
    if isinstance(block_size, bool) or not isinstance(block_size, (int, numpy.integer)) or block_size < 2 \
            or block_size % 2:
        raise ValueError(f"block_size must be an even int >= 2 (two 4-bit codes share a byte); got {block_size!r}")
    return int(block_size)


def _quantize_absmax(absmax):
    """Double quantisation: absmax (n_blocks,) float32 -> (codes int8 (n_blocks,), scale float32 (n_groups,),
    mean). absmax - mean is cut into blocks of ABSMAX_BLOCK, each stored as round(127 v / its absmax)."""
    xp = backend.get_array_module(absmax)
    n = absmax.shape[0]
    mean = float(numpy.float32(float(absmax.astype(xp.float64).mean())))
    groups = -(-n // ABSMAX_BLOCK)
    centred = xp.zeros(groups * ABSMAX_BLOCK, dtype=xp.float32)
    centred[:n] = absmax - xp.float32(mean)                          # centred on zero: symmetric codes fit
    centred = centred.reshape(groups, ABSMAX_BLOCK)
    scale = xp.abs(centred).max(axis=1)                              # (n_groups,) float32
    safe = xp.where(scale == 0, xp.float32(1), scale)
    codes = xp.rint(centred / safe[:, None] * 127).astype(xp.int8)   # in [-127, 127]
    return codes.reshape(-1)[:n], scale, mean


def _dequantize_absmax(q: NF4Weight):
    """The absmax values as the layer uses them: stored ones, or decoded from their 8-bit codes. (n_blocks,) float32."""
    if not q.double_quant:
        return q.absmax
    xp = backend.get_array_module(q.absmax_codes)
    n = q.absmax_codes.shape[0]
    groups = q.absmax_scale.shape[0]
    codes = xp.zeros(groups * ABSMAX_BLOCK, dtype=xp.float32)
    codes[:n] = q.absmax_codes
    values = codes.reshape(groups, ABSMAX_BLOCK) / xp.float32(127) * q.absmax_scale[:, None]
    return (values.reshape(-1)[:n] + xp.float32(q.absmax_mean)).astype(xp.float32)


def pack_codes(codes):
    """(n,) level indices 0..15 (n even) -> (n // 2,) uint8: the first of each pair in the high nibble."""
    codes = codes.astype(backend.get_array_module(codes).uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed):
    """(n // 2,) uint8 -> (n,) uint8 level indices: the inverse of pack_codes."""
    xp = backend.get_array_module(packed)
    return xp.stack([packed >> 4, packed & 0x0F], axis=1).reshape(-1)


def quantize_nf4(W, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """W (any shape, float) -> NF4Weight: blocks of block_size numbers of the flattened W, each an absmax and the
    nearest NF4 level of every number divided by it. A size that is not a multiple of block_size is padded with
    zeros (dequantize_nf4 trims them)."""
    block_size = _check_block_size(block_size)
    if not backend.is_array(W) or W.dtype.kind != "f":
        raise TypeError(f"quantize_nf4 needs a float array; got {type(W).__name__}"
                        + (f" of dtype {W.dtype}" if backend.is_array(W) else ""))
    xp = backend.get_array_module(W)
    if W.size == 0 or not bool(xp.isfinite(W).all()):
        raise ValueError(f"quantize_nf4 needs a non-empty finite array; got shape {tuple(W.shape)}"
                         + ("" if W.size == 0 else " holding NaN or inf"))
    n = W.size
    n_blocks = -(-n // block_size)
    flat = xp.zeros(n_blocks * block_size, dtype=xp.float64)
    flat[:n] = W.reshape(-1)
    blocks = flat.reshape(n_blocks, block_size)                       # (n_blocks, block_size)
    absmax = xp.abs(blocks).max(axis=1).astype(xp.float32)            # (n_blocks,) as stored
    safe = xp.where(absmax == 0, xp.float32(1), absmax).astype(xp.float64)
    normalised = blocks / safe[:, None]                               # in [-1, 1]
    levels = backend.asarray(LEVELS)
    codes = xp.abs(normalised[..., None] - levels).argmin(axis=-1)    # (n_blocks, block_size) nearest level
    packed = pack_codes(codes.reshape(-1))
    if double_quant:
        absmax_codes, scale, mean = _quantize_absmax(absmax)
        return NF4Weight(packed, None, absmax_codes, scale, mean, tuple(W.shape), str(W.dtype), block_size)
    return NF4Weight(packed, absmax, None, None, 0.0, tuple(W.shape), str(W.dtype), block_size)


def dequantize_nf4(q: NF4Weight, dtype=None):
    """NF4Weight -> W of q.shape in ``dtype`` (q.dtype, the quantised array's, by default): level_code * absmax."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4 needs an NF4Weight (quantize_nf4's result); got {type(q).__name__}")
    dtype = numpy.dtype(q.dtype if dtype is None else dtype)
    if dtype.kind != "f":
        raise ValueError(f"dequantize_nf4 gives floats; got dtype {dtype}")
    codes = unpack_codes(q.codes)                                     # (n_padded,)
    levels = backend.asarray(LEVELS.astype(dtype))
    absmax = _dequantize_absmax(q).astype(dtype)                      # (n_blocks,)
    W = levels[codes].reshape(-1, q.block_size) * absmax[:, None]     # (n_blocks, block_size)
    return W.reshape(-1)[:q.size].reshape(q.shape)


def nf4_bytes(shape, block_size: int = 64, double_quant: bool = False) -> int:
    """Bytes an NF4Weight of this shape stores (the same formula as NF4Weight.nbytes, without quantising)."""
    block_size = _check_block_size(block_size)
    n_blocks = -(-math.prod(shape) // block_size)
    codes = n_blocks * block_size // 2
    if not double_quant:
        return codes + 4 * n_blocks
    return codes + n_blocks + 4 * -(-n_blocks // ABSMAX_BLOCK) + 4


# ----------------------------------------------------------------------------------------------------
# the math: the frozen NF4 linear layer, and LoRA beside it


def nf4_linear_forward(x, q, b=None):
    """y = x W + b with W = dequantize_nf4(q), formed for the product and then dropped.

    x: (..., in); q: NF4Weight of W (in, out); b: (out,) or None. Returns y: (..., out) and the cache (q, has_bias):
    no activation (dx needs W, not x) and no float W.
    """
    W = dequantize_nf4(q)                                  # (in, out)
    x2 = x.reshape(-1, x.shape[-1])                        # (N, in)
    y = x2 @ W                                             # (N, out)
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], W.shape[1]), (q, b is not None)


def nf4_linear_backward(dy, cache, bias_grad=False):
    """Gradients of nf4_linear_forward. dy: (..., out). Returns dx: (..., in) and db: (out,) (None unless
    bias_grad and there is a bias). W is frozen: it has no gradient."""
    q, has_bias = cache
    W = dequantize_nf4(q)                                  # (in, out) the forward's W, made again
    dy2 = dy.reshape(-1, dy.shape[-1])                     # (N, out)
    dx = (dy2 @ W.T).reshape(*dy.shape[:-1], W.shape[0])   # fwd: y = x W
    db = dy2.sum(axis=0) if has_bias and bias_grad else None    # fwd: y = y + b
    return dx, db


def qlora_forward(x, q, b, A, B, scale, dropout_p=0.0, rng=None):
    """y = x W + b + scale * (dropout(x) A^T) B^T with W = dequantize_nf4(q): LoRA on a 4-bit base.

    x: (..., in); q: NF4Weight of W (in, out); b: (out,) or None; A: (r, in); B: (out, r). Returns y: (..., out)
    and the cache (base_cache, xd, drop_cache, h, A, B, scale), h: (N, r) the down-projection.
    """
    y, base_cache = nf4_linear_forward(x, q, b)               # (..., out) the frozen 4-bit path
    xd, drop_cache = F.dropout_forward(x, dropout_p, rng)     # (..., in) dropout acts on the adapter's input only
    h = xd.reshape(-1, x.shape[-1]) @ A.T                     # (N, r) down-projection
    update = scale * (h @ B.T)                                # (N, out) up-projection, scaled
    y = y + update.reshape(y.shape)
    return y, (base_cache, xd, drop_cache, h, A, B, scale)


def qlora_backward(dy, cache, bias_grad=False):
    """Gradients of qlora_forward. dy: (..., out). Returns dx: (..., in), dA: (r, in), dB: (out, r) and db
    (None unless bias_grad)."""
    base_cache, xd, drop_cache, h, A, B, scale = cache
    dx, db = nf4_linear_backward(dy, base_cache, bias_grad)  # fwd: y = x W + b
    dy2 = dy.reshape(-1, dy.shape[-1])                        # (N, out)
    xd2 = xd.reshape(-1, xd.shape[-1])                        # (N, in)
    dB = scale * (dy2.T @ h)                                  # fwd: update = s h B^T      (out, r)
    dh = scale * (dy2 @ B)                                    # fwd: update = s h B^T      (N, r)
    dA = dh.T @ xd2                                           # fwd: h = xd A^T            (r, in)
    dxd = (dh @ A).reshape(dx.shape)                          # fwd: h = xd A^T            (..., in)
    dx = dx + F.dropout_backward(dxd, drop_cache)             # fwd: xd = dropout(x)
    return dx, dA, dB, db


# ----------------------------------------------------------------------------------------------------
# the modules


class NF4Linear(Linear):
    """A Linear whose weight is frozen in NF4: ``weight`` is an NF4Weight (not a Parameter: it never trains and
    is stored packed), ``bias`` stays a float Parameter. num_parameters counts the weight's numbers
    (packed_weights); state_dict holds only the Parameters."""

    quantized = True

    def __init__(self, base: Linear, block_size: int = 64, double_quant: bool = True):
        self.weight = quantize_nf4(base.weight.data, block_size, double_quant)
        self.bias = base.bias
        self.training = base.training

    def packed_weights(self) -> dict:
        return {"weight": self.weight}

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        y, self._cache = PAIRS.nf4_linear_forward(x, self.weight, None if self.bias is None else self.bias.data)
        return y

    def backward(self, dy):
        """dy: (..., out) -> dx: (..., in); the bias's gradient if it trains."""
        bias_grad = self.bias is not None and self.bias.trainable
        dx, db = PAIRS.nf4_linear_backward(dy, self._pop_cache(), bias_grad=bias_grad)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx


class QLoRALinear(LoRALinear):
    """LoRA on an NF4Linear: the frozen 4-bit weight (``weight``, an NF4Weight) and bias, plus the trainable
    lora_A (r, in), lora_B (out, r) in the model's dtype. Names, initialisation and scale are LoRALinear's, so
    adapter files and disable_lora work unchanged; merging is refused (see merge_refusal)."""

    quantized = True

    def __init__(self, base: NF4Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default", rng=None, dropout_rng=None):
        if init not in ("default", "gaussian"):
            raise ValueError(f"LoRA init {init!r} on a 4-bit base: expected 'default' or 'gaussian' "
                             "(PiSSA moves part of W into the adapter, which needs a float W)")
        in_features, out_features = base.weight.shape
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = float(dropout)
        self.dropout_rng = dropout_rng
        self.merged = False
        self.disabled = False
        dtype = base.weight.dtype
        rng = rng if rng is not None else numpy.random.default_rng(0)
        A, B = initial_adapter(init, r, in_features, out_features, rng)
        self.lora_A = Parameter(backend.asarray(A.astype(dtype)), added_by="lora")
        self.lora_B = Parameter(backend.asarray(B.astype(dtype)), added_by="lora")
        self.init = init

    def packed_weights(self) -> dict:
        return {"weight": self.weight}

    def merge_refusal(self):
        return ("is LoRA on a 4-bit NF4 weight: merging would round W + s (BA)^T back to 16 levels per block and "
                "lose most of the update; keep the adapter beside the base, or dequantize_base(model) first")

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        b = None if self.bias is None else self.bias.data
        if self.disabled:                          # the base's output: the frozen 4-bit path alone
            y, self._cache = PAIRS.nf4_linear_forward(x, self.weight, b)
            return y
        p = self.dropout if self.training else 0.0
        y, self._cache = PAIRS.qlora_forward(x, self.weight, b, self.lora_A.data, self.lora_B.data, self.scale,
                                             p, self.dropout_rng)
        return y

    def backward(self, dy):
        bias_grad = self.bias is not None and self.bias.trainable
        if self.disabled:
            dx, db = PAIRS.nf4_linear_backward(dy, self._pop_cache(), bias_grad=bias_grad)
        else:
            dx, dA, dB, db = PAIRS.qlora_backward(dy, self._pop_cache(), bias_grad=bias_grad)
            self.lora_A.accumulate_grad(dA)
            self.lora_B.accumulate_grad(dB)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx


# ----------------------------------------------------------------------------------------------------
# quantising a model


@dataclass
class NF4Config:
    """How quantize_base stores the frozen base: block_size weights per absmax (even), double_quant: the
    absmax values in 8 bits too."""

    block_size: int = 64
    double_quant: bool = True

    def __post_init__(self):
        self.block_size = _check_block_size(self.block_size)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"NF4Config.double_quant must be True or False; got {self.double_quant!r}")


def qlora_refusal(config) -> str | None:
    """Why a LoRAConfig cannot go on an NF4 layer (None: it can). apply_lora asks before changing anything."""
    if getattr(config, "use_dora", False):
        return "DoRA needs the column norms of a float W; QLoRA here is plain LoRA on the 4-bit base"
    if config.init not in ("default", "gaussian"):
        return f"init {config.init!r} changes W, which stays frozen in 4 bits; use 'default' or 'gaussian'"
    return None


def quantize_base(model: Module, block_size: int = 64, double_quant: bool = True) -> Module:
    """Replace every Linear of the pretrained model (the blocks' q, k, v, o, fc and proj) by an NF4Linear, in
    place; returns the model. Embeddings, LayerNorms, biases and the tied output head stay float (as QLoRA: only
    the linear layers' weights are 4-bit).

    Refused before anything changes: a bad block size, a model already quantised, or a Linear that is not a
    plain pretrained one (a LoRA layer: quantise first, then apply_lora).
    """
    from .lora import linear_modules

    block_size = _check_block_size(block_size)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False; got {double_quant!r}")
    chosen = []
    for name, parent, attr, lin in linear_modules(model):
        if getattr(lin, "quantized", False):
            raise ValueError(f"the model is already quantised ({name} is a {type(lin).__name__}); "
                             "quantize_base twice would quantise its codes")
        if isinstance(lin, LoRALinear):
            raise ValueError(f"{name} is a {type(lin).__name__}: quantise the base first, then apply_lora "
                             "(the adapter must be trained on the 4-bit weights it will run with)")
        if type(lin) is not Linear:
            raise ValueError(f"{name} is a {type(lin).__name__}, not a plain Linear: quantize_base works on the "
                             "pretrained model before any method is applied")
        if lin.weight.added_by is None:           # a pretrained weight, not one a method added (a prefix MLP)
            chosen.append((parent, attr, lin))
    if not chosen:
        raise ValueError("the model has no Linear layer to quantise")
    for parent, attr, lin in chosen:
        setattr(parent, attr, NF4Linear(lin, block_size, double_quant))
    model.nf4_config = NF4Config(block_size, double_quant)
    return model


def dequantize_base(model: Module) -> Module:
    """The inverse step for inference: every NF4Linear becomes a float Linear, every QLoRALinear a LoRALinear,
    with W = the dequantised weight (the numbers the adapter was trained with), so merge_lora can fold the update
    into W. The outputs do not change. In place; returns the model."""
    from .lora import linear_modules

    found = [entry for entry in linear_modules(model) if getattr(entry[3], "quantized", False)]
    if not found:
        raise ValueError("the model has no NF4 layers to dequantise")
    for _, parent, attr, layer in found:
        W = Parameter(dequantize_nf4(layer.weight), trainable=False, decay=True)
        if isinstance(layer, QLoRALinear):
            plain = LoRALinear.__new__(LoRALinear)
            plain.__dict__.update({k: v for k, v in vars(layer).items() if not k.startswith("_")})
        else:
            plain = Linear.__new__(Linear)
            plain.bias, plain.training = layer.bias, layer.training
        plain.weight = W
        setattr(parent, attr, plain)
    model.__dict__.pop("nf4_config", None)
    return model


PAIRS = backend.Pairs(sys.modules[__name__])   # the pairs above (no fast versions: the reference is the path)
