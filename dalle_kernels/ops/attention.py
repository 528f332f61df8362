"""Block-sparse DALL-E attention: PyTorch reference, Triton kernels, autograd op, public function.

``O = softmax(scale * Q K^T + M) V`` with ``M`` = 0 where ``dense_mask`` allows a pair and -inf elsewhere.

Triton path: per query block, the forward walks only the key blocks listed in a lookup table built from the
mask predicate (``masks.block_tables``: int32 block indices plus a "full" flag; full tiles skip the predicate,
partial tiles apply it per token with ``masks.tl_allowed``), with a flash-style online softmax in fp32, and
saves ``O`` and the row log-sum-exp only (O(N) extra memory). The backward recomputes ``P`` from the
log-sum-exp: a preprocess kernel computes ``delta = rowsum(dO * O)``, one kernel computes dQ over the same
table, one computes dK and dV per key block over the transposed table. ``column`` runs the transposed layout
(block-diagonal causal, paper appendix B.1) by mapping each kernel position to its raster row in the loads and stores:
inputs and outputs stay in raster order and no permuted copy is made.
"""
from __future__ import annotations

import math

import torch

from .. import masks as _masks
from .._cuda_emu import emulated
from .._dispatch import resolve_backend
from . import _attention_op
from .attention_cpu import cpu_attention

