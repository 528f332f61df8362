"""One rule for every reader of a file that may come from anyone: a size, shape, stride, offset or dtype read
from a file is checked against what the file holds (or what the model its config describes holds) before
anything is allocated or read for it, and a file that does not add up is refused in one line naming the file
and the field.

- ``check_count``: a count or byte size the file states must be a non-negative int no larger than what the file
  has left (``ValueError`` "FILE: FIELD is N UNIT but the file holds only M").
- ``check_view``: a tensor rebuilt from a storage (shape, stride, offset) must lie inside that storage.
- ``expected_state`` / ``check_state_dict``: weights read from a file against the model a config describes,
  built on the meta device (shapes and dtypes only, nothing allocated): names, shapes and dtypes must match before
  the model is built for real ("config and weights disagree").
"""
from __future__ import annotations

import math
import numbers

import torch


def _at(where) -> str:
    return "" if where is None else f"{where}: "


def _is_count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


def check_count(where, field: str, value, available: int, unit: str = "bytes",
                room: str = "the file holds only") -> int:
    """``value`` as an int if it is a non-negative int no larger than ``available`` (what the file holds), else
    ``ValueError`` naming ``where`` (the file; None: the caller names it) and ``field``."""
    if not _is_count(value):
        raise ValueError(f"{_at(where)}{field} is {value!r:.60}, expected a non-negative int")
    if value > available:
        raise ValueError(f"{_at(where)}{field} is {value} {unit} but {room} {available}")
    return int(value)


def check_view(where, field: str, shape, stride, offset, storage_numel: int) -> None:
    """``ValueError`` naming ``where`` and ``field`` unless a tensor of ``shape`` / ``stride`` at element
    ``offset`` lies inside a storage of ``storage_numel`` elements (ints >= 0 everywhere; the storage is never
    grown to fit a view, whose extra elements would be uninitialised memory)."""
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(_is_count(s) for s in shape):
        raise ValueError(f"{_at(where)}{field} has shape {shape!r:.80}, expected non-negative ints")
    if not isinstance(stride, (tuple, list)) or len(stride) != len(shape) or not all(_is_count(s) for s in stride):
        raise ValueError(f"{_at(where)}{field} has stride {stride!r:.80} for shape {tuple(shape)}, expected "
                         f"{len(shape)} non-negative ints")
    if not _is_count(offset):
        raise ValueError(f"{_at(where)}{field} has storage offset {offset!r:.60}, expected a non-negative int")
    if math.prod(shape) == 0:
        if offset > storage_numel:
            raise ValueError(f"{_at(where)}{field} starts at element {offset} of a storage of {storage_numel}")
        return
    end = offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
    if end > storage_numel:
        raise ValueError(f"{_at(where)}{field} of shape {tuple(shape)}, stride {tuple(stride)} at offset {offset} "
                         f"needs {end} elements but its storage holds {storage_numel}")


def expected_state(build) -> dict[str, tuple[tuple, torch.dtype]]:
    """``{name: (shape, dtype)}`` of the state dict of the model ``build()`` returns, built on the meta device:
    nothing is allocated, whatever sizes the config asks for."""
    with torch.device("meta"):
        model = build()
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_state_dict(where, expected: dict, state_dict: dict, what: str = "config") -> None:
    """``ValueError`` "WHERE: the CONFIG and the weights disagree: ..." naming the first tensor whose name, shape
    or dtype differs from ``expected`` (``expected_state``). A floating-point tensor must be stored as a floating
    point one (any width: it is converted on loading), any other exactly in its dtype; integer weights where floats
    belong are refused, not converted."""
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        parts = ([f"{len(missing)} tensors missing (first {missing[0]!r})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected (first {unexpected[0]!r})"] if unexpected else [])
        raise ValueError(f"{where}: the {what} and the weights disagree: {', '.join(parts)}")
    for name, (shape, dtype) in expected.items():
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{where}: the {what} and the weights disagree: {name} has shape {tuple(t.shape)}, "
                             f"the {what} describes {tuple(shape)}")
        ok = t.is_floating_point() if dtype.is_floating_point else t.dtype == dtype
        if not ok:
            raise ValueError(f"{where}: {name} is {t.dtype}, expected "
                             f"{'a floating-point dtype' if dtype.is_floating_point else dtype}")
