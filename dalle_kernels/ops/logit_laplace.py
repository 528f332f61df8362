"""Logit-Laplace negative log-likelihood of the dVAE (paper appendix A.3): reference, kernels, autograd Function.

Per value, with ``y = (1 - 2 eps) x + eps`` the mapped pixel, ``mu`` and ``ln_b`` the decoder's channels 0-2 and 3-5:

    nll = |logit(y) - mu| * exp(-ln_b) + ln_b + ln(y) + ln(1 - y) + ln(2)
    d nll / d mu   = -sign(logit(y) - mu) * exp(-ln_b)      (sign(0) = 0: the subgradient 0 at the kink)
    d nll / d ln_b = 1 - |logit(y) - mu| * exp(-ln_b)

The loss is returned in float32 (float64 for float64 params on the torch backend), whatever the params dtype:
a sum over a 256 x 256 batch does not fit in float16. Gradients come back in the params dtype.

Numerics: the kernels compute in float32. exp(-ln_b) amplifies the rounding of logit(y) - mu, so the error of a
value is about 2**-24 (|logit(y)| + |mu|) exp(-ln_b) (the tests use this bound). Results are finite while
|logit(y) - mu| exp(-ln_b) fits in float32, e.g. for |ln_b| <= 20 and any |mu| <= 1e20; float16/bfloat16
gradients can round to inf where exp(-ln_b) exceeds their range (as an fp32-computed gradient cast would).

Gradients and loss scales: every gradient is formed in fp32 as ``g * grad_output`` (times ``1/n`` for the mean
over ``n = B*3*H*W`` values) and rounded to the params dtype once, as the torch backend does, so a loss scale of
any size multiplies a normal fp32 number (float16 results overflow to inf exactly where the torch backend's do).
float32 params, mean/sum: the forward writes ``g / n`` (fp32; normal unless ln_b > 87 - ln n) and the backward
scales it in place. float16 and bfloat16 params: nothing is stored in 16 bits before the scale (``g / n`` in
float16 is 0 for ``n`` ~ 1e6; ``g`` unscaled overflows float16 for ln_b < -11.1; bfloat16 would round twice);
the backward recomputes the gradient in one more pass over params and target. Costs per pixel, 16-bit params
(12 bytes) and uint8 target (3 bytes): held from forward to backward, references to params and target (no
allocation; a gradient written by the forward holds 12 bytes); peak, the 12-byte gradient; memory traffic 42
bytes (a gradient written by the forward: 27 with grad_output 1, 51 under a loss scale). Storing the gradient in
fp32 instead would hold 24 bytes and peak at 36.
"""
from __future__ import annotations

import functools
import math

import torch

from .._cuda_emu import emulated
from .._dispatch import resolve_backend

REDUCTIONS = ("mean", "sum", "none")
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)
LN2 = math.log(2.0)


