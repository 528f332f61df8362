"""Ahead-of-time compile of every attention kernel for sm_80 and sm_90, on a machine without a GPU.

Checks that the matmuls become tensor-core instructions (``mma.sync`` on sm_80, ``wgmma``/``mma`` on sm_90)
and that no registers spill (``LOCAL:0`` in the cubin's resource usage), and prints registers and shared
memory per kernel. The compile runs in a subprocess without ``TRITON_INTERPRET`` (the test lane's
interpreter replaces ``@triton.jit`` functions, and those cannot be compiled).

As a script, it prints the table for every head_dim's tile config:
    python tests/test_aot_compile.py [--all]
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

KERNELS = ("fwd", "preprocess", "dq", "dkdv")
# Representative set for the test: head_dim 64 (the paper's), fp16 with the conv predicate and bf16 with the
# transposed column layout, so every predicate branch family and the address folding are compiled.
CASES = [(arch, kernel, dtype, 64, mask) for arch in (80, 90) for kernel in KERNELS
         for dtype, mask in (("fp16", "conv"), ("bf16", "column"))]


def _signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("LSE_ptr", "DELTA_ptr"):
            sig[name] = "*fp32"
        elif name in ("LUT_ptr", "FULL_ptr", "CNT_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(case):
    """Compile one kernel for one target; returns a dict of figures (runs without the interpreter)."""
    import tempfile

    import triton
    import triton.backends.nvidia as nvidia_backend
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dalle_kernels import masks
    from dalle_kernels.ops import attention as A

    arch, kernel, dtype, head_dim, mask = case
    fwd_cfg, bwd_cfg = A.FWD_CONFIGS[head_dim], A.BWD_CONFIGS[head_dim]
    cfg = fwd_cfg if kernel == "fwd" else bwd_cfg
    fn = {"fwd": A._attn_fwd_kernel, "preprocess": A._attn_bwd_preprocess_kernel,
          "dq": A._attn_bwd_dq_kernel, "dkdv": A._attn_bwd_dkdv_kernel}[kernel]
    if kernel == "preprocess":
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m)
    else:
        # The layout is compile-time (divisions by H and W become shifts): the paper's T = 256, 32 x 32, 11 x 11.
        constexprs = dict(T=256, H=32, W=32, S=5, MASK=masks.MASK_CODES[mask], TRANSPOSED=mask == "column",
                          HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION="tf32")
    # What the JIT specializes at launch for contiguous (B, h, N, 64) tensors: 16-byte aligned pointers and
    # strides divisible by 16. Sizes (N, T, H, W) get no hint: the figures hold for any shape.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name.endswith("_ptr") or name.startswith("stride_")}
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        tool = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    figures = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage)}
    return dict(arch=arch, kernel=kernel, dtype=dtype, head_dim=head_dim, mask=mask,
                block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                regs=figures["REG"], local=figures["LOCAL"], stack=figures["STACK"],
                shared=compiled.metadata.shared + figures["SHARED"],
                mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"))


def compile_all(cases, workers=2):
    os.environ.pop("TRITON_INTERPRET", None)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, cases))


def format_table(rows):
    lines = ["| arch | kernel | dtype | d | mask | tile | warps/stages | regs | smem (B) | spill (local+stack B) | mma.sync | wgmma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['mask']} | "
                     f"{r['block_m']}x{r['block_n']} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | "
                     f"{r['shared']} | {r['local'] + r['stack']} | {r['mma_sync']} | {r['wgmma']} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_aot_compile as t; "
            "print('JSON' + json.dumps(t.compile_all(t.CASES)))")
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.split("JSON", 1)[1])
    print("\n" + format_table(rows))
    return rows


def _rows(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    assert {r["kernel"] for r in rows} == set(KERNELS)
    return rows


@pytest.mark.parametrize("arch", [80, 90])
def test_matmul_kernels_use_tensor_cores(compiled, arch):
    for r in _rows(compiled, arch):
        if r["kernel"] == "preprocess":
            continue  # a row-wise dot product: no matmul
        n = r["mma_sync"] if arch == 80 else r["wgmma"] + r["mma_sync"]
        assert n > 0, f"no tensor-core MMA in {r}"


@pytest.mark.parametrize("arch", [80, 90])
def test_no_register_spills(compiled, arch):
    for r in _rows(compiled, arch):
        assert r["local"] == 0 and r["stack"] == 0, f"spills: {r}"
        assert r["regs"] <= 255 and r["shared"] <= 227 * 1024, r


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python tests/test_aot_compile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true",
                   help="every head_dim (16 to 128), not only the test's head_dim 64 cases")
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = CASES
    if args.all:
        cases = [(arch, kernel, dtype, d, mask) for arch in (80, 90) for d in (16, 32, 64, 128)
                 for kernel in KERNELS for dtype, mask in (("fp16", "conv"), ("bf16", "column"))]
    print(format_table(compile_all(cases)))
