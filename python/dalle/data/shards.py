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
        except (OSError, ValueError):
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


def _codes_header(path: Path) -> tuple[tuple, np.dtype]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


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
        try:
            m = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: unreadable manifest ({e}); rerun `{ENCODE_HINT} {self.folder}`") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"{path}: not a token-shards manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                             f"expected {FORMAT!r})")
        if m.get("version") != VERSION:
            raise ValueError(f"{path}: token-shards version {m.get('version')!r}, this reader knows version {VERSION}")
        if m.get("complete") is not True:
            raise ValueError(f"{path}: the encode is incomplete; finish it with `{ENCODE_HINT} {self.folder}`")
        self.manifest = m
        dvae = m["dvae"]
        self.grid = (int(dvae["grid"][0]), int(dvae["grid"][1]))
        self.vocab_size, self.crops = int(dvae["vocab_size"]), int(m["crops"])
        self.dvae_digest, self.dvae_path = dvae["digest"], dvae["path"]
        self._names = [s["name"] for s in m["shards"]]
        want = (self.crops, self.grid[0] * self.grid[1])
        shard_ids, rows, starts = [], [], [0]
        for k, s in enumerate(m["shards"]):
            stem = self.folder / s["name"]
            for suffix in (".codes.npy", ".jsonl"):
                if not Path(f"{stem}{suffix}").is_file():
                    raise ValueError(f"{self.folder}: shard file {stem.name}{suffix} is missing; rerun "
                                     f"`{ENCODE_HINT} {self.folder}` with the same settings to remake it")
            shape, dtype = _codes_header(Path(f"{stem}.codes.npy"))
            if dtype != np.uint16 or shape != (s["samples"], *want):
                raise ValueError(f"{self.folder}: {stem.name}.codes.npy holds {dtype} {shape}, the manifest says "
                                 f"uint16 {(s['samples'], *want)}")
            r = self._split_rows(k, s)
            shard_ids.append(np.full(len(r), k, np.int32))
            rows.append(r)
            starts.append(starts[-1] + len(r))
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
        flags = np.fromiter((json.loads(line)["heldout"] for line in self._lines(k)), dtype=bool)
        if len(flags) != n or int(flags.sum()) != held:
            raise ValueError(f"{self.folder}: {self._names[k]}.jsonl does not match its manifest entry "
                             f"({len(flags)} lines, {int(flags.sum())} held out; expected {n}, {held})")
        return np.flatnonzero(flags if self.split == "heldout" else ~flags).astype(np.int32)

    def _lines(self, k: int) -> Iterator[str]:
        with open(self.folder / f"{self._names[k]}.jsonl", encoding="utf-8") as f:
            yield from f

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
            data = np.fromfile(self.folder / f"{self._names[k]}.jsonl", dtype=np.uint8)
            ends = np.flatnonzero(data == ord("\n")) + 1
            starts = np.concatenate([[0], ends]).astype(np.uint32 if len(data) < 2**32 else np.uint64)
            self._starts_of[k] = starts
        return starts

    def _record(self, k: int, r: int) -> dict:
        starts = self._line_starts(k)
        with open(self.folder / f"{self._names[k]}.jsonl", "rb") as f:
            f.seek(int(starts[r]))
            return json.loads(f.read(int(starts[r + 1]) - int(starts[r])))

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
            recs = [json.loads(line)["caption"] for line in self._lines(k)]
            for r in rows:
                yield recs[r]
