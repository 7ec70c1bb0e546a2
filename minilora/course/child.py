"""The grader's child process: runs a student's functions on given inputs and writes what they return.

Run by path, never imported by the grader: ``python -I child.py WORKDIR``. It needs only the standard library
and NumPy, and it never sees minilora's answers: WORKDIR/request.json says which functions to call on which
inputs (WORKDIR/inputs.npz), and WORKDIR/outputs.npz with WORKDIR/result.json get what they returned. The
grader, in its own process, compares those with the references it computed itself.

Before the student's file is executed, the child limits itself (address space, CPU time, file size), and an
audit hook (PEP 578, which cannot be removed once added) refuses:
    importing minilora, and opening any file under minilora's package directory (the solution sources);
    writing, creating, renaming or deleting files outside WORKDIR;
    starting processes (subprocess, os.system, exec, fork, spawn), sockets, and loading C libraries (ctypes).

Request: {"submission": path, "forbidden_dirs": [...], "limits": {...}, "stand_ins": {name: kind},
"functions": [names that must be defined in the submission], "cases": [case, ...]}. A case is one of
    {"kind": "call", "name", "function", "args", "kwargs"}                      fn(*args, **kwargs)
    {"kind": "pair", "name", "forward", "backward", "args", "kwargs", "dout", "flags", "wrt": [arg index]}
        out, cache = forward(*args, **kwargs); backward(dout, cache, **flags); centred differences of
        sum(forward(...) * dout) for each argument in wrt
    {"kind": "loss", "name", "function", "args", "kwargs"}                      (loss, grad) = fn(*args);
        centred differences of the loss with respect to args[0]
An argument is a JSON number, string or bool, or {"array": key}, {"none": true}, {"rng": seed} (a fresh
numpy Generator for every call, so every call draws the same dropout mask) or {"fastfood": prefix} (an object
with the fields D, d, n, m, B, G, scale, perm, inverse_perm).
"""
import json
import os
import sys
import traceback
import types

H = 1e-5                                   # the centred-difference step (as minilora.gradcheck)


def _limit(limits):
    try:
        import resource
    except ImportError:                    # not on POSIX: the grader's wall-clock timeout still holds
        return
    for name, key in (("RLIMIT_AS", "memory_bytes"), ("RLIMIT_CPU", "cpu_seconds"), ("RLIMIT_FSIZE", "file_bytes")):
        value = limits.get(key)
        if value and hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (int(value), int(value)))


def _install_guard(workdir, forbidden_dirs):
    """The audit hook: refuse what a submission has no business doing (see the module docstring)."""
    workdir = os.path.realpath(workdir)
    forbidden = [os.path.realpath(d) for d in forbidden_dirs]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    refused_events = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                      "os.forkpty", "os.startfile", "socket.connect", "socket.bind", "socket.__new__",
                      "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.remote_exec")
    path_events = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                   "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move")

    def inside(path, root):
        return path == root or path.startswith(root + os.sep)

    def resolve(path):
        if isinstance(path, int):
            return None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return os.path.realpath(os.fspath(path))

    def hook(event, args):
        if event == "import":
            module = str(args[0])
            if module == "minilora" or module.startswith("minilora."):
                raise ImportError(f"importing {module} is not allowed in a submission: the graded functions "
                                  "must be your own code")
        elif event == "open":
            path = resolve(args[0])
            if path is None:
                return
            if any(inside(path, d) for d in forbidden):
                raise PermissionError(f"a submission may not read {path} (minilora's own files)")
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if writing and not inside(path, workdir):
                raise PermissionError(f"a submission may not write {path}: only its own folder {workdir}")
        elif event in path_events:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(resolve(arg), workdir):
                    raise PermissionError(f"{event} on {arg} is not allowed in a submission (outside {workdir})")
        elif event in refused_events or event.startswith("os.exec") or event.startswith("os.spawn"):
            raise PermissionError(f"{event} is not allowed in a submission")

    sys.addaudithook(hook)


def _exception_text(exc, path):
    message = str(exc).strip()
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__)
             if os.path.realpath(frame.filename) == path]
    return text + (f" (line {lines[-1]})" if lines else "")


