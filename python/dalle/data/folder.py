"""Real image/caption data: a folder of images with same-named ``.txt`` captions, or a ``.tsv``/``.csv`` of
(path, caption) rows (paths relative to the table's folder; a header row ``path,caption`` is optional).

Unusable pairs are skipped and counted, never a crash half-way through an epoch:
- at construction: missing or empty captions, captions the filters drop (too short, non-English), images
  that do not open or have an aspect ratio outside [1/2, 2]; with ``verify=True`` every image is also fully
  decoded once, so a file that opens but fails to decode (a truncated PNG or JPEG) is dropped from the index;
- at load time (``verify=False``): an image that fails to decode is counted once, remembered, and replaced by
  the next item in index order whose image decodes (see ``ImageCaptionDataset.load``).
``ds.skipped`` holds the counts by reason and ``ds.report()`` prints them. A source with no usable pair is a
ValueError that says why each candidate was dropped.

Every item has a ``key``: its image path relative to the folder (for a table, to the table's folder; the
absolute path when outside it), ``/``-separated, with ``#2``, ``#3``, ... appended when a table lists a path
again. ``heldout_split`` turns keys into a train / held-out split that is the same on every machine.
"""
from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import MODES, aspect_ok, caption_problem, preprocess

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _read_caption(path: Path) -> str | None:
    """The caption in ``path``: UTF-8 (a byte-order mark allowed), or UTF-16 with its byte-order mark; None when
    unreadable (counted as ``unreadable_caption``)."""
    try:
        raw = path.read_bytes()
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
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


def _key_hash(key: str) -> float:
    # the split rule of the token shards (``dalle.data.sources.is_heldout``): held out when this is < fraction;
    # Python's ``hash`` is salted per process, sha1 is the same everywhere
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def _keys(paths, root: Path) -> list[str]:
    """Each path relative to ``root`` (absolute when outside it), ``/``-separated; repeats get ``#2``, ``#3``."""
    seen, out = Counter(), []
    for path in paths:
        try:
            key = Path(path).relative_to(root).as_posix()
        except ValueError:
            key = Path(path).as_posix()
        seen[key] += 1
        out.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return out


