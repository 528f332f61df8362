"""Memory and traffic budget of paper-scale training, computed without allocating (paper sections 2.4-2.5, appendices D-E).

    python -m dalle.train --plan --preset paper --nodes 128 --gpus-per-node 8 --batch 1024 --powersgd-rank 896 \\
        --gpu-memory 16 [--json]

The model is built on the meta device (shapes only), so the paper's 12B model is planned in seconds on any
machine. The scheme planned is the paper's (appendices D-E): parameters, gradients and Adam state sharded across
the ``G`` GPUs of a machine, gradients reduce-scattered inside the machine, each shard all-reduced between the
``N`` machines, optionally PowerSGD-compressed. With ``--gpu-memory`` it says whether that fits, and if not, the
cheapest change that does (README "Training at scale").
"""
from __future__ import annotations

import json
import math

import torch

from . import cli
from .model import DALLE, PRESETS, DALLEConfig, powersgd_uncompressed

__all__ = ["plan", "format_plan", "meta_model", "verdict", "plan_json", "resolve_param_dtype", "main"]

COMPUTE_BYTES = 2  # 16-bit parameters gathered for compute and 16-bit activations (paper section 2.4)
FP32 = 4
LOW = 2  # bf16 / fp16 storage, and the paper's 16-bit PowerSGD factors (appendix E)
PARAM_DTYPES = ("fp32", "bf16", "fp16")
POWERSGD_LAYOUTS = ("paper", "matrix", "shards")
PAPER_PRESETS = ("paper", "paper-2.8b", "paper-5.6b")
# Parts of the memory per GPU, in the order printed: key of plan() -> name in --json's bytes_per_gpu_parts
PARTS = {"param_bytes": "parameters", "grad_bytes": "gradients", "adam_bytes": "adam_moments",
         "gathered_block_bytes": "gathered_blocks", "powersgd_bytes": "powersgd_state",
         "checkpoint_bytes": "activations_checkpointed", "block_recompute_bytes": "activations_blocks",
         "logits_bytes": "logits"}


def meta_model(cfg: DALLEConfig) -> DALLE:
    """``DALLE(cfg)`` on the meta device: shapes and names, no storage."""
    with torch.device("meta"):
        return DALLE(cfg)


def resolve_param_dtype(param_dtype: str, preset: str) -> str:
    """``--param-dtype auto``: ``bf16`` (16-bit storage, as the paper, section 2.4) for the paper's model sizes,
    ``fp32`` for the small presets; any other value as is."""
    if param_dtype == "auto":
        return "bf16" if preset in PAPER_PRESETS else "fp32"
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of auto, {', '.join(PARAM_DTYPES)}, got {param_dtype!r}")
    return param_dtype


