"""Every teaching notebook runs from top to bottom in quick mode without an error, through the same runner as
``minilora notebooks run --short``.

Each notebooks/*.ipynb is its own test case, so a new notebook is tested as soon as it is added. The kernel
gets MINILORA_QUICK=1 (each notebook makes its slow parts smaller) and the Agg backend (no display needed),
starts in notebooks/ (so relative paths behave as they do for a reader), and each notebook has 300 s in all.
The notebooks assert their own results, so "runs without an error" means "every check in it passed".
"""
import json

import pytest

pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install nbformat)")
pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install nbclient)")
pytest.importorskip("ipykernel", reason="the notebook tests need a Jupyter kernel (pip install ipykernel)")

from minilora import cli  # noqa: E402
from minilora.notebooks import find_notebooks, run_notebook  # noqa: E402

TIMEOUT_S = 300   # per notebook, all cells together


@pytest.mark.parametrize("path", find_notebooks(), ids=lambda p: p.name)
def test_notebook_runs(path):
    run = run_notebook(path, short=True, timeout_s=TIMEOUT_S)
    if not run.passed:
        pytest.fail(f"{path.name}: {run.error}", pytrace=False)


def test_the_command_runs_notebooks_and_writes_the_executed_copies(tmp_path, capsys):
    assert cli.main(["notebooks", "run", "01", "--short", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "01_backprop_by_hand.ipynb" in out and "passed in" in out and "1 of 1 notebooks passed" in out
    executed = json.loads((tmp_path / "01_backprop_by_hand.ipynb").read_text())
    assert any(cell.get("outputs") for cell in executed["cells"] if cell["cell_type"] == "code")
    assert cli.main(["notebooks", "run", "nope"]) == 2
    assert "no notebook in" in capsys.readouterr().err
