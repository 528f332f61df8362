"""Mutation score of the CUDA emulation lane: does the lane catch the bugs a GPU would show?

Each entry of ``CATALOGUE`` is a small, realistic bug in one ``csrc/*.cu`` file (a removed ``__syncthreads``, an
off-by-one bound, a wrong ``ldmatrix`` lane offset, a ``cp_async_wait<1>`` turned into ``<2>``, a missing
``cp_async_commit``, a swapped ``mma`` operand, a shared-memory layout one row short, ...). For each, the runner
applies it to a copy of the source, compiles that one translation unit exactly as ``setup.py`` does (same
rewriting, same flags: read from the emulation build's ``build.ninja``), links it with the other objects of the
existing build into a scratch folder (``build/mutations``, ignored by git), and runs the mutation's focused
tests from ``tests/`` against the mutated extension in a child process. A mutation is caught when those tests
fail; the report says by which check (a racecheck report, memcheck, the cross-block check, a cp.async hazard,
a deadlock, or a test's numerical assertion) and which test.

    python -m dalle_kernels.emu_mutations                 # the whole catalogue (README: its time)
    python -m dalle_kernels.emu_mutations --only NAME ... # some of it
    python -m dalle_kernels.emu_mutations --list

Needs the emulation extension built in place first (``DALLE_KERNELS_CUDA_EMU=1 python setup.py build_ext
--inplace``). tests/test_cuda_emu.py checks in CI that every mutation still applies to today's sources.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ._cli import Parser
from ._emu_build import emu_transform

ROOT = Path(__file__).resolve().parent.parent
ATT = ("tests/test_attention_cuda.py",)
ATT_MMA_FWD = ATT + ("-k", "test_tensor_cores_over_several_blocks or (test_cuda_matches_float64 and not fp32) "
                           "or test_head_dim_128")
ATT_MMA_BWD = ATT_MMA_FWD
ATT_CORE = ATT + ("-k", "(test_cuda_matches_float64 and fp32) or test_gpu_tiles or test_cuda_core_forward")
LL = ("tests/test_cuda_emu.py", "-k", "logit_laplace")
ORTH = ("tests/test_cuda_emu.py", "-k", "orthogonalize")


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` by ``new`` in csrc/``file``: the first ``old`` at or after ``anchor`` (which must occur once),
    or, without an anchor, the only ``old``. ``tests``: the pytest arguments that must catch it. ``harmless``: why
    the mutation cannot change what the kernel computes (then it is expected to survive). ``edit``: the same
    mutation as the emulator can apply it without a rebuild, ``("skip_barrier",)``, ``("skip_commit",)`` or
    ``("wait_group", n)`` at the mutated line (``edits``; the CI subset runs that way)."""
    name: str
    file: str
    old: str
    new: str
    tests: tuple
    anchor: str = ""
    harmless: str = ""
    edit: tuple = ()

    def apply(self, src: str) -> str:
        start = 0
        if self.anchor:
            count = src.count(self.anchor)
            if count != 1:
                raise ValueError(f"mutation {self.name}: anchor {self.anchor!r} occurs {count} times in {self.file}")
            start = src.index(self.anchor)
        elif src.count(self.old) != 1:
            raise ValueError(f"mutation {self.name}: {self.old!r} occurs {src.count(self.old)} times in {self.file}")
        i = src.find(self.old, start)
        if i < 0:
            raise ValueError(f"mutation {self.name}: {self.old!r} not found in {self.file} after its anchor")
        return src[:i] + self.new + src[i + len(self.old):]

    def line(self, src: str) -> int:
        """The 1-based line of the mutated text in today's source (its first non-blank character)."""
        start = src.index(self.anchor) if self.anchor else 0
        i = src.find(self.old, start)
        return src[:i + len(self.old) - len(self.old.lstrip())].count("\n") + 1

    def edits(self) -> list:
        """The emulator's edits (``emu_set_edits``) that make the same mutation without a rebuild."""
        if not self.edit:
            raise ValueError(f"mutation {self.name} has no runtime edit")
        line = f"csrc/{self.file}:{self.line((ROOT / 'csrc' / self.file).read_text())}"
        return [(self.edit[0], line, self.edit[1] if len(self.edit) > 1 else 0)]


