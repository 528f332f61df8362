"""Memory and traffic budget of paper-scale training, computed without allocating (paper sections 2.4-2.5, appendices D-E).

    python -m dalle.train --preset paper --plan --nodes 8 --gpus-per-node 8 --batch 512 --powersgd-rank 32

The model is built on the meta device (shapes only), so the paper's 12B model is planned in seconds on any
machine. The scheme planned is the paper's (Ramesh et al. 2021, appendix D-E): parameters, gradients and Adam
state sharded across the ``G`` GPUs of a machine, gradients reduce-scattered inside the machine, each shard
all-reduced between the ``N`` machines, optionally PowerSGD-compressed.
"""
from __future__ import annotations

import math

import torch

from . import cli
from .model import DALLE, PRESETS, DALLEConfig, powersgd_uncompressed

__all__ = ["plan", "format_plan", "meta_model", "main"]

COMPUTE_BYTES = 2  # 16-bit parameters and activations for compute (paper section 2.4)
MASTER_BYTES = 4  # fp32 master parameters, gradient shards, Adam moments, reductions and PowerSGD's P, Q


def meta_model(cfg: DALLEConfig) -> DALLE:
    """``DALLE(cfg)`` on the meta device: shapes and names, no storage."""
    with torch.device("meta"):
        return DALLE(cfg)


