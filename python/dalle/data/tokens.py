"""The transformer's training data (paper section 2.2: text tokens, then the dVAE's image codes): the captions
tokenized once per settings (the clean encoding and ``dropout_variants`` BPE-dropout encodings), the images as
the frozen dVAE's codes, and ``get_batch``, each process's share of the global batch at a step.

- built-in captioned shapes: everything in ``RUN/data_cache.pt`` (plain data, ``weights_only=True``), rebuilt
  when the dataset, dVAE or text settings change;
- token shards (``python -m dalle.encode``): codes read from the memory-mapped shards per batch, the captions in
  the memory-mapped ``RUN/text_tokens.npy``; memory stays flat as the data grows.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..common import UnsafeFileError, atomic_save, load_checkpoint, pretrained_files
from ..runs import file_digest
from ..tokenizer import CaptionTokenizer, padding_ids, train_tokenizer
from .sampler import TRANSFORMER_STRIDE, EpochSampler
from .shapes import ShapesDataset
from .shards import TokenShards, content_digest


class _TextTable:
    """``(variants, N, text_len)`` token ids in a memory-mapped ``.npy``, indexed like a tensor ``t[var, idx]``."""

    def __init__(self, path: Path):
        self.array = np.load(path, mmap_mode="r")
        self.shape = tuple(self.array.shape)

    def __getitem__(self, key):
        var, idx = key
        if isinstance(idx, slice):  # t[0, :n]
            return torch.from_numpy(np.array(self.array[var, idx], dtype=np.int64))
        var, idx = torch.as_tensor(var).numpy(), torch.as_tensor(idx).numpy()
        return torch.from_numpy(np.asarray(self.array[var, idx], dtype=np.int64))


def dropout_rng(seed: int, variant: int) -> random.Random:
    """The generator of the BPE-dropout encodings of ``variant`` (1, 2, ...) in a run of ``seed``: the same run
    settings give the same encodings, run after run (a string seed: independent of ``PYTHONHASHSEED``)."""
    return random.Random(f"bpe-dropout/{seed}/{variant}")


def _shards_key(shards) -> dict:
    m = shards.manifest
    return {"source": m.get("source"), "dvae": shards.dvae_digest, "samples": m.get("samples"),
            "shards": [(e["name"], e["samples"], e.get("heldout")) for e in m["shards"]], "crops": shards.crops,
            "content": content_digest(shards.folder)}


def prepare_shard_data(cfg, dvae, log=print) -> dict:
    """The training split of the token shards in ``cfg.data`` (``python -m dalle.encode``): image codes read from
    the memory-mapped shards per batch; the captions tokenized once into ``RUN/text_tokens.npy`` (memory-mapped,
    ``(1 + dropout_variants, N, text_len)``: the clean encoding, then the BPE-dropout ones), by a tokenizer
    trained on the split's captions (streamed) or ``cfg.tokenizer``. Memory stays flat as the data grows."""
    run = Path(cfg.run)
    shards = TokenShards(cfg.data, split="train")
    digest = file_digest(pretrained_files(cfg.dvae_path)[0])
    if digest != shards.dvae_digest:
        raise ValueError(f"--data {cfg.data} holds codes of another dVAE (digest {shards.dvae_digest}, "
                         f"{shards.dvae_path}) than --dvae {cfg.dvae_path} (digest {digest}): encode the data "
                         "with this dVAE (python -m dalle.encode) or train with the data's dVAE")
    if len(shards) == 0:
        raise ValueError(f"--data {cfg.data}: the training split is empty (every sample is held out)")
    tok_path, text_path, key_path = run / "tokenizer.json", run / "text_tokens.npy", run / "text_tokens.json"
    tok_src = Path(cfg.tokenizer) if cfg.tokenizer else None
    if tok_src is not None and tok_src.is_dir():
        tok_src = tok_src / "tokenizer.json"
    key = {"data": _shards_key(shards), "text_len": cfg.text_len, "bpe_vocab": cfg.bpe_vocab,
           "bpe_dropout": cfg.bpe_dropout, "variants": cfg.dropout_variants, "seed": cfg.seed,
           "tokenizer": file_digest(tok_src) if tok_src else "trained", "version": 2}
    ready = False
    if key_path.is_file() and text_path.is_file() and tok_path.is_file():
        try:
            ready = json.loads(key_path.read_text()) == json.loads(json.dumps(key))
        except ValueError:
            ready = False
    if not ready:
        key_path.unlink(missing_ok=True)  # the key is written last: its presence means the tokens are complete
        if tok_src is not None:
            tok = CaptionTokenizer.load(tok_src, dropout=cfg.bpe_dropout)
            tok.save(tok_path)
            log(f"preparing data: {len(shards)} captions tokenized by {tok_src}")
        else:
            log(f"preparing data: BPE (vocabulary {cfg.bpe_vocab}) trained on {len(shards)} captions of {cfg.data}")
            tok = train_tokenizer(shards.iter_captions(), cfg.bpe_vocab, tok_path, dropout=cfg.bpe_dropout)
        n_var = 1 + (cfg.dropout_variants if cfg.bpe_dropout > 0 else 0)
        dtype = np.uint16 if tok.vocab_size + cfg.text_len <= 65536 else np.int32
        tmp = text_path.with_name(text_path.name + ".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n_var, len(shards), cfg.text_len))
        chunk, start = [], 0
        rngs = [dropout_rng(cfg.seed, v) for v in range(n_var)]  # one stream per variant across the chunks
        it = shards.iter_captions()
        while True:
            chunk = [c for _, c in zip(range(4096), it)]
            if not chunk:
                break
            stop = start + len(chunk)
            out[0, start:stop] = tok.encode_batch(chunk, cfg.text_len).numpy()
            for v in range(1, n_var):
                out[v, start:stop] = tok.encode_batch(chunk, cfg.text_len, dropout=True, rng=rngs[v]).numpy()
            start = stop
        out.flush()
        del out
        os.replace(tmp, text_path)
        key_path.write_text(json.dumps(key))
    tok = CaptionTokenizer.load(tok_path)
    text = _TextTable(text_path)
    return {"key": {"dvae": digest, **key}, "text": text, "image": shards, "n": len(shards),
            "text_vocab": tok.vocab_size, "grid": tuple(shards.grid), "image_vocab": shards.vocab_size,
            "captions": [shards.caption(i) for i in range(min(cfg.n_sample_captions, len(shards)))],
            "sample_text": text[0, : cfg.n_sample_captions]}


def prepare_data(cfg, dvae, log=print) -> dict:
    """Tokenizer + cached (text variants, image codes) for the training split; built once per settings."""
    if cfg.data:
        return prepare_shard_data(cfg, dvae, log)
    run = Path(cfg.run)
    ds = ShapesDataset("train", size=cfg.dataset_size, image_size=dvae.cfg.image_size, seed=cfg.data_seed)
    key = {"dataset": ("shapes", cfg.dataset_size, dvae.cfg.image_size, cfg.data_seed),
           "dvae": file_digest(pretrained_files(cfg.dvae_path)[0]), "text_len": cfg.text_len,
           "bpe_vocab": cfg.bpe_vocab, "bpe_dropout": cfg.bpe_dropout, "variants": cfg.dropout_variants,
           "seed": cfg.seed, "version": 2}
    cache_path, tok_path = run / "data_cache.pt", run / "tokenizer.json"
    if cache_path.is_file() and tok_path.is_file():
        try:
            cache = load_checkpoint(cache_path)
        except UnsafeFileError as e:
            raise UnsafeFileError(f"{e}; or delete it: the data cache is rebuilt from the data") from None
        except (RuntimeError, EOFError, OSError) as e:  # torn or damaged: it is only a cache, made again below
            log(f"the data cache {cache_path} is unreadable ({type(e).__name__}); rebuilding it")
            cache = {}
        if isinstance(cache, dict) and cache.get("key") == key:
            return cache
    log(f"preparing data: {len(ds)} captions -> BPE, images -> dVAE codes (once)")
    captions = ds.captions()
    tok = train_tokenizer(captions, cfg.bpe_vocab, tok_path, dropout=cfg.bpe_dropout)
    text = [tok.encode_batch(captions, cfg.text_len)]
    if cfg.bpe_dropout > 0:
        text += [tok.encode_batch(captions, cfg.text_len, dropout=True, rng=dropout_rng(cfg.seed, v))
                 for v in range(1, cfg.dropout_variants + 1)]
    device = next(dvae.parameters()).device
    codes = []
    for i in range(0, len(ds), 256):
        imgs = torch.stack([ds[j][0] for j in range(i, min(i + 256, len(ds)))])
        codes.append(dvae.encode(imgs.to(device)).flatten(1).cpu())
    cache = {"key": key, "text": torch.stack(text), "image": torch.cat(codes),
             "text_vocab": tok.vocab_size, "grid": tuple(dvae.grid_size), "image_vocab": dvae.vocab_size,
             "captions": captions}
    atomic_save(cache, cache_path)
    return cache


def with_views(data: dict, cfg) -> dict:
    """``n`` (training pairs) and ``sample_text`` (the sample grids' captions, tokenized) for either data kind."""
    if "n" not in data:
        data["n"] = int(data["image"].shape[0])
    if "sample_text" not in data:
        data["sample_text"] = data["text"][0, : cfg.n_sample_captions]
    return data


def get_batch(data: dict, step: int, cfg, rank: int = 0, world: int = 1):
    """``(text, image)`` of this rank's share of the global batch at ``step``: a pure function of the step."""
    n = int(data["n"] if "n" in data else data["image"].shape[0])
    sampler = data.get("sampler")
    if sampler is None or (sampler.n, sampler.batch_size, sampler.seed) != (n, cfg.batch_size, cfg.seed):
        sampler = data["sampler"] = EpochSampler(n, cfg.batch_size, cfg.seed, TRANSFORMER_STRIDE)
    idx = sampler.indices(step)[rank::world]
    n_var = data["text"].shape[0]
    if n_var > 1:  # one of the cached BPE-dropout encodings per sample (index 0 is the clean one)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        var = torch.randint(1, n_var, (cfg.batch_size,), generator=g)[rank::world]  # as one process draws
    else:
        var = torch.zeros(len(idx), dtype=torch.long)
    text = data["text"][var, idx]
    if cfg.cond_dropout > 0:  # the empty caption (every slot its padding id) for a seeded share of the batch
        g = torch.Generator().manual_seed(cfg.seed * 104729 + step)
        drop = torch.rand(cfg.batch_size, generator=g)[rank::world] < cfg.cond_dropout
        text = torch.where(drop[:, None], padding_ids(text.shape[1], int(data["text_vocab"])), text)
    if isinstance(data["image"], torch.Tensor):
        return text, data["image"][idx].long()
    crop = None  # token shards: one of the K stored crops per sample, drawn per step
    if data["image"].crops > 1:
        g = torch.Generator().manual_seed(cfg.seed * 15485863 + step)
        crop = torch.randint(data["image"].crops, (cfg.batch_size,), generator=g)[rank::world]
    return text, data["image"].codes(idx, crop)
