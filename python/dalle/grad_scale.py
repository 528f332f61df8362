"""Per-resblock gradient scaling (paper section 2.4 and appendix D).

Every residual block ``l`` has its own scale ``s_l``. In backward, the gradient that flows into the block
(at its output) is multiplied by ``s_l``; the gradient that leaves it (at its input) is divided by ``s_l``
and has its non-finite values zeroed ("filtered"), so a block whose backward overflowed cannot poison the
blocks below it. The block's parameter gradients therefore carry the factor ``s_l``; ``unscale_`` divides it
out. Rules, with ``M`` the number of data-parallel workers:

- each scale starts at ``2**13 * M``;
- after an update, a block whose gradients were all finite multiplies its scale by ``2**(1/1000)``;
- a block whose parameter gradients or outgoing activation gradient held a non-finite value has those
  values zeroed, its update skipped (its parameters and optimizer moments are left untouched this step)
  and its scale divided by ``sqrt(2)``;
- scales are clamped to ``[2**7 * M, 2**24 * M]``;
- the output layers (text and image heads) belong to the top block: the float32 loss gradient is multiplied
  by the top block's scale before the head's 16-bit matmuls round it (``scale_logits``) and divided out in
  float32 after them (``unscale_head``); otherwise most of a gradient of about 1 / (tokens in the batch) per
  logit rounds to zero or subnormals in fp16 before any scale applies.

Usage::

    scaler = BlockGradScaler(len(model.blocks)).attach(model)
    loss.backward()
    skipped = scaler.unscale_()          # grads now unscaled; skipped blocks have grad None
    clip_grad_norm_(...); opt.step()
    scaler.update(skipped)
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .fsdp import local


class _ScaleIn(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient entering the block by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _UnscaleOut(torch.autograd.Function):
    """Identity forward; backward divides the gradient leaving the block by ``scale`` and filters it."""

    @staticmethod
    def forward(ctx, x, scale, found, index):
        ctx.scale, ctx.found, ctx.index = scale, found, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g * (1.0 / ctx.scale)
        bad = ~torch.isfinite(g)
        ctx.found[ctx.index] += bad.any().to(ctx.found.dtype)
        return torch.where(bad, torch.zeros((), dtype=g.dtype, device=g.device), g), None, None, None


class BlockGradScaler:
    """One gradient scale per residual block (see the module docstring for the rules)."""

    def __init__(self, n_blocks: int, world_size: int = 1, init_scale: float = 2.0 ** 13,
                 growth: float = 2.0 ** (1 / 1000), backoff: float = 2.0 ** -0.5,
                 min_scale: float = 2.0 ** 7, max_scale: float = 2.0 ** 24):
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks <= 0:
            raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        for name, v in (("init_scale", init_scale), ("min_scale", min_scale), ("max_scale", max_scale)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name} must be a positive finite float, got {v!r}")
        if not min_scale <= max_scale:
            raise ValueError(f"min_scale ({min_scale}) must be <= max_scale ({max_scale})")
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 1 <= growth < math.inf:
            raise ValueError(f"growth must be a finite float >= 1, got {growth!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 < backoff <= 1:
            raise ValueError(f"backoff must be a float in (0, 1], got {backoff!r}")
        self.n_blocks, self.world_size = n_blocks, world_size
        self.growth, self.backoff = growth, backoff
        self.min_scale, self.max_scale = min_scale * world_size, max_scale * world_size
        self.scales = [init_scale * world_size] * n_blocks
        self.found = None  # per-block count of non-finite outgoing gradients, on the model's device
        self.blocks = None
        self.head_params = []

    def attach(self, model) -> "BlockGradScaler":
        """Make ``model`` (anything with ``.blocks`` and a ``grad_scaler`` attribute) use these scales."""
        if len(model.blocks) != self.n_blocks:
            raise ValueError(f"model has {len(model.blocks)} blocks but the scaler has {self.n_blocks}")
        self.blocks = model.blocks
        # the output layers run on the top block's scaled gradient (``scale_logits``) and share its fate
        self.head_params = list(model.head_parameters()) if hasattr(model, "head_parameters") else []
        model.grad_scaler = self
        return self

    # -- called by the model's forward -----------------------------------------------------------------
    def _found_on(self, device) -> torch.Tensor:
        """The per-block non-finite counts, on ``device`` (made on first use)."""
        if self.found is None or self.found.device != device:
            self.found = torch.zeros(self.n_blocks, dtype=torch.float32, device=device)
        return self.found

    def enter(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return _UnscaleOut.apply(x, self.scales[index], self._found_on(x.device), index)

    def exit(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return _ScaleIn.apply(x, self.scales[index])

    # -- the head (final norm, output layers): the loss gradient is scaled before it meets 16 bits ------------
    # Under fp16 autocast the head's matmuls run in fp16, so a loss gradient of about 1 / (tokens in the batch)
    # would be rounded to fp16 (most of it to zero) before the top block could scale it. The head therefore
    # scales the float32 logits' gradient by the top block's scale (``scale_logits``) and divides it out, in
    # float32, from the final hidden states and from the head's weights (``unscale_head``); a non-finite value
    # there counts against the top block.
    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Identity; the gradient of the float32 ``logits`` is multiplied by the top block's scale."""
        return _ScaleIn.apply(logits, self.scales[-1])

    def unscale_head(self, x: torch.Tensor) -> torch.Tensor:
        """Identity; the gradient reaching ``x`` (final hidden states or a head weight, float32) is divided by
        the top block's scale and filtered, as a block's outgoing gradient is."""
        return _UnscaleOut.apply(x, self.scales[-1], self._found_on(x.device), self.n_blocks - 1)

    # -- called by the trainer after backward ----------------------------------------------------------
    def nonfinite_blocks(self) -> list[bool]:
        """Which blocks saw a non-finite gradient this step (all-reduced over workers)."""
        flags = torch.zeros(self.n_blocks, dtype=torch.float32,
                            device=self.found.device if self.found is not None else "cpu")
        if self.found is not None:
            flags += self.found
        for l, block in enumerate(self.blocks):
            grads = [local(p.grad) for p in block.parameters() if p.grad is not None]
            if grads:  # sharded gradients (FSDP): each rank checks its shards, the all-reduce agrees
                flags[l] += sum((~torch.isfinite(g)).sum() for g in grads).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags)
        return (flags > 0).tolist()

    def unscale_(self) -> list[bool]:
        """Divide each block's parameter gradients by its scale; filter and drop those of non-finite blocks.

        Returns the per-block ``skipped`` list. A skipped block's gradients are set to ``None`` so the
        optimizer leaves its parameters and moments untouched for this step.
        """
        if self.blocks is None:
            raise RuntimeError("BlockGradScaler.attach(model) must be called before unscale_()")
        skipped = self.nonfinite_blocks()
        for l, block in enumerate(self.blocks):
            for p in block.parameters():
                if p.grad is None:
                    continue
                if skipped[l]:
                    p.grad = None
                else:
                    local(p.grad).mul_(1.0 / self.scales[l])
        if skipped[-1]:  # the head's gradients were unscaled in the backward; a bad top block drops them too
            for p in self.head_params:
                p.grad = None
        if self.found is not None:
            self.found.zero_()
        return skipped

    def update(self, skipped: list[bool]) -> None:
        """Grow the scales of updated blocks, shrink those of skipped ones, clamp."""
        for l, skip in enumerate(skipped):
            s = self.scales[l] * (self.backoff if skip else self.growth)
            self.scales[l] = min(max(s, self.min_scale), self.max_scale)

    def state_dict(self) -> dict:
        return {"scales": list(self.scales), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        scales = [float(s) for s in state["scales"]]
        if not all(0 < s < math.inf for s in scales):
            raise ValueError(f"checkpoint block scales must be positive and finite, got {scales}")
        if len(scales) != self.n_blocks:
            raise ValueError(f"checkpoint has {len(scales)} block scales, the model has {self.n_blocks} blocks")
        # Scales are proportional to the worker count: rescale when resuming with a different M.
        ratio = self.world_size / int(state.get("world_size", self.world_size))
        self.scales = [min(max(s * ratio, self.min_scale), self.max_scale) for s in scales]


def log2_scales(scaler: BlockGradScaler) -> list[float]:
    return [math.log2(s) for s in scaler.scales]
