"""Parameters and modules: thin shells that own weights and call the functional forward/backward pairs.

A module's ``forward(x)`` keeps the cache its backward needs (in ``self._cache``); ``backward(dout)``
accumulates into the ``.grad`` of its trainable parameters and returns the gradient of its input. A frozen
weight (``trainable = False``) gets no gradient and costs no backward matrix product.

``F.<layer>_forward`` below is ``functional.<layer>_forward`` (the reference core) or, while the fast path is
on, its fast version from ``minilora.fast``: the same pair, computed faster (see ``backend.use_fast``).
"""
from __future__ import annotations

import numpy

from . import backend, functional

F = backend.Pairs(functional)


class Parameter:
    """A weight array with its gradient.

    data: the array; grad: None until a backward accumulates into it; trainable: whether backward computes
    its gradient and optimizers update it; decay: whether AdamW applies weight decay to it (True for the
    matrices of linear layers, False for biases, LayerNorm and embeddings, as GPT-2 training does);
    added_by: the fine-tuning method that added it ("lora", "adapters", "prefix", "prompt"), or None for a
    weight of the pretrained model.
    """

    def __init__(self, data, trainable: bool = True, decay: bool = False, added_by: str | None = None):
        self.data = data
        self.grad = None
        self.trainable = trainable
        self.decay = decay
        self.added_by = added_by

    @property
    def shape(self):
        return self.data.shape

    @property
    def size(self) -> int:
        return int(self.data.size)

    def accumulate_grad(self, g) -> None:
        """grad += g. ``g`` must be a fresh array: the first call keeps it as the gradient without a copy."""
        if not self.trainable:
            return
        if self.grad is None:
            self.grad = g
        else:
            self.grad += g

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.data.dtype}, trainable={self.trainable})"


