"""sparse_attention (Triton and CUDA) against dense causal SDPA, SDPA with the same boolean mask, and FlexAttention.

GPU (``pytest benchmarks/bench_attention.py --device=cuda``): the paper shape, batch 8, 16 heads, T = 256,
32 x 32 grid, head_dim 64, bf16; forward and forward+backward. CPU (default): T = 256, 32 x 32 grid, batch 1,
4 heads, head_dim 64, fp32 (T = 16, 8 x 8, 2 heads of 32 under ``--benchmark-disable``); the Triton interpreter
is not a speed figure and is skipped.

Providers: ``triton`` (this package, GPU), ``cuda`` (this package's CUDA kernels, csrc/attention.cu, GPU; needs
the built extension: tensor-core forward for 16-bit inputs, fp32 CUDA-core backward), ``cpu`` (this package's CPU
path, CPU: the masks' structured path at the timed shape, one tile at the untimed one), ``torch`` (the
dense-masked reference), ``dense`` (``scaled_dot_product_attention(is_causal=True)``, the mask-free baseline the
targets are stated against), ``sdpa_mask`` (SDPA with the boolean ``dense_mask``), ``flex`` (``flex_attention``
with a block mask from the same predicate; compiled on GPU, eager on CPU).
extra_info: ``tflops`` = useful FLOPs (allowed pairs only: 4 * pairs * head_dim forward, 2.5x that backward) /
median time (absent under ``--benchmark-disable``); ``peak_mem_mb`` = peak memory above the inputs (GPU);
``max_err`` / ``grad_max_err`` = max abs error of the output / of dq, dk, dv against ``attention_ref`` in float64
on the same inputs (providers that compute the masked attention, i.e. not ``dense``); ``tiles`` /
``causal_tiles`` for the Triton or CUDA kernel's forward tiling; ``cpu_path`` (``structured`` or ``tiles``) for
``cpu``; ``sdpa_causal_ratio`` (``cpu`` and ``torch``, timed runs
only) = median time of the provider / median time of ``dense``, from ``RATIO_REPS`` runs of each alternated in
one process, so that the ratio holds under load that changes over the run.

Tile counts per mask at the paper shape (no GPU needed): ``python benchmarks/bench_attention.py``.
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from dalle_kernels import _dispatch, attention_ref, masks, sparse_attention
from dalle_kernels._bench import max_abs_error, median_seconds, peak_memory_mb, sync
from dalle_kernels.ops import attention as A
from dalle_kernels.ops import attention_cpu

SHAPES = {"cuda": dict(B=8, heads=16, T=256, grid=(32, 32), d=64, dtype=torch.bfloat16),
          "cpu": dict(B=1, heads=4, T=256, grid=(32, 32), d=64, dtype=torch.float32),
          # under --benchmark-disable (CI: each case runs once, for its errors) a small shape keeps the run short
          "cpu_untimed": dict(B=1, heads=2, T=16, grid=(8, 8), d=32, dtype=torch.float32)}
PROVIDERS = ("triton", "cuda", "cpu", "torch", "dense", "sdpa_mask", "flex")
RATIO_REPS = 10
MASKS = ("row", "column", "conv")
KERNEL = 11

_flex = {}


def flex_fn(mask, T, grid, device):
    """FlexAttention with a block mask built from the same predicate (``masks.allowed``)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    H, W = grid
    n = T + H * W

    def mask_mod(b, h, q_idx, kv_idx):
        return masks.allowed(mask, q_idx, kv_idx, T, H, W, KERNEL)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
    if device == "cuda":
        if "compiled" not in _flex:
            _flex["compiled"] = torch.compile(flex_attention, dynamic=False)
        fn = _flex["compiled"]
    else:
        fn = flex_attention
    return lambda q, k, v: fn(q, k, v, block_mask=block_mask)


def make_fn(provider, mask, T, grid, device):
    if provider in ("triton", "cuda"):
        return lambda q, k, v: sparse_attention(q, k, v, mask=mask, text_len=T, grid=grid, kernel=KERNEL,
                                                backend=provider)
    if provider in ("cpu", "torch"):
        return lambda q, k, v: sparse_attention(q, k, v, mask=mask, text_len=T, grid=grid, kernel=KERNEL,
                                                backend=provider)
    if provider == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if provider == "sdpa_mask":
        allow = masks.dense_mask(mask, T, grid, KERNEL, device=device)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allow)
    if provider == "flex":
        return flex_fn(mask, T, grid, device)
    raise ValueError(provider)


