"""sparse_attention(backend="cpu"): the block-sparse CPU path against the float64 reference, dispatch, compile.

Runs without the Triton interpreter (plain PyTorch ops), so every case runs in both lanes' CPU share: every
mask at every odd shape in fp32, fp16 and bf16, the default tiles and small forced tiles (several blocks, full,
partial and padding tiles, merged groups, chunked groups). torch.compile(fullgraph=True) over this backend is
test_attention.py's test_torch_compile_fullgraph.
"""
import pytest
import torch

from dalle_kernels import masks, sparse_attention
from dalle_kernels._bench import peak_memory_mb
from dalle_kernels._dispatch import resolve_backend
from dalle_kernels.ops import attention_cpu as C
from dalle_kernels.ops.attention import attention_ref
from test_attention import SHAPES, assert_close, make_inputs, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def run_cpu(q, k, v, do, mask, T, grid, kernel, scale=None, block_m=0, block_n=0):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if block_m or block_n:
        s = scale if scale is not None else q.shape[-1] ** -0.5
        o = C.cpu_attention(q, k, v, mask, T, grid, kernel, s, block_m, block_n)[0]
    else:
        o = sparse_attention(q, k, v, mask=mask, text_len=T, grid=grid, kernel=kernel, scale=scale, backend="cpu")
    assert o.shape == q.shape and o.dtype == q.dtype
    o.backward(do)
    return o.detach(), (q.grad, k.grad, v.grad)


def check(q, k, v, do, mask, T, grid, kernel, scale=None, grad_factor=1.0, dv_factor=1.0, **blocks):
    ref_o, ref_g = reference(q, k, v, do, mask, T, grid, kernel, scale)
    o, grads = run_cpu(q, k, v, do, mask, T, grid, kernel, scale, **blocks)
    assert_close(f"cpu/{mask} out", o, ref_o, q.dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_g):
        assert g.dtype == q.dtype
        assert_close(f"cpu/{mask} {name}", g, r, q.dtype, grad_factor if name != "dv" else dv_factor)
    return [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_g)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_{}x{}_k{}_d{}".format(*s))
@pytest.mark.parametrize("mask", masks.MASKS)
def test_cpu_matches_float64(mask, shape, dtype):
    T, H, W, kernel, d = shape
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, "cpu", seed=len(mask) * 31 + T)
    check(q, k, v, do, mask, T, (H, W), kernel)


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=["16x16", "32x16", "16x32"])
@pytest.mark.parametrize("mask", masks.MASKS)
def test_cpu_small_tiles(mask, blocks):
    # 7 + 7 * 9 = 70 positions: several query blocks, full, partial and padding tiles, merged groups.
    q, k, v, do = make_inputs(2, 2, 7 + 7 * 9, 16, torch.float32, "cpu", seed=23)
    check(q, k, v, do, mask, 7, (7, 9), 5, block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("mask", masks.MASKS)
def test_cpu_default_tiles_and_chunked_groups(mask, monkeypatch):
    # Past SINGLE_TILE positions the default 64 x 64 tiles apply (N = 157: a padded last block); a tiny score
    # budget splits every group into chunks of one query block.
    T, H, W = 20, 9, 15
    q, k, v, do = make_inputs(1, 3, T + H * W, 32, torch.float32, "cpu", seed=29)
    assert T + H * W > C.SINGLE_TILE
    check(q, k, v, do, mask, T, (H, W), 11)
    monkeypatch.setattr(C, "SCORE_BUDGET", 1)
    check(q, k, v, do, mask, T, (H, W), 11)


def test_plan_merges_and_pads_groups():
    # At the paper shape every query block is in exactly one group and lists exactly its table's key blocks.
    T, H, W = 256, 32, 32
    for mask in masks.MASKS:
        p = C.plan(mask, T, H, W, 11)
        tables = masks.block_tables(mask, T, (H, W), 11, p.block_m, p.block_n)
        seen = torch.cat([g.qb for g in p.groups]).sort().values
        assert torch.equal(seen, torch.arange(tables.q_lut.shape[0])), mask
        for g in p.groups:
            for i, m in enumerate(g.qb.tolist()):
                cnt = int(tables.q_count[m])
                slots = g.kb[i * g.width:(i + 1) * g.width].tolist()
                assert sorted(slots[:cnt]) == tables.q_lut[m, :cnt].tolist(), (mask, m)
                if g.bias is not None:  # padding slots are masked out entirely
                    assert torch.isinf(g.bias[0, i, :, cnt * p.block_n:]).all(), (mask, m)
        # the masks whose key blocks per query block form a few patterns merge into few groups; causal's and
        # conv_torus's (whose wrapped rows reach back to the grid's top) differ from block to block
        assert len(p.groups) <= 3 or mask in ("causal", "conv_torus"), (mask, len(p.groups))
        assert len(p.groups) <= tables.q_lut.shape[0], mask


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask", ["conv", "column", "causal", "row"])
def test_cpu_large_logits(mask, dtype):
    magnitude = 12.0
    q, k, v, _ = make_inputs(1, 2, 6 + 4 * 5, 32, dtype, "cpu", magnitude=magnitude, seed=7)
    assert ((q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5).abs().max() > 200
    # As in test_attention, dQ and dK errors scale with the inputs' magnitude through the rounded output O. Here
    # dV's does too: P = exp(S - lse) is recomputed from the saved fp32 row log-sum-exp, and an lse of several
    # hundred is rounded to ~1e-4 (a few ulps), a relative error of P that PyTorch's own fused CPU kernel
    # (scaled_dot_product_attention, which runs each group here) shares. So dV is also held to at most twice
    # that kernel's error on the same inputs under the same mask.
    for T, H, W, kernel, seed in [(6, 4, 5, 3, 7), (20, 11, 13, 5, 8)]:
        q, k, v, do = make_inputs(1, 2, T + H * W, 32, dtype, "cpu", magnitude=magnitude, seed=seed)
        err = check(q, k, v, do, mask, T, (H, W), kernel, grad_factor=magnitude, dv_factor=magnitude)
        ref_o, ref_g = reference(q, k, v, do, mask, T, (H, W), kernel)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        allow = masks.dense_mask(mask, T, (H, W), kernel)
        o32 = torch.nn.functional.scaled_dot_product_attention(q32, k32, v32, attn_mask=allow)
        sdpa_dv = torch.autograd.grad(o32, v32, do.float())[0]
        sdpa_err = (sdpa_dv.double() - ref_g[2]).abs().max().item()
        if dtype == torch.float32:
            assert err[2] <= 2 * sdpa_err + 1e-5, (err[2], sdpa_err)


@pytest.mark.parametrize("mask", ["row", "column", "conv"])
def test_cpu_strided_inputs_and_scale(mask):
    # q, k, v as views of one (B, N, 3, heads, d) projection, as a model produces them; a head_dim axis that is
    # not contiguous either; a custom scale.
    T, H, W = 4, 5, 7
    n = T + H * W
    qkv = torch.randn(2, n, 3, 2, 16, dtype=torch.float32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    do = torch.randn(2, 2, n, 16)
    check(q, k, v, do, mask, T, (H, W), 3, scale=0.3)
    qt = torch.randn(2, 2, 16, n).transpose(-1, -2)
    assert qt.stride(-1) != 1
    check(qt, k, v, do, mask, T, (H, W), 3)


def test_cpu_does_not_write_inputs():
    # fp32 contiguous inputs at a multiple of the tile size are read in place (no copy): they must stay intact.
    T, H, W = 64, 8, 8
    q, k, v, do = make_inputs(1, 2, T + H * W, 16, torch.float32, "cpu", seed=31)
    before = [t.clone() for t in (q, k, v, do)]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = sparse_attention(q, k, v, mask="row", text_len=T, grid=(H, W), kernel=3, backend="cpu")
    o.backward(do)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, do), before))


