"""dVAE: shapes through encoder/decoder, schedules, loss wiring to the fused logit-Laplace op, training and
exact resume of the trainer, image grids."""
import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dalle.dvae as dvae_mod
from dalle import checkpoint
from dalle.data.shapes import ShapesDataset
from dalle.dvae import DVAE, DVAEConfig, assign_cells, cell_patches, kmeans_cells
from dalle.images import save_grid
from dalle.schedules import PAPER_BETA, PAPER_LR, PAPER_TAU, CosineSchedule, cosine
from dalle.train_dvae import TrainDVAEConfig, _Batches, main, schedules, train_dvae
from dalle_kernels import logit_laplace_loss_ref


def _small(**kw):
    return DVAEConfig.tiny(**{"n_hid": 8, "n_init": 16, "vocab_size": 32, **kw})


def test_tiny_encode_decode_shapes_and_dtypes():
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.tiny())
    assert model.grid_size == (8, 8) and model.cfg.grid_factor == 4
    ds = ShapesDataset("train", 3)
    x = torch.stack([ds[i][0] for i in range(3)])
    tokens = model.encode(x)
    assert tokens.dtype == torch.long and tokens.shape == (3, 8, 8)
    assert 0 <= tokens.min() and tokens.max() < 512
    assert torch.equal(tokens, model.encode(x.float() / 255))  # uint8 and float [0, 1] are the same image
    assert torch.equal(tokens, model.encode(x))  # argmax, no noise
    out = model.decode(tokens)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32) and not out.requires_grad
    assert 0 <= out.min() and out.max() <= 1
    # decoding ids through the codebook lookup equals decoding their one-hot through the 1x1 conv
    one_hot = F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens), model.decoder(one_hot), rtol=1e-5, atol=1e-5)
    logits = model.logits(x)
    assert logits.shape == (3, 512, 8, 8) and logits.dtype == torch.float32


def test_paper_preset_shapes_at_a_tiny_input():
    cfg = DVAEConfig.paper()
    assert (cfg.n_hid, cfg.n_init, cfg.vocab_size, cfg.grid_factor, cfg.image_size) == (256, 128, 8192, 8, 256)
    # shapes only: the full-size model on the meta device costs no memory or compute
    with torch.device("meta"):
        model = DVAE(cfg)
        logits = model.encoder(torch.empty(1, 3, 64, 64))
        params = model.decoder(torch.zeros(1, 8, 8, dtype=torch.long))
    assert logits.shape == (1, 8192, 8, 8) and params.shape == (1, 6, 64, 64)
    n_params = sum(p.numel() for p in model.parameters())
    assert 90e6 < n_params < 110e6  # the released encoder + decoder hold about 98M parameters
    widths = [m.out_channels for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths[0] == 256 and max(widths) == 8192 and 2048 in widths


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="divisible"):
        DVAEConfig.tiny(image_size=30)
    with pytest.raises(ValueError, match="n_hid"):
        DVAEConfig.tiny(n_hid=0)
    model = DVAE(_small())
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.zeros(2, 32, 32))
    with pytest.raises(TypeError, match="uint8 or float"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(TypeError, match="integer"):
        model.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="tau"):
        model.loss(torch.zeros(1, 3, 32, 32), tau=0.0, beta=1.0)


