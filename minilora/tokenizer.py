"""A character tokenizer with a fixed vocabulary of 96 ids, the same on every Python version and corpus.

    id 0        <unk>: any character outside the set (decoded as U+FFFD)
    id 1        newline
    ids 2..95   the printable ASCII characters from space (32) to tilde (126), except the backtick (96)

The backtick is left out to fit 96 ids (it does not occur in the pretraining corpus and is rare in code).
Tabs and non-ASCII characters (typographic quotes, accents) become <unk>.
"""
from __future__ import annotations

import numpy

UNK_ID = 0
UNK_TEXT = "\ufffd"
CHARS = "\n" + "".join(chr(c) for c in range(32, 127) if chr(c) != "`")
VOCAB_SIZE = 1 + len(CHARS)    # 96

_ENCODE = numpy.zeros(0x110000, dtype=numpy.uint8)   # code point -> id; every unknown code point -> UNK_ID
for _i, _ch in enumerate(CHARS, start=1):
    _ENCODE[ord(_ch)] = _i
_DECODE = [UNK_TEXT] + list(CHARS)


def encode(text: str):
    """text -> NumPy uint8 array of ids (T,). Characters outside the vocabulary become <unk> (id 0)."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str; got {type(text).__name__}")
    codepoints = numpy.frombuffer(text.encode("utf-32-le"), dtype=numpy.uint32)
    return _ENCODE[codepoints]


def decode(ids) -> str:
    """ids (any integer sequence or array, 1-D) -> text. Ids outside [0, 95] raise a ValueError."""
    array = numpy.asarray(ids).reshape(-1) if not hasattr(ids, "get") else ids.get().reshape(-1)
    if array.size == 0:
        return ""
    if array.dtype.kind not in "iu":
        raise TypeError(f"decode expects integer ids; got dtype {array.dtype}")
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi >= VOCAB_SIZE:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is out of range: ids must be in [0, {VOCAB_SIZE - 1}]")
    return "".join(_DECODE[i] for i in array.tolist())


def unknown_fraction(text: str) -> float:
    """The fraction of characters of ``text`` that the vocabulary does not cover."""
    ids = encode(text)
    return float((ids == UNK_ID).mean()) if ids.size else 0.0
