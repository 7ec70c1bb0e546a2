"""Shared test setup.

Every test starts on the backend the session started with (``MINILORA_BACKEND``, NumPy by default), whatever
the test before it selected: a test that switches backends cannot move the tests after it to another one.
Tests compare on the host: ``host(a)`` is ``backend.to_numpy``, ``dev(a)`` puts a NumPy array on the backend.
"""
import pytest

from minilora import backend

SESSION_BACKEND = backend.current_backend()


@pytest.fixture(autouse=True)
def _session_backend():
    backend.use_backend(SESSION_BACKEND)
    yield
    backend.use_backend(SESSION_BACKEND)


@pytest.fixture
def on_numpy():
    """For tests of NumPy-side math (they build host arrays): run on NumPy whatever the session's backend."""
    with backend.backend("numpy"):
        yield


def pytest_report_header(config):
    return f"minilora backend: {SESSION_BACKEND}"