FWD_MMA_END = "warp_pb<T, D, NJ>(o, s, v_t, lane);  // O += P V"
DQ_MMA_END = "warp_pb<T, D, NJ>(dq, s, k_t, lane);  // dQ += dS K"
DKDV_MMA_END = "warp_pb<T, D, NJ>(dk, dpt, q_t, lane);  // dK += dS^T Q"
FWD_MMA = "__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_fwd_mma_kernel(Args a) {"
DQ_MMA = "__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dq_mma_kernel(Args a) {"
DKDV_MMA = "__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dkdv_mma_kernel(Args a) {"
FWD = "__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_fwd_kernel(Args a) {"
DQ = "__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dq_kernel(Args a) {"
DKDV = "__global__ void __launch_bounds__(kThreads, kMinBlocks) attn_bwd_dkdv_kernel(Args a) {"
LOOP_WAIT = "    ptx::cp_async_commit();\n    ptx::cp_async_wait<1>();"

CATALOGUE = (
    # --- tensor-core forward (cp.async double buffering)
    Mutation("fwd_mma/no_barrier_before_prefetch", "attention.cu",
             "    __syncthreads();  // this buffer is refilled by the next iteration's prefetch\n", "\n", ATT_MMA_FWD,
             edit=("skip_barrier",)),
    Mutation("fwd_mma/no_barrier_after_wait", "attention.cu", "    __syncthreads();\n", "\n", ATT_MMA_FWD,
             anchor="ptx::cp_async_wait<1>();  // everything but the newest group"),
    Mutation("fwd_mma/wait_group_2", "attention.cu", "ptx::cp_async_wait<1>();  // everything but",
             "ptx::cp_async_wait<2>();  // everything but", ATT_MMA_FWD, edit=("wait_group", 2)),
    Mutation("fwd_mma/no_commit_in_loop", "attention.cu", LOOP_WAIT, "\n    ptx::cp_async_wait<1>();", ATT_MMA_FWD,
             anchor=FWD_MMA, edit=("skip_commit",)),
    Mutation("fwd_mma/no_commit_before_loop", "attention.cu", "  ptx::cp_async_commit();\n", "\n", ATT_MMA_FWD,
             anchor=FWD_MMA),
    Mutation("fwd_mma/ldmatrix_k_lane_offset", "attention.cu",
             "16 * kk + 8 * ((lane >> 3) & 1));\n        const uint32_t b0[2]",
             "16 * kk + 8 * ((lane >> 4) & 1));\n        const uint32_t b0[2]", ATT_MMA_FWD),
    Mutation("fwd_mma/ldmatrix_q_lane_offset", "attention.cu", "8 * ((lane >> 3) & 1)) * LDT + 16 * kk + 8 * (lane >> 4));",
             "8 * ((lane >> 4) & 1)) * LDT + 16 * kk + 8 * (lane >> 4));", ATT_MMA_FWD, anchor=FWD_MMA),
    Mutation("fwd_mma/mma_swapped_b", "attention.cu", "ptx::mma_m16n8k16<T>(s[j], qf[kk], b0, s[j]);",
             "ptx::mma_m16n8k16<T>(s[j], qf[kk], b1, s[j]);", ATT_MMA_FWD),
    Mutation("fwd_mma/mask_bound_off_by_one", "attention.cu", "if (i >= L.n || jj >= L.n || !allowed(i, jj, L)) v = -INFINITY;",
             "if (i >= L.n || jj > L.n || !allowed(i, jj, L)) v = -INFINITY;", ATT_MMA_FWD, anchor=FWD_MMA,
             harmless="an equivalent mutant: the one key it admits, position n, is never allowed for a stored row "
                      "(every mask is causal, and rows i < n only are stored), so !allowed masks it anyway"),
    Mutation("fwd_mma/last_tile_skipped", "attention.cu", "for (int it = 0; it < count; ++it) {",
             "for (int it = 0; it < count - 1; ++it) {", ATT_MMA_FWD, anchor=FWD_MMA),
    Mutation("fwd_mma/prefetch_bound_off_by_one", "attention.cu", "if (it + 1 < count)  // the other buffer",
             "if (it + 1 <= count)  // the other buffer", ATT_MMA_FWD),
    Mutation("fwd_mma/smem_one_row_short", "attention.cu", "return elem * (D + 8) * (kMmaBM + 4 * BN); }",
             "return elem * (D + 8) * (kMmaBM + 4 * BN - 1); }", ATT_MMA_FWD),
    Mutation("fwd_mma/stage_bound_off_by_one", "attention.cu", "const bool ok = pos < L.n;\n    ptx::cp_async_16",
             "const bool ok = pos <= L.n;\n    ptx::cp_async_16", ATT_MMA_FWD),
    # --- tensor-core backward
    Mutation("dq_mma/no_barrier_before_prefetch", "attention.cu", "    __syncthreads();\n", "\n", ATT_MMA_BWD,
             anchor=DQ_MMA_END),
    Mutation("dq_mma/wait_group_2", "attention.cu", "ptx::cp_async_wait<1>();", "ptx::cp_async_wait<2>();",
             ATT_MMA_BWD, anchor=DQ_MMA),
    Mutation("dkdv_mma/no_barrier_before_prefetch", "attention.cu", "    __syncthreads();\n", "\n", ATT_MMA_BWD,
             anchor=DKDV_MMA_END),
    Mutation("dkdv_mma/no_commit_in_loop", "attention.cu", LOOP_WAIT.replace("\n    ptx::cp_async_wait<1>();", ""),
             "", ATT_MMA_BWD, anchor="lut[it + 1] * kMmaBwd, L);\n    ptx::cp_async_commit();\n    stage_rows"),
    Mutation("dkdv_mma/smem_one_row_short", "attention.cu", "return elem * (D + 8) * 6 * kMmaBwd + sizeof(float)",
             "return elem * ((D + 8) * 6 * kMmaBwd - 1) + sizeof(float)", ATT_MMA_BWD),
    Mutation("warp_abt/mma_swapped_b", "attention.cu", "ptx::mma_m16n8k16<T>(acc[j + 1], af, b1, acc[j + 1]);",
             "ptx::mma_m16n8k16<T>(acc[j + 1], af, b0, acc[j + 1]);", ATT_MMA_BWD),
    Mutation("warp_pb/ldmatrix_trans_lane_offset", "attention.cu", "LDT + 8 * (d + (lane >> 4)));",
             "LDT + 8 * (d + ((lane >> 3) & 1)));", ATT_MMA_FWD),
    # --- CUDA-core kernels
    Mutation("fwd/no_barrier_before_stage", "attention.cu",
             "    __syncthreads();  // the previous tile's K, V and P are no longer read\n", "\n", ATT_CORE),
    Mutation("fwd/no_barrier_after_stage", "attention.cu", "    __syncthreads();\n", "\n", ATT_CORE,
             anchor="stage<T, BN, D, D>(sV, vp, a.v.sn, n0, L);"),
    Mutation("fwd/no_barrier_p_complete", "attention.cu", "    __syncthreads();  // P complete\n", "\n", ATT_CORE),
    Mutation("fwd/store_bound_off_by_one", "attention.cu", "const int pos = m0 + r;\n  if (pos < L.n) {\n    // Only",
             "const int pos = m0 + r;\n  if (pos <= L.n) {\n    // Only", ATT_CORE),
    Mutation("fwd/smem_one_row_short", "attention.cu", "return sizeof(float) * (BM * (D + 1) + BN * (D + 1) + BN * D + BM * (BN + 1));",
             "return sizeof(float) * (BM * (D + 1) + BN * (D + 1) + BN * D + (BM - 1) * (BN + 1));", ATT_CORE),
    Mutation("dq/no_barrier_before_stage", "attention.cu", "    __syncthreads();\n", "\n", ATT_CORE, anchor=DQ),
    Mutation("dkdv/no_barrier_after_scores", "attention.cu", "    __syncthreads();\n    for (int rr = 0; rr < BM; ++rr)",
             "\n    for (int rr = 0; rr < BM; ++rr)", ATT_CORE),
    Mutation("delta/bound_off_by_one", "attention.cu", "if (row >= a.L.n) return;", "if (row > a.L.n) return;",
             ATT_CORE),
    # --- logit_laplace.cu and orthogonalize.cu
    Mutation("logit_laplace/no_barrier_in_block_sum", "logit_laplace.cu", "  __syncthreads();\n  v = 0.0f;",
             "\n  v = 0.0f;", LL),
    Mutation("logit_laplace/tail_bound_off_by_one", "logit_laplace.cu",
             "      if (base + i < n) p[base + i] = from_f<T>(in[i]);",
             "      if (base + i <= n) p[base + i] = from_f<T>(in[i]);", LL),
    Mutation("logit_laplace/partial_index", "logit_laplace.cu", "a.partial[b * gridDim.x + blockIdx.x] = s;",
             "a.partial[b + blockIdx.x] = s;", LL),
    Mutation("orthogonalize/no_barrier_after_arow", "orthogonalize.cu",
             "    __syncthreads();\n    const float nrm2 = s[k], x0 = arow[k];", "\n    const float nrm2 = s[k], x0 = arow[k];",
             ORTH),
    Mutation("orthogonalize/no_barrier_before_overwrite", "orthogonalize.cu",
             "    __syncthreads();  // everyone has read s and arow before they are overwritten\n", "\n", ORTH,
             harmless="a redundant barrier: between the barriers before and after it, threads read s and arow and "
                      "write only w and beta_s/v0_s/sign_s, which nobody reads there; s and arow are overwritten "
                      "only after the next barrier (block_reduce, the next column). Racecheck agrees: no report"),
    Mutation("orthogonalize/no_barrier_after_w", "orthogonalize.cu",
             "    __syncthreads();\n    if (k == r - 1) break;", "\n    if (k == r - 1) break;", ORTH),
    Mutation("orthogonalize/no_barrier_in_block_reduce", "orthogonalize.cu",
             "  __syncthreads();\n  for (int j = threadIdx.x; j < R; j += blockDim.x) {", "\n  for (int j = threadIdx.x; j < R; j += blockDim.x) {",
             ORTH),
    Mutation("orthogonalize/red_one_row_short", "orthogonalize.cu", "__shared__ float red[kWarps * R];",
             "__shared__ float red[(kWarps - 1) * R];", ORTH),
)

