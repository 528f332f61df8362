"""PowerSGD hook on real torch.distributed: 2 gloo processes on this machine against a single-process run of
the same global batch; error feedback; checkpoint/resume; non-finite gradients; state and argument checks."""
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dalle_kernels.powersgd import PowerSGDState, powersgd_hook, uncompressed_parameter_names

WORLD = 2
START = 3  # start_iter of the training run
COMPRESSED = ("2.weight", "5.weight")


def make_model(seed):
    torch.manual_seed(seed)
    # embedding and 1-D parameters go uncompressed; the two Linear weights are compressed
    return nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(24, 32), nn.LayerNorm(32), nn.ReLU(),
                         nn.Linear(32, 5))


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 11, (16, 3), generator=g), torch.randint(0, 5, (16,), generator=g)


def local_batch(rank, world=WORLD):
    x, y = data()
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def wrap(model, rank=2, start_iter=0, backend="torch"):
    ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets, so per-bucket layouts are exercised
    state = PowerSGDState(model, rank=rank, start_iter=start_iter, orthogonalize_backend=backend)
    ddp.register_comm_hook(state, powersgd_hook)
    return ddp, state


def train(ddp, opt, x, y, steps, record=None):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(ddp, x, y).backward()
        opt.step()
        if record is not None:
            record.append(params_of(ddp.module))


def scenario_training(rank, backend, steps=12):
    """Plain SGD with the hook: compared with one process on the global batch by the test."""
    x, y = local_batch(rank)
    model = make_model(0)
    ddp, state = wrap(model, rank=2, start_iter=START, backend=backend)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    record = []
    train(ddp, opt, x, y, steps, record)
    return {"params": record, "ratio": state.compression_ratio(), "iter": state.iter}


def scenario_error_feedback(rank):
    """Fixed parameters: the accumulated compressed gradient must approach the accumulated true one."""
    x, y = local_batch(rank)
    model = make_model(0)
    ddp, state = wrap(model, rank=1, start_iter=0)
    sums, acc = [], {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for _ in range(60):
        ddp.zero_grad()
        loss_of(ddp, x, y).backward()
        for k, p in model.named_parameters():
            acc[k] += p.grad
        sums.append({k: v.clone() for k, v in acc.items()})
    local = torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))
    return {"sums": sums, "local_grad": dict(zip([k for k, _ in model.named_parameters()], local)),
            "error": {k: v.clone() for k, v in state.error.items()}}


def scenario_resume(rank):
    """Checkpoint after 4 steps; a fresh model/state/optimizer loaded from it must continue identically."""
    x, y = local_batch(rank)

    def setup(seed):
        model = make_model(seed)
        ddp, state = wrap(model, rank=2, start_iter=2)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        return model, ddp, state, opt

    model, ddp, state, opt = setup(0)
    train(ddp, opt, x, y, 4)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "powersgd": state.state_dict()}, blob)
    train(ddp, opt, x, y, 4)
    uninterrupted = params_of(model)

    out = {"uninterrupted": uninterrupted}
    for name, restore_state in (("resumed", True), ("resumed_without_powersgd_state", False)):
        blob.seek(0)
        ckpt = torch.load(blob, weights_only=True)
        model, _, _, _ = setup(seed=1)  # different init: everything must come from the checkpoint
        model.load_state_dict(ckpt["model"])
        ddp, state = wrap(model, rank=2, start_iter=2)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        opt.load_state_dict(ckpt["opt"])
        if restore_state:
            state.load_state_dict(ckpt["powersgd"])
            out["loaded_error_norm"] = min(state.error[k].norm().item() for k in COMPRESSED)
        else:
            state.iter = ckpt["powersgd"]["iter"]
        train(ddp, opt, x, y, 4)
        out[name] = params_of(model)
    return out


