"""The autograder: each graded function of a student's file against minilora's reference, in float64.

One item is one function, worth its points if every output is right on every case and nothing otherwise.
"Right" is the gradient check's criterion: ``gradcheck.rel_error(student, reference) <= 1e-7`` (CS231n's
"correct" in float64), with float64 outputs of the expected shapes.

Student code never runs in the grader's process. For each item a child process (sandbox.py, child.py) loads
the student's file afresh and calls the student's functions on inputs the grader drew; it sends back only what
they returned. The grader computed the references itself, on minilora's reference core, and compares. A
child that loops, exits, crashes, runs out of memory or raises anything scores 0 for its item with the reason;
the other items are still graded, and a report is always produced.

What is graded, as CS231n grades a layer:
- a layer pair: the student's forward runs, then the student's backward on the cache that forward returned
  (so any cache layout works); the forward's output and the gradients are compared with the reference, and
  the gradients with centred differences of the student's own forward. Where the forward is an item of its
  own (lora_forward), a wrong forward costs only that item: the backward is then graded on values alone.
- a function: its outputs, and that it left its inputs unchanged where it must.
- a function that calls another graded function (fastfood_project calls fwht) is graded with a stand-in for
  the other one (a dense matrix product), so a bug costs exactly the points of the function it is in.

Implement, don't import: a file that imports minilora (outside an ``if __name__ == "__main__":`` block) scores
0 on every item before it runs; in the child, importing minilora or reading its files is refused, and a graded
function must be defined in the student's file.

The layer pairs are graded on the cases of the gradient-check registry (``gradcheck.CASES``), the ones
``minilora gradcheck`` and the tests check: a case added there is graded too.
"""
from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..core import backend, gradcheck, intrinsic, lora
from ..core import functional as F
from ..core.nn import Linear
from .build import check_name
from .sandbox import ChildRun, Limits, run_child

THRESHOLD = gradcheck.THRESHOLD
SUBMISSION_SUFFIXES = (".py", ".ipynb")


# ----------------------------------------------------------------------------------------------------
# the report


@dataclass
class ItemResult:
    """One graded function: its points, what it earned and why."""

    name: str
    points: int
    earned: int
    feedback: str

    @property
    def passed(self) -> bool:
        return self.earned == self.points


@dataclass
class GradeReport:
    """The grade of one student file: one ItemResult per graded function, in the assignment's order."""

    assignment: str
    path: str
    items: list = field(default_factory=list)

    @property
    def earned(self) -> int:
        return sum(item.earned for item in self.items)

    @property
    def possible(self) -> int:
        return sum(item.points for item in self.items)

    def item(self, name: str) -> ItemResult:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(f"no item {name!r} in the {self.assignment} report; items: {[i.name for i in self.items]}")

    def to_dict(self) -> dict:
        return {"assignment": self.assignment, "path": self.path, "earned": self.earned, "possible": self.possible,
                "items": [{"name": i.name, "points": i.points, "earned": i.earned, "passed": i.passed,
                           "feedback": i.feedback} for i in self.items]}

    def to_gradescope(self, visibility: str = "visible") -> dict:
        """Gradescope's autograder results.json: the score and one test per item."""
        return {"score": self.earned, "max_score": self.possible, "visibility": visibility,
                "output": f"assignment {self.assignment}: {self.earned}/{self.possible} points",
                "tests": [{"name": i.name, "number": str(k + 1), "score": i.earned, "max_score": i.points,
                           "status": "passed" if i.passed else "failed", "output": i.feedback,
                           "visibility": visibility} for k, i in enumerate(self.items)]}


