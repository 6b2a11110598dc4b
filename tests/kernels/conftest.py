"""Kernel tests run every Triton kernel under the CPU interpreter.

Triton decides between compiling and interpreting when a function is decorated with
``@triton.jit`` -- for its own ``triton.language`` helpers that is when ``triton`` is first
imported -- so ``TRITON_INTERPRET=1`` is set here, before the test modules import ``kernels``.
If something imported ``triton`` earlier in the session, that cannot be undone: the Triton tests
then error out with an explicit message instead of a confusing interpreter failure (run
``python -m pytest tests/kernels`` on its own, or set ``TRITON_INTERPRET=1`` in the environment).
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"

# Make ``import kernels`` resolve to the package even under plain ``pytest`` (where only the
# test directories are put on sys.path and ``tests/kernels`` would shadow it as a namespace).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path[:1]:
    sys.path.insert(0, _ROOT)


def _interpreter_ready() -> bool:
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # no triton: the Triton tests skip themselves via importorskip
        return True
    return isinstance(standard.max, InterpretedFunction)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "triton" in item.name and not _interpreter_ready():
        pytest.fail(
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
            "run the kernel tests in their own session or export TRITON_INTERPRET=1",
            pytrace=False,
        )
