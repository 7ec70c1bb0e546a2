"""LoRA adapter files: ``adapter.safetensors`` (every lora_A / lora_B, and the biases that train) and
``adapter_config.json``: kilobytes, not the megabytes of the whole model.

The weights file is the unit: its header holds the configuration (the LoRAConfig, the adapted modules and their
ranks, the base model's config, and the base fingerprint: a sha256 of the frozen weights the adapter was trained
on) under the file's integrity record, and it is written atomically. ``adapter_config.json`` is a readable copy,
written first; loading refuses a folder whose copy disagrees with the weights file (an edit, or a save that was
interrupted between the two files), naming both, so a configuration is never silently ignored.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core import backend
from ..core.dora import DoRALinear
from ..core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, apply_lora, linear_modules, lora_modules
from ..core.lora_extras import extra_modules, plan_extras, planned_shapes
from ..core.nn import Module
from ..core.quant import NF4Weight, dequantize_nf4
from .files import load_safetensors, read_json, save_safetensors, write_json


def _frozen_array(weight):
    """The array a layer's weight computes with: a Parameter's data, or a 4-bit weight dequantised (in float32,
    whatever the model's dtype, so that the same base gives the same fingerprint)."""
    return dequantize_nf4(weight, "float32") if isinstance(weight, NF4Weight) else weight.data


def base_fingerprint(model: Module, modules=None) -> str:
    """sha256 of the frozen base weights an adapter adapts: the weight W of each adapted linear module, in name
    order (unmerged: a merged layer's W before the merge; 4-bit: the dequantised W, what the adapter trained
    on, so a QLoRA adapter loads onto a base quantised the same way and is refused on the float original).
    modules: the names (None: the model's LoRA layers)."""
    lora_layers = dict(lora_modules(model))
    linears = {name: linear for name, _, _, linear in linear_modules(model)}
    digest = hashlib.sha256()
    for name in sorted(modules if modules is not None else lora_layers):
        if name in lora_layers:
            layer = lora_layers[name]
            weight = layer.__dict__.get("_weight_before_merge") if layer.merged else _frozen_array(layer.weight)
        elif name in linears:
            weight = _frozen_array(linears[name].weight)
        else:
            raise ValueError(f"the model has no linear module {name!r}")
        array = backend.to_numpy(weight)
        digest.update(json.dumps([name, list(array.shape)]).encode())
        digest.update(array.astype("float32").tobytes())      # the same base in float32 or float64
    return digest.hexdigest()


ADAPTER_OWNERS = ("lora", "dora", "modules_to_save", "trainable_tokens")   # Parameter.added_by of what LoRA adds


def adapter_state(model: Module) -> dict:
    """{name: array} of what an adapter file holds: every parameter LoRA added (lora_A / lora_B, DoRA's
    lora_magnitude, lora_bias, LoRA on a table, trainable token rows, full trained copies), and the biases
    that train."""
    layers = lora_modules(model)
    if not layers and not extra_modules(model):
        raise ValueError("the model has no LoRA adapters")
    for name, m in layers:
        m.lora_A        # a VeRA layer has none and says so (its adapter goes to vera_files.save_vera)
        if m.init == "pissa":
            raise ValueError("a PiSSA adapter changes the base weights; save the whole model "
                             "(interop.save_hf_gpt2) or export it with interop.save_peft_adapter")
    state = {name: p.data for name, p in model.named_parameters() if p.added_by in ADAPTER_OWNERS}
    config = getattr(model, "lora_config", None)
    if config is not None and config.bias != "none":
        for name, p in model.named_parameters(trainable_only=True):
            if name.endswith(".bias"):
                state[name] = p.data
    return state


def save_lora(model: Module, directory) -> Path:
    """Write the adapter only: ``adapter.safetensors`` (weights, with the configuration sealed in its header)
    and ``adapter_config.json`` (a readable copy): kilobytes, not megabytes."""
    directory = Path(directory)
    state = adapter_state(model)
    config = getattr(model, "lora_config", LoRAConfig())
    meta = {"lora_config": config.to_dict(), "modules": [name for name, _ in lora_modules(model)],
            "ranks": {name: m.r for name, m in lora_modules(model)},
            "base_fingerprint": base_fingerprint(model)}
    if hasattr(model, "config"):
        meta["base_model_config"] = model.config.to_dict()
    write_json(directory / ADAPTER_CONFIG, meta)
    save_safetensors(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt", "minilora": json.dumps(meta)})
    return directory


def read_lora(directory) -> tuple[dict, dict]:
    """(tensors, configuration) of a saved adapter, every file verified: the weights file's integrity record,
    no NaN or inf, and the readable adapter_config.json equal to the configuration sealed in the weights."""
    return read_sealed(Path(directory), ADAPTER_WEIGHTS, ADAPTER_CONFIG)


def read_sealed(directory: Path, weights_name: str, config_name: str) -> tuple[dict, dict]:
    """(tensors, configuration) of an adapter folder: the weights file (integrity record verified, no NaN or inf)
    and the configuration sealed in its header, which the readable copy config_name, when present, must equal."""
    tensors, header = load_safetensors(directory / weights_name, sealed=True)
    try:
        meta = json.loads(header["minilora"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory / weights_name} holds no adapter configuration ({exc})") from None
    copy_path = directory / config_name
    if copy_path.exists():
        copy = read_json(copy_path)
        if copy != meta:
            differing = sorted(k for k in set(copy) | set(meta) if copy.get(k) != meta.get(k))
            raise ValueError(f"{copy_path} does not match the configuration sealed in {directory / weights_name} "
                             f"(differing: {differing}): it was edited, or a save was interrupted between the two "
                             "files; save the adapter again (or delete the copy to load what the weights file holds)")
    return tensors, meta


def load_lora(model: Module, directory, seed: int = 0, force: bool = False) -> Module:
    """Apply the saved adapter to ``model`` (a base model, or one with matching, unmerged LoRA layers) and load it.

    Everything is checked before the model changes (files, configuration, module names, shapes, ranks, the base
    model's config and fingerprint), and a failure leaves the model exactly as it was. force=True loads onto a
    base whose weights differ from the one the adapter was trained on (the fingerprint), which is refused
    otherwise: the adapter's update was learnt for those weights.
    """
    directory = Path(directory)
    tensors, meta = read_lora(directory)
    try:
        config = LoRAConfig(**{**meta["lora_config"], **{k: tuple(v) for k, v in meta["lora_config"].items()
                                                        if isinstance(v, list)}})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} has no valid lora_config: {exc}") from exc
    base_config = meta.get("base_model_config")
    if base_config is not None and hasattr(model, "config") and base_config != model.config.to_dict():
        raise ValueError(f"the adapter was trained on a model with config {base_config}; this model has "
                         f"{model.config.to_dict()}")
    existing = dict(lora_modules(model))
    if any(m.merged for m in existing.values()):
        raise ValueError("the model's LoRA adapters are merged: loading an adapter now would leave the merged "
                         "update in W; unmerge_lora(model) first")
    if existing:
        if any(isinstance(m, DoRALinear) != config.use_dora for m in existing.values()):
            raise ValueError(f"the adapter in {directory} is {'DoRA' if config.use_dora else 'plain LoRA'}; the "
                             f"model's LoRA layers are not")
        expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.added_by in ADAPTER_OWNERS}
    else:
        linears = {name: lin for name, _, _, lin in linear_modules(model)}
        missing = [n for n in meta.get("modules", []) if n not in linears]
        if missing:
            raise ValueError(f"the adapter targets modules this model does not have: {missing}")
        expected = {}
        for n in meta.get("modules", []):
            in_f, out_f = linears[n].weight.shape
            expected[f"{n}.lora_A"] = (config.r, in_f)
            expected[f"{n}.lora_B"] = (out_f, config.r)
            if config.use_dora:
                expected[f"{n}.lora_magnitude"] = (out_f,)
            if config.lora_bias:
                expected[f"{n}.lora_bias"] = (out_f,)
        try:
            expected.update(planned_shapes(model, config, plan_extras(model, config, meta.get("modules", []))))
        except ValueError as exc:
            raise ValueError(f"the adapter in {directory} does not fit this model: {exc}") from None
    problems = []
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"missing {key}")
        elif tuple(tensors[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(tensors[key].shape)}, the model needs {shape}")
    model_params = {name for name, _ in model.named_parameters()}
    extra = sorted(k for k in tensors if k not in expected and not (k.endswith(".bias") and k in model_params))
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if problems:
        raise ValueError(f"the adapter in {directory} does not fit this model: " + "; ".join(problems))
    recorded = meta.get("base_fingerprint")
    if recorded is not None and not force:
        actual = base_fingerprint(model, meta.get("modules"))
        if actual != recorded:
            raise ValueError(f"the adapter in {directory} was trained on other base weights (fingerprint "
                             f"{recorded[:12]}, this model {actual[:12]}): its update was learnt for those; "
                             "load_lora(..., force=True) loads it anyway")
    if not existing:
        apply_lora(model, config, seed=seed)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        params[key].data[...] = backend.asarray(value, dtype=params[key].data.dtype)
    return model
