"""Logit-Laplace negative log-likelihood of the dVAE (SPEC.md section 3): reference, kernels, autograd Function.

Per value, with ``y = (1 - 2 eps) x + eps`` the mapped pixel, ``mu`` and ``ln_b`` the decoder's channels 0-2 and 3-5:

    nll = |logit(y) - mu| * exp(-ln_b) + ln_b + ln(y) + ln(1 - y) + ln(2)
    d nll / d mu   = -sign(logit(y) - mu) * exp(-ln_b)      (sign(0) = 0: the subgradient 0 at the kink)
    d nll / d ln_b = 1 - |logit(y) - mu| * exp(-ln_b)

The loss is returned in float32 (float64 for float64 params on the torch backend), whatever the params dtype:
a sum over a 256 x 256 batch does not fit in float16. Gradients come back in the params dtype.
"""
from __future__ import annotations

import math

import torch

from .._dispatch import resolve_backend

REDUCTIONS = ("mean", "sum", "none")
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)
LN2 = math.log(2.0)


def map_pixels(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Pixels in [0, 1] (floating) or [0, 255] (uint8) to ``y = (1 - 2 eps) x + eps`` in ``[eps, 1 - eps]``."""
    _check_eps(eps)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif not x.is_floating_point():
        raise TypeError(f"x must be floating point in [0, 1] or uint8 in [0, 255], got {x.dtype}")
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(y: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Inverse of ``map_pixels``, clamped to [0, 1]. For display: ``unmap_pixels(torch.sigmoid(mu))``."""
    _check_eps(eps)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating point torch.Tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    return torch.clamp((y - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def logit_laplace_loss_ref(params: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                           eps: float = 0.1) -> torch.Tensor:
    """The definition in plain PyTorch (differentiable in ``params``), computed in float32 or wider.

    ``params`` ``(B, 6, H, W)``, ``target`` ``(B, 3, H, W)``; returns a scalar (mean/sum) or ``(B, 3, H, W)``.
    """
    dtype = torch.promote_types(params.dtype, torch.float32)
    mu, ln_b = params.to(dtype).split(3, dim=1)
    y = map_pixels(target, eps).to(dtype)
    log_y, log_1my = torch.log(y), torch.log1p(-y)
    dev = torch.abs((log_y - log_1my) - mu)
    # |d| * exp(-ln_b) with 0 where d == 0, so that d == 0 and a huge exp(-ln_b) give 0, not 0 * inf = nan.
    scaled = torch.where(dev == 0, torch.zeros_like(dev), dev * torch.exp(-ln_b))
    nll = scaled + ln_b + log_y + log_1my + LN2
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < float(eps) < 0.5):
        raise ValueError(f"eps must be a float in (0, 0.5), got {eps!r}")


def check_inputs(params, target, reduction, eps, check_range=True):
    """Validate arguments of ``logit_laplace_loss`` (raises ValueError / TypeError naming the argument)."""
    for name, t in (("params", params), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if params.dtype not in PARAM_DTYPES:
        raise TypeError(f"params must be float32, float16, bfloat16 or float64, got {params.dtype}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be floating point in [0, 1] or uint8 in [0, 255], got {target.dtype}")
    if params.dim() != 4 or params.shape[1] != 6:
        raise ValueError(f"params must have shape (B, 6, H, W) (mu in channels 0-2, ln b in 3-5), "
                         f"got {tuple(params.shape)}")
    if target.dim() != 4 or target.shape[1] != 3:
        raise ValueError(f"target must have shape (B, 3, H, W), got {tuple(target.shape)}")
    if (target.shape[0], target.shape[2], target.shape[3]) != (params.shape[0], params.shape[2], params.shape[3]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match params shape {tuple(params.shape)}: "
                         "expected (B, 3, H, W) for params (B, 6, H, W)")
    if target.device != params.device:
        raise ValueError(f"target is on {target.device} but params is on {params.device}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_eps(eps)
    if check_range and target.is_floating_point() and target.numel() > 0:
        lo, hi = (float(v) for v in torch.aminmax(target.detach()))  # one host sync
        if not (lo >= 0.0 and hi <= 1.0):  # also false for nan
            raise ValueError(f"target must hold pixels in [0, 1] (floating) or be uint8; got values in "
                             f"[{lo}, {hi}]")


def logit_laplace_loss(params: torch.Tensor, target: torch.Tensor, reduction: str = "mean", eps: float = 0.1,
                       backend: str = "auto", check_range: bool = True) -> torch.Tensor:
    """Logit-Laplace NLL of ``target`` pixels under the decoder output ``params`` (SPEC.md section 3).

    ``params`` ``(B, 6, H, W)`` float32/float16/bfloat16 (float64: torch backend), channels 0-2 ``mu`` and
    3-5 ``ln b``; ``target`` ``(B, 3, H, W)`` floating in [0, 1] or uint8 in [0, 255], mapped with ``eps``
    inside the op. ``reduction``: ``"mean"`` over all ``B*3*H*W`` values, ``"sum"``, or ``"none"``
    (float32 ``(B, 3, H, W)``). ``check_range=False`` skips the min/max check of a floating target (a sync).
    The target gets no gradient.
    """
    check_inputs(params, target, reduction, eps, check_range)
    backend = resolve_backend(backend, params)
    # The fused kernels land next; until then every backend computes the reference.
    return logit_laplace_loss_ref(params, target.detach(), reduction, float(eps))