def scenario_non_finite(rank):
    """Rank 1 produces an inf loss at step 2: both ranks must see non-finite gradients; buffers untouched."""
    x, y = local_batch(rank)
    model = make_model(0)
    ddp, state = wrap(model, rank=2, start_iter=0)
    out = {}
    for step in range(4):
        ddp.zero_grad()
        loss = loss_of(ddp, x, y)
        if step == 2 and rank == 1:
            loss = loss * float("inf")
        before = ({k: v.clone() for k, v in state.error.items()}, {k: v.clone() for k, v in state.q.items()})
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        out[step] = {"finite": finite, "iter": state.iter,
                     "buffers_unchanged": all(torch.equal(before[0][k], state.error[k]) for k in before[0])
                     and all(torch.equal(before[1][k], state.q[k]) for k in before[1]) and len(before[0]) > 0}
    out["skipped"] = state.skipped_iters
    return out


def init_gloo(rank, world, port):
    """Join the ``world``-process gloo group of this machine (in an ``mp.spawn`` worker)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, outdir):
    init_gloo(rank, world, port)
    try:
        # the reference orthogonalization for the long runs; the fused kernel ("auto": Triton, in the
        # interpreter on the CPU lane) for two compressed steps, compared with it by the test
        res = {"training": scenario_training(rank, "torch"), "kernel": scenario_training(rank, "auto", START + 2),
               "error_feedback": scenario_error_feedback(rank),
               "resume": scenario_resume(rank), "non_finite": scenario_non_finite(rank)}
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("powersgd"))
    mp.spawn(_worker, args=(WORLD, free_port(), outdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def single_process_training(steps=12):
    x, y = data()
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    record = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        record.append(params_of(model))
    return record


def global_loss(params):
    model = make_model(0)
    model.load_state_dict(params)
    with torch.no_grad():
        return loss_of(model, *data()).item()


def test_identical_to_single_process_before_start_iter(two_process_results):
    ref = single_process_training()
    for rank in range(WORLD):
        got = two_process_results[rank]["training"]["params"]
        for step in range(START):
            for k in ref[step]:
                torch.testing.assert_close(got[step][k], ref[step][k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {rank} step {step} {k}: {m}")
        # compression is on afterwards: the compressed weights leave the uncompressed trajectory
        assert not torch.allclose(got[-1]["2.weight"], ref[-1]["2.weight"], rtol=1e-4, atol=1e-5)
    # all ranks hold the same parameters
    for k, v in two_process_results[0]["training"]["params"][-1].items():
        torch.testing.assert_close(two_process_results[1]["training"]["params"][-1][k], v, rtol=0, atol=0)


def test_fused_kernel_in_hook_matches_reference(two_process_results):
    for rank in range(WORLD):
        kern = two_process_results[rank]["kernel"]["params"]
        ref = two_process_results[rank]["training"]["params"]
        for step in range(len(kern)):
            for k in kern[step]:
                torch.testing.assert_close(kern[step][k], ref[step][k], rtol=1e-4, atol=1e-5)


def test_loss_decreases_after_start_iter(two_process_results):
    params = two_process_results[0]["training"]["params"]
    losses = [global_loss(p) for p in params]
    assert losses[-1] < 0.9 * losses[START - 1], losses
    res = two_process_results[0]["training"]
    assert res["iter"] == 12
    assert 0 < res["ratio"] < 1


def test_error_feedback_accumulated_update_converges(two_process_results):
    x, y = data()
    model = make_model(0)
    true = dict(zip([k for k, _ in model.named_parameters()],
                    torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))))
    sums = two_process_results[0]["error_feedback"]["sums"]
    for k in COMPRESSED:
        rel = [((s[k] - (t + 1) * true[k]).norm() / ((t + 1) * true[k]).norm()).item() for t, s in enumerate(sums)]
        assert rel[0] > 0.05, f"{k}: rank-1 compression should be lossy at step 1, rel error {rel[0]}"
        assert rel[-1] < rel[0] / 5, f"{k}: accumulated update does not converge: {rel[0]:.3g} -> {rel[-1]:.3g}"
    for k in set(true) - set(COMPRESSED):  # uncompressed: the exact mean every step
        torch.testing.assert_close(sums[0][k], true[k], rtol=1e-5, atol=1e-6)
    # error feedback telescopes: sum_t G_hat_t + E_T == T * G_local on every rank
    T = len(sums)
    for rank in range(WORLD):
        res = two_process_results[rank]["error_feedback"]
        for k in COMPRESSED:
            lhs = res["sums"][-1][k].reshape(res["error"][k].shape) + res["error"][k]
            torch.testing.assert_close(lhs, T * res["local_grad"][k].reshape(lhs.shape), rtol=1e-4, atol=1e-5)


def test_checkpoint_resume_is_exact(two_process_results):
    for rank in range(WORLD):
        res = two_process_results[rank]["resume"]
        assert res["loaded_error_norm"] > 0  # error feedback survived the checkpoint, not zeroed
        for k, v in res["uninterrupted"].items():
            torch.testing.assert_close(res["resumed"][k], v, rtol=0, atol=0, msg=lambda m: f"rank {rank} {k}: {m}")
        # without the PowerSGD state the run diverges: the state is what makes resume exact
        assert any(not torch.equal(res["resumed_without_powersgd_state"][k], res["uninterrupted"][k])
                   for k in COMPRESSED)


def test_non_finite_gradients_skip_compression(two_process_results):
    for rank in range(WORLD):
        res = two_process_results[rank]["non_finite"]
        assert res[0]["finite"] and res[1]["finite"] and res[3]["finite"]
        assert not res[2]["finite"], f"rank {rank} must see the non-finite gradient of rank 1"
        assert res[2]["buffers_unchanged"], "error feedback / Q touched on a non-finite step"
        assert not res[3]["buffers_unchanged"]
        assert res["skipped"] == 1
        assert [res[s]["iter"] for s in range(4)] == [1, 2, 3, 4]


# -- single process: state, helper and argument checks ---------------------------------------------------
def test_uncompressed_parameter_names():
    assert uncompressed_parameter_names(make_model(0)) == {"0.weight", "2.bias", "3.weight", "3.bias", "5.bias"}
    with pytest.raises(TypeError, match="nn.Module"):
        uncompressed_parameter_names("model")


def test_state_arguments_and_state_dict_checks():
    model = make_model(0)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        PowerSGDState(model, rank=0)
    with pytest.raises(ValueError, match="start_iter"):
        PowerSGDState(model, start_iter=-1)
    with pytest.raises(TypeError, match="model must be"):
        PowerSGDState(model="model")
    with pytest.raises(TypeError, match="model must be"):
        PowerSGDState(model=None, rank=2)
    with pytest.raises(ValueError, match="not a parameter of model"):
        PowerSGDState(model, exclude=[torch.zeros(2)])
    state = PowerSGDState(model, rank=2, exclude=[model[2].weight, "5.weight"])
    assert state.exclude == {"2.weight", "5.weight"}
    state.error["2.weight"] = torch.ones(32, 24)
    state.q["2.weight"] = torch.ones(24, 2)
    state.iter = 7
    other = PowerSGDState(make_model(1), rank=2)
    other.load_state_dict(state.state_dict())
    assert other.iter == 7 and torch.equal(other.error["2.weight"], state.error["2.weight"])
    with pytest.raises(ValueError, match="rank=2"):
        PowerSGDState(model, rank=3).load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="not a PowerSGDState"):
        other.load_state_dict({})
    bad = state.state_dict()
    bad["error"]["missing.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match="missing.weight"):
        other.load_state_dict(bad)
    other.rescale_error(0.5, ["2.weight"])
    assert torch.equal(other.error["2.weight"], torch.full((32, 24), 0.5))


@pytest.mark.gpu
def test_hook_on_cuda_with_fused_kernel_matches_reference(cuda_only):
    """GPU lane: one-process NCCL group; the hook with the fused kernel (auto) follows the reference one."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x, y = (t.cuda() for t in data())
        runs = {}
        for backend in ("auto", "torch"):
            model = make_model(0).cuda()
            ddp, state = wrap(model, rank=2, start_iter=1, backend=backend)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
            record = []
            train(ddp, opt, x, y, 5, record)
            runs[backend] = record
            assert state.compression_ratio() < 1
        for step, (a, b) in enumerate(zip(runs["auto"], runs["torch"])):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step} {k}: {m}")
    finally:
        dist.destroy_process_group()
