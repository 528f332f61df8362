"""A whole DDP training step with this package's PowerSGD hook against PyTorch's ``powerSGD_hook``.

One-process group (gloo on CPU, NCCL on GPU), so the figure is the hook's compute (compress, orthogonalize,
decompress, error feedback) plus forward/backward; ``allreduce`` (DDP's default) is the baseline. Model: a
stack of DALL-E-like transformer MLP/attention weights (per layer ``3d x d``, ``d x d``, ``4d x d``,
``d x 4d`` plus LayerNorm gains and biases). GPU: ``d = 1024``, 8 layers, rank 32; CPU: ``d = 128``,
2 layers, rank 4. Both hooks at the same rank, warm start and error feedback on, compression from step 2.
On CPU the model's gradients go in one DDP bucket: with gloo and two or more buckets, ``powerSGD_hook`` can
deadlock (its ``then`` callbacks wait on further all-reduces from gloo's two callback threads).
extra_info: ``compression`` = elements sent / gradient elements; ``peak_mem_mb`` = peak memory of a step (GPU).

    pytest benchmarks/bench_powersgd.py --device=cuda --benchmark-json=out.json
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.nn.parallel import DistributedDataParallel as DDP

from dalle_kernels._bench import peak_memory_mb, sync
from dalle_kernels.powersgd import PowerSGDState, powersgd_hook

PROVIDERS = ("allreduce", "torch_powersgd", "dalle_powersgd")
SIZES = {"cuda": dict(d=1024, layers=8, rank=32, batch=64), "cpu": dict(d=128, layers=2, rank=4, batch=16)}
# An explicit cap also sizes DDP's first bucket; 25 MiB holds every gradient of the CPU model (1.6 MB).
BUCKET_CAP_MB = {"cuda": None, "cpu": 25}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.out(torch.tanh(q) * k + v)
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


@pytest.fixture(scope="module")
def group(bench_device):
    if dist.is_initialized():
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("nccl" if bench_device == "cuda" else "gloo", rank=0, world_size=1)
    yield None
    dist.destroy_process_group()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_powersgd_step(benchmark, record_env, bench_device, group, provider):
    dev = bench_device
    cfg = SIZES[dev]
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(cfg["d"]) for _ in range(cfg["layers"])]).to(dev)
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB[dev])
    state = None
    if provider == "torch_powersgd":
        state = torch_psgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg["rank"],
                                         start_powerSGD_iter=2, min_compression_rate=2, warm_start=True)
        ddp.register_comm_hook(state, torch_psgd.powerSGD_hook)
    elif provider == "dalle_powersgd":
        # CPU: the reference orthogonalization (the Triton interpreter is not a speed figure)
        state = PowerSGDState(model, rank=cfg["rank"], start_iter=2,
                              orthogonalize_backend="auto" if dev == "cuda" else "torch")
        ddp.register_comm_hook(state, powersgd_hook)
    x = torch.randn(cfg["batch"], cfg["d"], device=dev)

    def step():
        ddp(x).square().mean().backward()
        for p in model.parameters():
            p.grad = None
        sync(dev)

    for _ in range(3):  # past start_iter: warm-start buffers allocated
        step()
    peak = peak_memory_mb(step, dev)
    if peak is not None:
        record_env["peak_mem_mb"] = peak
    benchmark(step)
    record_env.update(provider=provider, **cfg)
    if provider == "allreduce":
        record_env["compression"] = 1.0
    elif provider == "dalle_powersgd":
        record_env["compression"] = state.compression_ratio()
    elif provider == "torch_powersgd":
        record_env["compression"] = state.total_numel_after_compression / max(1, state.total_numel_before_compression)
