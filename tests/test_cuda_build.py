"""The compiled extension dalle_kernels._C: built, complete, and checking arguments before any CUDA call.

Runs where the build was asked for (DALLE_KERNELS_CUDA=1, as CI sets when nvcc is present); needs no GPU:
every call below has exactly one bad argument and must be rejected by validation, before a launch.
"""
import importlib
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("DALLE_KERNELS_CUDA") != "1",
                                reason="the CUDA build was not requested (DALLE_KERNELS_CUDA=1)")

ENTRY_POINTS = ("cuda_runtime_version", "device_count", "logit_laplace_forward", "logit_laplace_backward",
                "logit_laplace_partial_count", "orthogonalize", "attention_forward", "attention_backward")
FAKE_PTR = 1 << 20  # never dereferenced: each call is rejected before launch
F32, F16, BF16, F64, U8 = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def ext():
    return importlib.import_module("dalle_kernels._C")


def test_extension_imports_with_entry_points(ext):
    missing = [name for name in ENTRY_POINTS if not hasattr(ext, name)]
    assert not missing, f"dalle_kernels._C lacks {missing}"
    assert ext.cuda_runtime_version() >= 11000
    assert ext.device_count() >= 0  # 0 without a driver: must not raise


def test_partial_count(ext):
    # One partial per 2048-value tile per image: 8 x 3 x 256 x 256 -> 8 * 96.
    assert ext.logit_laplace_partial_count(8, 256, 256) == 8 * 96
    assert ext.logit_laplace_partial_count(1, 5, 7) == 1


def forward_args(**changes):
    args = dict(params=FAKE_PTR, target=FAKE_PTR, loss=FAKE_PTR, partial=FAKE_PTR, grad=0, batch=2, height=5,
                width=7, params_dtype=F32, target_dtype=U8, eps=0.1, reduction=2, stream=0)
    args.update(changes)
    return args


def backward_args(**changes):
    args = dict(params=FAKE_PTR, target=FAKE_PTR, grad_out=FAKE_PTR, grad=FAKE_PTR, batch=2, height=5, width=7,
                params_dtype=F16, target_dtype=F32, eps=0.1, reduction=0, stream=0)
    args.update(changes)
    return args


@pytest.mark.parametrize("change, message", [
    (dict(params=0), "params: null data pointer"),
    (dict(target=0), "target: null data pointer"),
    (dict(loss=0), "loss: null data pointer"),
    (dict(partial=0, reduction=1), "partial: null data pointer"),
    (dict(grad=FAKE_PTR, reduction=0), "grad must be 0 for reduction 'none'"),
    (dict(grad=FAKE_PTR, params_dtype=F16), "grad must be 0 for float16/bfloat16 params"),
    (dict(grad=FAKE_PTR, params_dtype=BF16, reduction=1), "grad must be 0 for float16/bfloat16 params"),
    (dict(batch=0), "batch, height, width must be positive"),
    (dict(width=-3), "batch, height, width must be positive"),
    (dict(batch=70000), "batch must be < 65536"),
    (dict(height=40000, width=40000), r"3 \* height \* width must be < 2\*\*31"),
    (dict(params_dtype=F64), "params_dtype must be float32"),
    (dict(params_dtype=U8), "params_dtype must be float32"),
    (dict(target_dtype=F64), "target_dtype must be"),
    (dict(target_dtype=9), "target_dtype must be"),
    (dict(eps=0.5), r"eps must be in \(0, 0.5\)"),
    (dict(eps=0.0), r"eps must be in \(0, 0.5\)"),
    (dict(reduction=3), "reduction must be 0"),
])
def test_forward_rejects_bad_arguments(ext, change, message):
    with pytest.raises(ValueError, match=message):
        ext.logit_laplace_forward(**forward_args(**change))


@pytest.mark.parametrize("change, message", [
    (dict(grad_out=0), "grad_out: null data pointer"),
    (dict(grad=0), "grad: null data pointer"),
    (dict(params=0), "params: null data pointer"),
    (dict(params_dtype=7), "params_dtype must be float32"),
    (dict(eps=-0.1), r"eps must be in \(0, 0.5\)"),
    (dict(height=0), "batch, height, width must be positive"),
    (dict(reduction=3), "reduction must be 0"),
    (dict(grad_out=0, reduction=2), "grad_out: null data pointer"),
])
def test_backward_rejects_bad_arguments(ext, change, message):
    with pytest.raises(ValueError, match=message):
        ext.logit_laplace_backward(**backward_args(**change))


def attention_args(**changes):
    args = dict(q=FAKE_PTR, k=FAKE_PTR, v=FAKE_PTR, o=FAKE_PTR, lse=FAKE_PTR, lut=FAKE_PTR, full=FAKE_PTR,
                count=FAKE_PTR, batch=2, heads=4, n=6 + 63, head_dim=64, lut_rows=2, lut_w=2, mask=3, text_len=6, H=7,
                W=9, kernel=5, scale=0.125, block_m=64, block_n=64, dtype=F16, stream=0)
    args |= {f"stride_{t}{a}": 64 for t in "qkvo" for a in "bhn"}
    args.update(changes)
    return args


@pytest.mark.parametrize("change, message", [
    (dict(q=0), "q: null data pointer"),
    (dict(head_dim=48), "head_dim must be 16, 32, 64 or 128"),
    (dict(n=70), "n must equal text_len"),
    (dict(block_m=32), "tiles must be square"),
    (dict(dtype=F32, block_n=32), "tiles must be square"),
    (dict(lut_rows=3), "one row per block"),
    (dict(mask=9), "mask code"),
    (dict(dtype=F64), "dtype must be"),
    (dict(stride_kn=60), "16-byte aligned"),
    (dict(v=FAKE_PTR + 8), "16-byte aligned"),
])
def test_attention_forward_rejects_bad_arguments(ext, change, message):
    with pytest.raises(ValueError, match=message):
        ext.attention_forward(**attention_args(**change))


def test_ptx_wrappers_compile_for_sm80(tmp_path):
    """csrc/ptx.h's GPU side: the test kernels that use every wrapper (csrc/emu/selftest.cu, emulated in
    tests/test_cuda_emu.py) compile with nvcc for sm_80, ptxas accepting each instruction and its operands."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    import pybind11

    root = Path(__file__).resolve().parents[1]
    home = os.environ.get("CUDA_HOME")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("no nvcc")
    cmd = [nvcc, "-std=c++17", "-arch=sm_80", "-cubin", "-O3", "--expt-relaxed-constexpr", "-keep",
           f"-keep-dir={tmp_path}", f"-I{root / 'csrc'}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", str(root / "csrc" / "emu" / "selftest.cu"),
           "-o", str(tmp_path / "selftest.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    for instruction in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                        "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                        "cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 1"):
        assert instruction in ptx, f"{instruction} missing from the PTX"
