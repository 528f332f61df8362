"""orthogonalize: orthonormality and span against float64, on random, ill-conditioned, rank-deficient,
zero and extreme inputs; fp16 (CPU and GPU lanes) and bf16 (GPU lane); errors for bad input."""
import pytest
import torch

from dalle_kernels import orthogonalize, orthogonalize_list, orthogonalize_ref
from dalle_kernels.ops import orthogonalize as ortho_ops

# (max |Q^T Q - I|, relative span residual) allowed per input dtype
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(params=["torch", "triton", "triton_stream", "cuda", "cuda_emu", "cuda_emu_global"])
def backend(request, device, monkeypatch):
    """``triton``: small matrices take the register-resident kernel; ``triton_stream`` forces the streaming
    kernel (the one for large n) at the same small shapes. ``cuda_emu``: the CUDA kernel in the emulator (CPU
    tensors), which keeps small matrices in shared memory; ``cuda_emu_global`` makes it stream them through its
    global-memory workspace instead."""
    if request.param == "cuda" and device != "cuda":
        pytest.skip("CUDA backend: GPU lane only (run with --device=cuda)")
    if request.param == "triton_stream":
        monkeypatch.setattr(ortho_ops, "RESIDENT_ELEMENTS", 0)
        return "triton"
    if request.param.startswith("cuda_emu"):
        if device != "cpu" or not cuda_emu_built():
            pytest.skip("CUDA emulation lane: CPU tensors and a built dalle_kernels._C_emu")
        if request.param == "cuda_emu_global":
            from dalle_kernels._dispatch import emu_extension

            emu_extension().emu_set_shared_optin(0)
            request.addfinalizer(lambda: emu_extension().emu_set_shared_optin(-1))
        return "cuda_emu"
    return request.param


def cuda_emu_built():
    from dalle_kernels._dispatch import emu_extension_has

    return emu_extension_has("orthogonalize")


def errors(Q, P):
    """(orthonormality error, relative span residual, worst index) in float64, per batch."""
    Q64, P64 = Q.double(), P.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=Q.device)
    gram = (Q64.transpose(-1, -2) @ Q64 - eye).abs()
    proj = Q64 @ (Q64.transpose(-1, -2) @ P64)
    span = (proj - P64).norm() / P64.norm().clamp_min(1e-300)
    return gram.max().item(), span.item(), (gram == gram.max()).nonzero()[0].tolist()


def run(P, backend):
    X = P.clone()
    out = orthogonalize(X, backend=backend)
    assert out is X
    assert torch.isfinite(X).all(), "non-finite output"
    return X


def assert_orthonormal_span(Q, P, dtype, span=True):
    orth, res, where = errors(Q, P)
    assert orth <= TOL[dtype], f"|Q^T Q - I| = {orth:.3e} at {where} (dtype {dtype})"
    if span:
        assert res <= TOL[dtype], f"relative |Q Q^T P - P| = {res:.3e} (dtype {dtype})"


@pytest.mark.parametrize("shape", [(37, 1), (3, 37, 3), (2, 101, 8), (300, 5), (2, 8, 8)])
def test_random_matches_float64_reference(shape, backend, device):
    torch.manual_seed(sum(shape))
    P = torch.randn(shape, device=device)
    Q = run(P, backend)
    ref = orthogonalize_ref(P.double())
    # full rank -> the thin QR with diag(R) > 0 is unique; also check torch.linalg.qr agrees
    q, rr = torch.linalg.qr(P.double())
    q = q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)
    torch.testing.assert_close(ref, q, atol=1e-12, rtol=0)
    err = (Q.double() - ref).abs()
    assert err.max() <= 2e-5, f"max |Q - Q_ref| = {err.max():.3e} at {(err == err.max()).nonzero()[0].tolist()}"
    assert_orthonormal_span(Q, P, torch.float32)


