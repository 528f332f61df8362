"""Train the DALL-E transformer on captioned images (SPEC.md sections 2 and 4).

    python -m dalle.train --run runs/mine --dvae runs/dvae --steps 2000
    python -m dalle.train --run runs/photos --data tokens/photos --steps 20000     # your own data
    torchrun --nproc_per_node 2 -m dalle.train --run-dir runs/ddp --dvae runs/dvae [--powersgd-rank 4]
    torchrun --nproc_per_node 8 -m dalle.train --run-dir runs/big --data TOKENS --fsdp --shard-size 8   # sharded

Sharded (``--fsdp``, ``dalle.fsdp``): FSDP2 over the ``--shard-size`` processes of a machine, replicas between
machines (PowerSGD with ``--powersgd-rank``), Torch Distributed Checkpoints in ``RUN/dcp`` instead of
``checkpoint.pt``, the final weights exported as below.

Data, built-in captioned shapes (the default): the captions train a BPE tokenizer (``RUN/tokenizer.json``);
every image is encoded once by the frozen dVAE (argmax codes) and cached with the tokenized captions in
``RUN/data_cache.pt`` (rebuilt only when the dataset, dVAE or text settings change). Your own data
(``--data DIR``: token shards written by ``python -m dalle.encode``): codes are read per batch from the
memory-mapped shards, the captions are tokenized once into the memory-mapped ``RUN/text_tokens.npy``
(``prepare_shard_data``), so memory stays flat as the data grows. BPE dropout: the cache
holds ``--dropout-variants`` dropout encodings of every caption, drawn once; each step picks one per sample
from a generator seeded by the step, so training is an exact function of the step (the tokenizer's own
dropout RNG cannot be seeded, and exact resume needs that).

Optimizer: AdamW betas (0.9, 0.96), eps 1e-8, weight decay 4.5e-2 on matrices only; step size warmed up
linearly, then halved each time the training loss plateaus (at most five times); gradient norm clipped at 4.
Per-resblock gradient scaling (``dalle.grad_scale``) is on with ``--precision fp16`` (or ``--grad-scale on``).

Outputs in RUN: ``checkpoint.pt`` (atomic, every ``--ckpt-every`` steps; ``--resume`` continues from it and
reproduces an uninterrupted run's losses), the final model as ``model.safetensors`` + ``config.json`` (model
config, training config, step and dVAE folder; with ``tokenizer.json`` the Hugging Face folder layout),
``metrics.csv`` (TensorBoard in ``RUN/tb`` when installed), ``samples/step_XXXXXX.png`` grids. Every torch file
holds plain data only and is read with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .common import (MetricsLogger, UnsafeFileError, atomic_save, autocast_context, convert_hint, load_checkpoint,
                     load_pretrained, pick_device, pretrained_files, rng_state, save_pretrained, seed_everything,
                     set_rng_state)
from .grad_scale import BlockGradScaler
from .model import DALLE, DALLEConfig, HEAD_DIMS
from .tokenizer import padding_ids

MODEL_TYPE = "dalle"  # config.json's model_type
PRESETS = {
    "micro": dict(n_layers=2, n_heads=2, head_dim=16, conv_kernel=3),
    "tiny": dict(n_layers=4, n_heads=4, head_dim=32, conv_kernel=5),
    "small": dict(n_layers=8, n_heads=8, head_dim=32, conv_kernel=5),
    "paper": dict(n_layers=64, n_heads=62, head_dim=64, conv_kernel=11),
}


@dataclass
class TrainConfig:
    run: str
    dvae: str = ""  # the frozen dVAE's folder (model.safetensors + config.json; default: the data's or RUN/dvae)
    data: str = ""  # token shards folder (python -m dalle.encode); empty: the built-in captioned shapes
    tokenizer: str = ""  # reuse this tokenizer.json instead of training BPE on the data's captions
    preset: str = "tiny"
    n_layers: int = 0  # 0: from the preset
    n_heads: int = 0
    head_dim: int = 0
    text_len: int = 24
    bpe_vocab: int = 256
    dataset_size: int = 4000
    data_seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 4.5e-4
    warmup: int = 5000
    plateau_window: int = 100  # steps per loss window for plateau detection
    plateau_patience: int = 3  # windows without 1% improvement before halving
    max_halvings: int = 5
    weight_decay: float = 4.5e-2
    clip: float = 4.0
    bpe_dropout: float = 0.1
    dropout: float = 0.0  # residual dropout in the transformer blocks
    cond_dropout: float = 0.0  # probability of training a sample on the empty caption (classifier-free guidance)
    image_embedding: str = "table"  # table (the paper) | dvae: image embeddings from the dVAE's codes (CodeEmbedding)
    dropout_variants: int = 4
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    grad_scale: str = "auto"  # auto: on with fp16 | on | off
    checkpoint_activations: bool = False
    attn_backend: str = "auto"
    powersgd_rank: int = 0
    powersgd_start: int = 10  # plain all-reduce for this many updates before compressing
    fsdp: bool = False  # shard parameters, gradients and AdamW state with FSDP2 (dalle.fsdp); DCP checkpoints
    shard_size: int = 0  # processes per shard group (the GPUs of one machine); 0: torchrun's LOCAL_WORLD_SIZE
    ckpt_every: int = 200
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    n_sample_captions: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "text_len", "bpe_vocab", "dataset_size", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.grad_scale not in ("auto", "on", "off"):
            raise ValueError(f"grad_scale must be auto, on or off, got {self.grad_scale!r}")
        if not self.lr > 0 or self.warmup < 0 or self.clip <= 0:
            raise ValueError("lr and clip must be > 0 and warmup >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout!r}")
        if self.image_embedding not in ("table", "dvae"):
            raise ValueError(f"image_embedding must be table or dvae, got {self.image_embedding!r}")
        if self.powersgd_rank < 0:
            raise ValueError(f"powersgd_rank must be >= 0, got {self.powersgd_rank}")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 0:
            raise ValueError(f"shard_size must be an int >= 0, got {self.shard_size!r}")

    @property
    def dvae_path(self) -> Path:
        """The dVAE's folder (or a file in it): ``--dvae``, else the one the token shards of ``--data`` were
        encoded with (their manifest), else ``RUN/dvae`` (where the pipeline trains it)."""
        if self.dvae:
            return Path(self.dvae)
        if self.data:
            try:
                return Path(json.loads((Path(self.data) / "manifest.json").read_text())["dvae"]["path"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # TokenShards says what is wrong with the folder
        return Path(self.run) / "dvae"


class PlateauSchedule:
    """Linear warm-up to ``lr``, then halve when the windowed training loss stops improving by 1%."""

    def __init__(self, lr, warmup, window, patience, max_halvings=5, threshold=0.01):
        self.lr, self.warmup, self.window, self.patience = lr, warmup, window, patience
        self.max_halvings, self.threshold = max_halvings, threshold
        self.halvings, self.best, self.bad, self.acc, self.n = 0, math.inf, 0, 0.0, 0

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return self.lr * warm * 0.5 ** self.halvings

    def observe(self, step: int, loss: float) -> None:
        if step < self.warmup or not math.isfinite(loss):
            return
        self.acc, self.n = self.acc + loss, self.n + 1
        if self.n < self.window:
            return
        mean, self.acc, self.n = self.acc / self.n, 0.0, 0
        if mean < self.best * (1 - self.threshold):
            self.best, self.bad = mean, 0
            return
        self.bad += 1
        if self.bad >= self.patience and self.halvings < self.max_halvings:
            self.halvings, self.bad = self.halvings + 1, 0

    def state_dict(self):
        return {k: getattr(self, k) for k in ("halvings", "best", "bad", "acc", "n")}

    def load_state_dict(self, s):
        for k, v in s.items():
            setattr(self, k, v)


# ------------------------------------------------------------------------------------------------ data
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_dvae(path, device="cpu"):
    """The dVAE in folder ``path`` (``DVAE.load``), on ``device``, in eval mode."""
    from .dvae import DVAE

    try:
        return DVAE.load(path, map_location=device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot load the dVAE: {e}; train one first (python -m dalle.train_dvae --run DIR) "
                                "or pass --dvae DIR") from None


class _TextTable:
    """``(variants, N, text_len)`` token ids in a memory-mapped ``.npy``, indexed like a tensor ``t[var, idx]``."""

    def __init__(self, path: Path):
        import numpy as np

        self.array = np.load(path, mmap_mode="r")
        self.shape = tuple(self.array.shape)

    def __getitem__(self, key):
        import numpy as np

        var, idx = key
        if isinstance(idx, slice):  # t[0, :n]
            return torch.from_numpy(np.array(self.array[var, idx], dtype=np.int64))
        var, idx = torch.as_tensor(var).numpy(), torch.as_tensor(idx).numpy()
        return torch.from_numpy(np.asarray(self.array[var, idx], dtype=np.int64))


def _shards_key(shards) -> dict:
    m = shards.manifest
    return {"source": m.get("source"), "dvae": shards.dvae_digest, "samples": m.get("samples"),
            "shards": [(e["name"], e["samples"], e.get("heldout")) for e in m["shards"]], "crops": shards.crops}


def prepare_shard_data(cfg: TrainConfig, dvae, log=print) -> dict:
    """The training split of the token shards in ``cfg.data`` (``python -m dalle.encode``): image codes read from
    the memory-mapped shards per batch; the captions tokenized once into ``RUN/text_tokens.npy`` (memory-mapped,
    ``(1 + dropout_variants, N, text_len)``: the clean encoding, then the BPE-dropout ones), by a tokenizer
    trained on the split's captions (streamed) or ``cfg.tokenizer``. Memory stays flat as the data grows."""
    import numpy as np

    from .data.shards import TokenShards
    from .tokenizer import CaptionTokenizer, train_tokenizer

    run = Path(cfg.run)
    shards = TokenShards(cfg.data, split="train")
    digest = _file_digest(pretrained_files(cfg.dvae_path)[0])
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
           "bpe_dropout": cfg.bpe_dropout, "variants": cfg.dropout_variants,
           "tokenizer": _file_digest(tok_src) if tok_src else "trained", "version": 1}
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
        it = shards.iter_captions()
        while True:
            chunk = [c for _, c in zip(range(4096), it)]
            if not chunk:
                break
            stop = start + len(chunk)
            out[0, start:stop] = tok.encode_batch(chunk, cfg.text_len).numpy()
            for v in range(1, n_var):
                out[v, start:stop] = tok.encode_batch(chunk, cfg.text_len, dropout=True).numpy()
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


