"""Sharded training as the paper trained 12B parameters (appendix D-E), on PyTorch's own engine.

    torchrun --nproc_per_node 8 -m dalle.train --run-dir runs/big --fsdp --shard-size 8 ...          # one machine
    torchrun --nnodes 4 --nproc_per_node 8 ... -m dalle.train --run-dir runs/big --fsdp --shard-size 8 \\
        --powersgd-rank 32 ...                                                                       # four machines

* A 2-D ``DeviceMesh`` (``replicate`` x ``shard``; ``shard`` = the GPUs of one machine). Parameters, gradients
  and AdamW state are sharded over ``shard`` by FSDP2 ``fully_shard``: one unit per residual block (with its two
  LayerNorms as units of their own, so their gains stay 32-bit) and the root (embeddings, final norm, heads).
  ``MixedPrecisionPolicy``: a block's matrices and biases are all-gathered and computed in the 16-bit compute
  dtype (``--precision bf16|fp16``), gains, embeddings and heads in float32, gradients reduced in float32
  (SPEC.md section 4). Sharded parameters, and so AdamW's moments, stay float32.
* The model is built on the meta device; each rank materializes only its shards, each parameter's values drawn
  from a generator seeded by (seed, parameter name) (``DALLE.initial_value``), the same values a single process
  makes: the full model is never allocated anywhere, one parameter at a time at most.
* Between replicas: without PowerSGD, FSDP2's own HSDP all-reduce. With ``--powersgd-rank``, the units are
  sharded over the ``shard`` dimension only and every unit's reduce-scatter output goes through
  ``dalle_kernels.powersgd.fsdp_all_reduce_hook`` (``FSDPModule.set_all_reduce_hook``): PowerSGD over the
  replicas of each parameter's gradient shard, with error feedback and warm start per shard.
* Checkpoints: Torch Distributed Checkpoint, ``RUN/dcp/step_XXXXXXXX`` (``save_checkpoint``): written into a
  temporary folder and renamed once every rank has finished, so a folder under its final name is complete.
  Loading reshards (4 ranks -> 2 ranks works); PowerSGD's error feedback and each rank's RNG state are per rank
  and restored only on the same mesh. ``python -m dalle.export --run RUN`` writes the weights as
  ``model.safetensors`` + ``config.json`` (what ``dalle.generate`` reads).

Every file is read without running code from it: DCP's ``.metadata`` is a pickle, read here by a restricted
unpickler (``SafeFileSystemReader``) that admits only DCP's own metadata classes; tensors are read by
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

CHECKPOINT_DIR = "dcp"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"


# ------------------------------------------------------------------------------------------------ mesh, sharding
def build_mesh(world: int, shard_size: int, device_type: str):
    """``(replicas, shard_size)`` ``DeviceMesh`` named ``("replicate", "shard")``; ranks ``r * S .. r * S + S - 1``
    form replica ``r`` (one machine with torchrun's rank order).

    Raises ``ValueError`` when ``shard_size`` does not divide the world size."""
    from torch.distributed.device_mesh import init_device_mesh

    if shard_size <= 0 or world % shard_size:
        raise ValueError(f"--shard-size must divide the number of processes ({world}), got {shard_size}")
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def shard_model(objective: nn.Module, mesh, compute_dtype: torch.dtype | None, device: torch.device,
                seed: int, hooks: bool) -> list:
    """Shard ``objective`` (an ``Objective`` around a ``DALLE`` built on the meta device) with ``fully_shard`` and
    materialize this rank's shards on ``device``, initialized as ``DALLE(cfg, init_seed=seed)`` would be.

    ``hooks``: shard over ``mesh["shard"]`` only (the replicas then reduce through an all-reduce hook, PowerSGD);
    otherwise over the whole 2-D mesh (FSDP2's HSDP: reduce-scatter in a replica, all-reduce across replicas).
    ``compute_dtype``: the blocks' 16-bit compute dtype, or None for float32. Returns the units as
    ``(module, is_root)`` in the order their gradients are reduced in backward (blocks top-down, root last).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = objective.model
    shard_mesh = mesh["shard"] if hooks else mesh
    fp32 = MixedPrecisionPolicy()
    low = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else fp32
    units = []
    for block in model.blocks:
        for ln in (block.ln1, block.ln2):  # gains and their biases stay float32
            fully_shard(ln, mesh=shard_mesh, mp_policy=fp32)
            units.append((ln, False))
        fully_shard(block, mesh=shard_mesh, mp_policy=low)
        units.append((block, False))
    fully_shard(objective, mesh=shard_mesh, mp_policy=fp32)
    units.append((objective, True))
    objective.to_empty(device=device)
    rules = model.init_rules()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(model.initial_value(name, seed, rules, rows=_local_rows(p)))
        for b in model.buffers():  # CodeEmbedding.features: set by the trainer (set_code_features)
            b.zero_()
    return list(reversed(units))


def shard_rows(rows: int, shards: int) -> int:
    """Rows of each shard of a parameter with ``rows`` rows (FSDP2's ``Shard(0)``, ``torch.chunk``): the flat
    reduce-scatter output pads every rank's shard to this many."""
    return -(-rows // shards)


def _local_rows(p) -> tuple[int, int]:
    """``(start, stop)``: the rows (dim 0) of the full parameter that this rank's shard of DTensor ``p`` holds
    (FSDP2's ``Shard(0)``: ``torch.chunk`` pieces of ``ceil(rows / shards)`` rows, the last ones shorter or empty)."""
    from torch.distributed.tensor import Shard

    rows, start, stop = p.shape[0], 0, p.shape[0]
    coord = p.device_mesh.get_coordinate()
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise RuntimeError(f"expected parameters sharded on dim 0, got {placement}")
            size = shard_rows(rows, p.device_mesh.size(dim))
            start, stop = min(rows, coord[dim] * size), min(rows, (coord[dim] + 1) * size)
    if stop - start != p.to_local().shape[0]:
        raise RuntimeError(f"shard rows [{start}, {stop}) do not match the local shard {tuple(p.to_local().shape)}")
    return start, stop


def unit_parameter_names(objective: nn.Module, unit: nn.Module, units: list) -> list[str]:
    """Names (in ``objective``) of the parameters ``unit`` manages, in the order FSDP2 lays out their gradients
    in the unit's flat reduce-scatter output: modules in post-order (children before their parent), not entering
    units nested in it, each module's own parameters in registration order (``_get_managed_modules`` /
    ``_get_managed_states`` of ``torch.distributed.fsdp``; tests/test_fsdp.py checks it against FSDP2's own)."""
    names = {id(p): n for n, p in objective.named_parameters()}
    nested = {id(u) for u, _ in units if u is not unit}
    order, seen = [], set()

    def visit(module):
        for child in module.children():
            if id(child) not in nested:
                visit(child)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                order.append(names[id(p)])

    visit(unit)
    return order


def register_powersgd(state, objective: nn.Module, units: list, mesh) -> None:
    """PowerSGD between replicas on every unit's reduce-scatter output (``fsdp_all_reduce_hook``)."""
    from dalle_kernels.powersgd import fsdp_all_reduce_hook

    shards = mesh["shard"].size()
    group = mesh["replicate"].get_group()
    for unit, is_root in units:
        names = unit_parameter_names(objective, unit, units)
        _check_layout(objective, unit, names)
        shapes = [(shard_rows(s[0], shards),) + tuple(s[1:]) for s in
                  (objective.get_parameter(n).shape for n in names)]
        unit.set_all_reduce_hook(fsdp_all_reduce_hook(state, names, shapes, group, is_last=is_root))


def _check_layout(objective: nn.Module, unit: nn.Module, names: list[str]) -> None:
    """``RuntimeError`` when FSDP2 (its internal state, where this version of torch exposes it) orders the unit's
    parameters otherwise than ``names``: the hook would read the wrong slices of the flat gradient."""
    try:
        fsdp_params = unit._get_fsdp_state()._fsdp_param_groups[0].fsdp_params
        theirs = [id(fp._module_info.module.get_parameter(fp._module_info.param_name)) for fp in fsdp_params]
    except (AttributeError, IndexError):
        return  # not exposed: the hook still checks the flat gradient's size
    ours = [id(objective.get_parameter(n)) for n in names]
    if theirs != ours:
        raise RuntimeError(f"FSDP2 lays out the gradients of {type(unit).__name__} in another order than "
                           "dalle.fsdp.unit_parameter_names assumes; PowerSGD would compress the wrong slices")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


# ------------------------------------------------------------------------------------------------ checkpoints
class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's ``.metadata`` holds, by exact module and name (a dotted name, which pickle resolves as an
    attribute path, is refused: it could reach ``os.system`` through any module that imports ``os``): DCP's
    metadata dataclasses and enum, ``torch.Size``, dtypes, layouts and memory formats, paths and containers."""

    _GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "TensorProperties",
                                                 "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                                 "StorageMeta", "_MEM_FORMAT_ENCODING")}
    _GLOBALS |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch", "device"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
                 ("builtins", "frozenset"), ("builtins", "slice"), ("pathlib", "PosixPath"),
                 ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module, name):
        if "." not in name:
            if (module, name) in self._GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                              torch.memory_format)):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} in a checkpoint's .metadata")


def safe_reader(path):
    """A ``FileSystemReader`` whose ``.metadata`` is read by ``_MetadataUnpickler`` (no code from the file runs)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            rank = kwargs.get("rank")
            meta_path = self._get_metadata_path(rank)
            with self.fs.create_stream(meta_path, "rb") as f:
                data = f.read()
            try:
                metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            except (pickle.UnpicklingError, AttributeError, ImportError) as e:
                from .common import UnsafeFileError

                raise UnsafeFileError(f"{meta_path}: {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def safe_planner():
    """DCP's ``DefaultLoadPlanner``, but non-tensor items (the optimizer's hyperparameters) are read with
    ``torch.load(weights_only=True)`` instead of full unpickling."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def checkpoints(run) -> list[Path]:
    """The complete DCP checkpoints of ``run``, oldest first (``RUN/dcp/step_XXXXXXXX`` with ``train_state.json``)."""
    root = Path(run) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAIN_STATE).is_file())


# what a resumed run must repeat: the model's shape and the data it is trained on; PowerSGD's rank (its state)
RESUME_FIELDS = ("preset", "n_layers", "n_heads", "head_dim", "text_len", "bpe_vocab", "image_embedding", "data")


def resume_problem(checkpoint, train_config: dict) -> str | None:
    """Why ``checkpoint`` cannot be resumed by a run of ``train_config`` (a ``TrainConfig`` as a dict), or None:
    a file missing (every rank's ``rank<r>.pt``, ``.metadata``, the shards) or a setting that differs."""
    checkpoint = Path(checkpoint)
    try:
        ts = json.loads((checkpoint / TRAIN_STATE).read_text())
        world = math.prod(ts["mesh"])
        saved = ts["train_config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{checkpoint / TRAIN_STATE} is unreadable ({e})"
    missing = [n for n in [".metadata"] + [f"rank{r}.pt" for r in range(world)] if not (checkpoint / n).is_file()]
    if not any(checkpoint.glob("*.distcp")):
        missing.append("*.distcp")
    if missing:
        older = checkpoints(checkpoint.parent.parent)
        older = [c for c in older if c.name < checkpoint.name]
        return (f"{checkpoint} is damaged (missing {', '.join(missing)}); "
                + (f"remove it to resume from {older[-1].name}" if older else "no older checkpoint to resume from"))
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {train_config.get(k)!r}" for k in RESUME_FIELDS
              if saved.get(k) != train_config.get(k)]
    old_r, new_r = saved.get("powersgd_rank", 0), train_config.get("powersgd_rank", 0)
    if old_r and new_r and old_r != new_r:
        differ.append(f"--powersgd-rank {old_r} -> {new_r}")
    if differ:
        return f"{checkpoint} was trained with other settings ({'; '.join(differ)}): repeat the run's flags"
    return None


def save_checkpoint(run, step: int, objective: nn.Module, opt, train_state: dict, rank_state: dict,
                    keep: int = 2) -> Path:
    """Write ``RUN/dcp/step_XXXXXXXX`` (every rank calls it): model and optimizer as DCP shards, ``rank_state``
    (this rank's RNG and PowerSGD state, plain data) as ``rank<r>.pt``, ``train_state`` (rank 0's, JSON) as
    ``train_state.json``. Written into ``.step_XXXXXXXX.tmp`` and renamed by rank 0 after every rank finished,
    so the folder is complete or absent; older checkpoints beyond ``keep`` are removed after the rename."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .common import atomic_save

    rank = dist.get_rank()
    root = Path(run) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a torn earlier attempt
        tmp.mkdir()
    dist.barrier()
    msd, osd = get_state_dict(objective, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(tmp))
    atomic_save(rank_state, tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        from .common import _atomic_write, fsync_dir

        _atomic_write(tmp / TRAIN_STATE, lambda f: f.write(json.dumps(train_state, indent=1).encode()))
        if final.exists():  # a checkpoint of the same step from an earlier run: replaced whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path, objective: nn.Module, opt, mesh_shape: tuple) -> tuple[dict, dict | None]:
    """Load the DCP checkpoint ``path`` into the sharded ``objective`` and ``opt`` (any mesh: DCP reshards).
    Returns ``(train_state, rank_state)``; ``rank_state`` (RNG, PowerSGD) is None when the checkpoint was written
    on another mesh (its per-rank state does not map onto this one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .common import load_checkpoint as load_plain

    path = Path(path)
    train_state = json.loads((path / TRAIN_STATE).read_text())
    msd, osd = get_state_dict(objective, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=safe_reader(path), planner=safe_planner())
    set_state_dict(objective, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    same = tuple(train_state.get("mesh", ())) == tuple(mesh_shape)
    rank_state = load_plain(path / f"rank{dist.get_rank()}.pt") if same else None
    return train_state, rank_state


def read_model(checkpoint):
    """``(DALLE, train_state)``: the model of the DCP checkpoint folder ``checkpoint`` assembled whole on the CPU
    (one process, no process group), and its ``train_state.json``."""
    import torch.distributed.checkpoint as dcp

    from .model import DALLE, DALLEConfig

    checkpoint = Path(checkpoint)
    ts = json.loads((checkpoint / TRAIN_STATE).read_text())
    with torch.device("meta"):
        model = DALLE(DALLEConfig.from_dict(ts["model_config"]))
    model.to_empty(device="cpu")
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=safe_reader(checkpoint), planner=safe_planner(), no_dist=True)
    model.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()})
    return model, ts


def export(run, checkpoint=None, log=print):
    """Write the weights of ``run``'s newest DCP checkpoint (or ``checkpoint``) as ``RUN/model.safetensors`` +
    ``RUN/config.json``, the single-file format ``dalle.generate`` reads, and return that model (``DALLE``, on the
    CPU, eval mode). One process, no process group: the model is assembled whole in this process's memory (about
    4 bytes per parameter).

    Raises ``FileNotFoundError`` when the run has no complete DCP checkpoint."""
    from .train import RUN_META, save_run_model

    run = Path(run)
    if checkpoint is None:
        found = checkpoints(run)
        if not found:
            raise FileNotFoundError(f"no complete sharded checkpoint in {run / CHECKPOINT_DIR} (folders step_XXXXXXXX "
                                    f"with {TRAIN_STATE}); train with python -m dalle.train --fsdp")
        checkpoint = found[-1]
    model, ts = read_model(checkpoint)
    out = save_run_model(run, model, {k: ts[k] for k in RUN_META})
    log(f"exported {checkpoint} (step {ts['step']}) to {out}")
    return model.eval()
