"""Files: safetensors for tensors, JSON for configs and metadata; never pickle.

Every write is atomic: the bytes go to a temporary file in the same directory, which is then renamed over
the target, so a crash never leaves a half-written file. Every read of a damaged file raises a ValueError
that names the file and says what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

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
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        metadata = header.get("__metadata__", {}) or {}
        bfloat16 = any(isinstance(spec, dict) and spec.get("dtype") == "BF16" for spec in header.values())
        tensors = load(raw) if not bfloat16 else _load_with_bfloat16(raw, header, 8 + header_len)
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


def _load_with_bfloat16(raw: bytes, header: dict, data_start: int) -> dict:
    """The tensors of a safetensors file that holds bfloat16 ones (which NumPy has no dtype for), each bfloat16
    tensor widened to float32 exactly: a bfloat16 is the upper 16 bits of the float32 of the same value."""
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        dtype = numpy.dtype("<u2") if spec["dtype"] == "BF16" else _READABLE_DTYPES[spec["dtype"]]
        count = math.prod(spec["shape"])
        if (end - begin) != count * dtype.itemsize or data_start + end > len(raw):
            raise ValueError(f"tensor {name!r} spans bytes {spec['data_offsets']} of a {len(raw) - data_start}-byte "
                             f"data section; its dtype and shape need {count * dtype.itemsize}")
        array = numpy.frombuffer(raw, dtype, count, data_start + begin).reshape(spec["shape"])
        if spec["dtype"] == "BF16":
            array = (array.astype(numpy.uint32) << 16).view(numpy.float32)
        tensors[name] = array.astype(array.dtype.newbyteorder("="))
    return tensors


class TensorInfo(NamedTuple):
    """Where one tensor of a safetensors file lies: its dtype (little-endian), shape, and the byte offset of its
    data from the start of the file and the data's length."""

    dtype: numpy.dtype
    shape: tuple
    offset: int
    nbytes: int


_HEADER_LIMIT = 100 * 2**20     # the safetensors format's own limit on the JSON header


