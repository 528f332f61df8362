"""sparse_attention's CUDA kernels (csrc/attention.cu): forward and the three gradients against float64.

CPU lane: ``backend="cuda_emu"``, the kernels run in the CUDA emulator (dalle_kernels._C_emu) with its racecheck
and memcheck on every launch (a race, an access outside the tensors or a write to an input fails the test), at
small odd shapes, every mask, fp32, fp16 and bf16 (no Triton interpreter is involved): fp16/bf16 on the
tensor-core kernels (mma.sync, ldmatrix, cp.async; forward 64 x 64 tiles, 64 x 32 for head_dim 128, backward
64 x 64), fp32 on the fp32 CUDA-core kernels with 16 x 16 tiles, those kernels' GPU tiles (64, or 32 for head_dim
128) at one shape each, and fp16/bf16 through the CUDA-core kernels (a 16 x 16 ``block``). GPU lane (``--device=cuda``): ``backend="cuda"``, the same checks at the GPU's
tiles.
"""
import os

import pytest
import torch

from dalle_kernels import _dispatch, masks, sparse_attention
from dalle_kernels._cuda_emu import CudaEmuError
from dalle_kernels.ops import attention as A
from test_attention import SHAPES, assert_close, check_torch_compile, make_inputs, reference


@pytest.fixture
def backend(device):
    """``cuda_emu`` on CPU (a clean skip where the emulator is not built, a failure where CI asked for it),
    ``cuda`` on the GPU lane."""
    if device == "cuda":
        if not _dispatch.cuda_extension_has("attention_forward"):
            pytest.skip("dalle_kernels._C not built with attention_forward")
        return "cuda"
    if not _dispatch.emu_extension_has("attention_forward"):
        if os.environ.get("DALLE_KERNELS_CUDA_EMU") == "1":
            pytest.fail(f"DALLE_KERNELS_CUDA_EMU=1 but dalle_kernels._C_emu lacks attention_forward: "
                        f"{_dispatch._load_emu_extension()[1]}")
        pytest.skip("dalle_kernels._C_emu not built (DALLE_KERNELS_CUDA_EMU=1 python setup.py build_ext --inplace)")
    return "cuda_emu"


