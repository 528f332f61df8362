"""The one place where ``backend="auto"`` is resolved.

Nothing here runs at import time: the choice is made per call from the tensor's device and dtype,
the ``TRITON_INTERPRET`` environment variable and whether the optional CUDA extension was built.
Paths the package knows to compute wrong values for some inputs are listed here too
(``known_wrong``), so that ``auto`` never picks one and an explicit request for one is refused.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "cuda_emu")


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


def _require(load, what: str, hint: str, op: str | None):
    """The module ``load()`` imports (with entry point ``op``), or a RuntimeError that says how to build it."""
    mod, exc = load()
    if mod is None:
        raise RuntimeError(f"{hint} (import failed: {exc})")
    if op is not None and not hasattr(mod, op):
        raise RuntimeError(f"The built {what} has no '{op}' entry point; rebuild it. {hint}")
    return mod


def cuda_extension(op: str | None = None):
    """Return the compiled extension module, or raise a RuntimeError that says how to build it."""
    return _require(_load_cuda_extension, "CUDA extension", CUDA_BUILD_HINT, op)


def cuda_extension_has(op: str) -> bool:
    mod, _ = _load_cuda_extension()
    return mod is not None and hasattr(mod, op)


# Operand dtypes on which the Triton interpreter's ``tl.dot`` returns wrong values (Triton 3.9: bfloat16
# products come out as large as 1e9 where the exact values are below 10). Compiled Triton on a GPU is right.
INTERPRETER_WRONG_DOT_DTYPES = (torch.bfloat16,)


def known_wrong(backend: str, tensor: torch.Tensor, *, triton_dot: bool = False) -> str | None:
    """Why ``backend`` is known to compute wrong values for inputs like ``tensor``, or None.

    ``triton_dot``: the op's Triton kernels call ``tl.dot`` on operands of ``tensor``'s dtype. Every known
    case is listed here, and ``resolve_backend`` consults only this function.
    """
    if (backend == "triton" and triton_dot and tensor.device.type != "cuda"
            and tensor.dtype in INTERPRETER_WRONG_DOT_DTYPES):
        return (f"the Triton interpreter (TRITON_INTERPRET=1, the only way Triton runs on {tensor.device} "
                f"tensors) computes tl.dot on {tensor.dtype} operands wrongly (Triton 3.9)")
    return None


@functools.lru_cache(maxsize=None)
def _load_emu_extension():
    try:
        return importlib.import_module("dalle_kernels._C_emu"), None
    except ImportError as exc:
        return None, exc


EMU_BUILD_HINT = (
    "The CUDA emulation extension dalle_kernels._C_emu is not built. Build it with the CUDA toolkit's headers "
    "(no GPU needed): `DALLE_KERNELS_CUDA_EMU=1 python setup.py build_ext --inplace`."
)


def emu_extension(op: str | None = None):
    """The emulation extension (the CUDA kernels compiled for the CPU), or a RuntimeError saying how to build it."""
    return _require(_load_emu_extension, "emulation extension", EMU_BUILD_HINT, op)


def emu_extension_has(op: str) -> bool:
    mod, _ = _load_emu_extension()
    return mod is not None and hasattr(mod, op)


def resolve_backend(backend: str, tensor: torch.Tensor, *, cuda_op: str | None = None,
                    prefer_cuda: bool = True, cpu_path: bool = False, arg: str = "backend",
                    triton_dot: bool = False) -> str:
    """Resolve ``backend`` for an op whose inputs live where ``tensor`` lives and have its dtype.

    ``cuda_op`` names the op's entry point in the CUDA extension (None: the op has no CUDA version).
    ``cpu_path``: the op has its own CPU implementation (backend ``"cpu"``). ``triton_dot``: the op's Triton
    kernels call ``tl.dot`` on operands of ``tensor``'s dtype (see ``known_wrong``). ``auto`` picks, for CUDA
    tensors, the CUDA extension when it is built and ``prefer_cuda``, else Triton; for CPU tensors Triton when
    the interpreter is on, else the op's CPU path when it has one, else the PyTorch reference; and never a path
    ``known_wrong`` names for these inputs (the CPU path or the reference instead).
    Raises ValueError for an unknown ``backend``, for a backend that cannot run on ``tensor``'s device and for
    one ``known_wrong`` names (the message says which backend to use instead); RuntimeError when an explicit
    backend needs a missing package or the unbuilt CUDA extension.
    ``cuda_emu`` (never picked by ``auto``) runs the CUDA kernel source on CPU tensors in the emulator.
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
        if (triton_interpreter_enabled() and triton_available()
                and known_wrong("triton", tensor, triton_dot=triton_dot) is None):
            return "triton"
        return "cpu" if cpu_path else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not on_cuda and not triton_interpreter_enabled():
            raise ValueError(
                f"backend='triton' got tensors on {tensor.device}: Triton kernels need CUDA tensors, or "
                "TRITON_INTERPRET=1 set before triton is imported to run them on the CPU interpreter")
        reason = known_wrong("triton", tensor, triton_dot=triton_dot)
        if reason is not None:
            instead = "cpu" if cpu_path else "torch"
            raise ValueError(f"{arg}='triton' cannot compute this op correctly for {tensor.dtype} tensors on "
                             f"{tensor.device}: {reason}. Use {arg}='{instead}' (what {arg}='auto' picks here), "
                             "float32/float16 inputs, or CUDA tensors")
        return "triton"
    if backend == "cpu":
        if not cpu_path:
            raise ValueError(f"{arg}='cpu' is not available for this op; use 'triton', 'torch' or 'auto'")
        if on_cuda:
            raise ValueError(f"{arg}='cpu' got tensors on {tensor.device}; move them to the CPU")
        return "cpu"
    if backend == "cuda":
        if cuda_op is None:
            others = "'triton', 'cpu', 'torch' or 'auto'" if cpu_path else "'triton', 'torch' or 'auto'"
            raise ValueError(f"{arg}='cuda' is not available for this op; use {others}")
        if not on_cuda:
            raise ValueError(f"{arg}='cuda' got tensors on {tensor.device}; move them to a CUDA device")
        cuda_extension(cuda_op)
        return "cuda"
    if backend == "cuda_emu":
        if cuda_op is None:
            raise ValueError(f"{arg}='cuda_emu' is not available for this op (it has no CUDA kernel)")
        if tensor.device.type != "cpu":
            raise ValueError(f"{arg}='cuda_emu' runs the CUDA kernels on CPU tensors, got tensors on {tensor.device}")
        emu_extension(cuda_op)
        return "cuda_emu"
    return "torch"
