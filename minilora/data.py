"""Corpora and texts, batching, and toy tasks. Nothing is downloaded: every text ships inside the package.

    "pydoc"         pretraining: the English prose of Python's own help topics (pydoc_data.topics, some hundreds
                    of thousands of characters)
    "python-email"  downstream domain: the Python source of the standard library's email package (of a similar
                    size), code that pretraining never saw

The texts are frozen snapshots taken from one CPython build (``minilora/corpora/``: gzip files, a manifest with
each text's sha256 and provenance, and the PSF license that covers them), so every Python and every OS gives the
same tokens and the same figures. Each text's sha256 is checked whenever it is read. ``source="python"`` reads the
running Python's own copy instead, for exploration; it can differ a little between Python builds (and slim or
Debian Pythons have no tkinter sources). ``tools/build_corpus_snapshots.py`` rebuilds the snapshots.

Each corpus is split deterministically: the first 90% of the text trains, the last 10% validates.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy

from .core import backend
from .stdlib_texts import TEXTS, read_python_text, sha256_text
from .tokenizer import encode

VAL_FRACTION = 0.1
SNAPSHOT_DIR = Path(__file__).resolve().parent / "corpora"     # package data
MANIFEST = "manifest.json"
SOURCES = ("snapshot", "python")

CORPORA = {     # corpus name -> (description, the text it is made of)
    "pydoc": ("English prose: Python's help topics (pydoc_data.topics)", "pydoc"),
    "python-email": ("Python source code: the standard library's email package", "email"),
}


def snapshot_manifest(directory=None) -> dict:
    """The snapshots' manifest: for each text its file, sha256, length and provenance (Python build, files)."""
    path = Path(directory or SNAPSHOT_DIR) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"the corpus snapshot manifest {path} is missing: reinstall minilora, or rebuild "
                                "it with `python tools/build_corpus_snapshots.py`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the corpus snapshot manifest {path} is damaged ({e}); reinstall minilora") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("texts"), dict):
        raise ValueError(f"the corpus snapshot manifest {path} has no 'texts' table; reinstall minilora")
    return manifest


def read_text(name: str, source: str = "snapshot") -> str:
    """One text by name (see stdlib_texts.TEXTS): the shipped snapshot, its sha256 verified (default), or with
    source="python" the running Python's own copy."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; expected one of {sorted(TEXTS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown text source {source!r}; expected one of {SOURCES}")
    if source == "python":
        return read_python_text(name)[0]
    directory = Path(SNAPSHOT_DIR)
    entry = snapshot_manifest(directory)["texts"].get(name)
    if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry):
        raise ValueError(f"the corpus snapshot manifest {directory / MANIFEST} has no valid entry for {name!r}; "
                         "reinstall minilora")
    path = directory / entry["file"]
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"the corpus snapshot {path} is missing: reinstall minilora") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"the corpus snapshot {path} is damaged ({e}); reinstall minilora") from None
    actual = sha256_text(text)
    if actual != entry["sha256"]:
        raise ValueError(f"the corpus snapshot {path} holds a text with sha256 {actual}, but {MANIFEST} records "
                         f"{entry['sha256']}: the file was damaged or edited; reinstall minilora")
    return text


@dataclass
class Corpus:
    """A tokenized corpus. train, val: uint8 NumPy arrays of token ids (on the host); sha256: the text's."""

    name: str
    description: str
    text: str
    train: numpy.ndarray
    val: numpy.ndarray
    source: str = "snapshot"
    sha256: str = ""


def load_corpus(name: str, source: str = "snapshot") -> Corpus:
    """Load and tokenize a corpus by name (see CORPORA), split 90% train / 10% validation.

    source: "snapshot" (the shipped text, the same on every Python) or "python" (the running Python's copy).
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    description, text_name = CORPORA[name]
    text = read_text(text_name, source)
    ids = encode(text)
    cut = int(len(ids) * (1 - VAL_FRACTION))
    return Corpus(name, description, text, ids[:cut], ids[cut:], source, sha256_text(text))


def get_batch(ids, batch_size: int, block_size: int, rng):
    """Random contiguous windows: idx (B, T) and targets (B, T), targets shifted by one (the next token).

    ids: 1-D token array (host); rng: a NumPy Generator (positions are drawn on the host, so every backend
    sees the same batches). Returns backend arrays of dtype int64.
    """
    n = len(ids)
    if n < block_size + 1:
        raise ValueError(f"the text has {n} tokens; a window of block_size {block_size} needs at least {block_size + 1}")
    starts = rng.integers(0, n - block_size, size=batch_size)
    windows = numpy.asarray(ids)[starts[:, None] + numpy.arange(block_size + 1)].astype(numpy.int64)   # (B, T+1)
    return backend.asarray(windows[:, :-1]), backend.asarray(windows[:, 1:])


def sequential_batches(ids, batch_size: int, block_size: int, max_batches: int | None = None):
    """Every non-overlapping window of the text in order, as (idx, targets) batches: for a deterministic
    evaluation that sees each token once (the tail shorter than a window is dropped)."""
    n_windows = (len(ids) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"the text has {len(ids)} tokens; one window of block_size {block_size} needs {block_size + 1}")
    ids = numpy.asarray(ids)
    batches = 0
    for first in range(0, n_windows, batch_size):
        rows = numpy.arange(first, min(first + batch_size, n_windows))
        windows = ids[rows[:, None] * block_size + numpy.arange(block_size + 1)].astype(numpy.int64)
        yield backend.asarray(windows[:, :-1]), backend.asarray(windows[:, 1:])
        batches += 1
        if max_batches is not None and batches >= max_batches:
            return


# ----------------------------------------------------------------------------------------------------
# Toy tasks: small procedural texts for tests and quick demos.

TOY_TASKS = ("copy", "reverse", "add")


def toy_text(task: str, n_lines: int = 1000, seed: int = 0) -> str:
    """Lines of a procedural task, one example per line:

    "copy":    "abc=abc"      "reverse": "abc=cba"      "add": "12+7=19"
    """
    if task not in TOY_TASKS:
        raise ValueError(f"unknown toy task {task!r}; expected one of {TOY_TASKS}")
    rng = numpy.random.default_rng(seed)
    letters = numpy.array(list("abcdefghij"))
    lines = []
    for _ in range(n_lines):
        if task == "add":
            a, b = rng.integers(0, 100, size=2)
            lines.append(f"{a}+{b}={a + b}")
        else:
            word = "".join(rng.choice(letters, size=rng.integers(1, 8)))
            lines.append(f"{word}={word if task == 'copy' else word[::-1]}")
    return "\n".join(lines) + "\n"
