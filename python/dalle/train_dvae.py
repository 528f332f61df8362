"""Train the dVAE (paper section 2.1, appendix A): ``python -m dalle.train_dvae --run DIR [--preset tiny] [--steps N] [--resume]``.

A flat loop over the transformer's engine (``dalle.engine``). Writes into the run folder: checkpoints
(``RUN/dcp/step_XXXXXXXX``, ``dalle.checkpoint``: model, optimizer, k-means centres, RNG and data-stream state,
config; verified on resume, every ``--ckpt-every`` steps and at the end), the final model as ``model.safetensors`` + ``config.json``
(``DVAE.load`` reads the folder; ``dalle.train --dvae DIR``), ``metrics.csv``
(and TensorBoard scalars when installed), ``recon_XXXXXX.png`` grids (held-out images above their
reconstructions) and ``eval.json`` (held-out per-pixel mean absolute error of ``decode(encode(x))``).

Real data: a fraction ``--heldout`` (default 0.02) of the pairs, chosen by a hash of each sample's key (the
image path relative to the folder or the table's folder; a tar's member key; ``dalle.data.folder.heldout_split``,
the rule the token shards use), is held out of training; eval.json (``eval_split: "heldout"``) and the grids use
them. An image folder or table is indexed once at the start with every image decoded (``_Batches``), so a
corrupt file is counted once and never enters a batch; ``--workers`` load its batches in DataLoader processes.
WebDataset tar shards (a .tar, a folder of .tar files, a brace pattern) are read as a stream through a seeded
shuffle buffer of ``--shuffle-buffer`` images (``_StreamBatches``), with the stream's place in the checkpoint.

The first ``--kmeans-warmup-steps`` updates (tiny preset: half of them) are the k-means warm start
(``DVAE.warmup_loss``; the centres are kept in the checkpoint), the rest the ELBO with its schedules.

The batch at step ``s`` is a pure function of ``(seed, s)`` (a per-epoch permutation; the channel order
too) for the built-in data and a folder or table, and a function of the stream's place, saved in the checkpoint,
for shards; the Gumbel noise comes from the global torch RNG saved in the checkpoint, so ``--resume``
continues exactly as an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dalle_kernels import map_pixels

from . import checkpoint, cli
from .common import _atomic_write, autocast_context, pick_device, rng_state, seed_everything, set_rng_state
from .data.folder import ImageCaptionDataset, heldout_split
from .data.sampler import DVAE_STRIDE, EpochSampler
from .data.shapes import ShapesDataset, accuracy
from .data.sources import is_heldout, is_webdataset, open_source
from .data.transforms import preprocess
from .dvae import DVAE, LOGIT_LAPLACE_EPS, DVAEConfig, kmeans_cells
from .engine import DIVERGED_EXIT, Diverged, Engine, ResumeError, all_finite, optimizer_tensors
from .images import save_grid
from .runs import check_finite, clear_run, fresh_run_problem, lock_run
from .schedules import cosine

PRESETS = {"tiny": DVAEConfig.tiny, "paper": DVAEConfig.paper}
option = cli.option


def _data_source(text: str) -> str:
    """argparse type of ``--data``: ``shapes``, an image folder, a .tsv/.csv table, a .tar or a folder of .tar
    files that exists, or a brace pattern of .tar files that all exist."""
    path = Path(text)
    if text == "shapes" or path.is_dir() or (path.is_file() and path.suffix.lower() in (".tsv", ".csv", ".tar")):
        return text
    if not path.exists() and "{" in text and ".." in text:
        import braceexpand

        missing = [f for f in braceexpand.braceexpand(text) if not Path(f).is_file()]
        if not missing:
            return text
        raise argparse.ArgumentTypeError(f"{len(missing)} of the .tar files {text!r} names are missing "
                                         f"(first: {missing[0]})")
    raise argparse.ArgumentTypeError(f"expected shapes, an image folder, a .tsv or .csv file, a .tar, a folder of "
                                     f".tar files or a brace pattern of .tar files such as {{00000..00009}}.tar, got {text!r}"
                                     + ("" if path.exists() else " (no such file or folder)"))


@dataclass
class TrainDVAEConfig:
    """Every setting of a dVAE run, each declared once (default, accepted values, help): the flags of
    ``python -m dalle.train_dvae`` are made from these fields; None: the preset's value (``resolved``)."""

    run: str = option("runs/dvae", cli.output_dir, "run folder to write")
    preset: str = option("tiny", tuple(PRESETS), "model size and schedules")
    data: str = option("shapes", _data_source, "shapes (the built-in captioned shapes), an image folder, a .tsv or .csv table of (path, caption) rows, or WebDataset tar shards (a .tar, a folder of .tar files, or a brace pattern of .tar files such as {00000..00009}.tar)", parse_only=True)
    image_size: int | None = option(None, cli.positive_int, "image side in pixels (default: the preset's)")
    n_hid: int | None = option(None, cli.positive_int, "hidden channels (default: the preset's)")
    n_init: int | None = option(None, cli.positive_int, "channels of the first convolution (default: the preset's)")
    vocab_size: int | None = option(None, cli.int_at_least(2), "codebook size (default: the preset's)")
    group_count: int | None = option(None, cli.positive_int, "resolution groups (default: the preset's)")
    n_blk_per_group: int | None = option(None, cli.positive_int, "residual blocks per group (default: the preset's)")
    num_images: int = option(20000, cli.positive_int, "built-in data: training images")
    eval_images: int = option(256, cli.positive_int, "held-out images for the reconstruction error")
    heldout: float = option(0.02, cli.float_in(0, 1, high_open=True), "real data: fraction of the pairs held out of training for eval.json and the reconstruction grids, chosen by a hash of each sample's key (the image path relative to the folder or table; a tar's member key); at least one when there are 2 or more pairs; 0: none, evaluate on training images")
    shuffle_buffer: int = option(1000, cli.positive_int, "WebDataset shards: images held in the shuffle buffer (3 * S * S bytes each)")
    steps: int = option(1800, cli.positive_int, "updates (the k-means warm start included)")
    batch_size: int = option(32, cli.positive_int, "batch size")
    lr: float | None = option(None, cli.positive_float, "peak step size (paper 1e-4, tiny 3e-3)")
    lr_end: float | None = option(None, cli.nonneg_float, "final step size (paper 1.25e-6, tiny lr / 100)")
    lr_steps: int | None = option(None, cli.positive_int, "updates of the step-size schedule (default: the ELBO updates)")
    beta: float | None = option(None, cli.nonneg_float, "final KL weight (paper 6.6, tiny 0)")
    beta_steps: int | None = option(None, cli.positive_int, "updates of the KL-weight schedule")
    tau_start: float = option(1.0, cli.positive_float, "initial Gumbel-softmax temperature")
    straight_through: bool = option(False, None, "the decoder sees the hard one-hot (gradient of the relaxed one)")
    logit_init_std: float | None = option(None, cli.nonneg_float, "data-dependent init of the logit layer (tiny 3, paper 0: off)")
    encoder_lr: float | None = option(None, cli.positive_float, "encoder step size as a multiple of --lr (tiny 0.1, paper 1)")
    fixed_ln_b_steps: int | None = option(None, cli.nonneg_int, "first N updates use ln b = 0 in the NLL (tiny: all, paper 0)")
    kmeans_warmup_steps: int | None = option(None, cli.nonneg_int, "first N of the --steps updates are the k-means warm start (tiny: steps // 2, paper 0); less than --steps")
    kmeans_images: int = option(1024, cli.positive_int, "images whose cells the warm start's k-means clusters")
    channel_shuffle: str = option("auto", ("auto", "on", "off"), "random RGB channel order per training image (auto: on for the built-in shapes, off for real data)")
    tau_end: float = option(1.0 / 16, cli.positive_float, "final Gumbel-softmax temperature")
    tau_steps: int | None = option(None, cli.positive_int, "updates of the temperature schedule (default: the ELBO updates)")
    weight_decay: float = option(1e-4, cli.nonneg_float, "AdamW weight decay")
    seed: int = option(0, cli.nonneg_int, "seed of the init, the batches and the noise")
    device: str = option("auto", cli.device, cli.DEVICE_HELP)
    precision: str = option("auto", ("auto", "bf16", "fp16", "fp32"), "autocast on CUDA (auto: bf16); the CPU runs fp32")
    threads: int = cli.threads_option()
    workers: int = option(0, cli.nonneg_int, "DataLoader workers for real data")
    log_every: int = option(10, cli.positive_int, "updates between metrics rows")
    sample_every: int = option(200, cli.positive_int, "updates between reconstruction grids")
    ckpt_every: int = option(200, cli.positive_int, "updates between checkpoints")
    keep_checkpoints: int = option(2, cli.positive_int, "newest checkpoints kept in RUN/dcp")
    max_nonfinite_steps: int = option(25, cli.positive_int, "consecutive updates with non-finite gradients that "
                                      "stop the run")
    resume: bool = option(False, None, "continue from the newest checkpoint in RUN/dcp that verifies (it must exist), "
                          "with the run's own settings (README: Checkpoints and resuming)")
    force: bool = option(False, None, "start a fresh run in a folder that holds a trained dVAE or checkpoints (they "
                         "are replaced; token shards encoded with the old dVAE no longer match it)")
    progress: bool = option(True, None, "progress bar")
    stop_at: int | None = option(None, cli.positive_int, "stop (with a checkpoint) after this update, as if interrupted")

    def __post_init__(self):
        cli.check_options(self)

    def resolved(self) -> "TrainDVAEConfig":
        """Fill preset-dependent defaults; raises ValueError on bad values."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        paper = self.preset == "paper"
        c = dataclasses.replace(self)
        if c.kmeans_warmup_steps is None:
            c.kmeans_warmup_steps = 0 if paper else c.steps // 2
        if not 0 <= c.kmeans_warmup_steps < c.steps or c.kmeans_images < 1:
            raise ValueError(f"kmeans_warmup_steps must be in [0, steps) and kmeans_images >= 1, got "
                             f"{c.kmeans_warmup_steps} (steps {c.steps}) and {c.kmeans_images}")
        if isinstance(c.heldout, bool) or not isinstance(c.heldout, (int, float)) or not 0 <= c.heldout < 1:
            raise ValueError(f"heldout must be a fraction in [0, 1), got {c.heldout!r}")
        if isinstance(c.shuffle_buffer, bool) or not isinstance(c.shuffle_buffer, int) or c.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be a positive int, got {c.shuffle_buffer!r}")
        if c.channel_shuffle not in ("auto", "on", "off"):
            raise ValueError(f"channel_shuffle must be auto, on or off, got {c.channel_shuffle!r}")
        if c.channel_shuffle == "auto":
            c.channel_shuffle = "on" if c.data == "shapes" else "off"
        elbo = c.steps - c.kmeans_warmup_steps  # the schedules run over the updates after the warm start
        if c.lr is None:
            c.lr = 1e-4 if paper else 3e-3  # tiny: 6e-3 left some seeds' warm start unsettled (docs/dvae/NOTES.md)
        if c.lr_end is None:
            c.lr_end = 1.25e-6 if paper else c.lr / 100
        if c.lr_steps is None:
            c.lr_steps = 1_200_000 if paper else elbo
        if c.beta is None:
            c.beta = 6.6 if paper else 0.0
        if c.logit_init_std is None:
            c.logit_init_std = 0.0 if paper else 3.0
        if c.encoder_lr is None:
            c.encoder_lr = 1.0 if paper else 0.1
        if c.fixed_ln_b_steps is None:
            c.fixed_ln_b_steps = 0 if paper else c.steps
        if c.logit_init_std < 0 or c.encoder_lr <= 0 or c.fixed_ln_b_steps < 0:
            raise ValueError(f"logit_init_std must be >= 0, encoder_lr > 0 and fixed_ln_b_steps >= 0, got "
                             f"{c.logit_init_std}, {c.encoder_lr} and {c.fixed_ln_b_steps}")
        if c.beta_steps is None:
            c.beta_steps = 5000 if paper else max(1, elbo // 4)
        if c.tau_steps is None:
            c.tau_steps = 150_000 if paper else elbo
        return c

    def model_config(self) -> DVAEConfig:
        names = ("image_size", "n_hid", "n_init", "vocab_size", "group_count", "n_blk_per_group")
        return PRESETS[self.preset](**{k: getattr(self, k) for k in names if getattr(self, k) is not None})


def schedules(cfg: TrainDVAEConfig, step: int) -> dict:
    """beta, tau and step size at ELBO update ``step`` (cosine, paper appendix A.2); the ELBO updates are
    counted from the end of the k-means warm start."""
    return {"beta": cosine(step, 0.0, cfg.beta, cfg.beta_steps),
            "tau": cosine(step, cfg.tau_start, cfg.tau_end, cfg.tau_steps),
            "lr": cosine(step, cfg.lr, cfg.lr_end, cfg.lr_steps)}


# ------------------------------------------------------------------------------------------------- data
class _Batches:
    """Batch of step ``s``: global sample indices ``[s*B, (s+1)*B)``, each mapped through the permutation of
    its epoch (seeded by ``(seed, epoch)``). Real-data samples also get their own augmentation generator.

    Real data: every image is decoded once at construction (``ImageCaptionDataset(verify=True)``), so a corrupt
    file is counted once and left out of the index before the first permutation is drawn; the index, and with
    it every batch, is the same in every run and after every resume. The pairs whose key
    ``heldout_split(keys, cfg.heldout)`` holds out are in ``self.held`` and never in a batch."""

    def __init__(self, cfg: TrainDVAEConfig, image_size: int):
        self.cfg = cfg
        self.real = cfg.data != "shapes"
        self.held = None
        if self.real:
            self.full = ImageCaptionDataset(cfg.data, image_size=image_size, mode="dvae", verify=True)
            train, held = heldout_split(self.full.keys, cfg.heldout)
            self.ds, self.held = self.full.subset(train), self.full.subset(held)
            self.n = len(self.ds)
        else:
            self.images = ShapesDataset("train", cfg.num_images, image_size, seed=cfg.seed).images()
            self.n = len(self.images)
        if self.n < 1:
            raise ValueError(f"no usable image/caption pairs for training in {cfg.data}"
                             + (f" ({self.full.report()})" if self.real else ""))
        self.sampler = EpochSampler(self.n, cfg.batch_size, cfg.seed, DVAE_STRIDE)

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(global index, dataset index) for each sample of the batch at ``step``."""
        return self.sampler.positions(step)

    def batch(self, step: int) -> torch.Tensor:
        idx = self.indices(step)
        if not self.real:
            x = self.images[torch.tensor([i for _, i in idx])]
        else:
            x = torch.stack([self.ds.load(i, seed=(self.cfg.seed, g))[0] for g, i in idx])
        return _shuffle_channels(self.cfg, step, x)

    def first(self, n: int) -> list[torch.Tensor]:
        """The batches of steps ``0 .. n-1`` (the data-dependent init and the k-means warm start see them)."""
        return [self.batch(i) for i in range(n)]

    def eval_set(self, n: int) -> tuple[torch.Tensor, str]:
        """``(images uint8 (m, 3, S, S), split)``: the first ``n`` held-out pairs (eval crop), or the first
        training ones with ``split == "train"`` when nothing is held out."""
        ds, split = (self.held, "heldout") if len(self.held) else (self.ds, "train")
        return torch.stack([ds.load(i, train=False)[0] for i in range(min(n, len(ds)))]), split

    def report(self, file=None) -> str:
        return self.full.report(file)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, list[int]]:
        # a DataLoader worker's item: the batch, and the indices its copy of the data found corrupt
        return self.batch(step), sorted(self.ds.bad)

    def stream(self, start: int, end: int):
        """The batches of steps ``[start, end)`` in order; real data with ``cfg.workers`` loads them in that
        many DataLoader processes (each batch is a function of its step, so the result is the same). A file
        that a worker finds corrupt is counted once, in this process."""
        if not (self.real and self.cfg.workers):
            for step in range(start, end):
                yield self.batch(step)
            return
        # its own generator: a DataLoader draws its workers' base seed from it, and from the global RNG (the
        # Gumbel noise's, saved in the checkpoint) without one
        loader = torch.utils.data.DataLoader(self, batch_size=None, sampler=range(start, end),
                                             num_workers=self.cfg.workers, prefetch_factor=2,
                                             generator=torch.Generator().manual_seed(self.cfg.seed))
        for x, bad in loader:
            self.ds.mark_bad(bad)
            yield x