def plan(cfg: DALLEConfig, nodes: int, gpus_per_node: int, batch: int, powersgd_rank: int = 0) -> dict:
    """Per-GPU memory and per-step traffic of sharded data-parallel training of ``DALLE(cfg)``.

    Args:
        cfg: the model's sizes; ``n_params`` is ``sum(p.numel())`` of ``DALLE(cfg)`` built on the meta device.
        nodes: machines ``N``; gpus_per_node: GPUs per machine ``G`` (the shard count); batch: global batch ``B``,
            a multiple of ``N * G`` (local batch ``b = B / (N G)``); powersgd_rank: ``R`` (0: no PowerSGD).

    Returns a dict of ints (bytes unless named ``*_elements``/``n_*``) and floats:

    Memory per GPU, ``P`` parameters, ``d`` width, ``L`` blocks, ``S = T + H W`` positions, ``P_blk`` the
    parameters of one block (``12 d^2 + 13 d``):

    * ``param_bytes = 2 P / G``: the 16-bit compute shard, plus ``gathered_block_bytes = 2 * 2 P_blk``: two
      whole blocks gathered at a time (the one computing, the next prefetched; FSDP's default);
    * ``master_bytes = 4 P / G``: the fp32 master shard; ``grad_bytes = 4 P / G``: fp32 gradient shard;
    * ``adam_bytes = 8 P / G``: Adam's two fp32 moments of the shard;
    * activations with per-block checkpointing: ``checkpoint_bytes = 2 L b S d`` (each block's 16-bit input),
      ``block_recompute_bytes = 2 b S d * 17`` (one block's recomputed tensors: 2 LayerNorm outputs, q, k, v,
      attention output, projection, fc, GELU (4 d each) and MLP output: 1+3+1+1+1+4+4+1+1 = 17 ``d`` per
      position; the attention kernel keeps no ``S x S`` scores), ``logits_bytes = 4 b ((T-1) V_t' + H W V_i)``
      (fp32 logits of the predicted positions: text rows ``V_t' = text_vocab + text_len``, image codes ``V_i``);
    * ``total_bytes``: the sum.

    Traffic sent per GPU per step (ring collectives: a reduce-scatter or all-gather over ``k`` ranks sends
    ``(k-1)/k`` of the full buffer, an all-reduce ``2 (k-1)/k``; Patarasuk and Yuan 2009):

    * inside a machine: ``intra_allgather_bytes = 2 * (G-1)/G * 2 P`` (16-bit parameters gathered in the
      forward and again in the backward, FSDP resharding after the forward), ``intra_reducescatter_bytes =
      (G-1)/G * 4 P`` (fp32 gradient reduce-scatter);
    * between machines, each GPU all-reduces its shard with the same shard on the other machines:
      ``inter_elements`` = the shard's elements, ``inter_bytes = 2 (N-1)/N * 4 * inter_elements``; with PowerSGD
      at rank ``R`` each matrix shard ``n/G x m`` (dim 0 sharded, ``ceil(n/G)`` rows) sends ``(n/G + m) r``
      elements (``r = min(R, n/G, m)``) when ``(n/G + m) r * 2 < n/G * m`` (the hook's rule at
      ``min_compression_rate=2``), else all of it; gains, biases, embeddings and heads are sent whole:
      ``inter_powersgd_elements``, ``inter_powersgd_bytes``, ``powersgd_saving = 1 - powersgd/plain`` elements.
      The paper reports a saving of about 85% at its rank (appendix E).

    Raises:
        ValueError: a count that is not a positive int, ``batch`` not a multiple of ``nodes * gpus_per_node``, a
            negative ``powersgd_rank``.
    """
    if not isinstance(cfg, DALLEConfig):
        raise TypeError(f"cfg must be a DALLEConfig, got {type(cfg).__name__}")
    for name, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(powersgd_rank, bool) or not isinstance(powersgd_rank, int) or powersgd_rank < 0:
        raise ValueError(f"powersgd_rank must be an int >= 0, got {powersgd_rank!r}")
    N, G = nodes, gpus_per_node
    if batch % (N * G):
        raise ValueError(f"batch must be a multiple of nodes * gpus_per_node = {N * G}, got {batch}")
    b = batch // (N * G)
    model = meta_model(cfg)
    params = dict(model.named_parameters())
    P = sum(p.numel() for p in params.values())
    d, L, S = cfg.d_model, cfg.n_layers, cfg.seq_len
    p_blk = sum(p.numel() for p in model.blocks[0].parameters())
    shard = math.ceil(P / G)
    out = {"n_params": P, "n_block_params": p_blk, "nodes": N, "gpus_per_node": G, "batch": batch, "local_batch": b,
           "powersgd_rank": powersgd_rank,
           "param_bytes": COMPUTE_BYTES * shard, "gathered_block_bytes": 2 * COMPUTE_BYTES * p_blk,
           "master_bytes": MASTER_BYTES * shard, "grad_bytes": MASTER_BYTES * shard,
           "adam_bytes": 2 * MASTER_BYTES * shard,
           "checkpoint_bytes": COMPUTE_BYTES * L * b * S * d,
           "block_recompute_bytes": COMPUTE_BYTES * b * S * d * 17,
           "logits_bytes": 4 * b * ((cfg.text_len - 1) * cfg.text_rows + cfg.image_len * cfg.image_vocab)}
    out["activation_bytes"] = out["checkpoint_bytes"] + out["block_recompute_bytes"] + out["logits_bytes"]
    out["total_bytes"] = sum(out[k] for k in ("param_bytes", "gathered_block_bytes", "master_bytes", "grad_bytes",
                                              "adam_bytes", "activation_bytes"))
    out["intra_allgather_bytes"] = round(2 * (G - 1) / G * COMPUTE_BYTES * P)
    out["intra_reducescatter_bytes"] = round((G - 1) / G * MASTER_BYTES * P)
    ring = 2 * (N - 1) / N
    whole = powersgd_uncompressed(model)
    plain = compressed = 0
    for name, p in params.items():
        rows = math.ceil(p.shape[0] / G)  # the largest shard of dim 0
        m = p.numel() // p.shape[0]
        plain += rows * m
        r = min(powersgd_rank, rows, m)
        if powersgd_rank and name not in whole and p.dim() >= 2 and (rows + m) * r * 2 < rows * m:
            compressed += (rows + m) * r
        else:
            compressed += rows * m
    out["inter_elements"] = plain
    out["inter_bytes"] = round(ring * MASTER_BYTES * plain)
    out["inter_powersgd_elements"] = compressed
    out["inter_powersgd_bytes"] = round(ring * MASTER_BYTES * compressed)
    out["powersgd_saving"] = 1 - compressed / plain if powersgd_rank else 0.0
    return out


def _gib(x: int) -> str:
    return f"{x / 2**30:10.2f} GiB"


