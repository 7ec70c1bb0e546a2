"""Course assignments: the shipped solutions score full marks, the student versions score zero without
crashing the grader, and a planted bug costs exactly the points of the function it is in."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minilora import functional as F
from minilora import backend, gradcheck, intrinsic
from minilora.assignments import (
    ASSIGNMENTS,
    build_student,
    format_report,
    grade,
    source_path,
    strip_solutions,
)
from minilora.assignments.cli import main
from minilora.assignments.grade import ITEMS, reference_subspace_loss_and_grad


@pytest.fixture(autouse=True)
def numpy_backend():
    """The assignments are NumPy code (students write NumPy): they are built, run and graded on the host."""
    with backend.backend("numpy"):
        yield


def points(name):
    return {item.function: item.points for item in ITEMS[name]}


def planted(tmp_path, name, old, new, count=1):
    """A copy of the instructor source with one planted bug (``old`` must occur ``count`` times)."""
    text = source_path(name).read_text()
    assert text.count(old) == count, f"{old!r} occurs {text.count(old)} times in {name}"
    path = tmp_path / f"{name}.py"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_shipped_solutions_score_full_marks(name):
    report = grade(name, source_path(name))
    assert report.possible == sum(points(name).values()) >= 10
    assert report.earned == report.possible, format_report(report)
    assert all(item.feedback.startswith("correct on") for item in report.items)


def test_student_versions_import_and_score_zero(tmp_path):
    written = build_student("all", tmp_path / "student")
    assert sorted(p.name for p in written) == sorted(f"{n}.py" for n in ASSIGNMENTS)
    assert sorted(os.listdir(tmp_path / "student")) == sorted(f"{n}.py" for n in ASSIGNMENTS)   # nothing else
    for name in ASSIGNMENTS:
        text = (tmp_path / "student" / f"{name}.py").read_text()
        assert "SOLUTION" not in text and "PLACEHOLDER" not in text
        report = grade(name, tmp_path / "student" / f"{name}.py")
        assert report.earned == 0 and len(report.items) == len(ITEMS[name])
        for item in report.items:
            assert "NotImplementedError" in item.feedback and "(line " in item.feedback, item.feedback


# One planted bug per graded function: (assignment, item, old text, new text).
BUGS = [
    ("layers", "linear_backward", "db = dy2.sum(axis=0) if", "db = 2 * dy2.sum(axis=0) if"),
    ("layers", "layernorm_backward", " - xhat2 * (dxhat * xhat2).mean(axis=-1, keepdims=True)", ""),
    ("layers", "gelu_backward", "0.5 * x * dt_dx", "x * dt_dx"),
    ("layers", "attention_backward", "dqh = (dscores @ kh) * scale", "dqh = dscores @ kh"),
    ("layers", "softmax_cross_entropy", "keep[:, None] / n_counted", "keep[:, None] / rows.shape[0]"),
    ("lora_layer", "lora_forward", "y = y + update.reshape(y.shape)", "y = y + 2 * update.reshape(y.shape)"),
    ("lora_layer", "lora_backward", "dx = dx + dropout_backward(dxd, drop_cache)", "dx = dx + dxd"),
    ("lora_layer", "merge", "return W + scale * (B @ A).T", "return W + scale * (A.T @ B.T).T"),
    ("lora_layer", "unmerge", "return W_merged - scale * (B @ A).T",
     "W_merged -= scale * (B @ A).T\n    return W_merged"),
    ("subspace", "fwht", "np.stack((a + b, a - b)", "np.stack((a + b, b - a)"),
    ("subspace", "fastfood_project", "take_along_axis(x, ff.perm", "take_along_axis(x, ff.inverse_perm"),
    ("subspace", "fastfood_transpose", "y.sum(axis=0)[:ff.d]", "y[0, :ff.d]"),
    ("subspace", "subspace_loss_and_grad", "X.T @ residual / X.shape[0]", "X.T @ residual"),
]


@pytest.mark.parametrize("name, item, old, new", BUGS, ids=[f"{b[0]}-{b[1]}" for b in BUGS])
def test_a_planted_bug_costs_exactly_its_item(tmp_path, name, item, old, new):
    report = grade(name, planted(tmp_path, name, old, new))
    assert report.possible - report.earned == points(name)[item], format_report(report)
    assert not report.item(item).passed and all(i.passed for i in report.items if i.name != item)


def test_every_item_has_a_planted_bug():
    assert {(b[0], b[1]) for b in BUGS} == {(n, i.function) for n in ASSIGNMENTS for i in ITEMS[n]}


def test_layer_pairs_are_graded_on_the_gradient_check_cases():
    """Every item that is a layer pair is graded on that pair's cases in the gradient-check registry, the cases
    ``minilora gradcheck`` and tests/test_gradcheck.py check (T = 1, dropout, LoRA with W frozen ...)."""
    pairs = {"linear_backward": "linear", "layernorm_backward": "layernorm", "gelu_backward": "gelu",
             "attention_backward": "attention", "softmax_cross_entropy": "cross-entropy", "lora_forward": "lora",
             "lora_backward": "lora"}
    items = {item.function: item for name in ASSIGNMENTS for item in ITEMS[name]}
    for function, pair in pairs.items():
        assert items[function].case_names() == [c.name for c in gradcheck.cases_of(pair)], function


def test_feedback_names_the_wrong_gradient_and_by_how_much(tmp_path):
    report = grade("layers", planted(tmp_path, "layers", "dW = x2.T @ dy2", "dW = 1.5 * (x2.T @ dy2)"))
    feedback = report.item("linear_backward").feedback
    assert feedback.startswith("dW wrong: rel. error 2.0e-01 > 1e-07") and "first differing index (0, 0)" in feedback
    assert "gradients against centred differences of your linear_forward wrong" in feedback
    assert feedback.endswith("correct: linear_forward output, dx, db")
    shape_bug = grade("lora_layer", planted(tmp_path, "lora_layer", "return W + scale * (B @ A).T",
                                            "return (W + scale * (B @ A).T).T"))
    assert "has shape" in shape_bug.item("merge").feedback
    in_place = grade("lora_layer", planted(tmp_path, "lora_layer", "return W_merged - scale * (B @ A).T",
                                           "W_merged -= scale * (B @ A).T\n    return W_merged"))
    assert "modified its input W_merged" in in_place.item("unmerge").feedback


def test_a_backward_is_graded_on_the_students_own_forward(tmp_path):
    """The pair is graded as CS231n does: a forward whose cache is wrong (the down-projection without dropout)
    costs the backward that reads it too; a forward that only gets y wrong costs only itself."""
    report = grade("lora_layer", planted(tmp_path, "lora_layer", "h = xd.reshape(-1, x.shape[-1]) @ A.T",
                                         "h = x.reshape(-1, x.shape[-1]) @ A.T"))
    assert [i.name for i in report.items if not i.passed] == ["lora_forward", "lora_backward"]
    assert "dB wrong" in report.item("lora_backward").feedback
    # any cache layout works: a forward that caches (x, W, b, A, B, scale, mask) with a backward to match
    text = source_path("lora_layer").read_text()
    own = text.replace("return y, (base_cache, xd, drop_cache, h, A, B, scale)",
                       "return y, {'inputs': (x, W, b, A, B), 'scale': scale, 'xd': xd, 'drop': drop_cache}")
    own = own.replace("    base_cache, xd, drop_cache, h, A, B, scale = cache\n",
                      "    x, W, b, A, B = cache['inputs']\n    scale, xd, drop_cache = cache['scale'], cache['xd'], "
                      "cache['drop']\n    base_cache = (x, W, b is not None)\n"
                      "    h = xd.reshape(-1, xd.shape[-1]) @ A.T\n")
    assert "{'inputs'" in own and "cache['inputs']" in own
    (tmp_path / "own.py").write_text(own)
    assert grade("lora_layer", tmp_path / "own.py").earned == 10


def test_a_function_calling_another_does_not_inherit_its_bug(tmp_path):
    """unmerge written with merge, and merge wrong: only merge loses points (unmerge is graded with a stand-in
    merge)."""
    path = planted(tmp_path, "lora_layer", "return W_merged - scale * (B @ A).T", "return merge(W_merged, A, B, -scale)")
    path.write_text(path.read_text().replace("return W + scale * (B @ A).T", "return W + (B @ A).T"))
    report = grade("lora_layer", path)
    assert [i.name for i in report.items if not i.passed] == ["merge"]


def test_any_exception_or_broken_file_scores_zero_without_crashing(tmp_path):
    report = grade("subspace", planted(tmp_path, "subspace", "    n = x.shape[-1]\n",
                                       "    n = x.shape[-1]\n    raise RuntimeError('oops')\n"))
    assert report.item("fwht").earned == 0 and "RuntimeError: oops (line" in report.item("fwht").feedback
    assert report.earned == report.possible - points("subspace")["fwht"]
    exits = grade("subspace", planted(tmp_path, "subspace", "    n = x.shape[-1]\n",
                                      "    n = x.shape[-1]\n    raise SystemExit(3)\n"))
    assert exits.item("fwht").earned == 0 and "SystemExit" in exits.item("fwht").feedback
    broken = tmp_path / "broken.py"
    broken.write_text("def fwht(x):\n    return x +\n")
    report = grade("subspace", broken)
    assert report.earned == 0 and all("does not compile: invalid syntax (line 2)" in i.feedback for i in report.items)
    renamed = tmp_path / "layers_solution.txt"          # any file name will do
    renamed.write_text(source_path("layers").read_text())
    assert grade("layers", renamed).earned == 15
    missing = tmp_path / "empty.py"
    missing.write_text("")
    assert all("no function named" in i.feedback for i in grade("layers", missing).items)


def test_bad_names_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown assignment 'layer'; expected one of layers, lora_layer"):
        grade("layer", source_path("layers"))
    with pytest.raises(ValueError, match="unknown assignment 'layer'"):
        build_student("layer", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown assignment"):
        source_path("nope")
    with pytest.raises(FileNotFoundError, match="no student file"):
        grade("layers", tmp_path / "nope.py")
    assert not (tmp_path / "out").exists()


def test_build_refuses_to_overwrite_unless_forced(tmp_path):
    out = tmp_path / "student"
    out.mkdir()                                        # an empty directory is fine
    build_student("layers", out)
    (out / "layers.py").write_text("# my work\n")
    (out / "notes.txt").write_text("keep me\n")
    with pytest.raises(FileExistsError, match="not empty"):
        build_student("lora_layer", out)
    assert sorted(os.listdir(out)) == ["layers.py", "notes.txt"] and (out / "layers.py").read_text() == "# my work\n"
    build_student("layers", out, force=True)           # overwrites the assignment file, leaves the rest
    assert "NotImplementedError" in (out / "layers.py").read_text() and (out / "notes.txt").read_text() == "keep me\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        build_student("layers", tmp_path / "file", force=True)


def test_strip_solutions_markers_placeholders_and_errors(tmp_path):
    source = ("def f(x):\n"
              "    y = x\n"
              "    # BEGIN SOLUTION\n"
              "    return y + 1\n"
              "    # END SOLUTION\n"
              "\n"
              "def g(x):\n"
              "    if x:\n"
              "        # BEGIN SOLUTION\n"
              "        return 2\n"
              "        # END SOLUTION\n"
              "        # BEGIN PLACEHOLDER\n"
              "        # return None  # TODO\n"
              "        # END PLACEHOLDER\n"
              "    return 0\n")
    student = strip_solutions(source)
    assert student == ("def f(x):\n"
                       "    y = x\n"
                       '    raise NotImplementedError("f: not implemented yet (write your solution here)")\n'
                       "\n"
                       "def g(x):\n"
                       "    if x:\n"
                       "        return None  # TODO\n"
                       "    return 0\n")
    bad = {
        "is not closed": "def f():\n    # BEGIN SOLUTION\n    pass\n",
        "without a '# BEGIN SOLUTION'": "def f():\n    pass\n    # END SOLUTION\n",
        "found '# BEGIN SOLUTION' first": "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n",
        "looks like a marker": "def f():\n    # BEGIN SOLUTION:\n    pass\n    # END SOLUTION\n",
        "no '# BEGIN SOLUTION' region": "x = 1\n",
        "must be commented out": "# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n# BEGIN PLACEHOLDER\nx = 2\n# END PLACEHOLDER\n",
        "does not compile": "if True:\n    # BEGIN SOLUTION\n    x = 1\n    # END SOLUTION\n# BEGIN PLACEHOLDER\n"
                            "# END PLACEHOLDER\n",
    }
    for message, text in bad.items():
        with pytest.raises(ValueError, match=message):
            strip_solutions(text, "src.py")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "good.py").write_text(source)
    (tmp_path / "src" / "bad.py").write_text(bad["is not closed"])
    with pytest.raises(ValueError, match="bad.py, line 2"):
        build_student(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()             # nothing is written unless every file builds


def test_the_given_code_matches_minilora():
    """The given code computes what minilora's reference computes: the forwards of 'layers' and the linear and
    dropout layers of 'lora_layer' (the same dropout masks from the same seed), and make_fastfood draws what
    FastfoodProjection draws."""
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_src_{name}", source_path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    layers, subspace = load("layers"), load("subspace")
    rng = np.random.default_rng(0)
    x, W, b, w = rng.standard_normal((2, 3, 8)), rng.standard_normal((8, 5)), rng.standard_normal(5), rng.standard_normal(8)
    pairs = [(layers.linear_forward(x, W, b), F.linear_forward(x, W, b)),
             (layers.layernorm_forward(x, w, w + 1), F.layernorm_forward(x, w, w + 1)),
             (layers.gelu_forward(x), F.gelu_forward(x)),
             (layers.attention_forward(x, x + 1, x - 1, 2, 0.3, np.random.default_rng(1)),
              F.attention_forward(x, x + 1, x - 1, 2, 0.3, np.random.default_rng(1)))]
    for (out, cache), (ref_out, ref_cache) in pairs:
        assert gradcheck.rel_error(out, ref_out) < 1e-14 and len(cache) == len(ref_cache)
        for a, r in zip(cache, ref_cache):
            assert (gradcheck.rel_error(a, r) < 1e-14) if isinstance(r, np.ndarray) else a == r
    logits, targets = 3 * x, rng.integers(0, 8, size=(2, 3))
    targets[0, 0] = -100
    ours, ref = layers.softmax_cross_entropy(logits, targets, -100), F.softmax_cross_entropy(logits, targets, -100)
    assert abs(ours[0] - ref[0]) < 1e-14 and gradcheck.rel_error(ours[1], ref[1]) < 1e-14
    lora_layer = load("lora_layer")
    given = [(lora_layer.linear_forward(x, W, b), F.linear_forward(x, W, b)),
             (lora_layer.dropout_forward(x, 0.3, np.random.default_rng(2)), F.dropout_forward(x, 0.3, np.random.default_rng(2)))]
    for (out, cache), (ref_out, ref_cache) in given:
        assert np.array_equal(out, ref_out) and len(cache) == len(ref_cache)
    dy = rng.standard_normal((2, 3, 5))
    for ours, ref in zip(lora_layer.linear_backward(dy, given[0][0][1]), F.linear_backward(dy, given[0][1][1])):
        assert gradcheck.rel_error(ours, ref) < 1e-14
    ff, ref = subspace.make_fastfood(37, 5, seed=3), intrinsic.FastfoodProjection(37, 5, seed=3)
    for field in ("D", "d", "n", "m", "B", "G", "scale", "perm", "inverse_perm"):
        assert np.array_equal(getattr(ff, field), getattr(ref, field)), field


def test_subspace_reference_gradient_matches_centred_differences():
    rng = np.random.default_rng(0)
    ff = intrinsic.FastfoodProjection(37, 5, seed=1)
    theta0, theta_d, X, y = rng.standard_normal(37), rng.standard_normal(5), rng.standard_normal((9, 37)), rng.standard_normal(9)
    _, grad = reference_subspace_loss_and_grad(ff, theta0, theta_d, X, y)
    numeric = gradcheck.numerical_gradient(lambda t: reference_subspace_loss_and_grad(ff, theta0, t, X, y)[0], theta_d)
    assert gradcheck.rel_error(grad, numeric) < 1e-7


def test_cli_build_grade_and_json(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["build", "all", "--out", str(out)]) == 0
    assert main(["build", "layers", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["build", "layers", "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    assert main(["grade", "layers", str(out / "layers.py"), "--json", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "total                  0/15" in text and "linear_backward        0/2     FAIL" in text
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["earned"] == 0 and saved["possible"] == 15 and saved["items"][0]["name"] == "linear_backward"
    assert main(["grade", "layers", str(tmp_path / "missing.py")]) == 2
    with pytest.raises(SystemExit):
        main(["grade", "layer", str(out / "layers.py")])


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "minilora.assignments", "grade", "subspace",
                             str(source_path("subspace"))], check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert "total                   10/10" in result.stdout
