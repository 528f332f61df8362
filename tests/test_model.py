"""DALL-E transformer: layer schedule, embedding layout, loss weighting, checkpointing, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from dalle.model import DALLE, DALLEConfig, combine_losses, layer_masks
from dalle_kernels import dense_mask


def micro(**kw):
    kw.setdefault("attn_backend", "torch")
    return DALLEConfig.micro(**kw)


def tokens(cfg, B, gen=None):
    text = torch.randint(0, cfg.text_rows, (B, cfg.text_len), generator=gen)
    image = torch.randint(0, cfg.image_vocab, (B, cfg.image_len), generator=gen)
    return text, image


def test_layer_schedule():
    assert layer_masks(64)[:6] == ["row", "column", "row", "row", "row", "column"]
    assert layer_masks(64)[-1] == "conv"
    sched = layer_masks(64)
    for l in range(63):
        assert sched[l] == ("column" if l % 4 == 1 else "row"), l
    assert layer_masks(1) == ["conv"]
    assert layer_masks(2) == ["row", "conv"]
    model = DALLE(micro(n_layers=6))
    assert [b.attn.mask for b in model.blocks] == ["row", "column", "row", "row", "row", "conv"]


def test_paper_config_sizes():
    c = DALLEConfig.paper()
    assert (c.text_len, c.grid, c.seq_len, c.text_vocab, c.image_vocab) == (256, (32, 32), 1280, 16384, 8192)
    assert (c.n_layers, c.n_heads, c.head_dim, c.d_model, c.text_rows) == (64, 62, 64, 3968, 16384 + 256)


@pytest.mark.parametrize("bad", [dict(n_layers=0), dict(text_len=-1), dict(conv_kernel=4), dict(last_mask="x")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        micro(**bad)


def test_embedding_layout():
    """Text rows = vocab + T (a padding id per slot); image position = row[r] + column[c]."""
    cfg = micro(text_len=5, grid=(3, 4))
    m = DALLE(cfg)
    assert m.text_emb.weight.shape == (cfg.text_vocab + 5, cfg.d_model)
    assert m.text_head.out_features == cfg.text_vocab + 5
    assert m.image_emb.weight.shape == (cfg.image_vocab, cfg.d_model)
    assert m.row_emb.shape == (3, cfg.d_model) and m.col_emb.shape == (4, cfg.d_model)
    text, image = tokens(cfg, 2)
    text[1, 2:] = cfg.text_vocab + torch.arange(2, 5)  # padded caption: slot i holds vocab + i
    x = m.embed(text, image)
    assert x.shape == (2, 5 + 12, cfg.d_model)
    for b in range(2):
        for t in range(5):
            torch.testing.assert_close(x[b, t], m.text_emb.weight[text[b, t]] + m.text_pos[t])
        for k in range(12):
            r, c = divmod(k, 4)
            torch.testing.assert_close(x[b, 5 + k], m.image_emb.weight[image[b, k]] + m.row_emb[r] + m.col_emb[c])
    # distinct padding embeddings per slot
    pads = m.text_emb.weight[cfg.text_vocab:]
    assert torch.cdist(pads, pads).add(torch.eye(5)).min() > 0


def test_loss_weighting_and_targets():
    """loss == (CE_text over slots 1..T-1 + 7 CE_image over all image tokens) / 8, with the shift the model documents."""
    torch.manual_seed(0)
    cfg = micro()
    m = DALLE(cfg)
    text, image = tokens(cfg, 3)
    loss, lt, li = m.loss(text, image, return_parts=True)
    # recompute from the raw hidden states: position p predicts token p + 1 of the whole stream
    h = m.run_blocks(m.embed(text, image))
    T = cfg.text_len
    lt_ref = F.cross_entropy(m.text_head(h[:, : T - 1]).flatten(0, 1), text[:, 1:].flatten())
    li_ref = F.cross_entropy(m.image_head(h[:, T - 1: T - 1 + cfg.image_len]).flatten(0, 1), image.flatten())
    torch.testing.assert_close(lt, lt_ref.detach())
    torch.testing.assert_close(li, li_ref.detach())
    torch.testing.assert_close(loss, (lt_ref + 7 * li_ref) / 8)
    assert combine_losses(torch.tensor(1.0), torch.tensor(9.0)).item() == pytest.approx(8.0)


def test_forward_is_causal_under_the_layer_masks():
    """Changing image token k changes no logit that predicts tokens <= k, and text logits never."""
    torch.manual_seed(1)
    cfg = micro()
    m = DALLE(cfg).eval()
    text, image = tokens(cfg, 1)
    tl, il = m(text, image)
    k = 7
    image2 = image.clone()
    image2[0, k] = (image[0, k] + 1) % cfg.image_vocab
    tl2, il2 = m(text, image2)
    torch.testing.assert_close(tl, tl2)
    torch.testing.assert_close(il[:, : k + 1], il2[:, : k + 1])
    assert (il[:, k + 1] - il2[:, k + 1]).abs().max() > 1e-6


def test_attention_matches_dense_reference_per_layer():
    """Each block's attention equals dense softmax attention under that layer's mask (float64 reference)."""
    torch.manual_seed(2)
    cfg = micro(n_layers=6)
    m = DALLE(cfg)
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    for block in m.blocks:
        att = block.attn
        q, k, v = (t.double() for t in att.split(x))
        s = q @ k.transpose(-1, -2) / cfg.head_dim ** 0.5
        allow = dense_mask(att.mask, cfg.text_len, cfg.grid, cfg.conv_kernel)
        ref = att.merge(torch.softmax(s.masked_fill(~allow, float("-inf")), -1).matmul(v).float())
        torch.testing.assert_close(att(x), ref, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(3)
    cfg = micro()
    m = DALLE(cfg)
    text, image = tokens(cfg, 2)
    m.loss(text, image).backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.cfg.checkpoint = True
    m.loss(text, image).backward()
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_param_groups_no_decay_on_gains_biases_embeddings():
    m = DALLE(micro())
    decay, no_decay = (g["params"] for g in m.param_groups(0.045))
    assert len(decay) + len(no_decay) == len(list(m.parameters()))
    assert all(p.dim() == 2 for p in decay)
    ids = {id(p) for p in no_decay}
    for p in (m.text_emb.weight, m.image_emb.weight, m.text_pos, m.row_emb, m.col_emb, m.ln_f.weight,
              m.ln_f.bias, m.blocks[0].attn.qkv.bias):
        assert id(p) in ids
    assert id(m.blocks[0].attn.qkv.weight) in {id(p) for p in decay}


def test_bad_tokens_rejected():
    cfg = micro()
    m = DALLE(cfg)
    text, image = tokens(cfg, 2)
    with pytest.raises(ValueError, match="text"):
        m(text[:, :-1], image)
    with pytest.raises(ValueError, match="image"):
        m(text, image[:, :-1])
    with pytest.raises(ValueError, match="text"):
        m(text.float(), image)


def test_torch_compile_runs():
    torch.manual_seed(4)
    cfg = micro(n_layers=2)
    m = DALLE(cfg)
    text, image = tokens(cfg, 2)
    ref = m.loss(text, image)
    compiled = torch.compile(m.loss, backend="inductor")
    out = compiled(text, image)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_triton_attention_backend_matches_torch():
    """The model on the block-sparse Triton kernel (interpreter on CPU) gives the torch path's loss and grads."""
    torch.manual_seed(5)
    cfg = micro(n_layers=3)
    m = DALLE(cfg)
    text, image = tokens(cfg, 2)
    l1 = m.loss(text, image)
    l1.backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.cfg.attn_backend = "triton"
    l2 = m.loss(text, image)
    l2.backward()
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernel_backend_under_autocast_matches_fp32_reference(cuda_only, dtype):
    """GPU lane: the model on the compiled sparse kernels under autocast tracks the fp32 torch path."""
    torch.manual_seed(6)
    cfg = DALLEConfig.tiny(text_len=16, text_vocab=100, image_vocab=64, grid=(8, 8), attn_backend="auto")
    m = DALLE(cfg).cuda()
    text = torch.randint(0, cfg.text_rows, (4, cfg.text_len), device="cuda")
    image = torch.randint(0, cfg.image_vocab, (4, cfg.image_len), device="cuda")
    m.cfg.attn_backend = "torch"
    ref = m.loss(text, image)
    m.cfg.attn_backend = "auto"
    with torch.autocast("cuda", dtype=dtype):
        out = m.loss(text, image)
    out.backward()
    assert abs(out.item() - ref.item()) < 2e-2 * ref.item()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.gpu
