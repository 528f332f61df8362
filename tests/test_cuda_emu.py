"""The CUDA emulation lane: the kernels of csrc/ run on CPU tensors (backend="cuda_emu", dalle_kernels._C_emu).

- logit_laplace_loss and orthogonalize through the CUDA kernel source against float64: odd sizes, every dtype and
  reduction the kernels take (bf16 included: no Triton interpreter involved), extreme values, strided inputs,
  both code paths of each kernel (vectorized and scalar tiles; shared-memory and global-memory workspace);
- the checkers proven on deliberately broken kernels (csrc/emu/selftest.cu): a missing __syncthreads (racecheck,
  naming both source lines), an off-by-one bound (memcheck), a write before a tensor (reported and not carried
  out: the heap survives), a write to an input, a shuffle naming exited lanes (deadlock), a read before the
  cp.async wait (a cp.async hazard), blocks of one launch sharing global memory (cross-block races) and a result
  that depends on the order of blocks;
- the schedules (blocks reversed or shuffled, cp.async landing early) on the real kernels: clean and equal results;
- the mutation catalogue (dalle_kernels.emu_mutations): every mutation still applies to today's sources, and a
  fixed few are built and caught (the rest: the README's full run);
- the warp intrinsics and the PTX twins (mma.sync m16n8k16, ldmatrix) against the PTX ISA's documented layouts,
  written out independently here.
The existing CPU-lane tests of both ops also run over cuda_emu (tests/test_logit_laplace.py, test_orthogonalize.py).
"""
import functools
import os
import re

import pytest
import torch

from pathlib import Path

import test_logit_laplace as ll
import test_orthogonalize as oo
from dalle_kernels import _cuda, _dispatch, logit_laplace_loss, orthogonalize, orthogonalize_ref
from dalle_kernels import emu_mutations
from dalle_kernels._cuda_emu import CudaEmuError, emulated, schedule


@pytest.fixture(autouse=True)
def emu(device):
    """The emulation extension; a clean skip where it is not built, a failure where CI asked for it."""
    if device != "cpu":
        pytest.skip("the emulation lane runs on CPU tensors")
    if not _dispatch.emu_extension_has("logit_laplace_forward"):
        if os.environ.get("DALLE_KERNELS_CUDA_EMU") == "1":
            pytest.fail("DALLE_KERNELS_CUDA_EMU=1 but dalle_kernels._C_emu does not import: "
                        f"{_dispatch._load_emu_extension()[1]}")
        pytest.skip("dalle_kernels._C_emu not built (DALLE_KERNELS_CUDA_EMU=1 python setup.py build_ext --inplace)")
    return _dispatch.emu_extension()


ROOT = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGETS = ("float32", "float16", "bfloat16", "float64", "uint8")


def target_as(target, kind):
    if kind == "uint8":
        return (target * 255).round().to(torch.uint8)
    return target.to(getattr(torch, kind))


