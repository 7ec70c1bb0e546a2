"""Corpora from what Python itself installs (nothing is downloaded), batching, and toy tasks.

    "pydoc"         pretraining: the English prose of Python's own help topics (pydoc_data.topics, some hundreds
                    of thousands of characters)
    "python-email"  downstream domain: the Python source of the standard library's email package (of a similar
                    size), code that pretraining never saw

Each corpus is split deterministically: the first 90% of the text trains, the last 10% validates. The texts
come from the running Python, so they can differ a little between Python versions.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import numpy

from .core import backend
from .tokenizer import encode

VAL_FRACTION = 0.1


def _pydoc_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "".join(topics[k] for k in sorted(topics))


def stdlib_package_dir(package: str) -> str:
    """Where the running Python keeps a standard-library package's sources (which may be missing: slim or
    Debian Pythons leave out tkinter, for one)."""
    return os.path.join(sysconfig.get_paths()["stdlib"], package)


def _stdlib_package_text(package: str) -> str:
    root = stdlib_package_dir(package)
    if not os.path.isdir(root):
        raise ValueError(f"the standard library's {package!r} package sources are not installed at {root}")
    parts = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    parts.append(f.read())
    if not parts:
        raise ValueError(f"no .py sources found under {root} (a Python installed without its sources?)")
    return "\n".join(parts)


CORPORA = {
    "pydoc": ("English prose: Python's help topics (pydoc_data.topics)", _pydoc_text),
    "python-email": ("Python source code: the standard library's email package", lambda: _stdlib_package_text("email")),
}


@dataclass
class Corpus:
    """A tokenized corpus. train, val: uint8 NumPy arrays of token ids (on the host)."""

    name: str
    description: str
    text: str
    train: numpy.ndarray
    val: numpy.ndarray


def load_corpus(name: str) -> Corpus:
    """Load and tokenize a corpus by name (see CORPORA), split 90% train / 10% validation."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    description, read = CORPORA[name]
    text = read()
    ids = encode(text)
    cut = int(len(ids) * (1 - VAL_FRACTION))
    return Corpus(name, description, text, ids[:cut], ids[cut:])


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
