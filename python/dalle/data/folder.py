"""Real image/caption data: a folder of images with same-named ``.txt`` captions, or a ``.tsv``/``.csv`` of
(path, caption) rows (paths relative to the table's folder; a header row ``path,caption`` is optional).

Unusable pairs are skipped and counted, never a crash half-way through an epoch:
- at construction: missing, empty or unreadable captions, captions the filters drop (too short, non-English), images
  that do not open or have an aspect ratio outside [1/2, 2]; with ``verify=True`` every image is also fully
  decoded once, so a file that opens but fails to decode (a truncated PNG or JPEG) is dropped from the index;
- at load time (``verify=False``): an image that fails to decode is counted once, remembered, and replaced by
  the next item in index order whose image decodes (see ``ImageCaptionDataset.load``).
``ds.skipped`` holds the counts by reason and ``ds.report()`` prints them. A source with no usable pair is a
ValueError that says why each candidate was dropped.

Keys (the rule of every reader, ``split_key``; img2dataset's keys are the reference): a sample's key is the
path of its files relative to the folder (a table: the listed path relative to the table's folder, absolute when
outside it), ``/``-separated, without the last extension: ``sub/photo.v2.jpg`` + ``sub/photo.v2.txt`` are the
sample ``sub/photo.v2``, as the tar members of that name are. A table that lists a path again gets ``#2``,
``#3``, ... appended. In a folder, files whose names differ only in the extension's case or in the image format
(``a.jpg`` + ``a.JPG``, ``a.jpg`` + ``a.png``) are one sample with a repeated or conflicting member, skipped and
counted (``repeated_member``, ``conflicting_member``), as in a tar. ``heldout_split`` turns keys into the
train / held-out split every command uses.

Captions are UTF-8, or UTF-8/16/32 with a byte-order mark; a caption that does not decode, or decodes to control
characters (UTF-16 without its mark read as UTF-8 is full of NULs), is ``unreadable_caption``; a caption file
over ``MAX_CAPTION_BYTES`` is ``caption_too_large`` and is not read past that budget. A caption file without an
image is counted as ``missing_image``.
"""
from __future__ import annotations

import csv
import hashlib
import math
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .transforms import MODES, aspect_ok, caption_problem, preprocess

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_FIELDS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # the same, as the field names of a sample's members
CAPTION_FIELD = "txt"
MAX_CAPTION_BYTES = 64 * 1024  # a caption file (or tar member) larger than this is skipped as caption_too_large
MAX_IMAGE_BYTES = 256 * 2**20  # an image file (or tar member) larger than this is skipped as image_too_large
_BOMS = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xfe\xff", "utf-16-be"), (b"\xff\xfe", "utf-16-le"))  # longest first: UTF-32-LE starts like UTF-16-LE
_WHITESPACE_CONTROLS = frozenset("\t\n\r\x0b\x0c")


def split_key(name: str) -> tuple[str | None, str | None]:
    """``(key, field)`` of a file path relative to the folder or of a tar member name (``/``-separated).

    The key rule of every reader: a sample's key is its name without the last extension (``sub/photo.v2.jpg``
    -> ``sub/photo.v2``), its field the extension lowercased (``jpg``). For img2dataset's names (``000123.jpg``,
    ``000123.txt``: no dot in the key) this is webdataset's own grouping. ``(None, None)`` for a name whose
    basename has no extension or starts with a dot (hidden files, ``.DS_Store``): not part of any sample.
    """
    head, sep, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem or not ext or base.startswith("."):
        return None, None
    return head + sep + stem, ext.lower()