def test_float64_reference_is_exact():
    torch.manual_seed(0)
    P = torch.randn(4, 61, 7, dtype=torch.float64)
    Q = orthogonalize_ref(P)
    assert Q.dtype == torch.float64
    assert_orthonormal_span(Q, P, torch.float64)
    X = P.clone()
    orthogonalize(X)  # auto: float64 goes to the reference
    torch.testing.assert_close(X, Q, atol=0, rtol=0)


@pytest.mark.parametrize("cond_exp", [4, 7])
def test_ill_conditioned(cond_exp, backend, device):
    torch.manual_seed(cond_exp)
    n, r = 120, 6
    U, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))
    sv = torch.logspace(0, -cond_exp, r, dtype=torch.float64)
    P = ((U * sv) @ V.T).float().to(device)
    Q = run(P, backend)
    # Householder keeps Q orthonormal however bad the conditioning (Gram-Schmidt loses it)
    assert_orthonormal_span(Q, P, torch.float32)


def test_rank_deficient_and_zero_columns(backend, device):
    torch.manual_seed(1)
    n = 53
    a, b = torch.randn(n, 1), torch.randn(n, 1)
    P = torch.cat([a, 2 * a, torch.zeros(n, 1), b, a - 3 * b, torch.zeros(n, 1)], dim=1)
    batch = torch.stack([P, torch.zeros(n, 6), torch.randn(n, 6)]).to(device)
    Q = run(batch, backend)
    for i in range(3):
        assert_orthonormal_span(Q[i], batch[i], torch.float32)
    # the all-zero matrix gives the first r columns of the identity
    torch.testing.assert_close(Q[1].cpu(), torch.eye(n, 6), atol=0, rtol=0)
    # a column in the span of earlier ones changes nothing about the earlier Q columns
    torch.testing.assert_close(Q[0][:, 0].cpu(), (a[:, 0] / a.norm()) * 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes(scale, backend, device):
    torch.manual_seed(2)
    P = torch.randn(2, 77, 4) * torch.tensor([scale, 1.0, scale, 1e-3])
    P = P.to(device)
    Q = run(P, backend)
    assert_orthonormal_span(Q, P, torch.float32)
    ref = orthogonalize_ref(P.double())
    assert (Q.double() - ref).abs().max() <= 2e-5


def test_fp16_input_accumulates_in_fp32(backend, device):
    torch.manual_seed(3)
    P = torch.randn(2, 211, 5, device=device).half()
    Q = run(P, backend)
    assert Q.dtype == torch.float16
    assert_orthonormal_span(Q, P, torch.float16)
    # only the final rounding to fp16 is lost: within a few fp16 ulps of the float64 answer
    ref = orthogonalize_ref(P.double())
    assert (Q.double() - ref).abs().max() <= 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("b", ["triton", "cuda"])
def test_bf16_gpu(b, cuda_only):
    torch.manual_seed(4)
    P = torch.randn(3, 4096, 16, device="cuda").bfloat16()
    Q = run(P, b)
    assert Q.dtype == torch.bfloat16
    assert_orthonormal_span(Q, P, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("b", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(200, 4096, 4), (2, 65536, 64), (5, 1000, 33), (1, 64, 64)])
def test_paper_shapes_gpu(b, shape, cuda_only):
    torch.manual_seed(5)
    P = torch.randn(shape, device="cuda")
    Q = run(P, b)
    assert_orthonormal_span(Q, P, torch.float32)
    assert (Q.double() - orthogonalize_ref(P.double())).abs().max() <= 1e-4


def test_strided_input(backend, device):
    torch.manual_seed(6)
    base = torch.randn(3, 5, 90, device=device)
    middle = base[1].clone()
    P = base.transpose(1, 2)[::2]  # (2, 90, 5), non-contiguous
    expect = orthogonalize_ref(P.double())
    out = orthogonalize(P, backend=backend)
    assert out.data_ptr() == base.data_ptr()
    assert (base.transpose(1, 2)[::2].double() - expect).abs().max() <= 2e-5
    torch.testing.assert_close(base[1], middle, atol=0, rtol=0)  # not part of P: untouched


def test_list_of_mixed_shapes(backend, device):
    torch.manual_seed(7)
    mats = [torch.randn(s, device=device) for s in [(40, 2), (33, 3), (40, 2), (33, 3), (50, 1)]]
    expect = [orthogonalize_ref(m.double()) for m in mats]
    out = orthogonalize_list(mats, backend=backend)
    assert out is mats
    for i, (m, e) in enumerate(zip(mats, expect)):
        assert (m.double() - e).abs().max() <= 2e-5, f"tensors[{i}]"


def test_bad_input():
    with pytest.raises(TypeError, match="P must be a torch.Tensor"):
        orthogonalize([[1.0]])
    with pytest.raises(TypeError, match="dtype"):
        orthogonalize(torch.ones(8, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(n, r\) or \(batch, n, r\)"):
        orthogonalize(torch.ones(8))
    with pytest.raises(ValueError, match=r"shape \(n, r\) or \(batch, n, r\)"):
        orthogonalize(torch.ones(2, 2, 8, 2))
    with pytest.raises(ValueError, match="n >= r"):
        orthogonalize(torch.ones(3, 4))
    with pytest.raises(ValueError, match="at least one column"):
        orthogonalize(torch.ones(3, 0))
    with pytest.raises(ValueError, match="backend must be one of"):
        orthogonalize(torch.ones(3, 2), backend="fast")
    with pytest.raises(ValueError, match="tensors on cpu"):
        orthogonalize(torch.ones(3, 2), backend="cuda")
    with pytest.raises(TypeError, match="list or tuple"):
        orthogonalize_list(torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        orthogonalize_list([torch.ones(3, 2), torch.ones(2, 3)])


def test_kernel_limits_fall_back_under_auto(device):
    if device == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs the Triton interpreter on the CPU lane")
    P = torch.randn(70, 65, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="at most r=64"):
        orthogonalize(P.clone(), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        orthogonalize(P.double(), backend="triton")
    Q = orthogonalize(P.clone())  # auto -> reference for r > 64
    assert_orthonormal_span(Q, P, torch.float32)


def test_empty_batch(backend, device):
    P = torch.empty(0, 10, 3, device=device)
    assert orthogonalize(P, backend=backend) is P


def test_cuda_entry_point_validates_before_launch():
    """The raw-pointer entry point rejects bad sizes/dtypes with a ValueError (no GPU needed: nothing launches)."""
    from dalle_kernels._dispatch import cuda_extension_has

    if not cuda_extension_has("orthogonalize"):
        pytest.skip("CUDA extension not built (DALLE_KERNELS_CUDA=1 pip install --no-build-isolation -e .)")
    from dalle_kernels._cuda import ext

    fn = ext("orthogonalize").orthogonalize
    good = dict(p=1, w=2, batch=1, n=8, r=4, stride_pb=32, stride_pn=4, stride_pr=1, stride_wb=32, stride_wn=4,
                stride_wr=1, dtype=0, stream=0)
    for bad, msg in [(dict(n=3), "n >= r"), (dict(r=65), r"r must be in \[1, 64\]"), (dict(r=0), "r must be"),
                     (dict(dtype=3), "dtype must be"), (dict(batch=-1), "batch must be"),
                     (dict(dtype=1, w=1), "fp32 workspace"), (dict(p=0), "null data pointer")]:
        with pytest.raises(ValueError, match=msg):
            fn(**{**good, **bad})
    fn(**{**good, "batch": 0, "p": 0, "w": 0})  # empty batch: nothing to do


def test_refuses_a_tensor_that_requires_grad():
    P = torch.randn(8, 3, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        orthogonalize(P, backend="torch")
    with torch.no_grad():
        orthogonalize(P, backend="torch")
    torch.testing.assert_close(P.detach().T @ P.detach(), torch.eye(3), atol=1e-5, rtol=0)