class _StreamBatches:
    """Batches from a source without random access (WebDataset tar shards, ``dalle.data.sources``).

    The source's units (one per tar file) are read in a per-epoch order (a permutation seeded by
    ``(seed, epoch)``); each unit's training samples (``is_heldout(key, heldout)`` false) are preprocessed as
    they are read (augmentation seeded by ``(seed, epoch, unit, n)``, ``n`` the sample's place in the unit) into
    a shuffle buffer of ``cfg.shuffle_buffer`` images. Each batch element is a slot of the buffer drawn by a
    seeded generator; the slot is refilled with the next sample of the stream. Epochs follow one another without
    a break. Memory: the buffer holds ``shuffle_buffer`` images of ``3 * S * S`` bytes (S = 256: 192 KiB each,
    188 MiB for the default 1000), plus the sample being decoded and the evaluation images; it does not grow
    with the data.

    Exact resume: ``state_dict()`` (saved in the checkpoint) records the reader's place (epoch, unit position,
    samples taken from the unit), the generator's state and, for each buffer slot, where its sample came from.
    ``load_state_dict`` re-reads the units the buffer still refers to (usually one or two: a sample rarely stays
    in a buffer of M slots for more than a few M draws) and skips to the reader's place in its unit, so the
    resumed stream is the one an uninterrupted run reads. Skipped samples are counted by reason the first time
    their unit is read (``unit_skips``, also in the checkpoint), so re-reading in later epochs or on resume
    counts nothing twice. Held-out pairs: the first ``eval_images`` held-out samples in the units' natural order
    (one pass over the data when it holds fewer), by the one held-out rule of every command (the key's hash
    against ``--heldout``, ``dalle.data.sources.is_heldout``); when none falls in the share, nothing is.
    """

    real = True

    def __init__(self, cfg: TrainDVAEConfig, image_size: int):
        self.cfg, self.image_size = cfg, image_size
        self.src = open_source(cfg.data)
        self.unit_skips: dict[int, dict] = {}
        self._eval = None
        self._restart()

    # ----------------------------------------------------------------------------------------- reading
    def _read_unit(self, u: int):
        """Every usable sample of unit ``u``; skips are counted only on the unit's first read."""
        from collections import Counter

        skipped = Counter()
        yield from self.src.iter_unit(u, skipped)
        if u not in self.unit_skips:
            self.unit_skips[u] = dict(skipped)

    def _is_heldout(self, key: str) -> bool:
        return is_heldout(key, self.cfg.heldout)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.src.units), generator=g).tolist()

    def _unit_train(self, epoch: int, pos: int):
        """``(n, preprocessed image)`` for the training samples of the unit at ``pos`` in ``epoch``'s order."""
        u = self.order(epoch)[pos]
        n = 0
        for sample in self._read_unit(u):
            if self._is_heldout(sample.key):
                continue
            g = torch.Generator().manual_seed(int(_mix(self.cfg.seed, epoch, u, n)))
            yield n, preprocess(sample.image, self.image_size, "dvae", g)
            n += 1

    def _next(self) -> tuple[tuple[int, int, int], torch.Tensor]:
        """The stream's next ``((epoch, pos, n), image)``."""
        empty_units = 0
        while True:
            item = next(self._reader, None)
            if item is not None:
                self._ordinal = item[0] + 1
                return (self._epoch, self._pos, item[0]), item[1]
            empty_units = empty_units + 1 if self._ordinal == 0 else 0
            if empty_units >= len(self.src.units):
                raise ValueError(f"{self.src.path}: no training samples ({self.skip_line()}; "
                                 f"--heldout {self.cfg.heldout:g} holds the rest out)")
            self._pos += 1
            if self._pos == len(self.src.units):
                self._epoch, self._pos = self._epoch + 1, 0
            self._ordinal = 0
            self._reader = self._unit_train(self._epoch, self._pos)

    def _restart(self):
        self._epoch = self._pos = self._ordinal = 0
        self._reader = self._unit_train(0, 0)
        self._refs: list[tuple[int, int, int]] = []
        self._slots: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7)
        self.step = 0

    # ----------------------------------------------------------------------------------------- batches
    def batch(self, step: int) -> torch.Tensor:
        """The next batch; ``step`` must be the stream's place (batches come in order)."""
        if step != self.step:
            raise ValueError(f"a stream gives its batches in order: asked for step {step} at step {self.step}")
        while len(self._slots) < self.cfg.shuffle_buffer:
            ref, x = self._next()
            self._refs.append(ref)
            self._slots.append(x)
        out = []
        for j in torch.randint(len(self._slots), (self.cfg.batch_size,), generator=self._gen).tolist():
            out.append(self._slots[j])
            self._refs[j], self._slots[j] = self._next()
        self.step += 1
        return _shuffle_channels(self.cfg, step, torch.stack(out))

    def first(self, n: int) -> list[torch.Tensor]:
        """The batches of steps ``0 .. n-1``, read by a fresh stream (this one stays where it is)."""
        other = _StreamBatches.__new__(_StreamBatches)
        other.__dict__.update(self.__dict__)
        other.unit_skips = self.unit_skips  # shared: a unit's skips are counted once
        other._restart()
        return [other.batch(i) for i in range(n)]

    def stream(self, start: int, end: int):
        for step in range(start, end):
            yield self.batch(step)

    # -------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self._epoch, "pos": self._pos, "ordinal": self._ordinal,
                "refs": [list(r) for r in self._refs], "generator": self._gen.get_state(),
                "unit_skips": {str(u): dict(c) for u, c in self.unit_skips.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.unit_skips = {int(u): dict(c) for u, c in state["unit_skips"].items()}
        self.step, self._epoch, self._pos = state["step"], state["epoch"], state["pos"]
        self._ordinal = state["ordinal"]
        self._gen.set_state(state["generator"])
        self._refs = [tuple(r) for r in state["refs"]]
        found: dict[tuple[int, int, int], torch.Tensor] = {}
        for epoch, pos in sorted({(e, p) for e, p, _ in self._refs}):
            wanted = {n for e, p, n in self._refs if (e, p) == (epoch, pos)}
            for n, x in self._unit_train(epoch, pos):
                if n in wanted:
                    found[(epoch, pos, n)] = x
                if n >= max(wanted):
                    break
        missing = [r for r in self._refs if r not in found]
        if missing:
            raise ValueError(f"{self.src.path}: the data changed since the checkpoint (sample {missing[0]} of the "
                             f"shuffle buffer is gone); resume needs the same shards")
        self._slots = [found[r] for r in self._refs]
        self._reader = self._unit_train(self._epoch, self._pos)
        for _ in range(self._ordinal):
            if next(self._reader, None) is None:
                raise ValueError(f"{self.src.path}: the data changed since the checkpoint (unit "
                                 f"{self.src.units[self.order(self._epoch)[self._pos]]} is shorter)")

    # ------------------------------------------------------------------------------------ eval, report
    def eval_set(self, n: int) -> tuple[torch.Tensor, str]:
        """``(images, split)``: the first ``n`` held-out samples in the units' natural order (eval crop)."""
        held, usable = [], 0
        for u in range(len(self.src.units)):
            for sample in self._read_unit(u):
                usable += 1
                if self._is_heldout(sample.key):
                    held.append(preprocess(sample.image, self.image_size, "eval"))
                    if len(held) == n:
                        return torch.stack(held), "heldout"
        if held:
            return torch.stack(held), "heldout"
        if usable == 0:
            raise ValueError(f"no usable image/caption pairs in {self.src.path} ({self.skip_line()})")
        train = []
        for u in range(len(self.src.units)):
            for sample in self._read_unit(u):
                train.append(preprocess(sample.image, self.image_size, "eval"))
                if len(train) == n:
                    return torch.stack(train), "train"
        return torch.stack(train), "train"

    def skip_line(self) -> str:
        from collections import Counter

        total = Counter()
        for c in self.unit_skips.values():
            total.update(c)
        return ", ".join(f"{k} {v}" for k, v in sorted(total.items())) or "nothing skipped"

    def report(self, file=None) -> str:
        read = len(self.unit_skips)
        line = f"{self.src.path}: {read} of {len(self.src.units)} units read, skipped: {self.skip_line()}"
        if file is not None:
            print(line, file=file)
        return line


def _mix(*ints: int) -> int:
    """A 63-bit seed from non-negative ints (numpy's SeedSequence: distinct tuples, unrelated streams)."""
    import numpy as np

    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0] >> 1)


