"""Shared fixtures; `gpu`/`trt` tests skip (never fake) when the hardware or package is missing."""

from __future__ import annotations

import importlib.util

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    has_cuda = _has_cuda()
    has_trt = has_cuda and importlib.util.find_spec("tensorrt") is not None
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    skip_trt = pytest.mark.skip(reason="needs TensorRT and a CUDA GPU (tensorrt not importable or no GPU)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture
def rng():
    """A fresh, unseeded generator: correctness tests must hold on any random input."""
    import numpy as np

    return np.random.default_rng()


@pytest.fixture
def torch_gen():
    """A fresh torch generator with a random seed (printed on failure via the fixture value)."""
    import torch

    g = torch.Generator()
    g.seed()
    return g


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test: small models only pay overhead for more, and the suite shares
    2 cores with other jobs (the OpenMP pool spins against them)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
