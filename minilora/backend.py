"""Which array module minilora computes with: NumPy (default) or CuPy.

This is the only module that imports CuPy. Everything else asks it for the array module:

    xp = backend.xp()                   # the module arrays are *created* with
    xp = backend.get_array_module(x)    # the module an *existing* array belongs to

Choose the backend with ``use_backend("cupy")`` or the environment variable ``MINILORA_BACKEND=cupy``
(read once, on import). Convert at the boundaries only (files, plots, tests) with ``to_numpy`` / ``asarray``.

Dtype policy: float32 by default (training), float64 for gradient checks. A model picks one dtype at
construction and every array it creates has it; the functional layer preserves the dtype of its inputs.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import numpy

BACKENDS = ("numpy", "cupy")
FLOAT_DTYPES = ("float32", "float64")
DEFAULT_DTYPE = "float32"

_state = {"name": "numpy", "xp": numpy}


def _import_cupy():
    """Import CuPy and make sure a GPU is really there; a clear error otherwise."""
    try:
        import cupy  # the one place in minilora that imports CuPy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        raise ValueError(
            "backend 'cupy' was requested but CuPy cannot be imported "
            f"({type(exc).__name__}: {exc}); install it with `pip install 'minilora[gpu]'` "
            "or use backend 'numpy'"
        ) from exc
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise ValueError(
            f"backend 'cupy' was requested but no CUDA GPU is usable ({type(exc).__name__}: {exc}); "
            "use backend 'numpy'"
        ) from exc
    if n_devices < 1:
        raise ValueError("backend 'cupy' was requested but no CUDA GPU is present; use backend 'numpy'")
    return cupy


def use_backend(name: str) -> None:
    """Select the array module for everything created from now on: "numpy" or "cupy"."""
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, one of {BACKENDS}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _state["xp"] = numpy if key == "numpy" else _import_cupy()
    _state["name"] = key


@contextlib.contextmanager
def backend(name: str):
    """``with backend("cupy"): ...`` selects a backend for the block, then restores the previous one."""
    previous = _state["name"]
    use_backend(name)
    try:
        yield _state["xp"]
    finally:
        use_backend(previous)


def current_backend() -> str:
    """The name of the selected backend: "numpy" or "cupy"."""
    return _state["name"]


def xp():
    """The selected array module (``numpy`` or ``cupy``), for creating new arrays."""
    return _state["xp"]


def get_array_module(*arrays):
    """The module (numpy or cupy) that the given arrays belong to; numpy for host arrays and scalars."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return _state["xp"] if _state["name"] == "cupy" else _import_cupy()
    return numpy


def is_array(x) -> bool:
    """True for a NumPy or CuPy ndarray."""
    return isinstance(x, numpy.ndarray) or type(x).__module__.startswith("cupy")