class _Outputs:
    """Encodes what a function returned: arrays into the .npz, everything else into JSON."""

    def __init__(self, np):
        self.np, self.arrays = np, {}

    def encode(self, value, depth=0):
        np = self.np
        if value is None:
            return {"none": True}
        if isinstance(value, np.ndarray):
            key = f"a{len(self.arrays)}"
            self.arrays[key] = value
            return {"array": key, "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return {"scalar": value.item() if np.isfinite(value) else str(value), "dtype": str(value.dtype)}
        if isinstance(value, bool):
            return {"other": "bool"}
        if isinstance(value, (int, float)):
            return {"number": value if value == value and abs(value) != float("inf") else str(value),
                    "type": type(value).__name__}
        if isinstance(value, (tuple, list)) and depth == 0:
            return {type(value).__name__: [self.encode(v, depth + 1) for v in value]}
        return {"other": type(value).__name__}


def _decode(value, arrays, np):
    if isinstance(value, dict):
        if "array" in value:
            return arrays[value["array"]].copy()
        if "none" in value:
            return None
        if "rng" in value:
            return np.random.default_rng(value["rng"])
        if "fastfood" in value:
            prefix = value["fastfood"]
            fields = {k: arrays[f"{prefix}.{k}"].copy() for k in ("B", "G", "scale", "perm", "inverse_perm", "P")
                      if f"{prefix}.{k}" in arrays}
            sizes = {k: int(arrays[f"{prefix}.{k}"]) for k in ("D", "d", "n", "m")}
            return types.SimpleNamespace(**sizes, **fields)
    return value


def _stand_in(kind, np):
    """Correct versions of the functions an item's function may call, so that a bug elsewhere costs nothing here.
    They are plain definitions (a dense matrix product), not the algorithm an item asks for."""
    if kind == "hadamard":
        def fwht(x):
            n = x.shape[-1]
            if n < 1 or n & (n - 1):
                raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length; got {n}")
            H_n = np.ones((1, 1))
            while H_n.shape[0] < n:
                H_n = np.block([[H_n, H_n], [H_n, -H_n]])
            return np.asarray(x, dtype=float) @ H_n
        return fwht
    if kind == "merge":
        return lambda W, A, B, scale: W + scale * (B @ A).T
    if kind == "dense-project":
        return lambda ff, theta_d: ff.P @ theta_d
    if kind == "dense-transpose":
        return lambda ff, g: ff.P.T @ g
    raise ValueError(f"unknown stand-in {kind!r}")


def _numerical_gradient(np, f, args, index, dout):
    """Centred differences of sum(f(args) * dout) (or of the scalar f(args) when dout is None) w.r.t. args[index]."""
    x = args[index].copy()
    flat = x.reshape(-1)
    grad = np.zeros(x.size)
    for i in range(x.size):
        values = []
        for step in (H, -H):
            old = flat[i]
            flat[i] = old + step
            out = f([x.copy() if j == index else a for j, a in enumerate(args)])
            flat[i] = old
            values.append(float(np.sum(np.asarray(out, dtype=np.float64) * dout)) if dout is not None else float(out))
        grad[i] = (values[0] - values[1]) / (2 * H)
    return grad.reshape(x.shape)


def _run_case(case, module, np, arrays, encoder, path):
    decode = lambda v: _decode(v, arrays, np)                             # noqa: E731
    fresh_args = lambda: [decode(a) for a in case["args"]]                # noqa: E731
    fresh_kwargs = lambda: {k: decode(v) for k, v in case.get("kwargs", {}).items()}   # noqa: E731
    result = {"name": case["name"]}
    try:
        if case["kind"] == "call":
            args = fresh_args()
            value = getattr(module, case["function"])(*args, **fresh_kwargs())
            result["returned"] = encoder.encode(value)
            result["args_after"] = [encoder.encode(a) if isinstance(a, np.ndarray) else None for a in args]
        elif case["kind"] == "loss":
            fn = getattr(module, case["function"])
            value = fn(*fresh_args(), **fresh_kwargs())
            result["returned"] = encoder.encode(value)
            loss_of = lambda args: fn(*args, **fresh_kwargs())[0]                  # noqa: E731
            result["numerical"] = [encoder.encode(_numerical_gradient(np, loss_of, fresh_args(), 0, None))]
        else:
            forward, backward = getattr(module, case["forward"]), getattr(module, case["backward"])
            dout = arrays[case["dout"]]
            returned = forward(*fresh_args(), **fresh_kwargs())
            if not isinstance(returned, (tuple, list)) or len(returned) != 2:
                result["returned"] = encoder.encode(returned)
                result["forward_shape"] = "not (out, cache)"
                return result
            out, cache = returned
            result["out"] = encoder.encode(out)
            grads = backward(dout.copy(), cache, **case.get("flags", {}))
            result["returned"] = encoder.encode(grads)
            out_of = lambda args: forward(*args, **fresh_kwargs())[0]              # noqa: E731
            result["numerical"] = {str(i): encoder.encode(_numerical_gradient(np, out_of, fresh_args(), i, dout))
                                   for i in case["wrt"]}
    except BaseException as exc:  # noqa: BLE001 (anything the student's code raises is reported, not obeyed)
        result["raised"] = _exception_text(exc, path)
        result["exception"] = type(exc).__name__
    return result


def main(workdir):
    with open(os.path.join(workdir, "request.json"), encoding="utf-8") as f:
        request = json.load(f)
    _limit(request.get("limits", {}))
    import numpy as np

    with np.load(os.path.join(workdir, "inputs.npz"), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    path = os.path.realpath(request["submission"])
    _install_guard(workdir, request.get("forbidden_dirs", []))
    report = {"cases": []}
    encoder = _Outputs(np)
    try:
        module = types.ModuleType("submission")
        module.__file__ = path
        sys.modules["submission"] = module
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        with np.errstate(all="ignore"):
            exec(code, module.__dict__)
        open(request["loaded_marker"], "w").close()
    except BaseException as exc:  # noqa: BLE001 (a file that fails to load is feedback, not a crash)
        report["load_error"] = _exception_text(exc, path)
        module = None
    if module is not None:
        report["not_own"] = {}
        for name in request["functions"]:
            fn = module.__dict__.get(name)
            code = getattr(fn, "__code__", None)
            if fn is None or not callable(fn):
                report["not_own"][name] = f"no function named {name} in the file"
            elif code is None or os.path.realpath(code.co_filename) != path:
                where = getattr(fn, "__module__", None) or (code.co_filename if code else type(fn).__name__)
                report["not_own"][name] = f"{name} is not defined in your file (it comes from {where})"
        for name, kind in request.get("stand_ins", {}).items():
            module.__dict__[name] = _stand_in(kind, np)
        if not report["not_own"]:
            with np.errstate(all="ignore"):
                for case in request["cases"]:
                    result = _run_case(case, module, np, arrays, encoder, path)
                    report["cases"].append(result)
                    if "raised" in result and not case.get("expect_exception"):
                        break
    np.savez(os.path.join(workdir, "outputs.npz"), **encoder.arrays)
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    sys.stdout.flush()
    os._exit(0)                # no atexit handlers or finalizers of the student's run after the report


if __name__ == "__main__":
    main(sys.argv[1])