def format_plan(cfg: DALLEConfig, p: dict) -> str:
    """The readable table ``--plan`` prints."""
    rows = [f"model: {cfg.n_layers} blocks, {cfg.n_heads} heads x {cfg.head_dim} = {cfg.d_model} wide, "
            f"text {cfg.text_len} + image {cfg.grid[0]}x{cfg.grid[1]} tokens, vocab {cfg.text_vocab} BPE + "
            f"{cfg.image_vocab} image codes",
            f"parameters: {p['n_params']:,} ({p['n_params'] / 1e9:.2f}B; {p['n_block_params']:,} per block)",
            f"layout: {p['nodes']} machines x {p['gpus_per_node']} GPUs, global batch {p['batch']} "
            f"({p['local_batch']} per GPU), shards within a machine",
            "",
            "memory per GPU",
            f"  parameters (16-bit shard)        {_gib(p['param_bytes'])}",
            f"  gathered blocks (2, 16-bit)      {_gib(p['gathered_block_bytes'])}",
            f"  master parameters (fp32 shard)   {_gib(p['master_bytes'])}",
            f"  gradients (fp32 shard)           {_gib(p['grad_bytes'])}",
            f"  Adam moments (fp32 shard)        {_gib(p['adam_bytes'])}",
            f"  activations, checkpointed blocks {_gib(p['checkpoint_bytes'])}",
            f"  activations, one block recompute {_gib(p['block_recompute_bytes'])}",
            f"  logits (fp32)                    {_gib(p['logits_bytes'])}",
            f"  total                            {_gib(p['total_bytes'])}",
            "",
            "sent per GPU per step",
            f"  inside the machine: all-gather   {_gib(p['intra_allgather_bytes'])}",
            f"  inside the machine: reduce-scatter {_gib(p['intra_reducescatter_bytes'])[2:]}",
            f"  between machines: all-reduce     {_gib(p['inter_bytes'])}  ({p['inter_elements']:,} elements)"]
    if p["powersgd_rank"]:
        rows.append(f"  ... with PowerSGD rank {p['powersgd_rank']:<3}      {_gib(p['inter_powersgd_bytes'])}  "
                    f"({p['inter_powersgd_elements']:,} elements, {100 * p['powersgd_saving']:.1f}% less; "
                    "the paper reports about 85%)")
    return "\n".join(rows)


def build_parser():
    p = cli.Parser(prog="python -m dalle.train --plan", description="Print the per-GPU memory and per-step "
                   "traffic of sharded training (parameters, gradients and Adam state sharded within a machine, "
                   "PowerSGD between machines) without allocating the model.")
    p.add_argument("--plan", action="store_true", required=True, help="print the budget and exit")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper", help="transformer size")
    p.add_argument("--nodes", type=cli.positive_int, required=True, help="machines")
    p.add_argument("--gpus-per-node", type=cli.positive_int, required=True, help="GPUs per machine (the shards)")
    p.add_argument("--batch", type=cli.positive_int, required=True, help="global batch size")
    p.add_argument("--powersgd-rank", type=cli.int_at_least(0), default=0, help="PowerSGD rank (0: none)")
    p.add_argument("--text-len", type=cli.positive_int, default=256, help="text slots (the paper's: 256)")
    p.add_argument("--bpe-vocab", type=cli.positive_int, default=16384, help="BPE vocabulary (the paper's: 16384)")
    p.add_argument("--image-vocab", type=cli.positive_int, default=8192, help="image codes (the paper's: 8192)")
    p.add_argument("--grid", type=cli.positive_int, default=32, help="image tokens per side (the paper's: 32)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        cfg = DALLEConfig(text_len=a.text_len, text_vocab=a.bpe_vocab, image_vocab=a.image_vocab,
                          grid=(a.grid, a.grid), **PRESETS[a.preset])
    except ValueError as e:
        p.error(str(e))
    if a.batch % (a.nodes * a.gpus_per_node):
        p.error(f"argument --batch: must be a multiple of --nodes x --gpus-per-node = "
                f"{a.nodes * a.gpus_per_node}, got {a.batch}")
    if a.powersgd_rank and a.nodes == 1:
        p.error("argument --powersgd-rank: with one machine nothing is sent between machines, where PowerSGD "
                "works (--nodes 2 or more; dalle.train --fsdp refuses it likewise)")
    print(format_plan(cfg, plan(cfg, a.nodes, a.gpus_per_node, a.batch, a.powersgd_rank)))
    return 0


if __name__ == "__main__":
    main()
