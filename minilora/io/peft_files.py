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


def save_peft_adapter(model: GPT, path, base: str = "original") -> Path:
    """Write the model's LoRA adapters as a PEFT adapter for the GPT-2 written by ``save_hf_gpt2(model, ...)``.

    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_dir), path)`` then gives the same logits.
    A VeRA model is written as a PEFT VeRA adapter (vera_files.save_peft_vera).

    PiSSA layers (init="pissa") train over a residual of the pretrained weights, and ``base`` says which weights
    the directory is for (see "PiSSA adapters" below): "original" (the default) converts each PiSSA layer's
    adapter to rank 2r for the ORIGINAL pretrained weights (the model saved before apply_lora), an ordinary
    adapter (init_lora_weights true) that loads anywhere a LoRA does; "residual" writes them as they train, rank
    r, for the RESIDUAL weights that ``save_hf_gpt2(model, ...)`` writes from this model, marked
    init_lora_weights="pissa_residual" so that no loader takes the directory for an adapter of the original
    weights. Other layers are written as they are either way.
    """
    _check_export_base(model, base)
    from ..core.vera import vera_modules
    if vera_modules(model):
        from .vera_files import save_peft_vera
        return save_peft_vera(model, path)
    from ..core.dora import DoRALinear, column_norm
    from ..core.lora import lora_modules
    from ..core.lora_extras import extra_modules

    layers = lora_modules(model)
    if not layers and not extra_modules(model):
        raise ValueError("the model has no LoRA adapters to export")
    use_dora = bool(layers) and isinstance(layers[0][1], DoRALinear)
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
        pairs = [_exported_pair(m, base) for _, m in parts]     # (A, B) per layer: rank 2r for converted PiSSA
        A_parts = [A_m for A_m, _ in pairs]
        rank = sum(a.shape[0] for a in A_parts)
        if parts[0][0] is None:                      # an ordinary (unfused) module
            B = pairs[0][1]
        else:                                        # c_attn: block structure over [q | k | v]
            B = numpy.zeros((3 * C, rank), dtype=A_parts[0].dtype)
            col = 0
            for (third, m), (A_m, B_m) in zip(parts, pairs):
                row = _QKV.index(third) * C
                r = A_m.shape[0]
                B[row:row + C, col:col + r] = B_m * (m.scale / scale)
                col += r
        tensors[f"{_PEFT_PREFIX}{hf_name}.lora_A.weight"] = numpy.concatenate(A_parts, axis=0)
        tensors[f"{_PEFT_PREFIX}{hf_name}.lora_B.weight"] = B
        if any(m.lora_bias is not None for _, m in parts):     # PEFT's lora_B.bias, inside the same scale
            tensors[f"{_PEFT_PREFIX}{hf_name}.lora_B.bias"] = _joined_lora_bias(parts, scale, C)
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
    extras = _export_extras(model, tensors, ranks, alphas)     # refuses an adapter without a LoRA target
    first = next(iter(ranks))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": ranks[first], "lora_alpha": alphas[first], "rank_pattern": ranks, "alpha_pattern": alphas,
        "target_modules": sorted(ranks), "lora_dropout": dropout, "fan_in_fan_out": True, "bias": "none",
        "use_rslora": False, "use_dora": use_dora, "init_lora_weights": _init_lora_weights(layers, base),
        "inference_mode": True, **extras,
    }
    path = Path(path)
    # the config rides in the weights file too, under its integrity record, so that minilora can tell an edited
    # or half-written adapter_config.json from the one written with these weights (PEFT ignores the extra key)
    write_json(path / "adapter_config.json", adapter_config)
    save_safetensors(tensors, path / "adapter_model.safetensors",
                     metadata={"format": "pt", PEFT_CONFIG_COPY: json.dumps(adapter_config, sort_keys=True)})
    return path


def _joined_lora_bias(parts, scale, C):
    """The lora_B.bias of one PEFT module (out,): a layer's own, or for c_attn the thirds' side by side over
    [q | k | v] (zero for a third without one), each rescaled to the module's common scale as its B columns are."""
    if parts[0][0] is None:
        return backend.to_numpy(parts[0][1].lora_bias.data)
    bias = numpy.zeros(3 * C, dtype=backend.to_numpy(parts[0][1].lora_B.data).dtype)
    for third, m in parts:
        if m.lora_bias is not None:
            row = _QKV.index(third) * C
            bias[row:row + C] = backend.to_numpy(m.lora_bias.data) * (m.scale / scale)
    return bias


def _hf_copy_name(name: str) -> tuple[str, str | None]:
    """minilora module name -> (HF GPT-2 module name, third of c_attn or None), LayerNorms and tables included."""
    if name in ("wte", "wpe", "ln_f") or name.endswith((".ln_1", ".ln_2")):
        return f"transformer.{name}", None
    return _hf_module_name(name)


