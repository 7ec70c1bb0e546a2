"""GPT-2, small enough to read: learned positions, pre-LayerNorm blocks, tied input/output embeddings.

    logits = ln_f(blocks(drop(wte[idx] + wpe[pos]))) @ wte^T

Initialisation as GPT-2: weights N(0, 0.02^2), the residual projections (attention o_proj and MLP proj)
N(0, (0.02 / sqrt(2 n_layer))^2), biases zero, LayerNorm weight one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

from . import backend, functional
from .nn import Block, CausalSelfAttention, Dropout, Embedding, LayerNorm, Module, ModuleList, Unfilled

F = backend.Pairs(functional)     # the reference pairs, or their fast versions (see nn.py)


@dataclass
class GPTConfig:
    """The architecture. The defaults are minilora's tiny GPT (about 0.8M parameters)."""

    vocab_size: int = 96
    block_size: int = 128       # longest sequence (number of learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)):
                raise TypeError(f"GPTConfig.{name} must be an int; got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1; got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a float in [0, 1); got {self.dropout!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be > 0; got {self.layer_norm_epsilon!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class GPT(Module):
    """The GPT-2 language model. ``forward(idx)`` -> logits; ``backward(dlogits)`` accumulates gradients."""

    lm_head = None      # None: the head is tied to wte's table; an adapter may set its own (lora_extras.py)

    def __init__(self, config: GPTConfig, seed: int = 0, dtype="float32"):
        # a host generator: identical weights on NumPy and CuPy
        self._build(config, seed, dtype, numpy.random.default_rng(seed))

    @classmethod
    def _unfilled(cls, config: GPTConfig, dtype="float32") -> "GPT":
        """A GPT(config, seed=0, dtype) whose drawn weights are zeros instead: for a loader that overwrites every
        weight, so that building the model costs no random numbers and no temporaries."""
        model = cls.__new__(cls)
        model._build(config, 0, dtype, Unfilled())
        return model

    def _build(self, config, seed, dtype, init_rng):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig; got {type(config).__name__}")
        self.config = config
        self.dtype = backend.resolve_dtype(dtype)
        self.dropout_rng = backend.rng(seed + 1)      # masks are drawn where the arrays live
        c = config
        proj_std = 0.02 / math.sqrt(2 * c.n_layer)    # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
        self.wte = Embedding(c.vocab_size, c.n_embd, rng=init_rng, dtype=self.dtype)
        self.wpe = Embedding(c.block_size, c.n_embd, rng=init_rng, dtype=self.dtype)
        self.drop = Dropout(c.dropout, self.dropout_rng)
        self.h = ModuleList(
            Block(c.n_embd, c.n_head, c.dropout, c.layer_norm_epsilon, 0.02, proj_std, init_rng,
                  self.dropout_rng, self.dtype)
            for _ in range(c.n_layer)
        )
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon, self.dtype)

    def generators(self) -> list:
        return [self.dropout_rng]

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability everywhere (embeddings, attention, residual paths)."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1); got {p!r}")
        self.config.dropout = float(p)
        for _, module in self.named_modules():
            if isinstance(module, Dropout):
                module.p = float(p)
            elif isinstance(module, CausalSelfAttention):
                module.attn_dropout = float(p)

    # ------------------------------------------------------------------------------------------------
    def _check_idx(self, idx):
        """Validate token ids at the public boundary, before any computation."""
        idx = _integer_array(idx, "idx must be an integer array of shape (B, T)", "idx must hold integer token ids")
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (B, T) (2 dimensions); got {idx.ndim} dimensions, shape {tuple(idx.shape)}")
        B, T = idx.shape
        if B < 1 or T < 1:
            raise ValueError(f"idx must have at least one sequence and one token; got shape {tuple(idx.shape)}")
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range: ids must be in [0, {self.config.vocab_size - 1}]")
        return backend.asarray(idx)

    def forward(self, idx):
        """idx: integer array (B, T), T <= block_size -> logits (B, T, vocab_size)."""
        idx = self._check_idx(idx)
        B, T = idx.shape
        xp = backend.get_array_module(idx)
        x = self.wte.forward(idx) + self.wpe.forward(xp.arange(T))    # (B, T, C) + (T, C)
        x = self.drop.forward(x)
        for block in self.h:
            x = block.forward(x)
        x = self.ln_f.forward(x)
        if self.lm_head is not None:            # a head an adapter set (lora_extras: untied, or tied to its table)
            logits, head_cache = self.lm_head.forward(x), None
        else:   # the output head reuses the token table (tied weights): logits = x @ wte^T
            logits, head_cache = F.linear_forward(x, self.wte.weight.data.T)   # (B, T, V)
        self._cache = (head_cache, tuple(logits.shape))
        return logits

    def backward(self, dlogits) -> None:
        """dlogits: (B, T, vocab_size), the gradient of the loss. Accumulates every trainable gradient."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError("GPT.backward called without a forward first (or twice)")
        head_cache, expected = cache
        if tuple(dlogits.shape) != expected:
            raise ValueError(f"dlogits has shape {tuple(dlogits.shape)}; the last forward produced logits of shape {expected}")
        del self._cache
        if head_cache is None:
            dx = self.lm_head.backward(dlogits)
        else:
            wte = self.wte.weight
            dx, dWt, _ = F.linear_backward(dlogits, head_cache, weight_grad=wte.trainable)   # fwd: logits = x @ wte^T
            if dWt is not None:
                wte.accumulate_grad(dWt.T.copy())   # the head used wte^T; a fresh array, as accumulate_grad keeps it
        dx = self.ln_f.backward(dx)
        for block in reversed(list(self.h)):
            dx = block.backward(dx)
        dx = self.drop.backward(dx)
        # fwd: x = wte[idx] + wpe[arange(T)]; wpe's rows were shared by the batch, so their gradient sums over it
        self.wpe.backward(dx.sum(axis=0))
        self.wte.backward(dx)   # adds to the head's gradient: a tied weight's gradient is the sum of both uses

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed=None):
        """Sample max_new_tokens tokens after the prompt idx, one at a time.

        idx: integer array (B, T) of prompt ids; temperature: > 0 scales the logits (0 means greedy: always the
        most likely token); top_k: sample only among the k most likely tokens; seed: for the sampling generator.
        The context is cropped to the last block_size tokens (fewer when a prefix or prompt takes some of the
        positions: ``wpe.n_virtual``). Returns a NumPy array (B, T + max_new_tokens).
        Runs in evaluation mode (no dropout) and restores the previous mode afterwards.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, numpy.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0; got {temperature!r}")
        V = self.config.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, numpy.integer)) or not 1 <= top_k <= V):
            raise ValueError(f"top_k must be None or an int in [1, {V}]; got {top_k!r}")
        out = backend.to_numpy(self._check_idx(idx)).astype(numpy.int64)
        rng = numpy.random.default_rng(seed)
        was_training = self.training
        self.eval()
        context_size = self.config.block_size - getattr(self.wpe, "n_virtual", 0)
        try:
            for _ in range(max_new_tokens):
                context = out[:, -context_size:]
                logits = backend.to_numpy(self.forward(context))[:, -1, :].astype(numpy.float64)   # (B, V)
                if temperature == 0:
                    next_ids = logits.argmax(axis=1)
                else:
                    logits /= temperature
                    if top_k is not None:
                        kth = numpy.sort(logits, axis=1)[:, -top_k][:, None]
                        logits[logits < kth] = -numpy.inf                 # keep only the k largest
                    probs = numpy.exp(logits - logits.max(axis=1, keepdims=True))
                    probs /= probs.sum(axis=1, keepdims=True)
                    # inverse-CDF sampling: the first id whose cumulative probability exceeds a uniform draw
                    u = rng.random((len(probs), 1))
                    next_ids = numpy.minimum((probs.cumsum(axis=1) < u).sum(axis=1), V - 1)
                out = numpy.concatenate([out, next_ids[:, None]], axis=1)
        finally:
            self.train(was_training)
        return out

    def __repr__(self):
        c = self.config
        return (f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, "
                f"block_size={c.block_size}, dtype={self.dtype}, parameters={self.num_parameters():,})")