def member_problem(fields) -> str | None:
    """Why the members ``fields`` (field names in order, e.g. ``["jpg", "txt", "json"]``) of one sample do not
    make a sample, or None: ``repeated_member`` (a field twice: ``KEY.jpg`` twice, ``KEY.jpg`` and ``KEY.JPG``,
    the caption twice), ``conflicting_member`` (two images: ``KEY.jpg`` and ``KEY.png``), ``missing_caption``,
    ``missing_image``. Other fields (``json``) are ignored."""
    fields = list(fields)
    if len(set(fields)) < len(fields):
        return "repeated_member"
    if sum(f in IMAGE_FIELDS for f in fields) > 1:
        return "conflicting_member"
    if CAPTION_FIELD not in fields:
        return "missing_caption"
    if not any(f in IMAGE_FIELDS for f in fields):
        return "missing_image"
    return None


def clean_text(text: str) -> str | None:
    """``text``, or None when it holds a control character other than whitespace (NUL: UTF-16 read as UTF-8) or
    a lone surrogate (bytes that were not text): what a caption in an encoding we cannot detect looks like."""
    for ch in text:
        if (ch < " " or "\x7f" <= ch <= "\x9f") and ch not in _WHITESPACE_CONTROLS or "\ud800" <= ch <= "\udfff":
            return None
    return text


