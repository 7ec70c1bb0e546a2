"""The assignment commands: ``build`` a student version, ``grade`` a student's file, ``list`` the assignments.

``main(argv)`` is what ``python -m minilora.course`` runs; the ``minilora`` command can hand its
``assignment`` arguments to it, or attach the subcommands to its own parser with ``add_subcommands``.
"""
from __future__ import annotations

import argparse
import sys

from .build import ASSIGNMENTS, build_student
from .grade import ITEMS, format_report, grade


def _build(args) -> int:
    written = build_student(args.name, args.out, force=args.force)
    for path in written:
        print(f"wrote {path}")
    return 0


def _grade(args) -> int:
    report = grade(args.name, args.file)
    print(format_report(report))
    if args.json:
        from ..io.files import write_json

        write_json(args.json, report.to_dict())
        print(f"\nwrote {args.json}")
    return 0


def _list(args) -> int:
    for name in ASSIGNMENTS:
        items = ", ".join(f"{item.function} ({item.points})" for item in ITEMS[name])
        print(f"{name:<11} {sum(item.points for item in ITEMS[name]):>2} points: {items}")
    return 0


def add_subcommands(sub) -> None:
    """Add build, grade and list to an argparse subparsers object."""
    b = sub.add_parser("build", help="write the student version of an assignment (solutions cut out)",
                       description="Write the student version of an assignment, or of all of them, into --out: "
                                   "each solution region replaced by a placeholder that raises NotImplementedError.")
    b.add_argument("name", help=f"an assignment ({', '.join(ASSIGNMENTS)}), 'all', or a directory or .py file "
                                "of instructor sources")
    b.add_argument("--out", required=True, help="output directory (refused if it exists and is not empty)")
    b.add_argument("--force", action="store_true", help="overwrite the assignment files in a non-empty --out")
    b.set_defaults(func=_build)

    g = sub.add_parser("grade", help="grade a student's file and print the report",
                       description="Grade every function of a student's file against minilora's own in float64. "
                                   "Exits 0 whenever grading ran, whatever the score.")
    g.add_argument("name", choices=ASSIGNMENTS, help="the assignment")
    g.add_argument("file", help="the student's .py file")
    g.add_argument("--json", help="also write the report to this JSON file")
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