def cross_entropy(logits, targets, ignore_index=None):
    """Mean softmax cross-entropy over tokens and its gradient: (loss, dlogits).

    logits: (B, T, V) (or (N, V)); targets: integer array logits.shape[:-1] with values in [0, V) (or
    ignore_index, whose positions are left out of the mean).
    """
    if not backend.is_array(logits):
        raise TypeError(f"logits must be an array (..., V); got {type(logits).__name__}")
    targets = _integer_array(targets, "targets must be an integer array", "targets must hold integer class ids")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets have shape {tuple(targets.shape)}; logits {tuple(logits.shape)} need {tuple(logits.shape[:-1])}")
    V = logits.shape[-1]
    counted = targets if ignore_index is None else targets[targets != ignore_index]
    if counted.size and (int(counted.min()) < 0 or int(counted.max()) >= V):
        bad = int(counted.min()) if int(counted.min()) < 0 else int(counted.max())
        raise ValueError(f"target {bad} is out of range: targets must be in [0, {V - 1}]"
                         + ("" if ignore_index is None else f" or equal ignore_index {ignore_index}"))
    targets = backend.get_array_module(logits).asarray(targets)
    return F.softmax_cross_entropy(logits, targets, ignore_index)


def _integer_array(value, not_an_array: str, not_integers: str):
    """``value`` as an integer array (a list or tuple is converted); a TypeError with the given message, the
    offending type or dtype appended, for anything else."""
    if not backend.is_array(value):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{not_an_array}; got {type(value).__name__}")
        value = numpy.asarray(value)
    if value.dtype.kind not in "iu":
        raise TypeError(f"{not_integers}; got dtype {value.dtype}")
    return value
