"""logit_laplace_loss: fused Triton and CUDA against eager PyTorch and torch.compile of the same expression.

GPU (``pytest benchmarks/bench_logit_laplace.py --device=cuda``): bf16 params, uint8 target, the paper's dVAE batch
per GPU (8 x 6 x 256 x 256) and 32 x 6 x 256 x 256; forward and forward+backward. ``copy`` is a device copy of
params (read + write), the bandwidth yardstick. extra_info: ``gbps`` = bytes that must move (params and target read
once, the gradient written once) / median time; ``peak_mem_mb`` = peak memory above the inputs.
CPU (default): eager PyTorch only at 2 x 6 x 64 x 64 (the Triton interpreter is not a speed figure).
"""
import pytest
import torch

from dalle_kernels import logit_laplace_loss, logit_laplace_loss_ref

from conftest import sync

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
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        record_env["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark(step)
    record_env.update(shape=(B, 6, H, W), dtype=str(dtype), target_dtype="uint8", provider=provider, mode=mode,
                      bytes_moved=moved)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        record_env["gbps"] = moved / stats.stats.median / 1e9