def test_schedules_at_known_steps():
    assert cosine(0, 1.0, 0.0, 10) == 1.0 and cosine(10, 1.0, 0.0, 10) == 0.0 and cosine(99, 1.0, 0.0, 10) == 0.0
    assert cosine(5, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert cosine(2, 0.0, 1.0, 8) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert PAPER_BETA(0) == 0.0 and PAPER_BETA(2500) == pytest.approx(3.3) and PAPER_BETA(5000) == 6.6
    assert PAPER_BETA(10**6) == 6.6
    assert PAPER_TAU(0) == 1.0 and PAPER_TAU(75_000) == pytest.approx((1 + 1 / 16) / 2)
    assert PAPER_TAU(150_000) == 1 / 16
    assert PAPER_LR(0) == 1e-4 and PAPER_LR(600_000) == pytest.approx((1e-4 + 1.25e-6) / 2)
    assert PAPER_LR(1_200_000) == 1.25e-6
    # the trainer's paper preset uses exactly these
    cfg = TrainDVAEConfig(preset="paper").resolved()
    for step in (0, 1234, 5000, 75_000, 600_000, 2_000_000):
        s = schedules(cfg, step)
        assert s == {"beta": PAPER_BETA(step), "tau": PAPER_TAU(step), "lr": PAPER_LR(step)}
    assert isinstance(PAPER_LR, CosineSchedule)
    with pytest.raises(ValueError):
        cosine(-1, 0.0, 1.0, 5)


def test_loss_wiring_matches_float64_reference(monkeypatch):
    torch.manual_seed(1)
    model = DVAE(_small())
    x = torch.stack([ShapesDataset("train", 4)[i][0] for i in range(4)])
    calls = []
    real = dvae_mod.logit_laplace_loss

    def spy(params, target, **kw):
        calls.append(kw)
        return real(params, target, **kw)

    monkeypatch.setattr(dvae_mod, "logit_laplace_loss", spy)
    tau, beta = 0.7, 2.5
    torch.manual_seed(123)
    loss, stats = model.loss(x, tau=tau, beta=beta)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls == [{"reduction": "mean", "eps": 0.1, "backend": "auto"}]  # the fused op, backend auto

    # float64 reference of the same draw: the same Gumbel noise from the same seed
    model64 = DVAE(_small()).double()
    model64.load_state_dict(model.state_dict())
    torch.manual_seed(123)
    xf = x.double() / 255
    logits = model64.encoder(0.8 * xf + 0.1)
    z = F.gumbel_softmax(logits.float(), tau=tau, dim=1).double()  # noise drawn as in the model (float32)
    params = model64.decoder(z)
    nll = logit_laplace_loss_ref(params, xf, reduction="mean")
    log_q = F.log_softmax(logits, dim=1)
    kl = (log_q.exp() * (log_q + math.log(32))).sum() / 4 / (3 * 32 * 32)
    ref = nll + beta * kl
    ref.backward()
    assert stats["nll"].item() == pytest.approx(nll.item(), rel=1e-4, abs=1e-5)
    assert stats["kl"].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    for name, p in model64.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=2e-3, atol=1e-5, msg=name)


def _cfg(run, **kw):
    base = dict(run=str(run), preset="tiny", num_images=96, eval_images=8, batch_size=8, steps=8, lr=3e-3,
                log_every=1, sample_every=4, ckpt_every=4, progress=False, threads=1)
    return TrainDVAEConfig(**{**base, **kw})


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "elapsed"} for r in csv.DictReader(f)]


def test_tiny_dvae_loss_falls(tmp_path):
    path = train_dvae(_cfg(tmp_path, steps=40, batch_size=16, sample_every=40, ckpt_every=40, log_every=1,
                           beta=0.1, image_size=16, n_hid=8, n_init=16, vocab_size=64, kmeans_warmup_steps=0))
    losses = [float(r["loss"]) for r in _rows(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    model = DVAE.load(path)
    assert model.cfg.vocab_size == 64 and (tmp_path / "recon_000040.png").is_file()
    with Image.open(tmp_path / "recon_000040.png") as im:  # 8 held-out images over their reconstructions, 64 px
        assert im.size[0] > 2 + 8 * (64 + 2) + 40  # and a left margin naming the rows
        margin = np.asarray(im.convert("L"))[:, :im.size[0] - (2 + 8 * (64 + 2))]
        assert (margin[2:66] < 160).any() and (margin[68:132] < 160).any()
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["weak"] == (ev["heldout_scorer_acc"] < 0.9) and ev["weak"]  # 40 updates: weak, and said so
    assert "weak dVAE" in ev["weak_reason"] and "held-out" in ev["weak_reason"]


def test_weak_verdict():
    from dalle.train_dvae import WEAK_BELOW, weak_verdict

    base = {"eval_images": 256, "eval_split": "heldout"}
    assert weak_verdict({**base, "heldout_scorer_acc": WEAK_BELOW - 0.01})["weak"] is True
    assert weak_verdict({**base, "heldout_scorer_acc": WEAK_BELOW}) == {"weak": False, "weak_reason": ""}
    real = weak_verdict({**base, "heldout_scorer_acc": ""})  # real data: no scorer
    assert real["weak"] is None and "no scorer" in real["weak_reason"]


@pytest.mark.parametrize("stop", [6, 10])  # 16 steps, the first 8 the k-means warm start: stop inside and after it
def test_resume_equals_uninterrupted(tmp_path, stop):
    small = dict(image_size=16, n_hid=8, n_init=8, vocab_size=16)
    a, b = tmp_path / "a", tmp_path / "b"
    # 96 images, batch 8: 12 steps per epoch; 16 steps cross an epoch boundary (new permutation)
    train_dvae(_cfg(a, steps=16, num_images=96, **small))
    main(["--run", str(b), "--steps", "16", "--num-images", "96", "--eval-images", "8", "--batch-size", "8",
          "--lr", "0.003", "--log-every", "1", "--sample-every", "4", "--ckpt-every", "4", "--no-progress",
          "--stop-at", str(stop), "--threads", "1", "--image-size", "16", "--n-hid", "8", "--n-init", "8", "--vocab-size", "16"])
    assert not (b / "model.safetensors").exists() and checkpoint.checkpoints(b)[-1].name == f"step_{stop:08d}"
    train_dvae(_cfg(b, steps=16, num_images=96, resume=True, **small))
    sa, sb = DVAE.load(a).state_dict(), DVAE.load(b).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _rows(a) == _rows(b)
    with pytest.raises(FileNotFoundError, match="resume"):
        train_dvae(_cfg(tmp_path / "c", resume=True))


def test_save_load_round_trip(tmp_path):
    model = DVAE(_small())
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.rand(2, 3, 32, 32)
    for where in (path, path / "model.safetensors", path / "config.json"):  # the folder or either file in it
        again = DVAE.load(where)
        assert again.cfg == model.cfg
        assert torch.equal(again.encode(x), model.encode(x))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "dalle_reranker"}')
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="expected model_type 'dalle_dvae'"):
        DVAE.load(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="looked for"):
        DVAE.load(tmp_path / "missing")


