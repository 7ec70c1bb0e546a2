"""What the teaching notebooks may contain, read from the .ipynb JSON (nothing is executed).

The course's graded assignments (``minilora/course/sources/*.py``) hold their solutions between
``# BEGIN SOLUTION`` and ``# END SOLUTION``. A notebook derives the math of a graded function and checks
minilora's version of it numerically, but never shows the code: an instructor hands the notebooks out beside
the assignments. The rules, one test each, on every notebooks/*.ipynb:

(a) no code cell shows a graded function's code: no ``inspect.getsource`` (or ``??``, ``%psource``) of it, of
    minilora's version of it, or of a module that holds them; no cell defines a function named after it
    (``fwht``, ``my_fwht``, ``naive_attention_backward``...); and no line of any solution appears verbatim,
    whitespace ignored, in a cell's source or a text output;
(b) no notebook cites an issue number or the project's history (an issue reference, "previously", "before the fix");
(c) every code cell that draws with matplotlib sets a title and both axis labels (heuristic below);
(d) no assert involves a wall-clock timing, which machine load can flip (heuristic below).

Each test is parametrised by notebook, so a new notebook is covered as soon as it is added.
"""
import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOURCES = sorted((ROOT / "minilora" / "course" / "sources").glob("*.py"))
SOURCES = [p for p in SOURCES if p.name != "__init__.py"]

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
MIN_SOLUTION_CHARS = 20          # shorter solution lines ("h *= 2", "n = x.shape[-1]") prove nothing


# ----------------------------------------------------------------------------------------------------
# reading the notebooks and the assignment sources


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell):
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _text_outputs(cell):
    """Every text a code cell's stored outputs hold: streams, text/* representations, tracebacks."""
    texts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            texts.append(_joined(out["text"]))
        for mime, value in out.get("data", {}).items():
            if mime.startswith("text/"):
                texts.append(_joined(value))
        if "traceback" in out:
            texts.append("\n".join(out["traceback"]))
    return texts


def _joined(value):
    return "".join(value) if isinstance(value, list) else str(value)


def _cells(path, kind=None):
    """(index, cell) for every cell of a notebook (of one cell_type if kind is given)."""
    return [(i, c) for i, c in enumerate(_load(path)["cells"]) if kind is None or c["cell_type"] == kind]


def _strip_comments(text):
    """The source with every comment removed (tokenize knows a '#' inside a string from a comment)."""
    lines = text.splitlines(keepends=True)
    for tok in reversed(list(tokenize.generate_tokens(io.StringIO(text).readline))):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col].rstrip() + ("\n" if lines[row - 1].endswith("\n") else "")
    return lines


def _graded_functions():
    """{assignment: [names of the functions that hold a solution region]}, from the instructor sources."""
    graded = {}
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        names = []
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                body = lines[node.lineno - 1:node.end_lineno]
                if any(line.strip() == BEGIN for line in body):
                    names.append(node.name)
        graded[path.stem] = sorted(names)
    return graded


_TRIVIAL = [
    re.compile(r"^return(\s+[\w.]+(\s*,\s*[\w.]+)*)?,?$"),        # return dx, dW, db
    re.compile(r"^[\w\s,]+=\s*\w+\.shape(\[[^\]]*\])?$"),          # B, H, T, hs = qh.shape
    re.compile(r"^def \w+\([\w\s,=]*\):$"),                       # def join(a):
    re.compile(r"^\w+\s*=\s*\w+\.reshape\((?:[^()]|\([^()]*\))*\)$"),      # x2 = x.reshape(-1, x.shape[-1]): rows
]


def _solution_lines():
    """[(assignment, line)] for every non-trivial line of code inside a solution region, comments removed."""
    found = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        inside = False
        for raw, line in zip(text.splitlines(), _strip_comments(text)):
            marker = raw.strip()
            if marker == BEGIN:
                inside = True
            elif marker == END:
                inside = False
            elif inside:
                code = line.strip()
                if len(code) >= MIN_SOLUTION_CHARS and not any(p.match(code) for p in _TRIVIAL):
                    found.append((path.stem, code))
    return found


def _squash(text):
    return re.sub(r"\s+", "", text)


GRADED = _graded_functions()
GRADED_NAMES = sorted({name for names in GRADED.values() for name in names})
SOLUTION_LINES = _solution_lines()

# minilora's own versions of the graded functions (its merge and unmerge are merge_lora / unmerge_lora through
# delta_weight; Fastfood's project and transpose are methods), and the modules that hold them: showing any of
# these shows a solution
MINILORA_EQUIVALENTS = {"merge_lora", "unmerge_lora", "delta_weight", "FastfoodProjection", "project", "transpose"}
SOLUTION_MODULES = {"F", "functional", "lora", "intrinsic", "core", "fast_F", "kernels"}
NO_SOURCE_SHOWN = set(GRADED_NAMES) | MINILORA_EQUIVALENTS | SOLUTION_MODULES


