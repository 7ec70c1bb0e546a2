"""Helpers that keep tests backend-neutral (the suite also runs with MINILORA_BACKEND=cupy)."""
import pytest

from minilora import backend

host = backend.to_numpy            # any array -> NumPy, for comparisons on the host
dev = backend.asarray              # a NumPy array -> the selected backend (the GPU on CuPy)

numpy_only = pytest.mark.skipif(backend.current_backend() != "numpy",
                                reason="about NumPy itself (host arrays, CPU threads or exact CPU results)")
