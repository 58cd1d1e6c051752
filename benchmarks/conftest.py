"""Benchmarks: run explicitly (python -m pytest benchmarks/...), never by the README test command.

GPU suites are marked `gpu` and skip without CUDA (the same rule as the test suite's); CPU suites
time the CPU path.
"""

from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (the gpu skip rule)
