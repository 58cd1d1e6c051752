"""tests/data run their many small tensor ops on one intra-op thread: on a shared 2-core machine
OpenMP threads contending with other processes made them 10-20x slower (measured)."""

import pytest


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_thread):  # tests/conftest.py
    yield
