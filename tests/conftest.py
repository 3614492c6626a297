"""Shared pytest options: ``--device`` and ``--dtype`` let the same suite run on a GPU node."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for kernel tests (cpu, cuda)")
    parser.addoption("--dtype", default="float64", choices=["float32", "float64"],
                     help="dtype for tests that do not pin their own")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device").startswith("cuda") and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs --device cuda and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: small kernels lose more to thread hand-offs than they gain
    on a shared 2-core machine (a small training run: ~2 s on one thread, ~25 s on two
    contended ones, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