def test_save_grid(tmp_path):
    imgs = torch.rand(5, 3, 16, 16)
    p = save_grid(imgs, tmp_path / "g.png", nrow=3, scale=2)
    with Image.open(p) as im:
        assert im.size == (2 + 3 * (32 + 2), 2 + 2 * (32 + 2))
    u8 = (imgs * 255).to(torch.uint8)
    p = save_grid(u8, tmp_path / "c.png", nrow=5, captions=[f"caption {i}" for i in range(5)])
    with Image.open(p) as im:
        assert im.size[0] == 2 + 5 * (128 + 2) and im.size[1] > 128
        assert im.getpixel((2, 2)) == tuple(int(v) for v in u8[0, :, 0, 0])
    with pytest.raises(ValueError, match="captions"):
        save_grid(imgs, tmp_path / "x.png", captions=["one"])


def test_train_step_autocast_on_gpu(cuda_only):
    torch.manual_seed(0)
    model = DVAE(DVAEConfig.tiny()).cuda()
    x = torch.stack([ShapesDataset("train", 8)[i][0] for i in range(8)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with torch.autocast("cuda", dtype=dtype):
            loss, stats = model.loss(x, tau=1.0, beta=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss) and torch.isfinite(stats["kl"]), precision
    assert model.decode(model.encode(x)).shape == (8, 3, 32, 32)


def test_fixed_ln_b_uses_unit_scale():
    torch.manual_seed(2)
    model = DVAE(_small())
    x = torch.stack([ShapesDataset("train", 3)[i][0] for i in range(3)])
    torch.manual_seed(7)
    loss, stats = model.loss(x, tau=0.5, beta=0.0, fixed_ln_b=True)
    model64 = DVAE(_small()).double()
    model64.load_state_dict(model.state_dict())
    torch.manual_seed(7)
    xf = x.double() / 255
    logits = model64.encoder(0.8 * xf + 0.1)
    params = model64.decoder(F.gumbel_softmax(logits.float(), tau=0.5, dim=1).double())
    y = 0.8 * xf + 0.1
    ref = ((torch.logit(y) - params[:, :3]).abs() + torch.log(y) + torch.log1p(-y) + math.log(2)).mean()
    assert stats["nll"].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    # the decoder's ln b channels get no gradient through the NLL
    loss.backward()
    assert model.decoder.net[-1].weight.grad[3:].abs().max() == 0
    assert model.decoder.net[-1].weight.grad[:3].abs().max() > 0


def test_released_init_and_logits_from_data():
    torch.manual_seed(3)
    model = DVAE(DVAEConfig.tiny(vocab_size=64))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.bias.abs().max() == 0
            fan_in = m.weight[0].numel()
            if m.weight.numel() >= 4096:
                assert m.weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.1)
    x = 0.8 * torch.stack([ShapesDataset("train", 16)[i][0] for i in range(16)]).float() / 255 + 0.1
    model.encoder.init_logits_from_data(x, std=3.0)
    logits = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 64).double()
    # no part common to all positions is left: every code's mean logit over the batch is ~0 ...
    assert logits.mean(0).abs().max().item() < 1e-3 * logits.std(0).mean().item() + 1e-4
    # ... and the position-dependent spread is the requested one, so cells start on many different codes
    assert logits.std(0).mean().item() == pytest.approx(3.0, rel=1e-3)
    assert logits.argmax(1).unique().numel() > 8
    with pytest.raises(ValueError, match="std"):
        model.encoder.init_logits_from_data(x, std=0.0)


