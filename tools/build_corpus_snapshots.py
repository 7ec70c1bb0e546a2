"""Rebuild minilora's corpus snapshots (minilora/corpora/) from the Python that runs this script.

    python tools/build_corpus_snapshots.py [--out minilora/corpora]

Reads every text of minilora/stdlib_texts.py from the running Python (which must have all of them, tkinter's
sources included), writes each as <name>.txt.gz (gzip with no timestamp, so a rebuild from the same Python gives
the same bytes), copies the Python's LICENSE.txt (the PSF license covering the texts), and writes manifest.json
last: each text's file, length, sha256 and provenance. Only the standard library is needed. New snapshots change
every figure that depends on them: the tests that record corpus hashes and fixed-seed losses will say so.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _stdlib_texts():
    """minilora/stdlib_texts.py, loaded by path so that the package (and NumPy) need not be importable."""
    spec = importlib.util.spec_from_file_location("stdlib_texts", REPO / "minilora" / "stdlib_texts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def build(out: Path) -> dict:
    texts = _stdlib_texts()
    out.mkdir(parents=True, exist_ok=True)
    license_path = Path(texts.python_license_path())
    if not license_path.is_file():
        raise SystemExit(f"this Python has no {license_path}; the snapshots must ship with the PSF license")
    read = {}
    for name in texts.TEXTS:       # every text is read before anything is written: all snapshots or none
        try:
            read[name] = texts.read_python_text(name)
        except ValueError as e:
            raise SystemExit(f"cannot snapshot {name!r} from this Python: {e}") from None
    entries = {}
    for name, (text, provenance) in read.items():
        file = f"{name}.txt.gz"
        _write_atomically(out / file, gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
        entries[name] = {"file": file, "description": texts.TEXTS[name], "characters": len(text),
                         "sha256": texts.sha256_text(text), "provenance": provenance}
        print(f"{name:8s} {len(text):8,d} characters -> {file} ({(out / file).stat().st_size:,} bytes)")
    shutil.copyfile(license_path, out / "LICENSE-PSF.txt")
    manifest = {
        "about": "Frozen copies of texts from one CPython installation, so that minilora's corpora and tasks "
                 "give the same tokens on every Python. The texts are part of CPython, covered by the PSF "
                 "license in LICENSE-PSF.txt. Rebuilt by tools/build_corpus_snapshots.py.",
        "license": "LICENSE-PSF.txt",
        "built_with": f"{sys.implementation.name} {sys.version.splitlines()[0]}",
        "texts": entries,
    }
    _write_atomically(out / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "minilora" / "corpora")
    args = parser.parse_args()
    build(args.out)
    print(f"wrote {args.out / 'manifest.json'}")


if __name__ == "__main__":
    main()
