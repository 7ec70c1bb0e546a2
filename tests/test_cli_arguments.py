"""Bad command lines: every one is refused up front, in one line, with exit code 2 and no traceback.

Each line of TABLE runs ``python -m minilora ...`` in a subprocess (in a scratch working directory, so a
default output folder such as runs/pretrain lands there) and must end within 5 seconds: a command that starts
loading data or training before it notices the mistake would not. The message must name the argument (or the
environment variable) and the value it refused. A few lines need a folder the user cannot write to; root
writes anywhere, so those are skipped when the tests run as root (/proc/... stands in for an uncreatable
folder everywhere).

The end of the file: an error while writing (disk full) ends the command with exit code 1, one line, and
the earlier file untouched.
"""
import errno
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest


def writes_anywhere(folder) -> bool:
    """Whether this process can write into a folder without write permission (root can, unless it dropped
    CAP_DAC_OVERRIDE); those tests are skipped then."""
    try:
        with open(os.path.join(folder, "probe"), "w"):
            pass
    except PermissionError:
        return False
    os.unlink(os.path.join(folder, "probe"))
    return True


NOWHERE = "/proc/minilora-nowhere/out"      # no one can create it, root included (Linux)


@dataclass
class Case:
    args: list                    # the command line; {name} fields are paths made by the fixture
    needles: list                 # what the one line on stderr must contain (after the same formatting)
    env: dict = field(default_factory=dict)
    code: int = 2
    unwritable: bool = False      # needs a folder the user cannot write to (skipped as root)


