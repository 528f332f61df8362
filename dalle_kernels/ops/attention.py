"""Block-sparse DALL-E attention: PyTorch reference, Triton kernels, autograd Function, public op."""
from __future__ import annotations

import math

import torch

from .. import masks as _masks
from .._dispatch import resolve_backend

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attention_ref(q, k, v, mask="row", text_len=0, grid=(1, 1), kernel=11, scale=None, upcast=torch.float32):
    """Dense-masked softmax attention (the definition). Computes in ``upcast`` and returns q's dtype."""
    T, H, W = _masks.check_layout(mask, text_len, grid, kernel)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    allow = _masks.dense_mask(mask, T, (H, W), kernel, device=q.device)
    s = torch.matmul(q.to(upcast), k.to(upcast).transpose(-1, -2)) * scale
    s = s.masked_fill(~allow, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(upcast)).to(q.dtype)


def check_inputs(q, k, v, mask, text_len, grid, kernel, scale):
    """Validate arguments of ``sparse_attention``; return ``(T, H, W, scale)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, T + H*W, head_dim), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    T, H, W = _masks.check_layout(mask, text_len, grid, kernel)
    if q.shape[2] != T + H * W:
        raise ValueError(
            f"q, k, v sequence length {q.shape[2]} must equal text_len + H*W = {T} + {H}*{W} = {T + H * W}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[3]}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return T, H, W, float(scale)


def sparse_attention(q, k, v, mask="row", text_len=0, grid=(32, 32), kernel=11, scale=None, backend="auto"):
    """Causal softmax attention under one of DALL-E's masks (``dalle_kernels.masks.dense_mask``).

    ``q, k, v``: ``(batch, heads, text_len + H*W, head_dim)``; returns a tensor of the same shape and dtype.
    """
    T, H, W, scale = check_inputs(q, k, v, mask, text_len, grid, kernel, scale)
    backend = resolve_backend(backend, q)
    if backend == "torch":
        return attention_ref(q, k, v, mask, T, (H, W), kernel, scale)
    raise NotImplementedError(f"backend={backend!r} is not implemented yet")
