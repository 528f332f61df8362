"""Train the DALL-E transformer on captioned images (paper section 2.2, appendix B).

    python -m dalle.train --run runs/mine --dvae runs/dvae --steps 2000
    python -m dalle.train --run runs/photos --data tokens/photos --steps 20000     # your own data
    torchrun --nproc_per_node 2 -m dalle.train --run-dir runs/ddp --dvae runs/dvae [--powersgd-rank 4]
    torchrun --nproc_per_node 8 -m dalle.train --run-dir runs/big --data TOKENS --fsdp --shard-size 8   # sharded

A flat loop over one engine (``dalle.engine``): the same checkpoints (``dalle.checkpoint``: Torch Distributed
Checkpoint folders ``RUN/dcp/step_XXXXXXXX`` with a manifest of checksums) for one process, DDP and FSDP on any
mesh, so a run moves between them with ``--resume``; a resume verifies the checkpoint and refuses other settings
before anything is touched; a non-finite loss (or gradients non-finite for ``--max-nonfinite-steps`` steps)
stops the run, naming the last good checkpoint (README "Checkpoints and resuming").

Data (``dalle.data.tokens``): the built-in captioned shapes (the default) or token shards written by ``python -m
dalle.encode`` (``--data``); the BPE tokenizer is trained on the training captions (``RUN/tokenizer.json``),
``--dropout-variants`` BPE-dropout encodings of every caption are drawn once, from generators seeded by ``--seed``
(``dalle.data.tokens.dropout_rng``), and each step picks one per sample from a generator seeded by the step, so
training is an exact function of the seed and the step.

Optimizer: AdamW betas (0.9, 0.96), eps 1e-8, weight decay 4.5e-2 on matrices only; step size warmed up
linearly, then halved each time the training loss plateaus (at most five times); gradient norm clipped at 4
(paper appendix B.2). Per-resblock gradient scaling (``dalle.grad_scale``, paper section 2.4) is on with
``--precision fp16`` (or ``--grad-scale on``). Sharded (``--fsdp``, ``dalle.fsdp``): FSDP2 over the
``--shard-size`` processes of a machine, replicas between machines (PowerSGD with ``--powersgd-rank``, paper
section 2.5); ``--param-dtype bf16|fp16`` stores the blocks in 16 bits with their Adam moments, updated with
stochastic rounding (``dalle.optim.AdamW16``, paper section 2.4).

Outputs in RUN: the checkpoints, the final model as ``model.safetensors`` + ``config.json`` (model config,
training config, step and dVAE; with ``tokenizer.json`` the Hugging Face folder layout), ``metrics.csv``
(TensorBoard in ``RUN/tb`` when installed), ``samples/step_XXXXXX.png`` grids.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import checkpoint, cli, fsdp
from .common import autocast_context, pretrained_files, rng_state, seed_everything, set_rng_state
from .data.shards import TokenShards, content_digest
from .data.tokens import get_batch, prepare_data, with_views
from .engine import (DIVERGED_EXIT, Diverged, Engine, ResumeError, all_finite, optimizer_tensors,
                     setup_distributed, teardown_distributed)
from .grad_scale import BlockGradScaler
from .images import save_grid
from .model import DALLE, HEAD_DIMS, PRESETS, DALLEConfig, powersgd_uncompressed, preset_help
from .optim import AdamW16
from .plan import PAPER_PRESETS, main as plan_main
from .runs import (MODEL_TYPE, clear_run, export, file_digest, fresh_run_problem, load_dvae,
                   lock_run, run_identity, save_run_model)
from .sampling import generate_images
from .schedules import PlateauSchedule, WarmupCosineSchedule
from .tokenizer import CaptionTokenizer

option = cli.option


@dataclass
class TrainConfig:
    """Every setting of a transformer run, each declared once (default, accepted values, help): the flags of
    ``python -m dalle.train`` are made from these fields."""

    run: str = option(dataclasses.MISSING, cli.output_dir, "run folder to write (under torchrun: --run-dir)",
                      flags=("--run-dir",))
    dvae: str = option("", str, "the frozen dVAE's folder (model.safetensors + config.json, as dalle.train_dvae "
                                "writes it; default: the one --data was encoded with, else RUN/dvae, where "
                                "dalle.pipeline trains it)")
    data: str = option("", str, "token shards of your own images and captions, as python -m dalle.encode writes "
                                "them (default: the built-in captioned shapes)")
    tokenizer: str = option("", str, "a tokenizer.json to reuse (default: BPE trained on the training captions)")
    preset: str = option("tiny", tuple(PRESETS), preset_help())
    n_layers: int = option(0, cli.nonneg_int, "transformer blocks (0: the preset's)")
    n_heads: int = option(0, cli.nonneg_int, "attention heads (0: the preset's)")
    head_dim: int = option(0, cli.nonneg_int, "channels per head (0: the preset's)")
    text_len: int = option(24, cli.positive_int, "text slots")
    bpe_vocab: int = option(256, cli.positive_int, "BPE vocabulary size")
    dataset_size: int = option(4000, cli.positive_int, "training caption-image pairs (built-in captioned shapes)")
    data_seed: int = option(0, cli.nonneg_int, "seed of the built-in dataset")
    steps: int = option(1000, cli.positive_int, "updates")
    batch_size: int = option(32, cli.positive_int, "global batch size (a multiple of the number of processes)")
    lr: float = option(4.5e-4, cli.positive_float, "peak step size")
    warmup: int = option(5000, cli.nonneg_int, "updates of linear warm-up")
    lr_schedule: str = option("plateau", ("plateau", "cosine"), "after the warm-up: plateau: halve the step size "
                              "when the loss stops falling (paper appendix B.2); cosine: decay it to --lr-end-ratio "
                              "times --lr at the last update")
    lr_end_ratio: float = option(0.1, cli.float_in(0, 1), "with --lr-schedule cosine: the last update's step size "
                                 "as a share of --lr")
    plateau_window: int = option(100, cli.positive_int, "updates per loss window for plateau detection")
    plateau_patience: int = option(3, cli.positive_int, "windows without 1%% improvement before the step size "
                                                        "halves")
    max_halvings: int = option(5, cli.nonneg_int, "most halvings of the step size")
    weight_decay: float = option(4.5e-2, cli.nonneg_float, "AdamW weight decay on matrices")
    clip: float = option(4.0, cli.positive_float, "gradient norm clip")
    bpe_dropout: float = option(0.1, cli.probability, "BPE dropout probability, in [0, 1)")
    dropout: float = option(0.0, cli.probability, "residual dropout in every block, in [0, 1)")
    cond_dropout: float = option(0.0, cli.probability, "share of samples trained on the empty caption, in [0, 1) "
                                                       "(classifier-free guidance)")
    image_embedding: str = option("table", ("table", "dvae"), "table: the paper's lookup tables; dvae: vectors "
                                  "computed from the dVAE's codes (dalle.model.CodeEmbedding)")
    dropout_variants: int = option(4, cli.positive_int, "BPE-dropout encodings cached per caption")
    seed: int = option(0, cli.nonneg_int, "seed of the model init and the batches")
    device: str = option("auto", cli.device, cli.DEVICE_HELP)
    threads: int = cli.threads_option()
    precision: str = option("auto", ("auto", "fp32", "bf16", "fp16"),
                            "auto: bf16 autocast on CUDA, fp32 on the CPU; bf16 and fp16 need CUDA")
    grad_scale: str = option("auto", ("auto", "on", "off"), "per-resblock gradient scaling (auto: on with fp16)")
    param_dtype: str = option("auto", ("auto", "fp32", "bf16", "fp16"),
                              "with --fsdp: storage of the blocks' matrices and biases, their gradients and Adam "
                              "moments (bf16 or fp16: 16 bits, updated with stochastic rounding, dalle.optim; gains, "
                              "embeddings and heads stay fp32); auto: bf16 for the paper presets, as the paper, else "
                              "fp32")
    param_rounding: str = option("stochastic", ("stochastic", "nearest"),
                                 "with 16-bit --param-dtype: how updates are rounded to 16 bits (nearest: plain "
                                 "16-bit storage, which loses every update below half the 16-bit spacing; for "
                                 "comparison)")
    checkpoint_activations: bool = option(False, None, "recompute activations in the backward to save memory")
    attn_backend: str = option("auto", cli.ATTN_BACKENDS, "dalle_kernels.sparse_attention backend")
    powersgd_rank: int = option(0, cli.nonneg_int, "PowerSGD rank of the gradient all-reduce (0: off; needs "
                                                   "torchrun)")
    powersgd_start: int = option(10, cli.nonneg_int, "plain all-reduce updates before PowerSGD starts")
    powersgd_layout: str = option("auto", ("auto", "matrix", "shards"),
                                  "with --fsdp --powersgd-rank: matrix: each matrix factored whole across the "
                                  "machine's shards, 16-bit factors and error feedback (paper appendix E); shards: "
                                  "each shard alone, float32; auto: matrix for the paper presets, else shards")
    fsdp: bool = option(False, None, "shard parameters, gradients and optimizer state over --shard-size processes "
                                     "(FSDP2, needs torchrun); see dalle.fsdp")
    shard_size: int = option(0, cli.nonneg_int, "with --fsdp: processes per shard group, the GPUs of one machine "
                                                "(0: torchrun's --nproc_per_node); the rest are replicas, which "
                                                "reduce with PowerSGD when --powersgd-rank is set")
    ckpt_every: int = option(200, cli.positive_int, "updates between checkpoints")
    keep_checkpoints: int = option(2, cli.positive_int, "newest checkpoints kept in RUN/dcp")
    max_nonfinite_steps: int = option(25, cli.positive_int, "consecutive updates with non-finite gradients "
                                      "(beyond what the gradient scaler absorbs) that stop the run")
    log_every: int = option(10, cli.positive_int, "updates between metrics rows")
    sample_every: int = option(0, cli.nonneg_int, "updates between sample grids (0: only at the end)")
    n_sample_captions: int = option(8, cli.positive_int, "captions in each sample grid")
    progress: bool = option(True, None, "progress bar")

    def __post_init__(self):
        cli.check_options(self)
        if self.head_dim and self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS} (0: the preset's), got {self.head_dim}")

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


def resolved_precision(cfg: TrainConfig) -> str:
    """``--precision`` as the run uses it: ``auto`` is bf16 on CUDA, fp32 on the CPU."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if cli.device_is_cuda(cfg.device) else "fp32"