HEAD_DIMS = (16, 32, 64, 128)
ATTENTION_BACKENDS = ("auto", "triton", "cuda", "cpu", "torch", "cuda_emu")  # what sparse_attention's backend= takes
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _ZeroRows(torch.autograd.Function):
    """``x`` with the rows ``bad`` set to 0 in the forward; the backward passes the gradient through unchanged,
    so a bad key's gradient is the one its attending rows give it (NaN), not a silent 0."""

    @staticmethod
    def forward(ctx, x, bad):
        return x.masked_fill(bad[..., None], 0.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def attention_ref(q, k, v, mask="row", text_len=0, grid=(1, 1), kernel=11, scale=None, upcast=torch.float32):
    """Dense-masked softmax attention (the definition). Computes in ``upcast`` and returns q's dtype.

    Non-finite keys and values: a key or value row holding NaN or +-inf never reaches a query the
    mask keeps from it, in the output or in any gradient; a query that may attend one gets NaN in its whole output
    row, and NaN in its dq and in the dk, dv of every key it attends. Every backend follows this; a plain dense
    softmax does not (0 * NaN in ``P V`` and in the matmuls' backward leak a masked NaN into every row)."""
    T, H, W = _masks.check_layout(mask, text_len, grid, kernel)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    allow = _masks.dense_mask(mask, T, (H, W), kernel, device=q.device)
    dtype = q.dtype
    q, k, v = q.to(upcast), k.to(upcast), v.to(upcast)
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, heads, N) non-finite key or value rows
    k, v = _ZeroRows.apply(k, bad), _ZeroRows.apply(v, bad)  # finite in every matmul
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    # a row that attends a bad position: NaN on its allowed pairs, added (not selected) so that its backward is
    # NaN too, on its own pairs only
    sees_bad = (allow & bad[..., None, :]).any(-1, keepdim=True)
    s = s + torch.where(sees_bad & allow, float("nan"), 0.0).to(s.dtype)
    s = s.masked_fill(~allow, float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(~allow, 0.0)  # a NaN row's masked pairs stay 0, in its backward too
    return torch.matmul(p, v).to(dtype)


def check_inputs(q, k, v, mask, text_len, grid, kernel, scale):
    """Validate arguments of ``sparse_attention``; return ``(T, H, W, scale)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, T + H*W, head_dim), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    T, H, W = _masks.check_layout(mask, text_len, grid, kernel)
    if q.shape[2] != T + H * W:
        raise ValueError(
            f"q, k, v sequence length {q.shape[2]} must equal text_len + H*W = {T} + {H}*{W} = {T + H * W}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[3]}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return T, H, W, float(scale)


# ----------------------------------------------------------------------------------------------------------------
# Tile configurations, one table per head_dim for sm_80 / sm_90, chosen from the ahead-of-time compile
# (tests/test_aot_compile.py; `python tests/test_aot_compile.py --all` prints registers, shared memory and spills):
# - 4 warps stacked along the query rows, so the softmax row max/sum never crosses warps;
# - no register spills on either target (the dK/dV kernel holds two fp32 accumulators: key blocks of 32);
# - tiles stay small because they are also the sparsity granularity: 64 x 64 tiles visit 0.50 / 0.43 / 0.63 of
#   dense causal's tiles for row / column / conv at the paper shape, 64 x 32 tiles 0.46 / 0.43 / 0.63,
#   128 x 128 tiles 0.62 / 0.49 / 0.73 (`python -m dalle_kernels masks --tiles`).
# The interpreter (CPU tests at small shapes) uses 16 x 16 tiles so that a sequence of a few dozen positions
# already spans several blocks, full and partial.

class TileConfig(tuple):
    """``(block_m, block_n, num_warps, num_stages)``."""

    def __new__(cls, block_m, block_n, num_warps, num_stages):
        return super().__new__(cls, (block_m, block_n, num_warps, num_stages))

    block_m = property(lambda self: self[0])
    block_n = property(lambda self: self[1])
    num_warps = property(lambda self: self[2])
    num_stages = property(lambda self: self[3])


FWD_CONFIGS = {16: TileConfig(64, 64, 4, 2), 32: TileConfig(64, 64, 4, 2), 64: TileConfig(64, 64, 4, 2),
               128: TileConfig(64, 32, 4, 2)}
# Backward: the same tiling serves dQ (query block 64, key blocks of 32) and dK/dV (key block 32, query blocks
# of 64), so one pair of lookup tables covers both.
BWD_CONFIGS = {16: TileConfig(64, 32, 4, 2), 32: TileConfig(64, 32, 4, 2), 64: TileConfig(64, 32, 4, 2),
               128: TileConfig(64, 32, 4, 1)}
INTERPRETER_CONFIG = TileConfig(16, 16, 4, 1)


def pick_configs(head_dim: int, device: torch.device, block_m: int = 0, block_n: int = 0):
    """Forward and backward tile configs for a call; ``block_m``/``block_n`` > 0 override the tile shape."""
    if device.type == "cuda":
        fwd, bwd = FWD_CONFIGS[head_dim], BWD_CONFIGS[head_dim]
    else:
        fwd = bwd = INTERPRETER_CONFIG
    if block_m or block_n:
        fwd = TileConfig(block_m or fwd.block_m, block_n or fwd.block_n, fwd.num_warps, fwd.num_stages)
        bwd = TileConfig(block_m or bwd.block_m, block_n or bwd.block_n, bwd.num_warps, bwd.num_stages)
    return fwd, bwd


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. The module imports without triton (the torch backend still works).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None

LOG2E = 1.4426950408889634

if triton is not None:
    from ..masks import tl_allowed

    @triton.jit
    def _phys_rows(offs, T, H, W, TRANSPOSED: tl.constexpr):
        """Kernel-layout position -> raster row of the tensor. ``column`` runs transposed (paper appendix B.1): logical
        image position ``T + c*H + r`` reads raster row ``T + r*W + c``, so no permuted copy is ever made."""
        if TRANSPOSED:
            t = tl.maximum(offs - T, 0)
            rows = tl.where(offs >= T, T + (t % H) * W + t // H, offs)
        else:
            rows = offs
        return rows

    @triton.jit
    def _load_rows(base, rows, valid, stride_n, HEAD_DIM: tl.constexpr):
        """A ``(len(rows), HEAD_DIM)`` tile; rows outside the sequence read as 0."""
        offs_d = tl.arange(0, HEAD_DIM)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
        return tl.load(ptrs, mask=valid[:, None], other=0.0)

    @triton.jit
    def _logits(q, k, offs_m, offs_n, full, N, T, H, W, S, qk_scale,
                MASK: tl.constexpr, PRECISION: tl.constexpr):
        """``qk_scale * q k^T`` (log2 domain), ``-inf`` where the mask forbids a pair or a position is past ``N``.

        ``full`` (from the lookup table) says the tile is entirely allowed and inside the sequence: no
        predicate work there.
        """
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if full == 0:
            ok = tl_allowed(offs_m[:, None], offs_n[None, :], T, H, W, S, MASK)
            ok = ok & (offs_m[:, None] < N) & (offs_n[None, :] < N)
            s = tl.where(ok, s, float("-inf"))
        return s

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
        """Fold one key tile into the running max ``m_i``, sum ``l_i`` and output ``acc`` (all fp32).

        A row with no allowed key so far has ``m = -inf``; shifting by 0 instead keeps ``exp2`` at 0, not NaN.
        """
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, full, N, T, H, W, S, qk_scale,
                           MASK: tl.constexpr, PRECISION: tl.constexpr):
        """Backward core, shared by the dQ and dK/dV kernels: recompute ``P = exp(S - lse)`` from the saved
        row log-sum-exp, and ``dS = P * (dO V^T - delta)`` with ``delta = rowsum(dO * O)``; both exactly 0 on
        masked pairs, whatever the key, value or row log-sum-exp there."""
        s = _logits(q, k, offs_m, offs_n, full, N, T, H, W, S, qk_scale, MASK, PRECISION)
        # masked pairs exactly 0, also in rows whose log-sum-exp the forward made NaN (they attend a bad key)
        p = tl.where(s == float("-inf"), 0.0, tl.math.exp2(s - lse2[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))  # p == 0: masked (or underflowed) pairs
        return p, ds

    @triton.jit
    def _attn_fwd_kernel(
        Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr, LUT_ptr, FULL_ptr, CNT_ptr,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        HEADS, N, LUT_W, qk_scale,
        T: tl.constexpr, H: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
        MASK: tl.constexpr, TRANSPOSED: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One query block of one (batch, head): ``O = softmax(scale * Q K^T + mask) V`` with an online softmax
        over the key blocks listed in the lookup table only; also writes the row log-sum-exp (natural log).
        ``V_ptr`` holds no NaN or inf, and a key whose key or value row held one is NaN (``_triton_forward``): its
        masked pairs are -inf like any other, its allowed ones make their rows NaN (``attention_ref``'s rule)."""
        # Grid (batch * heads, query blocks), last query block first: under causal-like masks it has the most
        # key blocks, and starting it first shortens the tail. (batch * heads on axis 0: no 65535 limit.)
        pid_bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        off_b = (pid_bh // HEADS).to(tl.int64)
        off_h = (pid_bh % HEADS).to(tl.int64)
        q_base = Q_ptr + off_b * stride_qb + off_h * stride_qh
        k_base = K_ptr + off_b * stride_kb + off_h * stride_kh
        v_base = V_ptr + off_b * stride_vb + off_h * stride_vh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m = _phys_rows(offs_m, T, H, W, TRANSPOSED)
        valid_m = offs_m < N
        q = _load_rows(q_base, rows_m, valid_m, stride_qn, HEAD_DIM)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        count = tl.load(CNT_ptr + pid_m)
        for idx in range(0, count):
            kb = tl.load(LUT_ptr + pid_m * LUT_W + idx)
            full = tl.load(FULL_ptr + pid_m * LUT_W + idx)
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            rows_n = _phys_rows(offs_n, T, H, W, TRANSPOSED)
            valid_n = offs_n < N
            k = _load_rows(k_base, rows_n, valid_n, stride_kn, HEAD_DIM)
            v = _load_rows(v_base, rows_n, valid_n, stride_vn, HEAD_DIM)
            s = _logits(q, k, offs_m, offs_n, full, N, T, H, W, S, qk_scale, MASK, PRECISION)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

        # Only padding rows past N can end with l = 0 (the diagonal is always allowed); keep them finite.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        out = acc * (1.0 / l_safe)[:, None]
        lse = (m_safe + tl.math.log2(l_safe)) * 0.6931471805599453
        offs_d = tl.arange(0, HEAD_DIM)
        o_ptrs = O_ptr + off_b * stride_ob + off_h * stride_oh + rows_m.to(tl.int64)[:, None] * stride_on
        tl.store(o_ptrs + offs_d[None, :], out.to(O_ptr.dtype.element_ty), mask=valid_m[:, None])
        tl.store(LSE_ptr + pid_bh.to(tl.int64) * N + rows_m, lse, mask=valid_m)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O_ptr, DO_ptr, DELTA_ptr,
        stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
        HEADS, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """``delta = rowsum(dO * O)`` in fp32, per raster row (the softmax backward's correction term)."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        off_b = (pid_bh // HEADS).to(tl.int64)
        off_h = (pid_bh % HEADS).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < N
        o = _load_rows(O_ptr + off_b * stride_ob + off_h * stride_oh, rows, valid, stride_on, HEAD_DIM)
        do = _load_rows(DO_ptr + off_b * stride_dob + off_h * stride_doh, rows, valid, stride_don, HEAD_DIM)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA_ptr + pid_bh.to(tl.int64) * N + rows, delta, mask=valid)

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q_ptr, K_ptr, V_ptr, DO_ptr, DQ_ptr, LSE_ptr, DELTA_ptr, LUT_ptr, FULL_ptr, CNT_ptr,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        stride_dqb, stride_dqh, stride_dqn,
        HEADS, N, LUT_W, qk_scale, sm_scale,
        T: tl.constexpr, H: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
        MASK: tl.constexpr, TRANSPOSED: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One query block: ``dQ = scale * dS K`` over the key blocks of the forward lookup table."""
        pid_bh = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        off_b = (pid_bh // HEADS).to(tl.int64)
        off_h = (pid_bh % HEADS).to(tl.int64)
        k_base = K_ptr + off_b * stride_kb + off_h * stride_kh
        v_base = V_ptr + off_b * stride_vb + off_h * stride_vh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_m = _phys_rows(offs_m, T, H, W, TRANSPOSED)
        valid_m = offs_m < N
        q = _load_rows(Q_ptr + off_b * stride_qb + off_h * stride_qh, rows_m, valid_m, stride_qn, HEAD_DIM)
        do = _load_rows(DO_ptr + off_b * stride_dob + off_h * stride_doh, rows_m, valid_m, stride_don, HEAD_DIM)
        lse2 = tl.load(LSE_ptr + pid_bh.to(tl.int64) * N + rows_m, mask=valid_m, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA_ptr + pid_bh.to(tl.int64) * N + rows_m, mask=valid_m, other=0.0)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        count = tl.load(CNT_ptr + pid_m)
        for idx in range(0, count):
            kb = tl.load(LUT_ptr + pid_m * LUT_W + idx)
            full = tl.load(FULL_ptr + pid_m * LUT_W + idx)
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            rows_n = _phys_rows(offs_n, T, H, W, TRANSPOSED)
            valid_n = offs_n < N
            # K is finite here (``_triton_backward``): a masked pair's dS is 0, and 0 * NaN in dS K would be NaN
            k = _load_rows(k_base, rows_n, valid_n, stride_kn, HEAD_DIM)
            v = _load_rows(v_base, rows_n, valid_n, stride_vn, HEAD_DIM)
            p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, full, N, T, H, W, S, qk_scale,
                                       MASK, PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

        offs_d = tl.arange(0, HEAD_DIM)
        dq_ptrs = DQ_ptr + off_b * stride_dqb + off_h * stride_dqh + rows_m.to(tl.int64)[:, None] * stride_dqn
        tl.store(dq_ptrs + offs_d[None, :], (dq * sm_scale).to(DQ_ptr.dtype.element_ty), mask=valid_m[:, None])

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q_ptr, K_ptr, V_ptr, DO_ptr, DK_ptr, DV_ptr, LSE_ptr, DELTA_ptr, LUT_ptr, FULL_ptr, CNT_ptr,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        stride_dkb, stride_dkh, stride_dkn,
        HEADS, N, LUT_W, qk_scale, sm_scale,
        T: tl.constexpr, H: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
        MASK: tl.constexpr, TRANSPOSED: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One key block: ``dV = P^T dO`` and ``dK = scale * dS^T Q`` over the query blocks of the transposed
        lookup table. ``DK_ptr`` and ``DV_ptr`` share the strides ``stride_dk*``. The first key blocks (text)
        are seen by every image query: natural order starts the heaviest first."""
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        off_b = (pid_bh // HEADS).to(tl.int64)
        off_h = (pid_bh % HEADS).to(tl.int64)
        q_base = Q_ptr + off_b * stride_qb + off_h * stride_qh
        do_base = DO_ptr + off_b * stride_dob + off_h * stride_doh

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_n = _phys_rows(offs_n, T, H, W, TRANSPOSED)
        valid_n = offs_n < N
        # K and V enter per pair only (scores, dO V^T), where masked pairs are set to 0: no contraction over keys
        k = _load_rows(K_ptr + off_b * stride_kb + off_h * stride_kh, rows_n, valid_n, stride_kn, HEAD_DIM)
        v = _load_rows(V_ptr + off_b * stride_vb + off_h * stride_vh, rows_n, valid_n, stride_vn, HEAD_DIM)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        count = tl.load(CNT_ptr + pid_n)
        for idx in range(0, count):
            qb = tl.load(LUT_ptr + pid_n * LUT_W + idx)
            full = tl.load(FULL_ptr + pid_n * LUT_W + idx)
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            rows_m = _phys_rows(offs_m, T, H, W, TRANSPOSED)
            valid_m = offs_m < N
            q = _load_rows(q_base, rows_m, valid_m, stride_qn, HEAD_DIM)
            do = _load_rows(do_base, rows_m, valid_m, stride_don, HEAD_DIM)
            lse2 = tl.load(LSE_ptr + pid_bh.to(tl.int64) * N + rows_m, mask=valid_m, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA_ptr + pid_bh.to(tl.int64) * N + rows_m, mask=valid_m, other=0.0)
            p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, offs_m, offs_n, full, N, T, H, W, S, qk_scale,
                                       MASK, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

        offs_d = tl.arange(0, HEAD_DIM)
        base = off_b * stride_dkb + off_h * stride_dkh + rows_n.to(tl.int64)[:, None] * stride_dkn + offs_d[None, :]
        tl.store(DK_ptr + base, (dk * sm_scale).to(DK_ptr.dtype.element_ty), mask=valid_n[:, None])
        tl.store(DV_ptr + base, dv.to(DV_ptr.dtype.element_ty), mask=valid_n[:, None])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get fp32 products (not TF32): "correct first"; fp16/bf16 use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows_stride_ok(t: torch.Tensor) -> torch.Tensor:
    """The kernels read any (batch, head, row) strides but need the head_dim axis contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_args(mask, T, H, W, kernel):
    # The layout is compile-time: divisions by H and W become multiplies and shifts (shifts for 32 x 32), and
    # a model compiles one variant per (mask, T, H, W, kernel) it uses.
    return dict(T=T, H=H, W=W, S=kernel // 2, MASK=_masks.MASK_CODES[mask], TRANSPOSED=mask == "column")


def _triton_forward(q, k, v, mask, T, H, W, kernel, scale, block_m=0, block_n=0):
    """Launch the forward kernel; returns ``o`` (contiguous, q's dtype) and the fp32 row log-sum-exp ``(B, h, N)``."""
    q, k, v = (_rows_stride_ok(t) for t in (q, k, v))
    B, heads, N, D = q.shape
    cfg, _ = pick_configs(D, q.device, block_m, block_n)
    tables = _masks.block_tables(mask, T, (H, W), kernel, cfg.block_m, cfg.block_n, device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, N), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    grid = (B * heads, triton.cdiv(N, cfg.block_m))
    # Non-finite keys and values (attention_ref's rule), the kernel as it is: finite values for P V, NaN keys for
    # the bad rows (_attention_op.forward_inputs; in the kernel this cost registers)
    k, v = _attention_op.forward_inputs(k, v)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, tables.q_lut, tables.q_full, tables.q_count,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        heads, N, tables.q_lut.shape[1], scale * LOG2E, **_kernel_args(mask, T, H, W, kernel), HEAD_DIM=D,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=_precision(q.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return o, lse


def _triton_backward(do, q, k, v, o, lse, mask, T, H, W, kernel, scale, block_m=0, block_n=0):
    """Launch preprocess, dQ and dK/dV kernels; returns ``(dq, dk, dv)`` in the inputs' dtype."""
    q, k, v, o, do = (_rows_stride_ok(t) for t in (q, k, v, o, do))
    B, heads, N, D = q.shape
    _, cfg = pick_configs(D, q.device, block_m, block_n)
    tables = _masks.block_tables(mask, T, (H, W), kernel, cfg.block_m, cfg.block_n, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk, dv
    do = do.to(q.dtype)
    delta = torch.empty((B, heads, N), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(B * heads, triton.cdiv(N, cfg.block_m))](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        heads, N, HEAD_DIM=D, BLOCK_M=cfg.block_m)
    common = dict(**_kernel_args(mask, T, H, W, kernel), HEAD_DIM=D, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, PRECISION=_precision(q.dtype), num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    # dQ = dS K is the backward's one contraction over keys: there a masked-out NaN or inf key (dS 0) would give
    # 0 * NaN, so that kernel reads K with them set to 0 (a row that may attend one has NaN dS already). Made
    # here rather than in the kernel, where it spilled registers on sm_80.
    k_finite = _attention_op.finite(k)  # its own strides (a copy may be dense)
    dq_strides = strides[:3] + k_finite.stride()[:3] + strides[6:]
    _attn_bwd_dq_kernel[(B * heads, triton.cdiv(N, cfg.block_m))](
        q, k_finite, v, do, dq, lse, delta, tables.q_lut, tables.q_full, tables.q_count,
        *dq_strides, dq.stride(0), dq.stride(1), dq.stride(2),
        heads, N, tables.q_lut.shape[1], scale * LOG2E, scale, **common)
    _attn_bwd_dkdv_kernel[(B * heads, triton.cdiv(N, cfg.block_n))](
        q, k, v, do, dk, dv, lse, delta, tables.k_lut, tables.k_full, tables.k_count,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        heads, N, tables.k_lut.shape[1], scale * LOG2E, scale, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# CUDA kernels (csrc/attention.cu) through the extension's raw-pointer entry points; on CPU tensors the same
# launchers run the kernels in the emulator (backend="cuda_emu", checked by its racecheck and memcheck).
# float16/bfloat16: the tensor-core kernels, forward 64 x 64 tiles (64 x 32 for head_dim 128), backward 64 x 64, on
# the GPU and in the emulator alike. float32: the fp32 CUDA-core kernels (exact fp32 products) with square tiles,
# 64 for head_dim <= 64 and 32 for 128 on the GPU, 16 in the emulator so that the small test sequences span several
# blocks, full and partial (as the Triton interpreter's 16 x 16 tiles do).
CUDA_TILES = {16: 64, 32: 64, 64: 64, 128: 32}
CUDA_EMU_TILE = 16
CUDA_MMA_TILES = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 32)}
CUDA_MMA_BWD_TILE = 64


def cuda_tiles(head_dim: int, dtype: torch.dtype, device: torch.device, block: int = 0):
    """``((block_m, block_n) of the forward, block of the backward)`` for a call of the CUDA kernels. ``block`` > 0
    gives every kernel that square tile: 16 (or 32 at head_dim 128) selects the CUDA-core kernels for float16/
    bfloat16 too; 64 selects the tensor-core kernels there (at head_dim <= 64 for the forward)."""
    if block:
        return (block, block), block
    if dtype == torch.float32:
        square = CUDA_TILES[head_dim] if device.type == "cuda" else CUDA_EMU_TILE
        return (square, square), square
    return CUDA_MMA_TILES[head_dim], CUDA_MMA_BWD_TILE


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows start on 16-byte boundaries (the tensor-core kernels' cp.async copies), else a copy."""
    if t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:3]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _launch_cuda_forward(q, k, v, lut, full, count, mask, T, H, W, kernel, scale, block_m, block_n):
    from .._cuda import dtype_code, ext, stream_of

    q, k, v = (_rows_stride_ok(t) for t in (q, k, v))
    if (block_m, block_n) == CUDA_MMA_TILES[q.shape[-1]] and q.dtype != torch.float32:
        q, k, v = (_aligned_rows(t) for t in (q, k, v))
    B, heads, N, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, N), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    ext("attention_forward").attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), lut.data_ptr(), full.data_ptr(),
        count.data_ptr(), B, heads, N, D, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        lut.shape[0], lut.shape[1], _masks.MASK_CODES[mask], T, H, W, kernel, scale, block_m, block_n,
        dtype_code(q), stream_of(q))
    return o, lse


def _launch_cuda_backward(do, q, k, v, o, lse, q_lut, q_full, q_count, k_lut, k_full, k_count, mask, T, H, W,
                          kernel, scale, block):
    from .._cuda import dtype_code, ext, stream_of

    q, k, v, o = (_rows_stride_ok(t) for t in (q, k, v, o))
    do = _rows_stride_ok(do.to(q.dtype))
    if block == CUDA_MMA_BWD_TILE and q.dtype != torch.float32:
        q, k, v, do = (_aligned_rows(t) for t in (q, k, v, do))
    B, heads, N, D = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((B, heads, N), dtype=torch.float32, device=q.device)
    ext("attention_backward").attention_backward(
        do.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(), delta.data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), q_lut.data_ptr(), q_full.data_ptr(), q_count.data_ptr(),
        k_lut.data_ptr(), k_full.data_ptr(), k_count.data_ptr(), B, heads, N, D, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], q_lut.shape[1],
        k_lut.shape[1], _masks.MASK_CODES[mask], T, H, W, kernel, scale, block, dtype_code(q), stream_of(q))
    return dq, dk, dv


# The same launchers on CPU tensors, in the emulator: the kernels may write only what the launcher allocates.
_launch_cuda_forward_emu = emulated(_launch_cuda_forward)
_launch_cuda_backward_emu = emulated(_launch_cuda_backward)


def _cuda_forward(q, k, v, mask, T, H, W, kernel, scale, block=0):
    """``(o, lse)`` from csrc/attention.cu: on the GPU for CUDA tensors, in the emulator for CPU tensors."""
    (bm, bn), _ = cuda_tiles(q.shape[-1], q.dtype, q.device, block)
    t = _masks.block_tables(mask, T, (H, W), kernel, bm, bn, device=q.device)
    launch = _launch_cuda_forward if q.device.type == "cuda" else _launch_cuda_forward_emu
    k, v = _attention_op.forward_inputs(k, v)  # non-finite keys and values: attention_ref's rule
    return launch(q, k, v, t.q_lut, t.q_full, t.q_count, mask, T, H, W, kernel, scale, bm, bn)


def _cuda_backward(do, q, k, v, o, lse, mask, T, H, W, kernel, scale, block=0):
    """``(dq, dk, dv)`` from csrc/attention.cu (delta, dQ, dK/dV kernels); devices as ``_cuda_forward``."""
    _, block = cuda_tiles(q.shape[-1], q.dtype, q.device, block)
    t = _masks.block_tables(mask, T, (H, W), kernel, block, block, device=q.device)
    launch = _launch_cuda_backward if q.device.type == "cuda" else _launch_cuda_backward_emu
    # finite keys for dS K (a masked pair's dS is 0 there); the kernels' scores are per pair, masked to -inf
    return launch(do, q, _attention_op.finite(k), v, o, lse, t.q_lut, t.q_full, t.q_count, t.k_lut, t.k_full,
                  t.k_count, mask, T, H, W, kernel, scale, block)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: two custom ops (forward, backward) so torch.compile traces calls without a graph break; the
# forward op's autograd is registered with register_autograd. Only o and the row log-sum-exp are saved.

@torch.library.custom_op("dalle_kernels::sparse_attention_fwd", mutates_args=())
def _sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str, text_len: int, H: int,
                          W: int, kernel: int, scale: float, block_m: int, block_n: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_forward(q, k, v, mask, text_len, H, W, kernel, scale, block_m, block_n)


@torch.library.custom_op("dalle_kernels::sparse_attention_bwd", mutates_args=())
def _sparse_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, mask: str, text_len: int, H: int, W: int, kernel: int, scale: float,
                          block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward(do, q, k, v, o, lse, mask, text_len, H, W, kernel, scale, block_m, block_n)


_attention_op.register(_sparse_attention_fwd, _sparse_attention_bwd)


@torch.library.custom_op("dalle_kernels::sparse_attention_cuda_fwd", mutates_args=())
def _sparse_attention_cuda_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str, text_len: int, H: int,
                               W: int, kernel: int, scale: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _cuda_forward(q, k, v, mask, text_len, H, W, kernel, scale, block)


@torch.library.custom_op("dalle_kernels::sparse_attention_cuda_bwd", mutates_args=())
def _sparse_attention_cuda_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                               lse: torch.Tensor, mask: str, text_len: int, H: int, W: int, kernel: int, scale: float,
                               block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda_backward(do, q, k, v, o, lse, mask, text_len, H, W, kernel, scale, block)


_attention_op.register(_sparse_attention_cuda_fwd, _sparse_attention_cuda_bwd)


@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``resolve_backend`` run eagerly even under torch.compile (it imports and reads the environment, which
    Dynamo does not trace); its answer is a constant for a given device, dtype and environment. Every Triton
    kernel here multiplies operands of the inputs' dtype with ``tl.dot``."""
    return resolve_backend(backend, torch.empty(0, device=device, dtype=dtype), cuda_op="attention_forward",
                           prefer_cuda=False, cpu_path=True, triton_dot=True)


def triton_attention(q, k, v, mask, text_len, grid, kernel, scale, block_m=0, block_n=0):
    """The Triton path after validation: ``(o, lse)``; differentiable in q, k, v."""
    H, W = grid
    return _sparse_attention_fwd(q, k, v, mask, text_len, H, W, kernel, scale, block_m, block_n)


def cuda_attention(q, k, v, mask, text_len, grid, kernel, scale, block=0):
    """The CUDA path after validation (csrc/attention.cu; the emulator for CPU tensors): ``(o, lse)``;
    differentiable in q, k, v. ``block`` > 0 overrides the tiles (see ``cuda_tiles``)."""
    H, W = grid
    return _sparse_attention_cuda_fwd(q, k, v, mask, text_len, H, W, kernel, scale, block)


def sparse_attention(q, k, v, mask="row", text_len=0, grid=(32, 32), kernel=11, scale=None, backend="auto"):
    """Causal softmax attention under one of DALL-E's masks: equal to softmax attention under
    ``dalle_kernels.masks.dense_mask(mask, text_len, grid, kernel)`` (True = attend).

    ``q, k, v``: ``(batch, heads, text_len + H*W, head_dim)``, float32/float16/bfloat16, head_dim 16/32/64/128,
    any strides (the head_dim axis is made contiguous if it is not); returns a tensor of q's shape and dtype.
    ``mask``: ``"row"``, ``"column"``, ``"conv"`` (``kernel`` x ``kernel`` window, odd), ``"conv_clipped"``
    (ru-dalle's ``v3`` window), ``"conv_torus"`` (ru-dalle's ``v2`` window, wrapped around both grid axes),
    ``"axial_row"`` (DALLE-pytorch's: the query's own image row) or ``"causal"``; definitions and sources in
    ``dalle_kernels.masks``. ``scale`` defaults to ``1 / sqrt(head_dim)``.
    ``backend``: ``"triton"`` (block-sparse kernels; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``),
    ``"cuda"`` (the CUDA kernels of ``csrc/attention.cu`` over the same lookup tables, CUDA tensors; needs the
    built extension), ``"cuda_emu"`` (those kernels on CPU tensors in the CUDA emulator, for testing; never picked
    by ``"auto"``), ``"cpu"`` (PyTorch's fused CPU attention kernel over only the keys the mask allows: by the mask's
    shape, text keys then a band of image rows or a column, or over the same lookup tables per group of query
    blocks; CPU tensors; ``ops/attention_cpu.py``), ``"torch"`` (the dense-masked reference,
    differentiable by autograd) or ``"auto"`` (Triton for CUDA tensors and in the interpreter, else cpu;
    bfloat16 CPU tensors never go to the interpreter, whose ``tl.dot`` is wrong on bfloat16; ``auto`` keeps Triton
    on GPUs until a GPU benchmark shows the CUDA kernels faster). The Triton, CUDA and cpu paths are
    ``torch.library`` custom ops (``torch.ops.dalle_kernels.sparse_attention_fwd``, ``..._cuda_fwd``,
    ``..._cpu_fwd``): ``torch.compile(fullgraph=True)`` traces them.

    A key or value holding NaN or +-inf never reaches a query the mask keeps from it, on every backend; the rows
    that may attend one come out NaN (``attention_ref``'s rule; docs/attention.md).

    Raises TypeError/ValueError for inputs outside the above, and ValueError for ``backend="triton"`` where it
    cannot run or be right (CPU tensors without the interpreter; bfloat16 CPU tensors in the interpreter), for
    ``backend="cpu"`` or ``"cuda_emu"`` on CUDA tensors and ``backend="cuda"`` on CPU tensors; RuntimeError when
    ``"cuda"``/``"cuda_emu"`` needs an extension that is not built.
    """
    T, H, W, scale = check_inputs(q, k, v, mask, text_len, grid, kernel, scale)
    backend = _resolve_backend(backend, q.device, q.dtype)
    if backend == "torch":
        return attention_ref(q, k, v, mask, T, (H, W), kernel, scale)
    if backend == "cpu":
        return cpu_attention(q, k, v, mask, T, (H, W), kernel, scale)[0]
    if backend in ("cuda", "cuda_emu"):
        return cuda_attention(q, k, v, mask, T, (H, W), kernel, scale)[0]
    return triton_attention(q, k, v, mask, T, (H, W), kernel, scale)[0]