# A fixed few for CI: tests/test_cuda_emu.py applies them with the emulator's edits (no rebuild, a second each).
CI_SUBSET = ("fwd_mma/no_barrier_before_prefetch", "fwd_mma/wait_group_2", "fwd_mma/no_commit_in_loop")

_CHECKS = (  # report text -> the check that caught it, most specific first
    ("cp.async hazard", "cp.async hazard"),
    ("hazard between blocks", "cross-block race"),
    ("'s cp.async at", "shared-memory race with a cp.async's write"),
    ("racecheck:", "shared-memory race"),
    ("memcheck:", "memcheck"),
    ("deadlock:", "deadlock"),
    ("cp.async:", "cp.async misuse"),
    ("CudaEmuError", "emulator report"),
    ("AssertionError", "numerics (test assertion)"),
    ("assert ", "numerics (test assertion)"),
)


def build_dir() -> Path:
    found = sorted(ROOT.glob("build/temp.*/cuda_emu/build.ninja"))
    if not found:
        raise SystemExit("no emulation build found (build/temp.*/cuda_emu/build.ninja): run "
                         "DALLE_KERNELS_CUDA_EMU=1 python setup.py build_ext --inplace first")
    return found[-1].parent


def ninja_settings(bdir: Path) -> tuple[str, str, list[str]]:
    """(compiler, kernel flags, object files) of the emulation build."""
    text = (bdir / "build.ninja").read_text()
    cxx = re.search(r"^cxx = (.*)$", text, re.M).group(1)
    flags = re.search(r"^emuflags = (.*)$", text, re.M).group(1)
    objs = re.search(r"^build \S+: link (.*)$", text, re.M).group(1).split()
    return cxx, flags, objs


