"""Block-sparse DALL-E attention on the CPU from PyTorch's own kernels (``sparse_attention(backend="cpu")``).

``O = softmax(scale * Q K^T + M) V`` with ``M`` = 0 where ``masks.dense_mask`` allows a pair and -inf elsewhere,
computed only on the tiles the kernels visit: the same lookup tables (``masks.block_tables``) list, per query
block, the key blocks it sees and which of those tiles are full. Query blocks with similar numbers of listed key
blocks form a group (``_merge``); per group the listed key blocks are gathered (``index_select``, full tiles
first, padding slots at the end) and PyTorch's fused CPU flash kernel (the one behind
``scaled_dot_product_attention``) runs the group as one batch, with an fp32 online softmax, a cached 0 / -inf
bias built once per layout from the mask predicate ``masks.allowed`` (partial and padding tiles), and the row
log-sum-exp as a second output. The forward saves ``O`` and that log-sum-exp only; the backward (the kernel's
own, recomputing ``P`` from the log-sum-exp as FlashAttention does, Dao et al. 2022, alg. 2) returns dQ per query
block and dK, dV per gathered key block, scatter-added per key block (``index_add_``).

Extra memory is O(N x key blocks per query block): fp32 block copies of the inputs and gathered keys and values
per group, a group split into chunks of query blocks whose scores exceed ``SCORE_BUDGET``; never N x N.
``column`` runs the kernels' transposed layout (SPEC.md): rows are gathered in that order.
Inputs may be float32, float16 or bfloat16 with any strides; the arithmetic is fp32 throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import masks as _masks
from . import _attention_op

# 64 x 64 tiles measured fastest at the paper shape on 2 cores (128 x 128 visits 0.62 / 0.49 / 0.73 of causal's
# tiles instead of 0.50 / 0.43 / 0.63, 32-wide tiles halve the matmul sizes for little saving); sequences of at
# most SINGLE_TILE positions run as one tile (N rounded up to 8), where the per-group overhead would outweigh
# the sparsity.
BLOCK_M = 64
BLOCK_N = 64
SINGLE_TILE = 128
# Score elements (batch * heads * rows * keys) per chunk of a group: bounds the extra memory independently
# of N (fp32: 16 MiB for the scores, the backward holds two such tensors).
SCORE_BUDGET = 1 << 22
GROUP_OVERHEAD = 4.0  # tiles; see _merge


def kernel_rows(mask: str, text_len: int, H: int, W: int):
    """Raster row of each position of the kernels' layout, or None where that layout is raster order.

    The Triton kernels run ``column`` with the image part transposed (``_phys_rows``); the tables describe that
    layout, so the CPU path gathers its rows in the same order.
    """
    return _masks.column_permutation(text_len, (H, W)) if mask == "column" else None


@dataclass
class _Group:
    """Query blocks ``qb`` (g,) computed together, ``width`` key-block slots each: ``kb`` (g * width,) lists each
    one's key blocks, full tiles first (padding slots read block 0); ``bias`` ``(1, g, block_m, width * block_n)``
    is 0 where a pair is allowed and -inf elsewhere (None when every tile is full)."""

    qb: torch.Tensor
    kb: torch.Tensor
    width: int
    bias: torch.Tensor | None


@dataclass
class _Plan:
    n: int
    n_pad: int
    block_m: int
    block_n: int
    rows: torch.Tensor | None  # kernel position -> raster row (None: identity)
    groups: list


_PLANS: dict = {}


def plan(mask: str, text_len: int, H: int, W: int, kernel: int, block_m: int = 0, block_n: int = 0) -> _Plan:
    """The groups of query blocks and partial-tile biases for a layout (cached; built from ``block_tables``)."""
    n = text_len + H * W
    if not (block_m or block_n):
        if n <= SINGLE_TILE:
            block_m = block_n = -(-n // 8) * 8
        else:
            block_m, block_n = BLOCK_M, BLOCK_N
    block_m, block_n = block_m or BLOCK_M, block_n or BLOCK_N
    if max(block_m, block_n) % min(block_m, block_n):
        raise ValueError(f"block_m and block_n must divide one another, got {block_m} and {block_n}")
    key = (mask, text_len, H, W, kernel if mask not in ("row", "column", "causal") else 0, block_m, block_n)
    cached = _PLANS.get(key)
    if cached is not None:
        return cached
    tables = _masks.block_tables(mask, text_len, (H, W), kernel, block_m, block_n)
    # one tile: any layout is a relabeling of it, and raster order spares the permuted copies
    rows = None if n <= min(block_m, block_n) else kernel_rows(mask, text_len, H, W)
    step = max(block_m, block_n)
    n_pad = -(-n // step) * step
    pos = torch.arange(n_pad)
    raster = pos.clamp(max=n - 1) if rows is None else rows[pos.clamp(max=n - 1)]

    def tile_ok(m: int, kb: int) -> torch.Tensor:
        """The predicate on one tile in the kernels' layout; padding keys never, padding queries always (their
        rows are dropped; allowing keys keeps them finite)."""
        i, j = pos[m * block_m:(m + 1) * block_m, None], pos[None, kb * block_n:(kb + 1) * block_n]
        ok = _masks.allowed(mask, raster[i], raster[j], text_len, H, W, kernel) & (j < n)
        return ok | (i >= n)

    blocks = []  # (query block, key blocks full first, predicate of each partial tile)
    for m in range(int(tables.q_lut.shape[0])):
        cnt = int(tables.q_count[m])
        lut, full = tables.q_lut[m, :cnt].tolist(), tables.q_full[m, :cnt].tolist()
        full_kb = [kb for kb, f in zip(lut, full) if f]
        part_kb = [kb for kb, f in zip(lut, full) if not f]
        for kb in full_kb:  # the table and this layout must agree: a full tile is allowed everywhere
            if not bool(tile_ok(m, kb).all()):
                raise RuntimeError(f"block table of mask {mask!r} lists tile ({m}, {kb}) as full but the predicate "
                                   "forbids pairs in it: the CPU path and the kernels disagree on the layout")
        blocks.append((m, full_kb, part_kb))
    groups = []
    for members in _merge(sorted(blocks, key=lambda b: (len(b[1]) + len(b[2]), len(b[1])))):
        width = max(len(f) + len(pt) for _, f, pt in members)
        every, none = torch.ones(block_m, block_n, dtype=torch.bool), torch.zeros(block_m, block_n, dtype=torch.bool)
        kb, ok = [], []
        for m, full_kb, part_kb in members:
            kb += full_kb + part_kb + [0] * (width - len(full_kb) - len(part_kb))
            tiles = [every] * len(full_kb) + [tile_ok(m, b) for b in part_kb]
            ok.append(torch.cat(tiles + [none] * (width - len(tiles)), dim=1))
        ok = torch.stack(ok)[None]
        bias = None if bool(ok.all()) else torch.zeros(ok.shape).masked_fill_(~ok, float("-inf"))
        groups.append(_Group(torch.tensor([m for m, _, _ in members]), torch.tensor(kb), width, bias))
    result = _PLANS[key] = _Plan(n, n_pad, block_m, block_n, rows, groups)
    return result


def _merge(blocks: list) -> list:
    """Split query blocks sorted by list length into runs computed as one padded group each.

    A run costs ``GROUP_OVERHEAD`` tiles (a group's fixed cost: gathers, one fused call, scatters; 4 tried against
    0 at the paper shape) plus its query blocks times its longest list; dynamic programming picks the cheapest
    split. Under row, column and conv this merges the text query blocks (short causal lists) into the image
    group; under causal it keeps a few groups of similar lengths.
    """
    widths = [len(f) + len(p) for _, f, p in blocks]
    best = [0.0] + [math.inf] * len(blocks)
    cut = [0] * (len(blocks) + 1)
    for e in range(1, len(blocks) + 1):
        for s in range(e):
            cost = best[s] + GROUP_OVERHEAD + (e - s) * widths[e - 1]
            if cost < best[e]:
                best[e], cut[e] = cost, s
    runs, e = [], len(blocks)
    while e:
        runs.append(blocks[cut[e]:e])
        e = cut[e]
    return runs[::-1]


def _chunks(p: _Plan, batch_heads: int):
    """``(qb, kb, bias)`` per group, split into runs of query blocks whose scores fit in ``SCORE_BUDGET``."""
    for group in p.groups:
        step = max(1, SCORE_BUDGET // (batch_heads * p.block_m * group.width * p.block_n))
        g = group.qb.numel()
        for s in range(0, g, step):
            e = min(g, s + step)
            yield (group.qb[s:e], group.kb[s * group.width:e * group.width],
                   None if group.bias is None else group.bias[:, s:e])


def _to_blocks(x: torch.Tensor, p: _Plan, block: int) -> torch.Tensor:
    """``(B, heads, N, *rest)`` -> fp32 ``(B * heads, N_pad / block, block, *rest)`` in the kernels' layout, zero
    past N. A view when ``x`` already is that (fp32, contiguous, raster layout, N a multiple of the blocks);
    else one copy does the layout, the padding and the dtype. Never written to."""
    B, h, n = x.shape[:3]
    rest = tuple(x.shape[3:])
    shape = (B * h, p.n_pad // block, block) + rest
    if p.rows is None and n == p.n_pad and x.dtype == torch.float32 and x.is_contiguous():
        return x.view(shape)
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view((B, h, p.n_pad) + rest)
    flat[:, :, :n].copy_(x if p.rows is None else x.index_select(2, p.rows))
    flat[:, :, n:].zero_()
    return out


def _from_blocks(xb: torch.Tensor, p: _Plan, B: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_to_blocks``: ``(B, heads, N, *rest)`` of ``dtype`` in raster order, contiguous."""
    rest = tuple(xb.shape[3:])
    x = xb.view((B, h, p.n_pad) + rest)[:, :, :p.n]
    if p.rows is None:
        return x.to(dtype).contiguous()
    return torch.empty(x.shape, dtype=dtype).index_copy_(2, p.rows, x.to(dtype))


