"""Files: safetensors for tensors, JSON for configs and metadata; never pickle.

Every write is atomic: the bytes go to a temporary file in the same directory, which is then renamed over
the target, so a crash never leaves a half-written file. Every read of a damaged file raises a ValueError
that names the file and says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy

from ..core import backend


TEMPORARY_SUFFIX = ".minilora-tmp"       # every temporary file of an atomic write ends so, and nothing else does


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename).

    The temporary file is named ``.<name>.<random>.minilora-tmp``; a process killed mid-write leaves at most
    that file, which ``remove_stale_temporaries`` clears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
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


def remove_stale_temporaries(directory) -> list:
    """Delete the temporary files that killed atomic writes left in ``directory`` (not in its subfolders);
    return their paths. Call it when a run starts writing into a folder no other run is writing into."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TEMPORARY_SUFFIX)
                   and p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


SEAL = "minilora_sha256"        # the metadata key of a file's integrity record


def content_sha256(tensors: dict, metadata: dict) -> str:
    """sha256 of a file's content: every tensor (name, dtype, shape, bytes, in name order) and every metadata
    entry but the record itself. It changes with any bit of the tensors or of the metadata (the config)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = numpy.require(backend.to_numpy(tensors[name]), requirements="C")
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != SEAL}, sort_keys=True).encode())
    return digest.hexdigest()


def check_finite(tensors: dict, where: str) -> None:
    """A ValueError naming the first tensor that holds NaN or inf (``where``: the file, for the message)."""
    for name, value in tensors.items():
        array = backend.to_numpy(value)
        if array.dtype.kind in "fc" and not numpy.isfinite(array).all():
            bad = int(array.size - numpy.isfinite(array).sum())
            raise ValueError(f"tensor {name!r} of {where} holds {bad} non-finite value(s) (NaN or inf)")


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {name: array} (NumPy or CuPy) to ``path`` as safetensors, atomically, with its integrity record.

    metadata: {str: str} stored in the header (transformers wants {"format": "pt"}); the header also gets
    ``minilora_sha256``, the content_sha256 of the tensors and metadata. A non-finite tensor is refused
    (ValueError naming it) and nothing is written.
    """
    host = {}
    for name, value in tensors.items():
        if not backend.is_array(value):
            raise TypeError(f"tensor {name!r} must be an array; got {type(value).__name__}")
        host[name] = numpy.require(backend.to_numpy(value), requirements="C")
    check_finite(host, f"the file to write, {path}")
    metadata = dict(metadata or {})
    metadata[SEAL] = content_sha256(host, metadata)
    write_bytes_atomic(Path(path), safetensors_bytes(host, metadata))


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                       "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                       "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """The safetensors encoding of {name: NumPy array} with {str: str} metadata, the same bytes for the same
    content in every process: an 8-byte little-endian header length, a JSON header (tensors in name order, each
    with dtype, shape and data offsets; keys sorted) padded with spaces to a multiple of 8, then the data,
    little-endian, in the header's order."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        array = numpy.require(tensors[name], requirements="C")
        if array.dtype.name not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def load_safetensors(path, sealed: bool = False) -> tuple[dict, dict]:
    """Read a safetensors file: ({name: NumPy array}, metadata dict).

    A ValueError names the file and the problem when it is damaged or truncated, when a tensor holds NaN or
    inf, or when its integrity record (written by save_safetensors) does not match its content. sealed=True
    (minilora's own files) also refuses a file without that record.
    """
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
    check_finite(tensors, str(path))
    record = metadata.get(SEAL)
    if record is None and sealed:
        raise ValueError(f"{path} has no integrity record ({SEAL}): it was not written by this version of "
                         "minilora, or its header was altered")
    if record is not None and record != content_sha256(tensors, metadata):
        raise ValueError(f"{path} is damaged: its content does not match the sha256 recorded when it was written")
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
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
