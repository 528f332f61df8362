"""orthogonalize against PyTorch's PowerSGD-hook orthogonalization.

Cases: ``uniform`` = 200 matrices of 4096 x 4 (one batch); ``mix`` = the P matrices of a DALL-E-like
transformer, batched by shape as a PowerSGD hook batches them (per layer: qkv ``3d x r``, attention out
``d x r``, MLP in ``4d x r``, MLP out ``d x r``; GPU: ``d = 3968``, 64 layers, ``r = 32``; CPU: ``d = 256``,
4 layers, ``r = 4``). The CPU uniform case uses 50 matrices.

Providers: ``triton`` / ``cuda`` (GPU only; the Triton interpreter is not a speed figure), ``torch`` (this
package's Householder reference), ``gram_schmidt`` (``powerSGD_hook._orthogonalize_gram_schmidt``, what the
hook uses at rank <= 2 or in 16-bit), ``linalg_qr`` (batched ``torch.linalg.qr``, what the hook uses otherwise).
extra_info: ``ortho_error`` = max |Q^T Q - I| of the output (float64), ``gbps`` = one read + one write of P per
median time (a lower bound on the traffic: the kernels make 2r + 1 passes; absent under ``--benchmark-disable``),
``peak_mem_mb`` = peak memory of a step above its inputs (GPU).

    pytest benchmarks/bench_orthogonalize.py --device=cuda --benchmark-json=out.json
"""
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize_gram_schmidt

from dalle_kernels import orthogonalize
from dalle_kernels._bench import median_seconds, peak_memory_mb, sync
from dalle_kernels._dispatch import cuda_extension_has

PROVIDERS = ("triton", "cuda", "torch", "gram_schmidt", "linalg_qr")


def shapes(case, device):
    """List of (count, n, r) batches."""
    if case == "uniform":
        return [(200 if device == "cuda" else 50, 4096, 4)]
    d, layers, r = (3968, 64, 32) if device == "cuda" else (256, 4, 4)
    return [(layers, 3 * d, r), (2 * layers, d, r), (layers, 4 * d, r)]


def make_fn(provider):
    if provider in ("triton", "cuda", "torch"):
        return lambda P: orthogonalize(P, backend=provider)
    if provider == "gram_schmidt":
        return _orthogonalize_gram_schmidt
    if provider == "linalg_qr":
        def qr(P):
            P.copy_(torch.linalg.qr(P).Q)
        return qr
    raise ValueError(provider)


def ortho_error(Q):
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=Q.device)
    return (Q.transpose(-1, -2) @ Q - eye).abs().max().item()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["uniform", "mix"])
def test_orthogonalize(benchmark, record_env, bench_device, case, provider):
    dev = bench_device
    if dev == "cpu" and provider in ("triton", "cuda"):
        pytest.skip("CPU: PyTorch providers only (the Triton interpreter is not a speed figure)")
    if provider == "cuda" and not cuda_extension_has("orthogonalize"):
        pytest.skip("CUDA extension not built")
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(s, generator=gen).to(dev) for s in shapes(case, dev)]
    work = [s.clone() for s in sources]
    fn = make_fn(provider)

    def step():
        for w, s in zip(work, sources):
            w.copy_(s)  # the ops work in place; the copy is the same for every provider
            fn(w)
        sync(dev)

    step()
    record_env["ortho_error"] = max(ortho_error(w) for w in work)
    peak = peak_memory_mb(step, dev)
    if peak is not None:
        record_env["peak_mem_mb"] = peak
    benchmark(step)
    numel = sum(s.numel() for s in sources)
    record_env.update(case=case, provider=provider, shapes=shapes(case, dev), dtype="float32")
    median = median_seconds(benchmark)
    if median:
        record_env["gbps"] = 2 * 4 * numel / median / 1e9
