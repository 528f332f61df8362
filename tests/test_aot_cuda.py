"""Ahead-of-time facts of the CUDA attention kernels (csrc/attention.cu) in the built extension, no GPU needed.

Reads the built ``dalle_kernels._C`` with ``cuobjdump`` (the CUDA toolkit's, or the copy Triton ships): for every
attention kernel of every architecture in it (sm_80 and sm_90 by default), no register spills (``LOCAL:0`` and
``STACK:0`` in the resource usage) and shared memory within the architecture's opt-in limit (dynamic bytes from
the extension's ``attention_shared_bytes``, the formula the launches use); the tensor-core kernels
(``attn_*_mma_kernel``: fp16/bf16 forward, dQ and dK/dV) have tensor-core instructions (``HMMA``) in their SASS, and
the fp32 kernels have none (fp32 FMAs, so that fp32 inputs are computed exactly in fp32). Runs where the extension
is built and skips where it is not, except under ``DALLE_KERNELS_CUDA=1`` (CI with nvcc), where a missing build
fails.

As a script it prints the table of docs/attention.md (registers, shared memory, spills, HMMA count per kernel run by
default; ``--all``: every compiled variant):
    python tests/test_aot_cuda.py [--all]
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MMA_KERNELS = ("attn_fwd_mma_kernel", "attn_bwd_dq_mma_kernel", "attn_bwd_dkdv_mma_kernel")
KERNELS = MMA_KERNELS + ("attn_fwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel")
DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32"}


def extension_path():
    spec = importlib.util.find_spec("dalle_kernels._C")
    return spec.origin if spec is not None and spec.origin else None


def find_cuobjdump():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "cuobjdump"] if home else []
    which = shutil.which("cuobjdump")
    candidates += [Path(which)] if which else []
    candidates.append(Path("/usr/local/cuda/bin/cuobjdump"))
    try:
        import triton.backends.nvidia as nvidia_backend

        candidates.append(Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


def describe(mangled):
    """``(kernel, dtype, head_dim, tile)`` from an Itanium-mangled kernel name, or None for other functions."""
    kernel = next((k for k in KERNELS if k in mangled), None)
    if kernel is None:
        return None
    args = mangled.split(kernel, 1)[1]
    dtype = next((name for code, name in DTYPES.items() if args.startswith("I" + code)), "?")
    ints = [int(x) for x in re.findall(r"Li(\d+)E", args)]
    head_dim = ints[0] if ints else 0
    if kernel == "attn_fwd_mma_kernel":
        tile = f"64x{ints[1]}"
    elif kernel in MMA_KERNELS:
        tile = "64x64"
    elif kernel == "attn_bwd_delta_kernel":
        tile = "128 rows"
    else:
        tile = f"{ints[1]}x{ints[2]}"
    return kernel, dtype, head_dim, tile


def read_figures(so, tool):
    """One dict per (arch, attention kernel): registers, shared, local, stack bytes and the SASS's HMMA count."""
    usage = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=True).stdout
    rows, arch = {}, None
    for line in usage.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = (arch, m.group(1))
            continue
        if "REG:" in line and describe(current[1]) is not None:
            figs = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            rows[current] = dict(arch=current[0], name=current[1], regs=figs["REG"], stack=figs["STACK"],
                                 shared=figs["SHARED"], local=figs["LOCAL"], hmma=0)
    for arch in sorted({a for a, _ in rows}):
        sass = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", so], capture_output=True, text=True,
                              check=True).stdout
        for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
            name = chunk.split(None, 1)[0]
            if (arch, name) in rows:
                rows[(arch, name)]["hmma"] = len(re.findall(r"\bHMMA\.", chunk))
    ext = importlib.import_module("dalle_kernels._C")
    codes = {"fp32": 0, "fp16": 1, "bf16": 2}
    out = []
    for r in rows.values():
        r["kernel"], r["dtype"], r["head_dim"], r["tile"] = describe(r["name"])
        bm, bn = (int(x) for x in r["tile"].split("x")) if "x" in r["tile"] else (0, 0)
        r["dynamic"] = ext.attention_shared_bytes(r["kernel"], codes[r["dtype"]], r["head_dim"], bm, bn)
        out.append(r)
    return sorted(out, key=lambda r: (r["arch"], KERNELS.index(r["kernel"]), r["dtype"], r["head_dim"], r["tile"]))


