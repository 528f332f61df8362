"""The learned reranker (dalle.rerank): both sides against float64 references, the loss, ranking, training, I/O."""
import json

import pytest
import torch
import torch.nn.functional as F

from dalle.data.shapes import ShapesDataset
from dalle.rerank import Reranker, RerankerConfig, caption_ids, train_reranker
from dalle.tokenizer import train_tokenizer


def small(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("text_vocab", 50)
    kw.setdefault("image_size", 16)
    kw.setdefault("width", 24)
    kw.setdefault("channels", (8, 12))
    return Reranker(RerankerConfig(**kw)).eval()


def text_reference(m, ids):
    """Per pathway: sum of the unit token vectors, linear map, unit length; all in float64. ``(N, 2, width)``."""
    out = []
    for p in range(2):
        E = m.token_emb[p].detach().double()
        E = E / E.norm(dim=-1, keepdim=True)
        W, b = m.text_proj[p].weight.detach().double(), m.text_proj[p].bias.detach().double()
        out.append(torch.stack([E[torch.tensor(x)].sum(0) @ W.T + b for x in ids]))
    out = torch.stack(out, dim=1)
    return out / out.norm(dim=-1, keepdim=True)


def image_reference(m, x):
    """Colour: 2x2 mean, two 1x1 convs, mean over the image; form: convs on the brightest channel. Float64."""
    x = x.double()
    h = F.avg_pool2d(x, 2)
    for conv in (m.colour[1], m.colour[3]):
        h = F.gelu(F.conv2d(h, conv.weight.double(), conv.bias.double()))
    colour = h.mean((2, 3)) @ m.colour_proj.weight.double().T + m.colour_proj.bias.double()
    h = x.max(dim=1, keepdim=True).values
    for layer in m.convs:
        if isinstance(layer, torch.nn.Conv2d):
            h = F.conv2d(h, layer.weight.double(), layer.bias.double(), stride=2, padding=1)
        else:
            h = F.gelu(h)
    form = h.flatten(1) @ m.image_proj.weight.double().T + m.image_proj.bias.double()
    out = torch.stack([colour, form], dim=1)
    return out / out.norm(dim=-1, keepdim=True)


def test_text_side_is_a_bag_of_tokens_matching_float64_reference():
    m = small()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (1, 2, 7, 13)] + [[49, 0, 49]]
    got = m.encode_text(ids)
    torch.testing.assert_close(got.double(), text_reference(m, ids), rtol=1e-5, atol=1e-6)
    # no token sees another: order does not matter
    torch.testing.assert_close(m.encode_text([ids[3][::-1]]), got[3:4])


def test_image_side_matches_float64_reference_and_reads_uint8():
    m = small()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(5, 3, 16, 16, generator=g)
    x[0] = 0.0  # extremes: an all-black and an all-white image
    x[1] = 1.0
    torch.testing.assert_close(m.encode_images(x).double(), image_reference(m, x), rtol=1e-5, atol=1e-6)
    u8 = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    torch.testing.assert_close(m.encode_images(u8), m.encode_images(u8.float() / 255))


def test_colour_pathway_is_blind_to_form_and_form_pathway_to_colour():
    m = small()
    blank = torch.zeros(1, 3, 16, 16)
    square, patches = blank.clone(), blank.clone()
    square[0, 0, 4:8, 4:8] = 1.0  # a red square
    patches[0, 0, 2:4, 2:4] = patches[0, 0, 10:12, 10:12] = patches[0, 0, 2:4, 12:14] = 1.0  # the same red area
    patches[0, 0, 12:14, 2:4] = 1.0  # (aligned to the 2x2 mean), scattered
    blue = square.roll(1, dims=1).roll(1, dims=1)  # the same square in blue
    e = m.encode_images(torch.cat([square, patches, blue]))
    torch.testing.assert_close(e[0, 0], e[1, 0])  # colour: same colours in the same amounts, any outline
    torch.testing.assert_close(e[0, 1], e[2, 1])  # form: same outline, any full-brightness colour
    assert not torch.allclose(e[0, 1], e[1, 1]) and not torch.allclose(e[0, 0], e[2, 0])


def test_score_rank_and_contrastive_loss():
    m = small()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 16, 16, generator=g)
    ids = [[1, 2], [3], [4, 5, 6], [7, 7]]
    img, txt = image_reference(m, x), text_reference(m, ids)
    torch.testing.assert_close(m.score(x, ids).double(), (img * txt).sum(-1).mean(-1), rtol=1e-5, atol=1e-6)
    s = (img * text_reference(m, [ids[0]])).sum(-1).mean(-1)
    assert m.rank(x, ids[0]) == s.argsort(descending=True).tolist()
    assert m.rank(torch.stack([x[0]] * 3), ids[0]) == [0, 1, 2]  # ties keep the draw order
    logits = m.logit_scale.detach().double().exp() * (img[:, None] * txt[None]).sum(-1).mean(-1)
    t = torch.arange(4)
    ref = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    torch.testing.assert_close(m.contrastive_loss(x, ids).double(), ref, rtol=1e-5, atol=1e-6)
    m.contrastive_loss(x, ids).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_input_is_rejected():
    m = small()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="ids\\[1\\] is empty"):
        m.encode_text([[1], []])
    with pytest.raises(ValueError, match="outside the tokenizer"):
        m.encode_text([[1, 50]])
    with pytest.raises(ValueError, match="at least one caption"):
        m.encode_text([])
    with pytest.raises(ValueError, match=r"\(N, 3, 16, 16\)"):
        m.encode_images(torch.rand(2, 3, 32, 32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m.encode_images(x.numpy())
    with pytest.raises(ValueError, match="pair up"):
        m.score(x, [[1]])
    with pytest.raises(ValueError, match="divisible by 4"):
        RerankerConfig(text_vocab=10, image_size=18, channels=(4, 4))
    with pytest.raises(ValueError, match="text_vocab"):
        RerankerConfig(text_vocab=0)
    with pytest.raises(ValueError, match="colour_channels"):
        RerankerConfig(text_vocab=10, colour_channels=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_reranker(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), ["a"] * 4, None, batch_size=1)
    with pytest.raises(ValueError, match="one caption each"):
        train_reranker(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), ["a"] * 3, None)


def test_training_learns_its_pairs_deterministically_and_round_trips(tmp_path):
    ds = ShapesDataset("train", size=24, image_size=32, seed=0)
    caps = ds.captions()
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    tok = train_tokenizer(caps, 120)
    kw = dict(steps=150, batch_size=24, width=32, channels=(8, 16, 16), seed=0, log=lambda *a: None)
    m = train_reranker(images, caps, tok, **kw)
    with torch.no_grad():
        sim = Reranker._similarity(m.encode_images(images), m.encode_text(caption_ids(tok, caps)))
    # distinct captions only: a repeated caption would make two right answers
    distinct = [i for i, c in enumerate(caps) if caps.count(c) == 1]
    hits = sum(int(sim[i, distinct].argmax() == distinct.index(i)) for i in distinct)
    assert hits >= 0.75 * len(distinct), (hits, len(distinct))  # chance is 1 in len(distinct)
    again = train_reranker(images, caps, tok, **kw)
    for (n, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    path = m.save(tmp_path / "reranker")
    loaded = Reranker.load(path)
    ids = caption_ids(tok, caps[:3])
    torch.testing.assert_close(loaded.score(images[:3], ids), m.score(images[:3], ids), rtol=0, atol=0)
    config = json.loads((path / "config.json").read_text())
    del config["format"]  # a model written before the two pathways
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="earlier version.*python -m dalle.rerank"):
        Reranker.load(path)
