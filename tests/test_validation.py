"""Public entry points refuse what their documentation excludes, the same way as their siblings.

Images: every function that takes pixels accepts uint8 in [0, 255] and floats in [0, 1] and refuses floats
outside [0, 1] (pixels in [0, 255] stored as floats are the usual mistake) with the same ValueError, where some
used to clamp or map them silently. Token ids: the model refuses ids outside its tables with a ValueError where
the embedding raised an IndexError (a device-side assert on a GPU). Numbers: sampling, schedules and scalers
refuse NaN, infinities and wrong types.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data.folder import ImageCaptionDataset
from dalle.data.shapes import ShapesDataset, matches, parse_caption, read_scene, render
from dalle.data.transforms import caption_problem, preprocess
from dalle.dvae import DVAE, DVAEConfig, kmeans_cells
from dalle.grad_scale import BlockGradScaler
from dalle.images import as_unit_float, make_grid, save_grid, to_uint8
from dalle.model import DALLE, DALLEConfig
from dalle.rerank import Reranker, RerankerConfig, train_reranker
from dalle.sampling import Sampler, filter_logits, sample_from_logits
from dalle.schedules import cosine
from dalle.tokenizer import train_tokenizer
from dalle_kernels import logit_laplace_loss, map_pixels
from dalle_kernels.powersgd import PowerSGDState


def image_u8(n=2, s=16, seed=0):
    return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# float pixels the documentation excludes: [0, 255] stored as floats, slightly out of range, NaN
BAD_FLOATS = {
    "0-255 floats": lambda u8: u8.float(),
    "negative": lambda u8: u8.float() / 255 - 0.5,
    "nan": lambda u8: torch.where(u8 > 128, float("nan"), u8.float() / 255),
}


def tiny_dvae():
    torch.manual_seed(0)
    return DVAE(DVAEConfig.tiny(image_size=16, n_hid=8, n_init=8, vocab_size=12, group_count=3)).eval()


def tiny_reranker():
    torch.manual_seed(0)
    return Reranker(RerankerConfig(text_vocab=30, image_size=16, width=8, channels=(4, 4))).eval()


IMAGE_FUNCTIONS = {
    "as_unit_float": lambda x: as_unit_float(x),
    "images.to_uint8": lambda x: to_uint8(x),
    "images.make_grid": lambda x: make_grid(x),
    "map_pixels": lambda x: map_pixels(x),
    "logit_laplace_loss target": lambda x: logit_laplace_loss(torch.zeros(x.shape[0], 6, *x.shape[2:]), x,
                                                              backend="torch"),
    "DVAE.encode": lambda x: tiny_dvae().encode(x),
    "DVAE.loss": lambda x: tiny_dvae().loss(x, tau=1.0, beta=0.1, backend="torch"),
    "kmeans_cells": lambda x: kmeans_cells(x, 4, k=3, generator=torch.Generator().manual_seed(0)),
    "Reranker.encode_images": lambda x: tiny_reranker().encode_images(x).detach(),
    "shapes.read_scene": lambda x: read_scene(x[0]),
}


@pytest.mark.parametrize("fn", sorted(IMAGE_FUNCTIONS))
@pytest.mark.parametrize("bad", sorted(BAD_FLOATS))
def test_every_image_function_refuses_floats_outside_unit_range(fn, bad):
    x = BAD_FLOATS[bad](image_u8())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        IMAGE_FUNCTIONS[fn](x)


@pytest.mark.parametrize("fn", sorted(IMAGE_FUNCTIONS))
def test_every_image_function_reads_uint8_as_its_float_twin_and_refuses_int64(fn):
    u8 = image_u8()
    a, b = IMAGE_FUNCTIONS[fn](u8), IMAGE_FUNCTIONS[fn](u8.float() / 255)
    if isinstance(a, Image.Image):
        a, b = np.asarray(a), np.asarray(b)
    if isinstance(a, tuple):  # DVAE.loss draws Gumbel noise: compare the shapes only
        a, b = a[0].shape, b[0].shape
    if isinstance(a, dict):
        assert a == b
    else:
        np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=1e-5)
    with pytest.raises(TypeError):
        IMAGE_FUNCTIONS[fn](u8.long())


def test_map_pixels_check_can_be_skipped_like_the_loss_check():
    x = torch.tensor([0.0, 2.0])
    assert map_pixels(x, check_range=False)[1] == pytest.approx(0.8 * 2 + 0.1)
    logit_laplace_loss(torch.zeros(1, 6, 1, 1), torch.full((1, 3, 1, 1), 2.0), backend="torch", check_range=False)


def test_scorer_no_longer_reads_0_255_floats_as_white():
    scene = ShapesDataset("train", size=1).scene(0)
    img = render(scene)
    assert matches(img, scene) and matches(img.float() / 255, scene)
    with pytest.raises(ValueError, match="divide pixels in \\[0, 255\\] by 255"):
        matches(img.float(), scene)


# ---------------------------------------------------------------------------------------------------- token ids
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DALLE(DALLEConfig.micro(attn_backend="torch")).eval()


def test_model_refuses_token_ids_outside_its_tables(model):
    c = model.cfg
    text = torch.randint(0, c.text_rows, (2, c.text_len))
    image = torch.randint(0, c.image_vocab, (2, c.image_len))
    model.loss(text, image)  # the full range is fine: BPE ids, then one padding id per slot
    text[0, 0], image[1, 0] = c.text_rows - 1, c.image_vocab - 1
    model(text, image)
    for bad_text, bad_image, name in ((c.text_rows, None, "text"), (-1, None, "text"), (None, c.image_vocab, "image"),
                                      (None, -3, "image")):
        t, i = text.clone(), image.clone()
        if bad_text is not None:
            t[1, 2] = bad_text
        if bad_image is not None:
            i[0, 5] = bad_image
        for call in (model, model.loss):
            with pytest.raises(ValueError, match=rf"^{name} ids must be in \[0, "):
                call(t, i)
        if bad_text is not None:
            with pytest.raises(ValueError, match="^text ids"):
                Sampler(model).generate(t)


def test_model_config_refuses_what_attention_cannot_run():
    for kw, name in ((dict(head_dim=24), "head_dim"), (dict(attn_backend="tritn"), "attn_backend")):
        with pytest.raises(ValueError, match=f"^DALLEConfig.{name} must"):
            DALLEConfig.micro(**kw)


def test_sampler_refuses_bad_prefixes_and_arguments_before_running_the_model(model, monkeypatch):
    c = model.cfg
    text = torch.randint(0, c.text_rows, (2, c.text_len))

    def never(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(Sampler, "_run", never)
    s = Sampler(model)
    with pytest.raises(ValueError, match="^image_prefix ids"):
        s.generate(text, image_prefix=torch.full((2, 3), c.image_vocab))
    with pytest.raises(TypeError, match="image_prefix"):
        s.generate(text, image_prefix=[[0, 1], [1, 2]])
    for kw, name in ((dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                     (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=True), "top_p"),
                     (dict(guidance=float("nan")), "guidance")):
        with pytest.raises(ValueError, match=f"^{name} must"):
            s.generate(text, **kw)


@pytest.mark.parametrize("kw,name", [(dict(temperature=float("nan")), "temperature"),
                                     (dict(temperature=float("inf")), "temperature"),
                                     (dict(temperature="1"), "temperature"),
                                     (dict(top_k=2.0), "top_k"), (dict(top_p=float("nan")), "top_p"),
                                     (dict(top_p=0.0), "top_p")])
def test_sample_from_logits_refuses_what_generate_refuses(kw, name):
    logits = torch.randn(3, 7)
    with pytest.raises(ValueError, match=f"^{name} must"):
        sample_from_logits(logits, **kw)
    if "temperature" not in kw:
        with pytest.raises(ValueError, match=f"^{name} must"):
            filter_logits(logits, **kw)


def test_sampling_takes_numpy_numbers():
    logits = torch.randn(3, 7)
    out = sample_from_logits(logits, temperature=np.float32(0.5), top_k=np.int64(3), top_p=np.float64(0.9))
    assert out.shape == (3,)


def test_tokenizer_decode_refuses_negative_ids():
    tok = train_tokenizer(["a red circle", "a blue square"], 40)
    ids = tok.encode("a red circle")
    assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 3]) == "a red circle"  # padding ids ignored
    with pytest.raises(ValueError, match="ids must be >= 0"):
        tok.decode([-1] + ids)


def test_unknown_chars_names_what_becomes_unk():
    tok = train_tokenizer(["a red circle", "a blue square"], 40)
    assert tok.unknown_chars("A Red circle") == []
    assert tok.unknown_chars("a red ☂ circle\x00") == ["☂", "\x00"]


# --------------------------------------------------------------------------------------- data, grids, numbers
def test_data_functions_refuse_wrong_types(tmp_path):
    img = Image.new("RGB", (20, 10))
    with pytest.raises(TypeError, match="img must be a PIL.Image.Image"):
        preprocess(torch.zeros(3, 10, 10), 8)
    with pytest.raises(ValueError, match="target"):
        preprocess(img, True)
    with pytest.raises(TypeError, match="caption must be a str"):
        caption_problem(None)
    with pytest.raises(TypeError, match="caption must be a str"):
        parse_caption(b"a red circle")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset("train", size=True)
    with pytest.raises(ValueError, match="image_size"):
        render(ShapesDataset("train", size=1).scene(0), image_size=0)
    img.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a black picture")
    for kw, name in ((dict(max_aspect=0.5), "max_aspect"), (dict(max_aspect=float("nan")), "max_aspect"),
                     (dict(min_words=-1), "min_words"), (dict(image_size=True), "image_size")):
        with pytest.raises(ValueError, match=f"^{name} must"):
            ImageCaptionDataset(tmp_path, **kw)
    assert len(ImageCaptionDataset(tmp_path, image_size=8)) == 1


def test_reranker_training_refuses_an_empty_caption_up_front():
    tok = train_tokenizer(["a red circle", "a blue square"], 40)
    images = image_u8(3)
    with pytest.raises(ValueError, match=r"captions \[1\] have no tokens"):
        train_reranker(images, ["a red circle", "  ", "a blue square"], tok, steps=1, batch_size=2,
                       width=8, channels=(4, 4))
    with pytest.raises(ValueError, match="pair up"):
        tiny_reranker().score([1, 2], [[1], [2]])


def test_grids_draw_any_caption_and_refuse_bad_layouts(tmp_path):
    x = torch.rand(2, 3, 8, 8)
    make_grid(x, captions=["tab\there\x00\x1b[0m", "emoji 🎨 日本語"])
    for kw in (dict(nrow=0), dict(nrow=2.0), dict(scale=0)):
        with pytest.raises(ValueError):
            make_grid(x, **kw)
    with pytest.raises(TypeError, match="single str"):
        make_grid(x[:1], captions="a caption")
    with pytest.raises(ValueError):
        save_grid(x * 255, tmp_path / "new" / "g.png")
    assert not (tmp_path / "new").exists()  # refused before any folder was made


def test_dvae_loss_refuses_a_bad_beta():
    for beta in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="beta"):
            tiny_dvae().loss(image_u8(), tau=1.0, beta=beta, backend="torch")


def test_schedules_and_scalers_refuse_non_finite_or_mistyped_numbers():
    assert cosine(5, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert cosine(np.int64(5), 1.0, 0.0, np.int64(10)) == pytest.approx(0.5)
    for args in ((1, 1.0, 0.0, 2.5), (1, float("nan"), 0.0, 10), (float("nan"), 1.0, 0.0, 10), (1, 1.0, 0.0, True)):
        with pytest.raises(ValueError):
            cosine(*args)
    for kw in (dict(init_scale=0.0), dict(init_scale=float("nan")), dict(backoff=2.0), dict(backoff=0.0),
               dict(growth=0.5), dict(min_scale=2.0 ** 10, max_scale=2.0 ** 5)):
        with pytest.raises(ValueError):
            BlockGradScaler(2, **kw)
    scaler = BlockGradScaler(2)
    with pytest.raises(ValueError, match="positive and finite"):
        scaler.load_state_dict({"scales": [1.0, math.nan], "world_size": 1})
    for rate in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="min_compression_rate"):
            PowerSGDState(torch.nn.Linear(2, 2), min_compression_rate=rate)


def test_siblings_that_take_captions_or_ids_refuse_the_same_mistakes():
    from dalle.generate import rank_by_scorer

    with pytest.raises(TypeError, match="single str"):
        train_tokenizer("a red circle", 40)  # encode_batch refuses a single str too
    m = tiny_reranker()
    with pytest.raises(TypeError, match=r"ids\[0\] must be a list of BPE ids"):
        m.rank(image_u8(2), "12")  # was read as the ids [1, 2]
    assert m.rank(image_u8(2), torch.tensor([1, 2])) in ([0, 1], [1, 0])
    with pytest.raises(TypeError, match="scene"):
        rank_by_scorer(image_u8(2), None)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        kmeans_cells(image_u8(1)[0], 4, k=2)
