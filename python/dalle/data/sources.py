"""Image/caption sources read as a stream of units: an image folder, a (path, caption) table, or WebDataset tar
shards as img2dataset writes them.

``open_source(path)`` tells the kind from ``path``:
- a folder of images with same-named ``.txt`` captions (``dalle.data.folder`` rules);
- a ``.tsv``/``.csv`` of ``path, caption`` rows (paths relative to the table's folder);
- WebDataset tars: a brace pattern (``data/{00000..00099}.tar``), one ``.tar`` file, or a folder holding
  ``*.tar`` files and no images. Tars are read with the ``webdataset`` library, one member at a time, so memory
  does not grow with the shard or the dataset.

Keys, one rule for every reader (``dalle.data.folder.split_key``; img2dataset's keys are the reference): a
file's or member's key is its name without the last extension, its field the extension lowercased. Members
``KEY.jpg`` (or another image extension of ``IMAGE_EXTENSIONS``) + ``KEY.txt`` make the sample ``KEY``, in a
folder as in a tar, so ``photo.v2.jpg`` + ``photo.v2.txt`` is the sample ``photo.v2`` in both; other members
(``KEY.json``) are ignored. In a tar, the members of a sample are consecutive (as img2dataset writes them).

A source is cut into ``units`` (a tar file each, or ``chunk_size`` candidate pairs of a folder/table in sorted
key order). ``samples(rank, world, worker, num_workers)`` reads the units ``i`` with
``i % (world * num_workers) == rank * num_workers + worker``, so every unit is read by exactly one process and
DataLoader worker per epoch. ``unit_inputs(i)`` lists what a unit holds (each sample's key and a digest of its
bytes) without decoding it. Unusable samples are skipped and counted by reason in a ``collections.Counter``,
and reading goes on with the next sample:
- members: repeated_member (a field twice in one sample: ``KEY.jpg`` twice, ``KEY.jpg`` + ``KEY.JPG``, the
  caption twice), conflicting_member (two images: ``KEY.jpg`` + ``KEY.png``), repeated_key (a tar whose
  sample ``KEY`` comes back after other samples), missing_caption, missing_image;
- captions: unreadable_caption (not UTF-8 nor UTF-8/16/32 with a byte-order mark, or control characters such
  as the NULs of UTF-16 without its mark), caption_too_large (over ``MAX_CAPTION_BYTES``, not read past it),
  empty_caption, short_caption, non_english;
- images: image_too_large (a file over ``MAX_IMAGE_BYTES``, not read past it, or more pixels than PIL's
  decompression-bomb limit), corrupt_image (does not open, or opens and fails to decode: a truncated file),
  aspect (outside [1 / max_aspect, max_aspect]);
- files: truncated_tar (a tar that ends early: counted once per tar, as the samples after the cut cannot be
  known; the samples before it are read), bad_row (a table row without a caption column, one csv cannot parse,
  or whose path is not text).
"""
from __future__ import annotations

import hashlib
import io
import math
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

from PIL import Image

from .folder import (CAPTION_FIELD, IMAGE_EXTENSIONS, IMAGE_FIELDS, MAX_CAPTION_BYTES, MAX_IMAGE_BYTES, Pair,
                     _key_hash, _pairs_from_folder, _pairs_from_table, decode_caption, member_problem,
                     read_limited, split_key)
from .transforms import aspect_ok, caption_problem, to_rgb

KINDS = ("folder", "table", "webdataset")
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # a tar that ends early or is damaged


class Sample(NamedTuple):
    """One usable pair. ``key``: unique within the source (``dalle.data.folder.split_key``: the tar member name or
    the path relative to the folder / the table's folder, without its last extension). ``image``: decoded
    (``load()`` done), RGB. ``caption``: whitespace-normalized."""
    key: str
    image: Image.Image
    caption: str


