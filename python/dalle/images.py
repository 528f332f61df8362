"""PNG image grids (samples, reconstructions), optionally with a caption under each image."""
from __future__ import annotations

import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .common import _atomic_write


def as_unit_float(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Float32 pixels in [0, 1] of ``images``: uint8 in [0, 255] divided by 255, floating ones as they are.

    Every function of the package that takes images reads them through this, so all accept the same two kinds
    and refuse the same mistakes: ``TypeError`` for a non-tensor or another dtype (int64 pixels included),
    ``ValueError`` for a floating tensor with a value outside [0, 1] or NaN (e.g. pixels in [0, 255] stored
    as floats; divide by 255 first). The range check costs one host sync for a floating input.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"{name} must be uint8 or float in [0, 1], got {images.dtype}")
    if images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images.detach()))
        if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
            raise ValueError(f"{name} must hold float pixels in [0, 1] (or be uint8 in [0, 255]), got values in "
                             f"[{lo:g}, {hi:g}]" + ("; divide pixels in [0, 255] by 255" if hi > 1.0 else ""))
    return images.float()


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) or (3, H, W) uint8 or float in [0, 1] (tensor or array) to an (N, H, W, 3) uint8 array.

    Raises like ``as_unit_float`` for other dtypes or floats outside [0, 1]."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = (as_unit_float(x) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _drawable(caption, font) -> str:
    """``caption`` as text ``font`` can draw: control characters as spaces; for PIL's bitmap font (Pillow
    without FreeType), characters outside Latin-1 as "?" (it raises UnicodeEncodeError on them)."""
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in str(caption))
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def make_grid(images, nrow: int = 8, captions=None, scale: int | None = None, pad: int = 2) -> Image.Image:
    """A PIL image: ``images`` in rows of ``nrow``, each upscaled ``scale`` times (nearest; by default so that
    a cell is at least 128 pixels wide when captions are drawn), captions wrapped under their image (any text:
    control characters are drawn as spaces, and characters the font lacks as "?" or its missing-glyph box)."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be a positive int or None, got {scale!r}")
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str (one per image), not a single str")
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images")
    if scale is None:
        scale = max(1, -(-128 // w)) if captions is not None else max(1, -(-64 // w))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, cw // 6)
    lines = [textwrap.wrap(_drawable(c, font), chars)[:4] for c in captions] if captions is not None else None
    text_h = 12 * max((len(l) for l in lines), default=0) + 2 if lines else 0
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = Image.new("RGB", (pad + ncol * (cw + pad), pad + rows * (ch + text_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        grid.paste(Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST), (x0, y0))
        if lines:
            for k, line in enumerate(lines[i]):
                draw.text((x0, y0 + ch + 1 + 12 * k), line, fill=(0, 0, 0), font=font)
    return grid


def save_grid(images, path, nrow: int = 8, captions=None, scale: int | None = None) -> Path:
    """Write ``make_grid(images, nrow, captions, scale)`` as a PNG (atomically: temporary file, then rename)."""
    grid = make_grid(images, nrow=nrow, captions=captions, scale=scale)  # bad input raises before any folder exists

    return _atomic_write(path, lambda f: grid.save(f, format="PNG"))
