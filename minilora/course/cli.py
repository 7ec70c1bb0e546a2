"""The assignment commands: ``build`` a student version, ``grade`` a student's file, ``list`` the assignments.

``main(argv)`` is what ``python -m minilora.course`` runs; the ``minilora`` command can hand its
``assignment`` arguments to it, or attach the subcommands to its own parser with ``add_subcommands``.
Both check every argument before any work (the validators and the exit codes of ``minilora.cli``).
"""
from __future__ import annotations

from pathlib import Path

from ..cli import OneLineParser, argument, check_output_file, check_output_folder, integer, real, run
from .build import ASSIGNMENTS, build_student, check_name
from .grade import ITEMS, find_submission, format_report, grade

TIMEOUT, MEMORY_MB = 60.0, 1024          # each graded item's child: seconds, address space in MB


def _check_build(args) -> None:
    if args.out is None and args.gradescope_zip is None:
        raise ValueError("say where to write: --out DIR (the student version), --gradescope-zip FILE.zip "
                         "(the Gradescope autograder), or both")
    if args.name not in ASSIGNMENTS and args.name != "all":
        source = Path(args.name)
        if not (source.is_dir() or (source.is_file() and source.suffix == ".py")):
            raise ValueError(f"argument name: unknown assignment {args.name!r}; expected one of "
                             f"{', '.join(ASSIGNMENTS)}, 'all', or a folder or .py file of instructor sources")
    if args.gradescope_zip is None:
        given = [option for option, value in (("--timeout", args.timeout), ("--memory-mb", args.memory_mb))
                 if value is not None]
        if given:
            raise ValueError(f"argument {given[0]}: only the Gradescope bundle has it (--gradescope-zip)")
    else:
        if args.name not in ASSIGNMENTS:
            raise ValueError(f"argument --gradescope-zip: a bundle holds one assignment ({', '.join(ASSIGNMENTS)}); "
                             f"got {args.name!r}")
        argument("--gradescope-zip", check_output_file, args.gradescope_zip, ".zip")
    if args.out is not None:
        argument("--out", check_output_folder, args.out)
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise ValueError(f"argument --out: {out} exists and is not empty; refusing to overwrite it (--force "
                             "overwrites the assignment files in it)")


def _build(args) -> int:
    if args.gradescope_zip is not None:
        from .gradescope import build_autograder_zip

        check_name(args.name)
        bundle = build_autograder_zip(args.name, args.gradescope_zip, _or(args.timeout, TIMEOUT),
                                      _or(args.memory_mb, MEMORY_MB))
        print(f"wrote {bundle}")
    if args.out is not None:
        for path in build_student(args.name, args.out, force=args.force):
            print(f"wrote {path}")
    return 0


def _check_grade(args) -> None:
    if args.gradescope is None:      # with --gradescope, a submission that cannot be graded gets a results.json
        try:
            find_submission(args.name, args.file)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"argument file: {exc}") from None
    for option, path in (("--json", args.json), ("--gradescope", args.gradescope)):
        if path is not None:
            argument(option, check_output_file, path)


def _grade(args) -> int:
    from ..io.files import write_json

    try:
        report = grade(args.name, args.file, timeout=_or(args.timeout, TIMEOUT),
                       memory_mb=_or(args.memory_mb, MEMORY_MB))
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


def _or(value, default):
    return default if value is None else value


def _add_limits(parser) -> None:
    parser.add_argument("--timeout", type=real(0, 86400, low_open=True, note=" seconds (a day at most)"),
                        default=None, help=f"seconds each graded item's child process may run (default {TIMEOUT:g})")
    parser.add_argument("--memory-mb", type=integer(1, 2**20, note=" MB (1 TiB at most)"), default=None,
                        help=f"memory each graded item's child process may use, in MB (default {MEMORY_MB})")


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
                        "the grader); --timeout and --memory-mb set its limits")
    _add_limits(b)
    b.set_defaults(func=_build, check=_check_build)

    g = sub.add_parser("grade", help="grade a student's file and print the report",
                       description="Grade every function of a student's file against minilora's reference in "
                                   "float64, each item in its own child process. Exits 0 whenever grading ran, "
                                   "whatever the score.")
    g.add_argument("name", choices=ASSIGNMENTS, help="the assignment")
    g.add_argument("file", help="the student's .py or .ipynb file, or a folder holding NAME.py or NAME.ipynb")
    g.add_argument("--json", help="also write the report to this JSON file")
    g.add_argument("--gradescope", metavar="RESULTS.json", help="also write Gradescope's results.json here")
    _add_limits(g)
    g.set_defaults(func=_grade, check=_check_grade)

    listing = sub.add_parser("list", help="the assignments, their items and points")
    listing.set_defaults(func=_list, check=None)


def build_parser(prog: str = "python -m minilora.course") -> OneLineParser:
    parser = OneLineParser(prog=prog, description="Course assignments: build student versions, grade them.")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None, prog: str = "python -m minilora.course") -> int:
    """Run one assignment command; 0 on success (for grade: whenever grading ran), 2 on a usage error, 1 when
    writing fails."""
    args = build_parser(prog).parse_args(argv)
    return run(args, f"{prog} {args.command}", tune_allocator=False)