def _patch_images(patches, layout, f):
    """Images (B, 3, g*f, g*f) whose cells are ``patches[layout]`` (layout (B, g, g) of patch indices)."""
    b, g, _ = layout.shape
    cells = patches[layout].view(b, g, g, 3, f, f)
    return cells.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * f, g * f)


@pytest.mark.parametrize("f,g,n_patterns,k", [(4, 8, 40, 64), (2, 5, 7, 7), (4, 3, 9, 12)])
def test_kmeans_cells_recovers_every_pattern(f, g, n_patterns, k):
    torch.manual_seed(f * 100 + k)
    patches = torch.randint(0, 256, (n_patterns, 3 * f * f), dtype=torch.uint8)
    layout = torch.randint(0, n_patterns, (30, g, g))
    layout.view(-1)[:n_patterns] = torch.arange(n_patterns)  # every pattern occurs
    x = _patch_images(patches, layout, f)
    cells = cell_patches(x.double() / 255, f)
    assert torch.equal(cells, patches[layout].double() / 255)
    centres = kmeans_cells(x, f, k, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (k, 3 * f * f) and centres.dtype == torch.float32
    # with at least as many centres as patterns, every cell is drawn exactly by its centre
    assign = assign_cells(x, centres, f)
    torch.testing.assert_close(centres[assign].double(), cells, rtol=0, atol=1e-5)
    assert assign.unique().numel() == n_patterns


def test_assign_cells_is_the_nearest_centre_in_float64():
    torch.manual_seed(5)
    x = torch.rand(6, 3, 12, 12)  # odd grid: 3 x 3 cells of 4 x 4
    centres = torch.rand(17, 48)
    got = assign_cells(x, centres, 4)
    cells = cell_patches(x.double(), 4).reshape(-1, 48)
    ref = ((cells[:, None] - centres.double()[None]) ** 2).sum(-1).argmin(1).view(6, 3, 3)
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="centres must have shape"):
        assign_cells(x, torch.rand(17, 12), 4)
    with pytest.raises(ValueError, match="k must be"):
        kmeans_cells(x, 4, 0)


def test_warmup_loss_matches_float64_reference():
    torch.manual_seed(2)
    model = DVAE(_small())
    x = torch.stack([ShapesDataset("train", 4)[i][0] for i in range(4)])
    centres = kmeans_cells(x, 4, 32, generator=torch.Generator().manual_seed(0))
    loss, stats = model.warmup_loss(x, centres)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model64 = DVAE(_small()).double()
    model64.load_state_dict(model.state_dict())
    xf = x.double() / 255
    cells = cell_patches(xf, 4)
    target = ((cells[..., None, :] - centres.double()) ** 2).sum(-1).argmin(-1)
    ce = F.cross_entropy(model64.encoder(0.8 * xf + 0.1), target)
    params = model64.decoder(F.one_hot(target, 32).permute(0, 3, 1, 2).double())
    params = torch.cat([params[:, :3], torch.zeros_like(params[:, 3:])], 1)  # ln b = 0
    nll = logit_laplace_loss_ref(params, xf, reduction="mean")
    (ce + nll).backward()
    assert stats["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert stats["nll"].item() == pytest.approx(nll.item(), rel=1e-4, abs=1e-5)
    assert loss.item() == pytest.approx((ce + nll).item(), rel=1e-5)
    for name, p in model64.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=2e-3, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="centres"):
        model.warmup_loss(x, centres[:5])