def resolved_param_dtype(cfg: TrainConfig) -> str:
    """``--param-dtype`` as the run uses it: ``auto`` is bf16 for ``--fsdp`` with a paper preset (``paper``,
    ``paper-2.8b``, ``paper-5.6b``; the paper's 16-bit storage, section 2.4), fp32 otherwise."""
    if cfg.param_dtype != "auto":
        return cfg.param_dtype
    return "bf16" if cfg.fsdp and cfg.preset in PAPER_PRESETS else "fp32"


def current_digests(cfg: TrainConfig, dvae_file) -> dict:
    """The digests of what ``cfg`` trains on now: the dVAE's weights, the tokenizer (``--tokenizer``, else the
    run's ``tokenizer.json`` when it has one) and the token shards' manifest (``--data``)."""
    tok = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.run) / "tokenizer.json"
    if tok.is_dir():
        tok = tok / "tokenizer.json"
    return {"--dvae": file_digest(dvae_file), "--tokenizer": file_digest(tok) if tok.is_file() else None,
            "--data": content_digest(cfg.data) if cfg.data else None,
            "--precision": resolved_precision(cfg), "--param-dtype": resolved_param_dtype(cfg)}


# Settings a resume may change with a warning (it then does not equal the run it continues): the step size, to go on
# from the last good checkpoint after a divergence.
RESUME_WARNS = frozenset({"--lr"})


