"""Encode an image/caption source once into dVAE token shards (``dalle.data.shards``), for training the transformer.

    python -m dalle.encode --data SRC --dvae DVAE_FOLDER --out DIR [--crops K] [--heldout 0.02] [--workers N]

Every usable image is preprocessed for the transformer (as the paper's released code does: near-centre square crop, resize to a
random side in [S, 9/8 S], random S x S crop; ``--crops K`` stores K such crops) and encoded by the frozen dVAE
(argmax codes). The crop randomness is drawn from (seed, sample key, crop index), so a rerun, on any number of
processes or workers, writes the same codes. One output shard per source unit (a tar file, or ``--chunk-size``
pairs of a folder/table); a shard is done when its ``.json`` entry exists.

Resume is by content: each finished shard records which samples its unit held (key and a digest of the bytes of
each, usable or skipped: ``Source.unit_inputs``). A rerun reads every finished shard's unit again without decoding
it; a unit that holds the same samples is kept, one that changed (a pair added or removed, a file edited: in a
folder, a pair whose name sorts first moves every later pair to the next unit) is encoded again, with a line
saying what changed, so no sample is encoded twice or left out. Shards of units the source no longer has are
removed. A finished folder (``manifest.json``) made with other settings or another dVAE is refused, naming the
difference; an unfinished one (a killed or failed run) made with other settings is removed, with a line, and
the encode starts over. A run that finds no usable pair leaves nothing behind.
Under torchrun each rank (and each of its DataLoader workers) encodes its share of the units, split as
``Source.samples`` splits them (``i % world == rank`` with ``--workers 0``); rank 0 writes ``manifest.json`` last.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import cli
from .common import pretrained_files
from .data.shards import FORMAT, MANIFEST, VERSION, ShardWriter, shard_name, write_json
from .data.sources import Source, is_heldout, open_source
from .data.transforms import preprocess
from .engine import setup_distributed as _setup_distributed
from .runs import file_digest as _file_digest, load_dvae

PROG = "python -m dalle.encode"


class EncodeError(ValueError):
    """A source, dVAE or output folder the encode cannot use (the CLI prints it as one line, exit status 2)."""


@dataclass
class EncodeConfig:
    """Every setting of an encode, each declared once (default, accepted values, help): the flags of
    ``python -m dalle.encode`` are made from these fields (``--data``, ``--dvae`` and ``--out`` are required there)."""

    data: str = cli.option("", str, "an image folder with same-named .txt captions, a .tsv or .csv table of (path, "
                           "caption), a .tar, a folder of .tar shards or a brace pattern such as "
                           "<DIR>/{00000..00099}.tar", required=True)
    dvae: str = cli.option("", str, "the dVAE's folder (model.safetensors + config.json)", required=True)
    out: str = cli.option("", cli.output_dir, "folder to write the token shards into (a rerun resumes it)",
                          required=True)
    crops: int = cli.option(1, cli.positive_int, "random transformer crops stored per image")
    heldout: float = cli.option(0.02, cli.probability, "share of samples held out for evaluation (by a hash of the "
                                "key)")
    batch_size: int = cli.option(64, cli.positive_int, "images per dVAE forward pass")
    workers: int = cli.option(0, cli.nonneg_int, "DataLoader worker processes decoding images")
    chunk_size: int = cli.option(1000, cli.positive_int, "image folder or table: candidate pairs per shard")
    seed: int = cli.option(0, cli.nonneg_int, "seed of the random crops")
    device: str = cli.option("auto", cli.device, cli.DEVICE_HELP)
    progress: bool = cli.option(True, None, "progress bar")


def crop_generator(seed: int, key: str, crop: int) -> torch.Generator:
    """The generator of crop ``crop`` of sample ``key``: a function of (seed, key, crop) only (sha256, not
    Python's per-process ``hash``), so every process and rerun draws the same crop."""
    digest = hashlib.sha256(f"{seed}\0{crop}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def preprocess_crops(image, image_size: int, crops: int, seed: int, key: str) -> torch.Tensor:
    """uint8 (K, 3, S, S): the K transformer crops of one image."""
    return torch.stack([preprocess(image, image_size, "transformer", crop_generator(seed, key, c))
                        for c in range(crops)])


class _UnitBatches(torch.utils.data.IterableDataset):
    """Preprocessed batches of the units this rank and DataLoader worker read, each batch within one unit and
    cut at fixed positions (so batching, and with it the encoder's arithmetic, does not depend on the workers):
    ``(unit, {"keys", "captions", "heldout", "images" uint8 (b, K, 3, S, S) or None}, end or None)``; ``end``
    (a dict) marks the unit's last batch: ``{"skipped", "inputs", "changed"}``, or ``{"kept": True}`` (and no
    batch) for a finished shard whose unit still holds what it recorded.

    ``done``: the finished shards' entries by unit. A unit with an entry is read without decoding
    (``Source.unit_inputs``); it is kept when its samples (keys and digests of their bytes) are those the entry
    records, else encoded again and ``changed`` says how it differs."""

    def __init__(self, source: Source, done: dict, rank: int, world: int, num_workers: int, image_size: int,
                 crops: int, seed: int, heldout: float, batch: int):
        self.source, self.done, self.rank, self.world, self.num_workers = source, done, rank, world, num_workers
        self.image_size, self.crops, self.seed, self.heldout, self.batch = image_size, crops, seed, heldout, batch

    def _pack(self, buf):
        return {"keys": [b[0] for b in buf], "captions": [b[1] for b in buf], "heldout": [b[2] for b in buf],
                "images": torch.stack([b[3] for b in buf]) if buf else None}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for i in self.source.unit_indices(self.rank, self.world, worker, self.num_workers):
            changed = None
            if i in self.done:
                entry = self.done[i]
                changed = _changes(entry, self.source.units[i], self.source.unit_inputs(i))
                if changed is None:
                    yield i, None, {"kept": True}
                    continue
            skipped, inputs, buf = Counter(), [], []
            for s in self.source.iter_unit(i, skipped, inputs):
                buf.append((s.key, s.caption, is_heldout(s.key, self.heldout),
                            preprocess_crops(s.image, self.image_size, self.crops, self.seed, s.key)))
                if len(buf) == self.batch:
                    yield i, self._pack(buf), None
                    buf = []
            yield i, self._pack(buf), {"skipped": dict(skipped), "inputs": inputs, "changed": changed}


def _changes(entry: dict, unit: str, inputs: list) -> str | None:
    """How unit ``unit``, now holding ``inputs`` ([key, digest] in reading order), differs from what its finished
    shard's ``entry`` recorded, in words; None when it holds the same samples."""
    old = entry.get("inputs")
    if entry.get("unit") == unit and old == inputs:
        return None
    if not isinstance(old, list):
        return "its shard records no sample list"
    before = {k: d for k, d in (tuple(x) for x in old if isinstance(x, list) and len(x) == 2)}
    now = {k: d for k, d in inputs}
    added = [k for k in now if k not in before]
    removed = [k for k in before if k not in now]
    edited = [k for k in now if k in before and now[k] != before[k]]
    parts = [f"{len(v)} {word} ({', '.join(repr(k) for k in v[:3])}{', ...' if len(v) > 3 else ''})"
             for word, v in (("added", added), ("removed", removed), ("changed", edited)) if v]
    if entry.get("unit") != unit:
        parts.insert(0, f"unit {entry.get('unit')!r} is now {unit!r}")
    return "; ".join(parts) or "its samples are in another order"


def _settings(cfg: EncodeConfig, source: Source, dvae, digest: str, dvae_path: Path) -> dict:
    h, w = dvae.grid_size
    return {"format": FORMAT, "version": VERSION, "source": source.path, "source_kind": source.kind,
            "dvae": {"path": str(dvae_path.absolute()), "digest": digest, "image_size": dvae.cfg.image_size,
                     "grid": [h, w], "vocab_size": dvae.vocab_size},
            "crops": cfg.crops, "heldout_fraction": cfg.heldout, "seed": cfg.seed,
            "chunk_size": source.chunk_size if source.kind != "webdataset" else None,
            "min_words": source.min_words, "max_aspect": source.max_aspect}


# settings that decide the codes; the dVAE's path may move, its digest may not
_COMPARED = ("format", "version", "source", "source_kind", "crops", "heldout_fraction", "seed", "chunk_size",
             "min_words", "max_aspect")


def _difference(old: dict, new: dict) -> str | None:
    """The first setting in which ``old`` (found in the folder) and ``new`` (asked) differ, in words."""
    o, n = old.get("dvae") or {}, new["dvae"]
    if o.get("digest") != n["digest"]:
        return (f"dVAE: the folder's codes are from dVAE {o.get('digest')} ({o.get('path')}), this encode uses "
                f"{n['digest']} ({n['path']})")
    for k in _COMPARED:
        if old.get(k) != new[k]:
            return f"{k}: {old.get(k)!r} in the folder, {new[k]!r} asked"
    return None


class _Plan(NamedTuple):
    """What ``_check_folder`` found in ``--out``: ``done`` (finished shards' entries by unit, checked against the
    source's content as they are read), ``remove`` (shard indices whose files go: beyond the source's units, or
    an unfinished encode made with other settings) and ``note`` (a line saying why, or None)."""
    done: dict
    remove: list
    note: str | None


def _shard_indices(out: Path) -> list[int]:
    """Indices of the shard entries (``shard-NNNNN.json``) in ``out``; EncodeError for one of another name."""
    found = []
    for p in sorted(out.glob("shard-*.json")):
        stem = p.name[len("shard-"):-len(".json")]
        if not (stem.isdigit() and p.name == f"{shard_name(int(stem))}.json"):
            raise EncodeError(f"{p} is not a shard entry written by {PROG}; choose another --out")
        found.append(int(stem))
    return found


def _check_folder(out: Path, settings: dict, units: list[str]) -> _Plan:
    """What to keep and what to remove of ``out``'s shards (``_Plan``). EncodeError when ``out`` holds a
    finished encode (``manifest.json``) made with other settings or another dVAE, or files that are not ours.
    An unfinished encode (no manifest: killed, or failed) made with other settings is of no use to this one: its
    shards are removed, with a note, instead of refusing."""
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (ValueError, RecursionError):
            old = {}
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise EncodeError(f"{out} holds a {MANIFEST} that is not a token-shards manifest; choose another --out")
        why = _difference(old, settings)
        if why:
            raise EncodeError(f"{out} holds token shards made with other settings ({why}); use another --out or "
                              f"the same settings")
    done, entries = {}, {}
    for index in _shard_indices(out):
        p = out / f"{shard_name(index)}.json"
        try:
            entry = json.loads(p.read_text())
        except (ValueError, RecursionError):
            raise EncodeError(f"{p} is not a shard entry written by {PROG}; choose another --out") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            raise EncodeError(f"{p} is not a shard entry written by {PROG}; choose another --out")
        entries[index] = entry
    for index, entry in entries.items():
        why = _difference(entry["settings"], settings)
        if why and manifest.is_file():
            raise EncodeError(f"{out} holds token shards made with other settings ({why}); use another --out or "
                              f"the same settings")
        if why:
            return _Plan({}, sorted(entries), f"{out}: removing {len(entries)} shard(s) of an unfinished encode "
                                              f"made with other settings ({why}); encoding from the start")
    remove = [i for i in entries if i >= len(units)]
    for index, entry in entries.items():
        stem = out / shard_name(index)
        if index < len(units) and Path(f"{stem}.codes.npy").is_file() and Path(f"{stem}.jsonl").is_file():
            done[index] = entry  # else a data file was removed: the shard is made again
    note = (f"{out}: the source has {len(units)} unit(s) now; removing the shard(s) of the units beyond them "
            f"({', '.join(shard_name(i) for i in remove[:3])}{', ...' if len(remove) > 3 else ''})") if remove else None
    return _Plan(done, remove, note)


def _remove_shards(out: Path, indices) -> None:
    """Remove shards ``indices`` of ``out``, each entry first (a kill half-way leaves no shard marked done)."""
    for i in indices:
        stem = out / shard_name(i)
        Path(f"{stem}.json").unlink(missing_ok=True)
        Path(f"{stem}.codes.npy").unlink(missing_ok=True)
        Path(f"{stem}.jsonl").unlink(missing_ok=True)


def _report(out, manifest: dict) -> str:
    skipped = manifest["skipped"]
    parts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    line = (f"{out}: {manifest['samples']} usable samples ({manifest['heldout']} held out, {manifest['crops']} "
            f"crop(s) each) in {len(manifest['shards'])} shards; {sum(skipped.values())} skipped"
            + (f" ({parts})" if parts else ""))
    if manifest["heldout"] == 0 and manifest.get("heldout_fraction", 0) > 0:
        line += (f"\nwarning: no pair fell in the held-out share (--heldout {manifest['heldout_fraction']:g} of "
                 f"{manifest['samples']}): nothing to evaluate on; a larger --heldout holds some out")
    return line


def encode(cfg: EncodeConfig, log=print) -> dict:
    """Encode ``cfg.data`` with the dVAE in ``cfg.dvae`` into token shards in ``cfg.out``; returns the manifest.

    EncodeError (a ValueError) when the source has no usable pair (naming the path and the skip reasons; no
    manifest is written), or ``cfg.out`` holds shards made with other settings or another dVAE.
    """
    import torch.distributed as dist

    try:
        source = open_source(cfg.data, chunk_size=cfg.chunk_size)
    except ValueError as e:
        raise EncodeError(str(e)) from None
    rank, world, device = _setup_distributed(cfg.device)
    try:
        dvae_path = Path(cfg.dvae)
        dvae = load_dvae(dvae_path, device)
        dvae.requires_grad_(False)
        digest = _file_digest(pretrained_files(dvae_path)[0])
        settings = _settings(cfg, source, dvae, digest, pretrained_files(dvae_path)[0].parent)
        out = Path(cfg.out)
        created = not out.exists()
        writer = ShardWriter(out)
        plan = _check_folder(out, settings, source.units)
        if world > 1:
            dist.barrier()  # every rank has read the folder before rank 0 changes it
        if rank == 0:
            if plan.note:
                log(plan.note)
            if plan.remove or ((out / MANIFEST).exists() and len(plan.done) < len(source.units)):
                (out / MANIFEST).unlink(missing_ok=True)  # shards go or are missing: no longer complete
            _remove_shards(out, plan.remove)
            for i in range(len(source.units)):
                if i not in plan.done and writer.entry_path(i).exists():
                    writer.entry_path(i).unlink()  # a done mark whose data files are gone
            for tmp in [*out.glob(".shard-*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")]:
                tmp.unlink(missing_ok=True)  # left by a kill in the middle of a write
        if world > 1:
            dist.barrier()  # rank 0 has cleaned the folder before any rank writes into it
        _encode_units(cfg, source, dvae, device, writer, settings, plan.done, rank, world, log)
        if world > 1:
            dist.barrier()
        entries = [writer.read_entry(i) for i in range(len(source.units))]
        missing = [shard_name(i) for i, e in enumerate(entries) if e is None]
        if missing:
            raise RuntimeError(f"{out}: shards {missing[:5]} were not written (a rank failed?); rerun to finish")
        skipped = sum((Counter(e["skipped"]) for e in entries), Counter())
        n, held = sum(e["samples"] for e in entries), sum(e["heldout"] for e in entries)
        if n == 0:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "no candidate pairs"
            if world > 1:
                dist.barrier()  # every rank has read the entries before rank 0 removes them
            if rank == 0:  # empty shards are no output to resume: leave nothing a later run trips over
                _remove_shards(out, range(len(source.units)))
                if created and not any(out.iterdir()):
                    out.rmdir()
            raise EncodeError(f"no usable image/caption pairs in {cfg.data} ({why}); nothing was written to {out}")
        keep = ("name", "unit", "samples", "heldout", "skipped")
        manifest = {**{k: settings[k] for k in ("format", "version", "source", "source_kind", "dvae")},
                    "crops": cfg.crops, "heldout_fraction": cfg.heldout, "seed": cfg.seed,
                    "chunk_size": settings["chunk_size"], "min_words": settings["min_words"],
                    "max_aspect": settings["max_aspect"],
                    "shards": [{k: e[k] for k in keep} for e in entries],
                    "samples": n, "heldout": held, "skipped": dict(sorted(skipped.items())), "complete": True}
        if rank == 0:
            write_json(out / MANIFEST, manifest)
            log(_report(out, manifest))
        return manifest
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _encode_units(cfg, source, dvae, device, writer, settings, done, rank, world, log) -> None:
    from tqdm import tqdm

    S, K = dvae.cfg.image_size, cfg.crops
    per_batch = max(1, cfg.batch_size // K)  # samples per batch: batch_size images at most (one at least)
    ds = _UnitBatches(source, done, rank, world, max(1, cfg.workers), S, K, cfg.seed, cfg.heldout, per_batch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.workers)
    pending: dict[int, dict] = {}
    bar = tqdm(total=None, unit="img", disable=not cfg.progress or rank != 0, desc="encode", dynamic_ncols=True)
    t0, count = time.perf_counter(), 0
    changed = 0
    for unit, batch, end in loader:
        if end is not None and end.get("kept"):
            continue  # a finished shard whose unit holds what it recorded
        acc = pending.setdefault(unit, {"codes": [], "records": []})
        if batch["images"] is not None:
            b = batch["images"].shape[0]
            codes = dvae.encode(batch["images"].reshape(b * K, 3, S, S).to(device))
            acc["codes"].append(codes.reshape(b, K, -1).cpu().numpy().astype(np.uint16))
            acc["records"] += [{"key": k, "caption": c, "heldout": h}
                               for k, c, h in zip(batch["keys"], batch["captions"], batch["heldout"])]
            count += b
            bar.update(b)
        if end is not None:
            acc = pending.pop(unit)
            if end["changed"] is not None:
                changed += 1
                if changed <= 5:
                    log(f"{writer.folder}: {shard_name(unit)} was written from another {source.units[unit]} "
                        f"({end['changed']}); encoding it again")
            hw = dvae.grid_size[0] * dvae.grid_size[1]
            codes = np.concatenate(acc["codes"]) if acc["codes"] else np.zeros((0, K, hw), np.uint16)
            entry = {"name": shard_name(unit), "unit": source.units[unit], "samples": len(acc["records"]),
                     "heldout": sum(r["heldout"] for r in acc["records"]),
                     "skipped": dict(sorted(end["skipped"].items())), "settings": settings, "inputs": end["inputs"]}
            writer.write(unit, codes, acc["records"], entry)
    bar.close()
    if changed > 5:
        log(f"{writer.folder}: {changed} finished shards in all were encoded again because the source changed")
    if count and rank == 0 and not cfg.progress:
        log(f"encoded {count} images in {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description="Encode images and captions once into dVAE token shards.")
    cli.add_options(p, EncodeConfig)
    return p


def parse_args(argv=None) -> EncodeConfig:
    """The checked config; a bad flag, a source that cannot be read or a folder that is no dVAE is a usage
    error (one line, exit status 2) before anything is written."""
    p = build_parser()
    cfg = EncodeConfig(**cli.options_of(p.parse_args(argv), EncodeConfig))
    try:
        open_source(cfg.data, chunk_size=cfg.chunk_size)
    except ValueError as e:
        p.error(f"argument --data: {e}")
    cli.check_dvae(p, cfg.dvae)
    return cfg


def main(argv=None) -> None:
    cfg = parse_args(argv)
    try:
        encode(cfg)
    except EncodeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
