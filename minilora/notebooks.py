"""Running the teaching notebooks headless: ``minilora notebooks run [NAMES] [--out DIR] [--short]``.

Each notebook runs from top to bottom in a fresh Jupyter kernel (nbclient), with matplotlib's inline backend (no
display is needed, and the figures land in the executed copy) and the notebook's folder as the working directory; ``short`` sets MINILORA_QUICK=1, which every
notebook reads to make its slow parts smaller (the test suite runs them so). The notebooks assert their own
results, so a notebook that runs to the end passed every check in it. The executed copies, outputs included,
are written to ``out_dir`` when one is given.

Needs nbformat, nbclient and ipykernel (the ``test`` extra: ``pip install -e ".[test]"``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"     # in a clone of the repository
TIMEOUT_S = 900


@dataclass
class NotebookRun:
    """One notebook's run: passed, its wall time, and what went wrong (the failing cell's error) if not."""

    name: str
    passed: bool
    seconds: float
    error: str = ""
    written: str | None = None


def find_notebooks(names=(), directory=None) -> list:
    """The notebooks to run: every *.ipynb of ``directory`` (default: the repository's notebooks/), or those whose
    file name starts with one of ``names`` ("03", "04_lora", "03_tiny_gpt.ipynb")."""
    directory = Path(directory) if directory is not None else NOTEBOOK_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"no notebooks folder at {directory} (the notebooks come with a clone of the "
                                "repository; give the folder with --dir)")
    every = sorted(directory.glob("*.ipynb"))
    if not names:
        return every
    chosen, unknown = [], []
    for name in names:
        matches = [p for p in every if p.name.startswith(name)]
        if not matches:
            unknown.append(name)
        chosen += [p for p in matches if p not in chosen]
    if unknown:
        raise ValueError(f"no notebook in {directory} starts with {', '.join(map(repr, unknown))}; the notebooks "
                         f"are {', '.join(p.stem for p in every)}")
    return chosen


def _requirements():
    import importlib.util

    missing = [m for m in ("nbformat", "nbclient", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"running notebooks needs nbformat, nbclient and ipykernel (missing: {', '.join(missing)});"
                         " install them with pip install -e \".[test]\"")
    import nbclient
    import nbformat
    return nbformat, nbclient



def run_notebook(path, short: bool = False, out_dir=None, timeout_s: float = TIMEOUT_S) -> NotebookRun:
    """Run one notebook (see the module docstring); never raises for what happens inside the notebook."""
    nbformat, nbclient = _requirements()
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    saved = {key: os.environ.get(key) for key in ("MINILORA_QUICK", "MPLBACKEND")}
    # the kernel inherits this process's environment: a backend set for a script (Agg, TkAgg) would keep the
    # figures out of the executed notebook, or need a display
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    if short:
        os.environ["MINILORA_QUICK"] = "1"
    else:
        os.environ.pop("MINILORA_QUICK", None)
    deadline = time.monotonic() + timeout_s
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=int(timeout_s),
        # each cell may use what the notebook's budget has left (at least 1 s, so the error names the cell)
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        error = f"a cell raised an error\n{exc}"
    except TimeoutError as exc:                       # nbclient's CellTimeoutError is a TimeoutError
        error = f"did not finish within {timeout_s:g} s\n{exc}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    run = NotebookRun(path.name, not error, time.perf_counter() - start, error)
    if out_dir is not None:
        target = Path(out_dir) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(target))
        run.written = str(target)
    return run
