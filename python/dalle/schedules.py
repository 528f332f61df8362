"""Cosine schedules of the dVAE (SPEC.md section 3): KL weight ``beta``, Gumbel temperature ``tau``, step size.

A schedule goes from ``start`` to ``end`` over ``steps`` updates along half a cosine and stays at ``end``
afterwards: ``end + (start - end) * (1 + cos(pi * min(step, steps) / steps)) / 2``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """Value at ``step`` (0-based) of a cosine from ``start`` (step 0) to ``end`` (step >= ``steps``)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0 <= step < math.inf:
        raise ValueError(f"step must be a finite number >= 0, got {step!r}")
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if steps == 0 or step >= steps:
        return float(end)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / steps)))


@dataclass(frozen=True)
class CosineSchedule:
    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        return cosine(step, self.start, self.end, self.steps)


# The paper's dVAE schedules (64 GPUs, batch 512).
PAPER_BETA = CosineSchedule(0.0, 6.6, 5000)
PAPER_TAU = CosineSchedule(1.0, 1.0 / 16, 150_000)
PAPER_LR = CosineSchedule(1e-4, 1.25e-6, 1_200_000)
