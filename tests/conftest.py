"""Test set-up shared by the whole suite.

Triton kernels are tested without a GPU through Triton's interpreter: TRITON_INTERPRET=1 must be
in the environment before any kernel module is imported (triton.jit reads it at decoration time),
so it is set here, first, and only when CUDA is absent (a GPU machine runs the real kernels).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_default_backend(monkeypatch):
    """Each test starts from a known seed and FASTACL_BACKEND=auto unless it says otherwise."""
    monkeypatch.delenv("FASTACL_BACKEND", raising=False)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): tiny tensors run as fast on one, and
    on a shared 2-core machine two OpenMP threads can spin-wait on each other (measured here:
    2 s with one thread, 35 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the suite's tolerance measure)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference
