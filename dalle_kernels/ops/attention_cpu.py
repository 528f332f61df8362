"""DALL-E attention on the CPU from PyTorch's own fused kernel, over only the keys a mask allows
(``sparse_attention(backend="cpu")``).

``O = softmax(scale * Q K^T + M) V`` with ``M`` = 0 where ``masks.dense_mask`` allows a pair and -inf elsewhere.
The work is done by PyTorch's fused CPU flash kernel (the one behind ``scaled_dot_product_attention``:
``aten::_scaled_dot_product_flash_attention_for_cpu``, fp32 online softmax, row log-sum-exp as a second output, and
its backward, which recomputes ``P`` from that log-sum-exp as FlashAttention does, Dao et al. 2022, alg. 2). The
forward saves ``O`` and the log-sum-exp only. Two paths call it:

- structured (``structure``; what ``auto`` runs past ``SINGLE_TILE`` positions for every mask but ``conv_torus``):
  the masks' own shape. Text keys are one causal call over all queries (text -> text causal, every image query sees
  every text slot); the image part is one call batched over image rows, each against a band of earlier rows
  (``row``, ``conv``, ``conv_clipped``, ``axial_row``; the keys are an overlapping strided view, a 0 / -inf bias per
  window from the predicate) or per column (``column``, causal over the rows); ``causal`` is one causal call. The
  two calls merge by their log-sum-exps; the backward runs the kernel's backward per call with the merged ``o``
  and log-sum-exp, which gives each call's exact share of the gradients.
- tiles (``plan``; ``conv_torus``, short sequences, or forced): the lookup tables of the Triton kernels
  (``masks.block_tables``). Query blocks with similar numbers of listed key blocks form a group (``_merge``); per
  group the listed key blocks are gathered (``index_select``, full tiles first, padding slots at the end) and the
  kernel runs the group as one batch with a cached 0 / -inf bias for partial and padding tiles; dK, dV are
  scatter-added per key block (``index_add_``).

Extra memory is O(N x keys per query): never N x N (the structured path: the outputs, gradients and the band
windows' gradients; the tiles: fp32 block copies and the gathered keys and values per group, a group split into
chunks whose scores exceed ``SCORE_BUDGET``). ``column`` runs the kernels' transposed layout on the tiles.
Inputs may be float32, float16 or bfloat16 with any strides; the arithmetic is fp32 throughout (fp32 inputs whose
head_dim is contiguous are read in place).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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


PATHS = ("auto", "tiles", "structured")


def pick_structure(mask, text_len, H, W, kernel, block_m=0, block_n=0, path="auto") -> _Structure | None:
    """The structure ``structured_forward`` runs, or None for the tile path: ``path="tiles"`` or tile sizes given;
    ``"structured"`` (an error where the mask has none); ``"auto"``: structured past ``SINGLE_TILE`` positions
    where the mask has one (below, one tile is a single call)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "tiles" or block_m or block_n:
        return None
    st = structure(mask, text_len, H, W, kernel)
    if path == "structured":
        if st is None:
            raise ValueError(f"path='structured': mask {mask!r} has no structured path (path='tiles' or 'auto')")
        return st
    return st if text_len + H * W > SINGLE_TILE else None


def cpu_forward(q, k, v, mask, text_len, H, W, kernel, scale, block_m=0, block_n=0, path="auto"):
    """``(o, lse)``: the output in q's dtype (contiguous, raster order) and the fp32 row log-sum-exp
    ``(B, heads, N)`` (natural log), over the listed tiles only (or the mask's structure: ``pick_structure``)."""
    B, h, n, D = q.shape
    if B * h == 0:  # nothing to attend: empty outputs, as the reference gives
        return torch.empty(q.shape, dtype=q.dtype), torch.empty(B, h, n, dtype=torch.float32)
    st = pick_structure(mask, text_len, H, W, kernel, block_m, block_n, path)
    if st is not None:
        return structured_forward(q, k, v, st, text_len, H, W, scale)
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


def cpu_backward(do, q, k, v, o, lse, mask, text_len, H, W, kernel, scale, block_m=0, block_n=0, path="auto"):
    """``(dq, dk, dv)`` in the inputs' dtypes. Per group the fused kernel recomputes ``P = exp(S - lse)`` from the
    saved row log-sum-exp and returns ``dQ`` and the gathered blocks' ``dK``, ``dV``; those are scatter-added
    per key block (a key block is seen by several query blocks)."""
    B, h, n, D = q.shape
    if B * h == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    st = pick_structure(mask, text_len, H, W, kernel, block_m, block_n, path)
    if st is not None:
        return structured_backward(do, q, k, v, o, lse, st, text_len, H, W, scale)
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
# Structured paths: the masks' own shape instead of generic tiles.
#
# Every mask shares the text rules (text -> text causal, every image query sees every text slot), so the text keys
# are one call of the fused kernel over all N queries, causal with L > S (top-left aligned: query i sees keys
# j <= i, all T of them from i = T on). The image -> image part then has a shape per mask:
# - band: image query row r sees image keys in rows r - rows + 1 .. r only (row: 2 rows, conv: s + 2, conv_clipped:
#   s + 1, axial_row: 1). One call batched over (batch * heads, groups of image rows), each group against its
#   window of rows (an overlapping strided view of the keys, no copy), with a 0 / -inf bias per window built from
#   the predicate.
# - column: per image column, causal over its H rows (the transposed layout as a strided view).
# - causal: the whole thing is one causal call.
# The two calls' outputs merge by their log-sum-exps (o = lerp(o_txt, o_img, sigmoid(lse_img - lse_txt)),
# lse = logaddexp); the backward runs the kernel's backward per call with the merged o and lse, which gives each
# call's exact share of dQ and its keys' dK, dV (P = exp(S - lse) and delta = rowsum(dO * O) are the full row's).

# Image rows per query group of a band's call, forward and backward. Measured at the paper shape (2 threads, ms,
# forward / backward): row (2 rows of keys) 1.6 / 3.9 one row at a time, 2.0 / 4.3 two; conv (7 rows) 3.9 / 10.1
# and 4.0 / 8.0: the backward kernel's fixed cost per (batch, head) outweighs the wider windows for wide bands.
FWD_GROUP_ROWS = 1
BWD_GROUP_ROWS = 2
WIDE_BAND = 4  # bands of at least this many rows take BWD_GROUP_ROWS in the backward


