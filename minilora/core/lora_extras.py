"""What PEFT's LoRA can train besides the low-rank updates of linear layers, written as minilora's pairs.

Four kinds, each exactly as PEFT computes it for GPT-2 (whose output head is tied to the token table wte):

    LoRA on the token table    out = W[idx] + s * (A^T[idx]) B^T       A: (r, V), B: (C, r)  (PEFT's layout)
    LoRA's bias (lora_bias)    y = x W + b + s * ((x A^T) B^T + b_B)   (in lora.LoRALinear)
    trainable tokens           W' = W with the rows of the chosen token ids replaced by trained values
    modules_to_save            a trained full copy of a module; the original stays, frozen

The tie. GPT-2's head computes logits = x wte^T with the same table the embedding looks up. PEFT keeps that tie
for trainable tokens (the head reads the rows that the embedding reads), but not for LoRA on the table nor for a
full copy of wte or of lm_head: there the head keeps reading the ORIGINAL table (a full copy of lm_head is a
new, untied head), unless the config sets ensure_weight_tying with lm_head saved: one trained copy serves both. The GPT
says which head it uses with its ``lm_head`` slot: None (tied to wte's original table, as pretrained), an
OutputHead (an untied head with its own weight) or a TiedHead (tied to a table that an adapter computes).
"""
from __future__ import annotations

import copy
import sys

import numpy

from . import backend, functional
from .nn import Embedding, LayerNorm, Linear, Module, Parameter

F = backend.Pairs(functional)

# ----------------------------------------------------------------------------------------------------
# the math: forward/backward pairs


def embedding_lora_forward(idx, W, A, B, scale):
    """out = W[idx] + scale * (A^T[idx]) B^T: the frozen lookup and a low-rank update of the table.

    idx: integer array of any shape S; W: (V, C) frozen table; A: (r, V); B: (C, r). The update of the whole
    table would be scale * A^T B^T (V, C); only the looked-up rows of A^T are used. Returns out: (*S, C) and the
    cache (idx, h, A, B, scale), h: (*S, r) the rows of A^T.
    """
    base, _ = F.embedding_forward(idx, W)                     # (*S, C) the frozen path
    h = A.T[idx]                                              # (*S, r) row idx of A^T: a lookup in the r x V A
    out = base + scale * (h @ B.T)                            # (*S, C) up-projection, scaled
    return out, (idx, h, A, B, scale)


def embedding_lora_backward(dout, cache):
    """Gradients of embedding_lora_forward. dout: (*S, C). Returns dA: (r, V), dB: (C, r) (the table is frozen)."""
    idx, h, A, B, scale = cache
    C, r = B.shape
    dB = scale * (dout.reshape(-1, C).T @ h.reshape(-1, r))   # fwd: out = base + s h B^T      (C, r)
    dh = scale * (dout @ B)                                   # fwd: out = base + s h B^T      (*S, r)
    dAT = F.embedding_backward(dh, (idx, A.T.shape))          # fwd: h = A^T[idx] (scatter-add) (V, r)
    return dAT.T.copy(), dB


def replace_rows_forward(W, indices, values):
    """W' = W with row indices[j] replaced by values[j]: the table trainable tokens compute with.

    W: (V, C) frozen table; indices: (k,) distinct token ids; values: (k, C). Returns W': (V, C) and the cache.
    """
    W2 = W.copy()
    W2[indices] = values
    return W2, indices


def replace_rows_backward(dW2, cache):
    """Gradient of replace_rows_forward. dW2: (V, C). Returns dvalues: (k, C) (W's replaced rows get none)."""
    indices = cache
    return dW2[indices]                                       # fwd: W'[indices] = values


# ----------------------------------------------------------------------------------------------------
# modules


class LoRAEmbedding(Module):
    """The token table W frozen, plus the trainable pair lora_embedding_A (r, V), lora_embedding_B (C, r).

    PEFT's initialisation: A = 0, B ~ N(0, 1), so the adapted table starts exactly at W. ``weight`` is the
    original table, which a tied head keeps reading.
    """

    def __init__(self, base: Embedding, r: int, alpha: float, use_rslora: bool = False, rng=None):
        V, C = base.weight.shape
        self.weight = base.weight
        self.weight.trainable = False
        self.r, self.alpha = int(r), float(alpha)
        self.scale = alpha / numpy.sqrt(r) if use_rslora else alpha / r
        self.disabled = False
        dtype = self.weight.data.dtype
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.lora_embedding_A = Parameter(backend.asarray(numpy.zeros((r, V), dtype=dtype)), added_by="lora")
        self.lora_embedding_B = Parameter(backend.asarray(rng.standard_normal((C, r)).astype(dtype)), added_by="lora")

    def forward(self, idx):
        """idx: integer array (any shape) -> (*idx.shape, C)."""
        if self.disabled:
            out, self._cache = F.embedding_forward(idx, self.weight.data)
            return out
        out, self._cache = PAIRS.embedding_lora_forward(idx, self.weight.data, self.lora_embedding_A.data,
                                                        self.lora_embedding_B.data, self.scale)
        return out

    def backward(self, dout) -> None:
        cache = self._pop_cache()
        if self.disabled:
            return
        dA, dB = PAIRS.embedding_lora_backward(dout, cache)
        self.lora_embedding_A.accumulate_grad(dA)
        self.lora_embedding_B.accumulate_grad(dB)

    def delta_weight(self):
        """The update of the table, (V, C): scale * A^T B^T."""
        return (self.lora_embedding_A.data.T @ self.lora_embedding_B.data.T) * self.scale


