"""Training checkpoints: model weights, AdamW moments and JSON metadata in ONE safetensors file.

The metadata (model config, step, optimizer step count, random-generator states, loss history) rides in the
safetensors header under the file's integrity record (a sha256 of the tensors and the metadata, verified at
every load), and the file is written atomically, so a crash can never leave half a checkpoint; a JSON copy of
the metadata sits beside it for people to read (loading never reads it).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.model import GPT, GPTConfig
from ..core.optim import AdamW
from .files import load_safetensors, save_safetensors, write_json

CHECKPOINT_NAME = "checkpoint.safetensors"


def rng_state(generator):
    """A JSON-ready state of a NumPy generator (None for a generator without one, such as CuPy's)."""
    bit_generator = getattr(generator, "bit_generator", None)
    state = getattr(bit_generator, "state", None)
    return state if isinstance(state, dict) else None


def save_checkpoint(path, model: GPT, optimizer: AdamW | None = None, meta: dict | None = None) -> Path:
    """Write model weights (and AdamW moments) plus JSON metadata to one safetensors file, atomically.

    Tensors: "model.<param>" and, with an optimizer, "adamw.m.<param>" / "adamw.v.<param>".
    Also writes ``<path>.json`` with the same metadata for people to read.
    """
    path = Path(path)
    meta = dict(meta or {})
    meta.update(model_config=model.config.to_dict(), dtype=model.dtype)
    tensors = {f"model.{name}": p.data for name, p in model.named_parameters()}
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for p, m, v in zip(optimizer.params, optimizer.m, optimizer.v):
            if m is not None:
                tensors[f"adamw.m.{names[id(p)]}"] = m
                tensors[f"adamw.v.{names[id(p)]}"] = v
        meta["adamw_t"] = optimizer.t
    save_safetensors(tensors, path, metadata={"format": "pt", "minilora": json.dumps(meta)})
    write_json(path.with_suffix(".json"), meta)
    return path


def read_checkpoint(path, sealed: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint file; a clear ValueError if it is damaged (its integrity record does
    not match), holds NaN or inf, or is not a minilora checkpoint. sealed=False accepts a file without an
    integrity record (one whose sha256 the caller has verified itself, as the shipped model's)."""
    tensors, header = load_safetensors(path, sealed=sealed)
    if "minilora" not in header:
        raise ValueError(f"{path} is a safetensors file but not a minilora checkpoint (no 'minilora' metadata)")
    try:
        meta = json.loads(header["minilora"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the checkpoint's metadata is not valid JSON: {exc}") from exc
    return tensors, meta


def load_checkpoint(path, dtype=None, sealed: bool = True) -> tuple[GPT, dict]:
    """(model, metadata) from a checkpoint file; dtype: None keeps the stored one (see read_checkpoint)."""
    tensors, meta = read_checkpoint(path, sealed)
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: the checkpoint's model_config is missing or invalid: {exc}") from exc
    model = GPT(config, seed=0, dtype=dtype or meta.get("dtype", "float32"))
    state = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    model.load_state_dict(state)
    return model, meta