def is_heldout(key: str, fraction: float) -> bool:
    """Whether sample ``key`` is in the held-out split of size ``fraction``: the one held-out rule of every command
    (``dalle.data.folder.heldout_split`` applies it to a list), the same answer on every machine and process
    (``int(sha1(key)[:8 hex], 16) / 2**32 < fraction``; Python's ``hash`` is salted per process)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return _key_hash(key) < fraction


def _decode_image(data: bytes) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` fully decoded from ``data``, or ``(None, reason)``: ``image_too_large`` (more pixels
    than PIL's decompression-bomb limit allows), ``corrupt_image`` (does not open, or fails to decode)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a truncated file opens (the header is there) and fails here
            return to_rgb(im), None
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except Exception:  # noqa: BLE001 - any decoder failure means "unusable image"
        return None, "corrupt_image"


class _Candidate(NamedTuple):
    """A sample as read, before it is checked: ``caption`` / ``image`` (bytes) are None with their reason in
    ``caption_problem`` / ``image_problem``; ``problem``: a reason found in its members (``member_problem``)."""
    key: str
    digest: str
    problem: str | None
    caption: str | None
    caption_problem: str | None
    image: bytes | None
    image_problem: str | None


def _digest(parts) -> str:
    """Digest of a sample's bytes: ``parts`` (name, bytes) in order, each length-prefixed."""
    h = hashlib.blake2b(digest_size=16)
    for name, data in parts:
        for b in (name.encode("utf-8", "surrogateescape"), data):
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def _read_file(path: Path, limit: int) -> tuple[bytes | None, str | None, bytes]:
    """``(data, None, data)`` or ``(None, reason, marker)``: the file's bytes, or why not (``missing``,
    ``too_large``) and what the digest covers instead."""
    try:
        data = read_limited(path, limit)
    except OSError:
        return None, "missing", b"\0missing"
    if data is None:
        return None, "too_large", b"\0too large"
    return data, None, data


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
        self._pairs = pairs  # folder/table: [dalle.data.folder.Pair] in sorted key order
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

    def _check_unit(self, i) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.units):
            raise IndexError(f"unit {i!r} out of range for a source of {len(self.units)} units")

    def iter_unit(self, i: int, skipped: Counter, inputs: list | None = None) -> Iterator[Sample]:
        """Every usable sample of unit ``i`` in a deterministic order; bad ones skipped and counted by reason
        into ``skipped`` (a ``collections.Counter``). ``inputs``, when given, gets ``[key, digest]`` of every
        sample read, usable or not (``unit_inputs``)."""
        self._check_unit(i)
        if not isinstance(skipped, Counter):
            raise TypeError(f"skipped must be a collections.Counter, got {type(skipped).__name__}")
        for c in self._candidates(i, skipped):
            if inputs is not None:
                inputs.append([c.key, c.digest])
            sample = self._check(c, skipped)
            if sample is not None:
                yield sample

    def unit_inputs(self, i: int) -> list[list[str]]:
        """``[key, digest]`` of every sample of unit ``i`` in reading order, usable or not: what the unit holds,
        read without decoding an image (the digest covers the bytes of the sample's files or members)."""
        self._check_unit(i)
        return [[c.key, c.digest] for c in self._candidates(i, Counter())]

    def _candidates(self, i: int, skipped: Counter) -> Iterator[_Candidate]:
        if self.kind == "webdataset":
            yield from self._tar_candidates(self.units[i], skipped)
            return
        if i == 0:
            skipped.update(self._listing_skipped)
        for pair in self._pairs[i * self.chunk_size:(i + 1) * self.chunk_size]:
            yield self._pair_candidate(pair)

    def _pair_candidate(self, pair: Pair) -> _Candidate:
        parts, caption, caption_why, image, image_why = [], None, None, None, None
        for f in pair.files:
            field = split_key(f.name)[1] or ""
            is_image = f == pair.image
            data, why, marker = _read_file(f, MAX_IMAGE_BYTES if is_image or field != CAPTION_FIELD
                                           else MAX_CAPTION_BYTES)
            parts.append(("image" if is_image else field, marker))
            if is_image:
                image, image_why = data, {"missing": "missing_image", "too_large": "image_too_large"}.get(why)
            elif f == pair.caption:
                caption_why = {"missing": "unreadable_caption", "too_large": "caption_too_large"}.get(why)
                caption = decode_caption(data) if data is not None else None
                caption_why = caption_why or (None if caption is not None else "unreadable_caption")
        if isinstance(pair.caption, str) or (pair.caption is None and self.kind == "table"):
            caption = pair.caption  # a table's caption: clean text, or None when the row was not text
            caption_why = None if caption is not None else "unreadable_caption"
            parts.append(("caption", (caption or "").encode("utf-8", "surrogateescape")))
        elif pair.caption is None and not pair.problem:
            caption_why = "missing_caption"
        if pair.image is None and not image_why:
            image_why = "missing_image"
        return _Candidate(pair.key, _digest(parts), pair.problem, caption, caption_why, image, image_why)

    def _check(self, c: _Candidate, skipped: Counter) -> Sample | None:
        """The usable sample ``c`` makes, or None with the reason counted (members, caption, image, aspect)."""
        why = c.problem or c.caption_problem
        if not why:
            why = caption_problem(c.caption, min_words=self.min_words) or c.image_problem
        image = None
        if not why:
            image, why = _decode_image(c.image)
        if not why and not aspect_ok(*image.size, max_aspect=self.max_aspect):
            why = "aspect"
        if why:
            skipped[why] += 1
            return None
        return Sample(c.key, image, " ".join(c.caption.split()))

    def _tar_candidates(self, url: str, skipped: Counter) -> Iterator[_Candidate]:
        """The samples of one tar, read with webdataset's tar reader (one member at a time) and grouped by
        ``split_key``: consecutive members with the same key make one sample. A sample whose members repeat or
        conflict (``member_problem``), or whose key came earlier in the tar (``repeated_key``), is skipped and
        counted, and the rest of the tar is read."""
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

        streams = wds.tariterators.url_opener([{"url": url}], handler=handler)
        members = wds.tariterators.tar_file_expander(streams, handler=handler, rename_files=note, eof_value=None)
        seen: set[str] = set()
        held = None  # one group is held back: if the tar ends inside it, it is incomplete
        for key, group in _group_members(members):
            if held is not None:
                yield self._tar_candidate(*held, seen)
            held = (key, group)
        truncated = bool(errors) or not _ends_cleanly(url)
        if held is not None:
            last_key, last_field = split_key(started[0]) if started else (None, None)
            whole = member_problem(f for f, _ in held[1]) is None
            cut_short = errors and (last_field or "") in IMAGE_FIELDS + (CAPTION_FIELD,)
            if not (truncated and held[0] == last_key and (cut_short or not whole)):
                yield self._tar_candidate(*held, seen)  # else the sample the tar ends in: counted below
        if truncated:
            skipped["truncated_tar"] += 1

    @staticmethod
    def _tar_candidate(key: str, group: list[tuple[str, bytes]], seen: set) -> _Candidate:
        fields = [f for f, _ in group]
        problem = "repeated_key" if key in seen else member_problem(fields)
        seen.add(key)
        if problem == "missing_image":
            problem = None  # counted after the caption's checks, as in every reader
        caption, caption_why, image, image_why = None, None, None, None
        if not problem:
            raw = next(d for f, d in group if f == CAPTION_FIELD)
            if len(raw) > MAX_CAPTION_BYTES:
                caption_why = "caption_too_large"
            else:
                caption = decode_caption(raw)
                caption_why = None if caption is not None else "unreadable_caption"
            image = next((d for f, d in group if f in IMAGE_FIELDS), None)
            image_why = "missing_image" if image is None else "image_too_large" if len(image) > MAX_IMAGE_BYTES \
                else None
            image = None if image_why else image
        return _Candidate(key, _digest(group), problem, caption, caption_why, image, image_why)


