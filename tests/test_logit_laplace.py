"""logit_laplace_loss: every backend against the float64 reference, values and gradients, edge inputs, errors.

CPU lane: torch and Triton (interpreter) backends at small shapes, fp32/fp16.
GPU lane (--device=cuda): also the CUDA backend, bigger shapes and bf16.
"""
import math

import pytest
import torch

import dalle_kernels
from dalle_kernels import _dispatch, logit_laplace_loss, logit_laplace_loss_ref, map_pixels, unmap_pixels
from dalle_kernels._bench import peak_memory_mb

REDUCTIONS = ("mean", "sum", "none")
# (loss rtol, loss atol, grad rtol, grad atol relative to the largest |gradient|)
TOL = {torch.float32: (2e-5, 2e-5, 2e-5, 1e-6), torch.float16: (2e-5, 2e-5, 1e-3, 1e-4),
       torch.bfloat16: (2e-5, 2e-5, 8e-3, 1e-3)}


def lane_backends(device):
    # cuda_emu: the CUDA kernels on the CPU, where the emulation extension is built (tests/test_cuda_emu.py).
    emu = ("cuda_emu",) if _dispatch.emu_extension_has("logit_laplace_forward") else ()
    return ("torch", "triton", "cuda") + emu if device == "cuda" else ("torch", "triton") + emu


def lane_dtypes(device):
    return (torch.float32, torch.float16, torch.bfloat16) if device == "cuda" else (torch.float32, torch.float16)


def lane_shapes(device):
    shapes = [(1, 5, 7), (2, 3, 11), (2, 16, 24)]  # odd sizes; the last fills several 1024-wide programs
    return shapes + [(3, 64, 64), (2, 33, 65)] if device == "cuda" else shapes


def make_inputs(shape, dtype, device, target_kind="float", seed=0):
    B, H, W = shape
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, 3, H, W, generator=g) * 1.5
    ln_b = torch.rand(B, 3, H, W, generator=g) * 6 - 3
    params = torch.cat([mu, ln_b], 1).to(dtype).to(device)
    if target_kind == "uint8":
        target = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    else:
        target = torch.rand(B, 3, H, W, generator=g)
        target[..., 0, 0] = 0.0  # exact extremes in every image
        target[..., -1, -1] = 1.0
    return params, target.to(device)


def ref64(params, target, reduction, grad_out=None, eps=0.1):
    """float64 loss and d loss / d params (autograd of the reference) on the same rounded inputs."""
    p64 = params.detach().double().requires_grad_()
    t64 = target if target.dtype == torch.uint8 else target.double()
    loss = logit_laplace_loss_ref(p64, t64, reduction, eps)
    go = torch.ones_like(loss) if grad_out is None else grad_out.double()
    (grad,) = torch.autograd.grad(loss, p64, go)
    return loss.detach(), grad


def run(params, target, reduction, backend, grad_out=None, eps=0.1):
    p = params.detach().clone().requires_grad_()
    loss = logit_laplace_loss(p, target, reduction, eps=eps, backend=backend)
    go = torch.ones_like(loss) if grad_out is None else grad_out
    loss.backward(go)
    return loss.detach(), p.grad


def assert_close(actual, expected, rtol, atol, what):
    expected = expected.to(actual.dtype) if actual.dtype != expected.dtype else expected
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=False, msg=lambda m: f"{what}: {m}")


def fp32_error_bound(params, target, eps=0.1):
    """Per-value bound on the error of evaluating the loss in float32 (an error model, not the formula)."""
    p = params.detach().double().cpu()
    mu, ln_b = p[:, :3], p[:, 3:]
    t = target.detach().cpu()
    y = map_pixels(t if t.dtype == torch.uint8 else t.double(), eps).double()
    size = (torch.log(y) - torch.log1p(-y)).abs() + mu.abs()
    return 8 * 2.0**-24 * (size * torch.exp(-ln_b) + ln_b.abs() + 4)


