"""dalle.optim: stochastic rounding to bf16/fp16 against float64 references, and AdamW16 (16-bit parameters and
moments, paper section 2.4): equal to torch.optim.AdamW on float32 parameters, tracking a float64 AdamW on 16-bit
ones where round-to-nearest loses the updates."""
import copy
import math

import pytest
import torch

from dalle.optim import AdamW16, stochastic_round


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_representable_values_are_exact(dtype):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf")], dtype=dtype)])
    for s in range(5):
        got = stochastic_round(x.float(), dtype, torch.Generator().manual_seed(s))
        assert got.dtype == dtype and torch.equal(got, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unbiased_and_neighbours_only(dtype):
    """Each result is one of the two dtype values around x, and the mean of K draws is x (float64) within five
    standard errors (the spread of one draw is at most half the spacing of the neighbours)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(256, generator=g) + 0.5) * torch.tensor([1e-3, 1.0, 7.0, 300.0]).repeat(64)
    near = x.to(dtype)
    assert not torch.equal(near.float(), x)
    K = 4000
    draws = torch.stack([stochastic_round(x, dtype, g) for _ in range(K)]).double()  # (K, 256)
    lo = torch.where(near.float() <= x, near, torch.nextafter(near, torch.full_like(near, -math.inf))).double()
    hi = torch.where(near.float() >= x, near, torch.nextafter(near, torch.full_like(near, math.inf))).double()
    assert ((draws == lo) | (draws == hi)).all()
    gap = hi - lo
    err = (draws.mean(0) - x.double()).abs()
    assert (err <= 5 * 0.5 * gap / math.sqrt(K)).all(), (err / gap).max()
    # and the far neighbour is drawn as often as its probability says: the fraction of "hi" draws
    frac_hi = (draws == hi).double().mean(0)
    want = (x.double() - lo) / gap
    assert (frac_hi - want).abs().max() < 5 * 0.5 / math.sqrt(K)


def test_small_updates_survive_on_average():
    """1000 increments of 1e-3 to 1.0 in bf16 (spacing 2^-7 there; half of it, 0.0039, is more than the increment):
    round-to-nearest never moves, stochastic rounding arrives near the float64 sum 2.0."""
    g = torch.Generator().manual_seed(2)
    near = sr = torch.ones(512, dtype=torch.bfloat16)
    for _ in range(1000):
        near = (near.float() + 1e-3).to(torch.bfloat16)
        sr = stochastic_round(sr.float() + 1e-3, torch.bfloat16, g)
    assert torch.equal(near, torch.ones_like(near))
    assert sr.double().mean().item() == pytest.approx(2.0, rel=0.01)


def test_bad_arguments():
    with pytest.raises(TypeError, match="float32"):
        stochastic_round(torch.ones(2, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        stochastic_round(torch.ones(2), torch.float32)
    with pytest.raises(ValueError, match="rounding"):
        AdamW16([torch.nn.Parameter(torch.ones(2))], rounding="up")


def _params(dtype, n=2048, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = (1 + torch.rand(n, generator=g)).to(dtype)  # magnitudes in [1, 2): bf16 spacing 2^-7
    grads = [torch.randn(n, generator=g) for _ in range(8)]
    return w, grads


def test_fp32_parameters_step_as_torch_adamw():
    w, grads = _params(torch.float32)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    oa = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.1)
    ob = AdamW16([b], lr=1e-2, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.1)
    for gr in grads * 3:
        a.grad, b.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


def _adamw64(w, grads, steps, lr, b1, b2, eps, wd):
    x, m, v = w.double(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for t in range(1, steps + 1):
        g = grads[(t - 1) % len(grads)].double()
        x = x * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)
    return x


def test_bf16_adamw_tracks_float64_where_nearest_stalls():
    """Step size 2e-5 (about the paper's final one, 4.5e-4 halved five times) on weights in [1, 2): each update
    is below half the bf16 spacing. Rounded to nearest, the weights never move; with stochastic rounding their
    mean displacement is the float64 AdamW's within 3%, and the moments are stored in bf16."""
    w, grads = _params(torch.bfloat16)
    grads = [g.abs() + 0.5 for g in grads]  # one sign: a displacement that adds up
    kw = dict(lr=2e-5, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    ref = _adamw64(w, grads, 300, kw["lr"], 0.9, 0.96, 1e-8, 0.0)
    out = {}
    for rounding in ("nearest", "stochastic"):
        p = torch.nn.Parameter(w.clone())
        opt = AdamW16([p], seed=4, rounding=rounding, **kw)
        for t in range(300):
            p.grad = grads[t % len(grads)].to(torch.bfloat16)
            opt.step()
        out[rounding] = p.detach().clone()
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    move = (ref - w.double()).mean().item()
    assert move < -5e-3  # the float64 run moves each weight by about 300 x 2e-5
    assert torch.equal(out["nearest"], w)
    got = (out["stochastic"].double() - w.double()).mean().item()
    assert got == pytest.approx(move, rel=0.03)


def test_rounding_is_a_function_of_the_step():
    """Resume: an optimizer rebuilt from another's state dict draws the same rounding as the original did."""
    w, grads = _params(torch.bfloat16)
    p = torch.nn.Parameter(w.clone())
    opt = AdamW16([p], lr=1e-3, seed=7)
    for t in range(3):
        p.grad = grads[t].to(torch.bfloat16)
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW16([q], lr=1e-3, seed=7)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read from a checkpoint: no shared tensors
    for t in range(3, 6):
        p.grad = grads[t].to(torch.bfloat16)
        q.grad = grads[t].to(torch.bfloat16)
        opt.step()
        opt2.step()
    assert torch.equal(p, q)
    r = torch.nn.Parameter(w.clone())  # another seed rounds otherwise
    opt3 = AdamW16([r], lr=1e-3, seed=8)
    s = torch.nn.Parameter(w.clone())
    opt4 = AdamW16([s], lr=1e-3, seed=7)
    for t in range(6):
        r.grad = s.grad = grads[t].to(torch.bfloat16)
        opt3.step()
        opt4.step()
    assert torch.equal(s, p) and not torch.equal(r, p)
