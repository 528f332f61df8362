"""Shared benchmark plumbing: device choice, environment recorded with every result.

CPU (default): small sizes, PyTorch paths (the Triton interpreter is not a speed figure).
GPU: ``pytest benchmarks --device=cuda`` at the paper shapes. Save with ``--benchmark-json=FILE``.
"""
import platform

import pytest


@pytest.fixture(scope="session")
def bench_device(device):
    """The lane's device ('cpu' or 'cuda'), from the root conftest's --device option."""
    return device


def environment(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = platform.processor() or "cpu"
        info["threads"] = torch.get_num_threads()
    return info


@pytest.fixture
def record_env(benchmark, bench_device):
    """Put device and versions into the benchmark's extra_info; returns the dict for more fields."""
    benchmark.extra_info.update(environment(bench_device))
    return benchmark.extra_info


def sync(device: str) -> None:
    """Synchronize inside a timed function so GPU time is measured, not launch time."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