def prepare_data(cfg: TrainConfig, dvae, log=print) -> dict:
    """Tokenizer + cached (text variants, image codes) for the training split; built once per settings."""
    if cfg.data:
        return prepare_shard_data(cfg, dvae, log)
    from .data.shapes import ShapesDataset
    from .tokenizer import CaptionTokenizer, train_tokenizer

    run = Path(cfg.run)
    ds = ShapesDataset("train", size=cfg.dataset_size, image_size=dvae.cfg.image_size, seed=cfg.data_seed)
    key = {"dataset": ("shapes", cfg.dataset_size, dvae.cfg.image_size, cfg.data_seed),
           "dvae": _file_digest(pretrained_files(cfg.dvae_path)[0]), "text_len": cfg.text_len,
           "bpe_vocab": cfg.bpe_vocab, "bpe_dropout": cfg.bpe_dropout, "variants": cfg.dropout_variants,
           "version": 1}
    cache_path, tok_path = run / "data_cache.pt", run / "tokenizer.json"
    if cache_path.is_file() and tok_path.is_file():
        try:
            cache = load_checkpoint(cache_path)
        except UnsafeFileError as e:
            raise UnsafeFileError(f"{e}; or delete it: the data cache is rebuilt from the data") from None
        if cache.get("key") == key:
            return cache
    log(f"preparing data: {len(ds)} captions -> BPE, images -> dVAE codes (once)")
    captions = ds.captions()
    tok = train_tokenizer(captions, cfg.bpe_vocab, tok_path, dropout=cfg.bpe_dropout)
    text = [tok.encode_batch(captions, cfg.text_len)]
    if cfg.bpe_dropout > 0:
        text += [tok.encode_batch(captions, cfg.text_len, dropout=True) for _ in range(cfg.dropout_variants)]
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