def test_the_sources_hold_the_graded_functions():
    """The rules below are only as good as what they read: every graded function and enough solution lines."""
    assert GRADED == {
        "layers": sorted(["linear_backward", "layernorm_backward", "gelu_backward", "attention_backward",
                          "softmax_cross_entropy"]),
        "lora_layer": sorted(["lora_forward", "lora_backward", "merge", "unmerge"]),
        "subspace": sorted(["fwht", "fastfood_project", "fastfood_transpose", "subspace_loss_and_grad"]),
    }
    for assignment in GRADED:
        assert sum(a == assignment for a, _ in SOLUTION_LINES) >= 4, assignment
    kept = {line for _, line in SOLUTION_LINES}
    assert "dx = (dy2 @ W.T).reshape(x.shape)" in kept           # comments stripped, code kept
    assert "return dx, dW, db" not in kept                       # trivial lines dropped
    assert "x2 = x.reshape(-1, x.shape[-1])" not in kept         # (a flattening to rows, as in every forward)


# ----------------------------------------------------------------------------------------------------
# (a) no graded function's code


_GETSOURCE = re.compile(r"\b(?:inspect\.)?getsource(?:lines)?\(\s*([\w.]+)")
_HELP_SOURCE = re.compile(r"(?:%psource|%pfile|%pinfo2)\s+([\w.]+)|([\w.]+)\?\?")


def _shown_sources(src):
    """The dotted names whose source a code cell asks for."""
    names = [m.group(1) for m in _GETSOURCE.finditer(src)]
    names += [m.group(1) or m.group(2) for m in _HELP_SOURCE.finditer(src)]
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_graded_source_is_shown(path):
    bad = []
    for i, cell in _cells(path, "code"):
        for name in _shown_sources(_source(cell)):
            parts = name.split(".")
            if parts[-1] in NO_SOURCE_SHOWN or (len(parts) == 1 and parts[0] in SOLUTION_MODULES):
                bad.append(f"cell {i}: shows the source of {name}")
    assert not bad, (f"{path.name}: a graded function's code is shown (derive it in markdown instead):\n"
                     + "\n".join(bad))


_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(", re.MULTILINE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_implements_a_graded_function(path):
    """A heuristic: a function named after a graded one (as is, or with my_ / naive_ in front) implements it."""
    bad = []
    for i, cell in _cells(path, "code"):
        for name in _DEF.findall(_source(cell)):
            base = re.sub(r"^(my|naive|our|your)_", "", name)
            if base in GRADED_NAMES:
                bad.append(f"cell {i}: def {name}")
    assert not bad, f"{path.name}: a cell implements a graded function:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_solution_line_appears(path):
    texts = []
    for i, cell in _cells(path):
        texts.append((f"cell {i} ({cell['cell_type']})", _source(cell)))
        texts += [(f"cell {i} output", t) for t in _text_outputs(cell)]
    squashed = [(where, _squash(text)) for where, text in texts]
    bad = [f"{where}: {assignment}: {line}" for assignment, line in SOLUTION_LINES
           for where, text in squashed if _squash(line) in text]
    assert not bad, f"{path.name}: solution lines appear verbatim:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------------
# (b) no issue numbers, no history


_HISTORY = [
    re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE),                  # "issue" and a number, with or without #
    re.compile(r"\b(?:PR|pull request|gh)[\s-]*#?\s*\d+", re.IGNORECASE),
    re.compile(r"(?<![\w&])#\d{1,5}\b(?!\s*[,\])])"),                    # "#12" (not a "#1," list index)
    re.compile(r"\bpreviously\b", re.IGNORECASE),
    re.compile(r"\bbefore the (?:fix|change)\b", re.IGNORECASE),
    re.compile(r"\b(?:was|were|has been|have been) (?:changed|fixed|renamed|rewritten)\b", re.IGNORECASE),
    re.compile(r"\bno longer (?:prints|shows|uses|computes|asserts)\b", re.IGNORECASE),
    re.compile(r"\b(?:19|20)\d\d-[01]\d-[0-3]\d\b"),                     # a date
]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_history_or_issue_numbers(path):
    bad = []
    for i, cell in _cells(path):
        for text in [_source(cell)] + _text_outputs(cell):
            for pattern in _HISTORY:
                for m in pattern.finditer(text):
                    bad.append(f"cell {i}: {m.group(0)!r} in ...{text[max(0, m.start() - 40):m.end() + 40]!r}...")
    assert not bad, f"{path.name}: cites an issue or the project's history:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------------
# (c) plots have a title and labelled axes
#
# The heuristic: a code cell draws if it calls a matplotlib plotting method on plt or on an axes-like name
# (ax, axes[0], axs[i, j], ...). Such a cell must contain a title (set_title / title( / title= / suptitle),
# an x label (set_xlabel / xlabel( / xlabel=) and a y label, either itself or in a function defined in the same
# notebook that the cell calls (a helper). For a figure with several axes this asks for at least one of each,
# not one per axes: a review, not this test, checks the rest. Figures drawn inside minilora (a study's own
# plot(), shown as an image) are not matplotlib calls in the cell and are not covered.

