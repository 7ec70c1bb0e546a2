"""The autograder: each graded function of a student's file against minilora's own, in float64.

One item is one function, worth its points if every output is right on every case and nothing otherwise.
"Right" is the gradient check's criterion: ``gradcheck.rel_error(student, reference) <= 1e-7`` (CS231n's
"correct" in float64), the reference being minilora's function on the same inputs.

Items are independent, so that a bug costs exactly the points of the function it is in:
- a backward is called with the cache of minilora's forward, never the student's (the caches are the same
  tuples), and gets its own copy of it, so an in-place edit cannot reach the reference;
- while one function is graded, every other graded function in the student's module is replaced by
  minilora's, so a function that calls another (fastfood_project calls fwht) sees a correct one.

A student function that raises, returns the wrong type or shape, or a file that does not even import, scores
zero for the items concerned, with the reason in the feedback; the grader itself never fails on student code.

The items that are layer pairs (every backward, softmax_cross_entropy, lora_forward) are graded on the cases
of the gradient-check registry (``gradcheck.CASES``), the ones ``minilora gradcheck`` and the tests check: a
case added there is graded too. minilora's side runs on the reference core (``use_fast(False)``).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.machinery
import importlib.util
import itertools
import math
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..core import backend, gradcheck, intrinsic, lora
from ..core import functional as F
from ..core.nn import Linear
from .build import check_name

THRESHOLD = gradcheck.THRESHOLD


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
# comparing one output


@dataclass
class _Outcome:
    """One output of one case: its relative error, or a problem (wrong type, shape, None...)."""

    case: str
    label: str
    error: float = 0.0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.error <= THRESHOLD


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {shape}" if shape is not None else type(value).__name__


def _compare(case: str, label: str, got, want) -> _Outcome:
    """got (the student's) against want (minilora's): an array, a float, or None."""
    if want is None:
        return _Outcome(case, label, problem=None if got is None else f"should be None; got {_describe(got)}")
    if got is None:
        return _Outcome(case, label, problem=f"is None; expected an array of shape {numpy.shape(want)}")
    try:
        got = numpy.asarray(backend.to_numpy(got), dtype=numpy.float64)
    except (TypeError, ValueError):
        return _Outcome(case, label, problem=f"is a {_describe(got)}; expected numbers")
    want = numpy.asarray(want, dtype=numpy.float64)
    if got.shape != want.shape:
        return _Outcome(case, label, problem=f"has shape {got.shape}; expected {want.shape}")
    if not numpy.isfinite(got).all():
        return _Outcome(case, label, problem="contains NaN or inf")
    return _Outcome(case, label, error=gradcheck.rel_error(got, want))


def _compare_all(case: str, labels, got, want) -> list:
    """Compare a tuple of outputs (dx, dW, db, ...) label by label."""
    if not isinstance(got, (tuple, list)) or len(got) != len(labels):
        shown = f"{type(got).__name__} of length {len(got)}" if isinstance(got, (tuple, list)) else _describe(got)
        return [_Outcome(case, "return value", problem=f"is a {shown}; expected the tuple ({', '.join(labels)})")]
    return [_compare(case, label, g, w) for label, g, w in zip(labels, got, want)]


def _unchanged(case: str, name: str, before, after) -> _Outcome:
    """An input the function must leave alone."""
    same = numpy.array_equal(before, after)
    return _Outcome(case, f"{name} unchanged", problem=None if same else f"the function modified its input {name} "
                                                                        "in place (it must return a new array)")


# ----------------------------------------------------------------------------------------------------
# the cases: each a (name, run) pair, run(student_function) -> list of _Outcome


def _randn(rng, *shape, scale=1.0, shift=0.0):
    return rng.standard_normal(shape) * scale + shift


def _upstream(out):
    """The upstream gradient of a case: random, from a stream other than the inputs' (as the gradient check's)."""
    return _randn(numpy.random.default_rng(1), *numpy.shape(out))


def _backward_cases(pair: str) -> list:
    """A backward item: every registry case of the pair. The student's backward gets dout, a private copy of the
    cache of minilora's forward and the case's flags (lora_backward's weight_grad, bias_grad); each output is
    compared with minilora's backward, None where minilora's is None."""
    labels = tuple(f"d{name}" for name in gradcheck.PAIRS[pair].grads)
    cases = []
    for case in gradcheck.cases_of(pair):
        out, cache = case.forward(**case.draw())
        dout = _upstream(out)
        want = case.backward(dout.copy(), copy.deepcopy(cache))

        def run(fn, case=case, cache=cache, dout=dout, want=want):
            got = fn(dout.copy(), copy.deepcopy(cache), **case.flags)
            return _compare_all(case.name, labels, got if len(labels) > 1 else (got,), want)

        cases.append((case.name, run))
    return cases


def _cross_entropy_cases() -> list:
    """softmax_cross_entropy returns the loss and its gradient: both compared, on every cross-entropy case."""
    cases = []
    for case in gradcheck.cases_of("cross-entropy"):
        inputs = case.draw()
        logits, targets, ignore = inputs["logits"], inputs["targets"], case.options.get("ignore_index")
        want = F.softmax_cross_entropy(logits, targets, ignore)

        def run(fn, name=case.name, logits=logits, targets=targets, ignore=ignore, want=want):
            got = fn(logits.copy(), targets.copy(), ignore)
            return _compare_all(name, ("loss", "dlogits"), got, want)

        cases.append((case.name, run))
    return cases


def _lora_forward_cases() -> list:
    """lora_forward on every LoRA case: y against minilora's, and the student's cache through minilora's
    lora_backward (with the case's flags), which must give minilora's gradients: the assignment fixes the cache."""
    labels = tuple(f"d{name}" for name in gradcheck.PAIRS["lora"].grads)
    cases = []
    for case in gradcheck.cases_of("lora"):
        inputs = case.draw()
        y, cache = case.forward(**inputs)
        dy = _upstream(y)
        want_grads = case.backward(dy, cache)
        args = tuple(inputs[name] for name in gradcheck.PAIRS["lora"].inputs)

        def run(fn, case=case, args=args, y=y, dy=dy, want_grads=want_grads):
            name = case.name
            got = fn(*(None if a is None else a.copy() for a in args), **case.arguments())
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                return [_Outcome(name, "return value", problem=f"is a {_describe(got)}; expected (y, cache)")]
            outcomes = [_compare(name, "y", got[0], y)]
            try:   # the cache must be one that minilora's backward understands
                grads = case.backward(dy, got[1])
            except Exception as exc:  # noqa: BLE001 (any failure on the student's cache is the student's)
                return outcomes + [_Outcome(name, "cache", problem=f"minilora's lora_backward fails on it "
                                                                   f"({type(exc).__name__}: {exc})")]
            for label, g, w in zip(labels, grads, want_grads):
                through = _compare(name, label, g, w)
                if through.problem is not None or not through.ok:
                    why = through.problem or f"is wrong: rel. error {through.error:.1e} > {THRESHOLD:.0e}"
                    return outcomes + [_Outcome(name, "cache", problem=f"gives a {label} that {why}, through "
                                                                       "minilora's lora_backward")]
            return outcomes + [_Outcome(name, "cache")]

        cases.append((case.name, run))
    return cases


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


def _merge_cases(function):
    """Cases for merge (function="merge") or unmerge ("unmerge"): a new array, the input left alone."""
    rng = numpy.random.default_rng(80 if function == "merge" else 90)
    reference = reference_merge if function == "merge" else reference_unmerge
    cases = []
    for n_in, n_out, r, scale in ((5, 4, 2, 2.0), (3, 7, 1, 0.5), (6, 6, 3, 1.0 / 3.0)):
        W, A, B = _randn(rng, n_in, n_out), _randn(rng, r, n_in), _randn(rng, n_out, r)
        if function == "unmerge":
            W = reference_merge(W, A, B, scale)
        name = f"W ({n_in}, {n_out}), r={r}, scale {scale:.3g}"
        want = reference(W, A, B, scale)

        def run(fn, name=name, W=W, A=A, B=B, scale=scale, want=want):
            W_in = W.copy()
            got = fn(W_in, A.copy(), B.copy(), scale)
            label = "W_merged" if function == "unmerge" else "W"
            return [_compare(name, "result", got, want), _unchanged(name, label, W, W_in)]

        cases.append((name, run))
    return cases


# Fastfood sizes: D not a multiple of n (truncation), d not a power of two (padding), m > 1 blocks, d = D.
_FASTFOOD_SIZES = ((10, 3), (37, 5), (16, 8), (5, 5))


def _fwht_cases():
    rng = numpy.random.default_rng(100)
    cases = []
    for shape in ((8,), (3, 16), (2, 2, 4), (1,)):
        x = _randn(rng, *shape)
        want = intrinsic.fwht(x)

        def run(fn, x=x, want=want, name=f"x {shape}"):
            x_in = x.copy()
            return [_compare(name, "H x", fn(x_in), want), _unchanged(name, "x", x, x_in)]

        cases.append((f"x {shape}", run))
    for shape in ((6,), (2, 12)):
        def run(fn, shape=shape, name=f"x {shape} (not a power of two)"):
            try:
                result = fn(numpy.ones(shape))
            except ValueError:
                return [_Outcome(name, "ValueError")]
            except Exception as exc:  # noqa: BLE001 (the wrong exception is feedback, not a crash)
                return [_Outcome(name, "ValueError", problem=f"raised {type(exc).__name__} ({exc}) instead of "
                                                             "ValueError")]
            return [_Outcome(name, "ValueError", problem=f"returned a {_describe(result)}; a length of "
                                                         f"{shape[-1]} should raise ValueError")]

        cases.append((f"x {shape} (not a power of two)", run))
    return cases


def _fastfood_cases(function):
    """Cases for fastfood_project ("project") or fastfood_transpose ("transpose")."""
    rng = numpy.random.default_rng(110 if function == "project" else 120)
    cases = []
    for seed, (D, d) in enumerate(_FASTFOOD_SIZES):
        ff = intrinsic.FastfoodProjection(D, d, seed=seed, dtype="float64")
        v = _randn(rng, d if function == "project" else D)
        want = ff.project(v) if function == "project" else ff.transpose(v)
        name = f"D={D} d={d} (n={ff.n}, m={ff.m})"

        def run(fn, ff=ff, v=v, want=want, name=name):
            v_in = v.copy()
            label = "P theta_d" if function == "project" else "P^T g"
            return [_compare(name, label, fn(ff, v_in), want),
                    _unchanged(name, "theta_d" if function == "project" else "g", v, v_in)]

        cases.append((name, run))
    return cases


def reference_subspace_loss_and_grad(ff, theta0, theta_d, X, y):
    """Least squares in the subspace: loss = 0.5 mean((X (theta0 + P theta_d) - y)^2) and P^T dloss/dtheta."""
    residual = X @ (theta0 + ff.project(theta_d)) - y               # (N,)
    return 0.5 * float(numpy.mean(residual ** 2)), ff.transpose(X.T @ residual / X.shape[0])


def _subspace_cases():
    rng = numpy.random.default_rng(130)
    cases = []
    for seed, ((D, d), N) in enumerate(zip(_FASTFOOD_SIZES, (7, 20, 9, 4))):
        ff = intrinsic.FastfoodProjection(D, d, seed=seed, dtype="float64")
        args = (ff, _randn(rng, D), _randn(rng, d), _randn(rng, N, D), _randn(rng, N))
        want = reference_subspace_loss_and_grad(*args)
        name = f"D={D} d={d} N={N}"

        def run(fn, args=args, want=want, name=name):
            got = fn(args[0], *(a.copy() for a in args[1:]))
            return _compare_all(name, ("loss", "dloss/dtheta_d"), got, want)

        cases.append((name, run))
    return cases


# ----------------------------------------------------------------------------------------------------
# the assignments: items (function, points, cases) and minilora's version of every graded function


@dataclass
class Item:
    """One graded function: its name in the student's file, its points, and how to build its cases."""

    function: str
    points: int
    cases: Callable     # () -> list of (case name, run(student_function) -> list of _Outcome)


ITEMS = {
    "layers": [
        Item("linear_backward", 2, lambda: _backward_cases("linear")),
        Item("layernorm_backward", 3, lambda: _backward_cases("layernorm")),
        Item("gelu_backward", 2, lambda: _backward_cases("gelu")),
        Item("attention_backward", 5, lambda: _backward_cases("attention")),
        Item("softmax_cross_entropy", 3, _cross_entropy_cases),
    ],
    "lora_layer": [
        Item("lora_forward", 2, _lora_forward_cases),
        Item("lora_backward", 4, lambda: _backward_cases("lora")),
        Item("merge", 2, lambda: _merge_cases("merge")),
        Item("unmerge", 2, lambda: _merge_cases("unmerge")),
    ],
    "subspace": [
        Item("fwht", 2, _fwht_cases),
        Item("fastfood_project", 3, lambda: _fastfood_cases("project")),
        Item("fastfood_transpose", 3, lambda: _fastfood_cases("transpose")),
        Item("subspace_loss_and_grad", 2, _subspace_cases),
    ],
}

REFERENCES = {
    "layers": {"linear_backward": F.linear_backward, "layernorm_backward": F.layernorm_backward,
               "gelu_backward": F.gelu_backward, "attention_backward": F.attention_backward,
               "softmax_cross_entropy": F.softmax_cross_entropy},
    "lora_layer": {"lora_forward": lora.lora_forward, "lora_backward": lora.lora_backward,
                   "merge": reference_merge, "unmerge": reference_unmerge},
    "subspace": {"fwht": intrinsic.fwht,
                 "fastfood_project": lambda ff, theta_d: intrinsic.FastfoodProjection.project(ff, theta_d),
                 "fastfood_transpose": lambda ff, g: intrinsic.FastfoodProjection.transpose(ff, g),
                 "subspace_loss_and_grad": reference_subspace_loss_and_grad},
}


# ----------------------------------------------------------------------------------------------------
# running the student's code


def _exception_text(exc: BaseException, path: Path) -> str:
    """'NotImplementedError: ... (line 42)': the exception, and the last line of the student's file it passed."""
    message = str(exc).strip()
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if Path(frame.filename).resolve() == path]
    return text + (f" (line {lines[-1]})" if lines else "")


_loaded = itertools.count()


def _load_student_module(path: Path):
    """Execute the student's file as a fresh module (never cached, so edits are always seen)."""
    name = f"_minilora_student_{path.stem}_{next(_loaded)}"
    loader = importlib.machinery.SourceFileLoader(name, str(path))    # any file name, not only *.py
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # dataclasses in the file look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


@contextlib.contextmanager
def _references_in(module, names: dict):
    """Replace these module globals by minilora's functions for the block, then put the student's back."""
    saved = {name: module.__dict__[name] for name in names if name in module.__dict__}
    module.__dict__.update(names)
    try:
        yield
    finally:
        for name in names:
            module.__dict__.pop(name, None)
        module.__dict__.update(saved)


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
            wrong.append(f"{label} wrong: rel. error {worst.error:.1e} > {THRESHOLD:.0e} (worst case {worst.case})")
        else:
            right.append(label)
    if not wrong:
        worst_error = max(o.error for o in outcomes)
        return True, f"correct on {n_cases} cases: {', '.join(right)} (worst rel. error {worst_error:.1e})"
    return False, "; ".join(wrong) + (f"; correct: {', '.join(right)}" if right else "")


def _grade_item(module, item: Item, references: dict, path: Path) -> ItemResult:
    function = getattr(module, item.function, None) if module is not None else None
    if not callable(function):
        return ItemResult(item.function, item.points, 0, f"no function named {item.function} in {path.name}")
    others = {name: ref for name, ref in references.items() if name != item.function}
    outcomes = []
    cases = item.cases()
    with _references_in(module, others):
        for name, run in cases:
            try:
                with numpy.errstate(all="ignore"):
                    outcomes += run(function)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 (student code never crashes the grader)
                where = "" if isinstance(exc, NotImplementedError) else f" (case {name})"
                return ItemResult(item.function, item.points, 0, f"raised {_exception_text(exc, path)}{where}")
    passed, feedback = _feedback(outcomes, len(cases))
    return ItemResult(item.function, item.points, item.points if passed else 0, feedback)


def grade(assignment: str, path) -> GradeReport:
    """Grade a student's file for an assignment ("layers", "lora_layer" or "subspace").

    path: the student's .py file. Returns a GradeReport (``format_report`` prints it). Raises only for the
    grader's own inputs: ValueError for an unknown assignment, FileNotFoundError for a missing file.
    """
    check_name(assignment)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no student file at {path}")
    path = path.resolve()
    report = GradeReport(assignment, str(path))
    with backend.backend("numpy"), backend.use_fast(False):
        try:
            with numpy.errstate(all="ignore"):
                module = _load_student_module(path)
            load_error = None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (nor does a file that fails to import)
            module, load_error = None, f"the file does not import: {_exception_text(exc, path)}"
        for item in ITEMS[assignment]:
            if load_error is not None:
                report.items.append(ItemResult(item.function, item.points, 0, load_error))
            else:
                report.items.append(_grade_item(module, item, REFERENCES[assignment], path))
    return report
