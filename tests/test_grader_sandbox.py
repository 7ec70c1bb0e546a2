"""A catalogue of broken and cheating submissions, each with the outcome the grader must give: a report in
bounded time, never more marks than earned, and the reason in the feedback. Also notebooks and Gradescope."""
import json
import os
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from minilora.assignments import build_student, grade, source_path
from minilora.course.gradescope import build_autograder_zip
from minilora.course.grade import ITEMS
from minilora.course.sandbox import PACKAGE_DIR

QUICK = 5.0          # seconds: the timeout for the submissions that loop, so that the catalogue runs quickly


def points(name):
    return {item.function: item.points for item in ITEMS[name]}


def solution(name):
    return source_path(name).read_text()


def submission(tmp_path, name, text, file_name=None):
    path = tmp_path / (file_name or f"{name}.py")
    path.write_text(text)
    return path


def at_import(name, code):
    """The instructor solution with ``code`` run when the file is loaded (after its imports)."""
    return solution(name).replace("\n# ---", f"\n{code}\n# ---", 1)


def in_function(name, function, code):
    """The instructor solution with ``code`` as the first line of ``function``'s solution."""
    text = solution(name)
    start = text.index(f"def {function}(")
    marker = text.index("# BEGIN SOLUTION\n", start) + len("# BEGIN SOLUTION\n")
    return text[:marker] + f"    {code}\n" + text[marker:]


def only_this_item_fails(report, name, item, reason):
    failed = [i.name for i in report.items if not i.passed]
    assert failed == [item], (failed, [i.feedback for i in report.items])
    assert reason in report.item(item).feedback, report.item(item).feedback
    assert report.earned == report.possible - points(name)[item]


def everything_fails(report, reason):
    assert report.earned == 0
    assert all(reason in i.feedback for i in report.items), [i.feedback for i in report.items]


# ----------------------------------------------------------------------------------------------------
# implement, don't import


@pytest.mark.parametrize("code", [
    "from minilora.functional import gelu_backward",
    "import minilora.core.functional as F",
    "from minilora import functional",
    "import importlib\nF = importlib.import_module('minilora.core.functional')",
    "F = __import__('minilora')",
])
def test_importing_minilora_scores_zero_before_anything_runs(tmp_path, code):
    text = solution("layers").replace("import numpy as np\n", f"import numpy as np\n{code}\n", 1)
    everything_fails(grade("layers", submission(tmp_path, "layers", text)), "a graded function must be your own code")


def test_importing_minilora_in_a_function_or_by_a_computed_name_is_refused_at_run_time(tmp_path):
    static = in_function("layers", "gelu_backward", "from minilora.core.functional import gelu_backward as g")
    everything_fails(grade("layers", submission(tmp_path, "layers", static)), "imports minilora.core.functional")
    hidden = in_function("layers", "gelu_backward",
                         "return __import__('importlib').import_module('mini' + 'lora.core.functional')"
                         ".gelu_backward(dout, cache)")
    report = grade("layers", submission(tmp_path, "layers", hidden))
    only_this_item_fails(report, "layers", "gelu_backward", "a submission")      # may not import, nor read, minilora
    assert "minilora" in report.item("gelu_backward").feedback


def test_reading_the_solution_sources_is_refused(tmp_path):
    source = PACKAGE_DIR / "course" / "sources" / "layers.py"
    code = f"exec(open({str(source)!r}).read(), globals())"
    everything_fails(grade("layers", submission(tmp_path, "layers", at_import("layers", code))),
                     "may not read")


def test_a_graded_function_from_elsewhere_is_not_the_students(tmp_path):
    text = solution("lora_layer") + "\nfrom numpy import add as merge\n"
    report = grade("lora_layer", submission(tmp_path, "lora_layer", text))
    only_this_item_fails(report, "lora_layer", "merge", "merge is not defined in your file (it comes from numpy)")


# ----------------------------------------------------------------------------------------------------
# the process: loops, exits, interrupts, memory, files


def test_an_endless_loop_costs_its_item_and_the_rest_is_graded(tmp_path):
    text = in_function("layers", "gelu_backward", "while True: pass")
    start = time.perf_counter()
    report = grade("layers", submission(tmp_path, "layers", text), timeout=QUICK)
    only_this_item_fails(report, "layers", "gelu_backward", f"timed out after {QUICK:g} s")
    assert time.perf_counter() - start < QUICK + 60


def test_an_endless_loop_at_import_is_timed_out_once(tmp_path):
    start = time.perf_counter()
    report = grade("layers", submission(tmp_path, "layers", at_import("layers", "while True: pass")), timeout=QUICK)
    everything_fails(report, "timed out")
    assert time.perf_counter() - start < 2 * QUICK + 30        # not once per item


