"""Files: safetensors for tensors, JSON for configs and metadata; never pickle.

Every write is atomic: the bytes go to a temporary file in the same directory, which is then renamed over
the target, so a crash never leaves a half-written file. Every read of a damaged file raises a ValueError
that names the file and says what is wrong.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy

from ..core import backend


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)   # mkstemp makes files private (0600); a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {name: array} (NumPy or CuPy) to ``path`` as safetensors, atomically.

    metadata: {str: str} stored in the header (transformers wants {"format": "pt"}).
    """
    from safetensors.numpy import save

    host = {}
    for name, value in tensors.items():
        if not backend.is_array(value):
            raise TypeError(f"tensor {name!r} must be an array; got {type(value).__name__}")
        host[name] = numpy.ascontiguousarray(backend.to_numpy(value))
    write_bytes_atomic(Path(path), save(host, metadata=metadata))


def load_safetensors(path) -> tuple[dict, dict]:
    """Read a safetensors file: ({name: NumPy array}, metadata dict). Clear ValueError if damaged."""
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + header_len]).get("__metadata__", {}) or {}
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise ValueError(f"{path} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
    return tensors, metadata


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes_atomic(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path) -> dict:
    """Read a JSON object; a clear ValueError if the file is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSON file at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
