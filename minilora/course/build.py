"""Build the student version of an assignment: every solution region cut out, a placeholder in its place.

An instructor source is an ordinary, complete Python module. Each region a student writes sits between two
marker lines, and may be followed by the placeholder the student sees instead, commented out:

        x, W, has_bias = cache
        # BEGIN SOLUTION
        dx = ...
        return dx, dW, db
        # END SOLUTION
        # BEGIN PLACEHOLDER                       (optional)
        # raise NotImplementedError("linear_backward: dx, dW, db")
        # END PLACEHOLDER

The student version drops the region and the markers and uncomments the placeholder (one "# " after the
indentation). Without a placeholder block the region becomes, at the marker's indentation,

        raise NotImplementedError("linear_backward: not implemented yet (write your solution here)")

so the student file imports and each unfinished function raises NotImplementedError. A marker that is
unmatched, nested or misspelt is a ValueError naming the file and line: a typo must never ship a solution.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..io.files import write_bytes_atomic

SOURCES = Path(__file__).resolve().parent / "sources"
ASSIGNMENTS = ("layers", "lora_layer", "subspace")

BEGIN_SOLUTION = "# BEGIN SOLUTION"
END_SOLUTION = "# END SOLUTION"
BEGIN_PLACEHOLDER = "# BEGIN PLACEHOLDER"
END_PLACEHOLDER = "# END PLACEHOLDER"
_MARKERS = (BEGIN_SOLUTION, END_SOLUTION, BEGIN_PLACEHOLDER, END_PLACEHOLDER)
_LOOKS_LIKE_MARKER = re.compile(r"#\s*(BEGIN|END)\s+(SOLUTION|PLACEHOLDER)", re.IGNORECASE)
_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)\s*\(")


def check_name(name) -> str:
    """``name`` if it is a known assignment; else a ValueError listing the known ones."""
    if not isinstance(name, str) or name not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {name!r}; expected one of {', '.join(ASSIGNMENTS)}")
    return name


def source_path(name: str) -> Path:
    """The instructor source (with solutions) of an assignment, shipped inside the package."""
    return SOURCES / f"{check_name(name)}.py"


# ----------------------------------------------------------------------------------------------------
# cutting the solutions out of one file


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _enclosing_function(lines, index, indent) -> str | None:
    """The name of the innermost ``def`` above lines[index] that is indented less than ``indent``."""
    for line in reversed(lines[:index]):
        match = _DEF.match(line)
        if match and len(match.group(1)) < len(indent):
            return match.group(2)
    return None


def _marker(line: str, filename: str, number: int) -> str | None:
    """The marker on this line, None for an ordinary line; a ValueError for a misspelt marker."""
    stripped = line.strip()
    if stripped in _MARKERS:
        return stripped
    if _LOOKS_LIKE_MARKER.search(line):
        raise ValueError(f"{filename}, line {number}: {stripped!r} looks like a marker but is not one of "
                         f"{', '.join(repr(m) for m in _MARKERS)} (exactly, alone on its line)")
    return None


def _uncomment(line: str, filename: str, number: int) -> str:
    """'    # code' -> '    code'; blank lines stay blank."""
    if not line.strip():
        return line
    indent, rest = _indent(line), line.lstrip()
    if not rest.startswith("#"):
        raise ValueError(f"{filename}, line {number}: a placeholder line must be commented out in the "
                         f"instructor source (it is uncommented in the student version); got {line.strip()!r}")
    return indent + rest[1:].removeprefix(" ")


def strip_solutions(text: str, filename: str = "<source>") -> str:
    """The student version of one instructor source (see the module docstring).

    text: the instructor source; filename: for error messages. Returns the student source, which compiles.
    Raises ValueError for a file without solution regions, a bad marker, or a result that does not compile.
    """
    lines = text.splitlines(keepends=True)
    out = []
    regions = 0
    i = 0
    while i < len(lines):
        marker = _marker(lines[i], filename, i + 1)
        if marker is None:
            out.append(lines[i])
            i += 1
            continue
        if marker != BEGIN_SOLUTION:
            raise ValueError(f"{filename}, line {i + 1}: {marker!r} without a {BEGIN_SOLUTION!r} before it")
        begin, indent = i, _indent(lines[i])
        i += 1
        while i < len(lines) and _marker(lines[i], filename, i + 1) is None:
            i += 1
        if i == len(lines) or _marker(lines[i], filename, i + 1) != END_SOLUTION:
            found = "the end of the file" if i == len(lines) else repr(lines[i].strip())
            raise ValueError(f"{filename}, line {begin + 1}: {BEGIN_SOLUTION!r} is not closed by "
                             f"{END_SOLUTION!r} (found {found} first)")
        regions += 1
        i += 1                                                   # past END SOLUTION
        if i < len(lines) and _marker(lines[i], filename, i + 1) == BEGIN_PLACEHOLDER:
            start = i
            i += 1
            while i < len(lines) and _marker(lines[i], filename, i + 1) is None:
                out.append(_uncomment(lines[i], filename, i + 1))
                i += 1
            if i == len(lines) or _marker(lines[i], filename, i + 1) != END_PLACEHOLDER:
                raise ValueError(f"{filename}, line {start + 1}: {BEGIN_PLACEHOLDER!r} is not closed by "
                                 f"{END_PLACEHOLDER!r}")
            i += 1                                               # past END PLACEHOLDER
        else:
            name = _enclosing_function(lines, begin, indent)
            message = f"{name}: not implemented yet" if name else "not implemented yet"
            out.append(f'{indent}raise NotImplementedError("{message} (write your solution here)")\n')
    if regions == 0:
        raise ValueError(f"{filename} has no {BEGIN_SOLUTION!r} region: it is not an instructor source "
                         "(refusing to hand it out unchanged)")
    student = "".join(out)
    try:
        compile(student, filename, "exec")
    except SyntaxError as exc:
        raise ValueError(f"the student version of {filename} does not compile (line {exc.lineno}: {exc.msg}); "
                         "check the placeholders") from exc
    return student


# ----------------------------------------------------------------------------------------------------
# building a student directory


def _instructor_sources(source) -> list[Path]:
    """The instructor files named by an assignment name, "all", a directory of sources or one source file."""
    if isinstance(source, str) and source == "all":
        return [source_path(name) for name in ASSIGNMENTS]
    if isinstance(source, str) and source in ASSIGNMENTS:
        return [source_path(source)]
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be an assignment name or a path; got {type(source).__name__} {source!r}")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.py") if p.name != "__init__.py")
        if not files:
            raise ValueError(f"no instructor sources (*.py) in the directory {path}")
        return files
    if path.is_file() and path.suffix == ".py":
        return [path]
    raise ValueError(f"unknown assignment {source!r}; expected one of {', '.join(ASSIGNMENTS)}, 'all', "
                     "or a directory or .py file of instructor sources")


def build_student(source, out_dir, force: bool = False) -> list[Path]:
    """Write the student version of each instructor source into ``out_dir``; return the files written.

    source: an assignment name ("layers", "lora_layer", "subspace"), "all", a directory of instructor sources
    (every *.py but __init__.py) or one .py file. out_dir: created if needed. An existing non-empty out_dir is
    refused (FileExistsError) unless force=True, which overwrites the files of the same names and leaves every
    other file alone. Only the stripped modules are written, each atomically, and only after every one of
    them has been built, so a bad marker writes nothing.
    """
    sources = _instructor_sources(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it "
                              "(force=True, or --force, overwrites the assignment files in it)")
    names = [path.name for path in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"two instructor sources share a file name: {names}")
    built = {path.name: strip_solutions(path.read_text(encoding="utf-8"), str(path)) for path in sources}
    written = []
    for name, text in built.items():
        target = out_dir / name
        write_bytes_atomic(target, text.encode("utf-8"))
        written.append(target)
    return written
