"""Non-finite keys and values (issue #28): a NaN or inf planted in a key or value row never reaches a query the
mask keeps from it, in the output or in any gradient, on every backend; a query that may attend it is NaN (no
silent drop). Every backend is compared with the float64 reference, whose clean rows are in turn compared with the
same call on finite inputs (the planted row replaced by other values)."""
import pytest
import torch

from dalle_kernels import attention_ref, masks, sparse_attention
from dalle_kernels.ops.attention_cpu import cpu_attention

T, GRID, D = 4, (4, 4), 16
N = T + GRID[0] * GRID[1]
PLANTED = T + 5  # image row 1, column 1: some queries of its 16-row tile attend it, some may not
# the Triton interpreter computes in NumPy, which warns on the NaN a row that attends the planted value must get
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def inputs(dtype, where: str, value: float, mask: str, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 2, N, D, generator=g) for _ in range(4))
    planted = {"k": k, "v": v}[where]
    planted[0, 1, PLANTED, 3] = value  # head 1 only: head 0 stays finite
    return [t.to(dtype) for t in (q, k, v, do)]


def run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), dq, dk, dv


def reference(mask, q, k, v, do):
    fn = lambda q, k, v: attention_ref(q, k, v, mask, T, GRID, upcast=torch.float64)  # noqa: E731
    return run(fn, *(t.double() for t in (q, k, v, do)))


def sees_planted(mask):
    """(N,) bool: the queries that may attend the planted position."""
    return masks.dense_mask(mask, T, GRID)[:, PLANTED]


@pytest.mark.parametrize("mask", ["row", "column"])
@pytest.mark.parametrize("where,value", [("k", float("nan")), ("v", float("nan")), ("k", float("inf")),
                                         ("v", float("-inf"))])
def test_the_reference_keeps_masked_positions_out(mask, where, value):
    """The reference itself: rows that may not attend the planted position equal the same call with finite values
    there (outputs and dq; dk, dv of keys no such row attends); rows that may attend it are NaN."""
    q, k, v, do = inputs(torch.float64, where, value, mask)
    got = reference(mask, q, k, v, do)
    finite = {"k": k, "v": v}[where].clone()
    finite[0, 1, PLANTED] = torch.randn(D, dtype=torch.float64)
    clean = reference(mask, q, finite if where == "k" else k, finite if where == "v" else v, do)
    seen = sees_planted(mask)
    keys_of_seen = masks.dense_mask(mask, T, GRID)[seen].any(0)  # keys attended by a row that sees it
    o, dq, dk, dv = got
    assert torch.equal(o[:, 0], clean[0][:, 0]) and torch.equal(dq[:, 0], clean[1][:, 0])  # head 0 untouched
    torch.testing.assert_close(o[0, 1, ~seen], clean[0][0, 1, ~seen], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dq[0, 1, ~seen], clean[1][0, 1, ~seen], rtol=1e-12, atol=1e-12)
    for g, c in ((dk, clean[2]), (dv, clean[3])):
        torch.testing.assert_close(g[0, 1, ~keys_of_seen], c[0, 1, ~keys_of_seen], rtol=1e-12, atol=1e-12)
        assert g[0, 1, keys_of_seen].isnan().all()
    assert o[0, 1, seen].isnan().all() and dq[0, 1, seen].isnan().all()
    assert seen.any() and (~seen).any() and (~keys_of_seen).any()


BACKENDS = [("torch", torch.float32, dict(backend="torch")), ("cpu", torch.float32, dict(backend="cpu")),
            ("cpu tiles 8x8", torch.float32, dict(cpu=dict(block_m=8, block_n=8))),
            ("cpu structured", torch.float32, dict(cpu=dict(path="structured"))),
            ("cpu", torch.float16, dict(backend="cpu")),
            ("triton", torch.float32, dict(backend="triton")), ("triton", torch.float16, dict(backend="triton")),
            ("cuda_emu", torch.float32, dict(backend="cuda_emu")),
            ("cuda_emu", torch.float16, dict(backend="cuda_emu"))]


def skip_unless_runs(name):
    import os

    from dalle_kernels import _dispatch

    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors reach Triton only in its interpreter (the CPU lane)")
    if name == "cuda_emu" and not _dispatch.emu_extension_has("attention_forward"):
        pytest.skip("the CUDA emulator extension is not built")


@pytest.mark.parametrize("name,dtype,how", BACKENDS, ids=[f"{n}-{str(d)[6:]}" for n, d, _ in BACKENDS])
@pytest.mark.parametrize("where,value", [("k", float("nan")), ("v", float("inf")), ("k", float("-inf")),
                                         ("v", float("nan"))])
@pytest.mark.parametrize("mask", ["row", "column", "causal"])  # causal: a later query block sees it in a full tile
def test_every_backend_agrees_with_the_reference(name, dtype, how, where, value, mask):
    """Outputs and every gradient equal the float64 reference, NaN for NaN; before, the CPU path let a masked NaN
    key through into rows that cannot see it, and every backend's dq turned non-finite in those rows."""
    skip_unless_runs(name)
    q, k, v, do = inputs(dtype, where, value, mask)
    if "cpu" in how:
        fn = lambda q, k, v: cpu_attention(q, k, v, mask, T, GRID, 11, D ** -0.5, **how["cpu"])[0]  # noqa: E731
    else:
        fn = lambda q, k, v: sparse_attention(q, k, v, mask, T, GRID, **how)  # noqa: E731
    got = run(fn, q, k, v, do)
    ref = reference(mask, q, k, v, do)
    for what, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert torch.equal(g.isnan(), r.isnan()), (what, g.isnan().nonzero()[:5], r.isnan().nonzero()[:5])
        torch.testing.assert_close(g.double(), r, equal_nan=True, **TOL[dtype], msg=what)


@pytest.mark.parametrize("where,value", [("k", float("nan")), ("v", float("inf"))])
def test_the_samplers_prompt_attention_follows_the_rule(where, value):
    """The sampler attends the prompt in one chunk with its own dense softmax: same rule as the backends."""
    from dalle.sampling import Sampler

    q, k, v, _ = inputs(torch.float32, where, value, "row")
    got = Sampler._attend(None, q, k, v, masks.dense_mask("row", T, GRID))
    ref = attention_ref(q.double(), k.double(), v.double(), "row", T, GRID, upcast=torch.float64)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    torch.testing.assert_close(got.double(), ref, equal_nan=True, **TOL[torch.float32])
