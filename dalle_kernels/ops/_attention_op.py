"""Autograd wiring shared by the attention custom ops (the Triton path and the CPU path).

Each path is two ``torch.library`` custom ops, ``fwd(q, k, v, *settings) -> (o, lse)`` and
``bwd(do, q, k, v, o, lse, *settings) -> (dq, dk, dv)``, so that ``torch.compile`` traces calls without a graph
break. ``register`` adds their fake (meta) implementations and makes ``fwd`` differentiable through ``bwd``,
saving only ``q, k, v``, ``o`` and the fp32 row log-sum-exp ``lse`` ``(B, heads, N)``.
"""
from __future__ import annotations

import torch


def _fwd_fake(q, k, v, *settings):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(do, q, k, v, o, lse, *settings):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register(fwd_op, bwd_op) -> None:
    """Fake implementations for both ops and ``fwd_op``'s autograd through ``bwd_op``."""
    fwd_op.register_fake(_fwd_fake)
    bwd_op.register_fake(_bwd_fake)

    def setup_context(ctx, inputs, output):
        q, k, v, *settings = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.settings = settings
        ctx.mark_non_differentiable(lse)

    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(do, q, k, v, o, lse, *ctx.settings)
        return (dq, dk, dv) + (None,) * len(ctx.settings)

    fwd_op.register_autograd(backward, setup_context=setup_context)
