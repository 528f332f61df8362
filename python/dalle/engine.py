"""The training loop core that both trainers call (``dalle.train`` and ``dalle.train_dvae``): process setup,
checkpoints in one format (``dalle.checkpoint``), resume, the divergence guard, metrics and the progress bar.

A trainer keeps its own flat loop and calls, in order:

    engine = Engine(run, name=..., steps=..., ...)
    folder, train_state, rank_state = engine.resume(state)   # --resume: the newest checkpoint that verifies and loads
    engine.start(step, resumed=...)
    for each step:  ...; engine.end_step(done, loss, nonfinite_grads, row)   # raises Diverged
                    if engine.should_save(done): engine.save(done, state, train_state, rank_state, tensors)
    engine.close()

What the engine guarantees (README "Checkpoints and resuming"): a checkpoint is written only when every parameter
and optimizer tensor is finite; a non-finite loss, or non-finite gradients for ``max_nonfinite_steps``
consecutive steps, stops the run with ``Diverged`` naming the step and the last good checkpoint, which no later
rotation removes (nothing is written after a divergence).
"""
from __future__ import annotations

import math
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .common import MetricsLogger, UnsafeFileError, convert_hint, pick_device
from .fsdp import local
from .runs import LEGACY_CHECKPOINT

DIVERGED_EXIT = 3  # exit status of a command stopped by Diverged (2 is a usage error)


class ResumeError(ValueError):
    """``--resume`` found no checkpoint that verifies and loads; the message names each one tried and why."""


class Diverged(RuntimeError):
    """Training stopped because the loss, the gradients or the parameters stopped being finite; the message names
    the step and the last good checkpoint."""