def to_numpy(x):
    """A host (NumPy) copy or view of ``x``; NumPy arrays pass through unchanged."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return numpy.asarray(x)


def asarray(x, dtype=None):
    """``x`` as an array of the selected backend (copied to the GPU when that backend is CuPy)."""
    return _state["xp"].asarray(x, dtype=dtype)


def resolve_dtype(dtype) -> str:
    """Validate a floating dtype and return its name ("float32" or "float64")."""
    if dtype is None:
        return DEFAULT_DTYPE
    try:
        name = numpy.dtype(dtype).name
    except TypeError as exc:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}; got {dtype!r}") from exc
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}; got {dtype!r}")
    return name


def rng(seed):
    """A seeded random generator of the selected backend (``seed``: int, or an existing generator)."""
    if not isinstance(seed, (int, numpy.integer)) and hasattr(seed, "standard_normal"):
        return seed
    if not isinstance(seed, (int, numpy.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int; got {type(seed).__name__} {seed!r}")
    return _state["xp"].random.default_rng(int(seed))


def generator_state(generator):
    """A snapshot of a random generator's state, to rewind it later with ``set_generator_state``.

    NumPy: the bit generator's state dict. CuPy: a device copy of the generator's cuRAND states (CuPy has no
    public state API; its bit generator keeps one state per GPU thread in the int8 array ``_state``).
    """
    bit_generator = generator.bit_generator
    if isinstance(bit_generator, numpy.random.BitGenerator):
        return bit_generator.state
    return bit_generator._state.copy()


def set_generator_state(generator, state) -> None:
    """Rewind (or advance) ``generator`` to a state taken by ``generator_state`` from a generator of its kind."""
    bit_generator = generator.bit_generator
    if isinstance(bit_generator, numpy.random.BitGenerator):
        bit_generator.state = state
    else:
        bit_generator._state[...] = state


ONE_HOT_LIMIT = 2**24      # on the GPU, scatter_add uses a one-hot matrix of up to this many elements


def scatter_add(target, indices, values) -> None:
    """``target[indices] += values`` with repeated indices accumulated (unbuffered), in place.

    target: (V, ...); indices: (N,) integers in [0, V); values: (N, ...)."""
    module = get_array_module(target)
    if module is numpy:
        # numpy.add.at is correct but slow; sorting the indices and summing each run of equal ones
        # (add.reduceat) gives the same sums about twice as fast
        if len(indices) == 0:
            return
        order = numpy.argsort(indices, kind="stable")
        sorted_indices = indices[order]
        starts = numpy.flatnonzero(numpy.r_[True, sorted_indices[1:] != sorted_indices[:-1]])
        target[sorted_indices[starts]] += numpy.add.reduceat(values[order], starts, axis=0)
    elif len(indices) * target.shape[0] <= ONE_HOT_LIMIT:
        # On the GPU: target += onehot(indices)^T @ values, one matrix product. The usual scatter-add (atomic
        # additions) sums each row's values in whatever order the threads arrive, so the result would change
        # in the last bits from run to run; the product gives the same bits every time.
        onehot = (indices[:, None] == module.arange(target.shape[0])[None, :]).astype(values.dtype)  # (N, V)
        target += (onehot.T @ values.reshape(len(indices), -1)).reshape(target.shape)
    else:                                    # a large table: atomic additions (fast, not bit-reproducible)
        module.add.at(target, indices, values)


_kernels = {}


def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str):
    """One GPU kernel for a per-element formula: a CuPy ``ElementwiseKernel``, made once per name and compiled
    on its first call. Called with arrays (and scalars) it returns the output array(s).

    in_params / out_params: "T g, float64 lr" / "T p, T m" (T: the arrays' dtype); operation: the CUDA C
    statement(s) for one element. Only for code that runs on CuPy arrays: a NumPy caller has no use for it.
    Why: at minilora's sizes a GPU step is bound by kernel launches (each costs microseconds of Python and
    driver work), so a formula of ten array operations costs ten launches where one kernel costs one.
    """
    if name not in _kernels:
        _kernels[name] = _import_cupy().ElementwiseKernel(in_params, out_params, operation, name)
    return _kernels[name]


def synchronize() -> None:
    """Wait for queued GPU work to finish (a no-op on NumPy); use before reading a clock."""
    if _state["name"] == "cupy":
        _state["xp"].cuda.get_current_stream().synchronize()


def tune_host_allocator() -> bool:
    """Let freed large arrays stay in the process's heap for the next ones (glibc on Linux); True if applied.

    A training step creates and frees hundreds of temporaries of several MB. By default glibc gives each
    block above 128 KB its own fresh memory map and returns it to the operating system when freed, so every
    new temporary starts with thousands of page faults (about 0.35 ms per 8 MB array): 14% of the default
    model's step. Raising the map threshold and the trim threshold keeps that memory for reuse (the process
    keeps its peak memory instead of shrinking). Called once on import; ``MINILORA_TUNE_MALLOC=0`` turns it off.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's malloc.h parameter numbers
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):                        # not glibc (musl, ...): leave malloc alone
        return False


HOST_ALLOCATOR_TUNED = os.environ.get("MINILORA_TUNE_MALLOC", "1") != "0" and tune_host_allocator()

_env = os.environ.get("MINILORA_BACKEND")
if _env:
    use_backend(_env)
