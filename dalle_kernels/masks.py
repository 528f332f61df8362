"""DALL-E's sparse causal attention masks as predicates (SPEC.md, section 1).

Positions: ``T`` text slots, then an ``H x W`` image grid in raster order. ``i`` is a query position,
``j`` a key position. Every predicate here is written with operators only (``//``, ``%``, ``&``, ``|``,
comparisons), so the same function body works on Python ints, NumPy arrays and torch tensors.
``dense_mask`` is the definition every backend must match.
"""
from __future__ import annotations

import numpy as np
import torch

MASKS = ("row", "column", "conv", "conv_clipped", "causal")


def check_layout(mask: str, text_len: int, grid, kernel: int = 11) -> tuple[int, int, int]:
    """Validate the mask arguments; return ``(text_len, H, W)``."""
    if not isinstance(mask, str) or mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if isinstance(text_len, bool) or not isinstance(text_len, (int, np.integer)) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
    try:
        H, W = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (H, W) of positive ints, got {grid!r}") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"grid must be a pair (H, W) of positive ints, got {grid!r}")
    if isinstance(kernel, bool) or not isinstance(kernel, (int, np.integer)) or kernel <= 0 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int, got {kernel!r}")
    return int(text_len), H, W


def image_allowed(mask: str, q, k, H: int, W: int, kernel: int = 11):
    """Image query raster index ``q`` may attend image key raster index ``k`` (both >= 0)."""
    s = kernel // 2
    if mask == "row":
        d = q - k
        return (d >= 0) & (d <= W)
    if mask == "column":
        return (k % W == q % W) & (k <= q)
    if mask == "conv":
        d = q - k
        dm = d % W
        return (d >= 0) & (d // W <= s) & ((dm <= s) | (dm >= W - s))
    if mask == "conv_clipped":
        dr = q // W - k // W
        dc = q % W - k % W
        return (k <= q) & (dr <= s) & (dc <= s) & (dc >= -s)
    if mask == "causal":
        return k <= q
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")


def allowed(mask: str, i, j, text_len: int, H: int, W: int, kernel: int = 11):
    """Sequence position ``i`` may attend position ``j`` under ``mask`` (raster image order)."""
    T = text_len
    causal = j <= i
    if mask == "causal":
        return causal
    i_img = i >= T
    j_txt = j < T
    # Clamp the raster indices to 0 where they do not apply so the image rule never sees negatives.
    q = (i - T) * i_img
    k = (j - T) * (j >= T)
    img = image_allowed(mask, q, k, H, W, kernel)
    return (j_txt & causal) | (i_img & ~j_txt & img)


def dense_mask(mask: str, text_len: int, grid, kernel: int = 11, device=None) -> torch.Tensor:
    """The ``(N, N)`` bool matrix (True = attend), ``N = text_len + H * W``, raster image order."""
    T, H, W = check_layout(mask, text_len, grid, kernel)
    n = T + H * W
    idx = torch.arange(n, device=device)
    return allowed(mask, idx[:, None], idx[None, :], T, H, W, kernel)


def column_permutation(text_len: int, grid, device=None) -> torch.Tensor:
    """``perm`` with ``x_t = x[..., perm, :]`` putting the image part in column-major order.

    Transposed position ``T + c * H + r`` holds raster position ``T + r * W + c``; text is unchanged.
    In that layout the ``column`` mask is block-diagonal causal with blocks of ``H`` (SPEC.md, section 1).
    """
    T = int(text_len)
    H, W = (int(g) for g in grid)
    t = torch.arange(H * W, device=device)
    raster = (t % H) * W + t // H
    return torch.cat([torch.arange(T, device=device), T + raster])


def transposed_column_mask(text_len: int, grid, device=None) -> torch.Tensor:
    """The ``column`` mask in the transposed (column-major image) layout the kernels run."""
    T, H, W = check_layout("column", text_len, grid)
    n = T + H * W
    idx = torch.arange(n, device=device)
    i, j = idx[:, None], idx[None, :]
    causal = j <= i
    ti, tj = i - T, j - T
    img = (ti // H == tj // H) & causal
    return (j < T) & causal | ((i >= T) & (j >= T) & img)