# paths the fixture makes: {missing} no such file; {file} a text file; {dir} an empty folder; {full} a folder
# with a file in it; {garbage} a .safetensors that is not one; {plain} a safetensors file that is not a
# minilora checkpoint; {student} a .py file; {ro} a folder without write permission; {nowhere} uncreatable
TABLE = {
    # the environment and the top level
    "env-backend-bogus": Case(["gradcheck"], ["MINILORA_BACKEND", "bogus"], env={"MINILORA_BACKEND": "bogus"}),
    "env-backend-bogus-list": Case(["assignment", "list"], ["MINILORA_BACKEND", "bogus"],
                                   env={"MINILORA_BACKEND": "bogus"}),
    "env-fast-maybe": Case(["gradcheck"], ["MINILORA_FAST", "maybe"], env={"MINILORA_FAST": "maybe"}),
    "env-fast-maybe-sample": Case(["sample", "--max-new-tokens", "3"], ["MINILORA_FAST", "maybe"],
                                  env={"MINILORA_FAST": "maybe"}),
    "env-tune-malloc-maybe": Case(["gradcheck"], ["MINILORA_TUNE_MALLOC", "maybe"],
                                  env={"MINILORA_TUNE_MALLOC": "maybe"}),
    "env-backend-cupy-missing": Case(["gradcheck"], ["MINILORA_BACKEND", "cupy", "CuPy"],
                                     env={"MINILORA_BACKEND": "cupy"}),
    "backend-choice": Case(["--backend", "bogus", "gradcheck"], ["--backend", "bogus"]),
    "no-command": Case([], ["command"]),
    "notebooks-no-subcommand": Case(["notebooks"], ["notebooks_command"]),
    "findings-runs-missing": Case(["findings", "--runs", "/nonexistent/runs"], ["--runs", "/nonexistent/runs"]),
    "findings-readme-missing": Case(["findings", "--runs", ".", "--readme", "/nonexistent/README.md"],
                                    ["--readme", "/nonexistent/README.md"]),
    "notebooks-unknown-name": Case(["notebooks", "run", "99_nope"], ["99_nope", "no notebook"]),
    "notebooks-missing-dir": Case(["notebooks", "run", "--dir", "/nonexistent/notebooks"], ["/nonexistent/notebooks"]),
    "notebooks-out-is-file": Case(["notebooks", "run", "01", "--out", "{file}"], ["--out"]),
    "unknown-command": Case(["nonsense"], ["nonsense"]),
    # gradcheck
    "gradcheck-seed-negative": Case(["gradcheck", "--seed", "-1"], ["--seed", "-1"]),
    "gradcheck-seed-abc": Case(["gradcheck", "--seed", "abc"], ["--seed", "abc"]),
    "gradcheck-seed-1e39": Case(["gradcheck", "--seed", "1e39"], ["--seed", "1e39"]),
    # bench
    "bench-batch-0": Case(["bench", "--batch-size", "0"], ["--batch-size", "0"]),
    "bench-layers-negative": Case(["bench", "--n-layer", "-1"], ["--n-layer", "-1"]),
    "bench-heads-0": Case(["bench", "--n-head", "0"], ["--n-head", "0"]),
    "bench-embd-abc": Case(["bench", "--n-embd", "abc"], ["--n-embd", "abc"]),
    "bench-block-0": Case(["bench", "--block-size", "0"], ["--block-size", "0"]),
    "bench-steps-0": Case(["bench", "--steps", "0"], ["--steps", "0"]),
    "bench-threads-0": Case(["bench", "--threads", "0"], ["--threads", "0"]),
    "bench-heads-indivisible": Case(["bench", "--n-embd", "130", "--n-head", "4", "--no-torch"], ["130", "4"]),
    "bench-json-is-dir": Case(["bench", "--no-torch", "--json", "{dir}"], ["--json", "{dir}"]),
    "bench-json-under-file": Case(["bench", "--no-torch", "--json", "{file}/b.json"], ["--json", "{file}/b.json"]),
    "bench-scaling-is-file": Case(["bench", "--no-torch", "--scaling", "{file}"], ["--scaling", "{file}"]),
    "bench-scaling-nowhere": Case(["bench", "--no-torch", "--scaling", "{nowhere}"], ["--scaling", "{nowhere}"]),
    "bench-json-empty": Case(["bench", "--no-torch", "--json", ""], ["--json", "''"]),
    "bench-json-unwritable": Case(["bench", "--no-torch", "--json", "{ro}/b.json"], ["--json", "{ro}/b.json"],
                                  unwritable=True),
    # pretrain
    "pretrain-steps-0": Case(["pretrain", "--steps", "0"], ["--steps", "0"]),
    "pretrain-steps-negative": Case(["pretrain", "--steps", "-1"], ["--steps", "-1"]),
    "pretrain-steps-abc": Case(["pretrain", "--steps", "abc"], ["--steps", "abc"]),
    "pretrain-batch-0": Case(["pretrain", "--batch-size", "0"], ["--batch-size", "0"]),
    "pretrain-lr-0": Case(["pretrain", "--lr", "0"], ["--lr", "0"]),
    "pretrain-lr-negative": Case(["pretrain", "--lr", "-1"], ["--lr", "-1"]),
    "pretrain-lr-nan": Case(["pretrain", "--lr", "nan"], ["--lr", "nan"]),
    "pretrain-lr-inf": Case(["pretrain", "--lr", "inf"], ["--lr", "inf"]),
    "pretrain-lr-1e39": Case(["pretrain", "--lr", "1e39"], ["--lr", "1e39"]),
    "pretrain-lr-abc": Case(["pretrain", "--lr", "abc"], ["--lr", "abc"]),
    "pretrain-dropout-1": Case(["pretrain", "--dropout", "1"], ["--dropout", "1"]),
    "pretrain-dropout-negative": Case(["pretrain", "--dropout", "-0.1"], ["--dropout", "-0.1"]),
    "pretrain-dropout-nan": Case(["pretrain", "--dropout", "nan"], ["--dropout", "nan"]),
    "pretrain-warmup-negative": Case(["pretrain", "--warmup-steps", "-1"], ["--warmup-steps", "-1"]),
    "pretrain-eval-every-negative": Case(["pretrain", "--eval-every", "-1"], ["--eval-every", "-1"]),
    "pretrain-checkpoint-every-negative": Case(["pretrain", "--checkpoint-every", "-1"],
                                               ["--checkpoint-every", "-1"]),
    "pretrain-block-size-huge": Case(["pretrain", "--block-size", "100000000", "--n-layer", "1", "--out", "{dir}"],
                                     ["--block-size", "100000000"]),
    "pretrain-layers-0": Case(["pretrain", "--n-layer", "0"], ["--n-layer", "0"]),
    "pretrain-heads-indivisible": Case(["pretrain", "--n-embd", "100", "--n-head", "3", "--out", "{dir}"],
                                       ["100", "3"]),
    "pretrain-corpus-choice": Case(["pretrain", "--corpus", "nope"], ["--corpus", "nope"]),
    "pretrain-downstream-choice": Case(["pretrain", "--downstream", "nope"], ["--downstream", "nope"]),
    "pretrain-text-source-choice": Case(["pretrain", "--text-source", "nope"], ["--text-source", "nope"]),
    "pretrain-seed-negative": Case(["pretrain", "--seed", "-1"], ["--seed", "-1"]),
    "pretrain-out-is-file": Case(["pretrain", "--out", "{file}"], ["--out", "{file}"]),
    "pretrain-out-under-file": Case(["pretrain", "--out", "{file}/run"], ["--out", "{file}/run"]),
    "pretrain-out-nowhere": Case(["pretrain", "--out", "{nowhere}"], ["--out", "{nowhere}"]),
    "pretrain-out-unwritable": Case(["pretrain", "--out", "{ro}/run"], ["--out", "{ro}/run"], unwritable=True),
    "pretrain-export-to-file": Case(["pretrain", "--out", "{dir}", "--export-to", "{file}"],
                                    ["--export-to", "{file}"]),
    "pretrain-resume-nothing": Case(["pretrain", "--out", "{dir}", "--resume"], ["--resume", "{dir}"]),
    # sample
    "sample-checkpoint-missing": Case(["sample", "--checkpoint", "{missing}"], ["--checkpoint", "{missing}"]),
    "sample-checkpoint-dir": Case(["sample", "--checkpoint", "{dir}"], ["--checkpoint", "{dir}"]),
    "sample-checkpoint-garbage": Case(["sample", "--checkpoint", "{garbage}"], ["--checkpoint", "{garbage}"]),
    "sample-checkpoint-plain": Case(["sample", "--checkpoint", "{plain}"], ["--checkpoint", "{plain}"]),
    "sample-checkpoint-empty": Case(["sample", "--checkpoint", ""], ["--checkpoint", "''"]),
    "sample-temperature-negative": Case(["sample", "--temperature", "-1"], ["--temperature", "-1"]),
    "sample-temperature-nan": Case(["sample", "--temperature", "nan"], ["--temperature", "nan"]),
    "sample-temperature-inf": Case(["sample", "--temperature", "inf"], ["--temperature", "inf"]),
    "sample-top-k-0": Case(["sample", "--top-k", "0"], ["--top-k", "0"]),
    "sample-top-k-huge": Case(["sample", "--top-k", "1000"], ["--top-k", "1000"]),
    "sample-tokens-negative": Case(["sample", "--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    "sample-tokens-abc": Case(["sample", "--max-new-tokens", "abc"], ["--max-new-tokens", "abc"]),
    "sample-prompt-empty": Case(["sample", "--prompt", ""], ["--prompt"]),
    "sample-seed-negative": Case(["sample", "--seed", "-3"], ["--seed", "-3"]),
    # eval
    "eval-checkpoint-missing": Case(["eval", "--checkpoint", "{missing}"], ["--checkpoint", "{missing}"]),
    "eval-checkpoint-dir": Case(["eval", "--checkpoint", "{dir}"], ["--checkpoint", "{dir}"]),
    "eval-batch-0": Case(["eval", "--batch-size", "0"], ["--batch-size", "0"]),
    "eval-max-batches-0": Case(["eval", "--max-batches", "0"], ["--max-batches", "0"]),
    "eval-split-choice": Case(["eval", "--split", "test"], ["--split", "test"]),
    "eval-corpus-choice": Case(["eval", "--corpus", "nope"], ["--corpus", "nope"]),
    # finetune
    "finetune-lr-inf": Case(["finetune", "--lr", "inf"], ["--lr", "inf"]),
    "finetune-lr-nan": Case(["finetune", "--lr", "nan"], ["--lr", "nan"]),
    "finetune-lr-negative": Case(["finetune", "--lr", "-1"], ["--lr", "-1"]),
    "finetune-lr-1e39": Case(["finetune", "--lr", "1e39"], ["--lr", "1e39"]),
    "finetune-lr-0": Case(["finetune", "--lr", "0"], ["--lr", "0"]),
    "finetune-r-0": Case(["finetune", "--r", "0"], ["--r", "0"]),
    "finetune-r-negative": Case(["finetune", "--r", "-4"], ["--r", "-4"]),
    "finetune-alpha-0": Case(["finetune", "--alpha", "0"], ["--alpha", "0"]),
    "finetune-alpha-nan": Case(["finetune", "--alpha", "nan"], ["--alpha", "nan"]),
    "finetune-alpha-inf": Case(["finetune", "--alpha", "inf"], ["--alpha", "inf"]),
    "finetune-lora-dropout-1": Case(["finetune", "--lora-dropout", "1"], ["--lora-dropout", "1"]),
    "finetune-dropout-1.5": Case(["finetune", "--dropout", "1.5"], ["--dropout", "1.5"]),
    "finetune-steps-0": Case(["finetune", "--steps", "0"], ["--steps", "0"]),
    "finetune-batch-0": Case(["finetune", "--batch-size", "0"], ["--batch-size", "0"]),
    "finetune-eval-every-negative": Case(["finetune", "--eval-every", "-1"], ["--eval-every", "-1"]),
    "finetune-latency-negative": Case(["finetune", "--latency-repeats", "-1"], ["--latency-repeats", "-1"]),
    "finetune-targets-empty": Case(["finetune", "--targets", ""], ["--targets"]),
    "finetune-targets-comma": Case(["finetune", "--targets", ","], ["--targets", ","]),
    "finetune-targets-unknown": Case(["finetune", "--targets", "q_proj,bogus", "--out", "{dir}"],
                                     ["--targets", "bogus"]),
    "finetune-r-huge": Case(["finetune", "--r", "1000000", "--out", "{dir}"], ["--r", "1000000"]),
    "finetune-lora-option-with-full": Case(["finetune", "--method", "full", "--r", "8", "--out", "{dir}"],
                                           ["--r", "full"]),
    "finetune-loraplus-ratio-0": Case(["finetune", "--method", "loraplus", "--loraplus-ratio", "0"],
                                      ["--loraplus-ratio", "'0'"]),
    "finetune-loraplus-ratio-negative": Case(["finetune", "--method", "loraplus", "--loraplus-ratio", "-16"],
                                             ["--loraplus-ratio", "-16"]),
    "finetune-loraplus-ratio-nan": Case(["finetune", "--method", "loraplus", "--loraplus-ratio", "nan"],
                                        ["--loraplus-ratio", "nan"]),
    "finetune-loraplus-ratio-inf": Case(["finetune", "--method", "loraplus", "--loraplus-ratio", "inf"],
                                        ["--loraplus-ratio", "inf"]),
    "finetune-loraplus-ratio-with-lora": Case(["finetune", "--loraplus-ratio", "16", "--out", "{dir}"],
                                              ["--loraplus-ratio", "--method loraplus", "--method is lora"]),
    "finetune-loraplus-ratio-with-full": Case(["finetune", "--method", "full", "--loraplus-ratio", "4", "--out",
                                               "{dir}"], ["--loraplus-ratio", "--method is full"]),
    "finetune-loraplus-bad-rank": Case(["finetune", "--method", "loraplus", "--r", "1000000", "--out", "{dir}"],
                                       ["--r", "1000000"]),
    "finetune-init-choice": Case(["finetune", "--init", "nope"], ["--init", "nope"]),
    "finetune-method-choice": Case(["finetune", "--method", "adapters"], ["--method", "adapters"]),
    "finetune-out-is-file": Case(["finetune", "--out", "{file}"], ["--out", "{file}"]),
    "finetune-out-nowhere": Case(["finetune", "--out", "{nowhere}"], ["--out", "{nowhere}"]),
    "finetune-out-unwritable": Case(["finetune", "--out", "{ro}/ft"], ["--out", "{ro}/ft"], unwritable=True),
    "finetune-checkpoint-missing": Case(["finetune", "--checkpoint", "{missing}", "--out", "{dir}"],
                                        ["--checkpoint", "{missing}"]),
    "finetune-checkpoint-garbage": Case(["finetune", "--checkpoint", "{garbage}", "--out", "{dir}"],
                                        ["--checkpoint", "{garbage}"]),
    "finetune-checkpoint-plain": Case(["finetune", "--checkpoint", "{plain}", "--out", "{dir}"],
                                      ["--checkpoint", "{plain}"]),
    "finetune-checkpoint-dir": Case(["finetune", "--checkpoint", "{dir}", "--out", "{dir}"],
                                    ["--checkpoint", "{dir}"]),
    "finetune-corpus-choice": Case(["finetune", "--corpus", "nope"], ["--corpus", "nope"]),
    # tour
    "tour-steps-0": Case(["tour", "--steps", "0"], ["--steps", "0"]),
    "tour-steps-negative": Case(["tour", "--steps", "-5"], ["--steps", "-5"]),
    "tour-steps-abc": Case(["tour", "--steps", "abc"], ["--steps", "abc"]),
    "tour-out-is-file": Case(["tour", "--quick", "--out", "{file}"], ["--out", "{file}"]),
    "tour-out-nowhere": Case(["tour", "--quick", "--out", "{nowhere}"], ["--out", "{nowhere}"]),
    # experiment
    "experiment-unknown": Case(["experiment", "nope"], ["nope"]),
    "experiment-no-name": Case(["experiment"], ["name"]),
    "experiment-seed-negative": Case(["experiment", "rank-basics", "--fast", "--seed", "-1"], ["--seed", "-1"]),
    "experiment-out-is-file": Case(["experiment", "rank-basics", "--fast", "--out", "{file}"], ["--out", "{file}"]),
    "experiment-out-nowhere": Case(["experiment", "rank-basics", "--fast", "--out", "{nowhere}"],
                                   ["--out", "{nowhere}"]),
    # compare
    "compare-methods-empty": Case(["compare", "--fast", "--methods", ""], ["--methods"]),
    "compare-methods-unknown": Case(["compare", "--fast", "--methods", "bogus"], ["--methods", "bogus", "lora"]),
    "compare-methods-trailing-comma": Case(["compare", "--fast", "--methods", "lora,"], ["--methods", "lora,"]),
    "compare-methods-twice": Case(["compare", "--fast", "--methods", "lora,lora"], ["--methods", "'lora'"]),
    "compare-seeds-0": Case(["compare", "--fast", "--seeds", "0"], ["--seeds", "0"]),
    "compare-seeds-1": Case(["compare", "--fast", "--seeds", "1"], ["--seeds", "at least 2", "got 1"]),
    "compare-seeds-negative": Case(["compare", "--fast", "--seeds", "-1"], ["--seeds", "-1"]),
    "compare-seed-negative": Case(["compare", "--fast", "--seed", "-1"], ["--seed", "-1"]),
    "compare-out-is-file": Case(["compare", "--fast", "--out", "{file}"], ["--out", "{file}"]),
    "compare-out-nowhere": Case(["compare", "--fast", "--out", "{nowhere}"], ["--out", "{nowhere}"]),
    # assignment build / grade / list
    "assignment-no-subcommand": Case(["assignment"], ["assignment_command"]),
    "build-unknown": Case(["assignment", "build", "nope", "--out", "{dir}/x"], ["nope"]),
    "build-no-destination": Case(["assignment", "build", "layers"], ["--out"]),
    "build-out-is-file": Case(["assignment", "build", "layers", "--out", "{file}"], ["--out", "{file}"]),
    "build-out-nowhere": Case(["assignment", "build", "layers", "--out", "{nowhere}"], ["--out", "{nowhere}"]),
    "build-out-unwritable": Case(["assignment", "build", "layers", "--out", "{ro}/student"],
                                 ["--out", "{ro}/student"], unwritable=True),
    "build-out-not-empty": Case(["assignment", "build", "layers", "--out", "{full}"], ["--out", "{full}", "not empty"]),
    "build-zip-suffix": Case(["assignment", "build", "layers", "--gradescope-zip", "{dir}/bundle.txt"],
                             ["--gradescope-zip", "{dir}/bundle.txt"]),
    "build-zip-all": Case(["assignment", "build", "all", "--gradescope-zip", "{dir}/bundle.zip"],
                          ["--gradescope-zip", "all"]),
    "build-zip-is-dir": Case(["assignment", "build", "layers", "--gradescope-zip", "{dir}"],
                             ["--gradescope-zip", "{dir}"]),
    "build-timeout-0": Case(["assignment", "build", "layers", "--out", "{dir}", "--timeout", "0"], ["--timeout", "0"]),
    "build-timeout-nan": Case(["assignment", "build", "layers", "--out", "{dir}", "--timeout", "nan"],
                              ["--timeout", "nan"]),
    "build-timeout-inf": Case(["assignment", "build", "layers", "--out", "{dir}", "--timeout", "inf"],
                              ["--timeout", "inf"]),
    "build-timeout-without-zip": Case(["assignment", "build", "layers", "--out", "{dir}", "--timeout", "5"],
                                      ["--timeout", "--gradescope-zip"]),
    "build-memory-0": Case(["assignment", "build", "layers", "--out", "{dir}", "--memory-mb", "0"],
                           ["--memory-mb", "0"]),
    "build-memory-abc": Case(["assignment", "build", "layers", "--out", "{dir}", "--memory-mb", "abc"],
                             ["--memory-mb", "abc"]),
    "build-source-missing": Case(["assignment", "build", "{missing}", "--out", "{dir}"], ["{missing}"]),
    "grade-file-missing": Case(["assignment", "grade", "layers", "{missing}"], ["{missing}"]),
    "grade-unknown": Case(["assignment", "grade", "nope", "{student}"], ["nope"]),
    "grade-timeout-negative": Case(["assignment", "grade", "layers", "{student}", "--timeout", "-1"],
                                   ["--timeout", "-1"]),
    "grade-timeout-inf": Case(["assignment", "grade", "layers", "{student}", "--timeout", "inf"],
                              ["--timeout", "inf"]),
    "grade-memory-1e39": Case(["assignment", "grade", "layers", "{student}", "--memory-mb", "1e39"],
                              ["--memory-mb", "1e39"]),
    "grade-json-is-dir": Case(["assignment", "grade", "layers", "{student}", "--json", "{dir}"],
                              ["--json", "{dir}"]),
    "grade-json-under-file": Case(["assignment", "grade", "layers", "{student}", "--json", "{file}/r.json"],
                                  ["--json", "{file}/r.json"]),
    "grade-gradescope-nowhere": Case(["assignment", "grade", "layers", "{student}", "--gradescope",
                                      "{nowhere}/results.json"], ["--gradescope", "{nowhere}/results.json"]),
    "list-extra": Case(["assignment", "list", "extra"], ["extra"]),
}


def make_paths(root) -> dict:
    """The files and folders TABLE's command lines name, under ``root``."""
    from safetensors.numpy import save_file
    import numpy

    (root / "file.txt").write_text("not a folder\n")
    (root / "dir").mkdir()
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("keep me\n")
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    save_file({"w": numpy.zeros(3, dtype="float32")}, str(root / "plain.safetensors"))
    (root / "student.py").write_text("x = 1\n")
    (root / "ro").mkdir()
    (root / "ro").chmod(0o500)
    return {"missing": str(root / "missing.safetensors"), "file": str(root / "file.txt"), "dir": str(root / "dir"),
            "full": str(root / "full"), "garbage": str(root / "garbage.safetensors"),
            "plain": str(root / "plain.safetensors"), "student": str(root / "student.py"), "ro": str(root / "ro"),
            "nowhere": NOWHERE}


def run_case(case: Case, paths: dict, cwd, timeout: float = 5.0):
    args = [a.format(**paths) for a in case.args]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **case.env}
    if "MINILORA_BACKEND" not in case.env:
        env.pop("MINILORA_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "minilora", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture
def paths(tmp_path):
    made = make_paths(tmp_path)
    yield made
    (tmp_path / "ro").chmod(0o700)       # so pytest can clean up


@pytest.mark.parametrize("name", list(TABLE))
def test_bad_command_line_is_refused_in_one_line(name, paths, tmp_path):
    case = TABLE[name]
    if case.unwritable and writes_anywhere(paths["ro"]):
        pytest.skip("root can write into any folder")
    if case.env.get("MINILORA_BACKEND") == "cupy" and importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: MINILORA_BACKEND=cupy may well be usable")
    if NOWHERE in " ".join(case.args).format(**paths) and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc for a folder no one can create")
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        result = run_case(case, paths, work)
    except subprocess.TimeoutExpired:
        pytest.fail(f"minilora {' '.join(case.args)} ran for over 5 s: it did not refuse the command up front")
    both = result.stdout + result.stderr
    assert "Traceback" not in both, both
    assert result.returncode == case.code, both
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minilora"), lines[0]
    for needle in case.needles:
        assert needle.format(**paths) in lines[0], (needle, lines[0])
    # refused without leaving anything behind: no folder made, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list(work.iterdir()) == []
    assert sorted(os.listdir(paths["dir"])) == [] and sorted(os.listdir(paths["full"])) == ["keep.txt"]


def test_the_table_covers_every_subcommand():
    from minilora.cli import build_parser

    parser = build_parser()
    commands = {a for a in parser._subparsers._group_actions[0].choices}
    covered = {case.args[0] for case in TABLE.values() if case.args and not case.args[0].startswith("-")}
    assert commands <= covered, commands - covered
    assignment = {case.args[1] for case in TABLE.values() if case.args[:1] == ["assignment"] and len(case.args) > 1}
    assert {"build", "grade", "list"} <= assignment
    assert len(TABLE) >= 60


# ----------------------------------------------------------------------------------------------------
# errors while writing: exit code 1 (the command line was fine), one line, the earlier file intact


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_exits_1_and_keeps_the_earlier_file(tmp_path, monkeypatch, capsys):
    from minilora import cli

    out = tmp_path / "student"
    assert cli.main(["assignment", "build", "layers", "--out", str(out)]) == 0
    before = (out / "layers.py").read_bytes()
    (out / "layers.py").write_bytes(b"# the student's own work\n" + before)
    kept = (out / "layers.py").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(os, "fsync", _disk_full)         # the atomic writer's flush to disk fails
    assert cli.main(["assignment", "build", "layers", "--out", str(out), "--force"]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minilora assignment build: error: could not write"), captured.err
    assert "No space left on device" in lines[0] and str(out) in lines[0]
    assert (out / "layers.py").read_bytes() == kept
    assert sorted(p.name for p in out.iterdir()) == ["layers.py"]          # no temporary file left behind


def test_disk_full_while_writing_a_report_exits_1(tmp_path, monkeypatch, capsys):
    from minilora import cli
    from minilora.io import files

    report = tmp_path / "report.json"
    report.write_text('{"earlier": true}\n')
    student = tmp_path / "subspace.py"
    student.write_text("x = 1\n")
    monkeypatch.setattr(files, "write_bytes_atomic", _disk_full)
    assert cli.main(["assignment", "grade", "subspace", str(student), "--json", str(report), "--timeout", "20"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not write" in lines[0] and "No space left on device" in lines[0], err
    assert str(report) in lines[0]
    assert report.read_text() == '{"earlier": true}\n'


def test_a_folder_made_read_only_mid_run_exits_1(tmp_path, capsys, monkeypatch):
    """The folder passes the check up front, then loses its write permission before the files are written."""
    from minilora import cli
    from minilora.course import build

    out = tmp_path / "student"
    out.mkdir()
    out.chmod(0o500)
    if writes_anywhere(out):
        out.chmod(0o700)
        pytest.skip("root can write into any folder")
    out.chmod(0o700)
    real = build.strip_solutions

    def then_read_only(*args, **kwargs):
        out.chmod(0o500)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "strip_solutions", then_read_only)
    try:
        assert cli.main(["assignment", "build", "layers", "--out", str(out)]) == 1
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert "could not write" in err and "Permission denied" in err and "Traceback" not in err
    assert list(out.iterdir()) == []