class SafetensorsReader:
    """A safetensors file read one tensor at a time, straight into arrays the caller owns, so that a large file
    is never held whole or twice (``load_safetensors`` reads a file whole, which suits small files).

    Opening reads and checks the header: a ValueError names the file when the header is damaged or truncated,
    when the tensors' offsets overlap, leave gaps or run past the end of the file, or when a tensor's dtype is one
    this reader cannot hold. ``tensors`` then maps each name to its TensorInfo and ``metadata`` holds the
    header's metadata. Every read refuses non-finite values (a ValueError naming the file and the tensor, as
    ``check_finite`` words it); ``check_record`` checks the integrity record save_safetensors writes. Use it as
    a context manager: it keeps the file open until closed.
    """

    block_bytes = 1 << 22       # how much a cast or a scan reads at a time

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no safetensors file at {self.path}")
        self._file = open(self.path, "rb", buffering=0)
        try:
            self.tensors, self.metadata = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _damaged(self, why: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid safetensors file (corrupt or truncated?): {why}")

    def _read_header(self) -> tuple[dict, dict]:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise self._damaged(f"it holds {size} bytes, fewer than the 8 that give its header's length")
        header_len = int.from_bytes(self._read_bytes(0, 8), "little")
        if header_len > min(size - 8, _HEADER_LIMIT):
            raise self._damaged(f"its header claims {header_len} bytes; {size - 8} follow the length "
                                f"(and a header holds at most {_HEADER_LIMIT})")
        try:
            header = json.loads(self._read_bytes(8, header_len), object_pairs_hook=_unique_keys)
        except ValueError as exc:       # JSONDecodeError, UnicodeDecodeError, a repeated key
            raise self._damaged(f"its header is not valid JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise self._damaged(f"its header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._damaged("its __metadata__ is not an object of strings")
        data_start, data_len = 8 + header_len, size - 8 - header_len
        tensors = {}
        for name, spec in header.items():
            tensors[name] = self._tensor_info(name, spec, data_start)
        end = 0
        for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
            begin = info.offset - data_start
            if begin != end:
                where = "overlaps the tensor before it" if begin < end else f"leaves {begin - end} unused bytes"
                raise self._damaged(f"tensor {name!r} starts at data byte {begin}, which {where} (the tensors "
                                    f"before it end at {end})")
            end = begin + info.nbytes
        if end != data_len:
            raise self._damaged(f"its tensors need {end} bytes of data but the file holds {data_len}"
                                + (" (truncated)" if end > data_len else ""))
        return tensors, metadata

    def _tensor_info(self, name: str, spec, data_start: int) -> TensorInfo:
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise self._damaged(f"the entry of tensor {name!r} is not {{dtype, shape, data_offsets}}: {spec!r}")
        code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if code not in _READABLE_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {code!r}, which minilora cannot read "
                             f"(it reads {', '.join(sorted(_READABLE_DTYPES))})")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise self._damaged(f"tensor {name!r} has shape {shape!r}; expected a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets) \
                or offsets[0] > offsets[1]:
            raise self._damaged(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], "
                                "0 <= begin <= end")
        dtype = _READABLE_DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._damaged(f"tensor {name!r} spans data bytes {offsets} but a {code} tensor of shape "
                                f"{shape} takes {nbytes}")
        return TensorInfo(dtype, tuple(shape), data_start + offsets[0], nbytes)

    def _read_bytes(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        self._read_exact(offset, memoryview(out))
        return bytes(out)

    def _read_exact(self, offset: int, view: memoryview) -> None:
        """Fill the writable byte view from the file, starting at ``offset``."""
        self._file.seek(offset)
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise self._damaged(f"it ends at byte {offset + done}, inside the tensor data (truncated)")
            done += n

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ValueError(f"{self.path} holds no tensor {name!r}")
        return self.tensors[name]

    def _raw_blocks(self, name: str, into=None, size=None):
        """Yield (start, stop, block): the tensor's flat elements [start, stop) in the file's dtype, ``size`` of
        them at a time (default: block_bytes' worth), read into ``into[start:stop]`` (a flat array of the file's
        dtype) or else into one buffer reused for every block."""
        info = self._info(name)
        count = math.prod(info.shape)
        step = max(1, size or self.block_bytes // info.dtype.itemsize)
        buffer = None if into is not None else numpy.empty(min(step, count), info.dtype)
        for start in range(0, count, step):
            stop = min(count, start + step)
            block = into[start:stop] if into is not None else buffer[:stop - start]
            self._read_exact(info.offset + start * info.dtype.itemsize, memoryview(block.view(numpy.uint8)))
            yield start, stop, block

    def _non_finite(self, name: str, bad: int) -> ValueError:
        return ValueError(f"tensor {name!r} of {self.path} holds {bad} non-finite value(s) (NaN or inf)")

    def blocks(self, name: str, size: int | None = None):
        """Yield the tensor's values as successive flat arrays of the file's dtype, ``size`` values each (default:
        a few MB's worth); a block is overwritten by the next, so use it before asking for the next. A ValueError
        after the last block when any value was not finite."""
        bad = 0
        for _, _, block in self._raw_blocks(name, size=size):
            bad += _count_non_finite(block)
            yield block
        if bad:
            raise self._non_finite(name, bad)

    def read_into(self, name: str, out) -> None:
        """Read tensor ``name`` into ``out``: a writable, C-contiguous NumPy array of the tensor's shape. Of the
        file's dtype, the bytes go straight from the file into it; of another dtype, a few MB at a time are read
        and cast as ``astype`` casts (a value the cast makes infinite is refused). After an error ``out`` holds
        part of the tensor: read into an array that is thrown away on failure."""
        info = self._info(name)
        if not isinstance(out, numpy.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
            got = "a read-only or non-contiguous array" if isinstance(out, numpy.ndarray) else type(out).__name__
            raise TypeError(f"read_into needs a writable C-contiguous NumPy array; got {got}")
        if tuple(out.shape) != info.shape:
            raise ValueError(f"tensor {name!r} of {self.path} has shape {info.shape}; expected {tuple(out.shape)}")
        flat = out.reshape(-1)
        direct = out.dtype == info.dtype
        bad = overflow = 0
        for start, stop, block in self._raw_blocks(name, flat if direct else None):
            bad += _count_non_finite(block)
            if not direct:
                with numpy.errstate(over="ignore"):     # counted and refused below
                    flat[start:stop] = block
                overflow += _count_non_finite(flat[start:stop])
        if bad:
            raise self._non_finite(name, bad)
        if overflow:
            raise ValueError(f"tensor {name!r} of {self.path} does not fit {out.dtype}: {overflow} of its values "
                             "become infinite")

    def read(self, name: str):
        """Tensor ``name`` as a new NumPy array of the file's dtype."""
        info = self._info(name)
        out = numpy.empty(info.shape, info.dtype)
        self.read_into(name, out)
        return out

    def check_record(self, sealed: bool = False) -> None:
        """Check the integrity record (``minilora_sha256``) against the file's content, reading the data a few MB
        at a time; a file without one passes unless ``sealed``. The same checks and messages as load_safetensors."""
        record = self.metadata.get(SEAL)
        if record is None:
            if sealed:
                raise ValueError(f"{self.path} has no integrity record ({SEAL}): it was not written by this version "
                                 "of minilora, or its header was altered")
            return
        digest = hashlib.sha256()        # content_sha256, computed block by block
        for name in sorted(self.tensors):
            info = self.tensors[name]
            digest.update(json.dumps([name, info.dtype.str, list(info.shape)]).encode())
            for _, _, block in self._raw_blocks(name):
                digest.update(memoryview(block.view(numpy.uint8)))
        digest.update(json.dumps({k: v for k, v in self.metadata.items() if k != SEAL}, sort_keys=True).encode())
        if digest.hexdigest() != record:
            raise ValueError(f"{self.path} is damaged: its content does not match the sha256 recorded when it was "
                             "written")


_READABLE_DTYPES = {code: numpy.dtype(name).newbyteorder("<") for name, code in _SAFETENSORS_DTYPES.items()}


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _unique_keys(pairs) -> dict:
    """json's object_pairs_hook: a repeated key is an error, not a silent last-one-wins."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = sorted({k for k, _ in pairs if sum(1 for j, _ in pairs if j == k) > 1})
        raise ValueError(f"repeated keys {repeated}")
    return out


def _count_non_finite(block) -> int:
    """How many values of a flat block are NaN or inf (0 for a dtype that has none)."""
    if block.dtype.kind not in "fc":
        return 0
    return int(block.size - numpy.count_nonzero(numpy.isfinite(block)))


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
