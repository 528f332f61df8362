"""Helpers the benchmarks share: synchronization, the environment saved with every result, derived figures.

A module of the package rather than of ``benchmarks/`` so that benchmark files import it by name
(``from dalle_kernels._bench import sync``) however pytest sets up ``sys.path``. Nothing here touches a GPU
at import time; every function takes the device string of the lane (``"cpu"`` or ``"cuda"``).
"""
from __future__ import annotations

import platform
from typing import Callable


def sync(device: str) -> None:
    """Synchronize inside a timed function so GPU time is measured, not launch time."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def environment(device: str) -> dict:
    """Device, library versions and build facts to store in a benchmark's ``extra_info``."""
    import torch

    from . import __version__
    from ._dispatch import _load_cuda_extension

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "dalle_kernels": __version__,
            "cuda_extension": _load_cuda_extension()[0] is not None}
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


def peak_memory_mb(step: Callable[[], object], device: str) -> float | None:
    """Run ``step`` once; return the peak memory it allocated above what was allocated before, in MiB.

    CUDA: the caching allocator's counters. CPU: the allocation and free events PyTorch's profiler records
    (``profile_memory=True``), summed in time order: every tensor allocation, including those inside ops.
    """
    import torch

    if device != "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def resident_memory_mb() -> dict:
    """This process's resident memory now and at its peak, in MiB (``VmRSS`` / ``VmHWM`` of /proc/self/status),
    and now split into anonymous memory and mapped files (``RssAnon`` / ``RssFile``: memory-mapped data the
    system can drop). Elsewhere only the peak, from ``resource.getrusage``; the others are ``None``."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        mb = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
        return {"rss_mb": mb["VmRSS"], "peak_rss_mb": mb["VmHWM"], "rss_anon_mb": mb["RssAnon"],
                "rss_file_mb": mb["RssFile"]}
    except (OSError, KeyError, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"rss_mb": None, "peak_rss_mb": peak / (2**20 if sys.platform == "darwin" else 1024),
                "rss_anon_mb": None, "rss_file_mb": None}


def median_seconds(benchmark) -> float | None:
    """Median time of a finished pytest-benchmark run; ``None`` under ``--benchmark-disable`` (no timing)."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return None if inner is None else inner.median


def max_abs_error(got, want) -> float:
    """``max |got - want|`` in float64 (tensors of the same shape, any dtype and device)."""
    return (got.double() - want.double()).abs().max().item()