def _with_views(data: dict, cfg: TrainConfig) -> dict:
    """``n`` (training pairs) and ``sample_text`` (the sample grids' captions, tokenized) for either data kind."""
    if "n" not in data:
        data["n"] = int(data["image"].shape[0])
    if "sample_text" not in data:
        data["sample_text"] = data["text"][0, : cfg.n_sample_captions]
    return data


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: epochs of seeded permutations, a pure function of the step (so a
    run resumed mid-epoch draws what an uninterrupted one would)."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        out.extend(_epoch_perm(n, seed, epoch)[offset: offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def get_batch(data: dict, step: int, cfg: TrainConfig, rank: int = 0, world: int = 1):
    """``(text, image)`` of this rank's share of the global batch at ``step``: a pure function of the step."""
    n = data["n"] if "n" in data else int(data["image"].shape[0])
    idx = batch_indices(step, cfg.batch_size, n, cfg.seed)[rank::world]
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


# ------------------------------------------------------------------------------------------------ model
def model_config(cfg: TrainConfig, data: dict) -> DALLEConfig:
    p = dict(PRESETS[cfg.preset])
    for name in ("n_layers", "n_heads", "head_dim"):
        if getattr(cfg, name):
            p[name] = getattr(cfg, name)
    dvae_emb = cfg.image_embedding == "dvae"
    n_feat = int(data["code_features"].shape[1]) if dvae_emb else 0
    groups = tuple(data["code_feature_groups"]) if dvae_emb else ()
    return DALLEConfig(text_len=cfg.text_len, text_vocab=int(data["text_vocab"]), image_vocab=int(data["image_vocab"]),
                       grid=tuple(data["grid"]), checkpoint=cfg.checkpoint_activations, code_features=n_feat,
                       code_feature_groups=groups, dropout=cfg.dropout,
                       attn_backend=cfg.attn_backend, **p)


class Objective(nn.Module):
    """``forward`` = the model's loss, so DistributedDataParallel hooks the right call."""

    def __init__(self, model: DALLE):
        super().__init__()
        self.model = model

    def forward(self, text, image):
        return self.model.loss(text, image, return_parts=True)


def save_run_model(run, model: DALLE, meta: dict) -> Path:
    """Write the transformer as ``run/model.safetensors`` + ``run/config.json`` (its config's fields, the
    model_type and ``meta``: ``train_config``, ``step``, ``dvae``); ``load_run_model`` reads it back."""
    return save_pretrained(run, model.state_dict(), {"model_type": MODEL_TYPE, **model.cfg.to_dict(), **meta})


