"""Every teaching notebook runs from top to bottom in quick mode without an error.

Each notebooks/*.ipynb is its own test case, so a new notebook is tested as soon as it is added. The kernel
gets MINILORA_QUICK=1 (each notebook makes its slow parts smaller) and the Agg backend (no display needed),
starts in notebooks/ (so relative paths behave as they do for a reader), and each notebook has 300 s in all.
The notebooks assert their own results, so "runs without an error" means "every check in it passed".
"""
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install nbclient)")
pytest.importorskip("ipykernel", reason="the notebook tests need a Jupyter kernel (pip install ipykernel)")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIMEOUT_S = 300   # per notebook, all cells together


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MINILORA_QUICK", "1")   # read by the kernel, which inherits this environment
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + TIMEOUT_S
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT_S,
        # each cell may use what the notebook's budget has left (at least 1 s, so the error names the cell)
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},   # the kernel's working directory
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        # the message holds the failing cell's source and its traceback
        pytest.fail(f"{path.name}: a cell raised an error\n{exc}", pytrace=False)
    except TimeoutError as exc:   # nbclient's CellTimeoutError is a TimeoutError
        pytest.fail(f"{path.name}: did not finish within {TIMEOUT_S} s in quick mode\n{exc}", pytrace=False)
