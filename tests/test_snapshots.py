"""The corpus snapshots shipped inside the package: complete, verified at every read, refused when damaged,
rebuildable by the repository's script, and carried by a non-editable install."""
import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy
import pytest

from minilora import data, stdlib_texts, tasks, tokenizer

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "tools" / "build_corpus_snapshots.py"


@pytest.fixture
def snapshot_copy(tmp_path, monkeypatch):
    """A copy of the shipped snapshots that the loaders read instead, free to damage."""
    copy = tmp_path / "corpora"
    shutil.copytree(data.SNAPSHOT_DIR, copy)
    monkeypatch.setattr(data, "SNAPSHOT_DIR", copy)
    return copy


def test_every_text_is_shipped_with_its_provenance_and_license():
    manifest = data.snapshot_manifest()
    assert sorted(manifest["texts"]) == sorted(stdlib_texts.TEXTS)
    for name, entry in manifest["texts"].items():
        text = data.read_text(name)
        assert len(text) == entry["characters"] > 100_000
        assert stdlib_texts.sha256_text(text) == entry["sha256"]
        provenance = entry["provenance"]
        assert provenance["python"].startswith("CPython 3.") and provenance["source"]
        assert provenance["files"] and all(len(digest) == 64 for digest in provenance["files"].values())
    if "tkinter" in manifest["texts"]:
        assert "tkinter/__init__.py" in manifest["texts"]["tkinter"]["provenance"]["files"]
    license_text = (data.SNAPSHOT_DIR / manifest["license"]).read_text(encoding="utf-8")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in license_text


def test_the_package_data_stays_small():
    total = sum(f.stat().st_size for f in data.SNAPSHOT_DIR.iterdir())
    assert total <= 3 * 2**20


def test_corpora_and_tasks_are_made_of_the_snapshots():
    for name, (_, text_name) in data.CORPORA.items():
        corpus = data.load_corpus(name)
        assert corpus.text == data.read_text(text_name) and corpus.source == "snapshot"
        assert corpus.sha256 == data.snapshot_manifest()["texts"][text_name]["sha256"]
    task = tasks.load_task("stdlib-package", length=15, val_per_class=2)
    for k, text_name in enumerate(task.classes):
        ids = tokenizer.encode(data.read_text(text_name))
        assert numpy.array_equal(task.train[k], ids[:int(len(ids) * (1 - data.VAL_FRACTION))])


def _flip_a_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["bit flip in the middle", "bit flip in the checksum", "truncated", "empty",
                                    "not gzip"])