@dataclass
class _Structure:
    """``kind`` "band" | "column" | "causal"; a band's ``rows`` (image rows of keys per query row) and ``window``
    ``(H, W, rows * W)`` bool: query ``(r, c)`` may attend window slot ``jw``, the key at raster
    ``(r - rows + 1) * W + jw`` (False where that is negative)."""

    kind: str
    rows: int = 0
    window: torch.Tensor | None = None
    calls: dict = field(default_factory=dict)

    def call(self, group: int):
        """``(group, span, is_causal, bias)`` of the band's call with queries in groups of ``group`` image rows (1
        where H is not a multiple): each group's window is ``span = rows + group - 1`` rows ending at its last row,
        ``bias`` ``(1, H / group, group * W, span * W)`` is 0 where allowed and -inf elsewhere (None when the window
        is a causal mask on one row: ``is_causal``; or when every pair is allowed)."""
        H, W, _ = self.window.shape
        group = group if H % group == 0 else 1
        if group not in self.calls:
            span = self.rows + group - 1
            ok = torch.zeros(H // group, group, W, span * W, dtype=torch.bool)
            for i in range(group):  # query row g * group + i: its row window starts i rows into the group's
                ok[:, i, :, i * W:(i + self.rows) * W] = self.window[i::group]
            ok = ok.view(1, H // group, group * W, span * W)
            causal = span == 1 and torch.equal(ok, torch.ones(W, W, dtype=torch.bool).tril().expand_as(ok))
            bias = None if causal or bool(ok.all()) else torch.zeros(ok.shape).masked_fill_(~ok, float("-inf"))
            self.calls[group] = (group, span, causal, bias)
        return self.calls[group]


_STRUCTURES: dict = {}
STRUCTURED_MASKS = ("row", "column", "conv", "conv_clipped", "axial_row", "causal")


def structure(mask: str, text_len: int, H: int, W: int, kernel: int) -> _Structure | None:
    """The structured path for a layout, or None where the mask has none (``conv_torus``: its bottom rows see the
    grid's top rows). Built from ``masks.allowed`` and checked against it, one query row at a time: text keys
    causal for every query, no allowed image key outside a band (a band's bias is the predicate itself) or outside
    a column's causal set. Cached per layout."""
    key = (mask, text_len, H, W, kernel if mask not in _masks.KERNEL_FREE_MASKS else 0)
    if key in _STRUCTURES:
        return _STRUCTURES[key]
    T, n, s = text_len, text_len + H * W, kernel // 2
    rows = {"row": 2, "axial_row": 1, "conv": s + 2, "conv_clipped": s + 1, "column": H}.get(mask)
    assert (mask == "causal" or rows is not None) == (mask in STRUCTURED_MASKS)
    if mask == "causal":
        result = _Structure("causal")
    elif rows is None:
        result = None
    else:
        i, jt = torch.arange(n)[:, None], torch.arange(T)[None, :]
        if not torch.equal(_masks.allowed(mask, i, jt, T, H, W, kernel), jt <= i):
            raise RuntimeError(f"mask {mask!r}: text keys are not causal for every query (no structured path)")
        rows = min(rows, H)
        k, c = torch.arange(H * W)[None, :], torch.arange(W)[:, None]
        window = torch.zeros(H, W, rows * W, dtype=torch.bool)
        for r in range(H):
            ok = _masks.allowed(mask, T + r * W + c, T + k, T, H, W, kernel)  # (W, H * W)
            if mask == "column":
                if not torch.equal(ok, (k % W == c) & (k // W <= r)):
                    raise RuntimeError(f"mask 'column' is not causal per image column at image row {r}")
                continue
            lo, hi = (r - rows + 1) * W, (r + 1) * W
            if bool(ok[:, :max(lo, 0)].any() or ok[:, hi:].any()):
                raise RuntimeError(f"mask {mask!r} allows image keys outside its band of {rows} rows at image row {r}")
            window[r, :, max(-lo, 0):] = ok[:, max(lo, 0):hi]
        result = _Structure("column") if mask == "column" else _Structure("band", rows, window)
    _STRUCTURES[key] = result
    return result


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, D)`` -> fp32 ``(B * heads, N, D)`` with a unit head_dim stride (the fused kernel ignores that
    stride): a view when ``x`` allows, else one copy."""
    B, h, n, D = x.shape
    if x.dtype != torch.float32:
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
    elif x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(B * h, n, D)
    except RuntimeError:  # batch and heads not one stride apart: copy
        return x.reshape(B * h, n, D)


def _window(x3: torch.Tensor, T: int, H: int, W: int, back: int, group: int, span: int) -> torch.Tensor:
    """Band windows of keys or values ``(BH, H / group, span * W, D)``: window g holds raster rows
    ``g * group - back .. g * group - back + span - 1``.

    An overlapping strided view of ``x3`` when the ``back`` rows before the image part are there (text keys or
    another head's: finite, and the bias masks them); else a copy behind zero rows."""
    BH, n, D = x3.shape
    size = (BH, H // group, span * W, D)
    if T >= back * W and x3.stride(1) == D:
        return x3.as_strided(size, (x3.stride(0), group * W * D, D, 1), x3.storage_offset() + (T - back * W) * D)
    pad = torch.zeros(BH, (back + H) * W, D)
    pad[:, back * W:] = x3[:, T:]
    return pad.as_strided(size, (pad.stride(0), group * W * D, D, 1))


def _image_part(x3: torch.Tensor, st: _Structure, T: int, H: int, W: int, group: int = 1) -> torch.Tensor:
    """The image rows of ``x3`` ``(BH, N, ...)`` as the image call batches them (views): ``(BH, H / group,
    group * W, ...)`` for a band, ``(BH, W, H, ...)`` for column."""
    if st.kind == "column":
        return x3[:, T:].unflatten(1, (H, W)).transpose(1, 2)
    return x3[:, T:].unflatten(1, (H // group, group * W))


def _image_call(st: _Structure, k3, v3, T, H, W, group):
    """The image call's ``(group, keys, values, is_causal, bias)``."""
    if st.kind == "column":
        return 1, _image_part(k3, st, T, H, W), _image_part(v3, st, T, H, W), True, None
    group, span, causal, bias = st.call(group)
    back = st.rows - 1
    return group, _window(k3, T, H, W, back, group, span), _window(v3, T, H, W, back, group, span), causal, bias


def _result(x3: torch.Tensor, B: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B * heads, N, ...)`` -> contiguous ``(B, heads, N, ...)`` of ``dtype`` (the fused kernel lays its outputs
    out after the query's strides): a view when it already is that."""
    x = x3.reshape((B, h) + tuple(x3.shape[1:]))
    if x.dtype == dtype:  # (.to() returns the tensor itself whatever its strides)
        return x.contiguous()
    return x.to(dtype, memory_format=torch.contiguous_format)


# The calls below give the fused kernel (batch * heads, 1, N, D), so that its outputs are (batch * heads, N, D).

def structured_forward(q, k, v, st: _Structure, text_len, H, W, scale):
    """``(o, lse)`` as ``cpu_forward``, by the mask's structure (``structure``)."""
    B, h, n, D = q.shape
    T = text_len
    q3, k3, v3 = _rows3(q), _rows3(k), _rows3(v)
    if st.kind == "causal":
        o, lse = _flash_fwd(q3[:, None], k3[:, None], v3[:, None], 0.0, True, scale=scale)
        return _result(o[:, 0], B, h, q.dtype), _result(lse[:, 0], B, h, torch.float32)
    group, ki, vi, causal, bias = _image_call(st, k3, v3, T, H, W, FWD_GROUP_ROWS)
    img = lambda x: _image_part(x, st, T, H, W, group)  # noqa: E731
    o_img, lse_img = _flash_fwd(img(q3), ki, vi, 0.0, causal, attn_mask=bias, scale=scale)
    if T == 0:
        o, lse = torch.empty(B * h, n, D), torch.empty(B * h, n)
        img(o).copy_(o_img)
        img(lse).copy_(lse_img)
    else:
        # text keys: causal for text queries, all T of them for image queries
        o, lse = (t[:, 0] for t in _flash_fwd(q3[:, None], k3[:, None, :T], v3[:, None, :T], 0.0, True,
                                                scale=scale))
        o_txt, lse_txt = img(o), img(lse)
        w = torch.sigmoid(lse_img - lse_txt)[..., None]  # the image keys' share of each row's softmax mass
        torch.logaddexp(lse_txt, lse_img, out=lse_txt)
        o_txt.lerp_(o_img, w)
    return _result(o, B, h, q.dtype), _result(lse, B, h, torch.float32)


def structured_backward(do, q, k, v, o, lse, st: _Structure, text_len, H, W, scale):
    """``(dq, dk, dv)`` as ``cpu_backward``, by the mask's structure: the kernel's backward for each call of the
    forward, given the merged ``o`` and ``lse``; the band windows' dK, dV are summed back onto their key rows."""
    B, h, n, D = q.shape
    T = text_len
    q3, k3, v3, do3, o3 = (_rows3(t) for t in (q, k, v, do, o))
    lse3 = lse.reshape(B * h, n)
    if st.kind == "causal":
        grads = _flash_bwd(do3[:, None], q3[:, None], k3[:, None], v3[:, None], o3[:, None], lse3[:, None], 0.0,
                           True, scale=scale)
        return tuple(_result(g[:, 0], B, h, t.dtype) for g, t in zip(grads, (q, k, v)))
    group, ki, vi, causal, bias = _image_call(st, k3, v3, T, H, W, BWD_GROUP_ROWS if st.rows >= WIDE_BAND else 1)
    img = lambda x: _image_part(x, st, T, H, W, group)  # noqa: E731
    dq_img, dk_img, dv_img = _flash_bwd(img(do3), img(q3), ki, vi, img(o3), img(lse3), 0.0, causal,
                                        attn_mask=bias, scale=scale)
    dk, dv = torch.empty(B * h, n, D), torch.empty(B * h, n, D)
    if T == 0:
        dq = torch.empty(B * h, n, D)
        img(dq).copy_(dq_img)
    else:
        dq, dk_txt, dv_txt = (g[:, 0] for g in _flash_bwd(do3[:, None], q3[:, None], k3[:, None, :T],
                                                          v3[:, None, :T], o3[:, None], lse3[:, None], 0.0, True,
                                                          scale=scale))
        img(dq).add_(dq_img)
        dk[:, :T].copy_(dk_txt)
        dv[:, :T].copy_(dv_txt)
    for grad, part in ((dk, dk_img), (dv, dv_img)):
        if st.kind == "column":
            img(grad).copy_(part)
            continue
        rows = img(grad).unflatten(2, (group, W))  # (BH, G, group, W, D), G = H / group
        part = part.unflatten(2, (st.rows + group - 1, W))  # slot a of window g: key row g * group + a - back
        back, G = st.rows - 1, H // group
        for i in range(group):  # the slots in the group's own rows: every key row once
            rows[:, :, i].copy_(part[:, :, back + i])
        for a in range(back):  # earlier rows: -m groups back, row i in that group
            m, i = divmod(back - a, group)
            m, i = (m, 0) if i == 0 else (m + 1, group - i)
            if m < G:
                rows[:, :G - m, i].add_(part[:, m:, a])
    return tuple(_result(g, B, h, t.dtype) for g, t in zip((dq, dk, dv), (q, k, v)))


# ----------------------------------------------------------------------------------------------------------------
# Autograd: two custom ops, as for the Triton path (``_attention_op``), so torch.compile(fullgraph=True) traces a
# model without a graph break; only o and the row log-sum-exp are saved.

@torch.library.custom_op("dalle_kernels::sparse_attention_cpu_fwd", mutates_args=(), device_types="cpu")
def _sparse_attention_cpu_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str, text_len: int, H: int,
                              W: int, kernel: int, scale: float, block_m: int, block_n: int, path: str
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_op.guarded_forward(
        lambda q, k, v: cpu_forward(q, k, v, mask, text_len, H, W, kernel, scale, block_m, block_n, path), q, k, v)


@torch.library.custom_op("dalle_kernels::sparse_attention_cpu_bwd", mutates_args=(), device_types="cpu")
def _sparse_attention_cpu_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              lse: torch.Tensor, mask: str, text_len: int, H: int, W: int, kernel: int, scale: float,
                              block_m: int, block_n: int, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (mask, text_len, H, W, kernel, scale, block_m, block_n, path)
    return _attention_op.guarded_backward(lambda q, k, v: cpu_forward(q, k, v, *args),
                                          lambda *t: cpu_backward(*t, *args), do, q, k, v, o, lse)


_attention_op.register(_sparse_attention_cpu_fwd, _sparse_attention_cpu_bwd)


def cpu_attention(q, k, v, mask, text_len, grid, kernel, scale, block_m=0, block_n=0, path="auto"):
    """The CPU path after validation: ``(o, lse)``; differentiable in q, k, v. ``path``: ``"auto"``, ``"tiles"``
    or ``"structured"`` (``pick_structure``); ``block_m``/``block_n`` > 0 force tiles of that shape (default:
    ``BLOCK_M`` x ``BLOCK_N``, one tile up to ``SINGLE_TILE`` positions)."""
    H, W = grid
    # errors here, not inside the op; by name only: computing the structure here would be data-dependent work
    # under torch.compile
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "structured" and not (block_m or block_n) and mask not in STRUCTURED_MASKS:
        raise ValueError(f"path='structured': mask {mask!r} has no structured path (path='tiles' or 'auto')")
    return _sparse_attention_cpu_fwd(q, k, v, mask, text_len, H, W, kernel, scale, block_m, block_n, path)
