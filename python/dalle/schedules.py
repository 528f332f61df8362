"""Schedules: the dVAE's cosine schedules (KL weight ``beta``, Gumbel temperature ``tau``, step size) and the
transformer's plateau-halving step size (``PlateauSchedule``).

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


class WarmupCosineSchedule:
    """The transformer's step size with ``--lr-schedule cosine``: linear warm-up to ``lr`` over ``warmup`` updates,
    then a cosine from ``lr`` to ``lr * end_ratio`` at update ``steps`` (the run's last). A pure function of the
    step: nothing to save, the same interface as ``PlateauSchedule``."""

    def __init__(self, lr, warmup, steps, end_ratio=0.1):
        self.lr, self.warmup, self.steps, self.end_ratio = lr, warmup, steps, end_ratio

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        return cosine(step - self.warmup, self.lr, self.lr * self.end_ratio, max(1, self.steps - self.warmup))

    def observe(self, step: int, loss: float) -> None:
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


class PlateauSchedule:
    """The transformer's step size: linear warm-up to ``lr``, then halved each time the training loss, averaged over
    windows of ``window`` updates, has not improved by ``threshold`` (1%) for ``patience`` windows, at most
    ``max_halvings`` times (the paper's section B.2 halves the step size when the loss plateaus)."""

    def __init__(self, lr, warmup, window, patience, max_halvings=5, threshold=0.01):
        self.lr, self.warmup, self.window, self.patience = lr, warmup, window, patience
        self.max_halvings, self.threshold = max_halvings, threshold
        self.halvings, self.best, self.bad, self.acc, self.n = 0, math.inf, 0, 0.0, 0

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return self.lr * warm * 0.5 ** self.halvings

    def observe(self, step: int, loss: float) -> None:
        if step < self.warmup or not math.isfinite(loss):
            return
        self.acc, self.n = self.acc + loss, self.n + 1
        if self.n < self.window:
            return
        mean, self.acc, self.n = self.acc / self.n, 0.0, 0
        if mean < self.best * (1 - self.threshold):
            self.best, self.bad = mean, 0
            return
        self.bad += 1
        if self.bad >= self.patience and self.halvings < self.max_halvings:
            self.halvings, self.bad = self.halvings + 1, 0

    def state_dict(self):
        return {k: getattr(self, k) for k in ("halvings", "best", "bad", "acc", "n")}

    def load_state_dict(self, s):
        for k, v in s.items():
            setattr(self, k, v)
