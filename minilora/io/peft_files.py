"""PEFT adapters in and out (adapter_config.json + adapter_model.safetensors) for the GPT-2 that
``interop.save_hf_gpt2`` writes, without torch or peft."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy

from ..core import backend
from ..core.model import GPT
from .files import load_safetensors, read_json, save_safetensors, write_json

_QKV = ("q_proj", "k_proj", "v_proj")


# ----------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format (adapter_model.safetensors + adapter_config.json)
#
# PEFT wraps HF modules: q, k and v share GPT-2's fused c_attn (C -> 3C). minilora's separate adapters on
# q and v become ONE c_attn adapter of rank r_q + r_v with block structure:
#     A' = [A_q; A_v]                (r_q + r_v, C)
#     B' = [[B_q, 0], [0, 0], [0, B_v]]   (3C, r_q + r_v): rows [q | k | v], columns [q's | v's]
# so that B' A' = [B_q A_q; 0; B_v A_v], exactly the two updates side by side. Loading splits it back,
# keeping for each of q, k, v only the columns that are non-zero in its row block.

_PEFT_PREFIX = "base_model.model."
_HF_LORA_NAMES = {"attn.o_proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def _hf_module_name(name: str) -> tuple[str, str | None]:
    """minilora module name -> (HF GPT-2 module name, which third of c_attn or None)."""
    block, rest = name.split(".attn.", 1) if ".attn." in name else (None, None)
    if rest in ("q_proj", "k_proj", "v_proj"):
        return f"transformer.{block}.attn.c_attn", rest
    for ours, theirs in _HF_LORA_NAMES.items():
        if name.endswith("." + ours):
            return f"transformer.{name[:-len(ours)]}{theirs}", None
    raise ValueError(f"{name!r} has no GPT-2 counterpart for a PEFT adapter")


def save_peft_adapter(model: GPT, path) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter for the GPT-2 written by ``save_hf_gpt2(model, ...)``.

    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_dir), path)`` then gives the same logits.
    A VeRA model is written as a PEFT VeRA adapter (vera_files.save_peft_vera).
    """
    from ..core.vera import vera_modules
    if vera_modules(model):
        from .vera_files import save_peft_vera
        return save_peft_vera(model, path)
    from ..core.dora import DoRALinear, column_norm
    from ..core.lora import lora_modules

    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    use_dora = isinstance(layers[0][1], DoRALinear)
    if any(isinstance(m, DoRALinear) != use_dora for _, m in layers):
        raise ValueError("the model mixes DoRA and plain LoRA layers; a PEFT adapter is one or the other")
    if any(m.merged for _, m in layers):
        raise ValueError("the adapters are merged into the weights: unmerge_lora(model) before exporting them")
    config = getattr(model, "lora_config", None)
    if config is not None and config.bias != "none":
        raise ValueError(f"bias={config.bias!r} adapters are not exported to PEFT; use bias='none'")
    modules = dict(model.named_modules())
    groups = {}   # HF module -> list of (third or None, LoRALinear)
    for name, m in layers:
        hf_name, third = _hf_module_name(name)
        groups.setdefault(hf_name, []).append((third, m))
    C = model.config.n_embd
    tensors, ranks, alphas, dropout = {}, {}, {}, 0.0
    for hf_name, parts in groups.items():
        scale = parts[0][1].scale
        A_parts = [backend.to_numpy(m.lora_A.data) for _, m in parts]
        rank = sum(a.shape[0] for a in A_parts)
        if parts[0][0] is None:                      # an ordinary (unfused) module
            B = backend.to_numpy(parts[0][1].lora_B.data)
        else:                                        # c_attn: block structure over [q | k | v]
            B = numpy.zeros((3 * C, rank), dtype=A_parts[0].dtype)
            col = 0
            for third, m in parts:
                row = ("q_proj", "k_proj", "v_proj").index(third) * C
                r = m.r
                B[row:row + C, col:col + r] = backend.to_numpy(m.lora_B.data) * (m.scale / scale)
                col += r
        tensors[f"{_PEFT_PREFIX}{hf_name}.lora_A.weight"] = numpy.concatenate(A_parts, axis=0)
        tensors[f"{_PEFT_PREFIX}{hf_name}.lora_B.weight"] = B
        if use_dora:    # PEFT's magnitude covers the whole module: an unadapted third of c_attn keeps g = m / ||W|| = 1
            if parts[0][0] is None:
                magnitude = backend.to_numpy(parts[0][1].lora_magnitude.data)
            else:
                adapted = {third: m for third, m in parts}
                block = hf_name[len("transformer."):-len(".attn.c_attn")]
                magnitude = numpy.concatenate([
                    backend.to_numpy(adapted[t].lora_magnitude.data) if t in adapted
                    else backend.to_numpy(column_norm(modules[f"{block}.attn.{t}"].weight.data)) for t in _QKV])
            tensors[f"{_PEFT_PREFIX}{hf_name}.lora_magnitude_vector"] = magnitude
        ranks[hf_name], alphas[hf_name] = rank, scale * rank      # PEFT: scaling = lora_alpha / r
        dropout = max(dropout, max(m.dropout for _, m in parts))
    first = next(iter(ranks))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": ranks[first], "lora_alpha": alphas[first], "rank_pattern": ranks, "alpha_pattern": alphas,
        "target_modules": sorted(ranks), "lora_dropout": dropout, "fan_in_fan_out": True, "bias": "none",
        "use_rslora": False, "use_dora": use_dora, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True,
    }
    path = Path(path)
    # the config rides in the weights file too, under its integrity record, so that minilora can tell an edited
    # or half-written adapter_config.json from the one written with these weights (PEFT ignores the extra key)
    write_json(path / "adapter_config.json", adapter_config)
    save_safetensors(tensors, path / "adapter_model.safetensors",
                     metadata={"format": "pt", PEFT_CONFIG_COPY: json.dumps(adapter_config, sort_keys=True)})
    return path


