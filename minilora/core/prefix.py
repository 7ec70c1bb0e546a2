"""Prefix tuning (Li and Liang 2021) and prompt tuning (Lester et al. 2021): virtual tokens before the input.

Both put P trainable "virtual tokens" in front of every sequence of a frozen model; they differ in depth.

Prompt tuning: P soft-prompt vectors are prepended to the token embeddings, at the input only.

    x = [prompt; wte[idx]] + wpe[0 : P + T]            (B, P + T, C); P C trainable numbers

Prefix tuning: every attention layer gets P trainable keys and values that every query may attend to.

    K = [prefix_keys; x W_k],  V = [prefix_values; x W_v]   (B, P + T, C) per layer; 2 L P C trainable numbers
    y = softmax(q K^T / sqrt(hs) + mask) V                  query t sees the P prefixes and tokens 0..t

Li and Liang found training the prefixes directly unstable and reparameterised them through a small MLP,
prefixes = MLP(E) with E: (P, C) trainable, used only during training: afterwards ``bake_prefix`` computes the
prefixes once and drops the MLP. Both start from the keys/values (or embeddings) of P random vocabulary
tokens, the "real activations" initialisation that Li and Liang and Lester et al. found better than noise.

As in Hugging Face (past key values, inputs_embeds), the virtual tokens take the first P positions and the
real tokens follow at positions P .. P + T - 1, so P + T must fit in block_size. No model code changes: the
modules that need to behave differently are replaced by subclasses that keep the same parameters (names
and arrays): ``wpe`` (positions shifted by P), each ``attn`` (prefix tuning), ``wte`` and ``ln_f`` (prompt
tuning: prepend the prompt, and drop its positions before the output head).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy

from . import backend, functional
from .nn import CausalSelfAttention, Embedding, LayerNorm, Linear, Module, Parameter, freeze_pretrained

F = backend.Pairs(functional)     # the reference pairs, or their fast versions (see nn.py)

INITS = ("vocab", "random")


def _check_length(name, length, block_size):
    if isinstance(length, bool) or not isinstance(length, (int, numpy.integer)) or length < 0:
        raise ValueError(f"{name}.length must be an int >= 0 (0: no virtual tokens, the base model); got {length!r}")
    if length >= block_size:
        raise ValueError(f"{name}.length {length} leaves no room for real tokens: the model's block_size is "
                         f"{block_size}, and virtual and real tokens share its positions (need length < block_size)")


# ----------------------------------------------------------------------------------------------------
# positions: the real tokens move P places to the right


class VirtualPositions(Embedding):
    """The position table with P virtual tokens in front: for positions 0..T-1 of the real tokens it returns
    rows P..P+T-1 (prefix tuning), or rows 0..P+T-1 when the virtual tokens are in the sequence themselves
    (prompt tuning). Same weight as the table it replaces."""

    def __init__(self, wpe: Embedding, n_virtual: int, include_virtual: bool):
        self.weight = wpe.weight
        self.training = wpe.training
        self.n_virtual = int(n_virtual)
        self.include_virtual = bool(include_virtual)

    def forward(self, pos):
        """pos: (T,) = arange(T) -> (T, C), or (P + T, C) with include_virtual."""
        xp = backend.get_array_module(pos)
        T, P = int(pos.shape[0]), self.n_virtual
        block_size = self.weight.shape[0]
        if T + P > block_size:
            raise ValueError(f"sequence length {T} plus {P} virtual tokens (prefix or prompt) exceeds block_size "
                             f"{block_size}: use sequences of at most {block_size - P} tokens")
        shifted = xp.arange(T + P) if self.include_virtual else pos + P
        return super().forward(shifted)


# ----------------------------------------------------------------------------------------------------
# prefix tuning: the math, the reparameterisation, the attention module


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, n_head, dropout_p=0.0, rng=None):
    """Causal attention whose keys and values start with P prefix rows shared by the whole batch.

    q, k, v: (B, T, C); prefix_k, prefix_v: (P, C). Returns y: (B, T, C) and the cache.
    """
    xp = backend.get_array_module(q)
    B, _, C = q.shape
    P = prefix_k.shape[0]
    k_all = xp.concatenate([xp.broadcast_to(prefix_k, (B, P, C)), k], axis=1)    # (B, P + T, C)
    v_all = xp.concatenate([xp.broadcast_to(prefix_v, (B, P, C)), v], axis=1)    # (B, P + T, C)
    y, cache = F.attention_forward(q, k_all, v_all, n_head, dropout_p, rng)      # query t sees P + t + 1 keys
    return y, (cache, P)


def prefix_attention_backward(dy, cache):
    """dy: (B, T, C). Returns dq, dk, dv: (B, T, C) and dprefix_k, dprefix_v: (P, C)."""
    attention_cache, P = cache
    dq, dk_all, dv_all = F.attention_backward(dy, attention_cache)
    # fwd: k_all = [broadcast(prefix_k); k]: the batch shared the prefix rows, so their gradient sums over it
    return dq, dk_all[:, P:], dv_all[:, P:], dk_all[:, :P].sum(axis=0), dv_all[:, :P].sum(axis=0)


def prefix_mlp_forward(E, W_in, b_in, W_out, b_out):
    """Li and Liang's reparameterisation: out = tanh(E W_in + b_in) W_out + b_out.

    E: (P, C); W_in: (C, hidden); W_out: (hidden, n) (n = 2 C for one layer's keys and values). -> (P, n).
    """
    pre, in_cache = F.linear_forward(E, W_in, b_in)     # (P, hidden)
    h = backend.get_array_module(pre).tanh(pre)
    out, out_cache = F.linear_forward(h, W_out, b_out)  # (P, n)
    return out, (in_cache, h, out_cache)


def prefix_mlp_backward(dout, cache):
    """dout: (P, n). Returns dE, dW_in, db_in, dW_out, db_out."""
    in_cache, h, out_cache = cache
    dh, dW_out, db_out = F.linear_backward(dout, out_cache)      # fwd: out = h W_out + b_out
    dpre = dh * (1.0 - h * h)                                    # fwd: h = tanh(pre)
    dE, dW_in, db_in = F.linear_backward(dpre, in_cache)         # fwd: pre = E W_in + b_in
    return dE, dW_in, db_in, dW_out, db_out


class PrefixEncoder(Module):
    """The MLP that makes every layer's prefix from one trainable (P, C) matrix during training.

    Layer l's keys and values are columns [2 l C, 2 (l + 1) C) of the output. Each layer runs its own slice
    forward and backward (the MLP is tiny), so the layers need no shared bookkeeping."""

    def __init__(self, length, n_layer, n_embd, hidden, rng, dtype):
        self.n_embd = n_embd
        self.prefix_embedding = Parameter(backend.asarray(rng.normal(0.0, 1.0, (length, n_embd)).astype(dtype)),
                                          added_by="prefix")
        self.prefix_in = Linear(n_embd, hidden, std=1.0 / math.sqrt(n_embd), rng=rng, dtype=dtype)
        self.prefix_out = Linear(hidden, 2 * n_layer * n_embd, std=0.02, rng=rng, dtype=dtype)
        for p in self.prefix_in.parameters() + self.prefix_out.parameters():
            p.added_by = "prefix"

    def _columns(self, layer):
        return slice(2 * layer * self.n_embd, 2 * (layer + 1) * self.n_embd)

    def layer_forward(self, layer):
        """-> (prefix_k, prefix_v), each (P, C), and the cache for layer_backward."""
        cols = self._columns(layer)
        out, cache = prefix_mlp_forward(self.prefix_embedding.data, self.prefix_in.weight.data,
                                        self.prefix_in.bias.data, self.prefix_out.weight.data[:, cols],
                                        self.prefix_out.bias.data[cols])
        C = self.n_embd
        return out[:, :C], out[:, C:], cache

    def layer_backward(self, layer, dprefix_k, dprefix_v, cache) -> None:
        """Accumulates the gradients of one layer's prefixes into the MLP's parameters."""
        xp = backend.get_array_module(dprefix_k)
        cols = self._columns(layer)
        dE, dW_in, db_in, dW_out_cols, db_out_cols = prefix_mlp_backward(
            xp.concatenate([dprefix_k, dprefix_v], axis=1), cache)   # fwd: (prefix_k, prefix_v) = out[:, :C], out[:, C:]
        dW_out = xp.zeros_like(self.prefix_out.weight.data)
        dW_out[:, cols] = dW_out_cols                               # fwd: only these columns made layer l's prefix
        db_out = xp.zeros_like(self.prefix_out.bias.data)
        db_out[cols] = db_out_cols
        for p, g in ((self.prefix_embedding, dE), (self.prefix_in.weight, dW_in), (self.prefix_in.bias, db_in),
                     (self.prefix_out.weight, dW_out), (self.prefix_out.bias, db_out)):
            p.accumulate_grad(g)


class PrefixAttention(CausalSelfAttention):
    """Causal self-attention with P trainable prefix keys and values; the projections are the original ones.

    The prefixes are its own Parameters ``prefix_keys``/``prefix_values`` (P, C), or come from a shared
    PrefixEncoder (held, not owned: the model owns it as ``prefix_encoder``).
    """

    def __init__(self, attn: CausalSelfAttention, layer: int, prefix_k=None, prefix_v=None, encoder=None):
        self.__dict__.update({k: v for k, v in vars(attn).items() if k != "_cache"})   # same modules and settings
        self.training = attn.training
        self.layer = layer
        self._encoder = encoder
        if encoder is None:
            self.prefix_keys = Parameter(prefix_k, added_by="prefix")
            self.prefix_values = Parameter(prefix_v, added_by="prefix")

    def _prefixes_with_cache(self):
        """-> (prefix_k, prefix_v, the encoder's cache or None), prefixes (P, C)."""
        if self._encoder is None:
            return self.prefix_keys.data, self.prefix_values.data, None
        return self._encoder.layer_forward(self.layer)

    def prefixes(self):
        """-> (prefix_k, prefix_v), each (P, C)."""
        prefix_k, prefix_v, _ = self._prefixes_with_cache()
        return prefix_k, prefix_v

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        q, k, v = self.q_proj.forward(x), self.k_proj.forward(x), self.v_proj.forward(x)
        prefix_k, prefix_v, encoder_cache = self._prefixes_with_cache()
        p = self.attn_dropout if self.training else 0.0
        y, attention_cache = prefix_attention_forward(q, k, v, prefix_k, prefix_v, self.n_head, p, self.rng)
        self._cache = (attention_cache, encoder_cache)
        return self.resid_drop.forward(self.o_proj.forward(y))

    def backward(self, dout):
        attention_cache, encoder_cache = self._pop_cache()
        dy = self.o_proj.backward(self.resid_drop.backward(dout))
        dq, dk, dv, dprefix_k, dprefix_v = prefix_attention_backward(dy, attention_cache)
        if self._encoder is not None:
            if self._encoder.prefix_embedding.trainable:
                self._encoder.layer_backward(self.layer, dprefix_k, dprefix_v, encoder_cache)
        else:
            self.prefix_keys.accumulate_grad(dprefix_k)
            self.prefix_values.accumulate_grad(dprefix_v)
        # fwd: q, k, v = x Wq, x Wk, x Wv
        return self.q_proj.backward(dq) + self.k_proj.backward(dk) + self.v_proj.backward(dv)


# ----------------------------------------------------------------------------------------------------
# prompt tuning: the modules


class PromptEmbedding(Embedding):
    """The token table with P trainable prompt vectors prepended to every sequence: (B, T) ids -> (B, P + T, C).

    Same weight as the table it replaces (so the tied output head is unchanged); ``prompt_embeddings`` (P, C).
    """

    def __init__(self, wte: Embedding, prompt):
        self.weight = wte.weight
        self.training = wte.training
        self.prompt_embeddings = Parameter(prompt, added_by="prompt")

    def forward(self, idx):
        """idx: (B, T) -> (B, P + T, C)."""
        xp = backend.get_array_module(self.weight.data)
        tokens = super().forward(idx)                                  # (B, T, C)
        B, P, C = tokens.shape[0], self.prompt_embeddings.shape[0], tokens.shape[2]
        return xp.concatenate([xp.broadcast_to(self.prompt_embeddings.data, (B, P, C)), tokens], axis=1)

    def backward(self, dout) -> None:
        """dout: (B, P + T, C)."""
        P = self.prompt_embeddings.shape[0]
        self.prompt_embeddings.accumulate_grad(dout[:, :P].sum(axis=0))  # fwd: the batch shares the prompt
        super().backward(dout[:, P:])                                    # fwd: tokens = W[idx]


class DropVirtualTokens(LayerNorm):
    """The final LayerNorm, applied to the real tokens only: the prompt's positions predict nothing.
    Same weight and bias as the LayerNorm it replaces. (B, P + T, C) -> (B, T, C)."""

    def __init__(self, ln: LayerNorm, n_virtual: int):
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps
        self.training = ln.training
        self.n_virtual = int(n_virtual)

    def forward(self, x):
        return super().forward(x[:, self.n_virtual:])

    def backward(self, dout):
        dx_real = super().backward(dout)
        xp = backend.get_array_module(dx_real)
        B, T, C = dx_real.shape
        dx = xp.zeros((B, T + self.n_virtual, C), dtype=dx_real.dtype)   # fwd: x[:, P:] (the prompt positions
        dx[:, self.n_virtual:] = dx_real                                   # had no say in the output)
        return dx


# ----------------------------------------------------------------------------------------------------
# applying them to a model


@dataclass
class PrefixConfig:
    """length: P prefix positions per layer; reparameterize: train through Li and Liang's MLP of width
    ``hidden``; init: "vocab" (keys and values of P random vocabulary tokens) or "random" (N(0, 0.02^2))."""

    length: int = 8
    reparameterize: bool = False
    hidden: int = 64
    init: str = "vocab"

    def __post_init__(self):
        _check_length("PrefixConfig", self.length, math.inf)
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, (int, numpy.integer)) or self.hidden < 1:
            raise ValueError(f"PrefixConfig.hidden must be an int >= 1; got {self.hidden!r}")
        if self.init not in INITS:
            raise ValueError(f"PrefixConfig.init must be one of {INITS}; got {self.init!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptConfig:
    """length: P soft-prompt vectors; init: "vocab" (embeddings of P random vocabulary tokens, Lester et
    al.) or "random" (N(0, 0.02^2), the scale of the token table's initialisation)."""

    length: int = 8
    init: str = "vocab"

    def __post_init__(self):
        _check_length("PromptConfig", self.length, math.inf)
        if self.init not in INITS:
            raise ValueError(f"PromptConfig.init must be one of {INITS}; got {self.init!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _checked_config(model, config, config_type):
    """The config (or the default one), checked against the model before anything changes."""
    config = config or config_type()
    if not isinstance(config, config_type):
        raise TypeError(f"config must be a {config_type.__name__}; got {type(config).__name__}")
    _check_length(config_type.__name__, config.length, model.config.block_size)
    if isinstance(model.wpe, VirtualPositions):
        raise ValueError("the model already has virtual tokens (a prefix or a prompt); prefix and prompt tuning "
                         "do not stack: start from a fresh model")
    return config


def _vocab_activations(model, ids):
    """Per layer, the keys and values (each (P, C)) the model computes for the token sequence ids (P,)."""
    xp = backend.xp()
    ids = xp.asarray(ids)[None, :]                                           # (1, P)
    was_training = model.training
    model.eval()
    x = model.wte.weight.data[ids] + model.wpe.weight.data[:ids.shape[1]]   # (1, P, C)
    out = []
    for block in model.h:
        h = block.ln_1.forward(x)
        out.append((block.attn.k_proj.forward(h)[0], block.attn.v_proj.forward(h)[0]))
        x = block.forward(x)
    for _, module in model.named_modules():                                 # nothing here will be backpropagated
        module.__dict__.pop("_cache", None)
    model.train(was_training)
    return out


def prefix_modules(model):
    """[(name, PrefixAttention)] of a model, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PrefixAttention)]


def apply_prefix(model: Module, config: PrefixConfig | None = None, seed: int = 0) -> Module:
    """Freeze the pretrained weights and give every attention layer P trainable prefix keys and values (in
    place); returns the model. Sequences then hold at most block_size - P real tokens."""
    config = _checked_config(model, config, PrefixConfig)
    c = model.config
    rng = numpy.random.default_rng(seed)
    dtype = model.dtype
    if config.init == "vocab" and config.length > 0:
        starts = _vocab_activations(model, rng.integers(0, c.vocab_size, size=config.length))
    else:
        starts = [tuple(backend.asarray(rng.normal(0.0, 0.02, (config.length, c.n_embd)).astype(dtype))
                        for _ in range(2)) for _ in range(c.n_layer)]
    freeze_pretrained(model)
    encoder = None
    if config.reparameterize:
        encoder = PrefixEncoder(config.length, c.n_layer, c.n_embd, config.hidden, rng, dtype)
        # the MLP's output bias starts at the average starting key and value of each layer, so the prefixes
        # start near real activations (the random MLP adds a little variety between positions)
        xp = backend.xp()
        if config.length:
            encoder.prefix_out.bias.data[...] = xp.concatenate([xp.concatenate(kv, axis=1).mean(axis=0) for kv in starts])
        model.prefix_encoder = encoder
    for layer, block in enumerate(model.h):
        prefix_k, prefix_v = (backend.xp().array(a, dtype=dtype) for a in starts[layer])
        block.attn = PrefixAttention(block.attn, layer, prefix_k, prefix_v, encoder)
    model.wpe = VirtualPositions(model.wpe, config.length, include_virtual=False)
    model.prefix_config = config
    return model


def bake_prefix(model: Module) -> None:
    """Replace the reparameterisation MLP by the prefixes it produces now (Li and Liang: the MLP is only a
    training device). Afterwards each layer holds plain ``prefix_keys``/``prefix_values``."""
    encoder = model.__dict__.get("prefix_encoder")
    if encoder is None:
        raise ValueError("the model has no prefix MLP to bake (apply_prefix with reparameterize=True first)")
    for _, attn in prefix_modules(model):
        prefix_k, prefix_v = attn.prefixes()
        attn.prefix_keys = Parameter(prefix_k.copy(), added_by="prefix")
        attn.prefix_values = Parameter(prefix_v.copy(), added_by="prefix")
        attn._encoder = None
    del model.prefix_encoder


def apply_prompt(model: Module, config: PromptConfig | None = None, seed: int = 0) -> Module:
    """Freeze the pretrained weights and prepend P trainable soft-prompt vectors to every input (in place);
    returns the model. Sequences then hold at most block_size - P real tokens."""
    config = _checked_config(model, config, PromptConfig)
    c = model.config
    rng = numpy.random.default_rng(seed)
    if config.init == "vocab":
        ids = backend.asarray(rng.integers(0, c.vocab_size, size=config.length))
        prompt = model.wte.weight.data[ids].copy()
    else:
        prompt = backend.asarray(rng.normal(0.0, 0.02, (config.length, c.n_embd)).astype(model.dtype))
    freeze_pretrained(model)
    model.wte = PromptEmbedding(model.wte, prompt)
    model.wpe = VirtualPositions(model.wpe, config.length, include_virtual=True)
    model.ln_f = DropVirtualTokens(model.ln_f, config.length)
    model.prompt_config = config
    return model


def virtual_tokens(model: Module) -> int:
    """How many positions of block_size the model's prefix or prompt takes (0 for none)."""
    return model.wpe.n_virtual if isinstance(model.wpe, VirtualPositions) else 0