def test_warm_start_learns_the_cell_codes(tmp_path):
    """Trainer with one ELBO update after the warm start: the warm start's cross-entropy falls, and the
    encoder's codes for the cells that hold a shape move towards the k-means codes of those cells."""
    train_dvae(_cfg(tmp_path, steps=61, kmeans_warmup_steps=60, batch_size=16, num_images=256, lr=3e-3,
                    image_size=16, n_hid=8, n_init=16, vocab_size=16, sample_every=61, ckpt_every=61))
    rows = _rows(tmp_path)
    ce = [float(r["warmup_ce"]) for r in rows[:60]]
    assert rows[60]["warmup_ce"] == "" and rows[60]["tau"] != ""
    assert sum(ce[-5:]) / 5 < 0.5 * sum(ce[:5]) / 5, (ce[:5], ce[-5:])
    ckpt = {"kmeans_centres": torch.zeros(16, 3 * 4 * 4)}
    checkpoint.load_model_state(checkpoint.checkpoints(tmp_path)[-1], ckpt)
    model = DVAE.load(tmp_path)
    x = ShapesDataset("train", 64, 16, seed=7).images()
    target = assign_cells(x, ckpt["kmeans_centres"], 4)
    shape_cells = target != target.flatten().mode().values  # not the background code (about 60% of cells)
    agree = (model.encode(x) == target)[shape_cells].float().mean().item()
    assert agree > 0.25, agree  # a guess among the 15 other codes agrees on about 7% (60 updates of a tiny model)