def plan(cfg: DALLEConfig, nodes: int, gpus_per_node: int, batch: int, powersgd_rank: int = 0,
         param_dtype: str = "fp32", checkpoint_activations: bool = True, powersgd_layout: str = "paper") -> dict:
    """Per-GPU memory and per-step traffic of sharded data-parallel training of ``DALLE(cfg)``.

    Args:
        cfg: the model's sizes; ``n_params`` is ``sum(p.numel())`` of ``DALLE(cfg)`` built on the meta device.
        nodes: machines ``N``; gpus_per_node: GPUs per machine ``G`` (the shard count); batch: global batch ``B``,
            a multiple of ``N * G`` (local batch ``b = B / (N G)``); powersgd_rank: ``R`` (0: no PowerSGD).
        param_dtype: storage of the blocks' parameters (``DALLE.storage_16bit_names``) and so of their gradients
            and Adam moments: ``fp32`` (4 bytes) or ``bf16``/``fp16`` (2 bytes, paper section 2.4; updated by
            stochastic rounding, ``dalle.optim``); everything else is float32. No float32 master copy either way.
        checkpoint_activations: recompute each block in the backward (paper section 2.4) or keep every block's
            activations.
        powersgd_layout: ``paper``: each compressed gradient matrix ``n x m`` is factored whole across the ``G``
            shards of a machine (appendix E as we read it; README "Training at scale"): each GPU sends its
            ``n/G x R`` rows of ``P`` and a ``1/G`` share of ``Q`` (``m x R``), so ``(n + m) R / G`` elements, in
            16 bits; the error feedback lives in the gradient buffer (no extra memory). ``matrix``: what
            ``dalle.train --fsdp --powersgd-layout matrix`` does (``fsdp_matrix_hook``): the same traffic, but
            FSDP2 keeps its own gradient shard, so the error feedback is a buffer of its own (16 bits, the shard
            ``ceil(n/G) x m``), and each GPU keeps a ``1/G`` share of the warm-start ``Q`` (16 bits).
            ``shards``: ``dalle.train --powersgd-layout shards``: each GPU compresses its own shard
            ``ceil(n/G) x m`` at rank ``min(R, n/G, m)`` (``(n/G + m) r`` elements, float32), keeping a float32
            error buffer of the shard and the warm-start ``Q`` (``m x r``, float32).

    Returns a dict of ints (bytes unless named ``*_elements``/``n_*``), floats and the settings. Memory per GPU
    (shards of ``ceil(rows / G)`` rows, FSDP2's ``Shard(0)``; ``s`` = 2 or 4 bytes per stored element):

    * ``param_bytes``: the stored shards (``s`` bytes per element); ``grad_bytes``: the gradient shards, same
      dtypes (FSDP2 keeps a sharded gradient in its parameter's dtype); ``adam_bytes``: two moments, same dtypes;
    * ``gathered_block_bytes = 2 * 2 * P_blk``: two whole blocks gathered in 16 bits (computing, prefetched);
    * ``powersgd_bytes``: the PowerSGD state (layout above; 0 without PowerSGD);
    * ``checkpoint_bytes = 2 L b S d`` (each block's 16-bit input) and ``block_recompute_bytes = 2 b S d * 17``
      (one block's tensors: 2 LayerNorm outputs, q, k, v, attention output, projection, fc and GELU (4 d each),
      MLP output: 17 ``d`` per position); without checkpointing ``checkpoint_bytes = 0`` and
      ``block_recompute_bytes`` counts all ``L`` blocks; ``logits_bytes = 4 b ((T-1) V_t' + H W V_i)``;
    * ``total_bytes``: the sum of those parts.

    Traffic sent per GPU per step (ring collectives: a reduce-scatter or all-gather over ``k`` ranks sends
    ``(k-1)/k`` of the whole buffer, an all-reduce ``2 (k-1)/k``; Patarasuk and Yuan 2009):

    * ``intra_allgather_bytes``: the blocks' parameters in 16 bits, the rest in float32, gathered in the forward
      and again in the backward; ``intra_reducescatter_bytes``: float32 gradients; ``intra_powersgd_bytes``
      (``paper`` layout): the ``P`` of each matrix gathered for its orthogonalization, the partial ``Q``
      reduce-scattered and ``Q`` gathered, 16 bits; ``inside_bytes``: their sum;
    * between machines: ``inter_bytes``: the float32 all-reduce of the shard (``inter_elements``);
      ``inter_powersgd_bytes``: with PowerSGD (gains, biases, embeddings and heads whole in float32; a matrix
      is compressed when ``(n + m) r * 2 < n m``, the hook's ``min_compression_rate=2``);
      ``powersgd_saving = 1 - inter_powersgd_bytes / inter_bytes``; ``powersgd_saving_matrices``: the same
      over the compressed matrices only (the figure of the paper's table, section 2.5).

    Raises:
        ValueError: a count that is not a positive int, ``batch`` not a multiple of ``nodes * gpus_per_node``, a
            negative ``powersgd_rank``, an unknown ``param_dtype`` or ``powersgd_layout``.
    """
    if not isinstance(cfg, DALLEConfig):
        raise TypeError(f"cfg must be a DALLEConfig, got {type(cfg).__name__}")
    for name, v in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(powersgd_rank, bool) or not isinstance(powersgd_rank, int) or powersgd_rank < 0:
        raise ValueError(f"powersgd_rank must be an int >= 0, got {powersgd_rank!r}")
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {param_dtype!r}")
    if powersgd_layout not in POWERSGD_LAYOUTS:
        raise ValueError(f"powersgd_layout must be one of {', '.join(POWERSGD_LAYOUTS)}, got {powersgd_layout!r}")
    N, G, R = nodes, gpus_per_node, powersgd_rank
    if batch % (N * G):
        raise ValueError(f"batch must be a multiple of nodes * gpus_per_node = {N * G}, got {batch}")
    b = batch // (N * G)
    model = meta_model(cfg)
    params = dict(model.named_parameters())
    P = sum(p.numel() for p in params.values())
    d, L, S = cfg.d_model, cfg.n_layers, cfg.seq_len
    p_blk = sum(p.numel() for p in model.blocks[0].parameters())
    low = set(model.storage_16bit_names()) if param_dtype != "fp32" else set()
    block_names = {f"blocks.{i}.{n}" for i, blk in enumerate(model.blocks) for n, _ in blk.named_parameters()}
    whole = powersgd_uncompressed(model)
    ring, part = 2 * (N - 1) / N, (G - 1) / G
    stored = shard_el = gather = 0
    inter_pw = intra_pw = pw_state = mat_plain = mat_sent = 0.0
    for name, p in params.items():
        n, m = p.shape[0], p.numel() // p.shape[0]
        rows = math.ceil(n / G)  # the largest shard of dim 0
        s = LOW if name in low else FP32
        stored += s * rows * m
        shard_el += rows * m
        gather += (COMPUTE_BYTES if name in block_names and not name.endswith(("ln1.weight", "ln1.bias",
                                                                                 "ln2.weight", "ln2.bias"))
                   else FP32) * n * m
        compress = False
        if R and name not in whole and p.dim() >= 2:
            if powersgd_layout in ("paper", "matrix"):
                r = min(R, n, m)
                compress = (n + m) * r * 2 < n * m
                if compress:
                    sent = LOW * (n + m) * r / G
                    if powersgd_layout == "paper":
                        pw_state += sent  # P rows of the shard and a 1/G share of Q, 16-bit
                    else:
                        pw_state += LOW * (rows * m + math.ceil(m * r / G))  # error buffer, 1/G of Q
                    intra_pw += part * LOW * (n * r + 2 * m * r)
            else:
                r = min(R, rows, m)
                compress = (rows + m) * r * 2 < rows * m
                if compress:
                    sent = FP32 * (rows + m) * r
                    pw_state += FP32 * (rows * m + m * r)  # the error buffer and the warm-start Q
        if compress:
            inter_pw += sent
            mat_plain += FP32 * rows * m
            mat_sent += sent
        else:
            inter_pw += FP32 * rows * m
    acts = COMPUTE_BYTES * b * S * d * 17
    out = {"n_params": P, "n_block_params": p_blk, "n_16bit_params": sum(params[n].numel() for n in low),
           "nodes": N, "gpus_per_node": G, "batch": batch, "local_batch": b, "powersgd_rank": R,
           "param_dtype": param_dtype, "checkpoint_activations": checkpoint_activations,
           "powersgd_layout": powersgd_layout,
           "param_bytes": stored, "grad_bytes": stored, "adam_bytes": 2 * stored,
           "gathered_block_bytes": 2 * COMPUTE_BYTES * p_blk, "powersgd_bytes": round(pw_state),
           "checkpoint_bytes": COMPUTE_BYTES * L * b * S * d if checkpoint_activations else 0,
           "block_recompute_bytes": acts if checkpoint_activations else acts * L,
           "logits_bytes": 4 * b * ((cfg.text_len - 1) * cfg.text_rows + cfg.image_len * cfg.image_vocab)}
    out["activation_bytes"] = out["checkpoint_bytes"] + out["block_recompute_bytes"] + out["logits_bytes"]
    out["total_bytes"] = sum(out[k] for k in PARTS)
    out["intra_allgather_bytes"] = round(2 * part * gather)
    out["intra_reducescatter_bytes"] = round(part * FP32 * P)
    out["intra_powersgd_bytes"] = round(intra_pw)
    out["inside_bytes"] = (out["intra_allgather_bytes"] + out["intra_reducescatter_bytes"]
                           + out["intra_powersgd_bytes"])
    out["inter_elements"] = shard_el
    out["inter_bytes"] = round(ring * FP32 * shard_el)
    out["inter_powersgd_bytes"] = round(ring * inter_pw) if R else out["inter_bytes"]
    out["powersgd_saving"] = 1 - inter_pw / (FP32 * shard_el) if R else 0.0
    out["powersgd_saving_matrices"] = 1 - mat_sent / mat_plain if mat_plain else 0.0
    return out


