"""Real image/caption data: a folder of images with same-named ``.txt`` captions, or a ``.tsv``/``.csv`` of
(path, caption) rows (paths relative to the table's folder; a header row ``path,caption`` is optional).

Unusable pairs are skipped and counted, never a crash half-way through an epoch:
- at construction: missing or empty captions, captions the filters drop (too short, non-English), images
  that do not open or have an aspect ratio outside [1/2, 2];
- at load time: an image that fails to decode is counted and the next usable one is returned instead.
``ds.skipped`` holds the counts by reason and ``ds.report()`` prints them. A source with no usable pair is a
ValueError that says why each candidate was dropped.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import MODES, aspect_ok, caption_problem, preprocess

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _pairs_from_folder(root: Path) -> tuple[list[tuple[Path, str | None]], Counter]:
    pairs, skipped = [], Counter()
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            skipped["missing_caption"] += 1
            continue
        pairs.append((img, _read_caption(txt)))
    return pairs, skipped


def _pairs_from_table(table: Path) -> tuple[list[tuple[Path, str | None]], Counter]:
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    pairs, skipped = [], Counter()
    with open(table, newline="", encoding="utf-8", errors="replace") as f:
        for k, row in enumerate(csv.reader(f, delimiter=delimiter)):
            if k == 0 and len(row) >= 2 and row[0].strip().lower() in ("path", "image", "file", "filename"):
                continue  # header
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2:
                skipped["bad_row"] += 1
                continue
            path = Path(row[0].strip())
            pairs.append((path if path.is_absolute() else table.parent / path, delimiter.join(row[1:])))
    return pairs, skipped


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images and captions from a folder or a (path, caption) table, preprocessed per SPEC.md section 5.

    ``ds[i] -> (image uint8 (3, S, S), caption)``; ``ds.load(i, seed, train)`` draws the augmentation from
    ``seed`` (an int or a tuple of non-negative ints) and ``train=False`` uses the deterministic eval crop.
    """

    def __init__(self, source, image_size: int = 256, mode: str = "dvae", min_words: int = 2,
                 max_aspect: float = 2.0, verify: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 0:
            raise ValueError(f"min_words must be a non-negative int, got {min_words!r}")
        if isinstance(max_aspect, bool) or not isinstance(max_aspect, (int, float)) or not 1.0 <= max_aspect < math.inf:
            raise ValueError(f"max_aspect must be a finite number >= 1 (width / height allowed in "
                             f"[1 / max_aspect, max_aspect]), got {max_aspect!r}")
        source = Path(source)
        if source.is_dir():
            pairs, skipped = _pairs_from_folder(source)
        elif source.is_file() and source.suffix.lower() in (".tsv", ".csv"):
            pairs, skipped = _pairs_from_table(source)
        else:
            raise ValueError(f"source must be an image folder or a .tsv/.csv of (path, caption), got {source}")
        self.source, self.image_size, self.mode = source, image_size, mode
        self.skipped = skipped
        self.items: list[tuple[Path, str]] = []
        for path, caption in pairs:
            if caption is None:
                self.skipped["unreadable_caption"] += 1
                continue
            problem = caption_problem(caption, min_words=min_words)
            if problem:
                self.skipped[problem] += 1
                continue
            try:
                with Image.open(path) as im:
                    size = im.size
                    if verify:
                        im.load()
            except Exception:  # noqa: BLE001 - any decoder failure means "unusable image"
                self.skipped["corrupt_image" if path.exists() else "missing_image"] += 1
                continue
            if not aspect_ok(*size, max_aspect=max_aspect):
                self.skipped["aspect"] += 1
                continue
            self.items.append((path, " ".join(caption.split())))
        if not self.items:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "no image files found"
            raise ValueError(f"no usable image/caption pairs in {source} ({why})")

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    def load(self, i: int, seed=0, train: bool = True) -> tuple[torch.Tensor, str]:
        """Item ``i`` (or, if its image fails to decode, the next usable one; the failure is counted)."""
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n}")
        seeds = list(seed) if isinstance(seed, (tuple, list)) else [seed]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(seeds).generate_state(1, np.uint64)[0] >> 1))
        for k in range(n):
            path, caption = self.items[(i + k) % n]
            try:
                with Image.open(path) as im:
                    im.load()
                    image = preprocess(im, self.image_size, self.mode if train else "eval", g)
            except Exception:  # noqa: BLE001 - corrupt past the header: skip and count
                self.skipped["corrupt_image"] += 1
                continue
            return image, caption
        raise ValueError(f"no image in {self.source} could be decoded ({dict(self.skipped)})")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.load(i, seed=i)

    def report(self, file=None) -> str:
        """One line: usable pairs and skipped ones by reason (printed to ``file`` when given)."""
        total = sum(self.skipped.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        line = f"{self.source}: {len(self.items)} usable pairs, {total} skipped" + (f" ({parts})" if parts else "")
        if file is not None:
            print(line, file=file)
        return line
