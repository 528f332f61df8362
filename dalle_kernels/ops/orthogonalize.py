"""Householder orthogonalization of batches of tall-skinny matrices (PowerSGD's ``P``; paper appendix E).

``orthogonalize(P)`` overwrites every ``n x r`` matrix of ``P`` (``n >= r``) with the ``Q`` factor of its
Householder QR, ``P = Q R``, signs chosen so that ``diag(R) >= 0`` (for a full-rank ``P`` that is the
unique thin QR, the same ``Q`` that Gram-Schmidt or ``torch.linalg.qr`` with a sign fix give).

Algorithm (the same in the PyTorch reference, the Triton kernel and the CUDA kernel):

1. Columns are scaled by their largest magnitude (``Q`` of ``P D`` is ``Q`` of ``P`` for a positive
   diagonal ``D``), so sums of squares cannot overflow or underflow in the fp32 accumulator.
2. Factorization, ``k = 0 .. r-1``: with ``x = A[k:, k]``, ``alpha = -sign(x_0) ||x||``,
   ``v = x - alpha e_0`` and ``beta = 2 / v^T v = 1 / (||x|| (||x|| + |x_0|))``, apply
   ``H_k = I - beta v v^T`` to ``A[k:, k+1:]``. ``v`` stays in column ``k`` (its first entry in a small
   per-matrix vector).
3. Formation, ``k = r-1 .. 0``: ``Q = H_0 H_1 ... H_{r-1} [I_r; 0]``, accumulated backwards in place
   (LAPACK's ``orgqr`` order), then column ``k`` is multiplied by ``sign(R_kk)``.

Rank deficiency: when the part of column ``k`` not yet explained by the previous columns has a sum of
squares at or below ``tiny / eps`` of the accumulator type (about ``1e-31`` for fp32 after the column
scaling, i.e. a relative residual below 1e-15), its reflection is replaced by the identity
(``beta = 0``, as LAPACK does for a zero vector). ``Q``'s column ``k`` is then
``H_0 ... H_{k-1} e_k``: still a unit vector orthogonal to the other columns, so ``Q`` stays orthonormal
and finite (no division by a vanishing norm); it simply adds a direction that ``P`` does not use.
A zero matrix therefore gives the first ``r`` columns of the identity. Non-finite input gives
non-finite output (check before calling; the PowerSGD hook does).

Triton has two kernels: matrices of up to ``RESIDENT_ELEMENTS`` (padded) elements are held in registers
for the whole computation (one load, one store); larger ones stream. Streaming: each pass reads the ``n x r`` matrix once in chunks of ``BLOCK_N`` rows while the ``r``-vectors
that the next pass needs (``x^T A``, row ``k``, ``beta``, ``v_0``, signs) stay in registers, so ``n`` is
unbounded (65k rows are fine) and one launch handles the whole batch, one program (CUDA: one block) per
matrix. Pass ``k`` of the factorization applies ``H_k`` and accumulates the dot products of ``H_{k+1}``
in the same sweep; formation does the same, so there are ``2r + 1`` passes in all.
fp16/bf16 inputs are staged in an fp32 workspace: every reflection is computed and applied in fp32 and
only the final ``Q`` is rounded to the input dtype.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .._cuda_emu import emulated
from .._dispatch import resolve_backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_KERNEL_RANK = 64  # r handled by the Triton and CUDA kernels; the reference takes any r


def _tiny(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny / fi.eps


# ----------------------------------------------------------------------------------------------------
# PyTorch reference (the definition; also the CPU path and the float64 path)
# ----------------------------------------------------------------------------------------------------
def orthogonalize_ref(P: torch.Tensor, upcast: torch.dtype = torch.float32) -> torch.Tensor:
    """Householder ``Q`` of ``P`` (``(n, r)`` or ``(batch, n, r)``), computed in ``upcast`` (float64 if
    ``P`` is float64) and returned as a new tensor of ``P``'s dtype. See the module docstring."""
    check_input(P, "P", dtypes=DTYPES)
    acc = torch.float64 if torch.float64 in (P.dtype, upcast) else torch.float32
    squeeze = P.dim() == 2
    A = P.to(acc).clone()
    if squeeze:
        A = A.unsqueeze(0)
    B, n, r = A.shape
    if B == 0:
        return P.clone()
    cmax = A.abs().amax(dim=1, keepdim=True)
    A = A / torch.where(cmax > 0, cmax, torch.ones_like(cmax))
    tiny = _tiny(acc)
    vs, betas, signs = [], [], []
    for k in range(r):
        x = A[:, k:, k]
        nrm2 = (x * x).sum(-1)
        x0 = x[:, 0]
        ok = nrm2 > tiny
        nrm = torch.sqrt(torch.where(ok, nrm2, torch.ones_like(nrm2)))
        sgn = torch.where(x0 >= 0, 1.0, -1.0).to(acc)
        alpha = -sgn * nrm
        v = x.clone()
        v[:, 0] = torch.where(ok, x0 - alpha, x0)
        beta = torch.where(ok, 1.0 / (nrm * (nrm + x0.abs())), torch.zeros_like(nrm))
        if k + 1 < r:
            rest = A[:, k:, k + 1:]
            w = torch.einsum("bi,bij->bj", v, rest)
            rest -= beta[:, None, None] * v[:, :, None] * w[:, None, :]
        vs.append(v)
        betas.append(beta)
        signs.append(torch.where(ok, -sgn, torch.ones_like(sgn)))
    Q = torch.zeros_like(A)
    idx = torch.arange(r, device=A.device)
    Q[:, idx, idx] = 1.0
    for k in reversed(range(r)):
        part = Q[:, k:, k:]
        w = torch.einsum("bi,bij->bj", vs[k], part)
        part -= betas[k][:, None, None] * vs[k][:, :, None] * w[:, None, :]
    Q *= torch.stack(signs, dim=-1)[:, None, :]
    if squeeze:
        Q = Q[0]
    return Q.to(P.dtype)


