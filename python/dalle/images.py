"""PNG image grids (samples, reconstructions), optionally with a caption under each image and a label beside
each row."""
from __future__ import annotations

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


LINE_HEIGHT = 12  # pixels per line of caption in the default font


def _font():
    return ImageFont.load_default()


def word_gap(font) -> int:
    """Pixels between two words of a drawn line: the font's space, at least 4 (the default font's space is 2
    pixels wide, which reads as no space at all: "a photoof an")."""
    return max(4, round(font.getlength(" ")))


def line_width(line: str, font) -> float:
    """Pixels ``line`` (words split on spaces) takes when drawn as ``make_grid`` draws it."""
    words = line.split(" ")
    return sum(font.getlength(w) for w in words) + word_gap(font) * (len(words) - 1)


def wrap_caption(caption, font, width: int) -> list[str]:
    """``caption`` as lines of whole words no wider than ``width`` pixels when drawn in ``font`` (``line_width``),
    as many lines as it takes; the words of a line are joined by one space. Only a word wider than ``width`` on
    its own is broken, into pieces that fit (at least one character each)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (pixels), got {width!r}")
    gap = word_gap(font)
    lines, line, used = [], [], 0.0
    for word in _drawable(caption, font).split():
        pieces = []
        while font.getlength(word) > width and len(word) > 1:
            k = 1
            while k < len(word) and font.getlength(word[:k + 1]) <= width:
                k += 1
            pieces.append(word[:k])
            word = word[k:]
        pieces.append(word)
        for piece in pieces:
            w = font.getlength(piece)
            if line and used + gap + w <= width:
                line.append(piece)
                used += gap + w
            else:
                if line:
                    lines.append(" ".join(line))
                line, used = [piece], w
    if line:
        lines.append(" ".join(line))
    return lines


def _draw_line(draw, xy, line: str, font) -> None:
    x, y = xy
    for word in line.split(" "):
        draw.text((x, y), word, fill=(0, 0, 0), font=font)
        x += font.getlength(word) + word_gap(font)


def make_grid(images, nrow: int = 8, captions=None, scale: int | None = None, pad: int = 2,
              row_labels=None) -> Image.Image:
    """A PIL image: ``images`` in rows of ``nrow``, each upscaled ``scale`` times (nearest; by default so that
    a cell is at least 128 pixels wide when captions are drawn), captions under their image, wrapped over as many
    lines as they need (``wrap_caption``; any text: control characters are drawn as spaces, and characters the
    font lacks as "?" or its missing-glyph box). ``row_labels``: one label per row, drawn in a margin on the
    left ("held-out image", "reconstruction")."""
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
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    if isinstance(row_labels, str):
        raise TypeError("row_labels must be a list of str (one per row), not a single str")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows")
    if scale is None:
        scale = max(1, -(-128 // w)) if captions is not None else max(1, -(-64 // w))
    cw, ch = w * scale, h * scale
    font = _font()
    lines = [wrap_caption(c, font, max(1, cw - pad)) for c in captions] if captions is not None else [[]] * n
    # each row's caption band is as tall as its longest caption
    band = [LINE_HEIGHT * max(len(l) for l in lines[r * ncol:(r + 1) * ncol]) for r in range(rows)]
    band = [b + 2 if b else 0 for b in band]
    label_lines, margin = None, 0
    if row_labels is not None:
        label_w = max([int(font.getlength(word)) + 1 for lab in row_labels
                       for word in _drawable(lab, font).split()] + [48])
        label_lines = [wrap_caption(lab, font, label_w) for lab in row_labels]
        margin = label_w + 2 * pad
    tops = [pad]
    for r in range(rows):
        tops.append(tops[-1] + ch + band[r] + pad)
    grid = Image.new("RGB", (margin + pad + ncol * (cw + pad), tops[-1]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = margin + pad + c * (cw + pad), tops[r]
        grid.paste(Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST), (x0, y0))
        for k, line in enumerate(lines[i]):
            _draw_line(draw, (x0, y0 + ch + 1 + LINE_HEIGHT * k), line, font)
    for r, label in enumerate(label_lines or []):
        y = tops[r] + max(0, (ch - LINE_HEIGHT * len(label)) // 2)
        for k, line in enumerate(label):
            _draw_line(draw, (pad, y + LINE_HEIGHT * k), line, font)
    return grid


def save_grid(images, path, nrow: int = 8, captions=None, scale: int | None = None, row_labels=None) -> Path:
    """Write ``make_grid(images, nrow, captions, scale, row_labels=row_labels)`` as a PNG (atomically: temporary
    file, then rename)."""
    grid = make_grid(images, nrow=nrow, captions=captions, scale=scale, row_labels=row_labels)  # bad input raises before any folder exists

    return _atomic_write(path, lambda f: grid.save(f, format="PNG"))