def test_gpu_fp16_training_step_with_block_grad_scaling(cuda_only):
    from dalle.grad_scale import BlockGradScaler

    torch.manual_seed(7)
    cfg = DALLEConfig.tiny(text_len=16, text_vocab=100, image_vocab=64, grid=(8, 8), checkpoint=True)
    m = DALLE(cfg).cuda()
    scaler = BlockGradScaler(cfg.n_layers).attach(m)
    opt = torch.optim.AdamW(m.param_groups(0.045), lr=1e-3, betas=(0.9, 0.96))
    text = torch.randint(0, cfg.text_rows, (4, cfg.text_len), device="cuda")
    image = torch.randint(0, cfg.image_vocab, (4, cfg.image_len), device="cuda")
    first = None
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = m.loss(text, image)
        loss.backward()
        skipped = scaler.unscale_()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], 4.0)
        opt.step()
        scaler.update(skipped)
        first = first if first is not None else loss.item()
    assert loss.item() < first
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_code_embedding_matches_float64_reference():
    """``code_features > 0``: input vectors and image logits come from one MLP over the fixed features."""
    torch.manual_seed(7)
    cfg = micro(code_features=5)
    m = DALLE(cfg)
    with torch.no_grad():  # weights large enough that the MLP is far from linear
        for p in m.image_emb.parameters():
            p.normal_(0, 0.5)
    feats = torch.randn(cfg.image_vocab, 5, dtype=torch.float64)
    m.set_code_features(feats.float())

    def mlp(e):  # float64 reference from the float32 weights
        w1, b1, w2, b2 = (p.detach().double() for p in (e.fc.weight, e.fc.bias, e.out.weight, e.out.bias))
        return F.gelu(feats @ w1.t() + b1) @ w2.t() + b2

    assert not hasattr(m, "image_head") and "image_emb.features" in dict(m.named_buffers())
    text, image = tokens(cfg, 3)
    x = m.embed(text, image)
    pos = m.image_position_embedding().double()
    torch.testing.assert_close(x[:, cfg.text_len:].double(), mlp(m.image_emb)[image] + pos, atol=1e-5, rtol=1e-5)
    text_logits, image_logits = m(text, image)
    h = m.run_blocks(m.embed(text, image)).double()
    torch.testing.assert_close(image_logits.double(), h[:, cfg.text_len - 1: -1] @ mlp(m.image_emb).t(),
                               atol=1e-5, rtol=1e-5)
    # the MLP gets gradients from both uses; the features are a buffer, not trained
    m.loss(text, image).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.image_emb.parameters())
    assert "image_emb.features" not in dict(m.named_parameters())
    decay = {id(p) for p in m.param_groups(0.1)[0]["params"]}
    assert id(m.image_emb.fc.weight) in decay and id(m.image_emb.fc.bias) not in decay
    # saved and loaded with the weights
    m2 = DALLE(cfg)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(text, image)[1], image_logits)


