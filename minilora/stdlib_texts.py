"""The texts minilora's corpora and tasks are made of, read from the running Python's own installation.

minilora normally reads frozen snapshots of these texts (``minilora/corpora/``, see ``data.read_text``), so every
Python gives the same tokens. This module reads the live originals instead: for exploration
(``data.load_corpus(name, source="python")``) and for rebuilding the snapshots
(``python tools/build_corpus_snapshots.py``). It uses the standard library only, so the rebuild script can load it
with any Python >= 3.10, with or without NumPy.

    "pydoc"                         English prose: Python's help topics (``pydoc_data.topics``), in key order
    "email", "tkinter", "asyncio",  Python source: every ``.py`` file of that standard-library package, walked in
    "xml"                           sorted order and joined with a newline
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig

PACKAGES = ("email", "tkinter", "asyncio", "xml")
TEXTS = {
    "pydoc": "English prose: Python's help topics (pydoc_data.topics)",
    **{package: f"Python source code: the standard library's {package} package" for package in PACKAGES},
}


def sha256_text(text: str) -> str:
    """The sha256 of a text's UTF-8 bytes: the identity recorded for every snapshot."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stdlib_package_dir(package: str) -> str:
    """Where the running Python keeps a standard-library package's sources (which may be missing: slim or
    Debian Pythons leave out tkinter, for one)."""
    return os.path.join(sysconfig.get_paths()["stdlib"], package)


def _package_files(package: str) -> list:
    """The package's .py files as (path relative to the standard library, absolute path), in reading order."""
    root = stdlib_package_dir(package)
    if not os.path.isdir(root):
        raise ValueError(f"the standard library's {package!r} package sources are not installed at {root}; "
                         "the shipped snapshot (source='snapshot', the default) has them")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                files.append((os.path.relpath(path, stdlib).replace(os.sep, "/"), path))
    if not files:
        raise ValueError(f"no .py sources found under {root} (a Python installed without its sources?)")
    return files


def read_python_text(name: str) -> tuple:
    """One text as the running Python has it: (text, provenance).

    provenance: {"python": version and build, "source": where the text comes from, "files": {path: sha256 of
    the file's bytes}} - enough to tell which installation a text came from and to check it against another.
    """
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; expected one of {sorted(TEXTS)}")
    python = f"{platform.python_implementation()} {platform.python_version()} ({sys.version.splitlines()[0]})"
    if name == "pydoc":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        text = "".join(topics[key] for key in sorted(topics))
        return text, {"python": python, "source": "pydoc_data.topics.topics, values joined in sorted key order",
                      "files": {"pydoc_data/topics.py": _file_sha256(pydoc_data.topics.__file__)}}
    files = _package_files(name)
    parts = []
    for _, path in files:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts), {
        "python": python,
        "source": f"every .py file of the standard library's {name} package, in sorted walk order, joined by a newline",
        "files": {relative: _file_sha256(path) for relative, path in files}}


def _file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def python_license_path() -> str:
    """The running Python's LICENSE.txt (the PSF license that covers its help topics and library sources)."""
    return os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