class TrainableTokens(Module):
    """The token table W frozen except the rows of ``indices``, whose values train (``token_values``: (k, C)).

    A tied head reads the same table (TiedHead(this)), as PEFT's trainable tokens do on a tied model."""

    def __init__(self, base: Embedding, indices):
        self.weight = base.weight
        self.weight.trainable = False
        self.indices = numpy.asarray(indices, dtype=numpy.int64)
        self.disabled = False
        self.token_values = Parameter(self.weight.data[backend.asarray(self.indices)].copy(),
                                      added_by="trainable_tokens")

    def _replaced_table(self):
        """(V, C): the table with the trained rows in place, and the cache of its replacement."""
        if self.disabled:
            return self.weight.data, None
        return PAIRS.replace_rows_forward(self.weight.data, backend.asarray(self.indices), self.token_values.data)

    def table(self):
        """The table of the current forward (the lookup runs before the head) and its cache, for the tied head:
        the V x C table is built once per forward, not once per use."""
        return self._table

    def table_backward(self, dtable, cache) -> None:
        if cache is not None:
            self.token_values.accumulate_grad(PAIRS.replace_rows_backward(dtable, cache))

    def forward(self, idx):
        self._table = W2, replace_cache = self._replaced_table()
        out, lookup_cache = F.embedding_forward(idx, W2)
        self._cache = (lookup_cache, replace_cache)
        return out

    def backward(self, dout) -> None:
        lookup_cache, replace_cache = self._pop_cache()
        if replace_cache is not None:
            self.table_backward(F.embedding_backward(dout, lookup_cache), replace_cache)


class TrainedCopy(Module):
    """PEFT's modules_to_save: a trainable full copy of a module (``copy``) computes in its place; the original
    stays, frozen, under its own names (``weight``, ``bias``), so the base model's weights are unchanged."""

    def __init__(self, original: Module):
        if not isinstance(original, (Linear, LayerNorm, Embedding)):
            raise ValueError(f"a full trained copy (modules_to_save) is made of a Linear, LayerNorm or Embedding; "
                             f"got {type(original).__name__}")
        for name, p in original._direct_parameters():
            setattr(self, name, p)
            p.trainable = False
        self._original = original
        self.copy = copy.deepcopy(original)
        for _, p in self.copy.named_parameters():
            p.trainable, p.added_by = True, "modules_to_save"
        self.disabled = False

    def _active(self):
        return self._original if self.disabled else self.copy

    def table(self):
        """The table of an Embedding copy, for a head tied to it."""
        return self._active().table()

    def table_backward(self, dtable, cache) -> None:
        self._active().table_backward(dtable, cache)

    def forward(self, x):
        self._cache = self._active()
        return self._cache.forward(x)

    def backward(self, dout):
        return self._pop_cache().backward(dout)


class OutputHead(Module):
    """An untied output head: logits = x W^T with its own weight W: (V, C) (a trained copy of lm_head).
    Disabled, it reads the original table of ``original`` (the token embedding) again."""

    def __init__(self, weight: Parameter, original: Module):
        self.weight = weight
        self._original = original
        self.disabled = False

    def forward(self, x):
        """x: (B, T, C) -> logits (B, T, V)."""
        W = self._original.weight if self.disabled else self.weight
        logits, cache = F.linear_forward(x, W.data.T)
        self._cache = (cache, W)
        return logits

    def backward(self, dlogits):
        cache, W = self._pop_cache()
        dx, dWt, _ = F.linear_backward(dlogits, cache, weight_grad=W.trainable)
        if dWt is not None:
            W.accumulate_grad(dWt.T.copy())                     # fwd: logits = x W^T
        return dx


class TiedHead(Module):
    """A head tied to a table that a module computes: logits = x table^T, the gradient flowing back into the
    module that computes the table (trainable tokens, or a trained copy of wte). The module is held as
    ``_source`` so that its parameters are counted once, where it lives."""

    def __init__(self, source: Module):
        self._source = source

    def forward(self, x):
        table, table_cache = self._source.table()
        logits, linear_cache = F.linear_forward(x, table.T)
        self._cache = (linear_cache, table_cache)
        return logits

    def backward(self, dlogits):
        linear_cache, table_cache = self._pop_cache()
        dx, dTt, _ = F.linear_backward(dlogits, linear_cache, weight_grad=True)   # fwd: logits = x table^T
        self._source.table_backward(dTt.T, table_cache)
        return dx


def extra_modules(model: Module) -> list:
    """[(name, module)] of the adapted modules this file defines (they switch off with lora.disable_lora)."""
    kinds = (LoRAEmbedding, TrainableTokens, TrainedCopy, OutputHead)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