def setup_distributed(device_str: str, always: bool = False):
    """``(rank, world, device)``; the process group is started under torchrun with several processes, or with
    ``always`` (sharded training needs one even for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (always and "RANK" in os.environ):
        return 0, 1, pick_device(device_str)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_str)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_finite(tensors, sharded: bool) -> bool:
    """Whether every tensor in ``tensors`` (DTensors: this rank's shards) is finite; ``sharded``: the answer is
    agreed across ranks (replicated tensors, as DDP leaves them, are the same on every rank already)."""
    tensors = [local(t) for t in tensors if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            bad += (~torch.isfinite(t)).sum()
    if sharded:
        dist.all_reduce(bad)
    return bool(bad == 0)


def optimizer_tensors(opt) -> list[torch.Tensor]:
    """The tensors of ``opt``'s state (AdamW's moments)."""
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


class Engine:
    """Checkpoints, resume, the divergence guard, metrics and progress of one training run (see the module doc).

    ``layout``: how the processes are arranged (``["ddp", world]`` or ``["fsdp", replicas, shards]``); each
    process's own state (RNG, PowerSGD) is restored only on the layout that wrote it. ``sharded``: tensors are
    DTensor shards, so finiteness is agreed across ranks."""

    def __init__(self, run, *, name: str, steps: int, ckpt_every: int, log_every: int, rank: int = 0,
                 layout=("ddp", 1), sharded: bool = False, keep: int = 2,
                 max_nonfinite_steps: int = 25, progress: bool = True, log=print):
        self.run, self.name, self.steps = Path(run), name, steps
        self.ckpt_every, self.log_every, self.keep = ckpt_every, log_every, keep
        self.layout, self.sharded = list(layout), sharded
        self.max_nonfinite_steps, self.progress = max_nonfinite_steps, progress
        self.is_main = rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.last_good: Path | None = None
        self.nonfinite_run = 0
        self.logger = self.bar = None
        self.t0 = time.time()

    # -------------------------------------------------------------------------------------------- resume
    def resume_point(self, skip=()) -> Path:
        """The newest checkpoint of the run that verifies; each newer one skipped is named with why, one line
        each. ``FileNotFoundError`` when none verifies (the command checked this before any work; this is the
        same rule, applied again in case a file changed since); ``UnsafeFileError`` naming the conversion
        command when the run holds only an earlier version's ``checkpoint.pt``."""
        folder, skipped = checkpoint.newest_verified(self.run, skip)
        for path, why in skipped:
            self.log(f"skipped checkpoint {path}: {why}")
        if folder is None and (self.run / LEGACY_CHECKPOINT).is_file():
            raise UnsafeFileError(f"{self.run / LEGACY_CHECKPOINT} is a checkpoint of an earlier version of dalle, "
                                  f"which is not read; {convert_hint(self.run, trust=True)}")
        if folder is None:
            raise FileNotFoundError(f"no checkpoint of {self.run} verifies"
                                    + (f" ({skipped[0][0].name}: {skipped[0][1]})" if skipped else ""))
        return folder

    def restore(self, folder: Path, state: dict) -> tuple[dict, dict | None]:
        """Load ``folder`` into ``state`` (a DCP state dict); ``(train_state, rank_state)`` as
        ``checkpoint.load``. The folder becomes the last good checkpoint."""
        train_state, rank_state = checkpoint.load(folder, state, self.layout)
        self.last_good = folder
        self.log(f"resumed from {folder} at step {train_state['step']}")
        return train_state, rank_state

    def resume(self, state: dict, verified: Path | None = None) -> tuple[Path, dict, dict | None]:
        """``(folder, train_state, rank_state)``: the newest checkpoint that verifies and loads into ``state``.
        One that verifies but does not load (a crafted or inconsistent file the manifest was rewritten for) is
        skipped with a line saying why, and the next older one tried; ``ResumeError`` when none is left.
        ``verified``: the folder ``resume_point`` has just returned in this process, tried first without hashing
        its files again."""
        tried, skip = [], set()
        while True:
            try:
                folder = verified if verified is not None and not skip else self.resume_point(skip)
            except FileNotFoundError as e:
                raise ResumeError("; ".join(tried + [str(e)])) from None
            try:
                train_state, rank_state = self.restore(folder, state)
                return folder, train_state, rank_state
            except (ValueError, KeyError, TypeError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.log(f"skipped checkpoint {folder}: it verifies but does not load ({why})")
                tried.append(f"{folder.name}: does not load ({why})")
                skip.add(folder.name)

    # -------------------------------------------------------------------------------------------- the loop
    def start(self, step: int, resumed: bool) -> None:
        """Open the metrics file (rows past ``step`` dropped on resume) and the progress bar."""
        if self.is_main:
            self.logger = MetricsLogger(self.run, resume_step=step if resumed else None)
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=self.steps, initial=step, desc=self.name, dynamic_ncols=True, file=sys.stderr)
        self.t0 = time.time()

    def _where(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written before it"
        return (f"the last good checkpoint is {self.last_good} (--resume continues from it; give a lower --lr with "
                "--resume to go on at a smaller step size)")

    def diverged(self, step: int, what: str) -> Diverged:
        return Diverged(f"step {step}: {what}; training stopped, {self._where()}")

    def end_step(self, step: int, loss: float, nonfinite_grads: bool = False, row: dict | None = None,
                 postfix: dict | None = None) -> None:
        """After update ``step`` (counted from 1): the divergence guard (``loss`` and ``nonfinite_grads`` must be
        the same on every rank: the global batch's), then the metrics ``row`` when given (``should_log`` says
        when; the seconds since ``start`` are added as ``elapsed``) and the progress bar. Raises ``Diverged``."""
        if not math.isfinite(loss):
            raise self.diverged(step, f"the training loss is {loss}")
        self.nonfinite_run = self.nonfinite_run + 1 if nonfinite_grads else 0
        if self.nonfinite_run >= self.max_nonfinite_steps:
            raise self.diverged(step, f"the gradients were not finite for {self.nonfinite_run} consecutive steps "
                                      f"(--max-nonfinite-steps {self.max_nonfinite_steps})")
        if self.logger is not None and row is not None:
            self.logger.log(step, **row, elapsed=time.time() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(**postfix)

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def should_save(self, step: int) -> bool:
        return step % self.ckpt_every == 0 or step == self.steps

    def save(self, step: int, state: dict, train_state: dict, rank_state: dict, check: list) -> Path:
        """Checkpoint ``step`` after checking that every tensor of ``check`` (parameters, optimizer state) is
        finite (``Diverged`` otherwise: nothing is written)."""
        if not all_finite(check, self.sharded):
            raise self.diverged(step, "the parameters or the optimizer state are not finite")
        train_state = {**train_state, "step": step, "layout": self.layout}
        self.last_good = checkpoint.save(self.run, step, state, train_state, rank_state, keep=self.keep)
        return self.last_good

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
