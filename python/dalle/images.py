"""PNG image grids (samples, reconstructions), optionally with a caption under each image."""
from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) uint8 or float in [0, 1] (tensor or array) to an (N, H, W, 3) uint8 array."""
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise TypeError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images, nrow: int = 8, captions=None, scale: int | None = None, pad: int = 2) -> Image.Image:
    """A PIL image: ``images`` in rows of ``nrow``, each upscaled ``scale`` times (nearest; by default so that
    a cell is at least 128 pixels wide when captions are drawn), captions wrapped under their image."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images")
    if scale is None:
        scale = max(1, -(-128 // w)) if captions is not None else max(1, -(-64 // w))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, cw // 6)
    lines = [textwrap.wrap(str(c), chars)[:4] for c in captions] if captions is not None else None
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images, nrow=nrow, captions=captions, scale=scale)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