PAIRS = backend.Pairs(sys.modules[__name__])   # the pairs above, or their fast versions


# ----------------------------------------------------------------------------------------------------
# applying them (lora.apply_lora calls these: plan first, to check everything, then apply)


def _suffix_match(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def plan_extras(model: Module, config, lora_targets: list) -> dict:
    """Check the extras a LoRAConfig asks for against the model, changing nothing; returns the plan for
    apply_extras. lora_targets: the names of the modules LoRA adapts."""
    modules = dict(model.named_modules())
    embeddings = [n for n, m in modules.items() if type(m) is Embedding and _suffix_match(n, config.targets)]
    for name in embeddings:
        if config.use_dora or config.lora_bias:
            raise ValueError(f"LoRA on the table {name} is plain LoRA: use_dora and lora_bias act on linear layers "
                             "only")
        if config.r > min(modules[name].weight.shape):
            raise ValueError(f"LoRA rank r={config.r} exceeds min(rows, width) = {min(modules[name].weight.shape)} "
                             f"of {name} {tuple(modules[name].weight.shape)}")
    wanted = [t for t in config.modules_to_save if t != "lm_head"]
    copies = [n for n, m in modules.items() if type(m) in (Linear, LayerNorm, Embedding) and _suffix_match(n, wanted)]
    for t in wanted:
        if not any(_suffix_match(n, [t]) for n in copies):
            raise ValueError(f"modules_to_save names {t!r}, but no Linear, LayerNorm or Embedding of the model "
                             f"matches it (e.g. 'ln_f', 'wte', 'h.0.mlp.fc', 'lm_head')")
    head = "lm_head" in config.modules_to_save
    has_table = "wte" in modules and type(modules["wte"]) is Embedding and hasattr(model, "lm_head")
    if (head or config.trainable_token_indices) and not has_table:
        raise ValueError("lm_head and trainable tokens need a GPT whose token table wte is not already adapted")
    if getattr(model, "lm_head", None) is not None:
        raise ValueError("the model's output head is already adapted (lm_head is set)")
    clash = sorted(set(copies) & (set(lora_targets) | set(embeddings)))
    if clash:
        raise ValueError(f"{clash} are both LoRA targets and modules_to_save; a module is adapted one way")
    tokens = config.trainable_token_indices
    if tokens:
        V = modules["wte"].weight.shape[0]
        if max(tokens) >= V:
            raise ValueError(f"trainable token id {max(tokens)} is out of range: the vocabulary has {V} tokens")
        if "wte" in embeddings or "wte" in copies:
            raise ValueError("trainable tokens and LoRA or a full copy on wte cannot be combined: the table is "
                             "adapted one way")
    # as PEFT: ensure_weight_tying ties a saved lm_head to the table (one trained copy for both); a saved wte alone
    # stays untied, the head reading the original table
    return {"embeddings": embeddings, "copies": copies, "head": head, "tokens": tokens,
            "tie": config.ensure_weight_tying and head}


def planned_shapes(model: Module, config, plan: dict) -> dict:
    """{parameter name: shape} of what apply_extras will add for this plan (for checking a file against it)."""
    modules = dict(model.named_modules())
    shapes = {}
    for name in plan["embeddings"]:
        rows, C = modules[name].weight.shape
        shapes[f"{name}.lora_embedding_A"] = (config.r, rows)
        shapes[f"{name}.lora_embedding_B"] = (C, config.r)
    for name in plan["copies"]:
        shapes.update({f"{name}.copy.{k}": tuple(p.shape) for k, p in modules[name]._direct_parameters()})
    if plan["tokens"]:
        shapes["wte.token_values"] = (len(plan["tokens"]), modules["wte"].weight.shape[1])
    elif plan["tie"]:
        shapes.setdefault("wte.copy.weight", tuple(modules["wte"].weight.shape))
    elif plan["head"]:
        shapes["lm_head.weight"] = tuple(modules["wte"].weight.shape)
    return shapes


def apply_extras(model: Module, config, plan: dict, rng) -> None:
    """Apply a plan of plan_extras (in place)."""
    modules = dict(model.named_modules())

    def replace(name, new):
        parent, _, attr = name.rpartition(".")
        new.training = modules[name].training
        setattr(modules[parent] if parent else model, attr, new)

    for name in plan["embeddings"]:
        replace(name, LoRAEmbedding(modules[name], config.r, config.alpha, config.use_rslora, rng))
    for name in plan["copies"]:
        replace(name, TrainedCopy(modules[name]))
    if plan["tokens"]:
        model.wte = TrainableTokens(modules["wte"], plan["tokens"])
        model.lm_head = TiedHead(model.wte)      # PEFT keeps the tie for trainable tokens
    elif plan["tie"]:
        if "wte" not in plan["copies"]:
            model.wte = TrainedCopy(modules["wte"])
        model.lm_head = TiedHead(model.wte)      # one trained copy of the table for both uses
    elif plan["head"]:                           # an untied head, starting from the table
        model.lm_head = OutputHead(Parameter(model.wte.weight.data.copy(), added_by="modules_to_save"), model.wte)