def _group_members(members) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """``(key, [(field, bytes), ...])`` for each run of consecutive members with the same key
    (``split_key``); members without a key (no extension, hidden names) are not part of any sample."""
    key, group = None, []
    for m in members:
        k, field = split_key(m["fname"])
        if k is None:
            continue
        if k != key and group:
            yield key, group
            group = []
        key = k
        group.append((field, m["data"]))
    if group:
        yield key, group


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
            return _chunked(str(p), "table", sorted(pairs, key=lambda q: q.key), skipped, text, opts)
        raise ValueError(f"{text}: cannot tell the kind of source (expected an image folder, a .tsv/.csv table, "
                         f"a .tar or a brace pattern of .tar files)")
    if any(_is_image(q) for q in p.rglob("*")):
        pairs, skipped = _pairs_from_folder(p)
        return _chunked(str(p), "folder", pairs, skipped, text, opts)
    tars = sorted(str(q) for q in p.glob("*.tar") if q.is_file())
    if tars:
        return Source(str(p), "webdataset", tars, **opts)
    raise ValueError(f"{text}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")


def _chunked(path: str, kind: str, pairs, skipped: Counter, text: str, opts: dict) -> Source:
    if not pairs and not skipped:
        raise ValueError(f"{text}: no image/caption pairs found")
    size = opts["chunk_size"]
    n_units = max(1, -(-len(pairs) // size))
    units = [f"{kind}[{i * size}:{min(len(pairs), (i + 1) * size)}]" for i in range(n_units)]
    return Source(path, kind, units, pairs=pairs, listing_skipped=skipped, **opts)
