"""sparse_attention: Triton and torch backends against a float64 reference, lookup tables, errors, torch.compile.

CPU lane (default): Triton kernels in the interpreter at small, odd shapes with 16 x 16 tiles, fp32 and fp16.
GPU lane (``--device=cuda``): the same tests on the GPU with the real tile configs, plus bigger shapes and bf16.
"""
import os

import pytest
import torch

from dalle_kernels import masks, sparse_attention
from dalle_kernels._bench import peak_memory_mb
from dalle_kernels.ops import attention as A
from dalle_kernels.ops.attention import attention_ref

# (atol, rtol) against the float64 reference, for outputs and gradients (gradients are scaled by their max).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 5e-2)}


def assert_close(name, got, ref, dtype, factor=1.0):
    """|got - ref| <= atol * scale + rtol * |ref|, scale = factor * max(1, max|ref|); prints the worst index."""
    atol, rtol = TOL[dtype]
    atol *= factor
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    scale = max(1.0, ref.abs().max().item())
    excess = (got - ref).abs() - (atol * scale + rtol * ref.abs())
    worst = int(excess.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    assert excess.max() <= 0, (f"{name}: worst at {idx}: got {got[idx].item():.6g}, ref {ref[idx].item():.6g}, "
                               f"max abs err {(got - ref).abs().max().item():.3g} (scale {scale:.3g})")


def make_inputs(B, heads, n, d, dtype, device, magnitude=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = q * magnitude, k * magnitude
    do = torch.randn(B, heads, n, d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def reference(q, k, v, do, mask, T, grid, kernel, scale=None):
    """Float64 output and gradients of the definition, on float64 copies of the (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = attention_ref(q64, k64, v64, mask, T, grid, kernel, scale, upcast=torch.float64)
    grads = torch.autograd.grad(o, (q64, k64, v64), do.double())
    return o.detach(), grads


def run_backend(q, k, v, do, backend, mask, T, grid, kernel, scale=None, **blocks):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if blocks:
        _, _, _, s = A.check_inputs(q, k, v, mask, T, grid, kernel, scale)
        o = A.triton_attention(q, k, v, mask, T, grid, kernel, s, **blocks)[0]
    else:
        o = sparse_attention(q, k, v, mask=mask, text_len=T, grid=grid, kernel=kernel, scale=scale, backend=backend)
    assert o.shape == q.shape and o.dtype == q.dtype
    o.backward(do)
    return o.detach(), (q.grad, k.grad, v.grad)


def check_against_reference(q, k, v, do, backend, mask, T, grid, kernel, scale=None, grad_factor=1.0, **blocks):
    ref_o, ref_g = reference(q, k, v, do, mask, T, grid, kernel, scale)
    o, grads = run_backend(q, k, v, do, backend, mask, T, grid, kernel, scale, **blocks)
    assert_close(f"{backend}/{mask} out", o, ref_o, q.dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_g):
        assert_close(f"{backend}/{mask} {name}", g, r, q.dtype, grad_factor if name != "dv" else 1.0)


def skip_dtype(dtype, device):
    if dtype == torch.bfloat16 and device != "cuda":
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter: bf16 runs in the GPU lane")


# Small odd shapes: (text_len, H, W, kernel, head_dim). Text 1..20, grids 5x3 / 7x9 / 4x6, conv 3/5/11.
SHAPES = [(7, 5, 3, 3, 32), (1, 7, 9, 5, 16), (20, 4, 6, 11, 64)]


# Every mask at every shape in fp32; fp16 and bf16 (GPU lane) each at two shapes per mask, rotating so every
# shape is covered in every dtype (the interpreter is slow: this keeps the CPU lane inside its time share).
FLOAT64_CASES = [(mask, shape, dtype) for mi, mask in enumerate(masks.MASKS) for si, shape in enumerate(SHAPES)
                 for dtype in (torch.float32, torch.float16, torch.bfloat16)
                 if dtype == torch.float32 or si != mi % len(SHAPES)]


@pytest.mark.parametrize("mask,shape,dtype", FLOAT64_CASES,
                         ids=lambda x: "T{}_{}x{}_k{}_d{}".format(*x) if isinstance(x, tuple) else str(x).replace("torch.", ""))
def test_triton_matches_float64(device, mask, shape, dtype):
    skip_dtype(dtype, device)
    T, H, W, kernel, d = shape
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, device, seed=len(mask) * 31 + T)
    check_against_reference(q, k, v, do, "triton", mask, T, (H, W), kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask", masks.MASKS)
def test_torch_backend_matches_float64(device, mask, dtype):
    T, H, W, kernel, d = 5, 7, 9, 5, 16
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, device, seed=3)
    check_against_reference(q, k, v, do, "torch", mask, T, (H, W), kernel)


@pytest.mark.parametrize("mask", ["row", "column"])
def test_head_dim_128(device, mask):
    q, k, v, do = make_inputs(1, 1, 3 + 3 * 5, 128, torch.float32, device, seed=5)
    check_against_reference(q, k, v, do, "triton", mask, 3, (3, 5), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask", ["conv", "column", "causal"])
def test_large_logits_do_not_overflow(device, mask, dtype):
    # Logits of several hundred: exp() would overflow without the running max; softmax is nearly one-hot.
    magnitude = 12.0
    q, k, v, do = make_inputs(1, 2, 6 + 4 * 5, 32, dtype, device, magnitude=magnitude, seed=7)
    logits = (q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5
    assert logits.abs().max() > 200
    # dQ and dK scale with |k| and |q|. In fp16 their error is set by delta = rowsum(dO * O) read from the
    # fp16 output O (as in FlashAttention): it cancels against dO V^T when softmax is one-hot, and the
    # rounding of O is multiplied by |k|. So their absolute tolerance grows with the inputs' magnitude.
    check_against_reference(q, k, v, do, "triton", mask, 6, (4, 5), 3, grad_factor=magnitude)


@pytest.mark.parametrize("blocks", [dict(block_m=32, block_n=16), dict(block_m=16, block_n=32)],
                         ids=["32x16", "16x32"])
@pytest.mark.parametrize("mask", ["column", "conv", "conv_torus"])
def test_non_square_tiles(device, mask, blocks):
    q, k, v, do = make_inputs(1, 1, 9 + 6 * 7, 16, torch.float32, device, seed=11)
    check_against_reference(q, k, v, do, "triton", mask, 9, (6, 7), 5, **blocks)


def test_strided_inputs_and_scale(device):
    # q, k, v as views of one (B, N, 3, heads, d) projection, as a model produces them; a custom scale.
    T, H, W = 4, 5, 5
    n = T + H * W
    qkv = torch.randn(2, n, 3, 2, 16, dtype=torch.float32, device=device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    do = torch.randn(2, 2, n, 16, device=device)
    check_against_reference(q, k, v, do, "triton", "row", T, (H, W), 3, scale=0.3)


# ----------------------------------------------------------------------------------------------------------------
# Lookup tables and the Triton predicate.

@pytest.mark.parametrize("mask", masks.MASKS)
@pytest.mark.parametrize("T,H,W,kernel,bm,bn", [(7, 5, 3, 3, 16, 16), (20, 7, 9, 5, 16, 32), (256, 32, 32, 11, 64, 32),
                                                (0, 8, 8, 3, 32, 16), (3, 4, 4, 11, 64, 64)])
def test_block_tables_equal_tile_or_of_dense_mask(mask, T, H, W, kernel, bm, bn):
    dense = masks.dense_mask(mask, T, (H, W), kernel)
    if mask == "column":  # the kernels run column in the transposed layout
        perm = masks.column_permutation(T, (H, W))
        dense = dense[perm][:, perm]
    n = dense.shape[0]
    tables = masks.block_tables(mask, T, (H, W), kernel, bm, bn)
    nqb, nkb = -(-n // bm), -(-n // bn)
    for m in range(nqb):
        for kb in range(nkb):
            tile = dense[m * bm:(m + 1) * bm, kb * bn:(kb + 1) * bn]
            inside = (m + 1) * bm <= n and (kb + 1) * bn <= n
            listed = tables.q_lut[m, :tables.q_count[m]].tolist()
            assert (kb in listed) == bool(tile.any()), (m, kb)
            if kb in listed:
                assert tables.q_full[m, listed.index(kb)] == int(inside and bool(tile.all())), (m, kb)
            listed_t = tables.k_lut[kb, :tables.k_count[kb]].tolist()
            assert (m in listed_t) == bool(tile.any()), (m, kb)
            if m in listed_t:
                assert tables.k_full[kb, listed_t.index(m)] == int(inside and bool(tile.all())), (m, kb)
    assert tables.q_lut.dtype == torch.int32 and tables.k_lut.dtype == torch.int32
    assert masks.block_tables(mask, T, (H, W), kernel, bm, bn) is tables  # cached


def test_tile_counts_match_spec_table():
    # Work relative to dense causal at the paper shape, 64 x 64 and 64 x 32 tiles.
    expected = {(64, 64): {"row": 0.50, "column": 0.43, "conv": 0.63},
                (64, 32): {"row": 0.46, "column": 0.43, "conv": 0.63}}
    for (bm, bn), ratios in expected.items():
        for mask, ratio in ratios.items():
            got = masks.tile_stats(mask, 256, (32, 32), 11, bm, bn)["ratio"]
            assert abs(got - ratio) < 0.005, (mask, bm, bn, got)


@pytest.mark.parametrize("mask", masks.MASKS)
def test_triton_predicate_equals_dense_mask(device, mask):
    import triton
    import triton.language as tl

    @triton.jit
    def _write_mask(Out_ptr, N, T, H, W, S, MASK: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = masks.tl_allowed(i[:, None], j[None, :], T, H, W, S, MASK)
        inside = (i[:, None] < N) & (j[None, :] < N)
        tl.store(Out_ptr + i[:, None] * N + j[None, :], ok.to(tl.int8), mask=inside)

    for T, H, W, kernel in [(6, 4, 4, 3), (5, 7, 9, 5), (1, 5, 3, 3), (13, 3, 12, 11)]:
        n = T + H * W
        out = torch.zeros(n, n, dtype=torch.int8, device=device)
        _write_mask[(triton.cdiv(n, 16), triton.cdiv(n, 16))](out, n, T, H, W, kernel // 2,
                                                              MASK=masks.MASK_CODES[mask], BLOCK=16)
        expected = masks.kernel_mask(mask, T, (H, W), kernel, device=device)
        assert torch.equal(out.bool(), expected), (mask, T, H, W, (out.bool() ^ expected).nonzero()[:5].tolist())


# ----------------------------------------------------------------------------------------------------------------
# Bad input.

def _qkv(n=6 + 9, d=16, dtype=torch.float32):
    return [torch.randn(1, 2, n, d, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("change,exc,match", [
    (dict(text_len=5), ValueError, "sequence length"),
    (dict(grid=(4, 3)), ValueError, "sequence length"),
    (dict(mask="diagonal"), ValueError, "mask must be one of"),
    (dict(kernel=4), ValueError, "kernel must be a positive odd"),
    (dict(kernel=0), ValueError, "kernel must be a positive odd"),
    (dict(kernel=-3), ValueError, "kernel must be a positive odd"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(backend="cudnn"), ValueError, "backend must be one of"),
])
def test_bad_arguments(change, exc, match):
    q, k, v = _qkv()
    args = dict(mask="row", text_len=6, grid=(3, 3), kernel=3, scale=None, backend="torch") | change
    with pytest.raises(exc, match=match):
        sparse_attention(q, k, v, **args)


def test_bad_tensors():
    q, k, v = _qkv()
    call = dict(mask="row", text_len=6, grid=(3, 3), kernel=3, backend="torch")
    with pytest.raises(ValueError, match="k shape"):
        sparse_attention(q, k[:, :1], v, **call)
    with pytest.raises(TypeError, match="v dtype"):
        sparse_attention(q, k, v.half(), **call)
    with pytest.raises(ValueError, match="k is on meta"):
        sparse_attention(q, k.to("meta"), v, **call)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        sparse_attention(q.numpy(), k, v, **call)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        sparse_attention(q.double(), k.double(), v.double(), **call)
    with pytest.raises(ValueError, match="shape"):
        sparse_attention(q[0], k[0], v[0], **call)
    qh, kh, vh = _qkv(d=48)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        sparse_attention(qh, kh, vh, **call)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    # The dispatcher reads TRITON_INTERPRET per call.
    q, k, v = _qkv()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sparse_attention(q, k, v, mask="row", text_len=6, grid=(3, 3), kernel=3, backend="triton")
    out = sparse_attention(q, k, v, mask="row", text_len=6, grid=(3, 3), kernel=3, backend="auto")
    cpu = sparse_attention(q, k, v, mask="row", text_len=6, grid=(3, 3), kernel=3, backend="cpu")
    assert torch.equal(out, cpu)  # auto without the interpreter is the block-sparse CPU path itself


# ----------------------------------------------------------------------------------------------------------------
# torch.compile traces through the custom op without graph breaks.

@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on CPU")
    check_torch_compile(device, backend)


def check_torch_compile(device, backend):
    """A conv-masked attention block compiled with ``fullgraph=True``: loss and gradient equal eager ones."""
    torch._dynamo.reset()
    T, H, W = 3, 4, 5

    def block(x, wq):
        q = k = v = (x @ wq).unflatten(-1, (2, 16)).transpose(1, 2)
        o = sparse_attention(q, k, v, mask="conv", text_len=T, grid=(H, W), kernel=3, backend=backend)
        return o.transpose(1, 2).flatten(2).sum()

    x = torch.randn(2, T + H * W, 32, device=device)
    wq = torch.randn(32, 32, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x, wq)
    (g,) = torch.autograd.grad(loss, wq)
    wq2 = wq.detach().clone().requires_grad_()
    loss_eager = block(x, wq2)
    (g_eager,) = torch.autograd.grad(loss_eager, wq2)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-4)


def test_custom_op_opcheck(device):
    q, k, v = (torch.randn(1, 1, 2 + 3 * 3, 16, device=device, requires_grad=True) for _ in range(3))
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on CPU")
    torch.library.opcheck(torch.ops.dalle_kernels.sparse_attention_fwd.default,
                          (q, k, v, "row", 2, 3, 3, 3, 0.25, 0, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------------------------
# Mask pictures.

def test_mask_png(tmp_path):
    paths = masks.save_mask_pngs(tmp_path, sizes=[(6, (4, 4), 3, 8)])
    assert {p.name for p in paths} == {f"{m}.png" for m in masks.MASKS} | {"column_transposed.png"}
    from PIL import Image

    img = Image.open(tmp_path / "conv.png").convert("RGB")
    cell, margin = masks.PNG_CELL, masks.PNG_MARGIN
    # Query 6 + 5 (image 5) sees image key 0 (position 6) but not image key 3 (README's The masks).
    px = lambda img, i, j: img.getpixel((margin + j * cell + cell // 2, margin + i * cell + cell // 2))
    assert px(img, 11, 6) == masks.PNG_COLORS["image"] and px(img, 11, 9) == masks.PNG_COLORS["visited"]
    assert px(img, 2, 10) == masks.PNG_COLORS["off"]  # text query, image key: a tile the kernel skips
    assert px(img, 11, 2) == masks.PNG_COLORS["text"]
    # conv_torus: the last query (image 15) sees the wrapped top row's image key 0; axial_row does not see the
    # previous row's image key 11, only its own row from key 12.
    torus, axial = (Image.open(tmp_path / f"{m}.png").convert("RGB") for m in ("conv_torus", "axial_row"))
    assert px(torus, 21, 6) == masks.PNG_COLORS["image"] and px(torus, 21, 7) != masks.PNG_COLORS["image"]
    assert px(axial, 21, 18) == masks.PNG_COLORS["image"] and px(axial, 21, 17) != masks.PNG_COLORS["image"]


def test_mask_command_line(tmp_path):
    """``python -m dalle_kernels masks`` writes the PNGs and the tile table, with no warning from runpy."""
    import subprocess
    import sys

    cmd = [sys.executable, "-W", "error", "-m", "dalle_kernels", "masks", "--out", str(tmp_path),
           "--tiles", "--block", "64", "32"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {f"{m}.png" for m in masks.MASKS}
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 64 x 32 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["row", "column", "conv", "conv_clipped", "conv_torus",
                                                        "axial_row"]
    s = masks.tile_stats("column", 256, (32, 32), 11, 64, 32)
    assert rows[1].split("|")[3].strip() == str(s["tiles"])
    bad = subprocess.run([sys.executable, "-m", "dalle_kernels", "nosuch"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "unknown command 'nosuch'" in bad.stderr


# ----------------------------------------------------------------------------------------------------------------
# GPU lane: bigger shapes, bf16, the real tile configs.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", masks.MASKS)
def test_gpu_paper_like_shapes(cuda_only, mask, d, dtype):
    T, H, W, kernel = 64, 16, 16, 11
    q, k, v, do = make_inputs(2, 3, T + H * W, d, dtype, "cuda", seed=13)
    check_against_reference(q, k, v, do, "triton", mask, T, (H, W), kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["row", "column", "conv"])
def test_gpu_paper_shape_large_logits_bf16(cuda_only, mask):
    q, k, v, do = make_inputs(1, 2, 256 + 32 * 32, 64, torch.bfloat16, "cuda", magnitude=8.0, seed=17)
    check_against_reference(q, k, v, do, "triton", mask, 256, (32, 32), 11)


@pytest.mark.gpu
def test_gpu_extra_memory_is_linear_in_n(cuda_only):
    # Forward + backward at the paper's sequence: peak memory above the inputs stays a few times q's size
    # (o, dq, dk, dv, dO, row statistics), far below one (B, heads, N, N) score matrix.
    B, heads, T, H, W, d = 2, 4, 256, 32, 32, 64
    n = T + H * W
    q, k, v, do = make_inputs(B, heads, n, d, torch.bfloat16, "cuda", seed=19)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        sparse_attention(q, k, v, mask="conv", text_len=T, grid=(H, W), backend="triton").backward(do)
        torch.cuda.synchronize()
        q.grad = k.grad = v.grad = None

    step()  # the first call compiles and caches the lookup tables
    extra = peak_memory_mb(step, "cuda") * 2**20
    assert extra <= 8 * q.nbytes, (extra, q.nbytes)
    assert extra < B * heads * n * n, (extra, "a quarter of one fp32 (B, heads, N, N) score matrix")