def test_channel_shuffle_permutes_channels_per_image():
    cfg = TrainDVAEConfig(num_images=64, batch_size=16, image_size=16, channel_shuffle="on").resolved()
    plain = _Batches(TrainDVAEConfig(num_images=64, batch_size=16, channel_shuffle="off").resolved(), 16)
    shuffled = _Batches(cfg, 16)
    palette = {tuple(c) for c in plain.images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert {tuple(c) for c in shuffled.batch(0).permute(0, 2, 3, 1).reshape(-1, 3).tolist()} <= palette
    noise = torch.randint(0, 256, plain.images.shape, dtype=torch.uint8)  # every channel tells itself apart
    plain.images, shuffled.images = noise, noise.clone()
    orders = []
    for step in range(3):
        a, b = plain.batch(step), shuffled.batch(step)
        assert torch.equal(b, shuffled.batch(step))  # a pure function of the step
        for xa, xb in zip(a, b):
            order = [next(c for c in range(3) if torch.equal(xb[j], xa[c])) for j in range(3)]
            assert sorted(order) == [0, 1, 2]
            orders.append(tuple(order))
    orders = set(orders)
    assert len(orders) == 6  # 48 images: every order of the channels, not one fixed swap
    assert TrainDVAEConfig(data="some/folder").resolved().channel_shuffle == "off"
    assert TrainDVAEConfig().resolved().channel_shuffle == "on"
    with pytest.raises(ValueError, match="channel_shuffle"):
        TrainDVAEConfig(channel_shuffle="yes").resolved()
    with pytest.raises(ValueError, match="kmeans_warmup_steps"):
        TrainDVAEConfig(steps=10, kmeans_warmup_steps=10).resolved()
    assert TrainDVAEConfig(steps=10).resolved().kmeans_warmup_steps == 5
    assert TrainDVAEConfig(preset="paper", steps=10).resolved().kmeans_warmup_steps == 0


def test_code_features_describe_each_code():
    """Groups (C*f*f + n_init, f*f, C): the centre cell the decoder draws for a 5x5 grid of one code and its
    codebook vector; the cell's brightest channel per pixel (form); the cell's channel sums over the summed
    brightest channels (colour). Each column standardised over the codes."""
    torch.manual_seed(3)
    m = DVAE(_small())
    f, V = m.cfg.grid_factor, m.cfg.vocab_size
    feats = m.code_features(batch_size=7)  # several batches
    assert m.code_feature_groups == (3 * f * f + m.cfg.n_init, f * f, 3)
    assert feats.shape == (V, sum(m.code_feature_groups)) and feats.dtype == torch.float32
    raw = []
    for k in range(V):
        cell = m.decode(torch.full((1, 5, 5), k, dtype=torch.long))[0].double()[:, 2 * f: 3 * f, 2 * f: 3 * f]
        form = torch.stack([torch.stack([max(cell[c, y, x] for c in range(3)) for x in range(f)])
                            for y in range(f)])
        colour = torch.stack([cell[c].sum() for c in range(3)]) / max(form.sum(), 1e-3)
        raw.append(torch.cat([cell.flatten(), m.decoder.input.weight[:, k, 0, 0].double(), form.flatten(), colour]))
    raw = torch.stack(raw)
    ref = (raw - raw.mean(0)) / raw.std(0).clamp_min(1e-6)
    torch.testing.assert_close(feats.double(), ref, atol=1e-4, rtol=1e-4)


def test_fp16_loss_scale_round_trips_through_resume(tmp_path):
    """``precision="fp16"`` scales the loss (torch.amp's dynamic scaler): the scaled updates equal the
    unscaled ones (a power-of-two scale is exact in fp32 compute, which is what the CPU runs), the scale is
    in the checkpoint, and a resumed run equals an uninterrupted one."""
    small = dict(image_size=16, n_hid=8, n_init=8, vocab_size=16, steps=6, num_images=32)
    plain, scaled, resumed = tmp_path / "plain", tmp_path / "scaled", tmp_path / "resumed"
    train_dvae(_cfg(plain, **small))
    train_dvae(_cfg(scaled, precision="fp16", **small))
    ck = checkpoint.read_json(checkpoint.checkpoints(scaled)[-1] / checkpoint.TRAIN_STATE, "train state")
    assert ck["grad_scaler"]["scale"] == 2.0 ** 16  # torch.amp's initial scale: no overflow on these steps
    train_dvae(_cfg(resumed, precision="fp16", stop_at=3, **small))
    train_dvae(_cfg(resumed, precision="fp16", resume=True, **small))
    sp, ss, sr = (DVAE.load(r).state_dict() for r in (plain, scaled, resumed))
    for k in sp:
        torch.testing.assert_close(ss[k], sp[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(sr[k], ss[k]), k


# ------------------------------------------------------------------------------------------ real data
def _photo_folder(root, n=20):
    """``n`` small noisy gradient images with captions, a garbage file and a truncated PNG (its header opens)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 20 + i % 5, 22 + i % 7
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 25 * (i % 10))], -1)
        arr = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a noisy gradient picture number {i}")
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (root / "garbage.txt").write_text("a garbage file here")
    data = (root / "img00.png").read_bytes()
    (root / "img03b.png").write_bytes(data[: len(data) // 2])
    (root / "img03b.txt").write_text("a truncated picture file")
    return root


_REAL = dict(image_size=16, n_hid=8, n_init=8, vocab_size=16, batch_size=4, steps=10, kmeans_warmup_steps=4,
             kmeans_images=8, heldout=0.2, eval_images=8)


def test_real_data_heldout_split_and_corrupt_files(tmp_path, capsys):
    folder = _photo_folder(tmp_path / "photos")
    data = _Batches(_cfg(tmp_path / "r", data=str(folder), **_REAL).resolved(), 16)
    train_keys, held_keys = set(data.ds.keys), set(data.held.keys)
    assert not train_keys & held_keys and len(train_keys | held_keys) == 20
    assert held_keys and "img03b.png" not in train_keys | held_keys
    from dalle.data.folder import heldout_split

    assert held_keys == {data.full.keys[i] for i in heldout_split(data.full.keys, 0.2)[1]}
    assert data.full.skipped["corrupt_image"] == 2
    # training batches over several epochs only ever hold training images, and nothing is counted again
    for step in range(12):
        data.batch(step)
    assert data.full.skipped["corrupt_image"] == 2
    run = tmp_path / "run"
    train_dvae(_cfg(run, data=str(folder), **_REAL))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_split"] == "heldout" and ev["eval_images"] == len(held_keys)
    assert (run / "recon_000010.png").is_file()
    assert "corrupt_image 2" in capsys.readouterr().err


def test_real_data_resume_equals_uninterrupted_with_corrupt_files(tmp_path):
    folder = _photo_folder(tmp_path / "photos")
    a, b = tmp_path / "a", tmp_path / "b"
    train_dvae(_cfg(a, data=str(folder), **_REAL))
    train_dvae(_cfg(b, data=str(folder), stop_at=6, **_REAL))  # 16 training images, batch 4: inside epoch 2
    assert not (b / "model.safetensors").exists()
    train_dvae(_cfg(b, data=str(folder), resume=True, workers=2, **_REAL))  # workers give the same batches
    sa, sb = DVAE.load(a).state_dict(), DVAE.load(b).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _rows(a) == _rows(b)
    assert json.loads((a / "eval.json").read_text())["heldout_mae"] == \
        json.loads((b / "eval.json").read_text())["heldout_mae"]


def test_worker_found_corrupt_file_counted_once(tmp_path):
    """A file that turns corrupt after the index was built is found by the DataLoader workers, counted once in
    the main process however many workers and epochs meet it, and served by the next item in every run."""
    folder = _photo_folder(tmp_path / "photos")
    cfg = _cfg(tmp_path / "r", data=str(folder), workers=2, **_REAL).resolved()
    data = _Batches(cfg, 16)
    serial = _Batches(dataclasses.replace(cfg, workers=0), 16)  # the same index, loading in this process
    victim = data.ds.items[1][0]
    victim.write_bytes(victim.read_bytes()[:60])
    got = list(data.stream(0, 12))  # 3 epochs of 16 training images
    assert data.full.skipped["corrupt_image"] == 3 and data.ds.bad == {1}
    for step, x in enumerate(got):
        assert torch.equal(x, serial.batch(step)), step
    assert serial.ds.bad == {1}


def test_real_data_single_pair_and_heldout_zero_evaluate_on_training_images(tmp_path, capsys):
    folder = tmp_path / "one"
    _photo_folder(folder, n=1)
    run = tmp_path / "run"
    train_dvae(_cfg(run, data=str(folder), **{**_REAL, "steps": 2, "kmeans_warmup_steps": 0}))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_split"] == "train" and ev["eval_images"] == 1
    assert "no held-out images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="heldout"):
        TrainDVAEConfig(heldout=1.0).resolved()


def _tar_shards(root, n_shards=3, per_shard=7):
    """img2dataset-style tars: ``KEY.png`` + ``KEY.txt`` + ``KEY.json``; one garbage image and one truncated PNG
    in the second shard."""
    import io

    import numpy as np
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                h, w_ = 18 + i % 4, 20 + (i + s) % 6
                arr = rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                png = buf.getvalue()
                if s == 1 and i == 2:
                    png = b"garbage"
                if s == 1 and i == 4:
                    png = png[: len(png) // 2]
                w.write({"__key__": f"{s:05d}{i:04d}", "png": png, "txt": f"random noise picture {s} {i}",
                         "json": b"{}"})
    return root


_STREAM = dict(_REAL, shuffle_buffer=5, heldout=0.15, steps=12)


def test_shards_stream_resume_equals_uninterrupted(tmp_path):
    pytest.importorskip("dalle.data.sources", reason="dalle.data.sources (WebDataset reading) comes with encode")
    shards = _tar_shards(tmp_path / "shards")
    pattern = str(shards / "{00000..00002}.tar")
    a, b = tmp_path / "a", tmp_path / "b"
    train_dvae(_cfg(a, data=pattern, **_STREAM))
    for stop in (5, 9):  # 19 training samples, batch 4, buffer 5: inside the first and the second epoch
        train_dvae(_cfg(b, data=pattern, stop_at=stop, resume=stop != 5, **_STREAM))
    train_dvae(_cfg(b, data=pattern, resume=True, **_STREAM))
    sa, sb = DVAE.load(a).state_dict(), DVAE.load(b).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _rows(a) == _rows(b)
    ev = json.loads((a / "eval.json").read_text())
    assert ev["eval_split"] == "heldout" and ev["eval_images"] >= 1


def test_shards_stream_excludes_heldout_and_counts_skips_once(tmp_path):
    pytest.importorskip("dalle.data.sources", reason="dalle.data.sources (WebDataset reading) comes with encode")
    from collections import Counter

    from dalle.data.sources import is_heldout
    from dalle.train_dvae import _StreamBatches

    shards = _tar_shards(tmp_path / "shards")
    for data_arg, bad in ((str(shards), 2), (str(shards / "00001.tar"), 2), (str(shards / "00000.tar"), 0),
                          (str(shards / "{00000..00002}.tar"), 2)):
        data = _StreamBatches(_cfg(tmp_path / "r", data=data_arg, **_STREAM).resolved(), 16)
        held, split = data.eval_set(8)
        keys = [s.key for u in range(len(data.src.units)) for s in data.src.iter_unit(u, Counter())]
        n_train = sum(not is_heldout(k, 0.15) for k in keys)  # the one held-out rule of every command
        assert split == ("heldout" if n_train < len(keys) else "train") and 0 < n_train
        assert held.dtype == torch.uint8 and held.shape[1:] == (3, 16, 16)
        drawn, step = [], 0
        take = data._next
        data._next = lambda: (drawn.append(take()) or drawn[-1])
        while not drawn or drawn[-1][0][0] < 2:  # two whole epochs of the stream
            data.batch(step)
            step += 1
        for epoch in (0, 1):  # each training sample exactly once per epoch, no held-out one
            refs = [r for r, _ in drawn if r[0] == epoch]
            assert len(refs) == len(set(refs)) == n_train
        assert f"corrupt_image {bad}" in data.report() if bad else "corrupt_image" not in data.report()
        with pytest.raises(ValueError, match="in order"):
            data.batch(0)


def test_shards_everything_held_out_is_a_clear_error(tmp_path):
    pytest.importorskip("dalle.data.sources", reason="dalle.data.sources (WebDataset reading) comes with encode")
    shards = _tar_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    from dalle.train_dvae import _StreamBatches

    data = _StreamBatches(_cfg(tmp_path / "r", data=str(shards), **{**_STREAM, "heldout": 0.9999999}).resolved(), 16)
    assert data.eval_set(8)[1] == "heldout"
    with pytest.raises(ValueError, match="no training samples"):
        data.batch(0)


@pytest.mark.parametrize("argv,flag", [(["--heldout", "1"], "--heldout"), (["--heldout", "-0.1"], "--heldout"),
                                       (["--shuffle-buffer", "0"], "--shuffle-buffer"),
                                       (["--data", "nowhere/{00000..00002}.tar"], "--data")])
def test_cli_data_flags_are_checked(tmp_path, capsys, argv, flag):
    from dalle.train_dvae import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--run", str(tmp_path / "run"), *argv])
    assert flag in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_accepts_shard_forms_and_warns_about_unused_flags(tmp_path, capsys):
    from dalle.train_dvae import _is_shards, parse_args

    shards = _tar_shards(tmp_path / "shards", n_shards=2, per_shard=1)
    folder = _photo_folder(tmp_path / "photos", n=1)
    for data in (str(shards), str(shards / "00000.tar"), str(shards / "{00000..00001}.tar")):
        assert _is_shards(data) and parse_args(["--run", str(tmp_path / "r"), "--data", data]).data == data
    assert not _is_shards(str(folder))
    parse_args(["--run", str(tmp_path / "r"), "--data", str(shards), "--workers", "2"])
    assert "--workers" in capsys.readouterr().err
    parse_args(["--run", str(tmp_path / "r"), "--data", str(folder), "--shuffle-buffer", "9"])
    assert "--shuffle-buffer" in capsys.readouterr().err
    parse_args(["--run", str(tmp_path / "r"), "--heldout", "0.5"])
    assert "--heldout" in capsys.readouterr().err


def test_shards_without_usable_pairs_or_heldout_zero(tmp_path):
    pytest.importorskip("dalle.data.sources", reason="dalle.data.sources (WebDataset reading) comes with encode")
    import webdataset as wds

    from dalle.train_dvae import _StreamBatches

    bad = tmp_path / "bad"
    bad.mkdir()
    with wds.TarWriter(str(bad / "00000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"{i:04d}", "png": b"garbage", "txt": "a garbage picture here"})
    data = _StreamBatches(_cfg(tmp_path / "r", data=str(bad), **_STREAM).resolved(), 16)
    with pytest.raises(ValueError, match=f"no usable image/caption pairs in {bad}.*corrupt_image 3"):
        data.eval_set(8)
    shards = _tar_shards(tmp_path / "shards", n_shards=1, per_shard=5)
    data = _StreamBatches(_cfg(tmp_path / "r", data=str(shards), **{**_STREAM, "heldout": 0.0}).resolved(), 16)
    images, split = data.eval_set(3)
    assert split == "train" and len(images) == 3