def assert_within(actual, expected, bound, what):
    """|actual - expected| <= bound elementwise (inf must match inf); reports the worst index."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(e)
    same_inf = torch.isinf(a) & (a == e)
    err = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    bad = ~(err <= bound)
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err)).nan_to_num(float("inf"))
        idx = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), e.shape)) if e.dim() else ()
        raise AssertionError(f"{what}: {int(bad.sum())} values off; worst at {idx}: got {a[idx].item()}, "
                             f"expected {e[idx].item()}, allowed error {bound[idx].item()}")


def test_reference_matches_laplace_density():
    """The reference is the change of variables of a Laplace density in logit space (independent check)."""
    params, target = make_inputs((2, 5, 7), torch.float64, "cpu")
    mu, ln_b = params.split(3, 1)
    y = map_pixels(target.double())
    logit = torch.log(y) - torch.log1p(-y)
    laplace = torch.distributions.Laplace(mu, torch.exp(ln_b))
    expected = -laplace.log_prob(logit) + torch.log(y) + torch.log1p(-y)
    torch.testing.assert_close(logit_laplace_loss_ref(params, target, "none"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logit_laplace_loss_ref(params, target, "sum"), expected.sum())
    torch.testing.assert_close(logit_laplace_loss_ref(params, target, "mean"), expected.mean())


def test_map_unmap_pixels():
    x = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(map_pixels(x), torch.tensor([0.1, 0.3, 0.9]))
    torch.testing.assert_close(map_pixels(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    torch.testing.assert_close(unmap_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))  # clamped
    with pytest.raises(TypeError, match="x must be"):
        map_pixels(torch.tensor([1, 2], dtype=torch.int32))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_kind", ["float", "uint8"])
def test_against_float64(device, reduction, target_kind):
    for backend in lane_backends(device):
        for dtype in lane_dtypes(device):
            for i, shape in enumerate(lane_shapes(device)):
                params, target = make_inputs(shape, dtype, device, target_kind, seed=i)
                g = torch.Generator().manual_seed(100 + i)
                grad_out = None
                if reduction == "none":
                    grad_out = torch.randn(shape[0], 3, *shape[1:], generator=g).to(device)
                else:
                    grad_out = torch.tensor(0.75).to(device)  # not 1: exercises the in-place scale
                loss, grad = run(params, target, reduction, backend, grad_out)
                ref_loss, ref_grad = ref64(params, target, reduction, grad_out)
                rtol, atol, grtol, gatol = TOL[dtype]
                what = f"{backend} {dtype} {shape} {reduction} {target_kind}"
                assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape, what
                assert grad.dtype == dtype and grad.shape == params.shape, what
                scale = 1.0 if reduction == "none" else math.sqrt(params.numel())
                assert_close(loss, ref_loss, rtol, atol * scale, f"loss {what}")
                assert_close(grad, ref_grad, grtol, gatol * float(ref_grad.abs().max()), f"grad {what}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 grads at e**20
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_edge_inputs(device, reduction):
    """ln b at +-20, pixels exactly 0, 1 and 1/2, mu far away and exactly at the kink (subgradient 0)."""
    mus = [-1e4, -3.0, 0.0, 2.2, 1e4]
    ln_bs = [-20.0, 0.0, 20.0]
    xs = [0.0, 0.5, 1.0]
    cases = [(m, b, x) for m in mus for b in ln_bs for x in xs]
    n = len(cases)  # 45 values, as a 1 x 3 x 3 x 5 grid
    mu = torch.tensor([c[0] for c in cases]).view(1, 3, 3, 5)
    ln_b = torch.tensor([c[1] for c in cases]).view(1, 3, 3, 5)
    target = torch.tensor([c[2] for c in cases]).view(1, 3, 3, 5).to(device)
    assert n == 45
    for backend in lane_backends(device):
        for dtype in lane_dtypes(device):
            params = torch.cat([mu, ln_b], 1).to(dtype).to(device)
            grad_out = torch.ones(1, 3, 3, 5, device=device) if reduction == "none" else None
            loss, grad = run(params, target, reduction, backend, grad_out)
            ref_loss, ref_grad = ref64(params, target, reduction, grad_out)
            what = f"{backend} {dtype} {reduction}"
            assert torch.isfinite(loss).all(), what
            # fp32 evaluation error: logit(y) - mu loses ~2**-24 (|logit| + |mu|), times exp(-ln b) up to e**20.
            bound = fp32_error_bound(params, target)
            n_values = bound.numel()
            loss_bound = {"none": bound, "sum": bound.sum(), "mean": bound.sum() / n_values}[reduction]
            assert_within(loss, ref_loss, loss_bound, f"loss {what}")
            if dtype == torch.float32:
                assert torch.isfinite(grad).all(), what
            # Low-precision grads equal the float64 gradient rounded to their dtype: inf exactly where
            # exp(20) / N exceeds the format (fp16), never nan.
            assert not torch.isnan(grad).any(), what
            g_scale = 1.0 / n_values if reduction == "mean" else 1.0
            rounding = TOL[dtype][2] * ref_grad.abs()
            g_bound = torch.cat([torch.zeros_like(bound), bound], 1) * g_scale + rounding
            assert_within(grad, ref_grad.to(dtype), g_bound, f"grad {what}")
            kink = (mu == 0.0) & (target.cpu() == 0.5)  # y = 1/2, logit(y) = 0 = mu exactly
            assert (grad[:, :3].cpu()[kink] == 0).all(), f"subgradient at the kink {what}"


def test_deterministic(device):
    params, target = make_inputs((2, 16, 24) if device == "cpu" else (8, 256, 256), torch.float32, device)
    for backend in lane_backends(device)[1:]:
        for reduction in ("mean", "sum"):
            a_loss, a_grad = run(params, target, reduction, backend)
            b_loss, b_grad = run(params, target, reduction, backend)
            assert torch.equal(a_loss, b_loss) and torch.equal(a_grad, b_grad), f"{backend} {reduction}"


def test_strided_and_channels_last(device):
    B, H, W = 2, 5, 6
    params, target = make_inputs((B, H, W), torch.float32, device)
    ref_loss, ref_grad = ref64(params, target, "sum")
    layouts = {
        "channels_last": (params.to(memory_format=torch.channels_last),
                          target.to(memory_format=torch.channels_last)),
        "sliced": (torch.cat([params, params[:, :1]], 1)[:, :6], target.transpose(2, 3).contiguous().transpose(2, 3)),
        "misaligned": (torch.cat([torch.zeros(1, device=device), params.flatten()])[1:].view_as(params), target),
    }
    for backend in lane_backends(device):
        for name, (p, t) in layouts.items():
            loss, grad = run(p, t, "sum", backend)
            assert_close(loss, ref_loss, 2e-5, 1e-4, f"{backend} {name}")
            assert_close(grad, ref_grad, 2e-5, 1e-6 * float(ref_grad.abs().max()), f"{backend} {name} grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_twice_and_double_backward(backend):
    params, target = make_inputs((1, 5, 7), torch.float32, "cpu")
    p = params.clone().requires_grad_()
    loss = logit_laplace_loss(p, target, backend=backend)
    loss.backward(retain_graph=True)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.backward()
        loss = logit_laplace_loss(p, target, reduction="none", backend=backend).sum()
        (g,) = torch.autograd.grad(loss, p, create_graph=True)
        with pytest.raises(RuntimeError):
            g.sum().backward()


def test_no_grad_and_float64(device, monkeypatch):
    from dalle_kernels.ops import logit_laplace as module

    params, target = make_inputs((1, 5, 7), torch.float32, device)
    seen = []
    forward = module._FORWARD["triton"]
    monkeypatch.setitem(module._FORWARD, "triton", lambda *a: seen.append(a[-1]) or forward(*a))
    with torch.no_grad():  # no gradient written under no_grad, even for params that require grad
        loss = logit_laplace_loss(params.requires_grad_(), target, backend="triton")
    assert seen == [False]
    assert_close(loss, ref64(params, target, "mean")[0], 2e-5, 2e-5, "no_grad")
    p64 = params.double().requires_grad_()
    out = logit_laplace_loss(p64, target)  # auto -> the reference for float64
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="params must be float32, float16 or bfloat16"):
        logit_laplace_loss(p64, target, backend="triton")


def test_bad_arguments():
    params, target = make_inputs((1, 5, 7), torch.float32, "cpu")
    cases = [
        (ValueError, "params must have shape", dict(params=params[:, :5])),
        (ValueError, "params must have shape", dict(params=params[0])),
        (ValueError, "target must have shape", dict(target=target[:, :2])),
        (ValueError, "does not match params shape", dict(target=target[..., :6])),
        (ValueError, r"target must hold pixels in \[0, 1\]", dict(target=target * 2)),
        (ValueError, r"target must hold pixels in \[0, 1\]", dict(target=target - 0.5)),
        (ValueError, r"target must hold pixels in \[0, 1\]", dict(target=torch.full_like(target, float("nan")))),
        (TypeError, "target must be floating point", dict(target=target.to(torch.int32))),
        (TypeError, "params must be float32", dict(params=params.to(torch.int64))),
        (TypeError, "params must be a torch.Tensor", dict(params=params.numpy())),
        (ValueError, "reduction must be one of", dict(reduction="avg")),
        (ValueError, r"eps must be a float in \(0, 0.5\)", dict(eps=0.5)),
        (ValueError, r"eps must be a float in \(0, 0.5\)", dict(eps=0.0)),
        (ValueError, "backend must be one of", dict(backend="numpy")),
        (ValueError, "backend='cuda' got tensors on cpu", dict(backend="cuda")),
    ]
    for exc, match, kw in cases:
        args = dict(params=params, target=target, reduction="mean", eps=0.1, backend="torch") | kw
        with pytest.raises(exc, match=match):
            logit_laplace_loss(**args)


def test_cuda_backend_without_extension(monkeypatch):
    """backend='cuda' with the extension missing: the build instructions, not an ImportError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_dispatch, "_load_cuda_extension", lambda: (None, ImportError("No module named _C")))
    with FakeTensorMode():  # tensors that say device='cuda' without a GPU
        params = torch.empty(1, 6, 5, 7, device="cuda")
        target = torch.empty(1, 3, 5, 7, device="cuda")
        with pytest.raises(RuntimeError, match=r"DALLE_KERNELS_CUDA=1 pip install --no-build-isolation -e \."):
            logit_laplace_loss(params, target, backend="cuda", check_range=False)