def _shuffle_channels(cfg: TrainDVAEConfig, step: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` with a random RGB order per image (seeded by ``(seed, step)``) when ``channel_shuffle`` is on."""
    if cfg.channel_shuffle != "on":
        return x
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
    order = _CHANNEL_ORDERS[torch.randint(len(_CHANNEL_ORDERS), (len(x),), generator=g)]
    return torch.gather(x, 1, order[:, :, None, None].expand_as(x))


def _is_shards(data: str) -> bool:
    """``--data`` names WebDataset tars (``dalle.data.sources.is_webdataset``, ``open_source``'s rule)."""
    return is_webdataset(data)


def _data(cfg: TrainDVAEConfig, image_size: int):
    return _StreamBatches(cfg, image_size) if cfg.data != "shapes" and _is_shards(cfg.data) else \
        _Batches(cfg, image_size)


# the six orders of (R, G, B); the built-in palette (red, green, blue, yellow, magenta, cyan) maps onto itself
_CHANNEL_ORDERS = torch.tensor(list(itertools.permutations(range(3))))


def _heldout(cfg: TrainDVAEConfig, image_size: int, data):
    """``(images, scenes, split)`` for the reconstruction error: the built-in held-out split, or the first
    ``eval_images`` held-out real pairs (eval crop). Real data with nothing held out (``--heldout 0`` or a
    single usable pair) is evaluated on its first training images, with a warning, and ``split`` says
    ``"train"``."""
    if cfg.data == "shapes":
        ds = ShapesDataset("heldout", cfg.eval_images, image_size, seed=cfg.seed)
        return ds.images(), [ds.scene(i) for i in range(len(ds))], "heldout"
    images, split = data.eval_set(cfg.eval_images)
    if split == "train":
        why = "--heldout 0" if cfg.heldout == 0 else f"no pair fell in the held-out share (--heldout {cfg.heldout:g})"
        print(f"warning: {why}: no held-out images; eval.json reports the error on training images",
              file=sys.stderr)
    return images, None, split


@torch.no_grad()
def evaluate(model: DVAE, images: torch.Tensor, scenes=None, batch_size: int = 128) -> tuple[dict, torch.Tensor]:
    """Per-pixel mean absolute error of ``decode(encode(x))`` in [0, 1] units (and scorer accuracy for shapes)."""
    model.eval()
    device = next(model.parameters()).device
    err, recons = 0.0, []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        r = model.reconstruct(x)
        err += (r - x.float() / 255).abs().sum().item()
        recons.append(r.cpu())
    model.train()
    out = {"heldout_mae": err / images.numel(), "heldout_scorer_acc": "", "codes_used": None}
    recon = torch.cat(recons)
    if scenes is not None:
        out["heldout_scorer_acc"] = accuracy(recon, scenes)
    with torch.no_grad():
        codes = torch.cat([model.encode(images[i:i + batch_size].to(device)).flatten().cpu()
                           for i in range(0, len(images), batch_size)])
    out["codes_used"] = int(codes.unique().numel())
    return out, recon


# ---------------------------------------------------------------------------------------------- trainer
def train_dvae(config: TrainDVAEConfig) -> Path:
    """Train (or resume) a dVAE run; returns the folder of the final model (``RUN``: ``model.safetensors`` +
    ``config.json``), or the newest checkpoint when ``stop_at`` ends it early.

    Raises ``FileExistsError`` for a fresh run in a folder that holds a trained dVAE or checkpoints (without
    ``force``), ``FileNotFoundError`` / ``ValueError`` for ``resume`` without a checkpoint that verifies or with
    other settings, ``DataError`` when the data has nothing to train on (nothing is written then), and
    ``Diverged`` when the run stops on a non-finite loss, gradients or parameters."""
    threads = torch.get_num_threads()
    try:
        with lock_run(config.run):
            return _train(config)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only, not the caller's process


# the left margin of a reconstruction grid's first row, by the split its images come from (``_heldout``)
RECON_LABELS = {"heldout": "held-out image", "train": "training image"}


class DataError(ValueError):
    """``--data`` holds nothing the dVAE can train on (no usable image/caption pair); nothing was written."""


# Settings a resume may change: the length and the bookkeeping. A setting left to resolve itself (None: the
# preset's; "auto") takes the checkpoint's value on resume; every other setting must equal it (README "Checkpoints and resuming").
RESUMABLE = frozenset({"run", "steps", "stop_at", "resume", "force", "progress", "device", "threads", "workers",
                       "log_every", "sample_every", "ckpt_every", "keep_checkpoints", "max_nonfinite_steps"})


def resume_config(cfg: TrainDVAEConfig, train_state: dict) -> TrainDVAEConfig:
    """The resolved config of a resume of the run whose checkpoint's ``train_state.json`` is ``train_state``:
    the checkpoint's settings with ``cfg``'s resumable ones. ``ValueError`` naming the flags that ``cfg`` sets to
    other values than the run was trained with."""
    if train_state.get("model_type") != "dalle_dvae" or not isinstance(train_state.get("train_config"), dict):
        raise ValueError("--resume: the checkpoint is not of a dVAE run")
    saved = TrainDVAEConfig(**{**train_state["train_config"], "resume": False, "force": False})
    given = dataclasses.asdict(cfg)
    differ = [f"--{k.replace('_', '-')} {getattr(saved, k)!r} -> {v!r}" for k, v in given.items()
              if k not in RESUMABLE | {"lr"} and v not in (None, "auto") and v != getattr(saved, k)]
    if given["lr"] is not None and given["lr"] != saved.lr:  # to go on after a divergence: allowed, said
        print(f"warning: --lr {saved.lr!r} -> {given['lr']!r} on resume: the run continues at another step size, so "
              "it will not equal the run it continues", file=sys.stderr)
    if differ:
        raise ValueError(f"{differ[0].split(' ', 1)[0]}: the run was trained with other settings "
                         f"({'; '.join(differ)}); a resume repeats the run's settings (README: Checkpoints and "
                         "resuming lists those that may change)")
    return dataclasses.replace(saved, **{k: given[k] for k in RESUMABLE},
                               **({"lr": given["lr"]} if given["lr"] is not None else {}))


def _train(config: TrainDVAEConfig) -> Path:
    run = Path(config.run)
    if not config.resume and not config.force:
        problem = fresh_run_problem(run)
        if problem:
            raise FileExistsError(problem)
    cfg = config.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    engine = Engine(run, name="dvae", steps=cfg.steps, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
                    keep=cfg.keep_checkpoints, max_nonfinite_steps=cfg.max_nonfinite_steps, progress=cfg.progress,
                    log=lambda m: print(m, file=sys.stderr))
    folder = ts = None
    if cfg.resume:
        folder = engine.resume_point()
        ts = checkpoint.read_json(folder / checkpoint.TRAIN_STATE, "train state")
        cfg = resume_config(config, ts).resolved()
    else:
        seed_everything(cfg.seed)
    mcfg = DVAEConfig(**ts["model_config"]) if ts else cfg.model_config()
    try:  # before anything is written: a --data with nothing usable leaves no run folder behind
        data = _data(cfg, mcfg.image_size)
        # before any batch: a stream learns here which sample is held out when the fraction picks none
        eval_images, eval_scenes, eval_split = _heldout(cfg, mcfg.image_size, data)
    except ValueError as e:
        raise DataError(str(e)) from None
    if config.force and not config.resume:
        clear_run(run)
    model = DVAE(mcfg).to(device)
    groups = [{"params": list(model.encoder.parameters()), "lr_mult": cfg.encoder_lr},
              {"params": list(model.decoder.parameters()), "lr_mult": 1.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    # fp16 has too few exponent bits for the loss gradient (about 1 / (pixels in the batch) per value): the
    # loss is scaled before the backward and unscaled in fp32 before the update (torch.amp's dynamic scaler),
    # as the logit-Laplace op's own backward expects. bf16 and fp32 need no scale.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    centres = None
    if cfg.kmeans_warmup_steps:  # a tensor of the checkpoint: allocated here, filled on resume
        centres = torch.zeros(mcfg.vocab_size, 3 * mcfg.grid_factor ** 2)

    def dcp_state():
        msd, osd = get_state_dict(model, opt)
        return {"model": msd, "optim": osd, **({"kmeans_centres": centres} if centres is not None else {})}

    start = 0
    if folder is not None:
        state = dcp_state()
        folder, ts, rank_state = engine.resume(state, verified=folder)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if centres is not None:
            centres = state["kmeans_centres"]
        if ts.get("grad_scaler"):
            scaler.load_state_dict(ts["grad_scaler"])
        start = ts["step"]
        if rank_state is None:
            raise ValueError(f"{folder}: no rank0.pt state for this process; a dVAE run resumes in one process")
        set_rng_state(rank_state["rng"])
        if hasattr(data, "load_state_dict"):
            if not rank_state.get("data"):
                raise ValueError(f"{folder}: no data-stream position in the checkpoint; cannot resume a run on "
                                 f"shards exactly")
            data.load_state_dict(rank_state["data"])
    else:
        if cfg.logit_init_std:
            x0 = data.first(1)[0].to(device)
            x0 = x0.float() / 255 if x0.dtype == torch.uint8 else x0.float()
            model.encoder.init_logits_from_data(map_pixels(x0, LOGIT_LAPLACE_EPS), cfg.logit_init_std)
        if centres is not None:  # cells of the first kmeans_images training images (as the first updates see them)
            n = -(-cfg.kmeans_images // cfg.batch_size)
            x = torch.cat(data.first(n))[:cfg.kmeans_images]
            centres = kmeans_cells(x, mcfg.grid_factor, mcfg.vocab_size,
                                   generator=torch.Generator().manual_seed(cfg.seed))
    if centres is not None:
        centres = centres.to(device)
    run.mkdir(parents=True, exist_ok=True)
    _atomic_write(run / "train_config.json", lambda f: f.write(json.dumps(asdict(cfg), indent=2).encode()))
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)

    def save(step):
        ts = {"model_type": "dalle_dvae", "model_config": asdict(mcfg), "train_config": asdict(cfg),
              "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}
        rs = {"rng": rng_state(), "data": data.state_dict() if hasattr(data, "state_dict") else None}
        state = dcp_state()
        if centres is not None:
            state["kmeans_centres"] = centres.cpu()
        engine.save(step, state, ts, rs, list(model.parameters()) + optimizer_tensors(opt))

    engine.start(start, resumed=folder is not None)
    model.train()
    batches = data.stream(start, end)
    for step in range(start, end):
        warm = step < cfg.kmeans_warmup_steps
        elbo_step = step - cfg.kmeans_warmup_steps
        # the warm start runs both halves at the peak step size; the schedules start after it
        s = {"beta": "", "tau": "", "lr": cfg.lr} if warm else schedules(cfg, elbo_step)
        for group in opt.param_groups:
            group["lr"] = s["lr"] * (1.0 if warm else group["lr_mult"])
        x = next(batches).to(device, non_blocking=True)
        with autocast_context(device, cfg.precision):
            if warm:
                loss, stats = model.warmup_loss(x, centres, fixed_ln_b=cfg.fixed_ln_b_steps > 0)
                stats["kl"] = torch.zeros(())
            else:
                loss, stats = model.loss(x, tau=s["tau"], beta=s["beta"], hard=cfg.straight_through,
                                         fixed_ln_b=elbo_step < cfg.fixed_ln_b_steps)
        done = step + 1
        if not torch.isfinite(loss):  # before the update: the parameters stay as the last good step left them
            raise engine.diverged(done, f"the training loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads_ok = all_finite([p.grad for p in model.parameters()], sharded=False)
        if grads_ok:
            scaler.step(opt)  # with fp16 the scaler lowers its scale on the steps it skips
        scaler.update()
        ev = {"heldout_mae": "", "heldout_scorer_acc": "", "codes_used": ""}
        if done % cfg.sample_every == 0 or done == cfg.steps:
            ev, recon = evaluate(model, eval_images, eval_scenes)
            n = min(16, len(eval_images))
            save_grid(torch.cat([eval_images[:n].float() / 255, recon[:n]]), run / f"recon_{done:06d}.png", nrow=n,
                      row_labels=[RECON_LABELS[eval_split], "reconstruction"])
        row = {"loss": loss.item(), "nll": stats["nll"].item(), "kl": stats["kl"].item(),
               "warmup_ce": stats["ce"].item() if warm else "", **s, **ev}
        logged = done % cfg.log_every == 0 or done == end or ev["heldout_mae"] != ""  # eval rows too
        engine.end_step(done, row["loss"], nonfinite_grads=not grads_ok, row=row if logged else None,
                        postfix={"loss": f"{row['loss']:.4f}", **({"ce": f"{row['warmup_ce']:.3f}"} if warm else
                                                                  {"kl": f"{row['kl']:.4f}", "tau": f"{s['tau']:.3f}"})})
        if done % cfg.ckpt_every == 0 or done == end:
            save(done)
    engine.close()
    if data.real:
        data.report(file=sys.stderr)
    if end < cfg.steps:
        return engine.last_good
    check_finite(model.state_dict(), run)
    path = model.save(run)
    ev, _ = evaluate(model, eval_images, eval_scenes)
    ev.update(eval_split=eval_split, eval_images=len(eval_images), steps=cfg.steps,
              train_wall_s=time.time() - engine.t0 if start == 0 else None)
    ev.update(weak_verdict(ev))
    _atomic_write(run / "eval.json", lambda f: f.write(json.dumps(ev, indent=2).encode()))
    if ev["weak"]:
        print(f"warning: {ev['weak_reason']}", file=sys.stderr)
    return path


# A dVAE whose reconstructions the scorer rejects for more than this share of held-out images is weak: the
# transformer's samples cannot be better than what the dVAE draws back (README: Results).
WEAK_BELOW = 0.9


def weak_verdict(ev: dict) -> dict:
    """``{"weak": bool | None, "weak_reason": str}`` for an ``evaluate`` result: weak when the scorer accepts
    fewer than ``WEAK_BELOW`` of the reconstructions (the built-in shapes; None where no scorer reads the
    images, as for real data)."""
    acc = ev.get("heldout_scorer_acc")
    if not isinstance(acc, float):
        return {"weak": None, "weak_reason": "no scorer for these images (real data): judge the reconstruction "
                                              "grids and heldout_mae"}
    if acc < WEAK_BELOW:
        split = "held-out" if ev.get("eval_split") == "heldout" else "training"
        return {"weak": True, "weak_reason": f"weak dVAE: the scorer accepts {acc:.1%} of its {ev.get('eval_images')} "
                                             f"{split} reconstructions, below {WEAK_BELOW:.0%}; every sample drawn "
                                             "through it is limited by that (train it again with more --steps or "
                                             "another --seed)"}
    return {"weak": False, "weak_reason": ""}


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m dalle.train_dvae",
                   description="Train the discrete VAE whose codes are the transformer's image tokens.")
    cli.add_options(p, TrainDVAEConfig)
    return p


def parse_args(argv=None) -> TrainDVAEConfig:
    """The checked config; every bad value or combination is a usage error before anything is written."""
    p = build_parser()
    try:
        cfg = TrainDVAEConfig(**cli.options_of(p.parse_args(argv), TrainDVAEConfig))
    except ValueError as e:
        p.error(cli.name_flags(str(e), [f.name for f in dataclasses.fields(TrainDVAEConfig)]))
    cli.check_precision(p, cfg.precision, cfg.device)
    if cfg.resume and cfg.force:
        p.error("argument --force: not with --resume (--force starts the run over)")
    if cfg.resume:
        folder = cli.verified_checkpoint(p, cfg.run)
        try:
            resume_config(cfg, checkpoint.read_json(folder / checkpoint.TRAIN_STATE, "train state"))
        except ValueError as e:
            flag, _, rest = str(e).partition(": ")
            p.error(f"argument {flag}: {folder}: {rest}")
    elif not cfg.force:
        problem = fresh_run_problem(cfg.run)
        if problem:
            p.error(f"argument --run: {problem}")
    if cfg.kmeans_warmup_steps is not None and cfg.kmeans_warmup_steps >= cfg.steps:
        p.error(f"argument --kmeans-warmup-steps: must be less than --steps ({cfg.steps}), "
                f"got {cfg.kmeans_warmup_steps}")
    if cfg.data == "shapes" and cfg.heldout != 0.02:
        cli.warn("--heldout: the built-in shapes have their own held-out split; --heldout only serves real data")
    if cfg.data == "shapes" and cfg.workers:
        cli.warn("--workers: the built-in shapes are made in memory; --workers only serves real data")
    shards = cfg.data != "shapes" and _is_shards(cfg.data)
    if shards and cfg.workers:
        cli.warn("--workers: WebDataset shards are read as one stream in this process; --workers serves an image "
                 "folder or table")
    if not shards and cfg.shuffle_buffer != 1000:
        cli.warn("--shuffle-buffer: only WebDataset shards are read through a shuffle buffer")
    try:
        cfg.resolved().model_config()
    except ValueError as e:  # a combination of model sizes the dVAE cannot take (image size vs. groups, ...)
        p.error(cli.name_flags(str(e), [f.name for f in dataclasses.fields(TrainDVAEConfig)]))
    return cfg


def main(argv=None) -> None:
    cfg = parse_args(argv)
    cli.advise_threads(cfg.device, cfg.threads)
    try:
        path = train_dvae(cfg)
    except DataError as e:
        print(f"python -m dalle.train_dvae: error: argument --data: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"python -m dalle.train_dvae: stopped: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)
    except ResumeError as e:
        print(f"python -m dalle.train_dvae: error: argument --resume: nothing loads: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a file the run must write (a full disk, a read-only folder), or the folder in use
        print(f"python -m dalle.train_dvae: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {path}")
    ev = Path(cfg.run) / "eval.json"
    if ev.exists() and path == Path(cfg.run):
        print(ev.read_text())


if __name__ == "__main__":
    main()