def build_mutant(m: Mutation, scratch: Path) -> Path:
    """The mutated extension: csrc/m.file mutated and compiled, linked with the build's other objects."""
    bdir = build_dir()
    cxx, flags, objs = ninja_settings(bdir)
    src_path = ROOT / "csrc" / m.file
    text = emu_transform(m.apply(src_path.read_text()), str(src_path))  # lines name the real file
    work = scratch / m.name.replace("/", "__")
    work.mkdir(parents=True, exist_ok=True)
    gen = work / (m.file + ".cc")
    gen.write_text(text)
    obj = work / (m.file + ".o")
    subprocess.run(f"{cxx} {flags} -x c++ -c {shlex.quote(str(gen))} -o {shlex.quote(str(obj))}", shell=True,
                   check=True)
    mine = str(bdir / (m.file + ".o"))
    link = [str(obj) if o == mine else o for o in objs]
    if mine not in objs:
        raise RuntimeError(f"{mine} is not among the emulation build's objects")
    ext = next((ROOT / "dalle_kernels").glob("_C_emu*.so")).name
    so = work / ext
    subprocess.run([cxx, *link, "-shared", "-lpthread", "-ldl", "-o", str(so)], check=True)
    return so


def run_tests(so: Path, tests: tuple, timeout: float) -> tuple[int | None, str]:
    """Run pytest (``tests``) in a child process whose dalle_kernels._C_emu is ``so``; (exit code, output)."""
    cmd = [sys.executable, "-c", _CHILD, str(so), "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        return None, out or ""


def verdict(code: int | None, out: str) -> tuple[bool, str, str]:
    """(caught, by which check, in which test)."""
    if code is None:
        return True, "timeout (the lane hangs)", ""
    if code == 0:
        return False, "", ""
    if code not in (1,):
        if code < 0 or code > 100:
            return True, f"crash (exit {code})", ""
        raise RuntimeError(f"pytest could not run the tests (exit {code}):\n{out[-3000:]}")
    failed = re.search(r"^FAILED (\S+)", out, re.M)
    test = failed.group(1) if failed else ""
    for needle, check in _CHECKS:
        if needle in out:
            return True, check, test
    return True, "test failure", test


def run(mutations, timeout: float = 900.0, scratch: Path | None = None, log=print) -> list[dict]:
    scratch = scratch or ROOT / "build" / "mutations"
    rows = []
    for m in mutations:
        t0 = time.perf_counter()
        so = build_mutant(m, scratch)
        t1 = time.perf_counter()
        code, out = run_tests(so, m.tests, timeout)
        caught, check, test = verdict(code, out)
        row = dict(name=m.name, caught=caught, check=check, test=test, harmless=m.harmless,
                   build_s=t1 - t0, test_s=time.perf_counter() - t1)
        (scratch / m.name.replace("/", "__") / "pytest.log").write_text(out)
        rows.append(row)
        log(f"{m.name}: {'caught by ' + check if caught else 'SURVIVED'}"
            f"{' in ' + test if test else ''} (build {row['build_s']:.0f} s, tests {row['test_s']:.0f} s)")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mutation | caught | by | test or reason |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {'yes' if r['caught'] else 'no'} | {r['check'] or '-'} | "
                     f"{r['test'] or r['harmless'] or '-'} |")
    caught = sum(r["caught"] for r in rows)
    lines.append(f"\n{caught} of {len(rows)} caught ({100.0 * caught / max(1, len(rows)):.0f}%).")
    return "\n".join(lines)


# The child process: pytest with dalle_kernels._C_emu loaded from the mutated build (argv[1]), registered before
# the package is imported (which the CPU lane's conftest requires to happen after it sets TRITON_INTERPRET).
_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("dalle_kernels._C_emu", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["dalle_kernels._C_emu"] = mod
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def _seconds(text: str) -> float:
    """argparse type of ``--timeout``: a number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dalle_kernels.emu_mutations", description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations (names from --list)")
    ap.add_argument("--ci", action="store_true", help="run the CI subset only")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    ap.add_argument("--timeout", type=_seconds, default=900.0, help="seconds per mutation's tests (default 900)")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    a = ap.parse_args(argv)
    by_name = {m.name: m for m in CATALOGUE}
    if a.list:
        for m in CATALOGUE:
            print(f"{m.name:45s} csrc/{m.file}:{m.line((ROOT / 'csrc' / m.file).read_text())}")
        return 0
    names = a.only or (CI_SUBSET if a.ci else list(by_name))
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    t0 = time.perf_counter()
    rows = run([by_name[n] for n in names], a.timeout)
    text = table(rows) + f" Total time {time.perf_counter() - t0:.0f} s."
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    missed = [r for r in rows if not r["caught"] and not r["harmless"]]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
