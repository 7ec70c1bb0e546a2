"""Shared test setup.

Every test starts on the backend the session started with (``MINILORA_BACKEND``, NumPy by default) and on
the path it started with (``MINILORA_FAST``: the fast path by default, the reference core with 0), whatever
the test before it selected: a test that switches either cannot move the tests after it.
Tests compare on the host: ``host(a)`` is ``backend.to_numpy``, ``dev(a)`` puts a NumPy array on the backend.
"""
import pytest

from minilora import backend

SESSION_BACKEND = backend.current_backend()


SESSION_FAST = backend.fast_enabled()


@pytest.fixture(autouse=True)
def _session_backend():
    backend.use_backend(SESSION_BACKEND)
    backend.use_fast(SESSION_FAST)
    yield
    backend.use_backend(SESSION_BACKEND)
    backend.use_fast(SESSION_FAST)


@pytest.fixture
def on_numpy():
    """For tests of NumPy-side math (they build host arrays): run on NumPy whatever the session's backend."""
    with backend.backend("numpy"):
        yield


def pytest_report_header(config):
    return f"minilora backend: {SESSION_BACKEND}, {'fast path' if SESSION_FAST else 'reference core'}"


# CI installs the reference packages (torch, transformers, peft), so there a reference test that skips means a
# check that silently did not run: with MINILORA_REQUIRE_REFERENCE=1 such a skip fails the session.
_REFERENCE_WORDS = ("torch", "transformers", "peft", "reference")
_reference_skips = []


def _note_reference_skip(report):
    if report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(word in reason for word in _REFERENCE_WORDS):
            _reference_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    _note_reference_skip(report)


def pytest_runtest_logreport(report):
    _note_reference_skip(report)


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1" and _reference_skips:
        print("\nreference tests skipped although MINILORA_REQUIRE_REFERENCE=1:\n  " + "\n  ".join(_reference_skips))
        session.exitstatus = 1
