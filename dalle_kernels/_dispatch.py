"""The one place where ``backend="auto"`` is resolved.

Nothing here runs at import time: the choice is made per call from the tensor's device,
the ``TRITON_INTERPRET`` environment variable and whether the optional CUDA extension was built.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _load_cuda_extension():
    try:
        return importlib.import_module("dalle_kernels._C"), None
    except ImportError as exc:  # not built, or built for another Python
        return None, exc


CUDA_BUILD_HINT = (
    "The CUDA extension dalle_kernels._C is not built. Build it with a CUDA toolkit (nvcc) on the PATH: "
    "`DALLE_KERNELS_CUDA=1 pip install --no-build-isolation -e .` (architectures via "
    "DALLE_KERNELS_CUDA_ARCHS, default '80;90')."
)


def cuda_extension(op: str | None = None):
    """Return the compiled extension module, or raise a RuntimeError that says how to build it."""
    mod, exc = _load_cuda_extension()
    if mod is None:
        raise RuntimeError(f"{CUDA_BUILD_HINT} (import failed: {exc})")
    if op is not None and not hasattr(mod, op):
        raise RuntimeError(f"The built CUDA extension has no '{op}' entry point; rebuild it. {CUDA_BUILD_HINT}")
    return mod


def cuda_extension_has(op: str) -> bool:
    mod, _ = _load_cuda_extension()
    return mod is not None and hasattr(mod, op)


def resolve_backend(backend: str, tensor: torch.Tensor, *, cuda_op: str | None = None,
                    prefer_cuda: bool = True, cpu_path: bool = False, arg: str = "backend") -> str:
    """Resolve ``backend`` for an op whose inputs live where ``tensor`` lives.

    ``cuda_op`` names the op's entry point in the CUDA extension (None: the op has no CUDA version).
    ``auto`` picks, for CUDA tensors, the CUDA extension when it is built and ``prefer_cuda``,
    else Triton; for CPU tensors Triton when the interpreter is on, else the op's own CPU path when it has
    one (``cpu_path``), else the PyTorch reference.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {backend!r}")
    on_cuda = tensor.device.type == "cuda"
    if backend == "auto":
        if on_cuda:
            if cuda_op is not None and prefer_cuda and cuda_extension_has(cuda_op):
                return "cuda"
            if triton_available():
                return "triton"
            if cuda_op is not None and cuda_extension_has(cuda_op):
                return "cuda"
            return "torch"
        if triton_interpreter_enabled() and triton_available():
            return "triton"
        return "cpu" if cpu_path else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not on_cuda and not triton_interpreter_enabled():
            raise ValueError(
                f"backend='triton' got tensors on {tensor.device}: Triton kernels need CUDA tensors, or "
                "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU interpreter")
        return "triton"
    if backend == "cpu":
        if not cpu_path:
            raise ValueError(f"{arg}='cpu' is not available for this op; use 'triton', 'torch' or 'auto'")
        if on_cuda:
            raise ValueError(f"{arg}='cpu' got tensors on {tensor.device}; move them to the CPU")
        return "cpu"
    if backend == "cuda":
        if cuda_op is None:
            raise ValueError(f"{arg}='cuda' is not available for this op; use 'triton', 'torch' or 'auto'")
        if not on_cuda:
            raise ValueError(f"{arg}='cuda' got tensors on {tensor.device}; move them to a CUDA device")
        cuda_extension(cuda_op)
        return "cuda"
    return "torch"
