"""Token shards: images encoded once by a frozen dVAE, stored as memory-mapped uint16 codes + captions.

Layout of a shards folder (written by ``python -m dalle.encode``)::

    manifest.json              written last, atomically, once every shard is done (``"complete": true``)
    shard-00000.codes.npy      uint16 (n, K, h*w): K crops per image, codes in raster order (np.save)
    shard-00000.jsonl          n lines {"key": ..., "caption": ..., "heldout": true|false}
    shard-00000.json           the shard's manifest entry, written last: its presence means the shard is done;
                               it also records the settings and ``inputs``, [key, digest] of every sample its
                               source unit held (usable or skipped), so a resume knows a changed unit

``manifest.json``: ``{"format": "dalle-token-shards", "version": 1, "source", "source_kind", "dvae": {"path",
"digest", "image_size", "grid": [h, w], "vocab_size"}, "crops", "heldout_fraction", "seed", "shards": [{"name",
"unit", "samples", "heldout", "skipped"}, ...], "samples", "heldout", "skipped", "complete": true}``.

``TokenShards(folder, split)`` reads them with memory that stays flat as the data grows: the codes are
memory-mapped (as many shards' maps open at once as a quarter of the open-file limit allows; the pages read
count as resident but are file cache the system reclaims); a caption is read from its line (the byte offsets of a shard's
lines are found the first time it is read, 4 bytes a sample); ``iter_captions`` holds one shard's captions at a
time; the split's index keeps 8 bytes per sample.
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..common import _atomic_write

FORMAT, VERSION = "dalle-token-shards", 1
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout", "all")
ENCODE_HINT = "python -m dalle.encode --data SRC --dvae DVAE --out"


def content_digest(folder) -> str:
    """The first 16 hex digits of a SHA-256 over ``manifest.json`` and every shard's entry (``shard-NNNNN.json``,
    which lists the key and a digest of the source bytes of every sample the shard holds): it changes when any
    image or caption the shards were encoded from changes, without reading the codes themselves."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256((folder / MANIFEST).read_bytes())
    for entry in sorted(folder.glob("shard-*.json")):
        h.update(entry.name.encode() + b"\0" + entry.read_bytes())
    return h.hexdigest()[:16]


def shard_name(index: int) -> str:
    """The file stem of shard ``index`` (one shard per source unit, numbered by unit)."""
    return f"shard-{index:05d}"


def write_json(path, obj) -> Path:
    """``obj`` as JSON at ``path``, atomically (a crash leaves the old file or the new one)."""
    return _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


class ShardWriter:
    """Writes the shards of one folder, each file atomically (temporary file + ``os.replace``), the shard's
    ``.json`` entry last, so a killed run leaves only finished shards marked done."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def entry_path(self, index: int) -> Path:
        return self.folder / f"{shard_name(index)}.json"

    def read_entry(self, index: int) -> dict | None:
        """The finished shard's entry, or None when it is not done (or its entry is unreadable)."""
        try:
            return json.loads(self.entry_path(index).read_text())
        except (OSError, ValueError, RecursionError):
            return None

    def write(self, index: int, codes: np.ndarray, records: list[dict], entry: dict) -> Path:
        """Shard ``index``: ``codes`` uint16 (n, K, h*w), ``records`` n dicts {"key", "caption", "heldout"},
        then ``entry`` (the manifest entry plus whatever the writer records to recognise it on resume)."""
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint16 or codes.ndim != 3:
            raise TypeError(f"codes must be a uint16 array (n, K, h*w), got {getattr(codes, 'dtype', codes)} "
                            f"{getattr(codes, 'shape', '')}")
        if len(records) != codes.shape[0]:
            raise ValueError(f"records ({len(records)}) and codes ({codes.shape[0]}) must have the same length")
        stem = self.folder / shard_name(index)
        # a shard written again (its unit changed): the manifest no longer describes the folder, and the old entry
        # must not mark the new files done before they are all there
        (self.folder / MANIFEST).unlink(missing_ok=True)
        self.entry_path(index).unlink(missing_ok=True)
        _atomic_write(f"{stem}.codes.npy", lambda f: np.save(f, np.ascontiguousarray(codes), allow_pickle=False))
        lines = "".join(json.dumps({"key": r["key"], "caption": r["caption"], "heldout": bool(r["heldout"])})
                        + "\n" for r in records)
        _atomic_write(f"{stem}.jsonl", lambda f: f.write(lines.encode()))
        return write_json(self.entry_path(index), entry)


MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest.json larger than this is refused, not read
_SHARD_NAME = re.compile(r"shard-[0-9]{5,9}")


