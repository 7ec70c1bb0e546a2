"""LoRA adapter files: ``adapter.safetensors`` (every lora_A / lora_B, and the biases that train) and
``adapter_config.json`` (the LoRAConfig, the adapted modules, the base model's config): kilobytes, not the
megabytes of the whole model."""
from __future__ import annotations

import json
from pathlib import Path

from ..core import backend
from ..core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, apply_lora, linear_modules, lora_modules
from ..core.nn import Module
from .files import load_safetensors, read_json, save_safetensors, write_json



def adapter_state(model: Module) -> dict:
    """{name: array} of what an adapter file holds: every lora_A / lora_B, and the biases that train."""
    layers = lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    state = {}
    for name, m in layers:
        A, B = m.lora_A.data, m.lora_B.data
        if m.init == "pissa":
            raise ValueError("a PiSSA adapter changes the base weights; save the whole model "
                             "(interop.save_hf_gpt2) or export it with interop.save_peft_adapter")
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = A, B
    config = getattr(model, "lora_config", None)
    if config is not None and config.bias != "none":
        for name, p in model.named_parameters(trainable_only=True):
            if name.endswith(".bias"):
                state[name] = p.data
    return state


def save_lora(model: Module, directory) -> Path:
    """Write the adapter only: ``adapter.safetensors`` + ``adapter_config.json`` (kilobytes, not megabytes)."""
    directory = Path(directory)
    state = adapter_state(model)
    config = getattr(model, "lora_config", LoRAConfig())
    meta = {"lora_config": config.to_dict(), "modules": [name for name, _ in lora_modules(model)],
            "ranks": {name: m.r for name, m in lora_modules(model)}}
    if hasattr(model, "config"):
        meta["base_model_config"] = model.config.to_dict()
    save_safetensors(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt", "minilora": json.dumps(meta)})
    write_json(directory / ADAPTER_CONFIG, meta)
    return directory


def load_lora(model: Module, directory, seed: int = 0) -> Module:
    """Apply the saved adapter to ``model`` (a base model, or one with matching LoRA layers) and load it.

    Checks that it fits (module names, shapes, ranks) before changing anything, and says what does not.
    """
    directory = Path(directory)
    meta = read_json(directory / ADAPTER_CONFIG)
    tensors, _ = load_safetensors(directory / ADAPTER_WEIGHTS)
    try:
        config = LoRAConfig(**{**meta["lora_config"], "targets": tuple(meta["lora_config"]["targets"])})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{directory / ADAPTER_CONFIG} has no valid lora_config: {exc}") from exc
    base_config = meta.get("base_model_config")
    if base_config is not None and hasattr(model, "config") and base_config != model.config.to_dict():
        raise ValueError(f"the adapter was trained on a model with config {base_config}; this model has "
                         f"{model.config.to_dict()}")
    existing = dict(lora_modules(model))
    if existing:
        expected = {f"{n}.lora_A": tuple(m.lora_A.shape) for n, m in existing.items()}
        expected.update({f"{n}.lora_B": tuple(m.lora_B.shape) for n, m in existing.items()})
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
    if not existing:
        apply_lora(model, config, seed=seed)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        params[key].data[...] = backend.asarray(value, dtype=params[key].data.dtype)
    return model