def format_report(report: GradeReport) -> str:
    """A plain-text table: item, points earned/possible, pass/FAIL, feedback; then the total."""
    rows = [("item", "points", "result", "feedback")]
    rows += [(i.name, f"{i.earned}/{i.points}", "pass" if i.passed else "FAIL", i.feedback) for i in report.items]
    rows.append(("total", f"{report.earned}/{report.possible}", "", ""))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]

    def line(row):
        return "  ".join([cell.ljust(w) for cell, w in zip(row[:3], widths)] + [row[3]]).rstrip()

    lines = [f"assignment {report.assignment}: {report.path}", "", line(rows[0]),
             "  ".join("-" * w for w in widths) + "  --------"]
    lines += [line(row) for row in rows[1:-1]]
    lines += ["  ".join("-" * w for w in widths), line(rows[-1])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# what the child sent back, and comparing one output with its reference


class _Foreign:
    """A returned value that is neither an array, a number, None nor a tuple: only its type is known."""

    def __init__(self, type_name):
        self.type_name = type_name


def _decode(encoded, arrays, depth=0):
    """The child's encoding of a returned value (child._Outputs.encode) -> array, float, None, tuple or _Foreign."""
    if not isinstance(encoded, dict):
        return _Foreign("unreadable value")
    if "none" in encoded:
        return None
    if "array" in encoded:
        value = arrays.get(encoded["array"])
        return value if isinstance(value, numpy.ndarray) else _Foreign("unreadable array")
    if "scalar" in encoded:         # a NumPy scalar: keep its dtype
        try:
            return numpy.asarray(float(encoded["scalar"]), dtype=numpy.dtype(encoded.get("dtype", "float64")))
        except (TypeError, ValueError):
            return _Foreign(f"numpy {encoded.get('dtype')} scalar")
    if "number" in encoded:
        try:
            return float(encoded["number"]) if encoded.get("type") == "float" else _Foreign(encoded.get("type", "int"))
        except (TypeError, ValueError):
            return _Foreign("number")
    for kind in ("tuple", "list"):
        if kind in encoded and isinstance(encoded[kind], list) and depth == 0:
            items = [_decode(e, arrays, depth + 1) for e in encoded[kind]]
            return tuple(items) if kind == "tuple" else items
    return _Foreign(str(encoded.get("other", "value")))


@dataclass
class _Outcome:
    """One output of one case: its relative error, or a problem (wrong type, dtype, shape, None...)."""

    case: str
    label: str
    error: float = 0.0
    problem: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None and self.error <= THRESHOLD


def _describe(value) -> str:
    if isinstance(value, _Foreign):
        return value.type_name
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {shape}" if shape is not None else type(value).__name__


def _first_difference(got, want) -> str:
    """Where got and want first differ by more than the tolerance (rel_error's scale times THRESHOLD)."""
    scale = max(1e-8, float(numpy.max(numpy.abs(got) + numpy.abs(want)))) if want.size else 1.0
    bad = numpy.argwhere(numpy.abs(got - want) > THRESHOLD * scale)
    if not len(bad):
        return ""
    index = tuple(int(i) for i in bad[0])
    return f"; first differing index {index}: got {float(got[index]):.6g}, expected {float(want[index]):.6g}"


def _compare(case: str, label: str, got, want) -> _Outcome:
    """got (the student's, decoded) against want (the reference): a float64 array, a float, or None."""
    if want is None:
        return _Outcome(case, label, problem=None if got is None else f"should be None; got {_describe(got)}")
    want = numpy.asarray(backend.to_numpy(want), dtype=numpy.float64)
    expected = f"a float64 array of shape {want.shape}" if want.ndim else "a float"
    if got is None:
        return _Outcome(case, label, problem=f"is None; expected {expected}")
    if isinstance(got, float) and want.ndim == 0:
        got = numpy.asarray(got)
    if not isinstance(got, numpy.ndarray):
        return _Outcome(case, label, problem=f"is a {_describe(got)}; expected {expected}")
    if got.dtype != numpy.float64:
        return _Outcome(case, label, problem=f"has dtype {got.dtype}; expected float64 (the inputs are float64)")
    if got.shape != want.shape:
        return _Outcome(case, label, problem=f"has shape {got.shape}; expected {want.shape}")
    if not numpy.isfinite(got).all():
        return _Outcome(case, label, problem="contains NaN or inf")
    error = gradcheck.rel_error(got, want)
    return _Outcome(case, label, error=error, detail=_first_difference(got, want) if error > THRESHOLD else "")


def _compare_all(case: str, labels, got, want) -> list:
    """Compare a tuple of outputs (dx, dW, db, ...) label by label."""
    if not isinstance(got, (tuple, list)) or len(got) != len(labels):
        shown = f"{type(got).__name__} of length {len(got)}" if isinstance(got, (tuple, list)) else _describe(got)
        return [_Outcome(case, "return value", problem=f"is a {shown}; expected the tuple ({', '.join(labels)})")]
    return [_compare(case, label, g, w) for label, g, w in zip(labels, got, want)]


def _against_differences(case: str, forward: str, got, numeric) -> _Outcome:
    """A gradient against centred differences of the student's own forward (computed in the child); case names
    the case and the gradient."""
    label = f"gradients against centred differences of your {forward}"
    if not isinstance(numeric, numpy.ndarray):
        return _Outcome(case, label, problem="could not be checked: no centred differences came back")
    return _compare(case, label, got, numeric.astype(numpy.float64))


def _unchanged(case: str, name: str, before, after) -> _Outcome:
    """An input the function must leave alone (after: its value when the function returned)."""
    same = isinstance(after, numpy.ndarray) and after.shape == before.shape and numpy.array_equal(before, after)
    return _Outcome(case, f"{name} unchanged", problem=None if same else f"the function modified its input {name} "
                                                                        "in place (it must return a new array)")


# ----------------------------------------------------------------------------------------------------
# the cases: what the child is asked to do, and how the grader checks what comes back


class _Inputs:
    """The arrays sent to the child (one .npz) and the JSON encoding of every argument."""

    def __init__(self):
        self.arrays = {}

    def put(self, array) -> dict:
        key = f"i{len(self.arrays)}"
        self.arrays[key] = numpy.asarray(backend.to_numpy(array))
        return {"array": key}

    def arg(self, value):
        if value is None:
            return {"none": True}
        if isinstance(value, (int, float, str, bool)):
            return value
        return self.put(value)

    def fastfood(self, ff, dense: bool = False) -> dict:
        """A FastfoodProjection as the child rebuilds it: its sizes and random parts (and, for a stand-in, the
        dense matrix P, column j = P e_j)."""
        prefix = f"ff{len(self.arrays)}"
        fields = {"D": ff.D, "d": ff.d, "n": ff.n, "m": ff.m, "B": ff.B, "G": ff.G, "scale": ff.scale,
                  "perm": ff.perm, "inverse_perm": ff.inverse_perm}
        if dense:
            fields["P"] = numpy.stack([backend.to_numpy(ff.project(e)) for e in numpy.eye(ff.d)], axis=1)
        for name, value in fields.items():
            self.arrays[f"{prefix}.{name}"] = numpy.asarray(backend.to_numpy(value))
        return {"fastfood": prefix}


@dataclass
class _Case:
    """One case of an item: ``spec`` for the child, and ``check(result, arrays) -> [_Outcome]`` for the grader."""

    name: str
    spec: dict
    check: Callable


def _upstream(out):
    """The upstream gradient of a case: random, from a stream other than the inputs' (as the gradient check's)."""
    return numpy.random.default_rng(1).standard_normal(numpy.shape(out))


def _pair_cases(pair: str, forward: str, backward: str, grade_forward_output: bool):
    """A backward item: every registry case of the pair, run as the student's forward then the student's backward
    on its own cache. Checked: the forward's output (when grade_forward_output: the forward is no item of its own),
    every gradient against the reference (None where the reference's is None), and every gradient the case
    checks against centred differences of the student's forward, when that forward's output is right."""
    inputs_of = gradcheck.PAIRS[pair].inputs
    grads_of = gradcheck.PAIRS[pair].grads
    labels = tuple(f"d{name}" for name in grads_of)

    def cases(inputs: _Inputs) -> list:
        built = []
        for case in gradcheck.cases_of(pair):
            drawn = case.draw()
            out, cache = case.forward(**drawn)
            dout = _upstream(out)
            want = case.backward(backend.asarray(dout), cache)
            kwargs = {**{k: inputs.arg(v) for k, v in case.options.items()},
                      **({} if case.mask_seed is None else {"rng": {"rng": case.mask_seed}})}
            spec = {"kind": "pair", "name": case.name, "forward": forward, "backward": backward,
                    "args": [inputs.arg(drawn[name]) for name in inputs_of], "kwargs": kwargs,
                    "dout": inputs.put(dout)["array"], "flags": dict(case.flags),
                    "wrt": [inputs_of.index(name) for name in case.wrt]}

            def check(result, arrays, case=case, out=out, want=want, wrt=spec["wrt"]):
                if "out" not in result:
                    got = _decode(result.get("returned"), arrays)
                    return [_Outcome(case.name, "forward", problem=f"{forward} returned a {_describe(got)}; "
                                                                  "expected (out, cache)")]
                forward_outcome = _compare(case.name, f"{forward} output", _decode(result["out"], arrays), out)
                grads = _decode(result.get("returned"), arrays)
                outcomes = _compare_all(case.name, labels, grads if len(labels) > 1 else (grads,), want)
                if grade_forward_output:
                    outcomes.insert(0, forward_outcome)
                if forward_outcome.ok and all(o.problem is None for o in outcomes):
                    got = dict(zip(grads_of, grads if len(labels) > 1 else (grads,)))
                    for index in wrt:
                        name = inputs_of[index]
                        numeric = _decode((result.get("numerical") or {}).get(str(index)), arrays)
                        outcomes.append(_against_differences(f"{case.name}, d{name}", forward, got[name], numeric))
                return outcomes

            built.append(_Case(case.name, spec, check))
        return built

    return cases


def _cross_entropy_cases(inputs: _Inputs) -> list:
    """softmax_cross_entropy returns the loss and its gradient: both against the reference on every cross-entropy
    case, and the gradient against centred differences of the student's own loss."""
    built = []
    for case in gradcheck.cases_of("cross-entropy"):
        drawn = case.draw()
        logits, targets, ignore = drawn["logits"], drawn["targets"], case.options.get("ignore_index")
        want = F.softmax_cross_entropy(logits, targets, ignore)
        spec = {"kind": "loss", "name": case.name, "function": "softmax_cross_entropy",
                "args": [inputs.put(logits), inputs.put(targets), inputs.arg(ignore)]}

        def check(result, arrays, name=case.name, want=want):
            got = _decode(result.get("returned"), arrays)
            outcomes = _compare_all(name, ("loss", "dlogits"), got, want)
            if all(o.problem is None for o in outcomes):
                numeric = _decode((result.get("numerical") or [None])[0], arrays)
                outcomes.append(_against_differences(f"{name}, dlogits", "softmax_cross_entropy", got[1], numeric))
            return outcomes

        built.append(_Case(case.name, spec, check))
    return built


def _lora_forward_cases(inputs: _Inputs) -> list:
    """lora_forward on every LoRA case: y against the reference (the cache is the student's own business)."""
    built = []
    for case in gradcheck.cases_of("lora"):
        drawn = case.draw()
        y, _ = case.forward(**drawn)
        kwargs = {**{k: inputs.arg(v) for k, v in case.options.items()},
                  **({} if case.mask_seed is None else {"rng": {"rng": case.mask_seed}})}
        spec = {"kind": "call", "name": case.name, "function": "lora_forward",
                "args": [inputs.arg(drawn[name]) for name in gradcheck.PAIRS["lora"].inputs], "kwargs": kwargs}

        def check(result, arrays, name=case.name, y=y):
            got = _decode(result.get("returned"), arrays)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                return [_Outcome(name, "return value", problem=f"is a {_describe(got)}; expected (y, cache)")]
            return [_compare(name, "y", got[0], y)]

        built.append(_Case(case.name, spec, check))
    return built


def reference_merge(W, A, B, scale):
    """minilora's merge: W plus the update of a LoRALinear holding A, B and this scale (``delta_weight``)."""
    r = A.shape[0]
    layer = lora.LoRALinear(Linear(W.shape[0], W.shape[1], bias=False, dtype="float64"), r=r, alpha=scale * r)
    layer.lora_A.data[...] = A
    layer.lora_B.data[...] = B
    layer.scale = scale                     # exactly, not alpha / r rounded
    return W + layer.delta_weight()


def reference_unmerge(W_merged, A, B, scale):
    """minilora's unmerge, as the inverse of reference_merge: W_merged - s (B A)^T."""
    return W_merged - (reference_merge(numpy.zeros_like(W_merged), A, B, scale))


def _call_case(inputs, name, function, args, want, labels, unchanged=(), expect=None):
    """A plain call: the outputs (one label: a lone value; several: a tuple) against ``want``, and the
    arguments at the indices in ``unchanged`` left as they were. expect="ValueError": the call must raise it."""
    spec = {"kind": "call", "name": name, "function": function, "args": [inputs.arg(a) if not isinstance(a, dict)
                                                                         else a for a in args]}
    if expect is not None:
        spec["expect_exception"] = True

    def check(result, arrays):
        if expect is not None:
            if result.get("exception") == expect:
                return [_Outcome(name, expect)]
            if "raised" in result:
                return [_Outcome(name, expect, problem=f"raised {result['raised']} instead of {expect}")]
            return [_Outcome(name, expect, problem=f"returned a {_describe(_decode(result.get('returned'), arrays))}"
                                                   f"; this input should raise {expect}")]
        got = _decode(result.get("returned"), arrays)
        outcomes = _compare_all(name, labels, got, want) if len(labels) > 1 else [_compare(name, labels[0], got, want)]
        after = result.get("args_after") or []
        for index, label in unchanged:
            value = _decode(after[index], arrays) if index < len(after) and after[index] is not None else None
            outcomes.append(_unchanged(name, label, numpy.asarray(args[index]), value))
        return outcomes

    return _Case(name, spec, check)


def _merge_cases(function):
    """Cases for merge (function="merge") or unmerge ("unmerge"): a new array, the input left alone."""
    def cases(inputs: _Inputs) -> list:
        rng = numpy.random.default_rng(80 if function == "merge" else 90)
        reference = reference_merge if function == "merge" else reference_unmerge
        built = []
        for n_in, n_out, r, scale in ((5, 4, 2, 2.0), (3, 7, 1, 0.5), (6, 6, 3, 1.0 / 3.0)):
            W, A, B = rng.standard_normal((n_in, n_out)), rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
            if function == "unmerge":
                W = reference_merge(W, A, B, scale)
            name = f"W ({n_in}, {n_out}), r={r}, scale {scale:.3g}"
            label = "W_merged" if function == "unmerge" else "W"
            built.append(_call_case(inputs, name, function, (W, A, B, scale), reference(W, A, B, scale), ("result",),
                                    unchanged=((0, label),)))
        return built
    return cases


# Fastfood sizes: D not a multiple of n (truncation), d not a power of two (padding), m > 1 blocks, d = D.
_FASTFOOD_SIZES = ((10, 3), (37, 5), (16, 8), (5, 5))


def _fwht_cases(inputs: _Inputs) -> list:
    rng = numpy.random.default_rng(100)
    built = []
    for shape in ((8,), (3, 16), (2, 2, 4), (1,)):
        x = rng.standard_normal(shape)
        built.append(_call_case(inputs, f"x {shape}", "fwht", (x,), intrinsic.fwht(x), ("H x",), unchanged=((0, "x"),)))
    for shape in ((6,), (2, 12)):
        built.append(_call_case(inputs, f"x {shape} (not a power of two)", "fwht", (numpy.ones(shape),), None, ("H x",),
                                expect="ValueError"))
    return built


def _fastfood_cases(function):
    """Cases for fastfood_project ("project") or fastfood_transpose ("transpose")."""
    def cases(inputs: _Inputs) -> list:
        rng = numpy.random.default_rng(110 if function == "project" else 120)
        built = []
        for seed, (D, d) in enumerate(_FASTFOOD_SIZES):
            ff = intrinsic.FastfoodProjection(D, d, seed=seed, dtype="float64")
            v = rng.standard_normal(d if function == "project" else D)
            want = ff.project(v) if function == "project" else ff.transpose(v)
            label = "P theta_d" if function == "project" else "P^T g"
            built.append(_call_case(inputs, f"D={D} d={d} (n={ff.n}, m={ff.m})", f"fastfood_{function}",
                                    (inputs.fastfood(ff), v), want, (label,),
                                    unchanged=((1, "theta_d" if function == "project" else "g"),)))
        return built
    return cases


def reference_subspace_loss_and_grad(ff, theta0, theta_d, X, y):
    """Least squares in the subspace: loss = 0.5 mean((X (theta0 + P theta_d) - y)^2) and P^T dloss/dtheta."""
    residual = X @ (theta0 + ff.project(theta_d)) - y               # (N,)
    return 0.5 * float(numpy.mean(residual ** 2)), ff.transpose(X.T @ residual / X.shape[0])


def _subspace_cases(inputs: _Inputs) -> list:
    rng = numpy.random.default_rng(130)
    built = []
    for seed, ((D, d), N) in enumerate(zip(_FASTFOOD_SIZES, (7, 20, 9, 4))):
        ff = intrinsic.FastfoodProjection(D, d, seed=seed, dtype="float64")
        args = (rng.standard_normal(D), rng.standard_normal(d), rng.standard_normal((N, D)), rng.standard_normal(N))
        want = reference_subspace_loss_and_grad(ff, *args)
        built.append(_call_case(inputs, f"D={D} d={d} N={N}", "subspace_loss_and_grad",
                                (inputs.fastfood(ff, dense=True), *args), want, ("loss", "dloss/dtheta_d")))
    return built


# ----------------------------------------------------------------------------------------------------
# the assignments: items (function, points, cases)


@dataclass
class Item:
    """One graded function: its name in the student's file, its points, how to build its cases, the student's
    functions it runs (each must be defined in the student's file), and the functions it may call that are
    replaced by stand-ins (a plain dense version) while it is graded."""

    function: str
    points: int
    cases: Callable                 # (_Inputs) -> list of _Case
    runs: tuple = ()                # the student's other functions the cases call (a pair's forward)
    stand_ins: dict = field(default_factory=dict)

    def build(self, inputs) -> list:
        """The cases, their references computed on minilora's reference core (NumPy, float64)."""
        with backend.backend("numpy"), backend.use_fast(False), numpy.errstate(all="ignore"):
            return self.cases(inputs)

    def case_names(self) -> list:
        return [case.name for case in self.build(_Inputs())]


ITEMS = {
    "layers": [
        Item("linear_backward", 2, _pair_cases("linear", "linear_forward", "linear_backward", True),
             runs=("linear_forward",)),
        Item("layernorm_backward", 3, _pair_cases("layernorm", "layernorm_forward", "layernorm_backward", True),
             runs=("layernorm_forward",)),
        Item("gelu_backward", 2, _pair_cases("gelu", "gelu_forward", "gelu_backward", True), runs=("gelu_forward",)),
        Item("attention_backward", 5, _pair_cases("attention", "attention_forward", "attention_backward", True),
             runs=("attention_forward",)),
        Item("softmax_cross_entropy", 3, _cross_entropy_cases),
    ],
    "lora_layer": [
        Item("lora_forward", 2, _lora_forward_cases),
        Item("lora_backward", 4, _pair_cases("lora", "lora_forward", "lora_backward", False), runs=("lora_forward",)),
        Item("merge", 2, _merge_cases("merge")),
        Item("unmerge", 2, _merge_cases("unmerge"), stand_ins={"merge": "merge"}),
    ],
    "subspace": [
        Item("fwht", 2, _fwht_cases),
        Item("fastfood_project", 3, _fastfood_cases("project"), stand_ins={"fwht": "hadamard"}),
        Item("fastfood_transpose", 3, _fastfood_cases("transpose"), stand_ins={"fwht": "hadamard"}),
        Item("subspace_loss_and_grad", 2, _subspace_cases,
             stand_ins={"fastfood_project": "dense-project", "fastfood_transpose": "dense-transpose"}),
    ],
}


# ----------------------------------------------------------------------------------------------------
# the submission: a .py file or a notebook; checked before anything runs


@dataclass
class Submission:
    """The code to grade: its Python source, the file name it runs under, and for a notebook where each line
    of that source came from ({line: (cell, line in cell)})."""

    path: Path
    source: str
    file_name: str
    cells: dict = field(default_factory=dict)

    def where(self, text: str) -> str:
        """Feedback with '(line N)' turned into '(cell C, line L)' for a notebook."""
        if not self.cells:
            return text
        return re.sub(r"\(line (\d+)\)", lambda m: "(cell {}, line {})".format(*self.cells.get(int(m.group(1)),
                                                                                          ("?", m.group(1)))), text)


def read_submission(path) -> Submission:
    """A .py file as it is; a notebook's code cells in order (IPython magics and shell lines commented out)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no student file at {path}")
    raw = path.read_bytes()
    if path.suffix != ".ipynb":
        return Submission(path, raw.decode("utf-8", "replace"), path.name if path.suffix == ".py" else f"{path.stem}.py")
    try:
        notebook = json.loads(raw.decode("utf-8"))
        cells = [c for c in notebook["cells"] if c.get("cell_type") == "code"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable notebook ({type(exc).__name__}: {exc})") from None
    lines, where = [], {}
    for number, cell in enumerate(cells, start=1):
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        for k, line in enumerate(source.splitlines(), start=1):
            magic = line.lstrip().startswith(("%", "!"))
            lines.append(("# " + line) if magic else line)
            where[len(lines)] = (number, k)
        lines.append("")
    return Submission(path, "\n".join(lines) + "\n", f"{path.stem}.py", where)


def _in_main_guard(node) -> bool:
    """Whether a top-level statement is ``if __name__ == "__main__":`` (its body never runs when graded)."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def static_problem(submission: Submission) -> str | None:
    """Why the file cannot be graded at all, before it runs: it does not compile, or it imports minilora."""
    try:
        tree = ast.parse(submission.source, filename=submission.file_name)
    except (SyntaxError, ValueError) as exc:
        return submission.where(f"the file does not compile: {getattr(exc, 'msg', exc)} (line {getattr(exc, 'lineno', '?')})")
    for statement in tree.body:
        if _in_main_guard(statement):
            continue
        for node in ast.walk(statement):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                modules = [str(node.args[0].value)] if isinstance(node.args[0].value, str) else []
                named = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                modules = modules if named in ("__import__", "import_module") else []
            for module in modules:
                if module == "minilora" or module.startswith("minilora."):
                    return submission.where(f"the file imports {module} (line {node.lineno}): a graded function "
                                            "must be your own code, not minilora's")
    return None


# ----------------------------------------------------------------------------------------------------
# grading


def _feedback(outcomes: list, n_cases: int) -> tuple[bool, str]:
    """Summarise the outcomes by output: which are wrong, by how much, on which case."""
    labels = list(dict.fromkeys(o.label for o in outcomes))
    wrong, right = [], []
    for label in labels:
        mine = [o for o in outcomes if o.label == label]
        problems = [o for o in mine if o.problem is not None]
        worst = max(mine, key=lambda o: (o.error if math.isfinite(o.error) else math.inf))
        if problems:
            wrong.append(f"{label} {problems[0].problem} (case {problems[0].case})")
        elif not worst.ok:
            wrong.append(f"{label} wrong: rel. error {worst.error:.1e} > {THRESHOLD:.0e} (worst case {worst.case}"
                         f"{worst.detail})")
        else:
            right.append(label)
    if not wrong:
        worst_error = max((o.error for o in outcomes), default=0.0)
        return True, f"correct on {n_cases} cases: {', '.join(right)} (worst rel. error {worst_error:.1e})"
    return False, "; ".join(wrong) + (f"; correct: {', '.join(right)}" if right else "")


def _grade_item(submission: Submission, item: Item, limits: Limits) -> tuple[ItemResult, ChildRun]:
    inputs = _Inputs()
    cases = item.build(inputs)
    request = {"functions": [item.function, *item.runs], "stand_ins": item.stand_ins,
               "cases": [case.spec for case in cases]}
    run = run_child(submission.source, submission.file_name, request, inputs.arrays, limits)

    def zero(why):
        return ItemResult(item.function, item.points, 0, submission.where(why)), run

    if run.failure is not None:
        return zero(run.failure)
    report = run.report
    if report.get("load_error"):
        return zero(f"the file does not import: {report['load_error']}")
    not_own = report.get("not_own") or {}
    if not_own:
        return zero("; ".join(str(v) for v in not_own.values()))
    results = report.get("cases", [])
    outcomes = []
    for case, result in zip(cases, results):
        if not isinstance(result, dict):
            return zero("the child's report is malformed")
        if "raised" in result and not case.spec.get("expect_exception"):
            where = "" if result.get("exception") == "NotImplementedError" else f" (case {case.name})"
            return zero(f"raised {result['raised']}{where}")
        outcomes += case.check(result, run.outputs)
    if len(results) != len(cases):
        return zero(f"the child reported {len(results)} of {len(cases)} cases")
    passed, feedback = _feedback(outcomes, len(cases))
    return ItemResult(item.function, item.points, item.points if passed else 0, feedback), run


def find_submission(assignment: str, path) -> Path:
    """The file to grade: ``path`` itself, or in a folder (Gradescope's submission folder) ASSIGNMENT.py or
    ASSIGNMENT.ipynb, else its only .py or .ipynb file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no student file at {path}")
    for suffix in SUBMISSION_SUFFIXES:
        if (path / f"{assignment}{suffix}").is_file():
            return path / f"{assignment}{suffix}"
    candidates = sorted(p for p in path.rglob("*") if p.suffix in SUBMISSION_SUFFIXES and p.is_file()
                        and ".ipynb_checkpoints" not in p.parts)
    if len(candidates) != 1:
        raise FileNotFoundError(f"expected {assignment}.py or {assignment}.ipynb in {path}; found "
                                f"{[str(p.relative_to(path)) for p in candidates] or 'no .py or .ipynb file'}")
    return candidates[0]


def grade(assignment: str, path, timeout: float = 60.0, memory_mb: int = 1024) -> GradeReport:
    """Grade a student's file for an assignment ("layers", "lora_layer" or "subspace").

    path: the student's .py or .ipynb file (or a folder holding it, see find_submission). timeout: wall-clock
    seconds each item's child may run; memory_mb: its address space. Returns a GradeReport (``format_report``
    prints it). Raises only for the grader's own inputs: ValueError for an unknown assignment or bad limits,
    FileNotFoundError for a missing file.
    """
    check_name(assignment)
    limits = Limits(timeout=timeout, memory_mb=memory_mb)
    submission = read_submission(find_submission(assignment, path))
    report = GradeReport(assignment, str(submission.path.resolve()))
    problem = static_problem(submission)
    failed_loading = None
    for item in ITEMS[assignment]:
        if problem is not None or failed_loading is not None:
            report.items.append(ItemResult(item.function, item.points, 0, problem or failed_loading))
            continue
        result, run = _grade_item(submission, item, limits)
        report.items.append(result)
        if run.failure is not None and not run.loaded:
            failed_loading = result.feedback        # the file never finished loading: the same for every item
    return report
