"""Benchmarks: run explicitly (python -m pytest benchmarks/... ), never by the README test command.

GPU suites are marked `gpu` and skip without CUDA. CPU suites time the CPU path.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