def errors(fn, q, k, v, do, mask, T, grid, mode):
    """Max abs error of the output (and, for fwd_bwd, of the input gradients) against the float64 reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_(mode == "fwd_bwd") for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, mask=mask, text_len=T, grid=grid, kernel=KERNEL, upcast=torch.float64)
    o = fn(q, k, v)
    out = {"max_err": max_abs_error(o, ref)}
    if mode == "fwd_bwd":
        grads = torch.autograd.grad(o, (q, k, v), do)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        out["grad_max_err"] = max(max_abs_error(g, r) for g, r in zip(grads, ref_grads))
    return out


def make_step(fn, q, k, v, do, mode, dev):
    def step():
        o = fn(q, k, v)
        if mode == "fwd_bwd":
            o.backward(do)
            q.grad = k.grad = v.grad = None
        sync(dev)

    return step


def interleaved_ratio(step, baseline, reps=RATIO_REPS) -> float:
    """Median time of ``step`` over median time of ``baseline``, the two run alternately ``reps`` times each."""
    times = ([], [])
    for _ in range(reps):
        for fn, out in ((step, times[0]), (baseline, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def useful_flops(mask, T, grid, B, heads, d, mode):
    pairs = int(masks.dense_mask(mask, T, grid, KERNEL).sum())
    fwd = 4 * pairs * d * B * heads
    return fwd if mode == "fwd" else fwd * 3.5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")  # eager on CPU
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mask", MASKS)
def test_attention(benchmark, record_env, bench_device, mask, provider, mode):
    dev = bench_device
    if dev == "cpu" and provider == "triton":
        pytest.skip("CPU: the Triton interpreter is not a speed figure")
    if dev == "cpu" and provider == "cuda":
        pytest.skip("the cuda backend takes CUDA tensors (its emulator is not a speed figure)")
    if provider == "cuda" and not _dispatch.cuda_extension_has("attention_forward"):
        pytest.skip("dalle_kernels._C is not built with the attention kernels (DALLE_KERNELS_CUDA=1)")
    if dev == "cuda" and provider == "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    if provider == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
        if dev == "cpu" and mode == "fwd_bwd":
            pytest.skip("FlexAttention has no backward on CPU")
    s = SHAPES["cpu_untimed" if dev == "cpu" and getattr(benchmark, "disabled", False) else dev]
    B, heads, T, grid, d, dtype = s["B"], s["heads"], s["T"], s["grid"], s["d"], s["dtype"]
    n = T + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, n, d, generator=gen).to(dev, dtype).requires_grad_(mode == "fwd_bwd")
               for _ in range(3))
    do = torch.randn(B, heads, n, d, generator=gen).to(dev, dtype)
    fn = make_fn(provider, mask, T, grid, dev)
    step = make_step(fn, q, k, v, do, mode, dev)
    step()  # warm-up (compiles)
    peak = peak_memory_mb(step, dev)
    if peak is not None:
        record_env["peak_mem_mb"] = peak
    if provider != "dense":  # dense causal is the speed baseline, not the masked function
        record_env.update(errors(fn, q, k, v, do, mask, T, grid, mode))
    if provider in ("cpu", "torch") and not getattr(benchmark, "disabled", False):
        dense = make_step(make_fn("dense", mask, T, grid, dev), q, k, v, do, mode, dev)
        dense()
        record_env["sdpa_causal_ratio"] = interleaved_ratio(step, dense)
    benchmark(step)
    flops = useful_flops(mask, T, grid, B, heads, d, mode)
    record_env.update(shape=(B, heads, n, d), text_len=T, grid=grid, dtype=str(dtype), mask=mask,
                      provider=provider, mode=mode, useful_flops=flops)
    if provider == "cpu":
        structured = attention_cpu.pick_structure(mask, T, grid[0], grid[1], KERNEL) is not None
        record_env["cpu_path"] = "structured" if structured else "tiles"
    if provider in ("triton", "cuda"):
        if provider == "triton":
            cfg, _ = A.pick_configs(d, q.device)
            bm, bn = cfg.block_m, cfg.block_n
        else:
            (bm, bn), _ = A.cuda_tiles(d, dtype, q.device)
        st = masks.tile_stats(mask, T, grid, KERNEL, bm, bn)
        record_env.update(tiles=st["tiles"], causal_tiles=st["causal_tiles"], tile_ratio=st["ratio"])
    median = median_seconds(benchmark)
    if median:
        record_env["tflops"] = flops / median / 1e12


def tile_report(T=256, grid=(32, 32)):
    """Tiles the Triton kernels visit per mask at the paper shape vs dense causal with the same tiles."""
    fwd, bwd = A.FWD_CONFIGS[64], A.BWD_CONFIGS[64]
    lines = ["| mask | pass | tile (q x k) | tiles visited | full (no predicate) | dense causal tiles | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mask in masks.SPARSE_MASKS:
        for name, cfg in (("forward", fwd), ("backward", bwd)):
            st = masks.tile_stats(mask, T, grid, KERNEL, cfg.block_m, cfg.block_n)
            lines.append(f"| {mask} | {name} | {cfg.block_m} x {cfg.block_n} | {st['tiles']} | {st['full_tiles']} | "
                         f"{st['causal_tiles']} | {st['ratio']:.3f} |")
    return "\n".join(lines)


def build_parser():
    import argparse

    return argparse.ArgumentParser(prog="python benchmarks/bench_attention.py",
                                   description="Print the tiles the Triton attention kernels visit per mask at the "
                                               "paper shape (no GPU needed). The benchmarks run under pytest.")


if __name__ == "__main__":
    build_parser().parse_args()
    print(f"paper shape T=256, 32 x 32, head_dim 64, conv {KERNEL} x {KERNEL}")
    print(tile_report())