@pytest.mark.parametrize("code, reason", [
    ("import os; os._exit(0)", "exited with code 0"),
    ("import os; os._exit(3)", "exited with code 3"),
    ("import sys; sys.exit(0)", "does not import: SystemExit"),
    ("raise KeyboardInterrupt", "does not import: KeyboardInterrupt"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
])
def test_ending_the_process_at_import_scores_zero_with_the_reason(tmp_path, code, reason):
    everything_fails(grade("subspace", submission(tmp_path, "subspace", at_import("subspace", code))), reason)


@pytest.mark.parametrize("code, reason", [
    ("import os; os._exit(0)", "exited with code 0 (os._exit or a crash?) while its functions ran"),
    ("raise SystemExit(0)", "raised SystemExit"),
    ("raise KeyboardInterrupt", "raised KeyboardInterrupt"),
    ("raise GeneratorExit", "raised GeneratorExit"),
])
def test_ending_the_process_in_a_graded_function_costs_only_that_item(tmp_path, code, reason):
    report = grade("lora_layer", submission(tmp_path, "lora_layer", in_function("lora_layer", "merge", code)))
    only_this_item_fails(report, "lora_layer", "merge", reason)


def test_a_huge_allocation_is_stopped_by_the_memory_limit(tmp_path):
    text = in_function("lora_layer", "unmerge", "waste = np.ones(2**28)")         # 2 GiB of float64
    report = grade("lora_layer", submission(tmp_path, "lora_layer", text), memory_mb=1024)
    only_this_item_fails(report, "lora_layer", "unmerge", "MemoryError")


def test_writing_outside_its_folder_or_starting_processes_is_refused(tmp_path):
    target = tmp_path / f"written-{uuid.uuid4().hex}.txt"
    text = at_import("subspace", f"open({str(target)!r}, 'w').write('pwned')")
    everything_fails(grade("subspace", submission(tmp_path, "subspace", text)), "may not write")
    assert not target.exists()
    inside = at_import("subspace", "open('scratch.txt', 'w').write('fine')")          # its own folder is fine
    assert grade("subspace", submission(tmp_path, "subspace", inside)).earned == 10
    spawn = in_function("subspace", "fwht", "import subprocess; subprocess.run(['true'])")
    only_this_item_fails(grade("subspace", submission(tmp_path, "subspace", spawn)), "subspace", "fwht",
                         "subprocess.Popen is not allowed")
    removal = at_import("subspace", f"import os; os.remove({str(source_path('subspace'))!r})")
    everything_fails(grade("subspace", submission(tmp_path, "subspace", removal)), "not allowed")
    assert source_path("subspace").is_file()


# ----------------------------------------------------------------------------------------------------
# patching: the verdict is the grader's, in the grader's process


def test_patching_numpy_changes_only_the_students_own_results(tmp_path):
    text = at_import("layers", "np.tanh = lambda x: 0 * x")          # the given gelu_forward uses tanh
    report = grade("layers", submission(tmp_path, "layers", text))
    only_this_item_fails(report, "layers", "gelu_backward", "gelu_forward output wrong")
    cheat = "np.allclose = lambda *a, **k: True\nnp.testing.assert_allclose = lambda *a, **k: None\n"
    student = build_student("layers", tmp_path / "student")[0]
    student.write_text(student.read_text() + cheat)
    assert grade("layers", student).earned == 0


def test_patching_the_graders_helpers_from_the_submission_changes_nothing(tmp_path):
    student = build_student("subspace", tmp_path / "student")[0]
    student.write_text(student.read_text() + (
        "import sys\n"
        "for name, module in list(sys.modules.items()):\n"
        "    if 'minilora' in name or name == '__main__':\n"
        "        for helper in ('rel_error', '_compare', '_feedback', '_numerical_gradient'):\n"
        "            if hasattr(module, helper):\n"
        "                setattr(module, helper, lambda *a, **k: 0.0)\n"))
    report = grade("subspace", student)
    assert report.earned == 0 and all("NotImplementedError" in i.feedback for i in report.items)


# ----------------------------------------------------------------------------------------------------
# contracts: dtype, shape, returning the inputs


@pytest.mark.parametrize("name, item, old, new, reason", [
    ("layers", "linear_backward", "return dx, dW, db\n    # END SOLUTION",
     "return dx.astype(np.float32), dW, db\n    # END SOLUTION", "has dtype float32; expected float64"),
    ("layers", "gelu_backward", "return dout * dout_dx", "return (dout * dout_dx).astype(np.float32)",
     "has dtype float32"),
    ("lora_layer", "merge", "return W + scale * (B @ A).T", "return (W + scale * (B @ A).T).T", "has shape"),
    ("lora_layer", "merge", "return W + scale * (B @ A).T", "return W", "wrong: rel. error"),
    ("layers", "gelu_backward", "return dout * dout_dx", "return dout", "dx wrong"),
    ("subspace", "fwht", "    return y\n", "    return list(y)\n", "is a list"),
    ("lora_layer", "unmerge", "return W_merged - scale * (B @ A).T", "return None", "is None"),
])
def test_contract_violations_cost_their_item(tmp_path, name, item, old, new, reason):
    text = solution(name)
    assert text.count(old) == 1, old
    report = grade(name, submission(tmp_path, name, text.replace(old, new)))
    only_this_item_fails(report, name, item, reason)


# ----------------------------------------------------------------------------------------------------
# notebooks


def as_notebook(text, extra_cells=()):
    """A notebook whose code cells are the file's top-level blocks, plus IPython lines that are not Python."""
    blocks = [block for block in text.split("\n\n\n") if block.strip()]
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# my assignment\n"]}]
    cells += [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
               "source": block.splitlines(keepends=True)} for block in [*extra_cells, *blocks]]
    return json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