PEFT_CONFIG_COPY = "minilora_adapter_config"
PEFT_REQUIRED = ("r", "lora_alpha", "target_modules")


def read_peft_config(path) -> dict:
    """An adapter_config.json as a dict: a clear error naming the file when it is not JSON or not an object."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}; a PEFT adapter config is a JSON object")
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field: (what it must be, the test); checked before anything else is read
_LORA_FIELDS = {
    "r": ("an int >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "lora_alpha": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "target_modules": ("a module name or a list of them", lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(t, str) for t in v))),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "rank_pattern": ("an object {module pattern: int >= 1}", lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in v.values()))),
    "alpha_pattern": ("an object {module pattern: number > 0}", lambda v: v is None or (isinstance(v, dict) and all(
        _is_number(a) and a > 0 for a in v.values()))),
}
# fields whose non-default value changes the model in ways this loader does not apply: refused by name
_UNSUPPORTED = {
    "modules_to_save": (None, [], "full copies of whole modules"),
    "lora_bias": (False, "trained biases of the LoRA B layers"),
    "trainable_token_indices": (None, "trained rows of the token embedding"),
}


def _check_lora_fields(config: dict, file) -> None:
    for key, (expected, ok) in _LORA_FIELDS.items():
        if key in config and not ok(config[key]):
            raise ValueError(f"{file}: {key}={config[key]!r}; expected {expected}")
    for key, (*defaults, what) in _UNSUPPORTED.items():
        if config.get(key, defaults[0]) not in defaults:
            raise ValueError(f"{file}: {key}={config[key]!r} ({what}) is not supported by minilora's loader; "
                             f"expected {defaults[0]!r}")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(f"{file}: init_lora_weights={init!r} changes the base weights (the adapter belongs to "
                         "PEFT's residual base, not to the original weights); load it over the base PEFT saved "
                         "with it, or save it with path_initial_model_for_weight_conversion so that it applies "
                         "to the original weights")


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def load_peft_adapter(model: GPT, path) -> GPT:
    """Apply a PEFT LoRA adapter saved for a GPT-2 model to a minilora GPT without adapters (in place); a PEFT
    VeRA adapter goes to vera_files.load_peft_vera."""
    config_path = Path(path) / "adapter_config.json"
    if config_path.is_file() and read_peft_config(config_path).get("peft_type") == "VERA":
        from .vera_files import load_peft_vera
        return load_peft_vera(model, path)
    from ..core.dora import DoRALinear
    from ..core.lora import LoRAConfig, LoRALinear, lora_modules

    path = Path(path)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; load a PEFT adapter into a base model")
    config = read_peft_config(path / "adapter_config.json")
    missing = [key for key in PEFT_REQUIRED if key not in config]
    if missing:
        raise ValueError(f"{path / 'adapter_config.json'} lacks {missing}: a PEFT LoRA config always has "
                         f"{list(PEFT_REQUIRED)} (refusing to guess their values)")
    _check_lora_fields(config, path / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter; only LORA is supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config.get('bias')!r} is not supported (expected 'none')")
    use_dora = config.get("use_dora", False)
    if use_dora not in (True, False):
        raise ValueError(f"{path / 'adapter_config.json'}: use_dora={use_dora!r}; expected true or false")
    tensors, header = load_safetensors(path / "adapter_model.safetensors")
    if PEFT_CONFIG_COPY in header and json.loads(header[PEFT_CONFIG_COPY]) != config:
        raise ValueError(f"{path / 'adapter_config.json'} does not match the config minilora wrote with "
                         f"{path / 'adapter_model.safetensors'}: it was edited, or a save was interrupted")
    known = (".lora_A.weight", ".lora_B.weight") + ((".lora_magnitude_vector",) if use_dora else ())
    unknown = sorted(k for k in tensors if not k.endswith(known))
    if unknown:
        raise ValueError(f"{path / 'adapter_model.safetensors'} holds tensors minilora cannot apply: {unknown}")
    orphans = sorted(k for k in tensors if k.endswith(".lora_B.weight")
                     and k.replace(".lora_B.", ".lora_A.") not in tensors)
    if orphans:
        raise ValueError(f"{path}: {orphans} have no matching lora_A")
    C = model.config.n_embd
    modules = dict(model.named_modules())
    plan = []   # (our module name, A, B, scale, DoRA magnitude or None)
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        hf_name = key[len(_PEFT_PREFIX):-len(".lora_A.weight")] if key.startswith(_PEFT_PREFIX) else key[:-len(".lora_A.weight")]
        A, B = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        if B is None:
            raise ValueError(f"{path}: {key} has no matching lora_B")
        magnitude = tensors.get(key.replace(".lora_A.weight", ".lora_magnitude_vector")) if use_dora else None
        if use_dora and (magnitude is None or magnitude.shape != (B.shape[0],)):
            raise ValueError(f"{path}: use_dora is set, so {hf_name} needs a lora_magnitude_vector of shape "
                             f"{(B.shape[0],)}; found {None if magnitude is None else magnitude.shape}")
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), hf_name, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        short = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
        if short.endswith(".attn.c_attn"):
            block = short[:-len(".attn.c_attn")]
            if B.shape != (3 * C, r):
                raise ValueError(f"{path}: {key} pairs with lora_B of shape {B.shape}; c_attn needs {(3 * C, r)}")
            for j, third in enumerate(("q_proj", "k_proj", "v_proj")):
                rows = B[j * C:(j + 1) * C]
                cols = numpy.flatnonzero(numpy.abs(rows).sum(axis=0))
                m_third = None if magnitude is None else magnitude[j * C:(j + 1) * C]
                if not cols.size and m_third is not None and f"{block}.attn.{third}" in modules \
                        and not _magnitude_is_norm(m_third, modules[f"{block}.attn.{third}"].weight.data):
                    cols = numpy.arange(1)    # no update, but a trained magnitude: DoRA with a zero B column
                if cols.size:
                    plan.append((f"{block}.attn.{third}", A[cols], rows[:, cols], scale, m_third))
        else:
            ours = next((short[:-len(theirs)] + o for o, theirs in _HF_LORA_NAMES.items() if short.endswith(theirs)), None)
            if ours is None:
                raise ValueError(f"{path}: no minilora module corresponds to {hf_name!r}")
            plan.append((ours, A, B, scale, magnitude))
    if not plan:
        raise ValueError(f"{path}: the adapter holds no lora_A/lora_B tensors")
    for name, A, B, *_ in plan:
        if name not in modules:
            raise ValueError(f"{path}: the adapter targets {name!r}, which this model does not have")
        W = modules[name].weight
        if A.shape[1] != W.shape[0] or B.shape[0] != W.shape[1]:
            raise ValueError(f"{path}: the adapter for {name} has A {A.shape}, B {B.shape}; W is {tuple(W.shape)}")
    for p in model.parameters():
        p.trainable = False
    dropout_rng = backend.rng(1)
    for name, A, B, scale, magnitude in plan:
        parent_name, attr = name.rsplit(".", 1)
        base = modules[name]
        r = A.shape[0]
        layer_class = DoRALinear if use_dora else LoRALinear
        wrapped = layer_class(base, r, scale * r, config.get("lora_dropout", 0.0), dropout_rng=dropout_rng)
        wrapped.lora_A.data[...] = backend.asarray(A, dtype=base.weight.data.dtype)
        wrapped.lora_B.data[...] = backend.asarray(B, dtype=base.weight.data.dtype)
        if use_dora:
            wrapped.lora_magnitude.data[...] = backend.asarray(magnitude, dtype=base.weight.data.dtype)
        wrapped.training = base.training
        setattr(modules[parent_name], attr, wrapped)
    ranks = sorted({A.shape[0] for _, A, *_ in plan})
    model.lora_config = LoRAConfig(r=ranks[-1], alpha=plan[0][3] * ranks[-1], targets=tuple(n for n, *_ in plan),
                                   dropout=config.get("lora_dropout", 0.0), use_dora=use_dora)
    return model


def _magnitude_is_norm(magnitude, W) -> bool:
    """Whether a DoRA magnitude equals the column norms of W to the rounding of its own dtype, so that
    g = m / ||W||_c is 1 and a third of c_attn without an update needs no DoRA layer."""
    from ..core.dora import column_norm

    norm = backend.to_numpy(column_norm(backend.asarray(W, dtype="float64")))
    eps = numpy.finfo(numpy.dtype(magnitude.dtype)).eps
    return bool(numpy.all(numpy.abs(magnitude.astype(numpy.float64) / norm - 1.0) <= 16 * eps))