def _gather(xp: torch.Tensor, kb: torch.Tensor, g: int) -> torch.Tensor:
    """The listed blocks ``kb`` (g * c,) of ``xp`` (BH, nb, block, D) as ``(BH, g, c * block, D)``."""
    BH, _, block, D = xp.shape
    return xp.index_select(1, kb).view(BH, g, -1, D)


# The fused CPU kernel behind scaled_dot_product_attention, called per group with its (B, heads, L, D) batch
# being (batch * heads, group's query blocks): it returns the row log-sum-exp and has the matching backward.
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def cpu_forward(q, k, v, mask, text_len, H, W, kernel, scale, block_m=0, block_n=0):
    """``(o, lse)``: the output in q's dtype (contiguous, raster order) and the fp32 row log-sum-exp
    ``(B, heads, N)`` (natural log), over the listed tiles only."""
    B, h, n, D = q.shape
    if B * h == 0:  # nothing to attend: empty outputs, as the reference gives
        return torch.empty(q.shape, dtype=q.dtype), torch.empty(B, h, n, dtype=torch.float32)
    p = plan(mask, text_len, H, W, kernel, block_m, block_n)
    qp = _to_blocks(q, p, p.block_m)
    kp, vp = _to_blocks(k, p, p.block_n), _to_blocks(v, p, p.block_n)
    op = torch.empty_like(qp)
    lsep = torch.empty(qp.shape[:3], dtype=torch.float32)
    for qb, kb, bias in _chunks(p, B * h):
        g = qb.numel()
        o, lse = _flash_fwd(qp.index_select(1, qb), _gather(kp, kb, g), _gather(vp, kb, g), 0.0, False,
                            attn_mask=bias, scale=scale)
        op.index_copy_(1, qb, o)
        lsep.index_copy_(1, qb, lse)
    return _from_blocks(op, p, B, h, q.dtype), _from_blocks(lsep, p, B, h, torch.float32)