def resume_mismatches(train_state: dict, cfg: TrainConfig, digests: dict) -> list[tuple[str, str]]:
    """``[(flag, "saved -> now"), ...]``: the settings in which a run of ``cfg`` differs from the checkpoint whose
    ``train_state.json`` is ``train_state``. A digest the checkpoint did not record (a converted checkpoint of an
    earlier version) is not compared; a checkpoint that records no settings is one mismatch of ``--resume``."""
    saved = train_state.get("identity")
    if train_state.get("model_type") != MODEL_TYPE or not isinstance(saved, dict):
        return [("--resume", "not a checkpoint of a transformer run")]
    now = run_identity(dataclasses.asdict(cfg), digests)
    what = {"--dvae": "the dVAE's weights", "--tokenizer": "the tokenizer", "--data": "the token shards' contents"}
    return [(flag, f"{what[flag]} differ: digest {saved.get(flag)} -> {now.get(flag) or 'missing'}" if flag in what else
             f"{saved.get(flag)!r} -> {now.get(flag)!r}") for flag in sorted(saved.keys() | now.keys())
            if saved.get(flag) != now.get(flag) and not (flag in digests and saved.get(flag) is None)]


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


def _powersgd(ddp, objective: nn.Module, rank: int, start_iter: int, process_group=None):
    """The PowerSGD state (matrices compressed; gains, biases, embeddings and heads sent whole), registered as
    ``ddp``'s communication hook when given."""
    from dalle_kernels.powersgd import PowerSGDState, powersgd_hook

    exclude = powersgd_uncompressed(objective.model, prefix="model.")
    state = PowerSGDState(objective, rank=rank, start_iter=start_iter, exclude=exclude, process_group=process_group)
    if ddp is not None:
        ddp.register_comm_hook(state, powersgd_hook)
    return state


