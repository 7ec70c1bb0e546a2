"""Gradescope: the autograder bundle an instructor uploads, and the results file it writes.

``build_autograder_zip(assignment, out_zip)`` writes the zip Gradescope expects for a "programming assignment"
autograder:

    setup.sh          run once when the image is built: installs this minilora (and NumPy) from source/minilora
    run_autograder    run for every submission: grades /autograder/submission into /autograder/results/results.json
    minilora/         the package source (the grader and the assignment's reference), with a small pyproject.toml
    README.txt        what the student submits, and how to try the bundle locally

The student submits ASSIGNMENT.py or ASSIGNMENT.ipynb (the student version from ``minilora assignment build``).
``run_autograder`` honours AUTOGRADER_ROOT (default /autograder) and PYTHON (default python3), so the bundle can
be tried on any machine: unzip it, put a submission in ROOT/submission, run ``bash run_autograder``.
"""
from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import zipfile
from pathlib import Path

from ..io.files import write_bytes_atomic
from .build import check_name

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"__pycache__", "pretrained", "corpora"}      # the grader needs neither the model nor the texts

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder image.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --no-cache-dir ./minilora
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for every submission; it always writes results.json (grading exits 0 whatever the score).
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PYTHON="${{PYTHON:-python3}}"
mkdir -p "$ROOT/results"
"$PYTHON" -m minilora.course grade {assignment} "$ROOT/submission" --gradescope "$ROOT/results/results.json" \\
    --timeout {timeout:g} --memory-mb {memory_mb}
"""

README = """minilora autograder for the assignment "{assignment}".

Students submit {assignment}.py or {assignment}.ipynb (the student version: `minilora assignment build
{assignment} --out student/`). Upload this zip as the autograder of a Gradescope programming assignment
(Ubuntu image, Python 3.10 or later). Each item runs in its own child process with a {timeout:g} s timeout and
a {memory_mb} MB memory limit; results.json has one test per graded function.

Try it locally: unzip into ROOT/source, put a submission into ROOT/submission, then
    AUTOGRADER_ROOT=ROOT PYTHON=python3 bash ROOT/source/run_autograder
and read ROOT/results/results.json.
"""


def _pyproject() -> str:
    """A minimal pyproject for the bundled source: minilora's version and its required dependencies."""
    try:
        version = importlib.metadata.version("minilora")
        requires = [r for r in importlib.metadata.requires("minilora") or [] if "extra ==" not in r]
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("minilora is not installed (pip install -e .), so its dependencies are unknown; "
                         "the autograder bundle needs them") from None
    dependencies = ",\n".join(f'    "{r}"' for r in requires)
    return (f'[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
            f'[project]\nname = "minilora"\nversion = "{version}"\nrequires-python = ">=3.10"\n'
            f'dependencies = [\n{dependencies}\n]\n\n[tool.setuptools.packages.find]\ninclude = ["minilora*"]\n')


def _add(archive: zipfile.ZipFile, name: str, data: bytes, executable: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))      # fixed: the same inputs, the same zip
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = ((0o755 if executable else 0o644) | stat.S_IFREG) << 16
    archive.writestr(info, data)


def build_autograder_zip(assignment: str, out_zip, timeout: float = 60.0, memory_mb: int = 1024) -> Path:
    """Write Gradescope's autograder zip for ``assignment`` to ``out_zip`` (atomically); return its path."""
    check_name(assignment)
    out_zip = Path(out_zip)
    if out_zip.suffix != ".zip":
        raise ValueError(f"the autograder bundle is a .zip file; got {out_zip}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _add(archive, "setup.sh", SETUP.encode(), executable=True)
        _add(archive, "run_autograder", RUN.format(assignment=assignment, timeout=timeout,
                                                   memory_mb=memory_mb).encode(), executable=True)
        _add(archive, "README.txt", README.format(assignment=assignment, timeout=timeout, memory_mb=memory_mb).encode())
        _add(archive, "minilora/pyproject.toml", _pyproject().encode())
        for directory, subdirs, files in os.walk(PACKAGE_DIR):
            subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
            for name in sorted(files):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = Path(directory) / name
                _add(archive, f"minilora/{path.relative_to(PACKAGE_DIR.parent).as_posix()}", path.read_bytes())
    write_bytes_atomic(out_zip, buffer.getvalue())
    return out_zip