def _export_extras(model: GPT, tensors: dict, ranks: dict, alphas: dict) -> dict:
    """Write what PEFT trains besides the linear layers' LoRA into ``tensors`` (and the tables' LoRA ranks and
    alphas into ``ranks``/``alphas``); returns the config fields that describe it."""
    from ..core.lora import lora_modules
    from ..core.lora_extras import LoRAEmbedding, OutputHead, TiedHead, TrainableTokens, TrainedCopy, extra_modules

    modules = dict(model.named_modules())
    fields = {"lora_bias": any(m.lora_bias is not None for _, m in lora_modules(model)),
              "modules_to_save": None, "trainable_token_indices": None, "ensure_weight_tying": False}
    copies = {}
    for name, m in extra_modules(model):
        if isinstance(m, LoRAEmbedding):
            hf = f"transformer.{name}"
            tensors[f"{_PEFT_PREFIX}{hf}.lora_embedding_A"] = backend.to_numpy(m.lora_embedding_A.data)
            tensors[f"{_PEFT_PREFIX}{hf}.lora_embedding_B"] = backend.to_numpy(m.lora_embedding_B.data)
            ranks[hf], alphas[hf] = m.r, m.scale * m.r
        elif isinstance(m, TrainableTokens):
            tensors[f"{_PEFT_PREFIX}transformer.wte.token_adapter.trainable_tokens_delta"] = \
                backend.to_numpy(m.token_values.data)
            fields["trainable_token_indices"] = [int(t) for t in m.indices]
        elif isinstance(m, TrainedCopy):
            hf, third = _hf_copy_name(name)
            copies.setdefault(hf, {})[third] = m.copy
    clash = sorted(set(copies) & set(ranks))
    if clash:
        raise ValueError(f"{clash} would be both a LoRA target and a module to save in PEFT (q, k and v share "
                         "c_attn there), which PEFT cannot express; train them one way")
    if not ranks:
        raise ValueError("a PEFT LoRA adapter needs at least one LoRA target (target_modules); this model trains "
                         "only full copies or token rows")
    saved = []
    for hf, parts in copies.items():
        if None in parts:
            arrays = {k: backend.to_numpy(p.data) for k, p in parts[None]._direct_parameters()}
        else:                  # c_attn: the thirds side by side, the original weights where no copy trains
            block = hf[len("transformer."):-len(".attn.c_attn")]
            thirds = [parts.get(t) or modules[f"{block}.attn.{t}"] for t in _QKV]
            arrays = {k: numpy.concatenate([backend.to_numpy(getattr(m, k).data) for m in thirds], axis=-1)
                      for k in ("weight", "bias")}
        for k, a in arrays.items():
            tensors[f"{_PEFT_PREFIX}{hf}.{k}"] = a
        saved.append(hf)
    head = model.lm_head
    if isinstance(head, OutputHead):
        tensors[f"{_PEFT_PREFIX}lm_head.weight"] = backend.to_numpy(head.weight.data)
        saved.append("lm_head")
    elif isinstance(head, TiedHead) and isinstance(model.wte, TrainedCopy):
        # one trained table for both uses: PEFT ties a saved lm_head to the table when it loads this spelling
        tensors[f"{_PEFT_PREFIX}lm_head.weight"] = backend.to_numpy(model.wte.copy.weight.data)
        fields["ensure_weight_tying"] = True
        saved = [hf for hf in saved if hf != "transformer.wte"] + ["lm_head"]
    if saved:
        fields["modules_to_save"] = saved
    return fields


PEFT_CONFIG_COPY = "minilora_adapter_config"
PEFT_REQUIRED = ("peft_type", "r", "lora_alpha", "target_modules")


