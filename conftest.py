"""Test lanes for tests/ and benchmarks/, one option for both.

CPU lane (default, CI):  pytest tests            -> Triton in its interpreter, small shapes, fp32/fp16
GPU lane:                pytest tests --device=cuda -> compiled Triton and CUDA kernels, bigger shapes, bf16
Slow tests (marked ``slow``, multi-process training runs too long for CI): add --run-slow.

Nothing here touches the GPU at import time: the lane comes from the command line.
"""
import os
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default="cpu", choices=("cpu", "cuda"),
                     help="cpu: Triton interpreter lane, small shapes (default); cuda: GPU lane")
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (multi-process runs too long for CI)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with --device=cuda)")
    # Must happen before triton is imported anywhere (the interpreter is chosen at @triton.jit time).
    if config.getoption("--device") == "cpu":
        if "TRITON_INTERPRET" not in os.environ and "dalle_kernels" in sys.modules:
            # A conftest imported the package (and defined its kernels) before this hook ran.
            raise pytest.UsageError("dalle_kernels was imported before the CPU lane could set TRITON_INTERPRET=1 "
                                    "(a conftest imports it at module level); import it inside fixtures instead")
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--run-slow"):
        slow = pytest.mark.skip(reason="slow: run with --run-slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(slow)
    if config.getoption("--device") == "cuda":
        return
    skip = pytest.mark.skip(reason="GPU lane only (run with --device=cuda on a machine with a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request):
    """'cpu' or 'cuda' (the lane); skips the session's CUDA tests if no GPU is there."""
    dev = request.config.getoption("--device")
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device=cuda but no CUDA device is available")
    return dev
