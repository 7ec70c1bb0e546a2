"""The README's findings table, regenerated from the studies' result.json files.

Every study writes result.json (``minilora experiment NAME``; ``minilora compare`` writes its own) holding its
raw per-seed numbers, its protocol and its ``findings``: each claim tested against the paper, with the paper's
number, ours with its 95% interval, and the verdict. ``render`` turns a folder of them into Markdown: the
findings table and the wall time of each run; ``update_readme`` writes it between two marker lines.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import STUDIES
from .protocol import findings_table

BEGIN, END = "<!-- findings:begin -->", "<!-- findings:end -->"


def collect(runs_dir) -> list:
    """[(study, result.json contents)] for every study with a result under runs_dir/<study>/, in STUDIES order."""
    found = []
    for name in STUDIES:
        path = Path(runs_dir) / name / "result.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable result file ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object; got {type(data).__name__}")
        found.append((name, data))
    return found


def render(found) -> str:
    """Markdown: the findings table, then each run's kind (full or fast) and wall time."""
    if not found:
        raise ValueError("no result.json found: run `minilora experiment NAME` (and `minilora compare`) first")
    lines = [findings_table([data for _, data in found]), "", "| study | run | wall time |", "|---|---|---|"]
    for name, data in found:
        kind = "fast (a smoke test, not a finding)" if data.get("fast") else "full"
        wall = data.get("wall_seconds")
        when = "" if wall is None else f"{wall:.0f} s" if wall < 60 else f"{wall / 60:.1f} min"
        lines.append(f"| {name} | {kind} | {when} |")
    return "\n".join(lines)


def update_readme(readme, text: str) -> None:
    """Replace what lies between the BEGIN and END marker lines of ``readme`` with ``text``."""
    path = Path(readme)
    content = path.read_text(encoding="utf-8")
    if content.count(BEGIN) != 1 or content.count(END) != 1 or content.index(BEGIN) > content.index(END):
        raise ValueError(f"{path}: expected one {BEGIN!r} line followed by one {END!r} line")
    head, rest = content.split(BEGIN)
    _, tail = rest.split(END)
    from ..io.files import write_bytes_atomic
    write_bytes_atomic(path, f"{head}{BEGIN}\n{text}\n{END}{tail}".encode("utf-8"))
