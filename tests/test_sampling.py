"""KV-cache sampling: the cached logits equal a full forward pass; filters; image-prompt completion."""
import pytest
import torch

from dalle.model import DALLE, DALLEConfig
from dalle.sampling import Sampler, filter_logits, generate_images, sample_from_logits
from dalle_kernels import masks


def sharp_model(cfg, seed):
    """Random weights large enough that attention is far from uniform (a wrong key set shows)."""
    torch.manual_seed(seed)
    m = DALLE(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return m


@pytest.mark.parametrize("text_len,grid,n_layers,kernel", [(6, (4, 4), 5, 3), (5, (3, 5), 6, 3), (4, (5, 3), 4, 5)])
def test_kv_cache_logits_equal_full_forward(text_len, grid, n_layers, kernel):
    cfg = DALLEConfig.micro(text_len=text_len, grid=grid, n_layers=n_layers, conv_kernel=kernel,
                            attn_backend="torch")
    m = sharp_model(cfg, 0)
    text = torch.randint(0, cfg.text_rows, (3, text_len))
    image, logits = Sampler(m).generate(text, return_logits=True, top_k=4)
    with torch.no_grad():
        _, full = m(text, image)
    assert logits.shape == full.shape == (3, cfg.image_len, cfg.image_vocab)
    err = (logits - full).abs()
    assert err.max() < 1e-4 * full.abs().max(), f"worst index {divmod(int(err.argmax()), cfg.image_vocab)}"


def test_kv_cache_would_catch_a_wrong_key_set(monkeypatch):
    """Negative control: reading every earlier key (causal) instead of the mask's keys changes the logits."""
    cfg = DALLEConfig.micro(attn_backend="torch")
    m = sharp_model(cfg, 1)
    text = torch.randint(0, cfg.text_rows, (2, cfg.text_len))
    image, logits = Sampler(m).generate(text, return_logits=True)
    monkeypatch.setattr(Sampler, "allowed_keys", lambda self, mask, i, dev: torch.arange(i + 1, device=dev))
    _, wrong = Sampler(m).generate(text, image_prefix=image[:, :1], return_logits=True, temperature=0)
    with torch.no_grad():
        _, full = m(text, image)
    assert (wrong - full[:, 1:]).abs().max() > 1e-3


def test_allowed_keys_come_from_the_mask_predicate():
    cfg = DALLEConfig.micro(attn_backend="torch")
    s = Sampler(DALLE(cfg))
    T, (H, W) = cfg.text_len, cfg.grid
    dense = {mk: masks.dense_mask(mk, T, (H, W), cfg.conv_kernel) for mk in ("row", "column", "conv")}
    for mk, d in dense.items():
        for i in range(T, T + H * W):
            assert s.allowed_keys(mk, i, "cpu").tolist() == torch.nonzero(d[i]).flatten().tolist()
    # the row layer reads T + W + 1 keys at an interior position, not all i + 1
    assert len(s.allowed_keys("row", T + H * W - 1, "cpu")) == T + W + 1


def test_image_prompt_completion_keeps_prefix_and_matches_forward():
    cfg = DALLEConfig.micro(attn_backend="torch")
    m = sharp_model(cfg, 2)
    text = torch.randint(0, cfg.text_rows, (2, cfg.text_len))
    prefix = torch.randint(0, cfg.image_vocab, (2, 2, cfg.grid[1]))  # first two rows given
    image, logits = Sampler(m).generate(text, image_prefix=prefix, return_logits=True)
    n = prefix[0].numel()
    assert torch.equal(image[:, :n], prefix.flatten(1))
    with torch.no_grad():
        _, full = m(text, image)
    assert (logits - full[:, n:]).abs().max() < 1e-4 * full.abs().max()
    with pytest.raises(ValueError, match="image_prefix"):
        Sampler(m).generate(text, image_prefix=torch.zeros(2, cfg.image_len, dtype=torch.long))


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    p = torch.softmax(logits, -1)[0]  # 0.0871 0.6439 0.2369 0.0321
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]
    assert p[1] + p[2] > 0.7
    assert sample_from_logits(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from_logits(logits, top_k=2, generator=g) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {1, 2}
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=1.5)