class Module:
    """Base class: finds its parameters and sub-modules among its attributes (names not starting with "_")."""

    training = True

    # -- discovery ------------------------------------------------------------------------------------
    def _named_children(self):
        for name, value in list(vars(self).items()):     # a copy: a forward during the walk adds _cache
            if not name.startswith("_") and isinstance(value, Module):
                yield name, value

    def _direct_parameters(self):
        for name, value in list(vars(self).items()):
            if not name.startswith("_") and isinstance(value, Parameter):
                yield name, value

    def named_modules(self, prefix: str = ""):
        """Yield (dotted name, module) for this module (name "") and every sub-module, depth first."""
        yield prefix, self
        for name, child in self._named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, trainable_only: bool = False):
        """Yield (dotted name, Parameter), e.g. ("h.0.attn.q_proj.weight", p), in a fixed order."""
        seen = set()
        for module_name, module in self.named_modules():
            for name, p in module._direct_parameters():
                if id(p) in seen or (trainable_only and not p.trainable):
                    continue
                seen.add(id(p))
                yield (f"{module_name}.{name}" if module_name else name), p

    def parameters(self, trainable_only: bool = False):
        """The list of Parameters (each once, even if shared)."""
        return [p for _, p in self.named_parameters(trainable_only)]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """How many numbers the model holds (or trains): its Parameters, and the frozen weights stored packed."""
        packed = 0 if trainable_only else sum(w.size for _, m in self.named_modules()
                                              for w in m.packed_weights().values())
        return sum(p.size for p in self.parameters(trainable_only)) + packed

    def packed_weights(self) -> dict:
        """{name: weight} of the frozen weights this module stores packed instead of as Parameters (quant.py's
        NF4Weight), each with .size (the numbers it stands for) and .nbytes (its storage); none by default."""
        return {}

    # -- training state -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Forget every gradient (grad = None); the next backward starts from zero."""
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True):
        """Training mode (dropout active) for this module and all sub-modules; returns self."""
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        """Evaluation mode (dropout off); returns self."""
        return self.train(False)

    # -- weights in and out ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{dotted name: array} of every parameter (the arrays themselves, not copies)."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_refusal(self) -> str | None:
        """Why this module cannot take new weights now (None: it can); a merged LoRA layer says so."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the parameters. Every name, shape and value (finite) is checked, and every module asked
        (load_refusal), before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of name -> array; got {type(state).__name__}")
        for name, module in self.named_modules():
            reason = module.load_refusal()
            if reason is not None:
                raise ValueError(f"cannot load a state dict: {name or 'the model'} {reason}")
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            value = state[name]
            if not backend.is_array(value):
                raise TypeError(f"state[{name!r}] must be an array; got {type(value).__name__}")
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"state[{name!r}] has shape {tuple(value.shape)}; the model expects {tuple(p.shape)}")
            if not bool(backend.get_array_module(value).isfinite(value).all()):
                raise ValueError(f"state[{name!r}] holds NaN or inf; the model was left unchanged")
        for name, p in params.items():
            p.data[...] = backend.asarray(state[name], dtype=p.data.dtype)

    # -- what a forward keeps for its backward --------------------------------------------------------
    def cached(self):
        """The cache the last forward kept for the backward (None when there is none)."""
        return self.__dict__.get("_cache")

    def _pop_cache(self):
        cache = self.__dict__.pop("_cache", None)
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward first (or twice)")
        return cache

    def generators(self) -> list:
        """The random generators this module draws from itself (dropout masks); none by default."""
        return []


def freeze_pretrained(model: Module) -> None:
    """Freeze the pretrained weights: every parameter that no fine-tuning method added (``added_by`` None).

    Each method (apply_lora, apply_adapters, apply_prefix, apply_prompt) calls this before adding its own
    trainable parameters, so methods combine in any order and the earlier ones stay trainable."""
    for p in model.parameters():
        if p.added_by is None:
            p.trainable = False


def dropout_generators(model: Module) -> list:
    """Every distinct random generator the modules of a model draw from (``Module.generators``), in order."""
    found, seen = [], set()
    for _, module in model.named_modules():
        for generator in module.generators():
            if generator is not None and id(generator) not in seen:
                seen.add(id(generator))
                found.append(generator)
    return found


class ModuleList(Module):
    """An ordered list of modules, named "0", "1", ... ."""

    def __init__(self, modules):
        self._items = list(modules)

    def _named_children(self):
        for i, m in enumerate(self._items):
            yield str(i), m

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


class Unfilled:
    """The initialisation "generator" of a model whose every weight a loader is about to overwrite: normal_init
    then gives zeros, drawing no random numbers and making no temporaries."""


def normal_init(shape, std, seed_rng, dtype):
    """An array of N(0, std^2) draws made on the host (so NumPy and CuPy get the same numbers), on the backend."""
    if isinstance(seed_rng, Unfilled):
        return zeros(shape, dtype)
    return backend.asarray(seed_rng.normal(0.0, std, size=shape).astype(dtype))


def zeros(shape, dtype):
    return backend.xp().zeros(shape, dtype=dtype)


def ones(shape, dtype):
    return backend.xp().ones(shape, dtype=dtype)


class Linear(Module):
    """y = x @ W + b with W stored (in, out). Weight init N(0, std^2), bias zero."""

    def __init__(self, in_features, out_features, bias=True, std=0.02, rng=None, dtype="float32"):
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.weight = Parameter(normal_init((in_features, out_features), std, rng, dtype), decay=True)
        self.bias = Parameter(zeros((out_features,), dtype)) if bias else None

    def forward(self, x):
        """x: (..., in) -> (..., out)."""
        y, self._cache = F.linear_forward(x, self.weight.data, self.bias.data if self.bias is not None else None)
        return y

    def backward(self, dy):
        """dy: (..., out) -> dx: (..., in); W's own product is skipped when W is frozen."""
        dx, dW, db = F.linear_backward(dy, self._pop_cache(), weight_grad=self.weight.trainable,
                                       bias_grad=self.bias is not None and self.bias.trainable)
        if dW is not None:
            self.weight.accumulate_grad(dW)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx


class Embedding(Module):
    """A lookup table (num, dim), init N(0, std^2)."""

    def __init__(self, num, dim, std=0.02, rng=None, dtype="float32"):
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.weight = Parameter(normal_init((num, dim), std, rng, dtype))

    def forward(self, idx):
        """idx: integer array (any shape) -> (*idx.shape, dim)."""
        out, self._cache = F.embedding_forward(idx, self.weight.data)
        return out

    def backward(self, dout) -> None:
        """Accumulates the table's gradient (scatter-add); an index has no gradient, so nothing is returned."""
        cache = self._pop_cache()
        if self.weight.trainable:
            self.weight.accumulate_grad(F.embedding_backward(dout, cache))

    def table(self):
        """(the table (V, C) a head tied to this module reads, its cache): the weight itself."""
        return self.weight.data, None

    def table_backward(self, dtable, cache) -> None:
        """dtable: (V, C), the gradient of the table from a tied head."""
        if self.weight.trainable:
            self.weight.accumulate_grad(dtable.copy())


