"""Glue between torch tensors and the raw-pointer entry points of ``dalle_kernels._C``.

The extension is built without torch (see setup.py), so entry points take data pointers, sizes,
strides, a dtype code (csrc/common.h ``DType``) and the CUDA stream as integers.
"""
from __future__ import annotations

import torch

from ._dispatch import cuda_extension

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3, torch.uint8: 4}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the CUDA backend does not take {t.dtype} tensors") from None


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the integer handle the extension expects (0, the
    emulator's only stream, for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def ext(op: str):
    """The extension module, checked to have ``op`` (a clear error if it was not built); inside
    ``_cuda_emu.emulated`` the emulation extension, whose entry points check every access of the kernels."""
    from . import _cuda_emu

    emu = _cuda_emu.active()
    if emu is not None:
        return emu.module(op)
    return cuda_extension(op)