def test_public_names():
    for name in ("logit_laplace_loss", "logit_laplace_loss_ref", "map_pixels", "unmap_pixels"):
        assert name in dalle_kernels.__all__ and hasattr(dalle_kernels, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the fused and the recomputing backward
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_traces_without_graph_break(device, reduction, dtype):
    """fullgraph=True: the kernels are custom ops that torch.compile traces, gradients included."""
    backend = "cuda" if device == "cuda" else "triton"
    params, target = make_inputs((2, 5, 7), dtype, device, "uint8")

    def f(p, t):
        return logit_laplace_loss(p, t, reduction, backend=backend).sum() * 0.5

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    p = params.clone().requires_grad_()
    out = compiled(p, target)
    out.backward()
    ref_loss, ref_grad = ref64(params, target, reduction, None)
    _, _, grtol, gatol = TOL[dtype]
    what = f"compiled {reduction} {dtype}"
    assert_close(out, ref_loss.sum() * 0.5, 2e-5, 1e-4, what)
    assert_close(p.grad, ref_grad * 0.5, grtol, gatol * float(ref_grad.abs().max()), f"grad {what}")


# GradScaler's scales run from 2**16 (its default start) up to 2**24; times a loss weight, grad_output is any number.
LOSS_SCALES = (1.0, 2.0**16, 2.0**24, 0.3 * 2.0**16)


def make_wide_inputs(shape, dtype, device, seed=0):
    """mu ~ 2 N(0, 1), ln b uniform in [-12, 12]: exp(-ln b) from 6e-6 to 1.6e5, past float16's range both ways."""
    B, H, W = shape
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, 3, H, W, generator=g) * 2
    ln_b = torch.rand(B, 3, H, W, generator=g) * 24 - 12
    target = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    return torch.cat([mu, ln_b], 1).to(dtype).to(device), target.to(device)