def map_pixels(x: torch.Tensor, eps: float = 0.1, check_range: bool = True) -> torch.Tensor:
    """Pixels in [0, 1] (floating) or [0, 255] (uint8) to ``y = (1 - 2 eps) x + eps`` in ``[eps, 1 - eps]``.

    Takes the pixels ``logit_laplace_loss`` takes as its target and refuses the same ones: ``TypeError`` for
    another dtype, ``ValueError`` for floating pixels outside [0, 1] or NaN (one host sync;
    ``check_range=False`` skips it)."""
    _check_eps(eps)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif not x.is_floating_point():
        raise TypeError(f"x must be floating point in [0, 1] or uint8 in [0, 255], got {x.dtype}")
    elif check_range:
        _check_pixel_range(x, "x")
    return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(y: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Inverse of ``map_pixels``, clamped to [0, 1]. For display: ``unmap_pixels(torch.sigmoid(mu))``."""
    _check_eps(eps)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise TypeError(f"y must be a floating point torch.Tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    return torch.clamp((y - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def logit_laplace_loss_ref(params: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                           eps: float = 0.1) -> torch.Tensor:
    """The definition in plain PyTorch (differentiable in ``params``), computed in float32 or wider.

    ``params`` ``(B, 6, H, W)``, ``target`` ``(B, 3, H, W)``; returns a scalar (mean/sum) or ``(B, 3, H, W)``.
    """
    dtype = torch.promote_types(params.dtype, torch.float32)
    mu, ln_b = params.to(dtype).split(3, dim=1)
    x = target.to(dtype) / 255.0 if target.dtype == torch.uint8 else target.to(dtype)
    y = (1.0 - 2.0 * eps) * x + eps  # map_pixels, in the compute dtype
    log_y, log_1my = torch.log(y), torch.log1p(-y)
    dev = torch.abs((log_y - log_1my) - mu)
    # |d| * exp(-ln_b) with 0 where d == 0, so that d == 0 and a huge exp(-ln_b) give 0, not 0 * inf = nan.
    scaled = torch.where(dev == 0, torch.zeros_like(dev), dev * torch.exp(-ln_b))
    nll = scaled + ln_b + log_y + log_1my + LN2
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < float(eps) < 0.5):
        raise ValueError(f"eps must be a float in (0, 0.5), got {eps!r}")


def check_inputs(params, target, reduction, eps, check_range=True):
    """Validate arguments of ``logit_laplace_loss`` (raises ValueError / TypeError naming the argument)."""
    for name, t in (("params", params), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if params.dtype not in PARAM_DTYPES:
        raise TypeError(f"params must be float32, float16, bfloat16 or float64, got {params.dtype}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be floating point in [0, 1] or uint8 in [0, 255], got {target.dtype}")
    if params.dim() != 4 or params.shape[1] != 6:
        raise ValueError(f"params must have shape (B, 6, H, W) (mu in channels 0-2, ln b in 3-5), "
                         f"got {tuple(params.shape)}")
    if target.dim() != 4 or target.shape[1] != 3:
        raise ValueError(f"target must have shape (B, 3, H, W), got {tuple(target.shape)}")
    if (target.shape[0], target.shape[2], target.shape[3]) != (params.shape[0], params.shape[2], params.shape[3]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match params shape {tuple(params.shape)}: "
                         "expected (B, 3, H, W) for params (B, 6, H, W)")
    if target.device != params.device:
        raise ValueError(f"target is on {target.device} but params is on {params.device}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_eps(eps)
    if check_range and target.is_floating_point():
        _check_pixel_range(target, "target")


def _check_pixel_range(x, name):
    """Floating pixels must lie in [0, 1] (one host sync; skipped while compiling)."""
    if x.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if not (lo >= 0.0 and hi <= 1.0):  # also false for nan
            raise ValueError(f"{name} must hold pixels in [0, 1] (floating) or be uint8; got values in "
                             f"[{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. The module imports without triton (the torch backend still works).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _logit_laplace_terms(mu, ln_b, x, eps):
        """fp32 ``(nll, d/dmu, d/dln_b)`` of one value; ``x`` in [0, 1]. sign(0) = 0 at the kink."""
        y = x * (1.0 - 2.0 * eps) + eps
        log_y = tl.log(y)
        log_1my = tl.log(1.0 - y)
        d = (log_y - log_1my) - mu
        inv_b = tl.exp(-ln_b)
        ad = tl.abs(d)
        # where(): d == 0 with exp(-ln_b) = inf must give 0, not 0 * inf = nan.
        scaled = tl.where(ad == 0.0, 0.0, ad * inv_b)
        nll = scaled + ln_b + log_y + log_1my + 0.6931471805599453
        g_mu = tl.where(d > 0.0, -inv_b, tl.where(d < 0.0, inv_b, 0.0))
        g_lnb = 1.0 - scaled
        return nll, g_mu, g_lnb

    @triton.jit
    def _logit_laplace_kernel(
        P_ptr, X_ptr, Loss_ptr, Part_ptr, G_ptr, GO_ptr,
        CHW, HW, W,
        stride_pb, stride_pc, stride_ph, stride_pw,
        stride_xb, stride_xc, stride_xh, stride_xw,
        stride_gb, stride_gc, stride_gh, stride_gw,
        eps, grad_scale,
        X_IS_U8: tl.constexpr, CONTIG: tl.constexpr,
        WRITE_LOSS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, WRITE_GRAD: tl.constexpr,
        HAS_GO: tl.constexpr, GO_SCALAR: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One pass over ``BLOCK`` of the ``3*H*W`` values of image ``program_id(1)``.

        Reads mu, ln b and the target once; writes any of: the per-value loss (``WRITE_LOSS``), this program's
        partial sum (``WRITE_PARTIAL``, summed later in a fixed order: deterministic, no atomics), the gradient
        (``WRITE_GRAD``) times ``grad_scale`` and, with ``HAS_GO``, the grad_output (fp32): one value
        ``GO_ptr[0]`` with ``GO_SCALAR``, else per value ``GO_ptr[b, c, h, w]`` (contiguous). The product is formed
        in fp32 and rounded to the gradient's dtype once, so a loss scale multiplies a normal fp32 number.
        """
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < CHW
        if CONTIG:
            p_off = b * stride_pb + offs
            x_off = b * stride_xb + offs
            g_off = b * stride_gb + offs
        else:
            c = offs // HW
            hw = offs - c * HW
            h = hw // W
            w = hw - h * W
            p_off = b * stride_pb + c.to(tl.int64) * stride_pc + h.to(tl.int64) * stride_ph + w * stride_pw
            x_off = b * stride_xb + c.to(tl.int64) * stride_xc + h.to(tl.int64) * stride_xh + w * stride_xw
            g_off = b * stride_gb + c.to(tl.int64) * stride_gc + h.to(tl.int64) * stride_gh + w * stride_gw
        mu = tl.load(P_ptr + p_off, mask=mask, other=0.0).to(tl.float32)
        ln_b = tl.load(P_ptr + p_off + 3 * stride_pc, mask=mask, other=0.0).to(tl.float32)
        if X_IS_U8:
            x = tl.load(X_ptr + x_off, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
        else:
            x = tl.load(X_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        nll, g_mu, g_lnb = _logit_laplace_terms(mu, ln_b, x, eps)
        if WRITE_LOSS:
            tl.store(Loss_ptr + b * CHW + offs, nll, mask=mask)
        if WRITE_PARTIAL:
            tl.store(Part_ptr + b * tl.num_programs(0) + pid, tl.sum(tl.where(mask, nll, 0.0), axis=0))
        if WRITE_GRAD:
            if HAS_GO and GO_SCALAR:
                scale = tl.load(GO_ptr) * grad_scale
            elif HAS_GO:
                scale = tl.load(GO_ptr + b * CHW + offs, mask=mask, other=0.0) * grad_scale
            else:
                scale = grad_scale
            gty = G_ptr.dtype.element_ty
            tl.store(G_ptr + g_off, (g_mu * scale).to(gty), mask=mask)
            tl.store(G_ptr + g_off + 3 * stride_gc, (g_lnb * scale).to(gty), mask=mask)

    @triton.jit
    def _sum_partials_kernel(Part_ptr, Out_ptr, n, scale, BLOCK: tl.constexpr):
        """``Out[0] = scale * sum(Part[:n])`` in one program, in a fixed order (bit-identical run to run)."""
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(Part_ptr + offs, mask=offs < n, other=0.0)
        tl.store(Out_ptr, tl.sum(acc, axis=0) * scale)


def _block_size(chw: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(chw)))


def _launch_triton(params, target, *, eps, loss=None, partial=None, grad=None, grad_out=None,
                   grad_scale=1.0):
    B, _, H, W = params.shape
    chw = 3 * H * W
    block = _block_size(chw)
    grid = (triton.cdiv(chw, block), B)
    contig = params.is_contiguous() and target.is_contiguous() and (grad is None or grad.is_contiguous())
    g = grad if grad is not None else params  # unused pointer when WRITE_GRAD is off
    dummy = params
    _logit_laplace_kernel[grid](
        params, target, loss if loss is not None else dummy, partial if partial is not None else dummy, g,
        grad_out if grad_out is not None else dummy,
        chw, H * W, W,
        *params.stride(), *target.stride(), *g.stride(),
        float(eps), float(grad_scale),
        X_IS_U8=target.dtype == torch.uint8, CONTIG=contig,
        WRITE_LOSS=loss is not None, WRITE_PARTIAL=partial is not None, WRITE_GRAD=grad is not None,
        HAS_GO=grad_out is not None, GO_SCALAR=grad_out is not None and grad_out.dim() == 0,
        BLOCK=block, num_warps=4 if block >= 512 else 2,
    )
    return grid


def _mean_scale(reduction, params):
    """The factor d loss / d (sum of the per-value losses): ``1 / (B*3*H*W)`` for mean, else 1."""
    B, _, H, W = params.shape
    return 1.0 / (B * 3 * H * W) if reduction == "mean" else 1.0


def _triton_forward(params, target, reduction, eps, write_grad):
    """Forward; with ``write_grad`` (mean/sum, float32 params only) also the gradient for a grad_output of 1."""
    B, _, H, W = params.shape
    dev = params.device
    grad = torch.empty_like(params) if write_grad else None
    if reduction == "none":
        loss = torch.empty((B, 3, H, W), device=dev, dtype=torch.float32)
        _launch_triton(params, target, eps=eps, loss=loss)
        return loss, None
    nprog = triton.cdiv(3 * H * W, _block_size(3 * H * W))
    partial = torch.empty(B * nprog, device=dev, dtype=torch.float32)
    scale = _mean_scale(reduction, params)
    _launch_triton(params, target, eps=eps, partial=partial, grad=grad, grad_scale=scale)
    out = torch.empty((), device=dev, dtype=torch.float32)
    _sum_partials_kernel[(1,)](partial, out, partial.numel(), scale, BLOCK=1024)
    return out, grad


def _triton_backward(params, target, reduction, eps, grad_out):
    """The gradient recomputed in one pass, times ``grad_out`` (fp32, contiguous: ``(B, 3, H, W)`` for
    reduction 'none', one value for sum/mean, which also takes ``1/n``), rounded to the params dtype once."""
    grad = torch.empty_like(params)
    _launch_triton(params, target, eps=eps, grad=grad, grad_out=grad_out,
                   grad_scale=_mean_scale(reduction, params))
    return grad


# ----------------------------------------------------------------------------------------------------------------
# CUDA extension (csrc/logit_laplace.cu): contiguous inputs only (made contiguous here).
_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def _cuda_target(target):
    # The kernel reads fp32/fp16/bf16/uint8 targets; a float64 target (values in [0, 1]) goes in as fp32.
    if target.dtype == torch.float64:
        target = target.to(torch.float32)
    return target.contiguous()


def _cuda_forward(params, target, reduction, eps, write_grad):
    from .. import _cuda

    mod = _cuda.ext("logit_laplace_forward")
    params, target = params.contiguous(), _cuda_target(target)
    B, _, H, W = params.shape
    grad = torch.empty_like(params) if write_grad else None
    if reduction == "none":
        loss = torch.empty((B, 3, H, W), device=params.device, dtype=torch.float32)
    else:
        loss = torch.empty((), device=params.device, dtype=torch.float32)
    nblocks = mod.logit_laplace_partial_count(B, H, W)
    partial = torch.empty(max(nblocks, 1), device=params.device, dtype=torch.float32)
    mod.logit_laplace_forward(
        params.data_ptr(), target.data_ptr(), loss.data_ptr(), partial.data_ptr(),
        grad.data_ptr() if grad is not None else 0,
        B, H, W, _cuda.dtype_code(params), _cuda.dtype_code(target), float(eps), _REDUCTION_CODES[reduction],
        _cuda.stream_of(params))
    return loss, grad


def _cuda_backward(params, target, reduction, eps, grad_out):
    from .. import _cuda

    mod = _cuda.ext("logit_laplace_backward")
    params, target = params.contiguous(), _cuda_target(target)
    B, _, H, W = params.shape
    grad = torch.empty_like(params)
    mod.logit_laplace_backward(
        params.data_ptr(), target.data_ptr(), grad_out.data_ptr(), grad.data_ptr(),
        B, H, W, _cuda.dtype_code(params), _cuda.dtype_code(target), float(eps), _REDUCTION_CODES[reduction],
        _cuda.stream_of(params))
    return grad


def _on_params_device(fn):
    """Run ``fn`` with the params' GPU as the current device (launches go to the current device and stream)."""
    @functools.wraps(fn)
    def wrapper(params, *args):
        if params.device.type != "cuda":
            return fn(params, *args)
        with torch.cuda.device(params.device):
            return fn(params, *args)
    return wrapper


_FORWARD = {"triton": _on_params_device(_triton_forward), "cuda": _on_params_device(_cuda_forward),
            "cuda_emu": emulated(_cuda_forward)}
_BACKWARD = {"triton": _on_params_device(_triton_backward), "cuda": _on_params_device(_cuda_backward),
             "cuda_emu": emulated(_cuda_backward)}


def fuses_gradient(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the forward writes the gradient (mean/sum with float32 params) or the backward recomputes it.

    A gradient written during the forward is stored before the backward applies grad_output (a loss scale of
    up to 2**24, and for 16-bit params the 1/n of the mean). Only float32 holds every such value at full
    precision: in float16, ``g / n`` falls below the normal range (2**-14) for ``n`` ~ 1e4 and to 0 below
    2**-25, and no loss scale brings it back; storing ``g`` unscaled overflows float16 where
    ``exp(-ln b) > 65504`` and rounds twice in bfloat16. So 16-bit params keep references to params and
    target (no new memory) and the backward recomputes ``g * grad_output / n`` in fp32, rounding once, as the
    torch backend does.
    """
    return reduction != "none" and dtype == torch.float32


def _backward(backend, params, target, reduction, eps, grad_out):
    """The recomputing backward of both kernel backends: grad_output goes in as fp32, contiguous."""
    return _BACKWARD[backend](params, target, reduction, eps, grad_out.to(torch.float32).contiguous())


class LogitLaplaceLoss(torch.autograd.Function):
    """Fused forward (+ the gradient, for mean/sum of float32 params) and a one-pass backward.

    float32 mean/sum: forward writes d loss / d params for a grad_output of 1 and saves only that tensor (no
    reference to params or target is kept: peak extra memory is the gradient). Backward scales it in place by
    grad_output (skipped when grad_output is 1, which costs one host sync) and hands it over, so a second
    backward through the same graph (``retain_graph=True``) raises a clear error. Otherwise (reduction 'none',
    or float16/bfloat16 params, see ``fuses_gradient``): params and target are saved (references, no copy) and
    backward recomputes the gradient in one pass, times grad_output (and 1/n for mean) in fp32, rounded to the
    params dtype once. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, params, target, reduction, eps, backend, write_grad):
        # write_grad comes from the caller: inside forward grad mode is off, and needs_input_grad is True even
        # under torch.no_grad(), where writing a gradient would be wasted work and memory.
        loss, grad = _FORWARD[backend](params, target, reduction, eps, write_grad)
        ctx.reduction, ctx.eps, ctx.backend, ctx.fused = reduction, eps, backend, write_grad
        if write_grad:
            ctx.grad = grad
        else:
            ctx.save_for_backward(params, target)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if not ctx.fused:
            params, target = ctx.saved_tensors
            grad = _backward(ctx.backend, params, target, ctx.reduction, ctx.eps, grad_out)
            return grad, None, None, None, None, None
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "logit_laplace_loss: backward ran twice through the same graph (retain_graph=True); the fused "
                "gradient is handed over on the first backward. Compute the loss again for a second backward.")
        ctx.grad = None
        scale = float(grad_out)  # host sync; lets grad_output == 1 (the usual case) skip a full pass
        if scale != 1.0:
            grad.mul_(scale)  # float32 (fuses_gradient): g/n times any loss scale stays a normal number
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# The same kernels as torch.library custom ops, so torch.compile traces the loss without a graph break. Used only
# while compiling: a traced backward cannot skip the scale on grad_output == 1 (a host sync) or hand the saved
# gradient over in place, so mean/sum multiply out of place (which the compiler can fuse into the consumer).
@torch.library.custom_op("dalle_kernels::logit_laplace_forward", mutates_args=())
def _forward_op(params: torch.Tensor, target: torch.Tensor, reduction: str, eps: float, backend: str,
                write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _FORWARD[backend](params, target, reduction, eps, write_grad)
    return loss, grad if grad is not None else params.new_empty(0)


@_forward_op.register_fake
def _(params, target, reduction, eps, backend, write_grad):
    B, _, H, W = params.shape
    shape = (B, 3, H, W) if reduction == "none" else ()
    grad = torch.empty_like(params) if write_grad else params.new_empty(0)
    return params.new_empty(shape, dtype=torch.float32), grad


@torch.library.custom_op("dalle_kernels::logit_laplace_backward", mutates_args=())
def _backward_op(params: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor, reduction: str, eps: float,
                 backend: str) -> torch.Tensor:
    return _backward(backend, params, target, reduction, eps, grad_out)


@_backward_op.register_fake
def _(params, target, grad_out, reduction, eps, backend):
    return torch.empty_like(params)


def _op_setup_context(ctx, inputs, output):
    params, target, reduction, eps, backend, write_grad = inputs
    ctx.reduction, ctx.eps, ctx.backend, ctx.fused = reduction, eps, backend, write_grad
    ctx.save_for_backward(*((output[1],) if write_grad else (params, target)))


def _op_backward(ctx, grad_loss, _grad_of_grad):
    if ctx.fused:
        (fused,) = ctx.saved_tensors
        grad = fused * grad_loss  # float32 (fuses_gradient)
    else:
        params, target = ctx.saved_tensors
        grad = _backward_op(params, target, grad_loss, ctx.reduction, ctx.eps, ctx.backend)
    return grad, None, None, None, None, None


_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device) -> str:
    # The dispatch decision is a constant of the traced graph: torch.compile runs this once while tracing.
    return resolve_backend(backend, torch.empty(0, device=device), cuda_op="logit_laplace_forward", triton_dot=False)


def logit_laplace_loss(params: torch.Tensor, target: torch.Tensor, reduction: str = "mean", eps: float = 0.1,
                       backend: str = "auto", check_range: bool = True) -> torch.Tensor:
    """Logit-Laplace NLL of ``target`` pixels under the decoder output ``params`` (paper appendix A.3).

    ``params`` ``(B, 6, H, W)`` float32/float16/bfloat16 (float64: torch backend only), channels 0-2 ``mu``
    and 3-5 ``ln b``; ``target`` ``(B, 3, H, W)`` floating in [0, 1] or uint8 in [0, 255], mapped with
    ``eps`` inside the op. ``reduction``: ``"mean"`` over all ``B*3*H*W`` values, ``"sum"``, or ``"none"``
    (``(B, 3, H, W)``). The loss is float32 (float64 for float64 params). ``check_range=False`` skips the
    min/max check of a floating target (one host sync). The target gets no gradient.

    ``backend``: ``"auto"`` (CUDA extension if built, else Triton, for CUDA tensors; Triton interpreter or
    torch on CPU), ``"cuda"``, ``"triton"``, ``"torch"`` (autograd through the reference) or ``"cuda_emu"``
    (the CUDA kernels on CPU tensors in the emulator, ``dalle_kernels._C_emu``; for testing). The Triton
    kernel reads any strides (channels-last included); the CUDA backend makes non-contiguous inputs
    contiguous first (a copy). Under ``torch.compile`` the kernels are traced as custom ops (no graph break)
    and the target range check is skipped.

    Gradients come back in the params dtype, rounded once from fp32 whatever the loss scale
    (``scaler.scale(loss).backward()``). float32 mean/sum: the forward writes the gradient (extra memory: the
    gradient). float16/bfloat16 and reduction ``"none"``: the backward recomputes it from params and target,
    which the op keeps referenced until then (one more pass; no extra memory unless nothing else holds params).
    """
    check_inputs(params, target, reduction, eps, check_range)
    if backend == "auto" and params.dtype == torch.float64:
        backend = "torch"  # the fused kernels are float32/16/bf16; float64 is the reference's job
    backend = _resolve(backend, params.device) if torch.compiler.is_compiling() else \
        resolve_backend(backend, params, cuda_op="logit_laplace_forward", triton_dot=False)
    if backend == "torch":
        return logit_laplace_loss_ref(params, target.detach(), reduction, float(eps))
    if params.dtype not in KERNEL_DTYPES:
        raise TypeError(f"params must be float32, float16 or bfloat16 for backend={backend!r}, got {params.dtype}")
    if 3 * params.shape[2] * params.shape[3] >= 2**31 or params.shape[0] >= 65536:
        raise ValueError(f"params shape {tuple(params.shape)} too large: need 3*H*W < 2**31 and B < 65536")
    if params.numel() == 0:
        return logit_laplace_loss_ref(params, target.detach(), reduction, float(eps))
    write_grad = fuses_gradient(reduction, params.dtype) and params.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        return _forward_op(params, target.detach(), reduction, float(eps), backend, write_grad)[0]
    return LogitLaplaceLoss.apply(params, target.detach(), reduction, float(eps), backend, write_grad)