def verdict(cfg: DALLEConfig, p: dict, gpu_memory_gib: float) -> tuple[bool, str, dict | None]:
    """``(fits, line, change)``: whether plan ``p`` (of ``plan(cfg, ...)``) fits GPUs of ``gpu_memory_gib`` GiB,
    a one-line verdict, and when it does not, the cheapest change that fits as ``{plan argument: value}`` (None
    when none of them fits). Changes are tried in order of what they cost: 16-bit storage (``--param-dtype bf16``,
    no extra compute; the paper's choice), activation checkpointing (about a third more compute), both, then
    more shards (``--gpus-per-node`` doubled up to 64: more GPUs in a shard group, ``--nodes`` halved where it is
    even, so the same GPUs) with both."""
    cap = gpu_memory_gib * 2**30
    need = p["total_bytes"]
    args = dict(nodes=p["nodes"], gpus_per_node=p["gpus_per_node"], batch=p["batch"], powersgd_rank=p["powersgd_rank"],
                param_dtype=p["param_dtype"], checkpoint_activations=p["checkpoint_activations"],
                powersgd_layout=p["powersgd_layout"])
    if need <= cap:
        return True, (f"fits: {need / 2**30:.2f} GiB per GPU of {gpu_memory_gib:g} GiB "
                      f"({(cap - need) / 2**30:.2f} GiB to spare)"), None
    tries = []
    if args["param_dtype"] == "fp32":
        tries.append({"param_dtype": "bf16"})
    if not args["checkpoint_activations"]:
        tries.append({"checkpoint_activations": True})
        if args["param_dtype"] == "fp32":
            tries.append({"param_dtype": "bf16", "checkpoint_activations": True})
    g, n = args["gpus_per_node"] * 2, args["nodes"]
    while g <= 64:  # more shards: the same GPUs in fewer, bigger shard groups where the machines halve evenly
        n = n // 2 if n % 2 == 0 and n > 1 else n
        tries.append({"gpus_per_node": g, "nodes": n, "param_dtype": "bf16" if args["param_dtype"] == "fp32" else
                      args["param_dtype"], "checkpoint_activations": True})
        g *= 2
    head = (f"does not fit: {need / 2**30:.2f} GiB per GPU of {gpu_memory_gib:g} GiB "
            f"({(need - cap) / 2**30:.2f} GiB over)")
    for change in tries:
        new = {**args, **change}
        if new["batch"] % (new["nodes"] * new["gpus_per_node"]):
            continue
        q = plan(cfg, **new)
        if q["total_bytes"] <= cap:
            flags = []
            if change.get("param_dtype", args["param_dtype"]) != args["param_dtype"]:
                flags.append(f"--param-dtype {change['param_dtype']}")
            if change.get("checkpoint_activations") and not args["checkpoint_activations"]:
                flags.append("--checkpoint-activations")
            if change.get("gpus_per_node", args["gpus_per_node"]) != args["gpus_per_node"]:
                flags.append(f"--gpus-per-node {change['gpus_per_node']}")
            if change.get("nodes", args["nodes"]) != args["nodes"]:
                flags.append(f"--nodes {change['nodes']}")
            return False, (f"{head}; cheapest change that fits: {' '.join(flags)} "
                           f"({q['total_bytes'] / 2**30:.2f} GiB)"), change
    return False, f"{head}; no change tried fits (16-bit storage, activation checkpointing, up to 64 shards)", None


