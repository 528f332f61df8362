"""backend="auto" never picks a path the package knows to be wrong; an explicit backend that cannot be right is
refused with an error naming the alternative. The known case: the Triton interpreter's tl.dot on bfloat16."""
import inspect
from types import SimpleNamespace

import pytest
import torch

from dalle_kernels import (attention_ref, logit_laplace_loss, logit_laplace_loss_ref, orthogonalize,
                           orthogonalize_ref, sparse_attention)
from dalle_kernels import _dispatch
from dalle_kernels.ops import attention, logit_laplace
from dalle_kernels.ops import orthogonalize as orthogonalize_module

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fake(device, dtype):
    """What resolve_backend reads of a tensor: a CUDA one can be described without a GPU."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


@pytest.fixture
def interpreter(monkeypatch):
    """The interpreter switched on for resolve_backend alone (no kernel runs under this fixture)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def cpu_lane(device):
    """Kernels run on CPU tensors: only in the CPU lane, where TRITON_INTERPRET=1 was set before triton loaded."""
    if device != "cpu" or not _dispatch.triton_interpreter_enabled():
        pytest.skip("CPU lane only (Triton interpreter)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("triton_dot", [True, False])
def test_auto_cpu_interpreter(interpreter, dtype, triton_dot):
    got = _dispatch.resolve_backend("auto", fake("cpu", dtype), triton_dot=triton_dot)
    wrong = triton_dot and dtype == torch.bfloat16
    assert got == ("torch" if wrong else "triton")
    assert (_dispatch.known_wrong("triton", fake("cpu", dtype), triton_dot=triton_dot) is not None) == wrong


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_cpu_without_interpreter(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.resolve_backend("auto", fake("cpu", dtype), triton_dot=True) == "torch"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_cuda_tensors_keep_triton(interpreter, dtype):
    # Compiled Triton's bf16 tl.dot is right: the rule is about the interpreter only.
    assert _dispatch.resolve_backend("auto", fake("cuda", dtype), triton_dot=True) == "triton"
    assert _dispatch.known_wrong("triton", fake("cuda", dtype), triton_dot=True) is None


def test_explicit_triton_refused_for_bf16_dot_in_interpreter(interpreter):
    with pytest.raises(ValueError, match=r"tl\.dot on torch\.bfloat16.*Use backend='torch'"):
        _dispatch.resolve_backend("triton", fake("cpu", torch.bfloat16), triton_dot=True)
    assert _dispatch.resolve_backend("triton", fake("cpu", torch.bfloat16), triton_dot=False) == "triton"
    assert _dispatch.resolve_backend("triton", fake("cpu", torch.float16), triton_dot=True) == "triton"
    assert _dispatch.resolve_backend("triton", fake("cuda", torch.bfloat16), triton_dot=True) == "triton"
    assert _dispatch.resolve_backend("torch", fake("cpu", torch.bfloat16), triton_dot=True) == "torch"
    # an op with a CPU path of its own goes there instead, and the refusal names it
    assert _dispatch.resolve_backend("auto", fake("cpu", torch.bfloat16), triton_dot=True, cpu_path=True) == "cpu"
    with pytest.raises(ValueError, match=r"Use backend='cpu'"):
        _dispatch.resolve_backend("triton", fake("cpu", torch.bfloat16), triton_dot=True, cpu_path=True)


def test_every_op_using_tl_dot_declares_it():
    # The audit as a test: an op module whose Triton kernels call tl.dot must tell the dispatcher so (triton_dot=True);
    # the others say triton_dot=False at their resolve_backend call.
    for module in (attention, logit_laplace, orthogonalize_module):
        src = inspect.getsource(module)
        assert "resolve_backend(" in src, module.__name__
        expected = "triton_dot=True" if "tl.dot(" in src else "triton_dot=False"
        assert expected in src, (module.__name__, expected)
    assert "tl.dot(" in inspect.getsource(attention)


# ----------------------------------------------------------------------------------------------------------------
# The ops, end to end, on CPU tensors with the interpreter on (the CPU test lane sets TRITON_INTERPRET=1).

def test_issue_case_bf16_attention_auto_matches_float64(cpu_lane):
    # row mask, text 5, grid 3 x 4, head_dim 16, bf16 on CPU: the interpreter returned ~8e8 where the answer is < 3.
    T, H, W, d = 5, 3, 4, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, T + H * W, d, generator=g).bfloat16() for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sparse_attention(q, k, v, mask="row", text_len=T, grid=(H, W), backend="auto")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, "row", T, (H, W), upcast=torch.float64)
    # Each output row is a convex combination of rows of v (the wrong path gave ~8e8).
    assert out.dtype == torch.bfloat16 and out.abs().max() <= v.abs().max()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err  # bf16 output rounding (2**-8 relative) and a little more
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(do.bfloat16())
    grads = torch.autograd.grad(ref, (q64, k64, v64), do)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), grads):
        assert (got.double() - want).abs().max() <= 3e-2 * max(1.0, want.abs().max().item()), name
    with pytest.raises(ValueError, match="backend='cpu'"):  # the op's CPU path: what auto picked
        sparse_attention(q, k, v, mask="row", text_len=T, grid=(H, W), backend="triton")


def test_orthogonalize_bf16_interpreter_is_right(cpu_lane):
    # No tl.dot in its kernels, so auto keeps Triton for bf16 in the interpreter; the result must be right.
    assert _dispatch.resolve_backend("auto", fake("cpu", torch.bfloat16), triton_dot=False) == "triton"
    P = torch.randn(3, 37, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = orthogonalize_ref(P, upcast=torch.float64)
    for backend in ("auto", "triton"):
        Q = orthogonalize(P.bfloat16(), backend=backend).double()
        assert (Q - want).abs().max() < 3e-2, backend


def test_logit_laplace_bf16_interpreter_is_right(cpu_lane):
    g = torch.Generator().manual_seed(2)
    params = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    params[:, 3:] = params[:, 3:].abs()
    target = torch.randint(0, 256, (2, 3, 5, 7), generator=g, dtype=torch.uint8)
    p64 = params.bfloat16().double().requires_grad_()
    want = logit_laplace_loss_ref(p64, target)
    (want_grad,) = torch.autograd.grad(want, p64)
    for backend in ("auto", "triton"):
        p = params.bfloat16().requires_grad_()
        loss = logit_laplace_loss(p, target, backend=backend)
        loss.backward()
        assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item()), backend
        assert (p.grad.double() - want_grad).abs().max() <= 2e-2 * want_grad.abs().max(), backend