def test_generate_is_reproducible_with_a_generator():
    cfg = DALLEConfig.micro(attn_backend="torch")
    m = sharp_model(cfg, 3)
    text = torch.randint(0, cfg.text_rows, (2, cfg.text_len))
    a = generate_images(m, text, generator=torch.Generator().manual_seed(5), temperature=1.0)
    b = generate_images(m, text, generator=torch.Generator().manual_seed(5), temperature=1.0)
    assert torch.equal(a, b) and a.shape == (2, cfg.image_len)
    assert a.min() >= 0 and a.max() < cfg.image_vocab


@pytest.mark.gpu
def test_gpu_kv_cache_logits_equal_full_forward(cuda_only):
    cfg = DALLEConfig.tiny(text_len=16, text_vocab=100, image_vocab=64, grid=(8, 8))
    m = sharp_model(cfg, 4).cuda()
    text = torch.randint(0, cfg.text_rows, (4, cfg.text_len), device="cuda")
    image, logits = Sampler(m).generate(text, return_logits=True, top_k=8)
    with torch.no_grad():
        _, full = m(text, image)
    assert (logits - full.float()).abs().max() < 1e-3 * full.abs().max()


def test_kv_cache_with_code_embedding_equals_full_forward():
    cfg = DALLEConfig.micro(code_features=6, attn_backend="torch")
    m = sharp_model(cfg, 5)
    m.set_code_features(torch.randn(cfg.image_vocab, 6, generator=torch.Generator().manual_seed(0)))
    text = torch.randint(0, cfg.text_rows, (3, cfg.text_len))
    image, logits = Sampler(m).generate(text, return_logits=True, top_k=4)
    with torch.no_grad():
        _, full = m(text, image)
    assert (logits - full).abs().max() < 1e-4 * full.abs().max()


@pytest.mark.parametrize("scale", [0.0, 2.5, -1.0])
def test_guidance_logits_are_u_plus_s_times_c_minus_u(scale):
    """Classifier-free guidance: the logits used equal ``u + s (c - u)`` from two full forward passes on the
    sampled image, ``c`` with the caption and ``u`` with the empty caption (or the one given)."""
    cfg = DALLEConfig.micro(attn_backend="torch")
    m = sharp_model(cfg, 6)
    text = torch.randint(0, cfg.text_rows, (3, cfg.text_len))
    for uncond in (None, torch.randint(0, cfg.text_rows, (cfg.text_len,))):
        image, logits = Sampler(m).generate(text, return_logits=True, guidance=scale, uncond_text=uncond,
                                            generator=torch.Generator().manual_seed(1))
        u_text = m.unconditional_text(3) if uncond is None else uncond.expand(3, -1)
        with torch.no_grad():
            _, c = m(text, image)
            _, u = m(u_text, image)
        ref = u + scale * (c - u)
        assert (logits - ref).abs().max() < 1e-4 * ref.abs().max()
    # with a prefix the guided completion keeps it
    prefix = torch.randint(0, cfg.image_vocab, (3, cfg.grid[1]))
    image = Sampler(m).generate(text, image_prefix=prefix, guidance=scale)
    assert torch.equal(image[:, : cfg.grid[1]], prefix)


def test_guidance_one_is_plain_sampling_and_bad_values_fail():
    cfg = DALLEConfig.micro(attn_backend="torch")
    m = sharp_model(cfg, 7)
    text = torch.randint(0, cfg.text_rows, (2, cfg.text_len))
    a = Sampler(m).generate(text, generator=torch.Generator().manual_seed(3), guidance=1.0)
    b = Sampler(m).generate(text, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="guidance"):
        Sampler(m).generate(text, guidance=float("inf"))
    with pytest.raises(ValueError, match="uncond_text"):
        Sampler(m).generate(text, guidance=2.0, uncond_text=m.unconditional_text(3))
