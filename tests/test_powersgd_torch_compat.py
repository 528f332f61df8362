"""``PowerSGDState`` as a drop-in for PyTorch's ``powerSGD_hook.PowerSGDState``: the same training script under
2 gloo processes with PyTorch's state + hook and with ours (only the import changes); pickling; arguments."""
import logging
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.nn.parallel import DistributedDataParallel as DDP

from dalle_kernels import powersgd as ours
from test_powersgd import WORLD, data, free_port, init_gloo, local_batch, loss_of, make_model, params_of

START = 3
BUCKET_MB = 25  # one bucket: PyTorch's hook chains collectives in callbacks, which can hang gloo with several
IMPLS = {"torch": (torch_psgd.PowerSGDState, torch_psgd.powerSGD_hook),
         "ours": (ours.PowerSGDState, ours.powersgd_hook)}


def run(impl, steps, x, y, keyed_by_name=False, **state_kwargs):
    """The user's script: only ``IMPLS[impl]`` (the import) differs."""
    State, hook = IMPLS[impl]
    model = make_model(0)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    if keyed_by_name:
        state_kwargs["model"] = model
    state = State(process_group=None, start_powerSGD_iter=START, **state_kwargs)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    record, stats = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(ddp, x, y).backward()
        opt.step()
        record.append(params_of(model))
        stats.append(state.compression_stats())
    return {"params": record, "stats": stats}, (model, ddp, opt, state)


def accumulate(impl, x, y, steps=40):
    """Fixed parameters, rank 1: sums of the hook's gradients (error-feedback property) and the local gradient."""
    State, hook = IMPLS[impl]
    model = make_model(0)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    ddp.register_comm_hook(State(None, 1, 2), hook)  # positional, PyTorch's order
    acc = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    sums = []
    for _ in range(steps):
        ddp.zero_grad()
        loss_of(ddp, x, y).backward()
        for k, p in model.named_parameters():
            acc[k] += p.grad
        sums.append({k: v.clone() for k, v in acc.items()})
    return sums


def resume_by_pickle(x, y):
    """Train 5 steps, pickle the state, train 4 more; a new DDP with the pickled state must continue identically.
    Keyed by parameter name: a new DDP's first iteration runs on buckets in another order than the rebuilt ones
    (keyed by bucket, ours raises on that; PyTorch's, keyed by bucket index, would add errors to wrong places)."""
    res, (model, ddp, opt, state) = run("ours", 5, x, y, keyed_by_name=True, matrix_approximation_rank=2)
    blob = pickle.dumps(state)
    snapshot = params_of(model)
    for _ in range(4):
        opt.zero_grad()
        loss_of(ddp, x, y).backward()
        opt.step()
    uninterrupted = params_of(model)
    model2 = make_model(1)
    model2.load_state_dict(snapshot)
    ddp2 = DDP(model2, bucket_cap_mb=BUCKET_MB)
    state2 = pickle.loads(blob)
    state2.bind_model(model2)
    ddp2.register_comm_hook(state2, ours.powersgd_hook)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.2)
    for _ in range(4):
        opt2.zero_grad()
        loss_of(ddp2, x, y).backward()
        opt2.step()
    return {"uninterrupted": uninterrupted, "resumed": params_of(model2), "iter": state2.iter,
            "stats": (state.compression_stats(), state2.compression_stats())}


def _worker(rank, world, port, outdir):
    init_gloo(rank, world, port)
    try:
        x, y = local_batch(rank)
        res = {}
        for impl in IMPLS:
            # rank 2 compresses both Linear weights and the embedding (no model: nothing excluded, as PyTorch)
            res[impl, "low"] = run(impl, 8, x, y, matrix_approximation_rank=2)[0]
            # rank = min(n, m) with min_compression_rate 0.5: compression is exact, so both follow plain SGD
            res[impl, "full"] = run(impl, 6, x, y, matrix_approximation_rank=32, min_compression_rate=0.5)[0]
            res[impl, "no_ef"] = run(impl, 5, x, y, matrix_approximation_rank=1, use_error_feedback=False,
                                     warm_start=False)[0]
            res[impl, "acc"] = accumulate(impl, x, y)
        res["resume"] = resume_by_pickle(x, y)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("powersgd_compat"))
    mp.spawn(_worker, args=(WORLD, free_port(), outdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_identical_to_pytorch_before_start_iter(results):
    for rank in range(WORLD):
        t, o = results[rank]["torch", "low"], results[rank]["ours", "low"]
        for step in range(START):
            for k in t["params"][step]:
                torch.testing.assert_close(o["params"][step][k], t["params"][step][k], rtol=0, atol=0)
            assert o["stats"][step] == t["stats"][step] == (0, 0, 0)


def test_compression_stats_match_pytorch(results):
    for rank in range(WORLD):
        for run_name in ("low", "full", "no_ef"):
            t, o = results[rank]["torch", run_name]["stats"], results[rank]["ours", run_name]["stats"]
            assert o == t, run_name
            assert t[-1][0] > 0 and t[-1][1] > 0
        rate, before, after = results[rank]["ours", "low"]["stats"][-1]
        assert rate > 1 and rate == before / after


def test_full_rank_compression_is_exact_in_both(results):
    """Where the two are defined to agree after start: rank-min(n, m) compression gives the plain mean."""
    x, y = data()
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ref = []
    for _ in range(6):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        ref.append(params_of(model))
    for rank in range(WORLD):
        for impl in IMPLS:
            got = results[rank][impl, "full"]["params"]
            for step in range(6):
                for k in ref[step]:
                    torch.testing.assert_close(got[step][k], ref[step][k], rtol=1e-4, atol=1e-5,
                                               msg=lambda m: f"{impl} rank {rank} step {step} {k}: {m}")
        assert results[rank]["ours", "full"]["stats"][-1][1] > 0  # it did compress


def test_error_feedback_property_in_both(results):
    x, y = data()
    model = make_model(0)
    true = dict(zip([k for k, _ in model.named_parameters()],
                    torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))))
    for impl in IMPLS:
        sums = results[0][impl, "acc"]
        for k in ("0.weight", "2.weight", "5.weight"):  # the compressed ones (embedding too, without a model)
            rel = [((s[k] - (t + 1) * true[k]).norm() / ((t + 1) * true[k]).norm()).item() for t, s in enumerate(sums)]
            assert rel[2] > 0.02, f"{impl} {k}: rank-1 compression should be lossy, rel error {rel[2]}"
            # 40 steps at rank 1 from a random Q: both shrink the error by a factor of 1.8-3 here
            assert rel[-1] < rel[2] / 1.5, f"{impl} {k}: accumulated update does not converge {rel[2]:.3g} -> {rel[-1]:.3g}"