RUN_META = ("train_config", "step", "dvae", "dvae_digest")  # what a run saves beside its model's config


def load_run_meta(run) -> dict:
    """``RUN_META`` of a run: from ``RUN/config.json`` alone (no weights read) when the run has its final model,
    else as ``load_run_model`` reads it."""
    config = pretrained_files(run)[1]
    if not config.is_file():
        return load_run_model(run)[1]
    meta = json.loads(config.read_text())
    return {k: meta.get(k) for k in RUN_META}


def load_run_model(run, device="cpu") -> tuple[DALLE, dict]:
    """The trained model of a run and its saved metadata (``model_config``, ``train_config``, ``step``, ``dvae``).

    Reads the final model (``RUN/model.safetensors`` + ``RUN/config.json``), else the latest training
    checkpoint (``RUN/checkpoint.pt``, ``weights_only=True``). Nothing read unpickles code: a run of an earlier
    version (``RUN/dalle.pt``) raises ``UnsafeFileError`` naming ``python -m dalle.convert``; a folder with
    neither file ``FileNotFoundError`` naming the files looked for.
    """
    run = Path(run)
    weights, config = pretrained_files(run)
    if weights.is_file() or config.is_file():
        state_dict, meta = load_pretrained(run, MODEL_TYPE)
        meta = {k: meta.get(k) for k in RUN_META} | {"model_config": meta}
    elif (run / "dalle.pt").is_file():
        raise UnsafeFileError(f"{run} holds a model of an earlier version of dalle ({run / 'dalle.pt'}, a torch "
                              f"pickle), which is no longer read; {convert_hint(run, trust=False)}")
    elif (run / "checkpoint.pt").is_file():
        meta = load_checkpoint(run / "checkpoint.pt", map_location=device)
        state_dict = meta.pop("model")
    else:
        raise FileNotFoundError(f"no trained model in {run}: looked for {weights} + {config} (the final model) "
                                f"and {run / 'checkpoint.pt'}")
    cfg = DALLEConfig.from_dict(meta["model_config"])
    # The config must describe these weights before anything is allocated for it (a config.json edited to a
    # billion layers would otherwise fill the memory before load_state_dict could object).
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.")}
    if len(blocks) != cfg.n_layers:
        raise ValueError(f"{run}: the config says {cfg.n_layers} layers but the weights hold {len(blocks)}")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DALLE(cfg).state_dict().items()}
    wrong = sorted(k for k in shapes.keys() | state_dict.keys()
                   if shapes.get(k) != (tuple(state_dict[k].shape) if k in state_dict else None))
    if wrong:
        raise ValueError(f"{run}: the config does not describe the weights ({len(wrong)} tensors differ, first "
                         f"{wrong[0]!r})")
    model = DALLE(cfg)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), meta


