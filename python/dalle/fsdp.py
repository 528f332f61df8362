"""Sharded training as the paper trained 12B parameters (appendix D-E), on PyTorch's own engine.

    torchrun --nproc_per_node 8 -m dalle.train --run-dir runs/big --fsdp --shard-size 8 ...          # one machine
    torchrun --nnodes 4 --nproc_per_node 8 ... -m dalle.train --run-dir runs/big --fsdp --shard-size 8 \\
        --powersgd-rank 32 ...                                                                       # four machines

* A 2-D ``DeviceMesh`` (``replicate`` x ``shard``; ``shard`` = the GPUs of one machine). Parameters, gradients
  and AdamW state are sharded over ``shard`` by FSDP2 ``fully_shard``: one unit per residual block (with its two
  LayerNorms as units of their own, so their gains stay 32-bit) and the root (embeddings, final norm, heads).
  ``MixedPrecisionPolicy``: a block's matrices and biases are all-gathered and computed in the 16-bit compute
  dtype (``--precision bf16|fp16``), gains, embeddings and heads in float32, gradients reduced in float32
  (paper section 2.4). Sharded parameters, and so AdamW's moments, are float32, or with ``--param-dtype bf16|fp16``
  the blocks' matrices and biases are stored in 16 bits with their gradients and moments (paper section 2.4;
  updated by ``dalle.optim.AdamW16`` with stochastic rounding), the LayerNorms, embeddings and heads float32.
* The model is built on the meta device; each rank materializes only its shards, each parameter's values drawn
  from a generator seeded by (seed, parameter name) (``DALLE.initial_value``), the same values a single process
  makes: the full model is never allocated anywhere, one parameter at a time at most.
* Between replicas: without PowerSGD, FSDP2's own HSDP all-reduce. With ``--powersgd-rank``, the units are
  sharded over the ``shard`` dimension only and every unit's reduce-scatter output goes through
  ``dalle_kernels.powersgd.fsdp_all_reduce_hook`` (``FSDPModule.set_all_reduce_hook``): PowerSGD over the
  replicas of each parameter's gradient shard, with error feedback and warm start per shard.
* Checkpoints are the trainers' one format (``dalle.checkpoint``): DCP reshards on load, so a sharded run
  resumes on another mesh or in one process and the other way round; ``python -m dalle.export --run RUN``
  writes the weights as ``model.safetensors`` + ``config.json`` (what ``dalle.generate`` reads).
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
                seed: int, hooks: bool, storage_dtype: torch.dtype = torch.float32) -> list:
    """Shard ``objective`` (an ``Objective`` around a ``DALLE`` built on the meta device) with ``fully_shard`` and
    materialize this rank's shards on ``device``, initialized as ``DALLE(cfg, init_seed=seed)`` would be.

    ``hooks``: shard over ``mesh["shard"]`` only (the replicas then reduce through an all-reduce hook, PowerSGD);
    otherwise over the whole 2-D mesh (FSDP2's HSDP: reduce-scatter in a replica, all-reduce across replicas).
    ``compute_dtype``: the blocks' 16-bit compute dtype, or None for float32. ``storage_dtype``: the dtype of the
    blocks' sharded parameters (``DALLE.storage_16bit_names``: matrices and biases, not the LayerNorms), so of
    their gradients and (``dalle.optim.AdamW16``) Adam moments: float32, or bfloat16/float16 for the paper's
    16-bit storage (section 2.4); gradients are reduced in float32 and stored in it. Returns the units as
    ``(module, is_root)`` in the order their gradients are reduced in backward (blocks top-down, root last).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = objective.model
    shard_mesh = mesh["shard"] if hooks else mesh
    fp32 = MixedPrecisionPolicy()
    if storage_dtype != torch.float32:  # gathered in the compute dtype (float32 where that is float32)
        low = MixedPrecisionPolicy(param_dtype=compute_dtype or torch.float32, reduce_dtype=torch.float32)
        for name in model.storage_16bit_names():
            p = model.get_parameter(name)
            p.data = p.data.to(storage_dtype)
    else:
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


def register_powersgd(state, objective: nn.Module, units: list, mesh, layout: str = "shards",
                      factor_dtype: torch.dtype = torch.bfloat16) -> None:
    """PowerSGD between replicas on every unit's reduce-scatter output. ``layout``: ``"shards"``: each rank
    compresses its own shards (``fsdp_all_reduce_hook``, float32 factors); ``"matrix"``: each matrix is factored
    whole across the machine's shards, factors, their all-reduce and the error feedback in ``factor_dtype``
    (``fsdp_matrix_hook``; paper appendix E). ``ValueError`` for another layout."""
    from dalle_kernels.powersgd import fsdp_all_reduce_hook, fsdp_matrix_hook

    if layout not in ("shards", "matrix"):
        raise ValueError(f"layout must be 'shards' or 'matrix', got {layout!r}")
    shards = mesh["shard"].size()
    group = mesh["replicate"].get_group()
    for unit, is_root in units:
        names = unit_parameter_names(objective, unit, units)
        _check_layout(objective, unit, names)
        full = [tuple(objective.get_parameter(n).shape) for n in names]
        if layout == "matrix":
            hook = fsdp_matrix_hook(state, names, full, mesh["shard"].get_group(), group, is_last=is_root,
                                    factor_dtype=factor_dtype)
        else:
            shapes = [(shard_rows(s[0], shards),) + tuple(s[1:]) for s in full]
            hook = fsdp_all_reduce_hook(state, names, shapes, group, is_last=is_root)
        unit.set_all_reduce_hook(hook)


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