def assert_rounded_once(grad, ref, params, target, go, unit, what):
    """``grad`` is the float64 gradient ``ref`` rounded once to ``grad.dtype``, up to the fp32 evaluation error.

    That is what the torch backend gives (fp32 autograd, one cast): no value flushed to 0 or to inf that rounding
    ``ref`` keeps, none finite that it makes inf, and |grad - ref| <= unit |ref| + 2 fp32 error + half the
    smallest subnormal. ``go``: |d loss / d nll| per value (loss scale, times 1/n for mean).
    """
    info = torch.finfo(grad.dtype)
    g, e = grad.detach().double().cpu(), ref.double().cpu()
    rounded = e.to(grad.dtype).double()
    zeros = (g == 0) & (rounded != 0)
    assert not zeros.any(), f"{what}: {int(zeros.sum())} values are 0 where the float64 gradient rounds to nonzero"
    near_max = (e.abs() / info.max - 1).abs() < 1e-3  # fp32 noise may decide overflow right at the edge
    wrong_inf = (torch.isinf(g) != torch.isinf(rounded)) & ~near_max
    assert not wrong_inf.any(), f"{what}: {int(wrong_inf.sum())} values differ from float64 in being inf"
    assert (torch.sign(g) == torch.sign(rounded))[torch.isinf(g)].all(), f"{what}: inf of the wrong sign"
    fp32 = torch.cat([2.0**-20 * e[:, :3].abs(), fp32_error_bound(params, target) * torch.as_tensor(go).cpu()], 1)
    bound = unit * e.abs() + 2 * fp32 + info.smallest_normal * info.eps / 2
    finite = torch.isfinite(g) & torch.isfinite(rounded)
    assert_within(g[finite], e[finite], bound[finite], what)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 inf, as torch gives
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_scale", LOSS_SCALES)
def test_loss_scaled_gradients_round_once(device, reduction, loss_scale, dtype):
    """``scaler.scale(loss).backward()``: any loss scale, n and dtype give the float64 gradient rounded once.

    A gradient stored in float16 during the forward as ``g / n`` (n = 1638 here) was subnormal or 0 before the
    backward applied the scale; stored unscaled, ``exp(-ln b)`` overflows float16 for ln b < -11.1; stored in
    bfloat16 and scaled by a loss weight, it is rounded twice.
    """
    shapes = [(2, 13, 21)] + ([(16, 128, 128)] if device == "cuda" else [])  # the second: n ~ 8e5
    for i, shape in enumerate(shapes):
        B, H, W = shape
        n = B * 3 * H * W
        g = torch.Generator().manual_seed(200 + i)
        if reduction == "none":  # e.g. scaler.scale(loss.mean()) after a per-value weight
            grad_out = loss_scale / n * (0.5 + torch.rand(B, 3, H, W, generator=g, dtype=torch.float64))
            go = grad_out
        else:
            grad_out = torch.tensor(loss_scale, dtype=torch.float64)
            go = loss_scale / n if reduction == "mean" else loss_scale
        params, target = make_wide_inputs(shape, dtype, device, seed=i)
        _, ref = ref64(params, target, reduction, grad_out)
        for backend in lane_backends(device):
            _, grad = run(params, target, reduction, backend, grad_out.float().to(device))
            unit = torch.finfo(dtype).eps / 2  # round to nearest
            if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
                unit *= 2  # the Triton interpreter converts float32 to bfloat16 by truncation
            assert_rounded_once(grad, ref, params, target, go, unit,
                                f"{backend} {dtype} {shape} {reduction} loss scale {loss_scale}")


