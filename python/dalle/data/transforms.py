"""Preprocessing of real images (as the paper's released code does) and the caption / aspect-ratio filters.

dVAE:        random square crop of side min(h, w); area-resize to a random side in [9/8, 12/8] * target (capped
             at the crop side); random crop to target; random horizontal flip.
transformer: square crop near the centre (offset drawn from the middle quarter of the free range); area-resize to
             a random side in [target, 9/8 * target]; random crop to target; no flip (images may contain text).
eval:        centre square crop, area-resize to target (no randomness).

Every random draw comes from the ``torch.Generator`` passed in, so a sample's augmentation is a function of its
seed, whatever process or worker produces it.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MODES = ("dvae", "transformer", "eval")
MAX_ASPECT = 2.0


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return lo if hi <= lo else int(torch.randint(lo, hi + 1, (), generator=g))


def _resize(img: Image.Image, side: int) -> Image.Image:
    # "area" resize: box filter (mean over the covered source pixels) when shrinking, bicubic when growing
    method = Image.BOX if side <= min(img.size) else Image.BICUBIC
    return img.resize((side, side), method)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit and 32-bit integer greyscale (modes ``I;16*``, ``I``) and float (``F``) are
    scaled from their type's range (16-bit: divided by 257) instead of clipped at 255, which PIL's own
    ``convert("RGB")`` does (a 16-bit photo would come out almost white); palette, CMYK, LA and RGBA go through
    ``convert`` (alpha dropped)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        elif img.mode == "I":  # 32-bit integers: PNG stores 16-bit greyscale so in some PIL versions
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # float: [0, 1] images are scaled, anything else clipped
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a uint8 tensor (3, H, W) (``to_rgb`` first)."""
    return torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def preprocess(img: Image.Image, target: int, mode: str = "dvae", generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """The released preprocessing (README: Train on your own data) of one image to a uint8 tensor (3, target, target)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}")
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"target must be a positive int, got {target!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    if mode == "dvae":
        x0, y0 = _randint(g, 0, w - side), _randint(g, 0, h - side)
    else:  # transformer and eval: near / at the centre
        fx, fy = w - side, h - side
        if mode == "transformer":  # offset drawn from the middle quarter of the free range
            x0, y0 = round(_uniform(g, 3 * fx / 8, 5 * fx / 8)), round(_uniform(g, 3 * fy / 8, 5 * fy / 8))
        else:
            x0, y0 = fx // 2, fy // 2
    img = img.crop((x0, y0, x0 + side, y0 + side))
    if mode == "eval":
        return to_tensor(_resize(img, target))
    lo, hi = (9 / 8, 12 / 8) if mode == "dvae" else (1.0, 9 / 8)
    size = round(_uniform(g, lo * target, hi * target))
    size = max(target, min(size, side))  # capped at the crop side, never below the target
    img = _resize(img, size)
    cx, cy = _randint(g, 0, size - target), _randint(g, 0, size - target)
    img = img.crop((cx, cy, cx + target, cy + target))
    if mode == "dvae" and float(torch.rand((), generator=g)) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def aspect_ok(width: int, height: int, max_aspect: float = MAX_ASPECT) -> bool:
    """Aspect ratio within [1/max_aspect, max_aspect] (the paper keeps [1/2, 2])."""
    return width > 0 and height > 0 and 1.0 / max_aspect <= width / height <= max_aspect


def caption_problem(caption: str, min_words: int = 2, min_ascii: float = 0.9) -> str | None:
    """Why a caption is dropped ("empty_caption", "short_caption", "non_english"), or None to keep it.

    "Non-English" is a cheap heuristic: fewer than ``min_ascii`` of its letters are ASCII letters.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.split())
    if not text:
        return "empty_caption"
    if len(text.split()) < min_words:
        return "short_caption"
    letters = [ch for ch in text if ch.isalpha()]
    if not letters or sum(ch.isascii() for ch in letters) < min_ascii * len(letters):
        return "non_english"
    return None
