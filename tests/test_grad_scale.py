"""Per-resblock gradient scaling (SPEC.md section 4) driven with injected inf/NaN gradients."""
import math

import pytest
import torch

from dalle.grad_scale import BlockGradScaler
from dalle.model import DALLE, DALLEConfig

G = 2.0 ** (1 / 1000)


def setup(seed=0, n_layers=4, world_size=1):
    torch.manual_seed(seed)
    cfg = DALLEConfig.micro(n_layers=n_layers, attn_backend="torch")
    m = DALLE(cfg)
    text = torch.randint(0, cfg.text_rows, (2, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (2, cfg.image_len))
    return m, BlockGradScaler(n_layers, world_size=world_size).attach(m), text, image


def inject(block, value):
    """Put ``value`` into one element of the gradient inside ``block``'s MLP backward."""
    def fwd_hook(mod, inp, out):
        def grad_hook(g):
            g = g.clone()
            g.view(-1)[3] = value
            return g
        out.register_hook(grad_hook)
    return block.fc.register_forward_hook(fwd_hook)


def test_scaled_gradients_equal_plain_gradients():
    m, scaler, text, image = setup()
    m.loss(text, image).backward()
    scaled = {n: p.grad.clone() for n, p in m.named_parameters()}
    # the raw block gradients carry the factor 2**13
    ref_m, _, _, _ = setup()
    ref_m.grad_scaler = None  # plain backward
    ref_m.loss(text, image).backward()
    w = "blocks.1.fc.weight"
    torch.testing.assert_close(scaled[w], dict(ref_m.named_parameters())[w].grad * 2.0 ** 13, rtol=1e-5, atol=0)
    assert scaler.unscale_() == [False] * 4
    for n, p in ref_m.named_parameters():
        torch.testing.assert_close(dict(m.named_parameters())[n].grad, p.grad, rtol=1e-5, atol=1e-9)


def test_scale_rules_start_grow_clamp():
    s = BlockGradScaler(3, world_size=2)
    assert s.scales == [2.0 ** 13 * 2] * 3
    s.update([False, True, False])
    assert s.scales[0] == pytest.approx(2.0 ** 14 * G, rel=1e-12)
    assert s.scales[1] == pytest.approx(2.0 ** 14 / math.sqrt(2), rel=1e-12)
    for _ in range(100):
        s.update([True, True, False])
    assert s.scales[0] == 2.0 ** 7 * 2  # clamped below at 2**7 M
    s.scales[2] = 2.0 ** 24 * 2
    s.update([False, False, False])
    assert s.scales[2] == 2.0 ** 24 * 2  # clamped above at 2**24 M
    with pytest.raises(ValueError):
        BlockGradScaler(0)
    with pytest.raises(ValueError):
        BlockGradScaler(2, world_size=0)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_nonfinite_in_one_block_skips_only_that_block(value):
    m, scaler, text, image = setup(seed=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    handle = inject(m.blocks[2], value)
    m.loss(text, image).backward()
    handle.remove()
    skipped = scaler.unscale_()
    assert skipped == [False, False, True, False]
    # filtered: blocks below the bad one got finite gradients (the outgoing gradient was zeroed where bad)
    for l in (0, 1, 3):
        assert all(torch.isfinite(p.grad).all() for p in m.blocks[l].parameters())
    assert all(p.grad is None for p in m.blocks[2].parameters())
    assert all(torch.isfinite(p.grad).all() for n, p in m.named_parameters() if not n.startswith("blocks."))
    opt.step()
    scaler.update(skipped)
    after = dict(m.named_parameters())
    for n, p in after.items():
        assert torch.isfinite(p).all(), n
        if n.startswith("blocks.2."):
            assert torch.equal(p, before[n]), f"{n} updated although its block was skipped"
    assert not torch.equal(after["blocks.1.fc.weight"], before["blocks.1.fc.weight"])
    assert not torch.equal(after["blocks.3.fc.weight"], before["blocks.3.fc.weight"])
    base = 2.0 ** 13
    assert scaler.scales[2] == pytest.approx(base / math.sqrt(2))
    for l in (0, 1, 3):
        assert scaler.scales[l] == pytest.approx(base * G)


def test_repeated_overflow_training_stays_finite():
    """Many steps with a NaN injected into a varying block: parameters never become non-finite."""
    m, scaler, text, image = setup(seed=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    expect = [2.0 ** 13] * 4
    for step in range(6):
        bad = step % 5  # 4: no injection
        handle = inject(m.blocks[bad], float("nan")) if bad < 4 else None
        opt.zero_grad(set_to_none=True)
        m.loss(text, image).backward()
        if handle:
            handle.remove()
        skipped = scaler.unscale_()
        assert skipped == [l == bad for l in range(4)]
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 4.0)
        opt.step()
        scaler.update(skipped)
        expect = [e / math.sqrt(2) if l == bad else e * G for l, e in enumerate(expect)]
        assert scaler.scales == pytest.approx(expect)
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_fp16_overflow_detected_without_injection():
    """A huge scale overflows a half-precision backward: that block is skipped and its scale shrinks."""
    m, scaler, text, image = setup(seed=3, n_layers=2)
    m.half()
    scaler.scales = [2.0 ** 24, 1.0]
    loss = m.loss(text, image)
    (loss * 2.0 ** 10).backward()
    skipped = scaler.unscale_()
    assert skipped[0]
    scaler.update(skipped)
    assert scaler.scales[0] == pytest.approx(2.0 ** 24 / math.sqrt(2))


def test_state_dict_roundtrip_and_worker_rescale():
    s = BlockGradScaler(2)
    s.update([True, False])
    t = BlockGradScaler(2)
    t.load_state_dict(s.state_dict())
    assert t.scales == s.scales
    u = BlockGradScaler(2, world_size=4)
    u.load_state_dict(s.state_dict())
    assert u.scales == pytest.approx([x * 4 for x in s.scales])
    with pytest.raises(ValueError, match="block scales"):
        BlockGradScaler(3).load_state_dict(s.state_dict())
