"""The assignment commands: ``build`` a student version, ``grade`` a student's file, ``list`` the assignments.

``main(argv)`` is what ``python -m minilora.course`` runs; the ``minilora`` command can hand its
``assignment`` arguments to it, or attach the subcommands to its own parser with ``add_subcommands``.
"""
from __future__ import annotations

import argparse
import sys

from .build import ASSIGNMENTS, build_student, check_name
from .grade import ITEMS, format_report, grade


def _build(args) -> int:
    if args.out is None and args.gradescope_zip is None:
        raise ValueError("say where to write: --out DIR (the student version), --gradescope-zip FILE.zip "
                         "(the Gradescope autograder), or both")
    if args.gradescope_zip is not None:
        from .gradescope import build_autograder_zip

        check_name(args.name)
        print(f"wrote {build_autograder_zip(args.name, args.gradescope_zip, args.timeout, args.memory_mb)}")
    if args.out is not None:
        for path in build_student(args.name, args.out, force=args.force):
            print(f"wrote {path}")
    return 0


def _grade(args) -> int:
    from ..io.files import write_json

    try:
        report = grade(args.name, args.file, timeout=args.timeout, memory_mb=args.memory_mb)
    except (FileNotFoundError, ValueError) as exc:
        if not args.gradescope:
            raise
        # Gradescope shows results.json only: a submission it cannot grade still gets a result that says why
        write_json(args.gradescope, {"score": 0, "output": f"not graded: {exc}", "tests": []})
        print(f"not graded: {exc}; wrote {args.gradescope}")
        return 0
    print(format_report(report))
    for flag, content in ((args.json, report.to_dict()), (args.gradescope, report.to_gradescope())):
        if flag:
            write_json(flag, content)
            print(f"\nwrote {flag}")
    return 0


def _list(args) -> int:
    for name in ASSIGNMENTS:
        items = ", ".join(f"{item.function} ({item.points})" for item in ITEMS[name])
        print(f"{name:<11} {sum(item.points for item in ITEMS[name]):>2} points: {items}")
    return 0


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
        return value
    return parse


def _add_limits(parser) -> None:
    parser.add_argument("--timeout", type=_positive(float), default=60.0,
                        help="seconds each graded item's child process may run (default 60)")
    parser.add_argument("--memory-mb", type=_positive(int), default=1024,
                        help="memory each graded item's child process may use, in MB (default 1024)")


def add_subcommands(sub) -> None:
    """Add build, grade and list to an argparse subparsers object."""
    b = sub.add_parser("build", help="write the student version of an assignment (solutions cut out)",
                       description="Write the student version of an assignment, or of all of them, into --out: "
                                   "each solution region replaced by a placeholder that raises NotImplementedError.")
    b.add_argument("name", help=f"an assignment ({', '.join(ASSIGNMENTS)}), 'all', or a directory or .py file "
                                "of instructor sources")
    b.add_argument("--out", help="output directory for the student version (refused if it exists and is not empty)")
    b.add_argument("--force", action="store_true", help="overwrite the assignment files in a non-empty --out")
    b.add_argument("--gradescope-zip", metavar="FILE.zip",
                   help="also write Gradescope's autograder bundle for the assignment (setup.sh, run_autograder, "
                        "the grader)")
    _add_limits(b)
    b.set_defaults(func=_build)

    g = sub.add_parser("grade", help="grade a student's file and print the report",
                       description="Grade every function of a student's file against minilora's reference in "
                                   "float64, each item in its own child process. Exits 0 whenever grading ran, "
                                   "whatever the score.")
    g.add_argument("name", choices=ASSIGNMENTS, help="the assignment")
    g.add_argument("file", help="the student's .py or .ipynb file, or a folder holding NAME.py or NAME.ipynb")
    g.add_argument("--json", help="also write the report to this JSON file")
    g.add_argument("--gradescope", metavar="RESULTS.json", help="also write Gradescope's results.json here")
    _add_limits(g)
    g.set_defaults(func=_grade)

    listing = sub.add_parser("list", help="the assignments, their items and points")
    listing.set_defaults(func=_list)


def build_parser(prog: str = "python -m minilora.course") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Course assignments: build student versions, grade them.")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None, prog: str = "python -m minilora.course") -> int:
    """Run one assignment command; 0 on success (for grade: whenever grading ran), 2 on a usage error."""
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
