"""The epoch sampler both trainers draw their batches from: a pure function of the step, so a run resumed
mid-epoch draws exactly what an uninterrupted one would, on any number of processes."""
from __future__ import annotations

import torch


class EpochSampler:
    """Sample positions ``[step * batch_size, (step + 1) * batch_size)`` of an endless sequence of epochs, each a
    permutation of the ``n`` samples drawn from a generator seeded by ``seed * stride + epoch`` (each trainer
    keeps its own ``stride``, so its batches do not depend on the other's).

    Raises ``ValueError`` for an empty dataset or a batch size below 1."""

    def __init__(self, n: int, batch_size: int, seed: int, stride: int):
        if n < 1 or batch_size < 1:
            raise ValueError(f"an epoch sampler needs n >= 1 samples and batch_size >= 1, got {n} and {batch_size}")
        self.n, self.batch_size, self.seed, self.stride = n, batch_size, seed, stride
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the samples in ``epoch`` (the last two epochs asked for are kept)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            g = torch.Generator().manual_seed(self.seed * self.stride + epoch)
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def positions(self, step: int) -> list[tuple[int, int]]:
        """``(global position, sample index)`` of each sample of the global batch at ``step``."""
        out = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(g, self.n)
            out.append((g, int(self.permutation(epoch)[offset])))
        return out

    def indices(self, step: int) -> torch.Tensor:
        """The sample indices of the global batch at ``step`` (int64)."""
        return torch.tensor([i for _, i in self.positions(step)], dtype=torch.long)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The transformer's global batch at ``step`` (``EpochSampler`` with its stride, 100003)."""
    return EpochSampler(n, batch_size, seed, TRANSFORMER_STRIDE).indices(step)


TRANSFORMER_STRIDE = 100003
DVAE_STRIDE = 1_000_003