_PLOT_CALL = re.compile(
    r"\b(?:plt|\w*ax(?:es|s)?\w*)(?:\[[^\]]*\])?\.(?:plot|bar|barh|scatter|hist|imshow|matshow|semilogy|semilogx|"
    r"loglog|errorbar|fill_between|stairs|stem|pie|contour|contourf|pcolormesh|boxplot|violinplot|hexbin)\(")
_TITLE = re.compile(r"set_title\(|\btitle\(|\btitle\s*=|suptitle\(")
_XLABEL = re.compile(r"set_xlabel\(|\bxlabel\(|\bxlabel\s*=")
_YLABEL = re.compile(r"set_ylabel\(|\bylabel\(|\bylabel\s*=")


def _helpers(path):
    """{function name: its source} for every function defined in the notebook's code cells."""
    helpers = {}
    for _, cell in _cells(path, "code"):
        src = _source(cell)
        try:
            tree = ast.parse(src)
        except SyntaxError:          # IPython syntax (magics): no helpers from this cell
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                helpers[node.name] = ast.get_source_segment(src, node) or ""
    return helpers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plots_have_titles_and_axis_labels(path):
    helpers = _helpers(path)
    bad = []
    for i, cell in _cells(path, "code"):
        src = _source(cell)
        if not _PLOT_CALL.search(src):
            continue
        text = src + "".join(body for name, body in helpers.items() if re.search(rf"\b{name}\(", src))
        missing = [what for what, pattern in (("title", _TITLE), ("x label", _XLABEL), ("y label", _YLABEL))
                   if not pattern.search(text)]
        if missing:
            bad.append(f"cell {i}: no {', no '.join(missing)}")
    assert not bad, f"{path.name}: a plot without a title or axis labels:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------------
# (d) no asserts on wall-clock timings
#
# The heuristic: an assert statement is about timing if a name or attribute in it looks like one: it contains
# time / timing / second / latency / elapsed / duration / perf_counter / monotonic / clock, or ends in _ms,
# _sec or _secs (fwht_ms, step_sec). Showing timings is fine; asserting on them is not, because how two timings
# compare depends on what else the machine is doing.

_TIMING_WORDS = ("time", "timing", "second", "latency", "latencies", "elapsed", "duration", "perf_counter",
                 "monotonic", "clock")


def _is_timing_name(name):
    lower = name.lower()
    return any(word in lower for word in _TIMING_WORDS) or lower.endswith(("_ms", "_sec", "_secs")) or lower == "ms"


def _assert_texts(src):
    """(assert's source, the names and attributes in it) for every assert statement of a code cell."""
    try:
        tree = ast.parse(src)
    except SyntaxError:              # IPython syntax: fall back to lines that start with assert
        return [(line, re.findall(r"[A-Za-z_]\w*", line)) for line in src.splitlines()
                if line.strip().startswith("assert ")]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
            names += [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
            found.append((ast.get_source_segment(src, node) or "assert ...", names))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_assert_on_timings(path):
    bad = []
    for i, cell in _cells(path, "code"):
        for text, names in _assert_texts(_source(cell)):
            timing = sorted({n for n in names if _is_timing_name(n)})
            if timing:
                bad.append(f"cell {i}: {text.splitlines()[0]}  (timing names: {', '.join(timing)})")
    assert not bad, f"{path.name}: asserts on wall-clock timings (show them, do not assert them):\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------------
# the heuristics catch what they are meant to catch


def test_the_heuristics_catch_their_targets():
    assert _shown_sources("print(inspect.getsource(F.linear_backward))") == ["F.linear_backward"]
    assert _shown_sources("F.layernorm_backward??") == ["F.layernorm_backward"]
    assert _PLOT_CALL.search("axes[1].semilogy(x, y)") and _PLOT_CALL.search("ax.bar(x, y)")
    assert not _PLOT_CALL.search("rank_sweep.plot(result, path)")        # a study's own figure
    assert _TITLE.search('ax.set(title="t")') and _XLABEL.search("ax.set_xlabel('x')")
    assert _is_timing_name("latency_ratio") and _is_timing_name("fwht_ms") and _is_timing_name("seconds")
    assert not _is_timing_name("items") and not _is_timing_name("params") and not _is_timing_name("dense_measured")
    found = _assert_texts("assert rows['lora'].latency_ratio['1'] < 1.1")
    assert [names for _, names in found] == [["rows", "latency_ratio"]]
    assert any(p.search("see issue 12") for p in _HISTORY) and any(p.search("issue #3") for p in _HISTORY)
    assert not any(p.search("the first 12 issues of a journal, rank 4, x[1]") for p in _HISTORY)
    squashed = {_squash(line) for _, line in SOLUTION_LINES}
    shown = "    dx = (dy2 @ W.T).reshape(x.shape)                      # fwd: y = x @ W"   # a printed source line
    assert any(line in _squash(shown) for line in squashed)
    assert any(line in _squash("return W+scale*(B @ A).T") for line in squashed)   # whitespace does not matter