def test_code_embedding_groups_sum_one_mlp_per_group():
    """``code_feature_groups``: each group of feature columns has its own MLP; a code's vector is the sum."""
    torch.manual_seed(9)
    cfg = micro(code_features=7, code_feature_groups=(4, 2, 1))
    m = DALLE(cfg)
    with torch.no_grad():
        for p in m.image_emb.parameters():
            p.normal_(0, 0.5)
    feats = torch.randn(cfg.image_vocab, 7, dtype=torch.float64)
    m.set_code_features(feats.float())
    e = m.image_emb

    def mlp(x, l1, l2):
        return F.gelu(x @ l1.weight.detach().double().t() + l1.bias.detach().double()) \
            @ l2.weight.detach().double().t() + l2.bias.detach().double()

    ref = mlp(feats[:, :4], e.fc, e.out) + mlp(feats[:, 4:6], e.extra[0][0], e.extra[0][2]) \
        + mlp(feats[:, 6:], e.extra[1][0], e.extra[1][2])
    torch.testing.assert_close(m.image_head_weight().double(), ref, atol=1e-5, rtol=1e-5)
    text, image = tokens(cfg, 2)
    h = m.run_blocks(m.embed(text, image)).double()
    torch.testing.assert_close(m(text, image)[1].double(), h[:, cfg.text_len - 1: -1] @ ref.t(), atol=1e-5, rtol=1e-5)
    m.loss(text, image).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
    # the groups survive the config's round trip through a checkpoint
    m2 = DALLE(type(cfg).from_dict(cfg.to_dict()))
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.image_head_weight(), m.image_head_weight())


