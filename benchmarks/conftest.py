"""Benchmark fixtures: the lane's device and the environment recorded with every result.

CPU (default): small sizes, PyTorch paths (the Triton interpreter is not a speed figure).
GPU: ``pytest benchmarks --device=cuda`` at the paper shapes. Save with ``--benchmark-json=FILE``.
The helpers the benchmark files call (``sync``, ``peak_memory_mb``, ...) live in ``dalle_kernels._bench``;
the ``--device`` option is the root conftest's.

Import nothing from dalle_kernels (or triton) at module level: pytest loads this file before the root
conftest's ``pytest_configure`` sets ``TRITON_INTERPRET=1`` for the CPU lane, and Triton picks the interpreter
when a kernel is defined, so an early import would leave the CPU tests without it.
"""
import pytest


@pytest.fixture(scope="session")
def bench_device(device):
    """The lane's device ('cpu' or 'cuda'), from the root conftest's --device option."""
    return device


@pytest.fixture
def record_env(benchmark, bench_device):
    """Put device and versions into the benchmark's extra_info; returns the dict for more fields."""
    from dalle_kernels._bench import environment

    benchmark.extra_info.update(environment(bench_device))
    return benchmark.extra_info