def test_which_gradients_are_fused(monkeypatch):
    """Only float32 mean/sum write the gradient during the forward; 16-bit params save params and target
    (references) and the backward recomputes, so a second backward through the same graph works for them."""
    from dalle_kernels.ops import logit_laplace as module

    assert [module.fuses_gradient(r, torch.float32) for r in REDUCTIONS] == [True, True, False]
    for dtype in (torch.float16, torch.bfloat16):
        assert not any(module.fuses_gradient(r, dtype) for r in REDUCTIONS)
    seen = []
    forward = module._FORWARD["triton"]
    monkeypatch.setitem(module._FORWARD, "triton", lambda *a: seen.append((a[0].dtype, a[-1])) or forward(*a))
    for dtype in (torch.float32, torch.float16):
        params, target = make_inputs((1, 5, 7), dtype, "cpu")
        p = params.requires_grad_()
        loss = logit_laplace_loss(p, target, "sum", backend="triton")
        if dtype == torch.float16:
            assert [t.data_ptr() for t in loss.grad_fn.saved_tensors] == [p.data_ptr(), target.data_ptr()]
            (first,) = torch.autograd.grad(loss, p, retain_graph=True)
            (second,) = torch.autograd.grad(loss, p)
            assert torch.equal(first, second)
    assert seen == [(torch.float32, True), (torch.float16, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_peak_memory_is_the_gradient(cuda_only, backend):
    """Forward + backward allocate the gradient and nothing else full-size (it becomes params.grad)."""
    params, target = make_inputs((8, 256, 256), torch.bfloat16, "cuda", "uint8")
    params.requires_grad_()
    extra = peak_memory_mb(lambda: logit_laplace_loss(params, target, backend=backend).backward(), "cuda") * 2**20
    grad_bytes = params.numel() * params.element_size()
    assert extra <= grad_bytes + 2**20, f"peak extra {extra} bytes, gradient {grad_bytes}"
