"""Image/caption sources read as a stream of units: an image folder, a (path, caption) table, or WebDataset tar
shards as img2dataset writes them.

``open_source(path)`` tells the kind from ``path``:
- a folder of images with same-named ``.txt`` captions (``dalle.data.folder`` rules);
- a ``.tsv``/``.csv`` of ``path, caption`` rows (paths relative to the table's folder);
- WebDataset tars: a brace pattern (``data/{00000..00099}.tar``), one ``.tar`` file, or a folder holding
  ``*.tar`` files and no images. Members ``KEY.jpg``/``.jpeg``/``.png``/``.webp`` + ``KEY.txt`` make a sample;
  other members (``KEY.json``) are ignored. Tars are read with the ``webdataset`` library, one member at a time,
  so memory does not grow with the shard or the dataset.

A source is cut into ``units`` (a tar file each, or ``chunk_size`` candidate pairs of a folder/table in sorted
order). ``samples(rank, world, worker, num_workers)`` reads the units ``i`` with
``i % (world * num_workers) == rank * num_workers + worker``, so every unit is read by exactly one process and
DataLoader worker per epoch. Unusable samples are skipped and counted by reason in a ``collections.Counter``:
missing_caption, empty_caption, short_caption, non_english, unreadable_caption, missing_image, corrupt_image
(an image that does not open, or opens and fails to decode: a truncated file), aspect (outside
[1 / max_aspect, max_aspect]), truncated_tar (a tar that ends early: counted once per tar, as the samples after
the cut cannot be known; the samples before it are read), bad_row (a table row without a caption column).
"""
from __future__ import annotations

import io
import math
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

from PIL import Image

from .folder import IMAGE_EXTENSIONS, _key_hash, _keys, _pairs_from_folder, _pairs_from_table
from .transforms import aspect_ok, caption_problem, to_rgb

KINDS = ("folder", "table", "webdataset")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes, in the order one is picked
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # a tar that ends early or is damaged


class Sample(NamedTuple):
    """One usable pair. ``key``: unique within the source (webdataset: the tar member key; folder/table: the path
    relative to the folder / the table's folder). ``image``: decoded (``load()`` done), RGB. ``caption``:
    whitespace-normalized."""
    key: str
    image: Image.Image
    caption: str