# ---------------------------------------------------------------------------------------------------------------
# logit_laplace_loss through csrc/logit_laplace.cu
@pytest.mark.parametrize("reduction", ll.REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_laplace_against_float64(dtype, reduction):
    # (1, 5, 7): scalar tail only; (2, 16, 24): chw % 8 == 0, vectorized tiles; (2, 33, 65): three 2048-value
    # tiles per image, the last one partial
    for i, shape in enumerate([(1, 5, 7), (2, 16, 24), (2, 33, 65)]):
        for kind in TARGETS:
            params, target = ll.make_inputs(shape, dtype, "cpu", seed=i)
            target = target_as(target, kind)
            g = torch.Generator().manual_seed(100 + i)
            grad_out = (torch.randn(shape[0], 3, *shape[1:], generator=g) if reduction == "none"
                        else torch.tensor(0.75))
            loss, grad = ll.run(params, target, reduction, "cuda_emu", grad_out)
            ref_loss, ref_grad = ll.ref64(params, target, reduction, grad_out)
            rtol, atol, grtol, gatol = ll.TOL[dtype]
            what = f"{dtype} {shape} {reduction} target {kind}"
            assert loss.dtype == torch.float32 and grad.dtype == dtype, what
            scale = 1.0 if reduction == "none" else params.numel() ** 0.5
            ll.assert_close(loss, ref_loss, rtol, atol * scale, f"loss {what}")
            ll.assert_close(grad, ref_grad, grtol, gatol * float(ref_grad.abs().max()), f"grad {what}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("reduction", ll.REDUCTIONS)
def test_logit_laplace_extreme_values_bf16(reduction):
    """bf16 at the extremes (the CPU lane's shared edge test covers fp32/fp16): ln b = +-20, mu = +-1e4 and at the
    kink, pixels 0, 1/2 and 1; finite loss within the fp32 evaluation bound, gradients the rounded float64 ones."""
    cases = [(m, b, x) for m in [-1e4, -3.0, 0.0, 2.2, 1e4] for b in [-20.0, 0.0, 20.0] for x in [0.0, 0.5, 1.0]]
    mu = torch.tensor([c[0] for c in cases]).view(1, 3, 3, 5)
    ln_b = torch.tensor([c[1] for c in cases]).view(1, 3, 3, 5)
    target = torch.tensor([c[2] for c in cases]).view(1, 3, 3, 5)
    params = torch.cat([mu, ln_b], 1).to(torch.bfloat16)
    grad_out = torch.ones(1, 3, 3, 5) if reduction == "none" else None
    loss, grad = ll.run(params, target, reduction, "cuda_emu", grad_out)
    ref_loss, ref_grad = ll.ref64(params, target, reduction, grad_out)
    bound = ll.fp32_error_bound(params, target)
    loss_bound = {"none": bound, "sum": bound.sum(), "mean": bound.sum() / bound.numel()}[reduction]
    assert torch.isfinite(loss).all()
    ll.assert_within(loss, ref_loss, loss_bound, f"loss bf16 {reduction}")
    g_scale = 1.0 / bound.numel() if reduction == "mean" else 1.0
    g_bound = torch.cat([torch.zeros_like(bound), bound], 1) * g_scale + ll.TOL[torch.bfloat16][2] * ref_grad.abs()
    ll.assert_within(grad, ref_grad.to(torch.bfloat16), g_bound, f"grad bf16 {reduction}")
    kink = (mu == 0.0) & (target == 0.5)
    assert (grad[:, :3][kink] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_logit_laplace_strided_and_many_partials(dtype):
    """Channels-last, sliced and misaligned inputs (the launcher copies; the kernel's scalar path for a misaligned
    copy), and 16 images of 64 x 64 (288 partial sums: several per thread in the final reduction)."""
    params, target = ll.make_inputs((2, 5, 6), dtype, "cpu")
    ref_loss, ref_grad = ll.ref64(params, target, "sum")
    layouts = {
        "channels_last": (params.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)),
        "sliced": (torch.cat([params, params[:, :1]], 1)[:, :6], target.transpose(2, 3).contiguous().transpose(2, 3)),
        "misaligned": (torch.cat([torch.zeros(1, dtype=dtype), params.flatten()])[1:].view_as(params), target),
    }
    _, _, grtol, gatol = ll.TOL[dtype]
    for name, (p, t) in layouts.items():
        loss, grad = ll.run(p, t, "sum", "cuda_emu")
        ll.assert_close(loss, ref_loss, 2e-5, 1e-4, f"{dtype} {name}")
        ll.assert_close(grad, ref_grad, grtol, gatol * float(ref_grad.abs().max()), f"{dtype} {name} grad")
    params, target = ll.make_inputs((16, 64, 64), dtype, "cpu", "uint8")
    loss, grad = ll.run(params, target, "mean", "cuda_emu")
    ref_loss, ref_grad = ll.ref64(params, target, "mean")
    ll.assert_close(loss, ref_loss, 2e-5, 2e-5, f"{dtype} 288 partials")
    # mean over 196608 values: fp16 gradients of ~1e-6 are subnormal; an fp32 result rounded to fp16 is within
    # one subnormal step (2**-24) of the rounded float64 one
    ll.assert_close(grad, ref_grad, grtol, max(gatol * float(ref_grad.abs().max()), 2.0**-24),
                    f"{dtype} 288 partials grad")


# ---------------------------------------------------------------------------------------------------------------
# orthogonalize through csrc/orthogonalize.cu
@pytest.fixture(params=["shared", "global"])
def workspace(request, emu):
    """``shared``: the matrix stays in the block's shared memory; ``global``: the emulated device reports no
    opt-in shared memory, so the kernel streams through its global-memory workspace."""
    if request.param == "global":
        emu.emu_set_shared_optin(0)
        request.addfinalizer(lambda: emu.emu_set_shared_optin(-1))
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_against_float64(dtype, workspace):
    # every register bucket of the kernel (R = 4, 8, 16, 32, 64) at odd sizes; n == r; n < threads per block;
    # 1000 x 13 fp32 values (52 KB) in shared memory take the opt-in above 48 KB
    shapes = [(3, 37, 1), (2, 101, 5), (1, 9, 9), (2, 300, 13), (1, 1000, 13), (1, 45, 17), (1, 40, 33)]
    for i, (b, n, r) in enumerate(shapes):
        torch.manual_seed(i)
        P = torch.randn(b, n, r).to(dtype)
        Q = oo.run(P, "cuda_emu")
        assert Q.dtype == dtype
        oo.assert_orthonormal_span(Q, P, dtype)
        err = (Q.double() - orthogonalize_ref(P.double())).abs().max().item()
        assert err <= {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], (
            f"{dtype} {(b, n, r)} {workspace}: max |Q - Q_ref| = {err:.3e}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonalize_extreme_and_strided(dtype, workspace):
    torch.manual_seed(7)
    scale = torch.tensor([1e-30, 1.0, 1e30, 1e-3]) if dtype == torch.float32 else torch.tensor([1e-4, 1.0, 1e4, 1e-3])
    P = (torch.randn(2, 77, 4) * scale).to(dtype)
    Q = oo.run(P, "cuda_emu")
    oo.assert_orthonormal_span(Q, P, dtype)
    base = torch.randn(3, 5, 90).to(dtype)
    middle = base[1].clone()
    S = base.transpose(1, 2)[::2]  # (2, 90, 5): row stride 1, column stride 90, batch stride 900
    expect = orthogonalize_ref(S.double())
    orthogonalize(S, backend="cuda_emu")
    assert (S.double() - expect).abs().max() <= {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert torch.equal(base[1], middle)  # between the strided matrices: untouched (and never touched: memcheck)


def test_orthogonalize_rank_deficient_and_zero():
    n = 53
    a, b = torch.randn(n, 1), torch.randn(n, 1)
    P = torch.cat([a, 2 * a, torch.zeros(n, 1), b, a - 3 * b, torch.zeros(n, 1)], dim=1)
    Q = oo.run(torch.stack([P, torch.zeros(n, 6)]), "cuda_emu")
    oo.assert_orthonormal_span(Q[0], P, torch.float32)
    torch.testing.assert_close(Q[1], torch.eye(n, 6), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The checkers, on the broken kernels of csrc/emu/selftest.cu (through the same checked path as the ops)
SELFTEST_LINE = r"csrc/emu/selftest.cu:\d+(?: <- csrc/emu/selftest.cu:\d+)*"  # a source line, and where it is inlined


def line_of(text, path="csrc/emu/selftest.cu"):
    """The source line (as reports write it) of the only line of ``path`` that contains ``text``."""
    lines = [i + 1 for i, ln in enumerate((ROOT / path).read_text().splitlines()) if text in ln]
    assert len(lines) == 1, (text, lines)
    return f"{path}:{lines[0]}"


@functools.partial(emulated, writable=("out",))
def block_sum(inp, out, broken):
    _cuda.ext("selftest_block_sum").selftest_block_sum(inp.data_ptr(), out.data_ptr(), inp.numel(), out.numel(),
                                                        broken)


@functools.partial(emulated, writable=("out",))
def copy(inp, out, n, broken):
    _cuda.ext("selftest_copy").selftest_copy(inp.data_ptr(), out.data_ptr(), n, broken)


def test_racecheck_flags_a_missing_syncthreads():
    x = torch.randn(1000, dtype=torch.float64).float()
    out = torch.empty(3)
    block_sum(x, out, False)
    assert abs(out.double().sum().item() - x.double().sum().item()) < 1e-4
    with pytest.raises(CudaEmuError, match=r"racecheck: block_sum_kernel block \(0,0,0\): write-after-read hazard "
                                           r"on shared memory offset 4 .* between thread 0 at "
                                           + re.escape(line_of("s += warp_sums[w];")) + " and thread 32 at "
                                           + re.escape(line_of("if (lane == 0) warp_sums[warp] = v;")) + " "):
        block_sum(x, out, True)


def test_memcheck_flags_reads_and_writes_past_a_tensor():
    data, sink = torch.randn(1100), torch.zeros(1100)  # slack behind the views: what the kernel must not touch
    x, out = data[:1000], sink[:1000]
    copy(x, out, 1000, 0)
    assert torch.equal(out, x)
    with pytest.raises(CudaEmuError) as err:
        copy(x, out, 1000, 1)
    msg = str(err.value)
    assert re.search(r"memcheck: copy_kernel block \(15,0,0\) thread \(40,0,0\): invalid read of 4 bytes at 0x[0-9a-f]+ "
                     rf"at {SELFTEST_LINE}: .*4 bytes past the end of inp\) \(not carried out\)", msg), msg
    assert "invalid write of 4 bytes" in msg and "4 bytes past the end of out" in msg
    assert torch.equal(out, x) and (sink[1000:] == 0).all()  # the write past the end was not carried out


def test_a_reported_write_is_not_carried_out():
    """A write before the tensor (a negative index: into the heap's bookkeeping, which would abort the process
    with "corrupted size vs. prev_size" at the next free) is reported, naming the kernel, and undone: the 256
    bytes before the tensor are what they were, and the tensors can be freed."""
    x = torch.randn(64)
    buf = torch.full((64 + 64,), 7.0)  # the 64 floats before `out` are not passed to the kernel: unchanged
    out = buf[64:]
    with pytest.raises(CudaEmuError, match=r"memcheck: copy_kernel block \(0,0,0\) thread \(0,0,0\): invalid write "
                                           r"of 4 bytes .*\(256 bytes before out\) \(not carried out\)"):
        copy(x, out, 64, 2)
    assert (buf == 7.0).all()
    for _ in range(2):  # and on the heap itself: fresh tensors, freed (by their last reference) after the writes
        x, out = torch.randn(64), torch.zeros(64)
        with pytest.raises(CudaEmuError, match="256 bytes before out"):
            copy(x, out, 64, 2)
        assert (out == 0).all()
        del x, out
        torch.randn(1000).sum()


def test_memcheck_flags_an_overflow_of_a_shared_array():
    """One element past a static __shared__ array lands in the redzone the emulator leaves after each variable:
    reported, and not carried out (the next array is intact)."""
    @functools.partial(emulated, writable=("out",))
    def run(out, overflow):
        _cuda.ext("selftest_shared_overflow").selftest_shared_overflow(out.data_ptr(), overflow)

    out = torch.zeros(32)
    run(out, False)
    assert (out == 3.0).all()
    with pytest.raises(CudaEmuError, match=r"memcheck: shared_overflow_kernel block \(0,0,0\) thread \(31,0,0\): invalid "
                                           r"write of 4 bytes .* past the end of a __shared__ variable"):
        run(out, True)
    assert (out[:31] == 3.0).all() and torch.isnan(out[31])  # a[31] never written: the 0xff fill


def test_memcheck_flags_a_write_to_an_input():
    x, out = torch.randn(100), torch.zeros(100)
    x0 = x.clone()

    @functools.partial(emulated, writable=("out",))
    def swapped(inp, out):  # launches with the pointers exchanged: the kernel writes `inp`
        _cuda.ext("selftest_copy").selftest_copy(out.data_ptr(), inp.data_ptr(), 100, 0)

    with pytest.raises(CudaEmuError, match="invalid write of 4 bytes .* write to the read-only input inp") as err:
        swapped(x, out)
    assert (x == x0).all()  # not carried out
    # and nothing else: the runtime's own work while reporting (std::string members, which the kernels'
    # instrumented translation units also instantiate) is not checked as the kernel's accesses
    assert all("write to the read-only input inp" in line for line in str(err.value).splitlines()[1:]
               if "more reports" not in line), str(err.value)


def test_shuffle_with_exited_lanes_is_a_deadlock():
    @functools.partial(emulated, writable=("out",))
    def run(out):
        _cuda.ext("selftest_exited_lane").selftest_exited_lane(out.data_ptr(), 20)

    with pytest.raises(CudaEmuError, match=r"deadlock: exited_lane_kernel .* 20 in warp collectives .* "
                                           r"__shfl_down_sync with mask 0xffffffff .* exited 0xfff00000"):
        run(torch.zeros(32, dtype=torch.int32))


@pytest.mark.parametrize("cp_async", ["late", "early"])
@pytest.mark.parametrize("n", [1000, 257, 3])
def test_cp_async_read_before_its_wait_is_a_hazard(n, cp_async):
    """A cp.async is in flight from its issue to the cp.async.wait_group that covers it: a read of its bytes in
    that window is reported with both source lines, under either schedule, and what it reads depends on when the
    copy lands (late: the 0xff fill, NaN; early: the data), as it would on a GPU."""
    @functools.partial(emulated, writable=("out",))
    def run(inp, out, broken):
        _cuda.ext("selftest_cp_async").selftest_cp_async(inp.data_ptr(), out.data_ptr(), n, broken)

    x, out = torch.randn(n), torch.zeros(n)
    with schedule(cp_async=cp_async):
        run(x, out, False)
        assert torch.equal(out, x)
        with pytest.raises(CudaEmuError, match=r"racecheck: cp_async_kernel block \(0,0,0\): cp.async hazard on shared "
                                               r"memory offset 0 \(4 bytes\): thread 0 reads it at "
                                               r"csrc/emu/selftest.cu:\d+ before the cp.async.wait_group that covers "
                                               r"its own cp.async at csrc/ptx.h:\d+ <- csrc/emu/selftest.cu:\d+"):
            run(x, out, True)
    early = torch.zeros(n, dtype=torch.bool)
    early[0:min(n, 256):4] = True  # each thread's first element, read before its wait
    assert torch.equal(out[~early], x[~early])
    if cp_async == "late":
        assert torch.isnan(out[early]).all()
    else:
        assert torch.equal(out[early], x[early])


@functools.partial(emulated, writable=("counter", "out"))
def block_order(counter, out):
    _cuda.ext("selftest_block_order").selftest_block_order(counter.data_ptr(), out.data_ptr(), out.numel())


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_block_order(order):
    """Blocks run forward (x fastest), reversed, or in a seeded shuffle: a kernel whose result depends on the
    order of its blocks (here, by design, through an atomic counter) gives different results."""
    results = []
    for seed in (1, 2):
        counter, out = torch.zeros(1, dtype=torch.int32), torch.full((40,), -1, dtype=torch.int32)
        with schedule(block_order=order, seed=seed):
            block_order(counter, out)
        assert sorted(out.tolist()) == list(range(40)) and counter.item() == 40
        results.append(out.tolist())
    expect = {"forward": list(range(40)), "reverse": list(range(39, -1, -1))}
    if order in expect:
        assert results == [expect[order]] * 2
    else:
        assert results[0] != results[1] and results[0] != list(range(40))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_cross_block_races(order):
    """Two blocks of one launch touching the same byte of global memory, one writing, not both atomically, is a
    race on a GPU (blocks run in any order, and at once): reported with both blocks and source lines, in either
    block order. Each block on its own element, or all of them atomically, is clean."""
    @functools.partial(emulated, writable=("out",))
    def run(out, mode):
        _cuda.ext("selftest_cross_block").selftest_cross_block(out.data_ptr(), out.numel(), mode)

    line = SELFTEST_LINE
    with schedule(block_order=order):
        out = torch.zeros(8)
        run(out, 0)
        assert out.tolist() == [1.0 + b for b in range(8)]
        run(out.zero_(), 3)
        assert out[0].item() == 8.0
        first, second = ("(0,0,0)", "(1,0,0)") if order == "forward" else ("(7,0,0)", "(6,0,0)")
        with pytest.raises(CudaEmuError, match=rf"racecheck: cross_block_kernel: write-after-write hazard between "
                                               rf"blocks on global memory at 0x[0-9a-f]+ \(4 bytes, byte 0 of out\): "
                                               rf"block \{first[:-1]}\) thread 0 at {line} and block \{second[:-1]}\) "
                                               rf"thread 0 at {line}, in one launch without atomics"):
            run(out, 1)
        kind = "read-after-write" if order == "forward" else "write-after-read"
        with pytest.raises(CudaEmuError, match=rf"{kind} hazard between blocks .* byte 0 of out"):
            run(out, 2)
        with pytest.raises(CudaEmuError, match=r"hazard between blocks .* byte 0 of out"):
            run(out, 4)


def test_dynamic_shared_memory_limits():
    """Above 48 KB a kernel needs cudaFuncAttributeMaxDynamicSharedMemorySize, as on the GPU; 227 KB is sm_90's
    most."""
    @functools.partial(emulated, writable=("out",))
    def run(out, size, opt_in):
        _cuda.ext("selftest_dynamic_smem").selftest_dynamic_smem(out.data_ptr(), size, opt_in)

    out = torch.zeros(1)
    run(out, 48 * 1024, False)
    assert out.item() == 12 * 1024
    with pytest.raises(RuntimeError, match="CUDA error: invalid argument"):
        run(out, 64 * 1024, False)
    run(out, 64 * 1024, True)
    assert out.item() == 16 * 1024
    with pytest.raises(RuntimeError, match="CUDA error: invalid argument"):
        run(out, 228 * 1024, True)


# ---------------------------------------------------------------------------------------------------------------
# Warp intrinsics and the PTX twins against the documented semantics
def as_int32(v):
    return v - (1 << 32) if v >= 1 << 31 else v


def test_warp_intrinsics():
    threads, stride = 96, 18
    out = torch.zeros(threads, stride, dtype=torch.int32)
    emulated(lambda out: _cuda.ext("selftest_warp").selftest_warp(out.data_ptr(), threads, stride),
             writable=("out",))(out)
    for t in range(threads):
        lane, base = t % 32, t - t % 32

        def sub(src, width, lane=lane, base=base):  # index within the warp's segment of `width` lanes
            return base + (lane - lane % width) + src

        expect = {
            0: 10 * (base + (lane * 7 + 3) % 32),
            1: 10 * sub((lane + 5) % 8, 8),
            2: 10 * (t - 3 if lane >= 3 else t),
            3: 10 * (t - 3 if lane % 8 >= 3 else t),
            4: 10 * (t + 5 if lane + 5 < 32 else t),
            5: 10 * (t + 5 if lane % 16 + 5 < 16 else t),
            6: 10 * (base + (lane ^ 9)),
            7: 10 * (base + (lane ^ 9) if (lane ^ 9) < lane - lane % 8 + 8 else t),
            8: as_int32(sum(1 << k for k in range(32) if (base + k) % 3 == 0)),
            9: int(base <= 37 < base + 32),
            10: int(base + 31 < 40),
            11: as_int32(0xF << (4 * (lane // 4))),
            12: 1,
            13: sum(1 for k in range(threads) if k % 5 == 0),
            14: 4 * (t ^ 1) + 1,
            15: -1,
            16: 1,
            17: sum(range(threads)),
        }
        for k, v in expect.items():
            assert out[t, k].item() == v, f"thread {t} result {k}: got {out[t, k].item()}, expected {v}"


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_ldmatrix_layout(count, trans):
    """ldmatrix .m8n8.x{1,2,4}{,.trans}.b16: lane l gives the address of row l % 8 of matrix l / 8 (rows scattered in
    shared memory) and receives in register i matrix i's (l / 4, 2 (l % 4) + {0, 1}) (.trans: transposed)."""
    g = torch.Generator().manual_seed(count + 10 * trans)
    values = torch.randint(0, 1 << 16, (32, 8), generator=g)
    perm = torch.randperm(32, generator=g).to(torch.int32)
    out = torch.zeros(32, count, dtype=torch.int32)
    inp = values.to(torch.int32).to(torch.int16)  # the low 16 bits

    @functools.partial(emulated, writable=("out",))
    def run(inp, perm, out):
        _cuda.ext("selftest_ldmatrix").selftest_ldmatrix(inp.data_ptr(), perm.data_ptr(), out.data_ptr(), count, trans)

    run(inp, perm, out)
    m = values.view(4, 8, 8)
    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)
        for i in range(count):
            lo, hi = (m[i, c, r], m[i, c + 1, r]) if trans else (m[i, r, c], m[i, r, c + 1])
            got = out[lane, i].item() & 0xFFFFFFFF
            assert got == int(lo) | int(hi) << 16, f"lane {lane} register {i}: {got:#x}"


@pytest.mark.parametrize("via_ldmatrix", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_layout(dtype, via_ldmatrix):
    """mma.sync m16n8k16 row.col f32 += {f16,bf16}: fragments assembled from the PTX ISA formulas (or loaded with
    ldmatrix x4 / x2 as the attention kernels do) give A B + C; a B fragment built from B instead of B^T does not."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(16, 16, generator=g).to(dtype)
    B = torch.randn(16, 8, generator=g).to(dtype)
    C = torch.randn(16, 8, generator=g)
    code = _cuda.dtype_code(A)

    @functools.partial(emulated, writable=("D",))
    def run(A, Bt, C, D):
        _cuda.ext("selftest_mma").selftest_mma(A.data_ptr(), Bt.data_ptr(), C.data_ptr(), D.data_ptr(), code,
                                               via_ldmatrix)

    D = torch.empty(16, 8)
    run(A, B.t().contiguous(), C, D)
    expect = A.double() @ B.double() + C.double()
    torch.testing.assert_close(D.double(), expect, rtol=1e-6, atol=1e-5)
    wrong = torch.empty(16, 8)
    run(A, B.contiguous().view(8, 16), C, wrong)  # B's memory read as if it were B^T
    assert (wrong.double() - expect).abs().max() > 0.1


def test_auto_never_picks_the_emulator_and_errors():
    t = torch.empty(1)
    assert _dispatch.resolve_backend("auto", t, cuda_op="orthogonalize") in ("triton", "torch")
    assert _dispatch.resolve_backend("cuda_emu", t, cuda_op="orthogonalize") == "cuda_emu"
    with pytest.raises(ValueError, match="no CUDA kernel"):
        _dispatch.resolve_backend("cuda_emu", t, cuda_op=None)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        orthogonalize(torch.randn(5, 2, dtype=torch.float64), backend="cuda_emu")
    with pytest.raises(ValueError, match="at most r=64"):
        orthogonalize(torch.randn(70, 65), backend="cuda_emu")


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_dispatch, "_load_emu_extension", lambda: (None, ImportError("No module named _C_emu")))
    with pytest.raises(RuntimeError, match=r"DALLE_KERNELS_CUDA_EMU=1 python setup\.py build_ext --inplace"):
        logit_laplace_loss(torch.zeros(1, 6, 2, 2), torch.zeros(1, 3, 2, 2), backend="cuda_emu")


# ---------------------------------------------------------------------------------------------------------------
# The schedules on the real kernels, and the mutation catalogue (dalle_kernels.emu_mutations)
def attention_outputs(dtype, d, mask="conv", block=0):
    """Output and gradients of csrc/attention.cu through the emulator: several query blocks and key tiles."""
    from test_attention import make_inputs
    from test_attention_cuda import run_cuda

    T, H, W = 10, 11, 13
    q, k, v, do = make_inputs(1, 2, T + H * W, d, dtype, "cpu", seed=d)
    o, grads = run_cuda(q, k, v, do, mask, T, (H, W), 5, None, block)
    return [o, *grads]


SCHEDULES = [dict(block_order="reverse", cp_async="early"), dict(block_order="shuffle", seed=3, cp_async="late")]


@pytest.mark.parametrize("sched", SCHEDULES, ids=["reverse-early", "shuffle-late"])
def test_schedules_change_no_result(sched):
    """Blocks reversed or shuffled, cp.async copies landing at issue: no kernel here may depend on either (a GPU
    promises neither), so every result is bit-identical to the default schedule's and nothing is reported:
    tensor-core attention (cp.async double buffers) forward and backward, the CUDA-core attention kernels,
    logit_laplace (per-block partial sums) and orthogonalize."""
    def results():
        P = torch.randn(2, 101, 5, generator=torch.Generator().manual_seed(0))
        params, target = ll.make_inputs((2, 33, 65), torch.float16, "cpu", seed=1)
        return [*attention_outputs(torch.float16, 32), *attention_outputs(torch.float32, 16, "row", 16),
                *ll.run(params, target, "mean", "cuda_emu"), oo.run(P, "cuda_emu")]

    expect = results()
    with schedule(**sched):
        got = results()
    for e, g in zip(expect, got):
        assert torch.equal(e, g)


def test_every_mutation_applies_to_todays_sources():
    """Each mutation of the catalogue changes exactly the text it names in today's csrc/ (an edit of the kernels
    that moves it fails here, not silently in the full run); names are unique; the CI subset and the runtime
    edits point at the mutated lines."""
    names = [m.name for m in emu_mutations.CATALOGUE]
    assert len(names) == len(set(names))
    for m in emu_mutations.CATALOGUE:
        src = (ROOT / "csrc" / m.file).read_text()
        mutated = m.apply(src)
        assert mutated != src and len(mutated.splitlines()) <= len(src.splitlines()), m.name
        assert m.tests and (ROOT / m.tests[0]).exists(), m.name
    for name in emu_mutations.CI_SUBSET:
        m = next(m for m in emu_mutations.CATALOGUE if m.name == name)
        (kind, line, _), = m.edits()
        text = (ROOT / line.split(":")[0]).read_text().splitlines()[int(line.split(":")[1]) - 1]
        assert {"skip_barrier": "__syncthreads();", "skip_commit": "cp_async_commit();",
                "wait_group": "cp_async_wait<"}[kind] in text, (name, line, text)


@pytest.mark.parametrize("name", emu_mutations.CI_SUBSET)
def test_ci_mutations_are_caught(emu, name):
    """The CI subset of the catalogue, applied by the emulator's edits instead of a rebuild: each must fail the
    tensor-core attention with a report that names the mutated kernel's source lines (the deleted barrier before
    the prefetch: the prefetch's cp.async against another warp's ldmatrix of the same buffer)."""
    m = next(m for m in emu_mutations.CATALOGUE if m.name == name)
    edits = m.edits()
    emu.emu_set_edits(edits)
    try:
        with pytest.raises(CudaEmuError) as err:
            attention_outputs(torch.float16, 32)
    finally:
        emu.emu_set_edits([])
    msg = str(err.value)
    assert "attn_fwd_mma_kernel<__half, 32, 64>" in msg and "hazard" in msg, msg
    if name == "fwd_mma/no_barrier_before_prefetch":
        prefetch = line_of("stage_pair_async<T, BN, D>(sK + (buf ^ 1) * BN * LDT", "csrc/attention.cu")
        assert re.search(r"write-after-read (?:\(several readers\) )?hazard on shared memory .* between thread \d+ at "
                         r"csrc/ptx.h:\d+ <- csrc/attention.cu:\d+ .*and thread \d+'s cp.async at csrc/ptx.h:\d+ "
                         r"<- csrc/attention.cu:\d+ <- .*" + re.escape(prefetch), msg), msg
    else:
        assert "cp.async hazard" in msg, msg
    attention_outputs(torch.float16, 32)  # the edits are undone