def format_table(rows):
    lines = ["| arch | kernel | dtype | d | tile | regs | smem dynamic + static (B) | spill (local+stack B) | HMMA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['tile']} | {r['regs']} | "
                     f"{r['dynamic']} + {r['shared']} | {r['local'] + r['stack']} | {r['hmma']} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def figures():
    so, tool = extension_path(), find_cuobjdump()
    required = os.environ.get("DALLE_KERNELS_CUDA") == "1"
    if so is None:
        if required:
            pytest.fail("DALLE_KERNELS_CUDA=1 but dalle_kernels._C is not built")
        pytest.skip("dalle_kernels._C not built (DALLE_KERNELS_CUDA=1 python setup.py build_ext --inplace)")
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's NVIDIA backend)")
    rows = read_figures(so, tool)
    if not rows:
        if required:
            pytest.fail(f"{so} has no attention kernels; rebuild it")
        pytest.skip(f"{so} was built without the attention kernels")
    print("\n" + format_table(rows))
    return rows


def test_built_for_the_expected_architectures(figures):
    archs = {r["arch"] for r in figures}
    wanted = os.environ.get("DALLE_KERNELS_CUDA_ARCHS", "80;90")
    expected = {int(a.strip().rstrip("a").replace(".", "")) for a in wanted.replace(",", ";").split(";") if a.strip()}
    assert archs == expected, f"SASS for sm_{sorted(archs)}, expected sm_{sorted(expected)}"
    for arch in archs:
        kinds = {(r["kernel"], r["dtype"], r["head_dim"]) for r in figures if r["arch"] == arch}
        for d in (16, 32, 64, 128):
            for kernel in MMA_KERNELS:
                for dtype in ("fp16", "bf16"):
                    assert (kernel, dtype, d) in kinds, (arch, kernel, dtype, d)
            for kernel in KERNELS[len(MMA_KERNELS):]:
                for dtype in ("fp32", "fp16", "bf16"):
                    assert (kernel, dtype, d) in kinds, (arch, kernel, dtype, d)


# Shared memory a block may opt in to: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SMEM_LIMITS = {80: 163 * 1024, 90: 227 * 1024}


def test_no_register_spills_and_shared_memory_fits(figures):
    for r in figures:
        assert r["local"] == 0 and r["stack"] == 0, f"spills: {r}"
        assert r["regs"] <= 255 and r["dynamic"] + r["shared"] <= SMEM_LIMITS.get(r["arch"], 227 * 1024), r


def test_tensor_core_kernels_use_hmma(figures):
    for r in figures:
        if r["kernel"] in MMA_KERNELS:
            assert r["hmma"] > 0, f"no HMMA in the SASS of {r}"
        else:
            assert r["hmma"] == 0 or r["dtype"] != "fp32", f"fp32 products on tensor cores (not exact): {r}"


def is_default(r):
    """A kernel ``sparse_attention(backend="cuda")`` runs by default: the tensor-core kernels for fp16/bf16, the
    CUDA-core kernels at the GPU's square tile for fp32, and delta (not the 16 x 16 tiles of the emulator's tests or
    the CUDA-core variants that fp16/bf16 reach only through an explicit ``block``)."""
    if r["kernel"] in MMA_KERNELS or r["kernel"] == "attn_bwd_delta_kernel":
        return True
    gpu_tile = 64 if r["head_dim"] <= 64 else 32
    return r["dtype"] == "fp32" and r["tile"] == f"{gpu_tile}x{gpu_tile}"


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python tests/test_aot_cuda.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="every compiled variant, not only the ones run by default")
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = read_figures(extension_path(), find_cuobjdump())
    print(format_table(rows if args.all else [r for r in rows if is_default(r)]))