def is_heldout(key: str, fraction: float) -> bool:
    """Whether sample ``key`` is in the held-out split of size ``fraction``: the same answer on every machine and
    process (``int(sha1(key)[:8 hex], 16) / 2**32 < fraction``; Python's ``hash`` is salted per process)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return _key_hash(key) < fraction


def _decode_image(read) -> Image.Image | None:
    """The RGB image ``read()`` opens, fully decoded; None when it fails to open or to decode."""
    try:
        with read() as im:
            im.load()  # a truncated file opens (the header is there) and fails here
            return to_rgb(im)
    except Exception:  # noqa: BLE001 - any decoder failure means "unusable image"
        return None


def _check_caption(caption, skipped: Counter, min_words: int) -> str | None:
    """The normalized caption, or None with the reason counted."""
    if caption is None:
        skipped["unreadable_caption"] += 1
        return None
    problem = caption_problem(caption, min_words=min_words)
    if problem:
        skipped[problem] += 1
        return None
    return " ".join(caption.split())


class Source:
    """A readable image/caption source; made by ``open_source``.

    ``path``: the folder, table or tar file (absolute) or the brace pattern as given (made absolute).
    ``kind``: "folder" | "table" | "webdataset". ``units``: deterministic order; webdataset: one per tar file
    (its path); folder/table: ``"folder[a:b]"`` / ``"table[a:b]"``, the positions of each chunk of ``chunk_size``
    candidate pairs in sorted key order.
    """

    def __init__(self, path: str, kind: str, units: list[str], *, min_words: int, max_aspect: float,
                 pairs=None, listing_skipped: Counter | None = None, chunk_size: int = 1000):
        self.path, self.kind, self.units = path, kind, units
        self.min_words, self.max_aspect, self.chunk_size = min_words, max_aspect, chunk_size
        self._pairs = pairs  # folder/table: [(key, image path, caption or None)] in sorted key order
        self._listing_skipped = listing_skipped or Counter()  # found while listing; counted with unit 0

    def __repr__(self) -> str:
        return f"Source({self.path!r}, kind={self.kind!r}, units={len(self.units)})"

    def unit_indices(self, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The units process ``rank`` of ``world``, DataLoader ``worker`` of ``num_workers``, reads."""
        for name, v, lo in (("world", world, 1), ("num_workers", num_workers, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        for name, v, n in (("rank", rank, world), ("worker", worker, num_workers)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise ValueError(f"{name} must be an int in [0, {n}), got {v!r}")
        slot, slots = rank * num_workers + worker, world * num_workers
        return [i for i in range(len(self.units)) if i % slots == slot]

    def samples(self, rank: int = 0, world: int = 1, worker: int = 0, num_workers: int = 1,
                skipped: Counter | None = None) -> Iterator[Sample]:
        """Every usable sample of this process's and worker's units (``unit_indices``), in order; skips are
        counted into ``skipped`` when given."""
        skipped = Counter() if skipped is None else skipped
        for i in self.unit_indices(rank, world, worker, num_workers):
            yield from self.iter_unit(i, skipped)

    def iter_unit(self, i: int, skipped: Counter) -> Iterator[Sample]:
        """Every usable sample of unit ``i`` in a deterministic order; bad ones skipped and counted by reason
        into ``skipped`` (a ``collections.Counter``)."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.units):
            raise IndexError(f"unit {i!r} out of range for a source of {len(self.units)} units")
        if not isinstance(skipped, Counter):
            raise TypeError(f"skipped must be a collections.Counter, got {type(skipped).__name__}")
        if self.kind == "webdataset":
            yield from self._iter_tar(self.units[i], skipped)
            return
        if i == 0:
            skipped.update(self._listing_skipped)
        for key, image_path, caption in self._pairs[i * self.chunk_size:(i + 1) * self.chunk_size]:
            caption = _check_caption(caption, skipped, self.min_words)
            if caption is None:
                continue
            if not image_path.exists():
                skipped["missing_image"] += 1
                continue
            image = _decode_image(lambda: Image.open(image_path))
            sample = self._finish(key, image, caption, skipped)
            if sample is not None:
                yield sample

    def _finish(self, key: str, image: Image.Image | None, caption: str, skipped: Counter) -> Sample | None:
        if image is None:
            skipped["corrupt_image"] += 1
            return None
        if not aspect_ok(*image.size, max_aspect=self.max_aspect):
            skipped["aspect"] += 1
            return None
        return Sample(key, image, caption)

    def _iter_tar(self, url: str, skipped: Counter) -> Iterator[Sample]:
        import webdataset as wds

        errors, started = [], []

        def handler(exn: Exception) -> bool:
            if isinstance(exn, _TAR_ERRORS):
                errors.append(exn)
                return True  # the tar is cut short here: keep what was read, go on with the next unit
            return False  # anything else is a bug: webdataset re-raises it

        def note(fname: str) -> str:
            started[:] = [fname]  # the member being read when the tar ends is the one cut short
            return fname

        groups = wds.tariterators.tarfile_samples([{"url": url}], handler=handler, rename_files=note)
        held = None  # one group is held back: if the tar ends inside it, it is incomplete
        for group in groups:
            if held is not None:
                yield from self._tar_sample(held, skipped)
            held = group
        truncated = bool(errors) or not _ends_cleanly(url)
        if held is not None:
            last_key, last_suffix = wds.tariterators.base_plus_ext(started[0]) if started else (None, None)
            whole = "txt" in held and any(s in held for s in TAR_IMAGE_SUFFIXES)
            cut_short = errors and (last_suffix or "").lower() in TAR_IMAGE_SUFFIXES + ("txt",)
            if truncated and held["__key__"] == last_key and (cut_short or not whole):
                held = None  # the sample the tar ends in: counted below (an ignored .json cut short is fine)
            else:
                yield from self._tar_sample(held, skipped)
        if truncated:
            skipped["truncated_tar"] += 1

    def _tar_sample(self, group: dict, skipped: Counter) -> Iterator[Sample]:
        raw = group.get("txt")
        if raw is None:
            skipped["missing_caption"] += 1
            return
        try:
            caption = raw.decode("utf-8")
        except UnicodeDecodeError:
            caption = None
        caption = _check_caption(caption, skipped, self.min_words)
        if caption is None:
            return
        data = next((group[s] for s in TAR_IMAGE_SUFFIXES if s in group), None)
        if data is None:
            skipped["missing_image"] += 1
            return
        sample = self._finish(group["__key__"], _decode_image(lambda: Image.open(io.BytesIO(data))), caption,
                              skipped)
        if sample is not None:
            yield sample


def _ends_cleanly(path: str) -> bool:
    """A tar file that ends with the end-of-archive marker (two zero blocks). Python's tarfile, reading a stream,
    takes a file cut between members or inside a header for a normal end; this check tells them apart."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read(1024)
    except OSError:
        return False
    return size % 512 == 0 and len(tail) == 1024 and not any(tail)


def _expand_pattern(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def is_webdataset(path) -> bool:
    """Whether ``path`` names WebDataset tars by ``open_source``'s rule: a brace pattern (that is not itself an
    existing path), a ``.tar`` file, or a folder holding ``.tar`` files and no images. Lists nothing else."""
    text = str(path)
    p = Path(text)
    if "{" in text and ".." in text and not p.exists():
        return True
    if p.is_file():
        return p.suffix.lower() == ".tar"
    return p.is_dir() and not any(_is_image(q) for q in p.rglob("*")) and any(q.is_file() for q in p.glob("*.tar"))


def open_source(path, *, min_words: int = 2, max_aspect: float = 2.0, chunk_size: int = 1000) -> Source:
    """The source at ``path`` (see the module docstring for the kinds). ``min_words``/``max_aspect``: the
    caption-length and aspect-ratio filters. ``chunk_size``: candidate pairs per unit of a folder/table.

    ValueError naming ``path`` when it does not exist, nothing matches (an empty folder, a brace pattern whose
    files are missing), or the kind cannot be told (a file that is not a table or a tar).
    """
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 0:
        raise ValueError(f"min_words must be a non-negative int, got {min_words!r}")
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, (int, float)) or not 1.0 <= max_aspect < math.inf:
        raise ValueError(f"max_aspect must be a finite number >= 1 (width / height allowed in "
                         f"[1 / max_aspect, max_aspect]), got {max_aspect!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or a Path, got {type(path).__name__}")
    text = str(path)
    opts = dict(min_words=min_words, max_aspect=max_aspect, chunk_size=chunk_size)
    if "{" in text and ".." in text and not Path(text).exists():
        files = [str(Path(f).absolute()) for f in _expand_pattern(text)]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"{text}: {len(missing)} of the {len(files)} tar files the pattern names are missing "
                             f"(first: {missing[0]})")
        return Source(str(Path(text).absolute()), "webdataset", files, **opts)
    p = Path(text).absolute()
    if not p.exists():
        raise ValueError(f"no such file or folder: {text} (expected an image folder, a .tsv/.csv table, a .tar "
                         f"or a brace pattern like data/{{00000..00009}}.tar)")
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return Source(str(p), "webdataset", [str(p)], **opts)
        if p.suffix.lower() in (".tsv", ".csv"):
            pairs, skipped = _pairs_from_table(p)
            keyed = _keyed(pairs, p.parent)
            return _chunked(str(p), "table", keyed, skipped, text, opts)
        raise ValueError(f"{text}: cannot tell the kind of source (expected an image folder, a .tsv/.csv table, "
                         f"a .tar or a brace pattern of .tar files)")
    if any(_is_image(q) for q in p.rglob("*")):
        pairs, skipped = _pairs_from_folder(p)
        return _chunked(str(p), "folder", _keyed(pairs, p), skipped, text, opts)
    tars = sorted(str(q) for q in p.glob("*.tar") if q.is_file())
    if tars:
        return Source(str(p), "webdataset", tars, **opts)
    raise ValueError(f"{text}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")


def _keyed(pairs, root: Path) -> list[tuple[str, Path, str | None]]:
    """``(key, path, caption)`` sorted by key; the key is the path relative to ``root`` (absolute when outside
    it); a path listed again (a table may) gets ``#2``, ``#3``, ... so keys stay unique."""
    keys = _keys([path for path, _ in pairs], root)  # the keys ImageCaptionDataset gives the same pairs
    out = [(key, Path(path), caption) for key, (path, caption) in zip(keys, pairs)]
    out.sort(key=lambda t: t[0])
    return out


def _chunked(path: str, kind: str, pairs, skipped: Counter, text: str, opts: dict) -> Source:
    if not pairs and not skipped:
        raise ValueError(f"{text}: no image/caption pairs found")
    size = opts["chunk_size"]
    n_units = max(1, -(-len(pairs) // size))
    units = [f"{kind}[{i * size}:{min(len(pairs), (i + 1) * size)}]" for i in range(n_units)]
    return Source(path, kind, units, pairs=pairs, listing_skipped=skipped, **opts)