class ShardError(ValueError):
    """A token-shards file that does not add up (one line: the file, the field, what was expected)."""


def _codes_header(path: Path, want: tuple) -> int:
    """Check the ``.npy`` header of ``path`` against ``want`` (the shape the manifest gives: (n, K, h*w)) and the
    file's size; returns the data's offset. ShardError naming the file and the field otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ShardError(f"{path}: .npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except ShardError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise ShardError(f"{path}: not a readable .npy header ({e})") from None
    if dtype != np.dtype("<u2"):
        raise ShardError(f"{path}: dtype {dtype.str}, expected <u2 (little-endian uint16)")
    if fortran:
        raise ShardError(f"{path}: fortran_order True, expected False (C order, as the encoder writes)")
    if tuple(shape) != tuple(want):
        raise ShardError(f"{path}: shape {tuple(shape)}, the manifest says {tuple(want)}")
    need = offset + 2 * math.prod(want)
    if size != need:
        raise ShardError(f"{path}: {size} bytes, its header says {need} (header {offset} + data of shape "
                         f"{tuple(want)})")
    return offset


def _count(v, what: str, where, lo: int = 0, hi: int | None = None) -> int:
    """``v`` when it is an int in [lo, hi]; ShardError naming ``where`` and ``what`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ShardError(f"{where}: {what} is {v!r}, expected an int {span}")
    return v


def _parse_record(line: bytes | str, where: str) -> dict:
    """One jsonl record ``{"key": str, "caption": str, "heldout": bool}``; ShardError naming ``where``."""
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        r = None
    if not (isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("caption"), str)
            and isinstance(r.get("heldout"), bool)):
        raise ShardError(f"{where}: not a record {{\"key\": str, \"caption\": str, \"heldout\": bool}}")
    return r


def _maps_allowed() -> int:
    """How many shards' memory maps to keep open: each holds a file descriptor, so a quarter of the soft limit
    on open files (between 16 and 4096)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 16384 if soft == resource.RLIM_INFINITY else soft
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(16, min(4096, soft // 4))


class TokenShards:
    """The token shards in ``folder`` (written by ``python -m dalle.encode``), one split of them.

    ``split``: "train" (samples not held out), "heldout" or "all". Indices run over the split in shard order.
    Attributes: ``manifest`` (dict), ``grid`` (h, w), ``vocab_size``, ``crops`` (K), ``dvae_digest``,
    ``dvae_path``. ValueError naming the folder when the manifest is missing or incomplete (run or finish the
    encode), of another format or version, or a shard's files are missing or do not match it.

    Nothing read from the folder is trusted: every count, name and size in the manifest is checked (a shard name
    is ``shard-NNNNN``, never a path), each ``.codes.npy`` header against the manifest (dtype ``<u2``, C order,
    shape (n, K, h*w)) and against the file's size before it is mapped; a shard's ``.jsonl`` must hold as many
    well-formed lines as its entry says (checked when the shard is first read), and a code at or above the
    vocabulary size is refused when read. Each refusal is a ``ShardError`` (a ValueError), one line naming the
    file and the field. The manifest is read whole, so one over ``MAX_MANIFEST_BYTES`` is refused.
    """


    def __init__(self, folder, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.folder, self.split = Path(folder), split
        path = self.folder / MANIFEST
        if not path.is_file():
            if self.folder.is_dir() and any(self.folder.glob("shard-*.json")):
                raise ValueError(f"{self.folder}: no {MANIFEST}: the encode did not finish (run the same "
                                 f"`{ENCODE_HINT} {self.folder}` again: it resumes)")
            raise ValueError(f"{self.folder}: no {MANIFEST}; these are not token shards (python -m dalle.encode "
                             f"writes them: `python -m dalle.encode --data {self.folder} --dvae DVAE --out "
                             "TOKENS_DIR` if these are your images, then --data TOKENS_DIR)")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ShardError(f"{path}: {path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES} bytes a manifest "
                             f"may hold")
        try:
            m = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: unreadable manifest ({e}); rerun `{ENCODE_HINT} {self.folder}`") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"{path}: not a token-shards manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                             f"expected {FORMAT!r})")
        if m.get("version") != VERSION:
            raise ValueError(f"{path}: token-shards version {m.get('version')!r}, this reader knows version {VERSION}")
        if m.get("complete") is not True:
            raise ValueError(f"{path}: the encode is incomplete; finish it with `{ENCODE_HINT} {self.folder}`")
        self.manifest = m
        dvae = m.get("dvae")
        grid = dvae.get("grid") if isinstance(dvae, dict) else None
        if not (isinstance(grid, list) and len(grid) == 2):
            raise ShardError(f"{path}: dvae.grid is {grid!r}, expected [h, w]")
        self.grid = (_count(grid[0], "dvae.grid[0]", path, 1, 4096), _count(grid[1], "dvae.grid[1]", path, 1, 4096))
        self.vocab_size = _count(dvae.get("vocab_size"), "dvae.vocab_size", path, 1, 2**16)  # codes are uint16
        self.crops = _count(m.get("crops"), "crops", path, 1, 2**16)
        self.dvae_digest, self.dvae_path = dvae.get("digest"), dvae.get("path")
        if not isinstance(self.dvae_digest, str) or not isinstance(self.dvae_path, str):
            raise ShardError(f"{path}: dvae.digest and dvae.path must be strings")
        if not isinstance(m.get("shards"), list):
            raise ShardError(f"{path}: shards is {type(m.get('shards')).__name__}, expected a list")
        self._names, self._samples = [], []
        want = (self.crops, self.grid[0] * self.grid[1])
        shard_ids, rows, starts = [], [], [0]
        for k, s in enumerate(m["shards"]):
            where = f"{path}: shards[{k}]"
            name = s.get("name") if isinstance(s, dict) else None
            if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in self._names:
                raise ShardError(f"{where}.name is {name!r}, expected a new shard-NNNNN")
            n = _count(s.get("samples"), "samples", f"{where} ({name})", 0, 2**31 - 1)
            _count(s.get("heldout"), "heldout", f"{where} ({name})", 0, n)
            self._names.append(name)
            self._samples.append(n)
            stem = self.folder / name
            for suffix in (".codes.npy", ".jsonl"):
                if not Path(f"{stem}{suffix}").is_file():
                    raise ValueError(f"{self.folder}: shard file {stem.name}{suffix} is missing; rerun "
                                     f"`{ENCODE_HINT} {self.folder}` with the same settings to remake it")
            _codes_header(Path(f"{stem}.codes.npy"), (n, *want))
            r = self._split_rows(k, s)
            shard_ids.append(np.full(len(r), k, np.int32))
            rows.append(r)
            starts.append(starts[-1] + len(r))
        for field, total in (("samples", sum(self._samples)),
                             ("heldout", sum(s["heldout"] for s in m["shards"]))):
            if m.get(field) != total:
                raise ShardError(f"{path}: {field} is {m.get(field)!r}, its shards hold {total}")
        self._shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self._row = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        self._starts = np.asarray(starts, np.int64)  # split index range of each shard
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self.maps_open = _maps_allowed()  # random batches touch many shards: keep as many maps as fds allow
        self._starts_of: dict[int, np.ndarray] = {}  # line offsets of the shards read so far: 4 bytes a sample

    def _split_rows(self, k: int, s: dict) -> np.ndarray:
        """Rows of shard ``k`` in this split (int32); reads the held-out flags only for mixed shards."""
        n, held = int(s["samples"]), int(s["heldout"])
        if self.split == "all" or held == 0 or held == n:
            keep = self.split == "all" or (held == n) == (self.split == "heldout")
            return np.arange(n, dtype=np.int32) if keep else np.zeros(0, np.int32)
        flags = np.fromiter((r["heldout"] for r in self._records(k)), dtype=bool)
        if int(flags.sum()) != held:
            raise ValueError(f"{self.folder}: {self._names[k]}.jsonl does not match its manifest entry "
                             f"({len(flags)} lines, {int(flags.sum())} held out; expected {n}, {held})")
        return np.flatnonzero(flags if self.split == "heldout" else ~flags).astype(np.int32)

    def _records(self, k: int) -> Iterator[dict]:
        """Shard ``k``'s records in order, each checked (``_parse_record``), as many as its manifest entry says."""
        path = self.folder / f"{self._names[k]}.jsonl"
        count = 0
        with open(path, "rb") as f:
            for count, line in enumerate(f, 1):
                if count > self._samples[k]:
                    break
                if not line.endswith(b"\n"):
                    raise ShardError(f"{path}: {count - 1} lines and a cut one, the manifest says "
                                     f"{self._samples[k]} samples")
                yield _parse_record(line, f"{path} line {count}")
        if count != self._samples[k]:
            raise ShardError(f"{path}: {'more than ' if count > self._samples[k] else ''}{count} lines, the "
                             f"manifest says {self._samples[k]} samples")

    def __len__(self) -> int:
        return len(self._row)

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.folder)!r}, split={self.split!r}: {len(self)} samples, grid {self.grid}, "
                f"vocab {self.vocab_size}, crops {self.crops})")

    def _map(self, k: int) -> np.ndarray:
        mm = self._maps.pop(k, None)
        if mm is None:
            mm = np.load(self.folder / f"{self._names[k]}.codes.npy", mmap_mode="r", allow_pickle=False)
            while len(self._maps) >= self.maps_open:
                self._maps.popitem(last=False)
        self._maps[k] = mm
        return mm

    def _line_starts(self, k: int) -> np.ndarray:
        """Byte offsets of shard ``k``'s jsonl lines (n + 1 of them, uint32/uint64), found once per shard."""
        starts = self._starts_of.get(k)
        if starts is None:
            path = self.folder / f"{self._names[k]}.jsonl"
            data = np.fromfile(path, dtype=np.uint8)
            ends = np.flatnonzero(data == ord("\n")) + 1
            cut = bool(len(data)) and data[-1] != ord("\n")
            if len(ends) != self._samples[k] or cut:
                raise ShardError(f"{path}: {len(ends)} lines{' and a cut one' if cut else ''}, the manifest says "
                                 f"{self._samples[k]} samples")
            starts = np.concatenate([[0], ends]).astype(np.uint32 if len(data) < 2**32 else np.uint64)
            self._starts_of[k] = starts
        return starts

    def _record(self, k: int, r: int) -> dict:
        starts = self._line_starts(k)
        path = self.folder / f"{self._names[k]}.jsonl"
        with open(path, "rb") as f:
            f.seek(int(starts[r]))
            return _parse_record(f.read(int(starts[r + 1]) - int(starts[r])), f"{path} line {r + 1}")

    def _check_index(self, i) -> int:
        if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.is_floating_point():
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for the {self.split} split of {len(self)} samples")
        return int(i)

    def codes(self, idx: torch.Tensor, crop: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of split samples ``idx`` (LongTensor (B,)): LongTensor (B, h*w), raster order. ``crop``: which
        of the K stored crops, a (B,) integer tensor in [0, K) (None: crop 0)."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.ndim != 1:
            raise TypeError(f"idx must be an integer tensor (B,), got {getattr(idx, 'dtype', type(idx).__name__)} "
                            f"{tuple(getattr(idx, 'shape', ()))}")
        i = idx.cpu().numpy().astype(np.int64)
        if i.size and (i.min() < 0 or i.max() >= len(self)):
            raise IndexError(f"idx must be in [0, {len(self)}) for the {self.split} split, got [{i.min()}, {i.max()}]")
        if crop is None:
            c = np.zeros_like(i)
        else:
            if not isinstance(crop, torch.Tensor) or crop.dtype not in (torch.int64, torch.int32) or crop.shape != idx.shape:
                raise TypeError(f"crop must be an integer tensor of idx's shape {tuple(idx.shape)}, got "
                                f"{getattr(crop, 'dtype', type(crop).__name__)} {tuple(getattr(crop, 'shape', ()))}")
            c = crop.cpu().numpy().astype(np.int64)
            if c.size and (c.min() < 0 or c.max() >= self.crops):
                raise ValueError(f"crop must be in [0, {self.crops}), got [{c.min()}, {c.max()}]")
        out = np.empty((len(i), self.grid[0] * self.grid[1]), np.int64)
        shard, row = self._shard[i], self._row[i]
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._map(int(k))[row[sel], c[sel]]
            if out[sel].size and out[sel].max() >= self.vocab_size:
                raise ShardError(f"{self.folder / self._names[int(k)]}.codes.npy: code {int(out[sel].max())}, the "
                                 f"manifest's dvae.vocab_size is {self.vocab_size}")
        return torch.from_numpy(out)

    def _locate(self, i) -> tuple[int, int]:
        i = self._check_index(i)
        return int(self._shard[i]), int(self._row[i])

    def caption(self, i: int) -> str:
        """Caption of split sample ``i``."""
        return self._record(*self._locate(i))["caption"]

    def key(self, i: int) -> str:
        """Source key of split sample ``i`` (tar member key, or path relative to the folder / table)."""
        return self._record(*self._locate(i))["key"]

    def iter_captions(self) -> Iterator[str]:
        """The split's captions in index order, read shard by shard (one shard's captions in memory)."""
        for k in range(len(self._names)):
            lo, hi = self._starts[k], self._starts[k + 1]
            if hi == lo:
                continue
            rows = self._row[lo:hi]
            recs = [r["caption"] for r in self._records(k)]
            for r in rows:
                yield recs[r]
