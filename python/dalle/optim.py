"""AdamW for 16-bit parameter storage: stochastic rounding of the update (paper section 2.4).

The paper stores most parameters and their Adam moments in 16 bits. Rounding each updated value to the nearest
16-bit number loses every update smaller than half the spacing of the 16-bit numbers around the value (for bf16,
``2^-9`` of it: a weight of 0.02 ignores any step below about 4e-5, and AdamW's steps at a step size of 1e-4
late in training are of that size). Stochastic rounding (Gupta et al. 2015; what ``torchao``'s
``bf16_stochastic_round`` optimizers do) rounds up or down with the probabilities that make the stored value
right in expectation, so small updates survive on average.

* ``stochastic_round(x, dtype, generator)``: float32 -> bf16/fp16, unbiased.
* ``AdamW16``: ``torch.optim.AdamW`` whose 16-bit parameters are updated in float32 from their 16-bit values,
  gradients and moments (the same formulas as ``torch.optim.AdamW``), then the parameter and both moments are
  stored back with stochastic rounding (``rounding="nearest"``: round to nearest, the plain 16-bit storage that
  loses updates). Float32 parameters take ``torch.optim.AdamW``'s own step. The random bits of each tensor come
  from a generator seeded by ``(seed, step, parameter index, shard coordinate)``: the same on every replica of a
  shard (replicas stay equal), and a resumed run draws what the uninterrupted one drew, with no state to save.
"""
from __future__ import annotations

import math
import zlib

import torch

__all__ = ["stochastic_round", "AdamW16", "LOW_DTYPES"]

LOW_DTYPES = (torch.bfloat16, torch.float16)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32, any shape) rounded to ``dtype`` (``torch.bfloat16`` or ``torch.float16``) stochastically:
    to one of the two neighbouring ``dtype`` values ``lo <= x <= hi`` with probability ``(hi - x) / (hi - lo)``
    for ``lo``, so ``E[result] = x`` exactly (up to float32 arithmetic on the probability). Values that ``dtype``
    represents are returned unchanged; non-finite values and values beyond ``dtype``'s largest finite number round
    to nearest (inf, nan as is). ``generator``: the source of the uniform draws (on ``x``'s device).

    Raises ``TypeError`` for an ``x`` that is not float32 or a ``dtype`` that is not 16-bit."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes float32, got {x.dtype}")
    if dtype not in LOW_DTYPES:
        raise TypeError(f"stochastic_round rounds to bfloat16 or float16, got {dtype}")
    near = x.to(dtype)
    nearf = near.float()
    inf = torch.tensor(float("inf"), dtype=dtype, device=x.device)
    other = torch.nextafter(near, torch.where(x > nearf, inf, -inf))  # the neighbour on x's other side
    gap = (other.float() - nearf).abs()
    prob = ((x - nearf).abs() / gap).nan_to_num_(0.0)  # probability of the far neighbour, in [0, 1/2]
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    out = torch.where((u < prob) & torch.isfinite(other) & torch.isfinite(near), other, near)
    return out


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_key(p) -> tuple:
    """The coordinates of ``p``'s shard along the mesh dimensions that shard it (not those that replicate it):
    replicas of a shard draw the same random bits and so stay equal."""
    if not hasattr(p, "device_mesh"):
        return ()
    from torch.distributed.tensor import Shard

    coord = p.device_mesh.get_coordinate() or ()
    return tuple(c for c, pl in zip(coord, p.placements) if isinstance(pl, Shard))


class AdamW16(torch.optim.AdamW):
    """``torch.optim.AdamW`` for a model whose parameters are float32, bf16 or fp16 (plain tensors or FSDP2
    DTensors). A 16-bit parameter keeps its moments ``exp_avg``, ``exp_avg_sq`` in its own dtype (the paper's
    16-bit Adam moments, section 2.4) and is updated as described in the module docstring.

    Args: ``params`` and AdamW's ``lr``, ``betas``, ``eps``, ``weight_decay`` (no amsgrad, maximize or
    capturable); ``seed``: seeds the rounding; ``rounding``: ``"stochastic"`` (default) or ``"nearest"``.
    The state dict is ``torch.optim.AdamW``'s (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter).

    Raises ``ValueError`` for another ``rounding``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, seed: int = 0,
                 rounding: str = "stochastic"):
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.seed, self.rounding = seed, rounding
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AdamW16 takes no closure")
        saved = [g["params"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["params"] = [p for p in g["params"] if p.dtype not in LOW_DTYPES]
            super().step()
        finally:
            for g, params in zip(self.param_groups, saved):
                g["params"] = params
        for g in self.param_groups:
            for p in g["params"]:
                if p.dtype in LOW_DTYPES and p.grad is not None:
                    self._step16(p, g)

    def _round(self, x: torch.Tensor, dtype, gen) -> torch.Tensor:
        return stochastic_round(x, dtype, gen) if self.rounding == "stochastic" else x.to(dtype)

    def _step16(self, p, group) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = int(state["step"].item())
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        lp, lm, lv = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        if lp.numel() == 0:
            return
        grad = _local(p.grad).float()
        x, m, v = lp.float(), lm.float(), lv.float()
        x.mul_(1 - lr * wd)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        x.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        key = f"{self.seed}/{t}/{self._index[id(p)]}/{_shard_key(p)}".encode()
        gen = torch.Generator(device=lp.device).manual_seed(zlib.crc32(key) * 2654435761 % 2**62)
        lp.copy_(self._round(x, lp.dtype, gen))
        lm.copy_(self._round(m, lm.dtype, gen))
        lv.copy_(self._round(v, lv.dtype, gen))
