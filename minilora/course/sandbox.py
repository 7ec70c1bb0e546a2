"""Running a student's code in a child process, away from the grader: a fresh folder, limits, a timeout.

``run_child`` writes a request (which functions to call on which inputs; see child.py) and the submission into a
temporary folder, starts ``python -I child.py FOLDER`` in its own session with a small environment, waits at most
``timeout`` seconds (then kills the whole process group), and reads back what the child wrote. Whatever the
student's code does (loop, exit, crash, exhaust memory, write garbage), the grader gets a ChildRun: the child's
report and arrays, or a ``failure`` sentence saying what happened.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy

CHILD = Path(__file__).resolve().parent / "child.py"
PACKAGE_DIR = Path(__file__).resolve().parent.parent              # minilora/: the child may not read it
LOADED_MARKER = "loaded"


@dataclass
class Limits:
    """timeout: wall-clock seconds per child; memory_mb: its address space; file_mb: the largest file it may
    write (in its own folder)."""

    timeout: float = 60.0
    memory_mb: int = 1024
    file_mb: int = 64

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "file_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number; got {value!r}")


@dataclass
class ChildRun:
    """What one child left: its report (None if it left none), its arrays, and why it failed (None if it did
    not). loaded: whether the submission finished loading before the child stopped."""

    report: dict | None
    outputs: dict = field(default_factory=dict)
    failure: str | None = None
    loaded: bool = False


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f"; its last output: {text!r}" if text else ""


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_child(source: str, file_name: str, request: dict, arrays: dict, limits: Limits) -> ChildRun:
    """Run the child on ``source`` (the submission's Python code, saved as ``file_name``) with ``request``."""
    with tempfile.TemporaryDirectory(prefix="minilora-grade-") as folder:
        folder = Path(folder).resolve()
        submission = folder / file_name
        submission.write_text(source, encoding="utf-8")
        request = {**request, "submission": str(submission), "forbidden_dirs": [str(PACKAGE_DIR)],
                   "loaded_marker": str(folder / LOADED_MARKER),
                   "limits": {"memory_bytes": int(limits.memory_mb) << 20, "cpu_seconds": int(limits.timeout) + 2,
                              "file_bytes": int(limits.file_mb) << 20}}
        (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
        numpy.savez(folder / "inputs.npz", **arrays)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(folder), "LC_ALL": "C.UTF-8",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if "SYSTEMROOT" in os.environ:            # Windows needs it to start Python at all
            env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
        with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
            process = subprocess.Popen([sys.executable, "-I", str(CHILD), str(folder)], cwd=folder, env=env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       start_new_session=(os.name == "posix"))
            try:
                code = process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                _kill(process)
                return ChildRun(None, failure=f"timed out after {limits.timeout:g} s (an endless loop?)",
                                loaded=(folder / LOADED_MARKER).exists())
            finally:
                _kill(process)
        loaded = (folder / LOADED_MARKER).exists()
        if code != 0 or not (folder / "result.json").exists():
            if code < 0:
                why = f"was killed by {_signal_name(code)}" + (" (out of memory or CPU time?)" if code in
                                                                (-signal.SIGKILL, -getattr(signal, "SIGXCPU", 24))
                                                                else "")
            else:
                why = f"exited with code {code} (os._exit or a crash?)"
            stage = "while its functions ran" if loaded else "while the file was loading"
            return ChildRun(None, failure=f"the process {why} {stage}, before reporting"
                                          + _tail(folder / "stderr.txt"), loaded=loaded)
        try:
            report = json.loads((folder / "result.json").read_text(encoding="utf-8"))
            with numpy.load(folder / "outputs.npz", allow_pickle=False) as data:
                outputs = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            return ChildRun(None, failure=f"its report could not be read ({type(exc).__name__}: {exc}); did the "
                                          "submission write over it?", loaded=loaded)
        if not isinstance(report, dict) or not isinstance(report.get("cases", []), list):
            return ChildRun(None, failure="its report is malformed; did the submission write over it?", loaded=loaded)
        return ChildRun(report, outputs, loaded=loaded)


def _kill(process) -> None:
    """Kill a child that is still running, with its whole process group (what it started goes with it); a
    child that has exited is left alone, so that a reused process id is never signalled."""
    if process.poll() is not None:
        return
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass
    process.wait()