@pytest.mark.parametrize("name", ["layers", "lora_layer", "subspace"])
def test_a_notebook_gets_the_same_score_as_the_same_code(tmp_path, name):
    nb = tmp_path / f"{name}.ipynb"
    nb.write_text(as_notebook(solution(name), extra_cells=["%matplotlib inline\n!pip list\nimport numpy as np"]))
    assert grade(name, nb).earned == grade(name, source_path(name)).earned == sum(points(name).values())
    bugged = tmp_path / f"{name}_bugged.ipynb"
    text = in_function(name, ITEMS[name][0].function, "raise RuntimeError('in my notebook')")
    bugged.write_text(as_notebook(text))
    feedback = grade(name, bugged).item(ITEMS[name][0].function).feedback
    assert "RuntimeError: in my notebook (cell " in feedback, feedback


def test_a_folder_submission_and_unreadable_notebooks(tmp_path):
    folder = tmp_path / "submission"
    folder.mkdir()
    (folder / "lora_layer.py").write_text(solution("lora_layer"))
    assert grade("lora_layer", folder).earned == 10
    (folder / "lora_layer.py").unlink()
    (folder / "notes.py").write_text(solution("lora_layer"))
    assert grade("lora_layer", folder).earned == 10                # the only .py there
    (folder / "other.py").write_text("")
    with pytest.raises(FileNotFoundError, match="expected lora_layer.py or lora_layer.ipynb"):
        grade("lora_layer", folder)
    (tmp_path / "bad.ipynb").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable notebook"):
        grade("lora_layer", tmp_path / "bad.ipynb")


# ----------------------------------------------------------------------------------------------------
# Gradescope


def test_gradescope_results_json(tmp_path):
    from minilora.assignments.cli import main

    student = build_student("lora_layer", tmp_path / "student")[0]
    results = tmp_path / "results.json"
    assert main(["grade", "lora_layer", str(student), "--gradescope", str(results)]) == 0
    data = json.loads(results.read_text())
    assert data["score"] == 0 and data["max_score"] == 10
    assert [t["name"] for t in data["tests"]] == [i.function for i in ITEMS["lora_layer"]]
    for test in data["tests"]:
        assert set(test) >= {"name", "score", "max_score", "output", "visibility"} and test["score"] == 0
    assert main(["grade", "lora_layer", str(tmp_path / "none"), "--gradescope", str(results)]) == 0
    assert json.loads(results.read_text())["score"] == 0 and "not graded" in json.loads(results.read_text())["output"]


def test_the_autograder_bundle_dry_run(tmp_path):
    """Unzip the bundle as Gradescope does, put a submission in place, run run_autograder: results.json appears
    with the score the grader gives. (setup.sh installs the bundled source with pip; here the bundled source is
    put on the path instead, and setup.sh is only checked to be valid bash.)"""
    bundle = build_autograder_zip("layers", tmp_path / "autograder.zip", timeout=30, memory_mb=1024)
    root = tmp_path / "autograder"
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        archive.extractall(root / "source")
    assert {"setup.sh", "run_autograder", "minilora/pyproject.toml", "minilora/minilora/course/grade.py",
            "minilora/minilora/course/child.py"} <= set(names)
    assert not any("pretrained/" in n or n.endswith(".pyc") for n in names)
    assert build_autograder_zip("layers", tmp_path / "again.zip", timeout=30).read_bytes() == bundle.read_bytes()
    subprocess.run(["bash", "-n", str(root / "source" / "setup.sh")], check=True)
    (root / "submission").mkdir(parents=True)
    (root / "submission" / "layers.py").write_text(solution("layers").replace("0.5 * x * dt_dx", "x * dt_dx"))
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable,
           "PYTHONPATH": str(root / "source" / "minilora")}
    run = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == 15 - points("layers")["gelu_backward"] and results["max_score"] == 15
    assert "minilora/course" in run.stdout or "layers" in run.stdout
    with pytest.raises(ValueError, match="a .zip file"):
        build_autograder_zip("layers", tmp_path / "bundle.tar")


def test_limits_are_validated(tmp_path):
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        grade("layers", source_path("layers"), timeout=0)
    with pytest.raises(ValueError, match="memory_mb must be a positive number"):
        grade("layers", source_path("layers"), memory_mb=-1)


def test_the_child_never_sees_minilora(tmp_path):
    """The child runs by path with -I: minilora is not imported there, only NumPy and the student's file."""
    probe = in_function("subspace", "fwht", "import sys; assert not any(m.startswith('minilora') for m in sys.modules)")
    assert grade("subspace", submission(tmp_path, "subspace", probe)).earned == 10
    assert Path(PACKAGE_DIR / "course" / "child.py").read_text().count("import minilora") == 0