def plan_json(cfg: DALLEConfig, p: dict, gpu_memory_gib: float | None) -> dict:
    """The figures of ``--plan --json``: ``params``, ``bytes_per_gpu`` (total), ``bytes_per_gpu_parts`` (part ->
    bytes, summing to the total), ``fits`` (bool; None without ``gpu_memory_gib``), ``gpu_memory_bytes``,
    ``between_machines_bytes`` and ``between_machines_bytes_powersgd`` (sent per GPU per step),
    ``inside_machine_bytes``, ``powersgd_saving``, ``powersgd_saving_matrices``, ``verdict`` (the line) and
    ``plan`` (every figure of ``plan``)."""
    fits, line = (None, None) if gpu_memory_gib is None else verdict(cfg, p, gpu_memory_gib)[:2]
    return {"params": p["n_params"], "bytes_per_gpu": p["total_bytes"],
            "bytes_per_gpu_parts": {name: p[k] for k, name in PARTS.items()}, "fits": fits,
            "gpu_memory_bytes": None if gpu_memory_gib is None else round(gpu_memory_gib * 2**30),
            "between_machines_bytes": p["inter_bytes"], "between_machines_bytes_powersgd": p["inter_powersgd_bytes"],
            "inside_machine_bytes": p["inside_bytes"], "powersgd_saving": p["powersgd_saving"],
            "powersgd_saving_matrices": p["powersgd_saving_matrices"], "verdict": line, "plan": p}