def cpu_backward(do, q, k, v, o, lse, mask, text_len, H, W, kernel, scale, block_m=0, block_n=0):
    """``(dq, dk, dv)`` in the inputs' dtypes. Per group the fused kernel recomputes ``P = exp(S - lse)`` from the
    saved row log-sum-exp and returns ``dQ`` and the gathered blocks' ``dK``, ``dV``; those are scatter-added
    per key block (a key block is seen by several query blocks)."""
    B, h, n, D = q.shape
    if B * h == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    p = plan(mask, text_len, H, W, kernel, block_m, block_n)
    qp, dop, op = (_to_blocks(t, p, p.block_m) for t in (q, do, o))
    lsep = _to_blocks(lse, p, p.block_m)
    kp, vp = _to_blocks(k, p, p.block_n), _to_blocks(v, p, p.block_n)
    dqp = torch.empty_like(qp)
    dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
    for qb, kb, bias in _chunks(p, B * h):
        g = qb.numel()
        dq, dk, dv = _flash_bwd(dop.index_select(1, qb), qp.index_select(1, qb), _gather(kp, kb, g),
                                _gather(vp, kb, g), op.index_select(1, qb), lsep.index_select(1, qb), 0.0, False,
                                attn_mask=bias, scale=scale)
        dqp.index_copy_(1, qb, dq)
        dvp.index_add_(1, kb, dv.reshape(dvp.shape[0], -1, p.block_n, D))
        dkp.index_add_(1, kb, dk.reshape(dkp.shape[0], -1, p.block_n, D))
    return (_from_blocks(dqp, p, B, h, q.dtype), _from_blocks(dkp, p, B, h, k.dtype),
            _from_blocks(dvp, p, B, h, v.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Autograd: two custom ops, as for the Triton path (``_attention_op``), so torch.compile(fullgraph=True) traces a
# model without a graph break; only o and the row log-sum-exp are saved.

@torch.library.custom_op("dalle_kernels::sparse_attention_cpu_fwd", mutates_args=(), device_types="cpu")
def _sparse_attention_cpu_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str, text_len: int, H: int,
                              W: int, kernel: int, scale: float, block_m: int, block_n: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_forward(q, k, v, mask, text_len, H, W, kernel, scale, block_m, block_n)


@torch.library.custom_op("dalle_kernels::sparse_attention_cpu_bwd", mutates_args=(), device_types="cpu")
def _sparse_attention_cpu_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              lse: torch.Tensor, mask: str, text_len: int, H: int, W: int, kernel: int, scale: float,
                              block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu_backward(do, q, k, v, o, lse, mask, text_len, H, W, kernel, scale, block_m, block_n)


_attention_op.register(_sparse_attention_cpu_fwd, _sparse_attention_cpu_bwd)


def cpu_attention(q, k, v, mask, text_len, grid, kernel, scale, block_m=0, block_n=0):
    """The CPU path after validation: ``(o, lse)``; differentiable in q, k, v. ``block_m``/``block_n`` > 0
    override the tile shape (default: ``BLOCK_M`` x ``BLOCK_N``, one tile up to ``SINGLE_TILE`` positions)."""
    H, W = grid
    return _sparse_attention_cpu_fwd(q, k, v, mask, text_len, H, W, kernel, scale, block_m, block_n)
