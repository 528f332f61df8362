"""sparse_attention(backend="cpu"): the block-sparse CPU path against the float64 reference, dispatch, compile.

Runs without the Triton interpreter (plain PyTorch ops), so every case runs in both lanes' CPU share: every
mask at every odd shape in fp32, fp16 and bf16, on both CPU paths: the tiles (the default tiles and small forced
tiles: several blocks, full, partial and padding tiles, merged groups, chunked groups) and the masks' structured
path (text keys in one call, the image part as a band of rows or per column; every mask but conv_torus).
torch.compile(fullgraph=True) over this backend is test_attention.py's test_torch_compile_fullgraph.
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
STRUCTURED = list(C.STRUCTURED_MASKS)  # the masks with a structured path
# (mask, path): every mask on the tiles, and on the structured path where it has one
MASK_PATHS = [(m, "tiles") for m in masks.MASKS] + [(m, "structured") for m in STRUCTURED]
MASK_PATH_IDS = [f"{m}-{p}" for m, p in MASK_PATHS]


def run_cpu(q, k, v, do, mask, T, grid, kernel, scale=None, block_m=0, block_n=0, path="auto"):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if block_m or block_n or path != "auto":
        s = scale if scale is not None else q.shape[-1] ** -0.5
        o = C.cpu_attention(q, k, v, mask, T, grid, kernel, s, block_m, block_n, path)[0]
    else:
        o = sparse_attention(q, k, v, mask=mask, text_len=T, grid=grid, kernel=kernel, scale=scale, backend="cpu")
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    o.backward(do)
    return o.detach(), (q.grad, k.grad, v.grad)


def check(q, k, v, do, mask, T, grid, kernel, scale=None, grad_factor=1.0, dv_factor=1.0, **path):
    ref_o, ref_g = reference(q, k, v, do, mask, T, grid, kernel, scale)
    o, grads = run_cpu(q, k, v, do, mask, T, grid, kernel, scale, **path)
    assert_close(f"cpu/{mask} out", o, ref_o, q.dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_g):
        assert g.dtype == q.dtype
        assert_close(f"cpu/{mask} {name}", g, r, q.dtype, grad_factor if name != "dv" else dv_factor)
    return [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_g)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_{}x{}_k{}_d{}".format(*s))
@pytest.mark.parametrize("mask,path", MASK_PATHS, ids=MASK_PATH_IDS)
def test_cpu_matches_float64(mask, path, shape, dtype):
    T, H, W, kernel, d = shape
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, "cpu", seed=len(mask) * 31 + T)
    check(q, k, v, do, mask, T, (H, W), kernel, path=path)


@pytest.mark.parametrize("mask", STRUCTURED)
def test_cpu_structured_no_text_and_batches(mask):
    # No text slots (only the image call, no merge), a band wider than the grid under conv (kernel 7 on 3 rows),
    # several batches and heads; then text shorter than a band's rows back (keys copied behind zero rows).
    for T, (H, W), kernel in [(0, (6, 5), 3), (0, (3, 8), 7), (2, (5, 7), 5)]:
        q, k, v, do = make_inputs(3, 2, T + H * W, 16, torch.float32, "cpu", seed=41 + T)
        check(q, k, v, do, mask, T, (H, W), kernel, path="structured")


@pytest.mark.parametrize("groups", [(2, 3), (3, 2)], ids=["fwd2_bwd3", "fwd3_bwd2"])
@pytest.mark.parametrize("mask", ["row", "conv", "conv_clipped", "axial_row"])
def test_cpu_structured_row_groups(mask, groups, monkeypatch):
    # Band calls with query groups of several image rows in either pass (forward and backward group independently;
    # the defaults group only the backward of wide bands): grids of 6 rows (2 and 3 divide it) and 7 (neither).
    monkeypatch.setattr(C, "FWD_GROUP_ROWS", groups[0])
    monkeypatch.setattr(C, "BWD_GROUP_ROWS", groups[1])
    monkeypatch.setattr(C, "WIDE_BAND", 1)
    for T, (H, W), kernel in [(5, (6, 4), 3), (0, (6, 5), 5), (9, (7, 3), 3)]:
        q, k, v, do = make_inputs(2, 2, T + H * W, 16, torch.float32, "cpu", seed=43 + H)
        check(q, k, v, do, mask, T, (H, W), kernel, path="structured")


def _structure_mask(st, T, H, W, group=1) -> torch.Tensor:
    """The (N, N) pairs the structured path lets through, rebuilt from its parts: text keys causal, then the image
    part of a band (its call's bias for query groups of ``group`` rows) or of column (causal per column) or causal
    over everything."""
    n = T + H * W
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if st.kind == "causal":
        return j <= i
    out = (j < T) & (j <= i)
    q, k = torch.arange(H * W)[:, None], torch.arange(H * W)[None, :]
    if st.kind == "column":
        img = (k % W == q % W) & (k <= q)
    else:  # the window of each query group, from its call's bias (or causal flag)
        group, span, causal, bias = st.call(group)
        win = torch.ones(1, H, W, W, dtype=torch.bool).tril() if causal else torch.isfinite(bias) \
            if bias is not None else torch.ones(1, H // group, group * W, span * W, dtype=torch.bool)
        g = q // (group * W)
        slot = k - (g * group - st.rows + 1) * W  # key's slot in its query group's window
        inside = (slot >= 0) & (slot < span * W)
        img = inside & win[0, g.expand(-1, H * W), (q % (group * W)).expand(-1, H * W), slot.clamp(0, span * W - 1)]
    out[T:, T:] = img
    return out


@pytest.mark.parametrize("mask", STRUCTURED)
def test_structure_is_the_dense_mask(mask):
    # The pairs each structure computes unmasked are exactly dense_mask's, at the paper layout and odd ones.
    for T, grid, kernel in [(256, (32, 32), 11), (7, (5, 3), 3), (1, (7, 9), 5), (20, (4, 6), 11), (0, (9, 4), 7)]:
        st = C.structure(mask, T, *grid, kernel)
        assert st is not None
        for group in (1, 2, 3):  # groups of query rows (1 where H is not a multiple)
            assert torch.equal(_structure_mask(st, T, *grid, group), masks.dense_mask(mask, T, grid, kernel)), \
                (mask, T, grid, group)
    assert C.structure("conv_torus", 256, 32, 32, 11) is None
    with pytest.raises(ValueError, match="no structured path"):
        C.pick_structure("conv_torus", 256, 32, 32, 11, path="structured")
    with pytest.raises(ValueError, match="path must be one of"):
        C.pick_structure(mask, 256, 32, 32, 11, path="fast")
    # auto: structured past SINGLE_TILE positions, one tile below; tile sizes given mean tiles
    assert C.pick_structure(mask, 256, 32, 32, 11) is not None
    assert C.pick_structure(mask, 16, 8, 8, 5) is None
    assert C.pick_structure(mask, 256, 32, 32, 11, 64, 64) is None


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
    # (auto takes the structured path there, where the mask has one; tested on its own above)
    T, H, W = 20, 9, 15
    q, k, v, do = make_inputs(1, 3, T + H * W, 32, torch.float32, "cpu", seed=29)
    assert T + H * W > C.SINGLE_TILE
    check(q, k, v, do, mask, T, (H, W), 11)
    check(q, k, v, do, mask, T, (H, W), 11, path="tiles")
    monkeypatch.setattr(C, "SCORE_BUDGET", 1)
    check(q, k, v, do, mask, T, (H, W), 11, path="tiles")


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


@pytest.mark.parametrize("path", ["tiles", "structured"])
@pytest.mark.parametrize("mask", ["row", "column", "conv"])
def test_cpu_strided_inputs_and_scale(mask, path):
    # q, k, v as views of one (B, N, 3, heads, d) projection, as a model produces them; a head_dim axis that is
    # not contiguous either; a custom scale.
    T, H, W = 4, 5, 7
    n = T + H * W
    qkv = torch.randn(2, n, 3, 2, 16, dtype=torch.float32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    do = torch.randn(2, 2, n, 16)
    check(q, k, v, do, mask, T, (H, W), 3, scale=0.3, path=path)
    qt = torch.randn(2, 2, 16, n).transpose(-1, -2)
    assert qt.stride(-1) != 1
    check(qt, k, v, do, mask, T, (H, W), 3, path=path)
    # one batch and heads of a (1, N, 3, heads, d) projection merge into one stride: read in place
    q, k, v = (qkv[:1, :, i].transpose(1, 2) for i in range(3))
    check(q, k, v, do[:1], mask, T, (H, W), 3, path=path)


@pytest.mark.parametrize("mask,path", [("row", "tiles"), ("row", "structured"), ("column", "structured"),
                                       ("causal", "structured")])
def test_cpu_does_not_write_inputs(mask, path):
    # fp32 contiguous inputs at a multiple of the tile size are read in place (no copy), and the structured path
    # reads them through strided views (band windows, transposed columns): they must stay intact.
    T, H, W = 64, 8, 8
    q, k, v, do = make_inputs(1, 2, T + H * W, 16, torch.float32, "cpu", seed=31)
    before = [t.clone() for t in (q, k, v, do)]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = C.cpu_attention(q, k, v, mask, T, (H, W), 3, 0.25, path=path)[0]
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


@pytest.mark.parametrize("path", ["tiles", "structured"])
def test_cpu_custom_op_opcheck(path):
    q, k, v = (torch.randn(1, 1, 2 + 3 * 3, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dalle_kernels.sparse_attention_cpu_fwd.default,
                          (q, k, v, "row", 2, 3, 3, 3, 0.25, 0, 0, path),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("shape", [(0, 2), (2, 0)], ids=["batch0", "heads0"])
def test_cpu_empty_batch_or_heads(shape):
    q = torch.randn(*shape, 7 + 15, 16, requires_grad=True)
    out = sparse_attention(q, q, q, mask="row", text_len=7, grid=(5, 3), backend="cpu")
    out.sum().backward()
    assert out.shape == q.shape and q.grad.shape == q.shape