def read_peft_config(path) -> dict:
    """An adapter_config.json as a dict: a clear error naming the file when it is not JSON or not an object."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}; a PEFT adapter config is a JSON object")
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value, least=0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _names(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))


def _is_off(value) -> bool:
    return value is None or value is False or value == [] or value == {}


# Every field of PEFT's LoraConfig, with what it must be. Fields that only describe the adapter (its task, the
# hub name of its base, the PEFT version...) or that only act when PEFT creates a new adapter (which layers to
# target: the tensors and target_modules say which ones were) are checked for their type and then have no effect
# on the numbers; every other field is applied below, or must hold its "off" value (_OFF_ONLY).
_LORA_FIELDS = {
    "peft_type": ("a string", lambda v: isinstance(v, str)),
    "r": ("an int >= 1", lambda v: _is_int(v, 1)),
    "lora_alpha": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "target_modules": ("a module name, a regular expression, or a list of module names", _names),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "lora_bias": ("true or false", lambda v: isinstance(v, bool)),
    "ensure_weight_tying": ("true or false", lambda v: isinstance(v, bool)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),    # GPT-2's Conv1D is (in, out) either way
    "inference_mode": ("true or false", lambda v: isinstance(v, bool)),
    "rank_pattern": ("an object {module pattern: int >= 1}", lambda v: v is None or (isinstance(v, dict) and all(
        _is_int(r, 1) for r in v.values()))),
    "alpha_pattern": ("an object {module pattern: number > 0}", lambda v: v is None or (isinstance(v, dict) and all(
        _is_number(a) and a > 0 for a in v.values()))),
    "bias": ("'none'", lambda v: v == "none"),
    "init_lora_weights": ("true, false or 'gaussian' (initialisations that leave the base weights as they are)",
                          lambda v: v in (True, False, "gaussian")),
    "modules_to_save": ("null or a list of module names", lambda v: v is None or _names(v)),
    "trainable_token_indices": ("null, a list of token ids, or {embedding name: list of token ids}", lambda v:
                                v is None or (isinstance(v, list) and all(_is_int(t) for t in v)) or (
                                    isinstance(v, dict) and all(isinstance(k, str) and isinstance(ids, list) and all(
                                        _is_int(t) for t in ids) for k, ids in v.items()))),
    "layers_to_transform": ("null, an int or a list of ints", lambda v: v is None or _is_int(v) or (
        isinstance(v, list) and all(_is_int(t) for t in v))),
    "layers_pattern": ("null, a name or a list of names", lambda v: v is None or _names(v)),
    "exclude_modules": ("null, a module name, a regular expression, or a list of names", lambda v: v is None or
                        _names(v)),
    "task_type": ("null or a string", lambda v: v is None or isinstance(v, str)),
    "base_model_name_or_path": ("null or a string", lambda v: v is None or isinstance(v, str)),
    "revision": ("null or a string", lambda v: v is None or isinstance(v, str)),
    "peft_version": ("null or a string", lambda v: v is None or isinstance(v, str)),
    "auto_mapping": ("null or an object", lambda v: v is None or isinstance(v, dict)),
    "megatron_core": ("null or a string", lambda v: v is None or isinstance(v, str)),
    "qalora_group_size": ("an int", lambda v: _is_int(v)),      # acts only with use_qalora, which must be off
    "loftq_config": ("an object", lambda v: isinstance(v, dict)),   # acts only with init_lora_weights="loftq"
}
# fields that change the model in ways minilora's GPT does not have; they must hold their off value (null, false,
# [] or {}), and each is refused by name otherwise
_OFF_ONLY = {
    "layer_replication": "repeated decoder layers",
    "use_qalora": "QA-LoRA's pooled quantised inputs",
    "target_parameters": "LoRA on raw parameters instead of modules",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which acts only after invocation tokens",
    "megatron_config": "Megatron's parallel layers",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow's routing over several LoRA experts",
    "kasa_config": "KaSA's singular-value adaptation",
    "monteclora_config": "MonteCLoRA's stochastic adapters",
    "velora_config": "VeLoRA's compressed activations",
    "eva_config": "EVA's data-driven initialisation",
    "corda_config": "CorDA's initialisation",
    "lora_ga_config": "LoRA-GA's initialisation",
}


def _check_lora_fields(config: dict, file) -> None:
    """Every field of a LORA config accounted for: required ones present, known ones of the right type and
    supported value, unknown ones refused by name. Runs before any tensor is read."""
    missing = [key for key in PEFT_REQUIRED if key not in config]
    if missing:
        raise ValueError(f"{file} lacks {missing}: a PEFT LoRA config always has {list(PEFT_REQUIRED)} (refusing "
                         "to guess their values)")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise ValueError(f"{file}: init_lora_weights={init!r} changes the base weights: its A, B belong to the "
                         "residual base PEFT derives from the original weights, not to the original weights. Two "
                         "ways out: convert it in PEFT with save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...), a rank-2r adapter for the original weights "
                         "that loads here; or load it over the residual base PEFT saved "
                         "(peft_model.get_base_model().save_pretrained) after setting init_lora_weights to true in "
                         "a copy of this config")
    for key, value in config.items():
        if key in _LORA_FIELDS:
            expected, ok = _LORA_FIELDS[key]
            if not ok(value):
                raise ValueError(f"{file}: {key}={value!r}; expected {expected}")
        elif key in _OFF_ONLY:
            if not _is_off(value):
                raise ValueError(f"{file}: {key}={value!r} ({_OFF_ONLY[key]}) is not supported by minilora's "
                                 "loader; expected it off (null, false or empty)")
        else:
            raise ValueError(f"{file}: the field {key!r} is not one minilora's loader knows (PEFT LoraConfig "
                             f"fields: {sorted(_LORA_FIELDS) + sorted(_OFF_ONLY)}); refusing to guess what it does")


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# ----------------------------------------------------------------------------------------------------
# which GPT-2 modules a config adapts, by PEFT's rules

def _gpt2_modules(n_layer: int) -> dict:
    """{HF GPT-2 module name: its kind} for the modules an adapter may touch."""
    names = {"transformer.wte": "embedding", "transformer.wpe": "embedding", "transformer.ln_f": "layernorm",
             "lm_head": "head"}
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.ln_1": "layernorm", f"transformer.h.{i}.ln_2": "layernorm",
                      f"transformer.h.{i}.attn.c_attn": "linear", f"transformer.h.{i}.attn.c_proj": "linear",
                      f"transformer.h.{i}.mlp.c_fc": "linear", f"transformer.h.{i}.mlp.c_proj": "linear"})
    return names


def _layer_index(name: str):
    match = re.search(r"\.h\.(\d+)\.", name)
    return None if match is None else int(match.group(1))


def _peft_targets(config: dict, names) -> set:
    """The modules PEFT puts LoRA layers on: target_modules (a string: a regular expression the whole name
    matches; a list: names equal to or ending in "." + an entry), narrowed by layers_to_transform and
    exclude_modules the same way."""
    def matches(spec, name):
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)

    layers = config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    chosen = set()
    for name in names:
        if not matches(config["target_modules"], name):
            continue
        if layers is not None and _layer_index(name) not in layers:
            continue
        if config.get("exclude_modules") and matches(config["exclude_modules"], name):
            continue
        chosen.add(name)
    return chosen


def _saved_modules(config: dict, names) -> list:
    """The modules PEFT keeps full trained copies of: every module whose name ends with an entry of
    modules_to_save (with ensure_weight_tying, a copy of the table or of the head is one copy serving both)."""
    wanted = config.get("modules_to_save") or []
    wanted = [wanted] if isinstance(wanted, str) else wanted
    return sorted(n for n in names if any(n.endswith(t) for t in wanted))


# ----------------------------------------------------------------------------------------------------
# loading

_LORA_TENSOR = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                          r"lora_magnitude_vector|lora_embedding_A|lora_embedding_B|"
                          r"token_adapter\.trainable_tokens_delta)$")


def load_peft_adapter(model: GPT, path) -> GPT:
    """Apply a PEFT adapter saved for a GPT-2 model to a minilora GPT without adapters (in place).

    Every field of adapter_config.json and every tensor of adapter_model.safetensors is accounted for: applied
    exactly as PEFT applies it (LoRA on the linear layers, on the token or position table, with rsLoRA, rank and
    alpha patterns, DoRA, lora_bias; trainable tokens; modules_to_save, the tied head included), or the load is
    refused before the model changes, naming the file and what is not supported. A PEFT VeRA adapter goes to
    vera_files.load_peft_vera.
    """
    from ..core.lora import lora_modules
    from ..core.lora_extras import extra_modules

    if not isinstance(model, GPT):
        raise TypeError(f"load_peft_adapter expects a minilora GPT; got {type(model).__name__}")
    if lora_modules(model) or extra_modules(model) or model.lm_head is not None:
        raise ValueError("the model already has LoRA adapters; load a PEFT adapter into a base model")
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise FileNotFoundError(f"no PEFT adapter directory at {path}")
    config = read_peft_config(config_file)
    if not weights_file.is_file() and (path / "adapter_model.bin").is_file():
        raise ValueError(f"{path / 'adapter_model.bin'} is a pickle, which minilora never loads (it can run code); "
                         "save the adapter with safe_serialization=True (adapter_model.safetensors)")
    if config.get("peft_type") == "VERA":
        from .vera_files import load_peft_vera
        return load_peft_vera(model, path)
    if "peft_type" in config and config["peft_type"] != "LORA":
        raise ValueError(f"{config_file} holds a {config['peft_type']!r} adapter; minilora loads LORA (and VERA)")
    _check_lora_fields(config, config_file)
    tensors, header = load_safetensors(weights_file)        # names the file if damaged, truncated or non-finite
    if PEFT_CONFIG_COPY in header and json.loads(header[PEFT_CONFIG_COPY]) != config:
        raise ValueError(f"{config_file} does not match the config minilora wrote with {weights_file}: it was "
                         "edited, or a save was interrupted")
    plan = _plan_peft_load(model, config, tensors, weights_file, config_file)
    _apply_peft_plan(model, config, plan)
    return model


def _strip(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _plan_peft_load(model: GPT, config: dict, tensors: dict, file, config_file) -> dict:
    """Sort every tensor of the weights ``file`` into what it does, check every shape against the model and the
    config (read from ``config_file``), and return the plan; changes nothing."""
    C, V = model.config.n_embd, model.config.vocab_size
    names = _gpt2_modules(model.config.n_layer)
    targets = _peft_targets(config, names)
    saved = _saved_modules(config, names)
    # ensure_weight_tying ties a saved lm_head to the table: one trained copy for both. PEFT writes such an
    # adapter as modules_to_save ["transformer.wte"] with the copy twice (transformer.wte.weight, lm_head.weight);
    # a saved wte without lm_head stays untied (the head reads the original table).
    tie = config.get("ensure_weight_tying", False) and (
        "lm_head" in saved or ("transformer.wte" in saved and _PEFT_PREFIX + "lm_head.weight" in tensors))
    if tie:
        saved = sorted(set(saved) | {"transformer.wte"} - {"lm_head"})
    token_ids = config.get("trainable_token_indices")
    if isinstance(token_ids, dict):
        tables = sorted(token_ids)
        if any(t != "transformer.wte" and not "transformer.wte".endswith("." + t) for t in tables):
            raise ValueError(f"{config_file}: trainable_token_indices names {tables}; minilora's GPT has trainable "
                             "tokens only on its token table (wte)")
        token_ids = [t for ids in token_ids.values() for t in ids]
    token_ids = list(token_ids or [])
    unsupported = sorted(t for t in targets if names[t] in ("head", "layernorm"))
    if unsupported:
        raise ValueError(f"{config_file}: target_modules puts LoRA on {unsupported}; minilora supports LoRA on the "
                         "linear layers and the token and position tables (LoRA on the output head is not supported)")
    clash = sorted(set(targets) & set(saved))
    if clash:
        raise ValueError(f"{config_file}: {clash} are both LoRA targets and modules_to_save; minilora does not "
                         "combine them")
    if token_ids and ("transformer.wte" in targets or "transformer.wte" in saved):
        raise ValueError(f"{config_file}: trainable tokens and LoRA or a full copy on wte cannot be combined")
    if config.get("use_dora") and any(names[t] == "embedding" for t in targets):
        raise ValueError(f"{config_file}: use_dora with LoRA on an embedding table is not supported by minilora's "
                         "loader")
    if config.get("lora_bias") and any(names[t] == "embedding" for t in targets):
        raise ValueError(f"{config_file}: lora_bias with LoRA on an embedding table is not supported by minilora's "
                         "loader")
    if config.get("lora_bias") and config.get("use_dora"):
        raise ValueError(f"{config_file}: lora_bias with use_dora is not supported")

    found = {}                      # module -> {kind: array}
    copies = {}                     # saved module -> {"weight"/"bias": array}
    for key, value in tensors.items():
        name = _strip(key)
        match = _LORA_TENSOR.match(name)
        if match is not None:
            found.setdefault(match["module"], {})[match["kind"]] = value
            continue
        module, _, kind = name.rpartition(".")
        if module in saved and kind in ("weight", "bias"):
            copies.setdefault(module, {})[kind] = value
            continue
        if tie and module == "lm_head" and kind == "weight" and "transformer.wte" in saved:
            copies.setdefault("lm_head (tied)", {})["weight"] = value
            continue
        raise ValueError(f"{file} holds the tensor {key!r}, which the config does not account for (LoRA targets: "
                         f"{sorted(targets)}; modules_to_save: {saved}); minilora refuses to ignore it")
    deltas = {m: kinds.pop("token_adapter.trainable_tokens_delta") for m, kinds in found.items()
              if "token_adapter.trainable_tokens_delta" in kinds}
    found = {m: kinds for m, kinds in found.items() if kinds}
    if set(deltas) - {"transformer.wte"}:
        raise ValueError(f"{file} holds trainable tokens for {sorted(set(deltas) - {'transformer.wte'})}; "
                         "minilora's GPT has them only on its token table (transformer.wte)")
    lora = {}
    for module in sorted(set(found) | targets):
        parts = found.get(module, {})
        if module not in targets:
            raise ValueError(f"{file} holds LoRA tensors {sorted(parts)} for {module!r}, which target_modules "
                             f"{config['target_modules']!r} does not adapt; PEFT would ignore them")
        lora[module] = _lora_entry(module, names[module], parts, config, model, file)
    tokens = None
    if token_ids:
        delta = deltas.get("transformer.wte")
        if delta is None:
            raise ValueError(f"{file}: trainable_token_indices is set but the file has no "
                             "transformer.wte.token_adapter.trainable_tokens_delta")
        if len(set(token_ids)) != len(token_ids) or max(token_ids) >= V:
            raise ValueError(f"{file}: trainable_token_indices {token_ids} must be distinct ids below {V}")
        if tuple(delta.shape) != (len(token_ids), C):
            raise ValueError(f"{file}: trainable_tokens_delta has shape {tuple(delta.shape)}; "
                             f"{len(token_ids)} tokens need {(len(token_ids), C)}")
        tokens = (token_ids, delta)
    elif deltas:
        raise ValueError(f"{file} holds trainable_tokens_delta but the config sets no trainable_token_indices")
    full = {}
    for module in saved:
        kind = names[module]
        if module not in copies:
            raise ValueError(f"{file}: modules_to_save names {module!r} but the file holds no weights for it")
        arrays = copies[module]
        shapes = _copy_shapes(kind, module, model)
        got = {k: tuple(v.shape) for k, v in arrays.items()}
        if got != shapes:
            raise ValueError(f"{file}: modules_to_save {module!r} holds {got}; this model needs {shapes}")
        full[module] = arrays
    tied_head = copies.get("lm_head (tied)")
    if tied_head is not None and not numpy.array_equal(tied_head["weight"], full["transformer.wte"]["weight"]):
        raise ValueError(f"{file}: ensure_weight_tying is set but lm_head.weight differs from the tied "
                         "transformer.wte.weight")
    if not lora and not full and tokens is None:
        raise ValueError(f"{file}: the adapter holds nothing to apply")
    return {"lora": lora, "full": full, "tokens": tokens, "head": "lm_head" in full, "tie": tie}


def _copy_shapes(kind, module, model) -> dict:
    """{"weight": shape, "bias": shape} a saved copy of this HF GPT-2 module (of _gpt2_modules' ``kind``) holds."""
    C, V = model.config.n_embd, model.config.vocab_size
    if kind == "layernorm":
        return {"weight": (C,), "bias": (C,)}
    if kind == "head":
        return {"weight": (V, C)}
    if kind == "embedding":
        return {"weight": (V if module.endswith("wte") else model.config.block_size, C)}
    W = dict(model.named_modules())[_minilora_names(module)[0]].weight      # a linear layer (c_attn: three)
    width = W.shape[1] * (3 if module.endswith("c_attn") else 1)
    return {"weight": (W.shape[0], width), "bias": (width,)}


def _minilora_names(hf_name: str) -> list:
    """The minilora module(s) of an HF GPT-2 module name (c_attn is three: q, k, v)."""
    short = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
    if short.endswith(".attn.c_attn"):
        return [f"{short[:-len('c_attn')]}{t}" for t in _QKV]
    for ours, theirs in _HF_LORA_NAMES.items():
        if short.endswith(theirs):
            return [short[:-len(theirs)] + ours]
    return [short]


def _lora_entry(module, kind, parts, config, model, file) -> dict:
    """One adapted module's tensors, checked: (A, B, bias, magnitude, scale)."""
    embedding = kind == "embedding"
    A_key, B_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    wanted = {A_key, B_key} | ({"lora_B.bias"} if config.get("lora_bias") else set()) | (
        {"lora_magnitude_vector"} if config.get("use_dora") else set())
    if set(parts) != wanted:
        missing, extra = sorted(wanted - set(parts)), sorted(set(parts) - wanted)
        raise ValueError(f"{file}: {module} is a LoRA target; the config needs its tensors {sorted(wanted)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    A, B = parts[A_key], parts[B_key]
    r = A.shape[0]
    expected_r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if r != expected_r or B.ndim != 2 or B.shape[1] != r:
        raise ValueError(f"{file}: {module} has A {tuple(A.shape)}, B {tuple(B.shape)}; the config gives it rank "
                         f"{expected_r}")
    modules = dict(model.named_modules())
    ours = _minilora_names(module)
    if any(n not in modules for n in ours):
        raise ValueError(f"{file}: the adapter targets {module!r}, which this model does not have")
    if embedding:
        W = modules[ours[0]].weight
        rows, width = W.shape                       # A: (r, rows), B: (width, r)
        in_f, out_f = rows, width
    else:
        in_f = modules[ours[0]].weight.shape[0]
        out_f = sum(modules[n].weight.shape[1] for n in ours)
    if A.shape != (r, in_f) or B.shape != (out_f, r):
        raise ValueError(f"{file}: the adapter for {module} has A {tuple(A.shape)}, B {tuple(B.shape)}; this model "
                         f"needs A {(r, in_f)}, B {(out_f, r)}"
                         + ("; c_attn needs B (3C, r)" if len(ours) == 3 else ""))
    bias, magnitude = parts.get("lora_B.bias"), parts.get("lora_magnitude_vector")
    for extra_name, extra in (("lora_B.bias", bias), ("lora_magnitude_vector", magnitude)):
        if extra is not None and tuple(extra.shape) != (out_f,):
            raise ValueError(f"{file}: {module}.{extra_name} has shape {tuple(extra.shape)}; expected {(out_f,)}")
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {"names": ours, "A": A, "B": B, "bias": bias, "magnitude": magnitude, "scale": scale,
            "embedding": embedding}


def _apply_peft_plan(model: GPT, config: dict, plan: dict) -> None:
    """Build the adapted modules of a checked plan (nothing here can fail on the file's content)."""
    from ..core.dora import DoRALinear
    from ..core.lora import LoRAConfig, LoRALinear
    from ..core.lora_extras import LoRAEmbedding, OutputHead, TiedHead, TrainableTokens, TrainedCopy
    from ..core.nn import Parameter

    modules = dict(model.named_modules())
    dtype = model.dtype
    C = model.config.n_embd
    as_array = lambda a: backend.asarray(a, dtype=dtype)      # noqa: E731

    def replace(name, new):
        parent, _, attr = name.rpartition(".")
        new.training = modules[name].training
        setattr(modules[parent] if parent else model, attr, new)

    for p in model.parameters():
        p.trainable = False
    dropout_rng = backend.rng(1)
    dropout = config.get("lora_dropout", 0.0)
    built = []      # (name, rank, scale) of every layer built
    for module, e in plan["lora"].items():
        if e["embedding"]:
            r = e["A"].shape[0]
            layer = LoRAEmbedding(modules[e["names"][0]], r, e["scale"] * r)
            layer.scale = e["scale"]
            layer.lora_embedding_A.data[...] = as_array(e["A"])
            layer.lora_embedding_B.data[...] = as_array(e["B"])
            replace(e["names"][0], layer)
            built.append((e["names"][0], r, e["scale"]))
            continue
        for j, name in enumerate(e["names"]):
            part = slice(j * C, (j + 1) * C) if len(e["names"]) == 3 else slice(None)
            rows = e["B"][part]
            bias = None if e["bias"] is None else e["bias"][part]
            magnitude = None if e["magnitude"] is None else e["magnitude"][part]
            cols = numpy.flatnonzero(numpy.abs(rows).sum(axis=0))
            needed = cols.size or (bias is not None and numpy.any(bias != 0)) or (
                magnitude is not None and not _magnitude_is_norm(magnitude, modules[name].weight.data))
            if len(e["names"]) == 3 and not needed:
                continue             # a third of c_attn the adapter leaves as it is
            if not cols.size:
                cols = numpy.arange(1)    # no update, but a bias or a magnitude: a layer with a zero B column
            A, B = e["A"][cols], rows[:, cols]
            r = A.shape[0]
            base = modules[name]
            layer_class = DoRALinear if magnitude is not None else LoRALinear
            layer = layer_class(base, r, e["scale"] * r, dropout, dropout_rng=dropout_rng,
                                **({"lora_bias": True} if bias is not None else {}))
            layer.scale = e["scale"]
            layer.lora_A.data[...] = as_array(A)
            layer.lora_B.data[...] = as_array(B)
            if bias is not None:
                layer.lora_bias.data[...] = as_array(bias)
            if magnitude is not None:
                layer.lora_magnitude.data[...] = as_array(magnitude)
            replace(name, layer)
            built.append((name, r, e["scale"]))
    for module, arrays in plan["full"].items():
        if module == "lm_head":
            continue
        ours = _minilora_names(module)
        for j, name in enumerate(ours):
            copy = TrainedCopy(modules[name])
            part = slice(j * C, (j + 1) * C) if len(ours) == 3 else slice(None)
            copy.copy.weight.data[...] = as_array(arrays["weight"][..., part])
            if "bias" in arrays:
                copy.copy.bias.data[...] = as_array(arrays["bias"][part])
            replace(name, copy)
    if plan["tokens"] is not None:
        ids, values = plan["tokens"]
        model.wte = TrainableTokens(model.wte, ids)
        model.wte.token_values.data[...] = as_array(values)
        model.lm_head = TiedHead(model.wte)
    elif plan["tie"]:
        model.lm_head = TiedHead(model.wte)
    elif plan["head"]:
        model.lm_head = OutputHead(Parameter(as_array(plan["full"]["lm_head"]["weight"]), added_by="modules_to_save"),
                                   model.wte)
    # a record of what was built (one rank and scale: the largest rank, at the first layer's scale)
    saved = tuple(n for m in plan["full"] for n in (["lm_head"] if m == "lm_head" else _minilora_names(m)))
    r_max = max((r for _, r, _ in built), default=1)
    model.lora_config = LoRAConfig(
        r=r_max, alpha=built[0][2] * r_max if built else 1.0, targets=tuple(n for n, _, _ in built), dropout=dropout,
        use_dora=bool(config.get("use_dora")), lora_bias=bool(config.get("lora_bias")),
        modules_to_save=tuple(dict.fromkeys(saved)),
        trainable_token_indices=tuple(plan["tokens"][0]) if plan["tokens"] else (),
        ensure_weight_tying=bool(plan["tie"]))


def _magnitude_is_norm(magnitude, W) -> bool:
    """Whether a DoRA magnitude equals the column norms of W to the rounding of its own dtype, so that
    g = m / ||W||_c is 1 and a third of c_attn without an update needs no DoRA layer."""
    from ..core.dora import column_norm

    norm = backend.to_numpy(column_norm(backend.asarray(W, dtype="float64")))
    eps = numpy.finfo(numpy.dtype(magnitude.dtype)).eps
    return bool(numpy.all(numpy.abs(magnitude.astype(numpy.float64) / norm - 1.0) <= 16 * eps))


# ----------------------------------------------------------------------------------------------------
# PiSSA adapters: for the original weights (converted, the default) or for the residual ones
#
# A PiSSA layer trains over W_res = W0 - s (B0 A0)^T, not over the pretrained W0, so its A, B alone are right only
# over W_res (the weights save_hf_gpt2 writes from the PiSSA model). For W0 they are rewritten as the rank-2r pair
#     A' = [A; A0] (2r, in),   B' = [B, -B0] (out, 2r),   W0 + s (B' A')^T = W_res + s (B A)^T
# (lora.pissa_for_original_base), a plain LoRA that PEFT and minilora apply as any other; in c_attn a converted
# third takes 2r columns of the block-structured B. PEFT's own conversion (save_pretrained(...,
# path_initial_model_for_weight_conversion=...)) writes the same pair and keeps s by doubling r and lora_alpha
# (lora_alpha times sqrt 2 under rsLoRA, where s = alpha / sqrt r); minilora writes every module's s as
# alpha_pattern = s * rank with use_rslora false, so a converted module gets rank 2r and alpha s * 2r.
#
# For the residual weights the adapter stays rank r, and the config must keep it from passing for an ordinary
# adapter over W0. PEFT marks its own unconverted PiSSA save init_lora_weights="pissa", but to PEFT that value
# means "run the SVD on the base at load": over a residual base it subtracts the top directions a second time
# (float32) or refuses the dtype (float64). So minilora writes PISSA_RESIDUAL, which no loader applies as it
# stands: minilora's loader refuses it by name, and PEFT rejects it as an unknown PiSSA variant. PEFT applies it
# exactly over the residual base once told that the base is already the residual one:
#     config = peft.LoraConfig.from_pretrained(path); config.init_lora_weights = True
#     peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(residual_dir), path, config=config)

EXPORT_BASES = ("original", "residual")
PISSA_RESIDUAL = "pissa_residual"


def _check_export_base(model, base) -> None:
    """Refuse, before anything is written, a base that is not one of EXPORT_BASES, and a PiSSA layer whose
    adapter cannot be rewritten for the original weights."""
    from ..core.lora import lora_modules

    if not isinstance(base, str) or base not in EXPORT_BASES:
        raise ValueError(f"base={base!r}; expected 'original' (the adapter for the pretrained weights; a PiSSA "
                         "adapter is converted to rank 2r) or 'residual' (a PiSSA adapter as it trains, for the "
                         "weights save_hf_gpt2 writes from the same model)")
    if base == "original":
        for name, m in lora_modules(model):
            if getattr(m, "init", None) == "pissa" and getattr(m, "pissa_initial", None) is None:
                raise ValueError(f"{name} is a PiSSA layer with no record of its starting A0, B0 (pissa_initial), "
                                 "so its adapter cannot be rewritten for the original weights; export it with "
                                 "base='residual', beside save_hf_gpt2(model, ...)")


def _exported_pair(m, base):
    """(A (k, in), B (out, k)) that save_peft_adapter writes for one LoRA layer, host arrays in the layer's dtype:
    a PiSSA layer's adapter converted for the original weights (k = 2r) when base is "original", any other layer
    (and every layer when base is "residual") as it is (k = r)."""
    from ..core.lora import pissa_for_original_base

    A, B = backend.to_numpy(m.lora_A.data), backend.to_numpy(m.lora_B.data)
    if base == "original" and getattr(m, "init", None) == "pissa":
        A2, B2 = pissa_for_original_base(m)
        return A2.astype(A.dtype), B2.astype(B.dtype)
    return A, B


def _init_lora_weights(layers, base):
    """The config's init_lora_weights: true for an adapter over the original weights, PISSA_RESIDUAL for PiSSA
    adapters written for their residual weights."""
    residual = base == "residual" and any(getattr(m, "init", None) == "pissa" for _, m in layers)
    return PISSA_RESIDUAL if residual else True
