"""Two test lanes, one set of files.

CPU lane (default, CI):   pytest tests            -> Triton runs in its interpreter, small shapes, fp32/fp16
GPU lane:                 pytest tests --device=cuda -> compiled Triton and CUDA kernels, bigger shapes, bf16 too

Nothing here touches the GPU at import time: the lane comes from the command line.
"""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--device", action="store", default="cpu", choices=("cpu", "cuda"),
                     help="cpu: Triton interpreter lane (default); cuda: GPU lane")


def pytest_configure(config):
    # Must happen before triton is imported anywhere (the interpreter is chosen at @triton.jit time).
    if config.getoption("--device") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--device")
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device=cuda but no CUDA device is available")
    return dev


@pytest.fixture
def cuda_only(device):
    """Skip a test outside the GPU lane."""
    if device != "cuda":
        pytest.skip("GPU lane only (run with --device=cuda on a machine with a GPU)")
    return device


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cuda":
        return
    skip = pytest.mark.skip(reason="GPU lane only (run with --device=cuda on a machine with a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
