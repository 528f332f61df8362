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


# ----------------------------------------------------------------------------------------------------------------
# Non-finite keys and values (``attention_ref``'s rule): a key or value row holding NaN or +-inf never reaches a
# query the mask keeps from it; a query that may attend one is NaN in its output row and log-sum-exp, and NaN in
# its dq and in the dk, dv of every key it attends.
#
# The Triton and CUDA kernels follow it given ``forward_inputs`` / ``backward_keys`` (no host sync): their scores
# are per pair (-inf where masked, whatever the key), their backward sets P and dS to 0 on masked pairs, and the
# two contractions over keys (P V forward, dS K backward) read finite values. PyTorch's fused CPU kernel adds its
# mask to the scores (NaN + -inf = NaN) and cannot be changed, so the CPU path runs through ``guarded_forward`` /
# ``guarded_backward``: the path on finite keys and values, then the rows and keys the rule makes NaN marked,
# found by the path itself on 0/1 indicators (one isfinite pass over k and v when all is finite).

def bad_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N)`` bool: the key or value rows holding a NaN or +-inf."""
    return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and +-inf set to 0 (a copy; its strides may differ from ``x``'s)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def forward_inputs(k: torch.Tensor, v: torch.Tensor):
    """``(k, v)`` for a forward kernel: values finite (``P V`` sums over keys, and 0 * NaN is NaN), and the key row
    of every bad key or value row NaN, so that its scores, per pair, are -inf where masked and NaN where allowed:
    the rows that may attend it come out NaN."""
    return k.masked_fill(bad_rows(k, v)[..., None], float("nan")), finite(v)


def _attending(fwd, like: torch.Tensor, bad: torch.Tensor):
    """``(rows that may attend a bad key, lse of uniform attention)``: ``fwd`` on q = k = 0 (every allowed key
    weighs the same) with the bad rows' indicator as the values."""
    zero = torch.zeros_like(like)
    o, lse = fwd(zero, zero, bad[..., None].to(like.dtype).expand(like.shape).contiguous())
    return o[..., 0] > 0, lse


def guarded_forward(fwd, q, k, v):
    """``fwd(q, k, v) -> (o, lse)`` under the rule above."""
    bad = bad_rows(k, v)
    if not bool(bad.any()):
        return fwd(q, k, v)
    o, lse = fwd(q, k.masked_fill(bad[..., None], 0), v.masked_fill(bad[..., None], 0))
    sees, _ = _attending(fwd, q, bad)
    return o.masked_fill(sees[..., None], float("nan")), lse.masked_fill(sees, float("nan"))


def guarded_backward(fwd, bwd, do, q, k, v, o, lse):
    """``bwd(do, q, k, v, o, lse) -> (dq, dk, dv)`` under the rule above. The rows the forward made NaN (a NaN
    log-sum-exp) are left out of the call (their probabilities 0: lse +inf, dO = O = 0) and their own gradients
    set after it: NaN in their dq and in the dk, dv of every key they attend."""
    bad, poisoned = bad_rows(k, v), torch.isnan(lse)
    if not bool(bad.any()) and not bool(poisoned.any()):
        return bwd(do, q, k, v, o, lse)
    row, col = bad[..., None], poisoned[..., None]
    dq, dk, dv = bwd(do.masked_fill(col, 0), q.masked_fill(col, 0), k.masked_fill(row, 0), v.masked_fill(row, 0),
                     o.masked_fill(col, 0), lse.masked_fill(poisoned, float("inf")))
    if bool(poisoned.any()):
        _, uniform_lse = _attending(fwd, q, torch.zeros_like(poisoned))
        zero = torch.zeros_like(q)
        indicator = poisoned[..., None].to(q.dtype).expand(q.shape).contiguous()
        _, _, reached = bwd(indicator, zero, zero, zero, zero, uniform_lse)  # dV = P^T dO: > 0 where attended
        keys = (reached[..., 0] > 0)[..., None]
        dq = dq.masked_fill(col, float("nan"))
        dk, dv = dk.masked_fill(keys, float("nan")), dv.masked_fill(keys, float("nan"))
    return dq, dk, dv
