"""Which array module minilora computes with: NumPy (default) or CuPy.

This is the only module that imports CuPy. Everything else asks it for the array module:

    xp = backend.xp()                   # the module arrays are *created* with
    xp = backend.get_array_module(x)    # the module an *existing* array belongs to

Choose the backend with ``use_backend("cupy")`` or the environment variable ``MINILORA_BACKEND=cupy``
(read once, on import). Convert at the boundaries only (files, plots, tests) with ``to_numpy`` / ``asarray``.

Dtype policy: float32 by default (training), float64 for gradient checks. A model picks one dtype at
construction and every array it creates has it; the functional layer preserves the dtype of its inputs.

The same place says which implementation of the math runs: the reference core (``minilora.core``, written
to be read) or the fast path (``minilora.fast``, the same functions made faster and tested equal):
``use_fast(False)`` or ``MINILORA_FAST=0`` for the reference; ``Pairs`` looks up the one in use.
"""
from __future__ import annotations

import contextlib
import os
import weakref

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


def synchronize() -> None:
    """Wait for queued GPU work to finish (a no-op on NumPy); use before reading a clock."""
    if _state["name"] == "cupy":
        _state["xp"].cuda.get_current_stream().synchronize()


# ----------------------------------------------------------------------------------------------------
# the reference core and the fast path

_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}


def _flag(value, name) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    raise ValueError(f"{name} must be one of {sorted(_FLAG_WORDS)} (or a bool); got {value!r}")


class use_fast:
    """Run on the fast path (``use_fast(True)``, the default) or on the reference core (``use_fast(False)``).

    As a call it switches from now on; as a context manager, ``with use_fast(False): ...``, it switches for
    the block and then restores the previous choice. The environment variable ``MINILORA_FAST=0`` starts a
    process on the reference core. Both paths compute the same numbers (up to float rounding: the tests
    hold every fast pair to its reference pair); the reference is the one to read.
    """

    def __init__(self, enabled: bool = True):
        self.previous = _state["fast"]
        _switch_fast(_flag(enabled, "use_fast's argument"))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        _switch_fast(self.previous)


def _switch_fast(enabled: bool) -> None:
    if enabled != _state["fast"]:
        _state["fast"] = enabled
        for pairs in _all_pairs:
            pairs.forget()


def fast_enabled() -> bool:
    """Whether the fast path is in use (True unless switched off with use_fast(False) or MINILORA_FAST=0)."""
    if _state["fast"] is None:                 # MINILORA_FAST held no flag: said on first use, not at import
        _flag(os.environ.get("MINILORA_FAST"), "the environment variable MINILORA_FAST")
    return _state["fast"]


_fast_versions = {}      # (reference module name, function name) -> the fast path's function


def register_fast(reference_module, functions: dict) -> None:
    """Declare ``functions`` ({name: function}) the fast versions of the same-named functions of
    ``reference_module``. Each must exist there with the same parameters; ``minilora.fast`` calls this."""
    import inspect

    for name, function in functions.items():
        reference = getattr(reference_module, name, None)
        if reference is None:
            raise ValueError(f"{reference_module.__name__} has no {name} for a fast version to replace")
        if inspect.signature(reference).parameters.keys() != inspect.signature(function).parameters.keys():
            raise ValueError(f"the fast {name} takes {inspect.signature(function)}; the reference takes "
                             f"{inspect.signature(reference)}")
        _fast_versions[(reference_module.__name__, name)] = function
    for pairs in _all_pairs:
        pairs.forget()


class Pairs:
    """The functions of a reference module, each replaced by its fast version while the fast path is on.

    ``F = Pairs(functional)`` then ``F.linear_forward(...)`` calls ``functional.linear_forward`` on the
    reference core, and the registered fast version (``minilora.fast``) otherwise. A fast version is looked up
    once and then kept as an attribute (a layer calls its pairs many times a step; switching paths forgets
    them); a reference function is looked up on every call, so replacing it in its module (a planted bug in a
    notebook, a test's monkeypatch) takes effect at once."""

    def __init__(self, reference_module):
        self.reference = reference_module
        _all_pairs.add(self)

    def __getattr__(self, name):
        function = _fast_versions.get((self.reference.__name__, name)) if fast_enabled() else None
        if function is None:
            return getattr(self.reference, name)
        setattr(self, name, function)
        return function

    def forget(self) -> None:
        """Drop the functions looked up so far (the path in use changed)."""
        for name in [n for n in vars(self) if n != "reference"]:
            delattr(self, name)


_all_pairs = weakref.WeakSet()   # every live Pairs, to forget their lookups when the path changes

try:
    _state["fast"] = _flag(os.environ.get("MINILORA_FAST", "1"), "the environment variable MINILORA_FAST")
except ValueError:
    _state["fast"] = None       # fast_enabled() raises the error where a caller can report it



class _RefusedBackend:
    """Stands in for the array module when MINILORA_BACKEND names no usable backend. Importing minilora still
    works (so the ``minilora`` command can say what is wrong in one line, without a traceback); the first use of
    the backend (``xp().zeros``, ``asarray``, ``rng``, a model's arrays) raises the ValueError that says why,
    naming the variable and the backends there are. ``use_backend`` replaces it."""

    def __init__(self, message: str):
        self.message = message

    def __getattr__(self, name):
        raise ValueError(self.message)


def _backend_from_environment() -> None:
    """Select the backend the environment variable MINILORA_BACKEND names (read once, on import; unset or empty:
    NumPy). A value that names no usable backend is not raised here, where it would make ``import minilora``
    itself fail: it is said on first use, as MINILORA_FAST's is."""
    name = os.environ.get("MINILORA_BACKEND")
    if not name:
        return
    try:
        use_backend(name)
    except ValueError as exc:
        _state["xp"] = _RefusedBackend(f"the environment variable MINILORA_BACKEND={name!r} names no usable "
                                       f"backend: {exc}")
        _state["name"] = name


_backend_from_environment()