def _gib(x: int) -> str:
    return f"{x / 2**30:10.2f} GiB"


def format_plan(cfg: DALLEConfig, p: dict, gpu_memory_gib: float | None = None) -> str:
    """The readable table ``--plan`` prints (and the verdict line with ``gpu_memory_gib``)."""
    where = f"{p['param_dtype']} blocks" if p["param_dtype"] != "fp32" else "fp32"
    rows = [f"model: {cfg.n_layers} blocks, {cfg.n_heads} heads x {cfg.head_dim} = {cfg.d_model} wide, "
            f"text {cfg.text_len} + image {cfg.grid[0]}x{cfg.grid[1]} tokens, vocab {cfg.text_vocab} BPE + "
            f"{cfg.image_vocab} image codes",
            f"parameters: {p['n_params']:,} ({p['n_params'] / 1e9:.2f}B; {p['n_block_params']:,} per block; "
            f"{p['n_16bit_params']:,} stored in 16 bits)",
            f"layout: {p['nodes']} machines x {p['gpus_per_node']} GPUs, global batch {p['batch']} "
            f"({p['local_batch']} per GPU), shards within a machine",
            "",
            "memory per GPU",
            f"{'  parameters (' + where + ')':<35}{_gib(p['param_bytes'])}",
            f"  gradients (same dtypes)          {_gib(p['grad_bytes'])}",
            f"  Adam moments (same dtypes)       {_gib(p['adam_bytes'])}",
            f"  gathered blocks (2, 16-bit)      {_gib(p['gathered_block_bytes'])}"]
    if p["powersgd_rank"]:
        rows.append(f"{'  PowerSGD state (' + p['powersgd_layout'] + ' layout)':<35}{_gib(p['powersgd_bytes'])}")
    if p["checkpoint_activations"]:
        rows += [f"  activations, checkpointed blocks {_gib(p['checkpoint_bytes'])}",
                 f"  activations, one block recompute {_gib(p['block_recompute_bytes'])}"]
    else:
        rows.append(f"  activations, all blocks          {_gib(p['block_recompute_bytes'])}")
    rows += [f"  logits (fp32)                    {_gib(p['logits_bytes'])}",
             f"  total                            {_gib(p['total_bytes'])}",
             "",
             "sent per GPU per step",
             f"  inside the machine: all-gather   {_gib(p['intra_allgather_bytes'])}",
             f"  inside the machine: reduce-scatter {_gib(p['intra_reducescatter_bytes'])[2:]}"]
    if p["intra_powersgd_bytes"]:
        rows.append(f"  inside the machine: PowerSGD     {_gib(p['intra_powersgd_bytes'])}")
    rows.append(f"  between machines: all-reduce     {_gib(p['inter_bytes'])}  "
                f"({p['inter_elements']:,} elements, fp32)")
    if p["powersgd_rank"]:
        how = ("each shard, fp32 factors" if p["powersgd_layout"] == "shards" else "whole matrices, 16-bit factors")
        rows.append(f"  ... with PowerSGD rank {p['powersgd_rank']:<4}     {_gib(p['inter_powersgd_bytes'])}  "
                    f"({100 * p['powersgd_saving']:.1f}% less; {100 * p['powersgd_saving_matrices']:.1f}% less on "
                    f"the compressed matrices, {how}; the paper reports about 85%)")
    if gpu_memory_gib is not None:
        rows += ["", verdict(cfg, p, gpu_memory_gib)[1]]
    return "\n".join(rows)