def decode_caption(raw: bytes) -> str | None:
    """The text of a caption file or member: UTF-8, or UTF-8/16/32 with its byte-order mark; None when it does not
    decode or decodes to control characters (``clean_text``), counted as ``unreadable_caption``."""
    codec = next((c for bom, c in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        return None
    return clean_text(text[1:] if text.startswith("\ufeff") else text)


def read_limited(path: Path, limit: int) -> bytes | None:
    """The bytes of ``path``, or None when it holds more than ``limit`` bytes (read no further than that).
    OSError when it cannot be read."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, reason)`` for the caption file ``path`` (``decode_caption``)."""
    try:
        raw = read_limited(path, MAX_CAPTION_BYTES)
    except OSError:
        return None, "unreadable_caption"
    if raw is None:
        return None, "caption_too_large"
    text = decode_caption(raw)
    return (text, None) if text is not None else (None, "unreadable_caption")


class Pair(NamedTuple):
    """A candidate sample of a folder or table. ``key``: the key rule of ``split_key`` (a table's listed path
    repeated gets ``#2``, ``#3``). ``image``: its image file, or None. ``caption``: a folder's caption file
    (Path), a table's caption text (str; None when the row's bytes are not text), or None. ``problem``: a
    reason it is skipped found while listing (``member_problem``), or None. ``files``: every file of the
    sample (what its digest covers)."""
    key: str
    image: Path | None
    caption: Path | str | None
    problem: str | None
    files: tuple


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _pairs_from_folder(root: Path) -> tuple[list[Pair], Counter]:
    """Candidates of an image folder, sorted by key: the files are grouped by ``split_key`` of their path
    relative to ``root``; a group with an image or a caption is a candidate (other files are ignored)."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for p in sorted(root.rglob("*")):
        key, field = split_key(_rel(p, root))
        if key is not None and (field in IMAGE_FIELDS or field == CAPTION_FIELD) and p.is_file():
            groups.setdefault(key, []).append((field, p))
    pairs = []
    for key in sorted(groups):
        members = groups[key]
        fields = [f for f, _ in members]
        problem = member_problem(fields)
        image = next((p for f, p in members if f in IMAGE_FIELDS), None)
        caption = next((p for f, p in members if f == CAPTION_FIELD), None)
        if problem in ("repeated_member", "conflicting_member"):
            image = caption = None
        pairs.append(Pair(key, image, caption, problem if problem != "missing_image" else None,
                          tuple(p for _, p in members)))
    return pairs, Counter()


def _table_text(table: Path):
    """The table's text stream: the encoding of its byte-order mark (UTF-8 without one); bytes that are not
    text come through as lone surrogates, so the rows holding them are counted, not read wrong."""
    with open(table, "rb") as f:
        head = f.read(4)
    codec = next((c for bom, c in _BOMS if head.startswith(bom)), "utf-8-sig")
    return open(table, newline="", encoding=codec, errors="surrogateescape")


def _pairs_from_table(table: Path) -> tuple[list[Pair], Counter]:
    """Candidates of a table, in row order: the key is the listed path relative to the table's folder (absolute
    when outside it) without its last extension, ``#2``, ``#3``, ... when a path is listed again. A row that
    csv cannot parse (a field over csv's limit of 131072 characters) or without a caption column is a
    ``bad_row``; a caption over ``MAX_CAPTION_BYTES`` is ``caption_too_large``; a row
    whose bytes are not text has caption None (``unreadable_caption``)."""
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    pairs, skipped, seen = [], Counter(), Counter()
    try:
        f = _table_text(table)
    except OSError as e:
        raise ValueError(f"{table}: cannot read the table ({e.strerror or e})") from None
    with f:
        rows = csv.reader(f, delimiter=delimiter)
        first = True
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error:
                skipped["bad_row"] += 1
                continue
            except UnicodeDecodeError as e:
                raise ValueError(f"{table}: not text in its encoding ({e.encoding}: {e.reason} at byte "
                                 f"{e.start})") from None
            header, first = first, False
            if header and len(row) >= 2 and row[0].strip().lower() in ("path", "image", "file", "filename"):
                continue
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) < 2:
                skipped["bad_row"] += 1
                continue
            listed = row[0].strip()
            if clean_text(listed) is None:
                skipped["bad_row"] += 1  # a path that is not text names no file
                continue
            path = Path(listed)
            path = path if path.is_absolute() else table.parent / path
            stem = _rel(path, table.parent)
            key = split_key(stem)[0] or stem
            seen[key] += 1
            key = key if seen[key] == 1 else f"{key}#{seen[key]}"
            caption = delimiter.join(row[1:])
            if len(caption.encode("utf-8", "surrogatepass")) > MAX_CAPTION_BYTES:
                skipped["caption_too_large"] += 1  # as a caption file or tar member of that size is
                continue
            pairs.append(Pair(key, path, clean_text(caption), None, (path,)))
    return pairs, skipped


def _key_hash(key: str) -> float:
    # the held-out rule of every command (``dalle.data.sources.is_heldout``): held out when this is < share;
    # Python's ``hash`` is salted per process, sha1 is the same everywhere
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def heldout_split(keys, fraction: float) -> tuple[list[int], list[int]]:
    """``(train, heldout)`` index lists (ascending) of the samples named by ``keys``.

    The held-out rule of every command (``dalle.data.sources.is_heldout``, the token shards' ``heldout`` flags):
    a key is held out when ``int(sha1(key)[:8 hex], 16) / 2**32 < fraction``, a function of the key and the share
    alone, so the split is the same on every machine and for every command, and a sample does not change sides
    when others are added or removed. A small source may hold nothing out (40 pairs at 0.02 usually do not); the
    callers say so. ValueError unless ``0 <= fraction < 1``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    held = [_key_hash(k) < fraction for k in keys]
    return [i for i, h in enumerate(held) if not h], [i for i, h in enumerate(held) if h]


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images and captions from a folder or a (path, caption) table, preprocessed as the paper's released code does.

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
        elif source.is_file() and source.suffix.lower() in (".tsv", ".csv"):
            pairs, skipped = _pairs_from_table(source)
        else:
            raise ValueError(f"source must be an image folder or a .tsv/.csv of (path, caption), got {source}")
        self.source, self.image_size, self.mode = source, image_size, mode
        self.skipped = skipped
        self.items: list[tuple[Path, str]] = []
        self.keys: list[str] = []
        self.bad: set[int] = set()
        for key, path, caption, problem, _ in pairs:
            if problem:
                self.skipped[problem] += 1
                continue
            caption, problem = _read_caption(caption) if isinstance(caption, Path) else \
                (caption, None if caption is not None else "unreadable_caption")
            if problem:
                self.skipped[problem] += 1
                continue
            if path is None:
                self.skipped["missing_image"] += 1
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
            except Image.DecompressionBombError:  # more pixels than PIL's limit: never decoded
                self.skipped["image_too_large"] += 1
                continue
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