def test_auto_picks_cpu_without_interpreter(monkeypatch):
    q, k, v, _ = make_inputs(1, 2, 6 + 9, 16, torch.float32, "cpu", seed=2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", q, cpu_path=True) == "cpu"
    assert resolve_backend("auto", q) == "torch"  # ops without a CPU path keep their reference
    with pytest.raises(ValueError, match="'cpu' is not available for this op"):
        resolve_backend("cpu", q)
    out = sparse_attention(q, k, v, mask="conv", text_len=6, grid=(3, 3), kernel=3, backend="auto")
    assert torch.equal(out, sparse_attention(q, k, v, mask="conv", text_len=6, grid=(3, 3), kernel=3, backend="cpu"))
    torch.testing.assert_close(out, attention_ref(q, k, v, "conv", 6, (3, 3), 3), rtol=1e-5, atol=1e-6)


def test_cpu_extra_memory_is_linear_in_n():
    # Forward + backward under row (a fixed number of tiles per query block): the extra memory per position stays
    # flat as N grows 3.8x (the dense reference's grows with N), below one (B, heads, N, N) fp32 score matrix.
    # (Under conv the tiles per query block grow with W, the window's raster span; SCORE_BUDGET bounds them.)
    per_position = []
    for T, H, W in [(64, 32, 32), (64, 64, 64)]:
        n = T + H * W
        q, k, v, do = make_inputs(1, 2, n, 32, torch.float32, "cpu", seed=37)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            sparse_attention(q, k, v, mask="row", text_len=T, grid=(H, W), backend="cpu").backward(do)
            q.grad = k.grad = v.grad = None

        step()
        extra = peak_memory_mb(step, "cpu") * 2**20
        assert 0 < extra < 2 * n * n * 4, (n, extra, "one fp32 (B, heads, N, N) score matrix")
        per_position.append(extra / n)
    assert per_position[1] < 1.25 * per_position[0], per_position


def test_cpu_custom_op_opcheck():
    q, k, v = (torch.randn(1, 1, 2 + 3 * 3, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dalle_kernels.sparse_attention_cpu_fwd.default,
                          (q, k, v, "row", 2, 3, 3, 3, 0.25, 0, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["batch0", "heads0"])
def test_cpu_empty_batch_or_heads(shape):
    q = torch.randn(*shape, 7 + 15, 16, requires_grad=True)
    out = sparse_attention(q, q, q, mask="row", text_len=7, grid=(5, 3), backend="cpu")
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