def build_parser():
    p = cli.Parser(prog="python -m dalle.train --plan", description="Print the per-GPU memory and per-step "
                   "traffic of sharded training (parameters, gradients and Adam state sharded within a machine, "
                   "PowerSGD between machines) without allocating the model.")
    p.add_argument("--plan", action="store_true", required=True, help="print the budget and exit")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper", help="transformer size (paper: 12B; "
                   "paper-2.8b and paper-5.6b: the other two models of the paper's PowerSGD table)")
    p.add_argument("--nodes", type=cli.positive_int, required=True, help="machines")
    p.add_argument("--gpus-per-node", type=cli.positive_int, required=True, help="GPUs per machine (the shards)")
    p.add_argument("--batch", type=cli.positive_int, required=True, help="global batch size")
    p.add_argument("--powersgd-rank", type=cli.int_at_least(0), default=0, help="PowerSGD rank (0: none)")
    p.add_argument("--powersgd-layout", choices=POWERSGD_LAYOUTS, default="paper",
                   help="paper: whole matrices factored across a machine's shards, 16-bit factors, error feedback "
                        "in the gradient buffer (the paper's); matrix: the same as dalle.train --powersgd-layout "
                        "matrix does it, with a 16-bit error buffer beside FSDP's gradient; shards: dalle.train "
                        "--powersgd-layout shards (each shard alone, fp32)")
    p.add_argument("--param-dtype", choices=("auto",) + PARAM_DTYPES, default="auto",
                   help="storage of the blocks' parameters, gradients and Adam moments (auto: bf16 for the paper "
                        "presets, as the paper's 16-bit storage; fp32 otherwise)")
    p.add_argument("--checkpoint-activations", action=cli.argparse.BooleanOptionalAction, default=True,
                   help="recompute each block in the backward (the paper's; default on)")
    p.add_argument("--gpu-memory", type=cli.positive_float, default=None, metavar="GIB",
                   help="memory of one GPU in GiB: adds a verdict (fits or not, by how much, the cheapest change "
                        "that fits)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object (dalle.plan.plan_json)")
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
    res = plan(cfg, a.nodes, a.gpus_per_node, a.batch, a.powersgd_rank,
               param_dtype=resolve_param_dtype(a.param_dtype, a.preset),
               checkpoint_activations=a.checkpoint_activations, powersgd_layout=a.powersgd_layout)
    if a.json:
        print(json.dumps(plan_json(cfg, res, a.gpu_memory)))
    else:
        print(format_plan(cfg, res, a.gpu_memory))
    return 0


if __name__ == "__main__":
    main()