def _setup_distributed(device_str: str, always: bool = False):
    """``(rank, world, device)``; the process group is started under torchrun with several processes, or with
    ``always`` (sharded training needs one even for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (always and "RANK" in os.environ):
        return 0, 1, pick_device(device_str)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_str)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def powersgd_uncompressed(model: DALLE, prefix: str = "") -> set[str]:
    """Names (with ``prefix``) of the parameters PowerSGD sends whole (SPEC.md section 4: only matrices are
    compressed): gains and biases, the lookup-table embeddings, the position embeddings (plain parameters) and
    the output layers (text head; image head, or the CodeEmbedding that is both)."""
    from dalle_kernels.powersgd import uncompressed_parameter_names

    whole = {id(p) for p in model.head_parameters()} | {id(model.text_pos), id(model.row_emb), id(model.col_emb)}
    names = uncompressed_parameter_names(model) | {n for n, p in model.named_parameters() if id(p) in whole}
    return {prefix + n for n in names}


def _powersgd(ddp, objective: nn.Module, rank: int, start_iter: int, process_group=None):
    """Register the PowerSGD hook: matrices compressed; gains, biases, embeddings and heads sent whole."""
    try:
        from dalle_kernels.powersgd import PowerSGDState, powersgd_hook
    except ImportError as exc:
        raise RuntimeError("--powersgd-rank needs dalle_kernels.powersgd (PowerSGDState, powersgd_hook), "
                           f"which this installation does not have ({exc})") from None
    exclude = powersgd_uncompressed(objective.model, prefix="model.")
    state = PowerSGDState(objective, rank=rank, start_iter=start_iter, exclude=exclude, process_group=process_group)
    if ddp is not None:
        ddp.register_comm_hook(state, powersgd_hook)
    return state


def _all_finite(params, sharded: bool) -> bool:
    """Whether every gradient of ``params`` is finite; ``sharded``: each rank checks its shards and the answer
    is agreed across ranks (replicated gradients, as DDP leaves them, are the same on every rank already)."""
    from .fsdp import local

    bad = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    for p in params:
        bad += (~torch.isfinite(local(p.grad))).sum()
    if sharded:
        dist.all_reduce(bad)
    return bool(bad == 0)


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Train per ``cfg``; returns the folder of the final model (``RUN``: ``model.safetensors`` + ``config.json``)."""
    rank, world, device = _setup_distributed(cfg.device, always=cfg.fsdp)
    run = Path(cfg.run)
    is_main = rank == 0
    log = log if is_main else (lambda *a, **k: None)
    seed_everything(cfg.seed)
    dvae = load_dvae(cfg.dvae_path, device)
    if is_main:
        data = prepare_data(cfg, dvae, log)
    if world > 1:
        dist.barrier()
        if not is_main:
            data = prepare_data(cfg, dvae, log)
    data = _with_views(data, cfg)
    if cfg.image_embedding == "dvae":
        data["code_features"] = dvae.code_features().cpu()
        data["code_feature_groups"] = dvae.code_feature_groups
    mcfg = model_config(cfg, data)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    mesh = units = None
    if cfg.fsdp:  # built on the meta device; each rank materializes its shards only
        from . import fsdp

        shard_size = cfg.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mesh = fsdp.build_mesh(world, shard_size, device.type)
        with torch.device("meta"):
            model = DALLE(mcfg)
        objective = Objective(model)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        use_hooks = bool(cfg.powersgd_rank) and mesh["replicate"].size() > 1
        units = fsdp.shard_model(objective, mesh, compute, device, cfg.seed, hooks=use_hooks)
        n_rep, n_shard = mesh["replicate"].size(), mesh["shard"].size()
        log(f"sharded: {n_rep} replica{'s' * (n_rep != 1)} x {n_shard} shard{'s' * (n_shard != 1)}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{sum(fsdp.local(p).numel() for p in model.parameters()):,} in rank 0's shards")
    else:
        model = DALLE(mcfg, init_seed=cfg.seed).to(device)
        objective = Objective(model)
    if mcfg.code_features:
        model.set_code_features(data["code_features"].to(device))
    use_scaler = cfg.grad_scale == "on" or (cfg.grad_scale == "auto" and precision == "fp16")
    scaler = BlockGradScaler(mcfg.n_layers, world_size=world).attach(model) if use_scaler else None
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.96), eps=1e-8)
    sched = PlateauSchedule(cfg.lr, cfg.warmup, cfg.plateau_window, cfg.plateau_patience, cfg.max_halvings)
    step = 0
    ckpt_path = run / "checkpoint.pt"
    powersgd_state = None
    if cfg.fsdp:
        if cfg.powersgd_rank and mesh["replicate"].size() > 1:
            powersgd_state = _powersgd(None, objective, cfg.powersgd_rank, cfg.powersgd_start,
                                       process_group=mesh["replicate"].get_group())
            fsdp.register_powersgd(powersgd_state, objective, units, mesh)
        found = fsdp.checkpoints(run) if resume else []
        if found:
            ts, rank_state = fsdp.load_checkpoint(found[-1], objective, opt, tuple(mesh.shape))
            sched.load_state_dict(ts["schedule"])
            if scaler is not None and ts.get("grad_scaler"):
                scaler.load_state_dict(ts["grad_scaler"])
            step = ts["step"]
            if rank_state is not None:
                set_rng_state(rank_state["rng"])
                if powersgd_state is not None and rank_state.get("powersgd"):
                    powersgd_state.load_state_dict(rank_state["powersgd"])
                elif rank_state.get("powersgd"):
                    log("the checkpoint's PowerSGD error feedback is not used: this run has no --powersgd-rank")
            else:
                log(f"resuming on a {tuple(mesh.shape)} mesh from a {tuple(ts['mesh'])} one: model, optimizer and "
                    "schedule restored; RNG and PowerSGD error feedback start afresh")
            log(f"resumed from {found[-1]} at step {step}")
        elif resume:
            log(f"--resume: no checkpoint in {run / fsdp.CHECKPOINT_DIR}, starting from scratch")
    elif resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["schedule"])
        if scaler is not None and ck.get("grad_scaler"):
            scaler.load_state_dict(ck["grad_scaler"])
        set_rng_state(ck["rng"])
        step = ck["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    elif resume:
        log(f"--resume: no checkpoint in {run}, starting from scratch")
    if world > 1 and not cfg.fsdp:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.powersgd_rank:
            powersgd_state = _powersgd(objective, objective.module, cfg.powersgd_rank, cfg.powersgd_start)
            psgd_path = run / f"powersgd_rank{rank}.pt"
            if resume and ckpt_path.is_file() and psgd_path.is_file():
                ps = load_checkpoint(psgd_path)
                if ps["step"] != step:
                    raise RuntimeError(f"{psgd_path} is from step {ps['step']} but the checkpoint from step {step}")
                powersgd_state.load_state_dict(ps["state"])
    elif cfg.powersgd_rank and world <= 1:
        raise ValueError("--powersgd-rank needs several data-parallel workers (run under torchrun)")
    logger = MetricsLogger(run, resume_step=step) if is_main else None
    sample_text = data["sample_text"].to(device)

    # The dVAE the codes came from: its absolute folder (a relative one would be read from wherever the run is
    # used later) and the digest of its weights, which generate checks before it decodes anything.
    dvae_ref = str(Path(cfg.dvae_path).resolve())
    dvae_digest = data["key"]["dvae"]  # prepare_data's digest of the dVAE's weights (the data cache's key)

    def save(final=False):
        if cfg.fsdp:
            if not final:  # the last step's checkpoint is written by the loop; export follows below
                ts = {"train_config": dataclasses.asdict(cfg), "step": step, "dvae": dvae_ref,
                      "dvae_digest": dvae_digest, "model_config": mcfg.to_dict(), "schedule": sched.state_dict(),
                      "mesh": list(mesh.shape), "grad_scaler": scaler.state_dict() if scaler else None}
                rs = {"rng": rng_state(), "powersgd": powersgd_state.state_dict() if powersgd_state else None}
                fsdp.save_checkpoint(run, step, objective, opt, ts, rs)
            return
        if powersgd_state is not None and not final:  # error feedback is per worker: one file each
            atomic_save({"step": step, "state": powersgd_state.state_dict()}, run / f"powersgd_rank{rank}.pt")
            dist.barrier()
        if not is_main:
            return
        meta = {"train_config": dataclasses.asdict(cfg), "step": step, "dvae": dvae_ref, "dvae_digest": dvae_digest}
        if final:
            save_run_model(run, model, meta)
            return
        state = {"model": model.state_dict(), "model_config": mcfg.to_dict(), **meta}
        state.update(optimizer=opt.state_dict(), schedule=sched.state_dict(), rng=rng_state(),
                     grad_scaler=scaler.state_dict() if scaler else None)
        atomic_save(state, ckpt_path)

    bar = None
    if cfg.progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="transformer", dynamic_ncols=True, file=sys.stderr)
    t0 = time.time()
    model.train()
    while step < cfg.steps:
        text, image = get_batch(data, step, cfg, rank, world)
        text, image = text.to(device), image.to(device)
        lr = sched(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss, lt, li = objective(text, image)
        loss.backward()
        skipped = scaler.unscale_() if scaler is not None else [False] * mcfg.n_layers
        params = [p for p in model.parameters() if p.grad is not None]
        other_ok = _all_finite(params, sharded=cfg.fsdp)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if params else torch.zeros(())
        if hasattr(gnorm, "full_tensor"):  # sharded gradients: the norm of the whole gradient
            gnorm = gnorm.full_tensor()
        if other_ok:
            opt.step()
        if scaler is not None:
            old = list(scaler.scales)
            scaler.update(skipped)
            if powersgd_state is not None:  # keep the error feedback in the units of the new scales
                for l, (a, b) in enumerate(zip(old, scaler.scales)):
                    names = [f"model.blocks.{l}.{n}" for n, _ in model.blocks[l].named_parameters()]
                    powersgd_state.rescale_error(b / a, names)
        parts = torch.stack([loss.detach().float(), lt.float(), li.float()])
        if world > 1:  # log the global batch's losses
            dist.all_reduce(parts)
            parts /= world
        loss_v, lt, li = parts.tolist()
        sched.observe(step, loss_v)
        step += 1
        if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            logger.log(step, loss=loss_v, loss_text=float(lt), loss_image=float(li), lr=lr,
                       grad_norm=float(gnorm), skipped_blocks=sum(skipped), elapsed=time.time() - t0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}")
        if cfg.sample_every and step % cfg.sample_every == 0 and is_main and not cfg.fsdp:
            write_samples(model, dvae, sample_text, run / "samples" / f"step_{step:06d}.png", data, cfg)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save()
    if bar is not None:
        bar.close()
    if powersgd_state is not None and powersgd_state.numel_before:
        _, before, after = powersgd_state.compression_stats()
        log(f"PowerSGD: sent {after:,} elements for {before:,} gradient elements between "
            f"{'replicas' if cfg.fsdp else 'workers'} ({1 - after / before:.1%} less"
            f"{', rank 0' + chr(39) + 's shards' if cfg.fsdp else ''}; compressed updates only)")
    save(final=True)
    if cfg.fsdp:  # the other ranks are done: rank 0 exports and samples alone, no collective left waiting
        dist.barrier()
        dist.destroy_process_group()
        if is_main:
            model = fsdp.export(run, log=log).to(device)  # the single-file model dalle.generate reads
    if is_main:
        write_samples(model, dvae, sample_text, run / "samples" / f"step_{step:06d}.png", data, cfg)
        logger.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return run


def write_samples(model, dvae, text, path, data, cfg):
    from .images import save_grid
    from .sampling import generate_images

    g = torch.Generator(device=text.device).manual_seed(cfg.seed)
    state = torch.get_rng_state()
    tokens = generate_images(model, text, top_k=max(1, int(data["image_vocab"]) // 8), generator=g)
    torch.set_rng_state(state)
    images = dvae.decode(tokens.view(-1, *data["grid"]))
    caps = data["captions"][: len(text)]
    save_grid(images, path, nrow=min(8, len(text)), captions=caps)


def _flag_specs() -> dict:
    """``field: (argparse type or choices, help)`` for every ``TrainConfig`` field."""
    from . import cli

    return {
        "run": (cli.output_dir, "run folder to write (under torchrun: --run-dir)"),
        "dvae": (str, "the frozen dVAE's folder (model.safetensors + config.json, as dalle.train_dvae writes "
                      "it; default: the one --data was encoded with, else RUN/dvae, where dalle.pipeline trains it)"),
        "data": (str, "token shards of your own images and captions, as python -m dalle.encode writes them "
                      "(default: the built-in captioned shapes)"),
        "tokenizer": (str, "a tokenizer.json to reuse (default: BPE trained on the training captions)"),
        "preset": (tuple(PRESETS), "transformer size"),
        "n_layers": (cli.nonneg_int, "transformer blocks (0: the preset's)"),
        "n_heads": (cli.nonneg_int, "attention heads (0: the preset's)"),
        "head_dim": (cli.nonneg_int, "channels per head (0: the preset's)"),
        "text_len": (cli.positive_int, "text slots"),
        "bpe_vocab": (cli.positive_int, "BPE vocabulary size"),
        "dataset_size": (cli.positive_int, "training caption-image pairs (built-in captioned shapes)"),
        "data_seed": (cli.nonneg_int, "seed of the built-in dataset"),
        "steps": (cli.positive_int, "updates"),
        "batch_size": (cli.positive_int, "global batch size"),
        "lr": (cli.positive_float, "peak step size"),
        "warmup": (cli.nonneg_int, "updates of linear warm-up"),
        "plateau_window": (cli.positive_int, "updates per loss window for plateau detection"),
        "plateau_patience": (cli.positive_int, "windows without 1%% improvement before the step size halves"),
        "max_halvings": (cli.nonneg_int, "most halvings of the step size"),
        "weight_decay": (cli.nonneg_float, "AdamW weight decay on matrices"),
        "clip": (cli.positive_float, "gradient norm clip"),
        "bpe_dropout": (cli.probability, "BPE dropout probability, in [0, 1)"),
        "dropout": (cli.probability, "residual dropout in every block, in [0, 1)"),
        "cond_dropout": (cli.probability,
                         "share of samples trained on the empty caption, in [0, 1) (classifier-free guidance)"),
        "image_embedding": (("table", "dvae"), "table: the paper's lookup tables; dvae: vectors computed from "
                                               "the dVAE's codes (dalle.model.CodeEmbedding)"),
        "dropout_variants": (cli.positive_int, "BPE-dropout encodings cached per caption"),
        "seed": (cli.nonneg_int, "seed of the model init and the batches"),
        "device": (cli.device, cli.DEVICE_HELP),
        "precision": (("auto", "fp32", "bf16", "fp16"),
                      "auto: bf16 autocast on CUDA, fp32 on the CPU; bf16 and fp16 need CUDA"),
        "grad_scale": (("auto", "on", "off"), "per-resblock gradient scaling (auto: on with fp16)"),
        "checkpoint_activations": (None, "recompute activations in the backward to save memory"),
        "attn_backend": (cli.ATTN_BACKENDS, "dalle_kernels.sparse_attention backend"),
        "powersgd_rank": (cli.nonneg_int, "PowerSGD rank of the gradient all-reduce (0: off; needs torchrun)"),
        "powersgd_start": (cli.nonneg_int, "plain all-reduce updates before PowerSGD starts"),
        "fsdp": (None, "shard parameters, gradients and optimizer state over --shard-size processes (FSDP2, "
                       "needs torchrun); checkpoints are sharded (RUN/dcp); see dalle.fsdp"),
        "shard_size": (cli.nonneg_int, "with --fsdp: processes per shard group, the GPUs of one machine (0: "
                                       "torchrun's --nproc_per_node); the rest are replicas, which reduce "
                                       "with PowerSGD when --powersgd-rank is set"),
        "ckpt_every": (cli.positive_int, "updates between checkpoints"),
        "log_every": (cli.positive_int, "updates between metrics rows"),
        "sample_every": (cli.nonneg_int, "updates between sample grids (0: only at the end)"),
        "n_sample_captions": (cli.positive_int, "captions in each sample grid"),
        "progress": (None, "progress bar"),
    }


def build_parser() -> argparse.ArgumentParser:
    from . import cli

    p = cli.Parser(prog="python -m dalle.train", description="Train the DALL-E transformer on token shards of your "
                   "own images and captions (--data, from python -m dalle.encode) or on the built-in captioned "
                   "shapes, with a frozen dVAE's codes as image tokens.")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt (with --fsdp: the newest "
                   "complete RUN/dcp/step_XXXXXXXX); it must exist")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory and traffic of sharded training "
                   "and exit (with --preset, --nodes, --gpus-per-node, --batch, --powersgd-rank; see dalle.plan)")
    specs = _flag_specs()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, help_ = specs[f.name]
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        kw = cli.kind_kwargs(kind)
        flags = [flag, "--run-dir"] if f.name == "run" else [flag]  # torchrun takes --run as ambiguous
        p.add_argument(*flags, default=f.default if f.default is not dataclasses.MISSING else None,
                       required=f.default is dataclasses.MISSING, help=help_, **kw)
    return p


def parse_args(argv=None):
    """``(TrainConfig, resume)``; every bad value or combination is a usage error before anything is written."""
    from . import cli

    p = build_parser()
    a = p.parse_args(argv)
    if a.plan:
        p.error("argument --plan: handled by dalle.train.main (or dalle.plan.main), not parse_args")
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    if cfg.data:  # first: the default dVAE is the one the data was encoded with
        from .data.shards import TokenShards

        try:
            shards = TokenShards(cfg.data, split="train")
        except (FileNotFoundError, ValueError) as e:
            p.error(f"argument --data: {e}")
    dvae_file = cli.check_dvae(p, cfg.dvae_path)
    if cfg.data:
        digest = _file_digest(dvae_file)
        if digest != shards.dvae_digest:
            p.error(f"argument --dvae: {cfg.data} holds the codes of another dVAE ({shards.dvae_path}, digest "
                    f"{shards.dvae_digest}) than {cfg.dvae_path} (digest {digest}); train with the dVAE the data "
                    "was encoded with (leave out --dvae) or encode it again with this one (python -m dalle.encode)")
        if len(shards) == 0:
            p.error(f"argument --data: {cfg.data} has no training samples (all are held out)")
    if cfg.tokenizer:
        from .tokenizer import CaptionTokenizer

        try:
            CaptionTokenizer.load(cfg.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"argument --tokenizer: {e}")
    if cfg.head_dim and cfg.head_dim not in HEAD_DIMS:
        p.error(f"argument --head-dim: expected one of {HEAD_DIMS} (0: the preset's), got {cfg.head_dim}")
    cli.check_precision(p, cfg.precision, cfg.device)
    cli.check_attn_backend(p, cfg.attn_backend, cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.powersgd_rank and world <= 1:
        p.error("argument --powersgd-rank: needs several data-parallel workers (run under torchrun)")
    if cfg.shard_size and not cfg.fsdp:
        p.error("argument --shard-size: only with --fsdp")
    if cfg.fsdp:
        if "RANK" not in os.environ:
            p.error("argument --fsdp: run under torchrun (torchrun --nproc_per_node N -m dalle.train --fsdp ...)")
        shard = cfg.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % shard:
            p.error(f"argument --shard-size: {shard} does not divide the {world} processes")
        if cfg.powersgd_rank and world == shard:
            p.error("argument --powersgd-rank: with --fsdp PowerSGD reduces between replicas, and there is one "
                    f"(--shard-size {shard} = all {world} processes)")
    from .fsdp import CHECKPOINT_DIR, checkpoints, resume_problem

    sharded = checkpoints(cfg.run)
    if sharded and not a.resume:  # a fresh run would export (or resume, later) the earlier run's checkpoints
        p.error(f"argument --run: {Path(cfg.run) / CHECKPOINT_DIR} holds the sharded checkpoints of an earlier run "
                f"(newest {sharded[-1].name}): continue it with --resume --fsdp under torchrun, or train into "
                "another folder (or remove that one)")
    if a.resume:
        if cfg.fsdp:
            if not sharded:
                p.error(f"argument --resume: nothing to resume: no complete sharded checkpoint in "
                        f"{Path(cfg.run) / CHECKPOINT_DIR}")
            problem = resume_problem(sharded[-1], dataclasses.asdict(cfg))
            if problem:
                p.error(f"argument --resume: {problem}")
        elif sharded and not (Path(cfg.run) / cli.CHECKPOINT_FILE).is_file():
            p.error(f"argument --resume: {cfg.run} was trained sharded ({Path(cfg.run) / CHECKPOINT_DIR}): resume it "
                    "under torchrun with --fsdp")
        else:
            cli.check_resume(p, cfg.run)
    if cfg.warmup >= cfg.steps:  # after every error: a warning only for a run that starts
            cli.warn(f"--warmup {cfg.warmup} >= --steps {cfg.steps}: the step size never reaches --lr {cfg.lr:g} "
                     f"(it ends at {cfg.lr * min(1.0, cfg.steps / cfg.warmup):.3g}); a short run wants a shorter warm-up")
    return cfg, a.resume


def main(argv=None):
    if "--plan" in (sys.argv[1:] if argv is None else argv):  # the budget only: no dVAE, data or run folder
        from .plan import main as plan_main

        return plan_main(argv)
    cfg, resume = parse_args(argv)
    train(cfg, resume=resume)


if __name__ == "__main__":
    main()