def test_pickled_state_resumes_exactly(results):
    for rank in range(WORLD):
        res = results[rank]["resume"]
        assert res["iter"] == 9
        for k, v in res["uninterrupted"].items():
            torch.testing.assert_close(res["resumed"][k], v, rtol=0, atol=0, msg=lambda m: f"rank {rank} {k}: {m}")
        assert res["stats"][0] == res["stats"][1]


# -- single process -----------------------------------------------------------------------------------
def test_pickle_drops_process_group(caplog):
    state = ours.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=10,
                               min_compression_rate=3, use_error_feedback=False, random_seed=7)
    state.process_group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # a group: not picklable
    state.iter, state.error["bucket0.1"], state.numel_before, state.numel_after = 12, torch.ones(3, 4), 100, 20
    with caplog.at_level(logging.WARNING, logger="dalle_kernels.powersgd"):
        blob = pickle.dumps(state)
        back = pickle.loads(blob)
    assert "Process group is not serializable" in caplog.text
    assert back.process_group is None
    assert (back.matrix_approximation_rank, back.start_powerSGD_iter, back.min_compression_rate,
            back.use_error_feedback, back.random_seed, back.iter) == (2, 10, 3.0, False, 7, 12)
    assert torch.equal(back.error["bucket0.1"], torch.ones(3, 4))
    assert back.compression_stats() == (5.0, 100, 20)
    # a state keyed by a model's names needs the model back after unpickling
    model = make_model(0)
    keyed = pickle.loads(pickle.dumps(ours.PowerSGDState(model, rank=2)))
    with pytest.raises(RuntimeError, match="bind_model"):
        keyed.name_of(model[2].weight)
    keyed.bind_model(model)
    assert keyed.name_of(model[2].weight) == "2.weight" and "0.weight" in keyed.exclude


def test_pytorch_form_arguments():
    s = ours.PowerSGDState(None)  # PyTorch's defaults
    assert (s.rank, s.start_iter, s.min_compression_rate, s.use_error_feedback, s.warm_start, s.seed,
            s.compression_stats_logging_frequency, s.batch_tensors_with_same_shape) == (1, 1000, 2, True, True, 0,
                                                                                       10_000, False)
    s = ours.PowerSGDState(None, 4, 20, 1.5, False, False, 0, 3, 5, True)  # PyTorch's positional order
    assert (s.rank, s.start_iter, s.min_compression_rate, s.use_error_feedback, s.warm_start, s.seed,
            s.compression_stats_logging_frequency, s.batch_tensors_with_same_shape) == (4, 20, 1.5, False, False, 3,
                                                                                       5, True)
    model = make_model(0)
    s = ours.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=0, model=model)
    assert s.exclude == ours.uncompressed_parameter_names(model) and s.start_iter == 0
    assert ours.PowerSGDState(model, 2, 5).rank == 2  # our form unchanged
    assert ours.PowerSGDState(None).compression_stats() == (0, 0, 0)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"matrix_approximation_rank": 0}, ValueError, "rank must be a positive int"),
    ({"start_powerSGD_iter": 1}, ValueError, "start_powerSGD_iter` > 1"),
    ({"min_compression_rate": 0}, ValueError, "min_compression_rate"),
    ({"min_compression_rate": float("nan")}, ValueError, "min_compression_rate"),
    ({"orthogonalization_epsilon": 1e-8}, ValueError, "orthogonalization_epsilon must be 0"),
    ({"use_error_feedback": 1}, TypeError, "use_error_feedback must be a bool"),
    ({"batch_tensors_with_same_shape": "yes"}, TypeError, "batch_tensors_with_same_shape"),
    ({"random_seed": 1.5}, TypeError, "random_seed"),
    ({"rank": 2, "matrix_approximation_rank": 2}, TypeError, "mixes"),
    ({"bogus": 1}, TypeError, "bogus"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ours.PowerSGDState(process_group=None, **{"start_powerSGD_iter": 10, **kwargs})


def test_bad_process_group_and_model():
    with pytest.raises(TypeError, match="process_group must be"):
        ours.PowerSGDState("world", 1, 10)
    with pytest.raises(TypeError, match="model must be"):
        ours.PowerSGDState(None, 1, 10, model="m")
    # without error feedback and warm start PyTorch allows an early start, and so do we
    assert ours.PowerSGDState(None, 1, 0, use_error_feedback=False, warm_start=False).start_iter == 0
