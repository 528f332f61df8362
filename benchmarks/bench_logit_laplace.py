"""logit_laplace_loss: fused Triton and CUDA against eager PyTorch and torch.compile of the same expression.

GPU (``pytest benchmarks/bench_logit_laplace.py --device=cuda``): bf16 params, uint8 target, the paper's dVAE batch
per GPU (8 x 6 x 256 x 256) and 32 x 6 x 256 x 256; forward and forward+backward. ``copy`` is a device copy of
params (read + write), the bandwidth yardstick. extra_info: ``gbps`` = bytes that must move (params and target read
once, the gradient written once) / median time (absent under ``--benchmark-disable``; with bf16 params the fused
kernels' backward reads params and target a second time, recomputing the gradient so that a loss scale applies
before it is rounded to bf16, so their fwd_bwd figure counts less than they move); ``peak_mem_mb`` = peak
memory above the inputs (GPU); ``loss_rel_err`` / ``grad_max_err`` = relative error of the loss / max abs error of
the gradient against ``logit_laplace_loss_ref`` in float64 on the same inputs.
CPU (default): eager PyTorch only at 2 x 6 x 64 x 64 (the Triton interpreter is not a speed figure).
"""
import pytest
import torch

from dalle_kernels import logit_laplace_loss, logit_laplace_loss_ref
from dalle_kernels._bench import max_abs_error, median_seconds, peak_memory_mb, sync

SIZES = {"cuda": {"paper": (8, 256, 256), "large": (32, 256, 256)}, "cpu": {"paper": (2, 64, 64)}}
PROVIDERS = ("copy", "torch", "compile", "triton", "cuda")

_compiled = {}


def make_fn(provider):
    if provider == "torch":
        return logit_laplace_loss_ref
    if provider == "compile":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(logit_laplace_loss_ref, dynamic=False)
        return _compiled["fn"]
    return lambda p, t: logit_laplace_loss(p, t, backend=provider, check_range=False)


def errors(fn, params, target, mode):
    """Relative error of the loss (and, for fwd_bwd, max abs error of the gradient) against float64."""
    p64 = params.detach().double().requires_grad_(mode == "fwd_bwd")
    ref = logit_laplace_loss_ref(p64, target)
    loss = fn(params, target)
    out = {"loss_rel_err": abs(loss.item() - ref.item()) / abs(ref.item())}
    if mode == "fwd_bwd":
        (grad,) = torch.autograd.grad(loss, params)
        (ref_grad,) = torch.autograd.grad(ref, p64)
        out["grad_max_err"] = max_abs_error(grad, ref_grad)
    return out


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", ["paper", "large"])
def test_logit_laplace(benchmark, record_env, bench_device, size, provider, mode):
    dev = bench_device
    if size not in SIZES[dev]:
        pytest.skip(f"size {size!r} is GPU only")
    if dev == "cpu" and provider != "torch":
        pytest.skip("CPU: eager PyTorch only")
    if provider == "copy" and mode == "fwd_bwd":
        pytest.skip("copy has one mode")
    B, H, W = SIZES[dev][size]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    params = torch.cat([torch.randn(B, 3, H, W, generator=gen), torch.rand(B, 3, H, W, generator=gen) * 4 - 2], 1)
    params = params.to(dev, dtype).requires_grad_(mode == "fwd_bwd")
    target = torch.randint(0, 256, (B, 3, H, W), generator=gen, dtype=torch.uint8).to(dev)

    if provider == "copy":
        src = params.detach()
        dst = torch.empty_like(src)

        def step():
            dst.copy_(src)
            sync(dev)
        moved = 2 * src.numel() * src.element_size()
    else:
        fn = make_fn(provider)

        def step():
            loss = fn(params, target)
            if mode == "fwd_bwd":
                loss.backward()
                params.grad = None
            sync(dev)
        moved = params.numel() * params.element_size() * (2 if mode == "fwd_bwd" else 1) + target.numel()

    step()  # warm-up (compiles)
    peak = peak_memory_mb(step, dev)
    if peak is not None:
        record_env["peak_mem_mb"] = peak
    if provider != "copy":
        record_env.update(errors(fn, params, target, mode))
    benchmark(step)
    record_env.update(shape=(B, 6, H, W), dtype=str(dtype), target_dtype="uint8", provider=provider, mode=mode,
                      bytes_moved=moved)
    median = median_seconds(benchmark)
    if median:
        record_env["gbps"] = moved / median / 1e9
