"""``backend="cuda_emu"``: the CUDA kernels of ``csrc/`` run on CPU tensors through ``dalle_kernels._C_emu``.

The host launchers of the CUDA backend (``_cuda_forward`` and friends) run unchanged inside ``emulated``: the
entry points they call come from the emulation extension, and each call is checked. The kernels may touch only
the tensors passed to the entry point (global memory outside them is a memcheck error; a write to a tensor the
launcher received as an input is one too; such an access is not carried out), shared memory races, accesses to
the bytes of a ``cp.async`` in flight and two blocks of one launch touching the same global byte (one writing, not
both atomically) are racecheck errors, and warp collectives that can never complete are deadlock errors; any of
these raises ``CudaEmuError`` after the call with the emulator's reports, which name the kernel, block, threads,
address and source lines. ``schedule`` varies what a GPU leaves unordered: the order of blocks and when
``cp.async`` copies land.
Tensors the launcher allocates with ``torch.empty*`` are filled with 0xff bytes (NaN) first, as memory a GPU
kernel must write before anything reads it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._dispatch import emu_extension

_ALLOCATIONS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided}
_local = threading.local()


class CudaEmuError(RuntimeError):
    """A kernel run in the CUDA emulator touched memory it must not, raced on shared memory or deadlocked."""


def extent(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past the last element ``t`` can address (its strides are >= 0)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


class _Session(TorchDispatchMode):
    """Tensors the kernels may use: the launcher's arguments (named, read-only unless listed as written) and every
    tensor created while it runs (outputs, workspaces, contiguous copies)."""

    def __init__(self, named: dict, writable: tuple):
        super().__init__()
        self.tensors = [(t, name in writable, name) for name, t in named.items()]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                if func.overloadpacket in _ALLOCATIONS and t.numel() > 0:
                    t.untyped_storage().fill_(255)  # uninitialized, as GPU memory is: NaN until written
                desc = f"a {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} tensor made by the launcher"
                self.tensors.append((t, True, desc))
        return out

    def module(self, op: str):
        return _CheckedModule(emu_extension(op), self)

    def ranges(self, pointers: set) -> list:
        seen, out = set(), []
        for t, writable, name in self.tensors:
            ptr = t.data_ptr()
            if ptr in pointers and (ptr, name) not in seen and extent(t) > 0:
                seen.add((ptr, name))
                out.append((ptr, extent(t), writable, name))
        return out


class _CheckedModule:
    """The emulation extension, each entry point wrapped in emu_begin/emu_end with the memory it may touch."""

    def __init__(self, mod, session: _Session):
        self._mod, self._session = mod, session

    def __getattr__(self, name):
        fn = getattr(self._mod, name)

        def call(*args, **kwargs):
            pointers = {a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)}
            self._mod.emu_begin(self._session.ranges(pointers))
            try:
                result = fn(*args, **kwargs)
            finally:
                reports = self._mod.emu_end()
            if reports:
                raise CudaEmuError(f"{name}: the CUDA emulator found:\n  " + "\n  ".join(reports))
            return result

        return call


@contextlib.contextmanager
def schedule(block_order: str = "forward", seed: int = 0, cp_async: str = "late"):
    """Run the emulator's launches inside this block under another schedule, then restore the previous one.

    ``block_order``: ``"forward"`` (x fastest, the default), ``"reverse"`` or ``"shuffle"`` (a permutation drawn
    from ``seed`` and the launch count): a kernel whose result depends on the order of its blocks gives another
    result. ``cp_async``: ``"late"`` (a copy lands at the ``cp.async.wait_group`` that covers it, the default) or
    ``"early"`` (at issue): a kernel that reads a copy's bytes before waiting sees the data early, the 0xff fill
    late (and is reported either way).
    """
    mod = emu_extension()
    previous = mod.emu_schedule()
    mod.emu_set_schedule(block_order, seed, cp_async)
    try:
        yield
    finally:
        mod.emu_set_schedule(*previous)


def active():
    """The session of the ``emulated`` call running on this thread, or None."""
    return getattr(_local, "session", None)


def emulated(launcher, writable: tuple = ()):
    """Wrap a CUDA-backend host launcher so that it runs its kernels in the emulator on CPU tensors.

    The launcher's tensor arguments are the kernels' inputs, read-only except those named in ``writable``.
    """
    signature = inspect.signature(launcher)

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        named = {k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
        session = _Session(named, writable)
        previous = active()
        _local.session = session
        try:
            with session:
                return launcher(*args, **kwargs)
        finally:
            _local.session = previous

    return run