class LayerNorm(Module):
    """LayerNorm over the last axis with weight (ones) and bias (zeros)."""

    def __init__(self, dim, eps=1e-5, dtype="float32"):
        self.weight = Parameter(ones((dim,), dtype))
        self.bias = Parameter(zeros((dim,), dtype))
        self.eps = eps

    def forward(self, x):
        out, self._cache = F.layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        return out

    def backward(self, dout):
        trainable = self.weight.trainable or self.bias.trainable
        dx, dw, db = F.layernorm_backward(dout, self._pop_cache(), param_grad=trainable)
        if trainable:
            self.weight.accumulate_grad(dw)          # accumulate_grad ignores a frozen one of the two
            self.bias.accumulate_grad(db)
        return dx


class Dropout(Module):
    """Inverted dropout with probability p in training mode; the identity in evaluation mode."""

    def __init__(self, p, rng=None):
        self.p = float(p)
        self.rng = rng

    def generators(self) -> list:
        return [self.rng]

    def forward(self, x):
        out, self._cache = F.dropout_forward(x, self.p if self.training else 0.0, self.rng)
        return out

    def backward(self, dout):
        return F.dropout_backward(dout, self.__dict__.pop("_cache", None))   # None: p was 0, nothing kept


class MLP(Module):
    """fc (C -> 4C), GELU (tanh), proj (4C -> C), dropout."""

    def __init__(self, n_embd, dropout=0.0, std=0.02, proj_std=0.02, rng=None, dropout_rng=None, dtype="float32"):
        self.fc = Linear(n_embd, 4 * n_embd, std=std, rng=rng, dtype=dtype)
        self.proj = Linear(4 * n_embd, n_embd, std=proj_std, rng=rng, dtype=dtype)
        self.drop = Dropout(dropout, dropout_rng)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        h, self._cache = F.gelu_forward(self.fc.forward(x))   # (B, T, 4C)
        return self.drop.forward(self.proj.forward(h))

    def backward(self, dout):
        dh = self.proj.backward(self.drop.backward(dout))      # (B, T, 4C)
        return self.fc.backward(F.gelu_backward(dh, self._pop_cache()))


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with separate q, k, v, o projections (so LoRA on Wq, Wv reads as the paper)."""

    def __init__(self, n_embd, n_head, dropout=0.0, std=0.02, proj_std=0.02, rng=None, dropout_rng=None,
                 dtype="float32"):
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.q_proj = Linear(n_embd, n_embd, std=std, rng=rng, dtype=dtype)
        self.k_proj = Linear(n_embd, n_embd, std=std, rng=rng, dtype=dtype)
        self.v_proj = Linear(n_embd, n_embd, std=std, rng=rng, dtype=dtype)
        self.o_proj = Linear(n_embd, n_embd, std=proj_std, rng=rng, dtype=dtype)
        self.attn_dropout = float(dropout)
        self.resid_drop = Dropout(dropout, dropout_rng)
        self.rng = dropout_rng              # the attention probabilities' dropout masks

    def generators(self) -> list:
        return [self.rng]

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        q, k, v = self.q_proj.forward(x), self.k_proj.forward(x), self.v_proj.forward(x)
        p = self.attn_dropout if self.training else 0.0
        y, self._cache = F.attention_forward(q, k, v, self.n_head, p, self.rng)
        return self.resid_drop.forward(self.o_proj.forward(y))

    def backward(self, dout):
        """dout: (B, T, C) -> dx: (B, T, C)."""
        dy = self.o_proj.backward(self.resid_drop.backward(dout))
        dq, dk, dv = F.attention_backward(dy, self._pop_cache())
        # fwd: q, k, v = x Wq, x Wk, x Wv: x feeds all three, so its gradient is the sum of the three paths
        return self.q_proj.backward(dq) + self.k_proj.backward(dk) + self.v_proj.backward(dv)


class Block(Module):
    """A pre-LayerNorm transformer block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, n_embd, n_head, dropout=0.0, eps=1e-5, std=0.02, proj_std=0.02, rng=None,
                 dropout_rng=None, dtype="float32"):
        self.ln_1 = LayerNorm(n_embd, eps, dtype)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, std, proj_std, rng, dropout_rng, dtype)
        self.ln_2 = LayerNorm(n_embd, eps, dtype)
        self.mlp = MLP(n_embd, dropout, std, proj_std, rng, dropout_rng, dtype)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        h = x + self.attn.forward(self.ln_1.forward(x))
        out = h + self.mlp.forward(self.ln_2.forward(h))
        return out

    def backward(self, dout):
        """dout: (B, T, C) -> dx: (B, T, C)."""
        dh = dout + self.ln_2.backward(self.mlp.backward(dout))   # fwd: out = h + mlp(ln_2(h))
        dx = dh + self.ln_1.backward(self.attn.backward(dh))     # fwd: h = x + attn(ln_1(x))
        return dx