# ------------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, resume: bool = False, force: bool = False, log=print) -> Path:
    """Train per ``cfg`` (``resume``: from the newest verified checkpoint; ``force``: start over in a folder that
    holds a trained run); returns the folder of the final model (``RUN``: ``model.safetensors`` +
    ``config.json``). Raises ``Diverged`` when the run stops on a non-finite loss, gradients or parameters, and
    ``ValueError`` for a global batch that the processes do not divide."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the {world} processes: each process "
                         "takes an equal share of the global batch")
    if not resume and not force and fresh_run_problem(cfg.run):
        raise FileExistsError(fresh_run_problem(cfg.run))
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        rank, world, device = setup_distributed(cfg.device, always=cfg.fsdp)
        try:
            with lock_run(cfg.run) if rank == 0 else contextlib.nullcontext():
                return _train(cfg, resume, force, log, rank, world, device)
        finally:
            teardown_distributed()
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only, not the caller's process


def _train(cfg: TrainConfig, resume: bool, force: bool, log, rank: int, world: int, device) -> Path:
    run = Path(cfg.run)
    is_main = rank == 0
    log = log if is_main else (lambda *a, **k: None)
    if force and not resume and is_main:
        clear_run(run)
    seed_everything(cfg.seed)
    dvae = load_dvae(cfg.dvae_path, device)
    if is_main:  # rank 0 builds the data cache; the others read it
        data = prepare_data(cfg, dvae, log)
    if world > 1:
        dist.barrier()
        if not is_main:
            data = prepare_data(cfg, dvae, log)
    data = with_views(data, cfg)
    if cfg.image_embedding == "dvae":
        data["code_features"] = dvae.code_features().cpu()
        data["code_feature_groups"] = dvae.code_feature_groups
    mcfg = model_config(cfg, data)
    precision = resolved_precision(cfg)
    mesh = units = None
    if cfg.fsdp:  # built on the meta device; each rank materializes its shards only
        shard_size = cfg.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mesh = fsdp.build_mesh(world, shard_size, device.type)
        with torch.device("meta"):
            model = DALLE(mcfg)
        objective = Objective(model)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        use_hooks = bool(cfg.powersgd_rank) and mesh["replicate"].size() > 1
        storage = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved_param_dtype(cfg), torch.float32)
        units = fsdp.shard_model(objective, mesh, compute, device, cfg.seed, hooks=use_hooks, storage_dtype=storage)
        n_rep, n_shard = mesh["replicate"].size(), mesh["shard"].size()
        layout = ["fsdp", n_rep, n_shard]
        log(f"sharded: {n_rep} replica{'s' * (n_rep != 1)} x {n_shard} shard{'s' * (n_shard != 1)}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{sum(fsdp.local(p).numel() for p in model.parameters()):,} in rank 0's shards, blocks stored in "
            f"{resolved_param_dtype(cfg)}")
    else:
        model = DALLE(mcfg, init_seed=cfg.seed).to(device)
        objective = Objective(model)
        layout = ["ddp", world]
    if mcfg.code_features:
        model.set_code_features(data["code_features"].to(device))
    use_scaler = cfg.grad_scale == "on" or (cfg.grad_scale == "auto" and precision == "fp16")
    scaler = BlockGradScaler(mcfg.n_layers, world_size=world).attach(model) if use_scaler else None
    if resolved_param_dtype(cfg) == "fp32":
        opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.96), eps=1e-8)
    else:  # 16-bit storage: updates with stochastic rounding (dalle.optim)
        opt = AdamW16(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.96), eps=1e-8, seed=cfg.seed,
                      rounding=cfg.param_rounding)
    if cfg.lr_schedule == "cosine":
        sched = WarmupCosineSchedule(cfg.lr, cfg.warmup, cfg.steps, cfg.lr_end_ratio)
    else:
        sched = PlateauSchedule(cfg.lr, cfg.warmup, cfg.plateau_window, cfg.plateau_patience, cfg.max_halvings)
    engine = Engine(run, name="transformer", steps=cfg.steps, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
                    rank=rank, layout=layout, sharded=cfg.fsdp, keep=cfg.keep_checkpoints,
                    max_nonfinite_steps=cfg.max_nonfinite_steps, progress=cfg.progress, log=log)
    # The dVAE the codes came from: its absolute folder (a relative one would be read from wherever the run is
    # used later) and the digest of its weights, which generate checks before it decodes anything.
    dvae_file = pretrained_files(cfg.dvae_path)[0]
    digests = current_digests(cfg, dvae_file)
    meta = {"train_config": dataclasses.asdict(cfg), "dvae": str(Path(cfg.dvae_path).resolve()),
            "dvae_digest": digests["--dvae"]}

    def dcp_state():
        msd, osd = get_state_dict(objective, opt)
        return {"model": msd, "optim": osd}

    step, rank_state = 0, None
    if resume:
        state = dcp_state()
        folder, ts, rank_state = engine.resume(state)
        set_state_dict(objective, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        sched.load_state_dict(ts["schedule"])
        if scaler is not None and ts.get("grad_scaler"):
            scaler.load_state_dict(ts["grad_scaler"])
        step = ts["step"]
        if step >= cfg.steps:
            log(f"the checkpoint is at step {step}, --steps {cfg.steps}: nothing left to train")
    powersgd_state = None
    if cfg.powersgd_rank and world <= 1:
        raise ValueError("--powersgd-rank needs several data-parallel workers (run under torchrun)")
    if cfg.fsdp and cfg.powersgd_rank and mesh["replicate"].size() > 1:
        powersgd_state = _powersgd(None, objective, cfg.powersgd_rank, cfg.powersgd_start,
                                   process_group=mesh["replicate"].get_group())
        layout = cfg.powersgd_layout if cfg.powersgd_layout != "auto" else (
            "matrix" if cfg.preset in PAPER_PRESETS else "shards")
        fsdp.register_powersgd(powersgd_state, objective, units, mesh, layout=layout,
                               factor_dtype=torch.float16 if resolved_param_dtype(cfg) == "fp16" else torch.bfloat16)
    train_module = objective
    if world > 1 and not cfg.fsdp:
        train_module = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.powersgd_rank:
            powersgd_state = _powersgd(train_module, objective, cfg.powersgd_rank, cfg.powersgd_start)
    if resume:
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            if powersgd_state is not None and rank_state.get("powersgd"):
                powersgd_state.load_state_dict(rank_state["powersgd"])
            elif rank_state.get("powersgd"):
                log("the checkpoint's PowerSGD error feedback is not used: this run has no --powersgd-rank")
        else:
            log(f"resuming on a {layout} layout from a {ts.get('layout')} one: model, optimizer and schedule "
                "restored; the RNG state starts afresh" +
                (f"; PowerSGD's error feedback starts empty and its {cfg.powersgd_start} uncompressed updates "
                 f"(--powersgd-start) run again from step {step}" if powersgd_state is not None else ""))
    # torch.save in the checkpoints: the digest of the run's tokenizer as it is now (prepare_data wrote it)
    digests["--tokenizer"] = file_digest(run / "tokenizer.json")
    identity = run_identity(dataclasses.asdict(cfg), digests)
    sample_text = data["sample_text"].to(device)

    def save(done: int) -> None:
        ts = {"model_type": MODEL_TYPE, "model_config": mcfg.to_dict(), "identity": identity, **meta,
              "schedule": sched.state_dict(), "grad_scaler": scaler.state_dict() if scaler else None}
        rs = {"rng": rng_state(), "powersgd": powersgd_state.state_dict() if powersgd_state else None}
        engine.save(done, dcp_state(), ts, rs, list(model.parameters()) + optimizer_tensors(opt))

    engine.start(step, resumed=resume)
    model.train()
    while step < cfg.steps:
        text, image = get_batch(data, step, cfg, rank, world)
        text, image = text.to(device), image.to(device)
        lr = sched(step)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss, lt, li = train_module(text, image)
        loss.backward()
        skipped = scaler.unscale_() if scaler is not None else [False] * mcfg.n_layers
        params = [p for p in model.parameters() if p.grad is not None]
        other_ok = all_finite([p.grad for p in params], sharded=cfg.fsdp)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if params else torch.zeros(())
        if hasattr(gnorm, "full_tensor"):  # sharded gradients: the norm of the whole gradient
            gnorm = gnorm.full_tensor()
        if other_ok:
            opt.step()
        if scaler is not None:
            old = list(scaler.scales)
            scaler.update(skipped)
            if powersgd_state is not None:  # keep the error feedback in the units of the new scales
                for layer, (a, b) in enumerate(zip(old, scaler.scales)):
                    names = [f"model.blocks.{layer}.{n}" for n, _ in model.blocks[layer].named_parameters()]
                    powersgd_state.rescale_error(b / a, names)
        parts = torch.stack([loss.detach().float(), lt.float(), li.float()])
        if world > 1:  # the global batch's losses
            dist.all_reduce(parts)
            parts /= world
        loss_v, lt, li = parts.tolist()
        sched.observe(step, loss_v)
        step += 1
        engine.end_step(step, loss_v, nonfinite_grads=not other_ok or any(skipped),
                        row=dict(loss=loss_v, loss_text=lt, loss_image=li, lr=lr, grad_norm=float(gnorm),
                                 skipped_blocks=sum(skipped)) if engine.should_log(step) else None,
                        postfix=dict(loss=f"{loss_v:.3f}", lr=f"{lr:.2e}"))
        if cfg.sample_every and step % cfg.sample_every == 0 and is_main and not cfg.fsdp:
            write_samples(model, dvae, sample_text, run / "samples" / f"step_{step:06d}.png", data, cfg)
        if engine.should_save(step):
            save(step)
    engine.close()
    if powersgd_state is not None and powersgd_state.numel_before:
        _, before, after = powersgd_state.compression_stats()
        log(f"PowerSGD: sent {after:,} elements for {before:,} gradient elements between "
            f"{'replicas' if cfg.fsdp else 'workers'} ({1 - after / before:.1%} less"
            f"{', rank 0' + chr(39) + 's shards' if cfg.fsdp else ''}; compressed updates only)")
    if cfg.fsdp:  # the other ranks are done: rank 0 exports and samples alone, no collective left waiting
        dist.barrier()
        teardown_distributed()
        if is_main:
            model = export(run, log=log).to(device)  # the single-file model dalle.generate reads
    elif is_main:
        save_run_model(run, model, {**meta, "step": step})
    if is_main:
        write_samples(model, dvae, sample_text, run / "samples" / f"step_{step:06d}.png", data, cfg)
    return run


def write_samples(model, dvae, text, path, data, cfg):
    g = torch.Generator(device=text.device).manual_seed(cfg.seed)
    state = torch.get_rng_state()
    tokens = generate_images(model, text, top_k=max(1, int(data["image_vocab"]) // 8), generator=g)
    torch.set_rng_state(state)
    images = dvae.decode(tokens.view(-1, *data["grid"]))
    caps = data["captions"][: len(text)]
    save_grid(images, path, nrow=min(8, len(text)), captions=caps)


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m dalle.train", description="Train the DALL-E transformer on token shards of your "
                   "own images and captions (--data, from python -m dalle.encode) or on the built-in captioned "
                   "shapes, with a frozen dVAE's codes as image tokens.")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in RUN/dcp that "
                   "verifies, with the run's own settings (README: Checkpoints and resuming); it must exist")
    p.add_argument("--force", action="store_true", help="start a fresh run in a folder that holds a trained run "
                   "(its model and checkpoints are replaced)")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory and traffic of sharded training "
                   "and exit (with --preset, --nodes, --gpus-per-node, --batch, --powersgd-rank; see dalle.plan)")
    cli.add_options(p, TrainConfig)
    return p


def parse_args(argv=None):
    """``(TrainConfig, resume, force)``; every bad value or combination is a usage error before anything is
    written."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.plan:
        p.error("argument --plan: handled by dalle.train.main (or dalle.plan.main), not parse_args")
    try:
        cfg = TrainConfig(**cli.options_of(a, TrainConfig))
    except ValueError as e:
        p.error(cli.name_flags(str(e), [f.name for f in dataclasses.fields(TrainConfig)]))
    if a.resume and a.force:
        p.error("argument --force: not with --resume (--force starts the run over)")
    if cfg.data:  # first: the default dVAE is the one the data was encoded with
        try:
            shards = TokenShards(cfg.data, split="train")
        except (FileNotFoundError, ValueError) as e:
            p.error(f"argument --data: {e}")
    dvae_file = cli.check_dvae(p, cfg.dvae_path)
    if cfg.data:
        digest = file_digest(dvae_file)
        if digest != shards.dvae_digest:
            p.error(f"argument --dvae: {cfg.data} holds the codes of another dVAE ({shards.dvae_path}, digest "
                    f"{shards.dvae_digest}) than {cfg.dvae_path} (digest {digest}); train with the dVAE the data "
                    "was encoded with (leave out --dvae) or encode it again with this one (python -m dalle.encode)")
        if len(shards) == 0:
            p.error(f"argument --data: {cfg.data} has no training samples (all are held out)")
    if cfg.tokenizer:
        try:
            CaptionTokenizer.load(cfg.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"argument --tokenizer: {e}")
    cli.check_precision(p, cfg.precision, cfg.device)
    cli.check_attn_backend(p, cfg.attn_backend, cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        p.error(f"argument --batch-size: the global batch {cfg.batch_size} is not a multiple of the {world} "
                f"processes (each takes an equal share; e.g. --batch-size {cfg.batch_size // world * world or world})")
    if cfg.powersgd_rank and world <= 1:
        p.error("argument --powersgd-rank: needs several data-parallel workers (run under torchrun)")
    if cfg.shard_size and not cfg.fsdp:
        p.error("argument --shard-size: only with --fsdp")
    if cfg.param_dtype in ("bf16", "fp16") and not cfg.fsdp:
        p.error(f"argument --param-dtype: {cfg.param_dtype} storage is for sharded training (--fsdp); one process "
                "and DDP store fp32")
    if cfg.fsdp:
        if "RANK" not in os.environ:
            p.error("argument --fsdp: run under torchrun (torchrun --nproc_per_node N -m dalle.train --fsdp ...)")
        shard = cfg.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % shard:
            p.error(f"argument --shard-size: {shard} does not divide the {world} processes")
        if cfg.powersgd_rank and world == shard:
            p.error("argument --powersgd-rank: with --fsdp PowerSGD reduces between replicas, and there is one "
                    f"(--shard-size {shard} = all {world} processes)")
    run = Path(cfg.run)
    if a.resume:
        check_resume(p, cfg, dvae_file)
    else:
        problem = fresh_run_problem(run)
        if problem and not a.force:
            p.error(f"argument --run: {problem}")
    if cfg.warmup >= cfg.steps:  # after every error: a warning only for a run that starts
        cli.warn(f"--warmup {cfg.warmup} >= --steps {cfg.steps}: the step size never reaches --lr {cfg.lr:g} "
                 f"(it ends at {cfg.lr * min(1.0, cfg.steps / cfg.warmup):.3g}); a short run wants a shorter warm-up")
    return cfg, a.resume, a.force


def check_resume(p, cfg: TrainConfig, dvae_file) -> None:
    """``--resume``: a checkpoint that verifies, of a run with these settings, else a usage error (one line)."""
    folder = cli.verified_checkpoint(p, cfg.run)
    try:
        ts = checkpoint.read_json(folder / checkpoint.TRAIN_STATE, "train state")
    except (OSError, ValueError) as e:
        p.error(f"argument --resume: {e}")
    differ = resume_mismatches(ts, cfg, current_digests(cfg, dvae_file))
    for flag, change in [d for d in differ if d[0] in RESUME_WARNS]:
        cli.warn(f"{flag} {change} on resume: the run continues from {folder.name} at another setting, so it "
                 "will not equal the run it continues")
    differ = [d for d in differ if d[0] not in RESUME_WARNS]
    saved_steps = (ts.get("train_config") or {}).get("steps")
    if cfg.lr_schedule == "cosine" and saved_steps not in (None, cfg.steps):
        cli.warn(f"--steps {saved_steps} -> {cfg.steps} on resume with --lr-schedule cosine: the decay is stretched "
                 f"to the new last update from {folder.name} on, so the run will not equal one trained for "
                 f"{cfg.steps} updates from the start")
    if differ:
        what = "; ".join(f"{flag} {change}" for flag, change in differ)
        p.error(f"argument {differ[0][0]}: {folder} was trained with other settings ({what}); a resume repeats the "
                "run's settings (README: Checkpoints and resuming lists those that may change)")


def main(argv=None):
    if "--plan" in (sys.argv[1:] if argv is None else argv):  # the budget only: no dVAE, data or run folder
        return plan_main(argv)
    cfg, resume, force = parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        cli.advise_threads(cfg.device, cfg.threads)
    try:
        train(cfg, resume=resume, force=force)
    except Diverged as e:
        if main_rank:
            print(f"python -m dalle.train: stopped: {e}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT)
    except ResumeError as e:  # every checkpoint failed to load (the command line checked that one verifies)
        if main_rank:
            print(f"python -m dalle.train: error: argument --resume: nothing loads: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a file the run must write (a full disk, a read-only folder)
        if main_rank:
            print(f"python -m dalle.train: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
