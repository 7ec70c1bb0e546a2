"""The pretrained tiny GPT that ships inside the package, so fine-tuning can start at once, offline.

Files (in minilora/pretrained/): ``tiny_gpt.safetensors`` (weights + metadata in its header) and
``tiny_gpt.json`` (the same metadata plus the sha256 of the weights file). Produced by:

    minilora pretrain --out runs/pretrain --export-to minilora/pretrained
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .files import read_json, write_json
from ..core.model import GPT
from .checkpoints import load_checkpoint, save_checkpoint

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"   # package data: minilora/pretrained/
NAME = "tiny_gpt"


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


METADATA_SEAL = "metadata_sha256"


def _metadata_sha256(info: dict) -> str:
    """sha256 of the metadata's fields (all but this record), in a fixed encoding."""
    fields = {k: v for k, v in info.items() if k != METADATA_SEAL}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def pretrained_info(directory=PRETRAINED_DIR) -> dict:
    """The shipped model's metadata: config, corpus, steps, losses, bits per character, sha256, command. Its own
    sha256 (metadata_sha256) is checked, so an edited or damaged figure is an error, not a different figure."""
    path = Path(directory) / f"{NAME}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no pretrained model metadata at {path}; create it with "
                                "`minilora pretrain --out runs/pretrain --export-to minilora/pretrained`")
    info = read_json(path)
    if not isinstance(info, dict) or info.get(METADATA_SEAL) != _metadata_sha256(info):
        raise ValueError(f"{path} is damaged or was edited: its fields do not match their recorded sha256 "
                         f"({METADATA_SEAL})")
    return info


def load_pretrained(dtype="float32", dropout: float | None = None, directory=PRETRAINED_DIR) -> GPT:
    """The shipped pretrained tiny GPT (offline). Its sha256 is checked against the metadata first.

    dropout: replaces the dropout it was pretrained with (None keeps it).
    """
    info = pretrained_info(directory)
    weights = Path(directory) / f"{NAME}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no pretrained weights at {weights}")
    actual = sha256_file(weights)
    if actual != info.get("sha256"):
        raise ValueError(f"{weights} has sha256 {actual}, but its metadata records {info.get('sha256')}: "
                         "the file is damaged or was replaced")
    model, _ = load_checkpoint(weights, dtype=dtype, sealed=False)     # its sha256 was verified just above
    if dropout is not None:
        model.set_dropout(dropout)
    return model


def export_pretrained(model: GPT, meta: dict, directory) -> Path:
    """Write the weights-only shipped files for ``model`` into ``directory`` (with sha256 and bits per char)."""
    directory = Path(directory)
    meta = dict(meta)
    for key in ("val_loss", "downstream_val_loss"):
        if key in meta:
            meta[key.replace("loss", "bits_per_char")] = meta[key] / math.log(2)
    weights = save_checkpoint(directory / f"{NAME}.safetensors", model, None, meta)
    meta.update(model_config=model.config.to_dict(), dtype=model.dtype, sha256=sha256_file(weights),
                size_bytes=weights.stat().st_size)
    meta[METADATA_SEAL] = _metadata_sha256(meta)
    write_json(directory / f"{NAME}.json", meta)
    return weights