def run_cuda(q, k, v, do, mask, T, grid, kernel, scale=None, block=0):
    """Output and gradients through the CUDA custom op (``block`` > 0: that tile instead of the default)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, _, _, s = A.check_inputs(q, k, v, mask, T, grid, kernel, scale)
    o = A.cuda_attention(q, k, v, mask, T, grid, kernel, s, block)[0]
    assert o.shape == q.shape and o.dtype == q.dtype
    o.backward(do)
    return o.detach(), (q.grad, k.grad, v.grad)


def check(q, k, v, do, mask, T, grid, kernel, scale=None, block=0, grad_factor=1.0):
    ref_o, ref_g = reference(q, k, v, do, mask, T, grid, kernel, scale)
    o, grads = run_cuda(q, k, v, do, mask, T, grid, kernel, scale, block)
    what = f"cuda/{mask} {q.dtype} T={T} grid={grid} k={kernel} d={q.shape[-1]} block={block or 'default'}"
    assert_close(f"{what} out", o, ref_o, q.dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_g):
        assert_close(f"{what} {name}", g, r, q.dtype, grad_factor if name != "dv" else 1.0)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_{}x{}_k{}_d{}".format(*s))
@pytest.mark.parametrize("mask", masks.MASKS)
def test_cuda_matches_float64(backend, device, mask, shape, dtype):
    """Every mask, text lengths 7/1/20, grids 5x3/7x9/4x6, conv 3/5/11, head_dim 32/16/64, every dtype."""
    T, H, W, kernel, d = shape
    q, k, v, do = make_inputs(2, 2, T + H * W, d, dtype, device, seed=len(mask) * 31 + T)
    check(q, k, v, do, mask, T, (H, W), kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mask", ["row", "column", "conv_torus"])
def test_head_dim_128(backend, device, mask, dtype):
    q, k, v, do = make_inputs(1, 1, 3 + 3 * 5, 128, dtype, device, seed=5)
    check(q, k, v, do, mask, 3, (3, 5), 3)


@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("mask", ["conv", "column"])
def test_gpu_tiles(backend, device, mask, d):
    """fp32 on the CUDA-core kernels at the square tiles the GPU runs (64 x 64; 32 x 32 for head_dim 128), over
    several blocks."""
    T, H, W = (9, 11, 13) if d < 128 else (5, 7, 9)
    q, k, v, do = make_inputs(1, 1, T + H * W, d, torch.float32, device, seed=d)
    assert A.cuda_tiles(d, torch.float32, torch.device("cuda")) == ((A.CUDA_TILES[d],) * 2, A.CUDA_TILES[d])
    check(q, k, v, do, mask, T, (H, W), 5, block=A.CUDA_TILES[d])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("mask", ["causal", "conv", "column", "row"])
def test_tensor_cores_over_several_blocks(backend, device, mask, d, dtype):
    """The tensor-core kernels over several 64-row query blocks and key tiles (the cp.async double buffers turn
    over), with tiles the tables mark full (causal, at 64 x 64: no predicate there) and partial."""
    T, H, W = 10, 11, 13
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, device, seed=d + 1)
    (bm, bn), _ = A.cuda_tiles(d, dtype, q.device)
    assert (bm, bn) == A.CUDA_MMA_TILES[d]
    tables = masks.block_tables(mask, T, (H, W), 5, bm, bn)
    assert tables.q_count.max() > 2 or mask != "causal"
    if mask == "causal":
        assert tables.full > 0
    check(q, k, v, do, mask, T, (H, W), 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", masks.MASKS)
def test_cuda_core_forward_of_16_bit_inputs(backend, device, mask, dtype):
    """fp16/bf16 through the CUDA-core forward (what a square ``block`` selects) at 16 x 16 tiles."""
    T, H, W, kernel, d = 7, 5, 3, 3, 32
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, device, seed=9)
    check(q, k, v, do, mask, T, (H, W), kernel, block=16)


def test_misaligned_rows_are_copied_for_the_tensor_cores(backend, device):
    """Rows that do not start on 16-byte boundaries (odd storage offset, odd row stride): the launcher copies them
    for the tensor-core forward's cp.async; the result is unchanged."""
    T, H, W, n, d = 5, 4, 6, 29, 32
    base = torch.randn(2 * n * (d + 1) + 1, device=device).half()
    q = base[1:1 + 2 * n * (d + 1)].view(1, 2, n, d + 1)[..., :d]
    assert q.data_ptr() % 16 != 0 and q.stride(2) % 8 != 0
    _, k, v, do = make_inputs(1, 2, n, d, torch.float16, device, seed=4)
    check(q, k, v, do, "conv", T, (H, W), 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mask", ["conv", "column", "causal"])
def test_large_logits_do_not_overflow(backend, device, mask, dtype):
    # Logits of several hundred: exp() would overflow without the running max; softmax is nearly one-hot. dQ and
    # dK scale with |k| and |q| (see test_attention.test_large_logits_do_not_overflow).
    magnitude = 12.0
    q, k, v, do = make_inputs(1, 2, 6 + 4 * 5, 32, dtype, device, magnitude=magnitude, seed=7)
    assert ((q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5).abs().max() > 200
    check(q, k, v, do, mask, 6, (4, 5), 3, grad_factor=magnitude)


def test_strided_inputs_and_scale(backend, device):
    """q, k, v as views of one (B, N, 3, heads, d) projection (any batch/head/row strides); a head_dim axis that is
    not contiguous (copied by the launcher); a custom scale."""
    T, H, W = 4, 5, 5
    n = T + H * W
    qkv = torch.randn(2, n, 3, 2, 16, device=device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    do = torch.randn(2, 2, n, 16, device=device)
    check(q, k, v, do, "row", T, (H, W), 3, scale=0.3)
    qt = torch.randn(2, 2, 16, n, device=device).transpose(-1, -2)
    assert qt.stride(-1) != 1
    check(qt, k, v, do.transpose(-1, -2).contiguous().transpose(-1, -2), "conv_clipped", T, (H, W), 3)


def test_public_function_and_errors(backend, device):
    q, k, v, do = make_inputs(1, 2, 6 + 3 * 3, 16, torch.float32, device, seed=1)
    out = sparse_attention(q, k, v, mask="row", text_len=6, grid=(3, 3), kernel=3, backend=backend)
    assert_close("public", out, reference(q, k, v, do, "row", 6, (3, 3), 3)[0], torch.float32)
    other = "cuda" if backend == "cuda_emu" else "cuda_emu"
    with pytest.raises(ValueError, match="cuda"):
        sparse_attention(q, k, v, mask="row", text_len=6, grid=(3, 3), kernel=3, backend=other)
    if device == "cpu":
        assert A._resolve_backend("auto", q.device, q.dtype) in ("triton", "cpu")  # auto never emulates


def test_entry_points_check_before_launch(backend):
    """The entry points reject bad sizes, tables and pointers with a ValueError naming the argument."""
    if backend != "cuda_emu":
        pytest.skip("the emulator's entry points (test_cuda_build checks the compiled ones)")
    mod = _dispatch.emu_extension()
    good = dict(q=1, k=1, v=1, o=1, lse=1, lut=1, full=1, count=1, batch=1, heads=2, n=15, head_dim=16,
                stride_qb=1, stride_qh=1, stride_qn=1, stride_kb=1, stride_kh=1, stride_kn=1, stride_vb=1,
                stride_vh=1, stride_vn=1, stride_ob=1, stride_oh=1, stride_on=1, lut_rows=1, lut_w=1, mask=1,
                text_len=6, H=3, W=3, kernel=3, scale=0.25, block_m=16, block_n=16, dtype=0, stream=0)
    cases = [(dict(head_dim=48), "head_dim must be 16, 32, 64 or 128"), (dict(n=16), "n must equal"),
             (dict(mask=7), "mask code"), (dict(block_m=32, block_n=32), "tiles must be square with block 16"),
             (dict(block_m=64, block_n=32), "tiles must be square"), (dict(lut_rows=2), "one row per block"),
             (dict(lut_w=0), "table width"), (dict(dtype=3), "dtype must be"), (dict(q=0), "q: null data pointer"),
             (dict(stride_kn=-1), "k strides"), (dict(kernel=4), "kernel must be"), (dict(scale=0.0), "scale"),
             (dict(batch=0), "batch and heads")]
    # the tensor-core forward (fp16/bf16, 64 x 64 tiles): rows must start on 16-byte boundaries
    mma = good | dict(n=6 + 63, H=7, W=9, dtype=1, block_m=64, block_n=64, lut_rows=2, q=16, k=16, v=16)
    mma |= {f"stride_{t}{a}": 16 for t in "qkvo" for a in "bhn"}
    cases += [(mma | dict(q=8), "16-byte aligned"), (mma | dict(dtype=2, stride_vn=12), "16-byte aligned"),
              (mma | dict(lut_rows=1), "one row per block")]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            mod.attention_forward(**(good | change))


def test_custom_op_opcheck(backend, device):
    q, k, v = (torch.randn(1, 1, 2 + 3 * 3, 16, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dalle_kernels.sparse_attention_cuda_fwd.default,
                          (q, k, v, "row", 2, 3, 3, 3, 0.25, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph(backend, device):
    check_torch_compile(device, backend)