def test_a_damaged_snapshot_is_refused_naming_the_file(snapshot_copy, damage):
    path = snapshot_copy / "email.txt.gz"
    size = path.stat().st_size
    if damage == "bit flip in the middle":
        _flip_a_byte(path, size // 2)
    elif damage == "bit flip in the checksum":
        _flip_a_byte(path, size - 6)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:size // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"def f():\n    return 1\n")
    for load in (lambda: data.load_corpus("python-email"), lambda: tasks.load_task(length=15, val_per_class=2)):
        with pytest.raises(ValueError, match=r"email\.txt\.gz"):
            load()


def test_an_edited_snapshot_is_refused_by_its_sha256(snapshot_copy):
    path = snapshot_copy / "pydoc.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    path.write_bytes(gzip.compress(text.replace("the", "teh", 1).encode("utf-8")))   # a valid gzip file
    with pytest.raises(ValueError, match=r"pydoc\.txt\.gz holds a text with sha256 [0-9a-f]{64}, but"):
        data.load_corpus("pydoc")
    data.load_corpus("python-email")          # the other texts still load


def test_a_missing_or_damaged_manifest_or_file_is_a_clear_error(snapshot_copy):
    (snapshot_copy / "xml.txt.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"xml\.txt\.gz is missing"):
        data.read_text("xml")
    manifest = snapshot_copy / data.MANIFEST
    saved = manifest.read_text(encoding="utf-8")
    manifest.write_text(saved[:len(saved) // 2], encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest .*manifest\.json is damaged"):
        data.read_text("pydoc")
    entries = json.loads(saved)
    del entries["texts"]["asyncio"]
    manifest.write_text(json.dumps(entries), encoding="utf-8")
    with pytest.raises(ValueError, match="no valid entry for 'asyncio'"):
        data.read_text("asyncio")
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        data.load_corpus("pydoc")


def test_bad_names_and_sources_are_clear_errors():
    with pytest.raises(ValueError, match="unknown text 'sentiment'"):
        data.read_text("sentiment")
    with pytest.raises(ValueError, match="unknown text source 'internet'"):
        data.load_corpus("pydoc", source="internet")
    with pytest.raises(ValueError, match="unknown text source 'internet'"):
        tasks.load_task(source="internet")


@pytest.mark.parametrize("name", sorted(stdlib_texts.TEXTS))
def test_the_running_pythons_own_texts_stay_readable(name):
    if name in stdlib_texts.PACKAGES and not os.path.isdir(stdlib_texts.stdlib_package_dir(name)):
        with pytest.raises(ValueError, match=f"{name}' package sources are not installed"):
            data.read_text(name, source="python")
        return
    text, provenance = stdlib_texts.read_python_text(name)
    assert data.read_text(name, source="python") == text and len(text) > 100_000
    assert provenance["files"]
    shipped = data.snapshot_manifest()["texts"][name]
    if provenance["files"] == shipped["provenance"]["files"]:     # the very files the snapshot was taken from
        assert stdlib_texts.sha256_text(text) == shipped["sha256"]


def test_the_script_rebuilds_the_snapshots_from_the_running_python(tmp_path):
    out = tmp_path / "corpora"
    run = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    missing = [p for p in stdlib_texts.PACKAGES if not os.path.isdir(stdlib_texts.stdlib_package_dir(p))]
    if missing:               # all texts or none: a Python without a package's sources writes nothing
        assert run.returncode != 0 and f"cannot snapshot {missing[0]!r}" in run.stderr
        assert not out.exists() or not any(out.iterdir())
        return
    assert run.returncode == 0, run.stderr
    built = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for name, entry in built["texts"].items():
        assert stdlib_texts.sha256_text(gzip.decompress((out / entry["file"]).read_bytes()).decode()) == entry["sha256"]
        assert entry["sha256"] == stdlib_texts.sha256_text(stdlib_texts.read_python_text(name)[0])
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(again)], check=True, capture_output=True,
                   timeout=300)
    for entry in built["texts"].values():     # no timestamps: a rebuild from the same Python is byte-identical
        assert (out / entry["file"]).read_bytes() == (again / entry["file"]).read_bytes()
    if built["texts"] == data.snapshot_manifest()["texts"]:
        for entry in built["texts"].values():
            assert (out / entry["file"]).read_bytes() == (data.SNAPSHOT_DIR / entry["file"]).read_bytes()


def test_a_non_editable_install_carries_the_data_files(tmp_path):
    """pip install . into a fresh virtual environment, then run from another folder: the snapshots and the
    pretrained model come with the package. The fresh environment borrows this one's dependencies (NumPy,
    setuptools) through a path file, so nothing is downloaded."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "runs", "notebooks", "tests", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], str(Path(numpy.__file__).resolve().parent.parent)}
    Path(site, "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    # the venv's own bundled setuptools (if any) may be too old to build this project; the borrowed one is not
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "setuptools"], check=True, capture_output=True)
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = (
        "import minilora, minilora.data as d, minilora.tasks as t, minilora.io.pretrained as p\n"
        "print(minilora.__file__)\n"
        "assert all(d.load_corpus(n).sha256 for n in d.CORPORA)\n"
        "assert t.load_task('stdlib-package', length=15, val_per_class=2).classes\n"
        "p.load_pretrained()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(python), "-c", check], cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).resolve().is_relative_to(Path(site).resolve())