def test_code_features_are_checked():
    with pytest.raises(ValueError, match="code_features"):
        micro(code_features=-1)
    with pytest.raises(ValueError, match="code_feature_groups"):
        micro(code_features=4, code_feature_groups=(2, 1))
    with pytest.raises(ValueError, match="code_feature_groups"):
        micro(code_features=4, code_feature_groups=(4, 0))
    m = DALLE(micro(code_features=4))
    with pytest.raises(ValueError, match="features"):
        m.set_code_features(torch.zeros(m.cfg.image_vocab, 3))
    with pytest.raises(ValueError, match="features"):
        m.set_code_features(torch.full((m.cfg.image_vocab, 4), float("nan")))
    with pytest.raises(ValueError, match="lookup-table"):
        DALLE(micro()).set_code_features(torch.zeros(12, 4))


def test_unconditional_text_is_the_empty_caption():
    cfg = micro(text_len=5)
    u = DALLE(cfg).unconditional_text(3)
    assert u.shape == (3, 5) and u.dtype == torch.long
    assert u.tolist() == [[cfg.text_vocab + i for i in range(5)]] * 3


def test_torch_compile_runs_with_code_embedding():
    torch.manual_seed(6)
    cfg = micro(n_layers=2, code_features=3)
    m = DALLE(cfg)
    m.set_code_features(torch.randn(cfg.image_vocab, 3))
    text, image = tokens(cfg, 2)
    ref = m.loss(text, image)
    out = torch.compile(m.loss, backend="inductor")(text, image)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_residual_dropout_only_in_training():
    torch.manual_seed(8)
    cfg = micro(dropout=0.3)
    m, ref = DALLE(cfg), DALLE(micro())
    ref.load_state_dict(m.state_dict())
    text, image = tokens(cfg, 2)
    m.eval(), ref.eval()
    torch.testing.assert_close(m(text, image)[1], ref(text, image)[1])  # eval: no dropout
    m.train()
    torch.manual_seed(0)
    a = m(text, image)[1]
    torch.manual_seed(0)
    torch.testing.assert_close(m(text, image)[1], a)  # the masks come from the global RNG
    assert (a - ref(text, image)[1]).abs().max() > 1e-3
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            micro(dropout=bad)


def test_initial_values_are_seeded_per_parameter_and_rows(monkeypatch):
    """Every parameter's initial value depends on (seed, name) only, and any rows of it can be drawn alone
    (sharded init, dalle.fsdp): the slices equal the whole; the distributions are the documented ones."""
    import dalle.model as model_mod

    monkeypatch.setattr(model_mod, "INIT_BLOCK", 40)  # many blocks even at this size
    cfg = DALLEConfig.micro()
    a, b, c = DALLE(cfg, init_seed=7), DALLE(cfg, init_seed=7), DALLE(cfg, init_seed=8)
    rules = a.init_rules()
    assert set(rules) == {n for n, _ in a.named_parameters()}
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        kind, std = rules[name]
        if kind == "normal":
            assert not torch.equal(p, r), name
        n = p.shape[0]
        for lo, hi in ((0, n), (1, n - 1), (n // 3, n // 3 + 1), (n - 1, n), (2, 2)):
            assert torch.equal(a.initial_value(name, 7, rules, rows=(lo, hi)), p.detach()[lo:hi]), (name, lo, hi)
    assert float(a.blocks[0].ln1.weight.min()) == 1.0 and float(a.blocks[0].fc.bias.abs().max()) == 0.0
    big = DALLE(DALLEConfig.micro(n_layers=4), init_seed=0)
    w = torch.cat([big.get_parameter(f"blocks.{l}.fc.weight").flatten() for l in range(4)])
    assert float(w.std()) == pytest.approx(0.02, rel=0.05) and abs(float(w.mean())) < 1e-3
    with pytest.raises(ValueError, match="rows"):
        a.initial_value("text_pos", 7, rows=(0, 10 ** 6))