def check_input(P, name: str = "P", dtypes=DTYPES) -> None:
    """Validate a matrix or batch of matrices to orthogonalize (clear TypeError/ValueError)."""
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(P).__name__}")
    if P.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(str(d) for d in dtypes)}, got {P.dtype}")
    if P.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (n, r) or (batch, n, r), got {tuple(P.shape)}")
    n, r = P.shape[-2], P.shape[-1]
    if r < 1:
        raise ValueError(f"{name} must have at least one column (r >= 1), got shape {tuple(P.shape)}")
    if n < r:
        raise ValueError(f"{name} must be tall: n >= r is needed for r orthonormal columns, got n={n}, r={r} "
                         f"(shape {tuple(P.shape)})")
    if P.requires_grad and torch.is_grad_enabled():
        # the op writes P in place outside autograd, as torch's own in-place ops refuse to for such tensors
        raise ValueError(f"{name} requires grad: orthogonalize works in place and is not differentiable; pass "
                         f"{name}.detach() or call it under torch.no_grad()")


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton (torch and CUDA backends)
    triton = None

if triton is not None:

    @triton.jit
    def _reflection(s, a_row, k, cols, TINY: tl.constexpr):
        """Householder reflection ``k`` from ``s = x^T A[k:, :]`` and ``a_row = A[k, :]`` (``x = A[k:, k]``).
        Returns ``(beta, v0, alpha, sign)``: ``H = I - beta v v^T`` with ``v = x - alpha e_0``; ``sign`` is
        ``sign(R_kk)`` (+1 for an identity reflection)."""
        nrm2 = tl.sum(tl.where(cols == k, s, 0.0), axis=0)
        x0 = tl.sum(tl.where(cols == k, a_row, 0.0), axis=0)
        ok = nrm2 > TINY
        nrm = tl.sqrt(tl.where(ok, nrm2, 1.0))
        sgn = tl.where(x0 >= 0, 1.0, -1.0)
        alpha = -sgn * nrm
        v0 = tl.where(ok, x0 - alpha, x0)
        beta = tl.where(ok, 1.0 / (nrm * (nrm + tl.abs(x0))), 0.0)
        sign = tl.where(ok, -sgn, 1.0)
        return beta, v0, alpha, sign

    @triton.jit
    def _column(tile, rows, cols, k, v0):
        """Householder vector ``k`` from a row chunk: column ``k`` below row ``k``, ``v0`` at row ``k``, 0 above."""
        col = tl.sum(tl.where(cols[None, :] == k, tile, 0.0), axis=1)
        return tl.where(rows > k, col, tl.where(rows == k, v0, 0.0))

    @triton.jit
    def _apply_reflection(tile, rows, cols, k, v0, beta, w):
        """Factorization step on a row chunk: ``A[:, j] -= beta v (v^T A[:, j])`` for ``j > k``
        (``w[j] = v^T A[:, j]``); column ``k`` keeps ``v``."""
        v = _column(tile, rows, cols, k, v0)
        return tl.where((cols > k)[None, :], tile - beta * v[:, None] * w[None, :], tile)

    @triton.jit
    def _form_step(tile, rows, cols, k, v0, beta, wq):
        """Formation step on a row chunk: ``Q[:, j] <- H_k Q[:, j]`` for ``j > k`` (``wq[j] = v^T Q[:, j]``) and
        column ``k`` (which held ``v``) becomes ``H_k e_k``. Columns ``< k`` (later ``v``s) are unchanged."""
        v = _column(tile, rows, cols, k, v0)
        new = tl.where((cols > k)[None, :], tile - beta * v[:, None] * wq[None, :], tile)
        qk = tl.where(rows == k, 1.0, 0.0) - beta * v0 * v  # H_k e_k; zero above row k
        return tl.where((cols == k)[None, :], qk[:, None], new)

    @triton.jit
    def _orthogonalize_resident_kernel(
        P_ptr, n, r, stride_pb, stride_pn, stride_pr,
        TINY: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Small matrices (``n <= BLOCK_N``): the same algorithm with the whole matrix in registers, one load
        and one store; the passes of the streaming kernel become in-register reductions."""
        pid = tl.program_id(0).to(tl.int64)
        p_base = P_ptr + pid * stride_pb
        cols = tl.arange(0, R_PAD)
        rows = tl.arange(0, BLOCK_N)
        m = (rows < n)[:, None] & (cols < r)[None, :]
        ptrs = p_base + rows.to(tl.int64)[:, None] * stride_pn + cols[None, :] * stride_pr
        tile = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        cmax = tl.max(tl.abs(tile), axis=0)
        tile = tile * (1.0 / tl.where(cmax > 0, cmax, 1.0))[None, :]
        betas = tl.zeros([R_PAD], dtype=tl.float32)
        v0s = tl.zeros([R_PAD], dtype=tl.float32)
        signs = tl.full([R_PAD], 1.0, dtype=tl.float32)
        for k in range(0, r):
            x = tl.where(rows >= k, tl.sum(tl.where(cols[None, :] == k, tile, 0.0), axis=1), 0.0)
            s = tl.sum(x[:, None] * tile, axis=0)
            a_row = tl.sum(tl.where(rows[:, None] == k, tile, 0.0), axis=0)
            beta, v0, alpha, sign = _reflection(s, a_row, k, cols, TINY)
            betas = tl.where(cols == k, beta, betas)
            v0s = tl.where(cols == k, v0, v0s)
            signs = tl.where(cols == k, sign, signs)
            tile = _apply_reflection(tile, rows, cols, k, v0, beta, s - alpha * a_row)
        for kk in range(0, r):
            k = r - 1 - kk
            beta = tl.sum(tl.where(cols == k, betas, 0.0), axis=0)
            v0 = tl.sum(tl.where(cols == k, v0s, 0.0), axis=0)
            v = _column(tile, rows, cols, k, v0)
            wq = tl.sum(tl.where((cols > k)[None, :], v[:, None] * tile, 0.0), axis=0)
            tile = _form_step(tile, rows, cols, k, v0, beta, wq)
        tl.store(ptrs, (tile * signs[None, :]).to(P_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _orthogonalize_kernel(
        P_ptr, W_ptr, n, r,
        stride_pb, stride_pn, stride_pr,
        stride_wb, stride_wn, stride_wr,
        TINY: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program per matrix: ``P[b] <- Q`` of the Householder QR of ``P[b]`` (module docstring).

        ``W`` is an fp32 workspace of the same shape (``W is P`` for fp32 input); all arithmetic is fp32.
        """
        pid = tl.program_id(0).to(tl.int64)
        p_base = P_ptr + pid * stride_pb
        w_base = W_ptr + pid * stride_wb
        cols = tl.arange(0, R_PAD)
        col_ok = cols < r
        offs = tl.arange(0, BLOCK_N)

        # Pass 1: largest magnitude per column.
        cmax = tl.zeros([R_PAD], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            rows = start + offs
            m = (rows < n)[:, None] & col_ok[None, :]
            x = tl.load(p_base + rows.to(tl.int64)[:, None] * stride_pn + cols[None, :] * stride_pr,
                        mask=m, other=0.0).to(tl.float32)
            cmax = tl.maximum(cmax, tl.max(tl.abs(x), axis=0))
        inv = 1.0 / tl.where(cmax > 0, cmax, 1.0)

        # Pass 2: scaled copy into the workspace; dot products of the first reflection.
        s = tl.zeros([R_PAD], dtype=tl.float32)
        a_row = tl.zeros([R_PAD], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            rows = start + offs
            m = (rows < n)[:, None] & col_ok[None, :]
            x = tl.load(p_base + rows.to(tl.int64)[:, None] * stride_pn + cols[None, :] * stride_pr,
                        mask=m, other=0.0).to(tl.float32) * inv[None, :]
            tl.store(w_base + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wr, x, mask=m)
            x0 = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), axis=1)
            s += tl.sum(x0[:, None] * x, axis=0)
            a_row += tl.sum(tl.where(rows[:, None] == 0, x, 0.0), axis=0)

        # Factorization: pass k applies H_k to columns > k and accumulates what H_{k+1} needs.
        betas = tl.zeros([R_PAD], dtype=tl.float32)
        v0s = tl.zeros([R_PAD], dtype=tl.float32)
        signs = tl.full([R_PAD], 1.0, dtype=tl.float32)
        for k in range(0, r - 1):
            beta, v0, alpha, sign = _reflection(s, a_row, k, cols, TINY)
            betas = tl.where(cols == k, beta, betas)
            v0s = tl.where(cols == k, v0, v0s)
            signs = tl.where(cols == k, sign, signs)
            w = s - alpha * a_row  # v^T A[k:, j] = x^T A[k:, j] - alpha A[k, j]
            upd = (cols > k) & col_ok
            s = tl.zeros([R_PAD], dtype=tl.float32)
            a_row = tl.zeros([R_PAD], dtype=tl.float32)
            for start in range((k // BLOCK_N) * BLOCK_N, n, BLOCK_N):
                rows = start + offs
                row_ok = rows < n
                ptrs = w_base + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wr
                tile = tl.load(ptrs, mask=row_ok[:, None] & (cols >= k)[None, :] & col_ok[None, :], other=0.0)
                tile = _apply_reflection(tile, rows, cols, k, v0, beta, w)
                tl.store(ptrs, tile, mask=row_ok[:, None] & upd[None, :])
                x1 = tl.where(rows >= k + 1, tl.sum(tl.where(cols[None, :] == k + 1, tile, 0.0), axis=1), 0.0)
                s += tl.sum(x1[:, None] * tile, axis=0)
                a_row += tl.sum(tl.where(rows[:, None] == k + 1, tile, 0.0), axis=0)
        beta, v0, alpha, sign = _reflection(s, a_row, r - 1, cols, TINY)
        betas = tl.where(cols == r - 1, beta, betas)
        v0s = tl.where(cols == r - 1, v0, v0s)
        signs = tl.where(cols == r - 1, sign, signs)

        # Formation: Q = H_0 ... H_{r-1} [I; 0], backwards; pass k also accumulates v_{k-1}^T Q.
        wq = tl.zeros([R_PAD], dtype=tl.float32)  # v_k^T Q[:, j] for j > k (none for k = r-1)
        for kk in range(0, r):
            k = r - 1 - kk
            beta = tl.sum(tl.where(cols == k, betas, 0.0), axis=0)
            v0 = tl.sum(tl.where(cols == k, v0s, 0.0), axis=0)
            v0_prev = tl.sum(tl.where(cols == k - 1, v0s, 0.0), axis=0)
            wq_next = tl.zeros([R_PAD], dtype=tl.float32)
            last = tl.full([R_PAD], k, tl.int32) == 0  # the final pass writes Q (with signs) to P
            for start in range(0, n, BLOCK_N):
                rows = start + offs
                row_ok = rows < n
                wptrs = w_base + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wr
                tile = tl.load(wptrs, mask=row_ok[:, None] & (cols >= k - 1)[None, :] & col_ok[None, :],
                               other=0.0)
                v_prev = _column(tile, rows, cols, k - 1, v0_prev)
                new = _form_step(tile, rows, cols, k, v0, beta, wq)
                wq_next += tl.sum(tl.where((cols >= k)[None, :], v_prev[:, None] * new, 0.0), axis=0)
                keep = row_ok[:, None] & (cols >= k)[None, :] & col_ok[None, :]
                tl.store(wptrs, new, mask=keep & ~last[None, :])
                pptrs = p_base + rows.to(tl.int64)[:, None] * stride_pn + cols[None, :] * stride_pr
                tl.store(pptrs, (new * signs[None, :]).to(P_ptr.dtype.element_ty), mask=keep & last[None, :])
            wq = wq_next


def _block_n(n: int, r_pad: int) -> int:
    # 2048-element row chunks: no register spills at any r on sm_90 (ptxas -v on the AOT-compiled kernel:
    # 157-189 registers); 4096 spilled at r_pad >= 16.
    return max(16, min(triton.next_power_of_2(n), 2048 // r_pad))


# Matrices of up to this many (padded) elements are kept in registers. ptxas -v for sm_90 on the AOT-compiled
# resident kernel: 32 fp32 elements per thread fit in 254 registers without spills (8192 elements, 8 warps);
# 16384 elements spill at 8 or 16 warps, so larger matrices take the streaming kernel.
RESIDENT_ELEMENTS = 8192


def _launch_triton(P3: torch.Tensor) -> None:
    B, n, r = P3.shape
    r_pad = max(2, triton.next_power_of_2(r))
    n_pad = max(16, triton.next_power_of_2(n))
    if n_pad * r_pad <= RESIDENT_ELEMENTS:
        _orthogonalize_resident_kernel[(B,)](
            P3, n, r, *P3.stride(), TINY=_tiny(torch.float32), R_PAD=r_pad, BLOCK_N=n_pad,
            num_warps=max(4, min(8, n_pad * r_pad // 1024)))
        return
    W = P3 if P3.dtype == torch.float32 else torch.empty((B, n, r), dtype=torch.float32, device=P3.device)
    _orthogonalize_kernel[(B,)](
        P3, W, n, r, *P3.stride(), *W.stride(),
        TINY=_tiny(torch.float32), R_PAD=r_pad, BLOCK_N=_block_n(n, r_pad), num_warps=4)


def _launch_cuda(P3: torch.Tensor) -> None:
    from .._cuda import dtype_code, ext, stream_of

    B, n, r = P3.shape
    W = P3 if P3.dtype == torch.float32 else torch.empty((B, n, r), dtype=torch.float32, device=P3.device)
    ext("orthogonalize").orthogonalize(
        P3.data_ptr(), W.data_ptr(), B, n, r, *P3.stride(), *W.stride(), dtype_code(P3), stream_of(P3))


_launch_cuda_emu = emulated(_launch_cuda, writable=("P3",))  # the CUDA kernel on CPU tensors, checked


# ----------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------
def orthogonalize(P: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Overwrite ``P`` (``(n, r)`` or ``(batch, n, r)``, ``n >= r``) with orthonormal columns spanning
    the same space: the ``Q`` of its Householder QR with ``diag(R) >= 0``. Returns ``P``.

    One kernel launch for the whole batch; fp32 accumulation for fp16/bf16. ``backend``: ``"auto"``,
    ``"triton"``, ``"cuda"``, ``"torch"`` or ``"cuda_emu"``. The kernels take float32/float16/bfloat16 and ``r <= 64``;
    under ``"auto"`` float64 or a larger ``r`` use the reference. Not differentiable (PowerSGD calls it
    on communication buffers). ``"cuda_emu"`` runs the CUDA kernel on CPU tensors in the emulator
    (``dalle_kernels._C_emu``; for testing).
    """
    check_input(P)
    resolved = resolve_backend(backend, P, cuda_op="orthogonalize", triton_dot=False)
    if resolved != "torch":
        r = P.shape[-1]
        if backend == "auto" and (P.dtype not in KERNEL_DTYPES or r > MAX_KERNEL_RANK):
            resolved = "torch"
        elif P.dtype not in KERNEL_DTYPES:
            raise TypeError(f"backend={backend!r} takes P of dtype float32, float16 or bfloat16, got {P.dtype}; "
                            "use backend='torch' for float64")
        elif r > MAX_KERNEL_RANK:
            raise ValueError(f"backend={backend!r} takes at most r={MAX_KERNEL_RANK} columns, got r={r}; "
                             "use backend='torch'")
    with torch.no_grad():
        P3 = P.unsqueeze(0) if P.dim() == 2 else P
        if P3.shape[0] == 0:
            return P
        if resolved == "torch":
            P3.copy_(orthogonalize_ref(P3))
        elif resolved == "triton":
            _launch_triton(P3)
        elif resolved == "cuda_emu":
            _launch_cuda_emu(P3)
        else:
            _launch_cuda(P3)
    return P


def orthogonalize_list(tensors, backend: str = "auto") -> list:
    """``orthogonalize`` every matrix in a list of mixed shapes, one launch per distinct ``(n, r, dtype,
    device)``: equal-shape matrices are stacked, orthogonalized as one batch and copied back in place.
    Returns the list."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    groups: "OrderedDict[tuple, list[int]]" = OrderedDict()
    for i, t in enumerate(tensors):
        check_input(t, f"tensors[{i}]")
        if t.dim() != 2:
            raise ValueError(f"tensors[{i}] must be one (n, r) matrix, got shape {tuple(t.shape)}")
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            orthogonalize(tensors[idx[0]], backend)
            continue
        batch = torch.stack([tensors[i].detach() for i in idx])
        orthogonalize(batch, backend)
        with torch.no_grad():
            for j, i in enumerate(idx):
                tensors[i].copy_(batch[j])
    return tensors