def heldout_split(keys, fraction: float) -> tuple[list[int], list[int]]:
    """``(train, heldout)`` index lists (ascending) of the samples named by ``keys``.

    A key is held out when ``int(sha1(key)[:8 hex], 16) / 2**32 < fraction``, the rule the token shards use, so
    the split is the same on every machine and does not move when other samples are added or removed. With
    ``fraction > 0`` and at least 2 keys, at least one key is held out (the one with the smallest hash when the
    rule picks none) and at least one trains (the largest hash when the rule picks all). ``fraction == 0`` or a
    single key: everything trains and nothing is held out. ValueError unless ``0 <= fraction < 1``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    keys = list(keys)
    if fraction == 0 or len(keys) < 2:
        return list(range(len(keys))), []
    hashes = [_key_hash(k) for k in keys]
    held = {i for i, h in enumerate(hashes) if h < fraction}
    if not held:
        held = {min(range(len(keys)), key=lambda i: (hashes[i], keys[i]))}
    if len(held) == len(keys):
        held.discard(max(range(len(keys)), key=lambda i: (hashes[i], keys[i])))
    return [i for i in range(len(keys)) if i not in held], sorted(held)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images and captions from a folder or a (path, caption) table, preprocessed per SPEC.md section 5.

    ``ds[i] -> (image uint8 (3, S, S), caption)``; ``ds.load(i, seed, train)`` draws the augmentation from
    ``seed`` (an int or a tuple of non-negative ints) and ``train=False`` uses the deterministic eval crop.
    ``ds.keys[i]`` names item ``i`` (module docstring); ``ds.subset(indices)`` is a view on some items.

    Corrupt images. ``verify=True`` (the default) decodes every image once at construction and leaves the ones
    that fail out of the index, so the index is fixed from the start: a trainer that maps batch positions to
    indices through a seeded permutation of ``range(len(ds))`` sees the same items in every run and after
    every resume, and each corrupt file is counted once. It costs one full decode of the data per
    construction. ``verify=False`` only reads headers at construction; a file that then fails to decode is
    counted once (``ds.bad`` remembers its index, it is never tried again) and its slot serves the next item
    in index order whose image decodes. The index keeps its length, because shrinking it mid-epoch would move
    every later item and make the batches depend on when the failure was found; the replacement depends only
    on the files, not on the order of visits, so runs and resumes still agree. Worker processes hold copies:
    pass the indices they found bad to ``ds.mark_bad`` in the main process so each is counted once there.
    """

    def __init__(self, source, image_size: int = 256, mode: str = "dvae", min_words: int = 2,
                 max_aspect: float = 2.0, verify: bool = True):
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
            root = source
        elif source.is_file() and source.suffix.lower() in (".tsv", ".csv"):
            pairs, skipped = _pairs_from_table(source)
            root = source.parent
        else:
            raise ValueError(f"source must be an image folder or a .tsv/.csv of (path, caption), got {source}")
        self.source, self.image_size, self.mode = source, image_size, mode
        self.skipped = skipped
        self.items: list[tuple[Path, str]] = []
        self.keys: list[str] = []
        self.bad: set[int] = set()
        for key, (path, caption) in zip(_keys((p for p, _ in pairs), root), pairs):
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
            self.keys.append(key)
        if not self.items:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "no image files found"
            raise ValueError(f"no usable image/caption pairs in {source} ({why})")

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    def subset(self, indices) -> "ImageCaptionDataset":
        """A dataset of items ``indices`` (in that order) of this one. It shares ``skipped`` with this dataset
        (a corrupt file found through either is counted once, in both reports); ``bad`` is its own."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < len(self.items):
                raise IndexError(f"index {i} out of range for a dataset of {len(self.items)}")
        out.items = [self.items[i] for i in indices]
        out.keys = [self.keys[i] for i in indices]
        out.bad = {k for k, i in enumerate(indices) if i in self.bad}
        return out

    def mark_bad(self, indices) -> None:
        """Record items whose image failed to decode (e.g. in a worker process); each is counted once."""
        for i in indices:
            i = int(i)
            if not 0 <= i < len(self.items):
                raise IndexError(f"index {i} out of range for a dataset of {len(self.items)}")
            if i not in self.bad:
                self.bad.add(i)
                self.skipped["corrupt_image"] += 1

    def load(self, i: int, seed=0, train: bool = True) -> tuple[torch.Tensor, str]:
        """Item ``i``: ``(image uint8 (3, S, S), caption)``. If its image fails to decode, the failure is counted
        once, ``i`` joins ``self.bad`` and the next item in index order whose image decodes is returned (with
        the augmentation of ``seed``). ValueError when no image decodes at all."""
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n}")
        seeds = list(seed) if isinstance(seed, (tuple, list)) else [seed]
        state = int(np.random.SeedSequence(seeds).generate_state(1, np.uint64)[0] >> 1)
        for k in range(n):
            j = (i + k) % n
            if j in self.bad:
                continue
            path, caption = self.items[j]
            try:
                with Image.open(path) as im:
                    im.load()
                    image = preprocess(im, self.image_size, self.mode if train else "eval",
                                       torch.Generator().manual_seed(state))
            except Exception:  # noqa: BLE001 - corrupt past the header: count once, never try again
                self.mark_bad([j])
                continue
            return image, caption
        raise ValueError(f"no image in {self.source} could be decoded ({dict(self.skipped)})")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.load(i, seed=i)

    def report(self, file=None) -> str:
        """One line: usable pairs and skipped ones by reason (printed to ``file`` when given)."""
        total = sum(self.skipped.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        line = (f"{self.source}: {len(self.items) - len(self.bad)} usable pairs, {total} skipped"
                + (f" ({parts})" if parts else ""))
        if file is not None:
            print(line, file=file)
        return line
