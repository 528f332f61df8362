"""Generation never loses the samples drawn for the other captions because one caption is unusual.

Any str is a caption: empty, whitespace only, longer than the text slots, not ASCII, emoji, control characters.
Each is sampled (with a CaptionWarning raised before the first token is drawn) and reranked or kept in draw
order; every argument that cannot work is refused before anything is drawn. Tiny random models throughout.
"""
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFont

import dalle.cli
import dalle.generate as gen
from dalle.data.shapes import ShapesDataset
from dalle.dvae import DVAE, DVAEConfig
from dalle.generate import CaptionWarning, sample_captions
from dalle.images import save_grid
from dalle.model import DALLE, DALLEConfig
from dalle.rerank import Reranker, RerankerConfig
from dalle.tokenizer import train_tokenizer

TEXT_LEN = 24
NORMAL = "a red circle above a blue square"
UNUSUAL = {
    "empty": "",
    "whitespace": " \t\n ",
    "long": "a large red circle to the left of a small blue square " * 4,
    "non_ascii": "un cercle rouge à côté d'un carré bleu, 日本語",
    "emoji": "a red circle 🔴 and a blue square 🟦",
    "control": "a red\x00 circle\x07\x1b[31m above\r a blue square",
}


@pytest.fixture(scope="module")
def parts():
    tok = train_tokenizer(ShapesDataset("train", size=64).captions(), 120)
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig.tiny(image_size=16, n_hid=8, n_init=8, vocab_size=12, group_count=3)).eval()
    model = DALLE(DALLEConfig.micro(text_len=TEXT_LEN, text_vocab=tok.vocab_size, image_vocab=12, grid=dvae.grid_size,
                                    attn_backend="torch")).eval()
    reranker = Reranker(RerankerConfig(text_vocab=tok.vocab_size, image_size=16, width=8, channels=(4, 4))).eval()
    return model, tok, dvae, reranker


@pytest.fixture
def spy(monkeypatch):
    """Counts the sampling calls and the CaptionWarnings raised before the first one."""
    calls = {"n": 0, "warned_before": None}
    real = gen.generate_images

    def counted(*a, **kw):
        if calls["n"] == 0:
            calls["warned_before"] = len(calls["record"])
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(gen, "generate_images", counted)
    return calls


def sample(parts, captions, spy=None, **kw):
    model, tok, dvae, _ = parts
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if spy is not None:
            spy["record"] = record
        out = sample_captions(model, tok, dvae, captions, generator=torch.Generator().manual_seed(3), **kw)
    return out, [w for w in record if issubclass(w.category, CaptionWarning)]


@pytest.mark.parametrize("kind", sorted(UNUSUAL))
@pytest.mark.parametrize("rank_by", ["reranker", "scorer"])
def test_an_unusual_caption_is_sampled_and_reranked_beside_a_normal_one(parts, spy, kind, rank_by):
    reranker = parts[3] if rank_by == "reranker" else None
    caps = [NORMAL, UNUSUAL[kind], NORMAL]
    out, warned = sample(parts, caps, spy, n=2, rerank=3, top_k=4, reranker=reranker)
    assert out.shape == (3, 2, 3, 16, 16)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # the unusual caption (only it) was reported, before the first token was drawn
    assert warned and spy["warned_before"] == len(warned)
    assert all(str(w.message).startswith("caption 1 ") for w in warned), [str(w.message) for w in warned]


def test_an_empty_caption_is_kept_in_draw_order_by_the_reranker(parts):
    """It has no token to score; before, ``Reranker.rank`` raised after every caption had been sampled."""
    model, tok, dvae, reranker = parts
    for caption in ("", "   "):
        kw = dict(top_k=4, temperature=1.0)
        drawn, _ = sample(parts, [NORMAL, caption], n=4, **kw)
        kept, warned = sample(parts, [NORMAL, caption], n=2, rerank=2, reranker=reranker, **kw)
        assert "no tokens" in str(warned[0].message)
        torch.testing.assert_close(kept[1], drawn[1, :2])  # draw order
        order = reranker.rank(drawn[0], tok.encode(NORMAL))  # the normal caption is still reranked
        torch.testing.assert_close(kept[0], drawn[0, order[:2]])


def test_unusual_captions_do_not_change_the_others_samples(parts):
    """Greedy decoding: a normal caption's images are the same alone and beside any unusual caption."""
    alone, warned = sample(parts, [NORMAL], n=1, temperature=0)
    assert not warned
    together, _ = sample(parts, [NORMAL, *UNUSUAL.values()], n=1, temperature=0)
    torch.testing.assert_close(together[0], alone[0])


def test_guided_and_prompted_sampling_take_unusual_captions(parts):
    model = parts[0]
    prefix = torch.randint(0, model.cfg.image_vocab, (model.cfg.grid[1],))
    out, warned = sample(parts, [NORMAL, *UNUSUAL.values()], n=1, rerank=2, guidance=1.5, image_prefix=prefix)
    assert out.shape[:2] == (1 + len(UNUSUAL), 1)
    assert {str(w.message).split()[1] for w in warned} == {str(i + 1) for i in range(len(UNUSUAL))}


def test_the_warnings_say_what_happens(parts):
    _, warned = sample(parts, [UNUSUAL["long"], UNUSUAL["emoji"], UNUSUAL["empty"]], n=1)
    text = [str(w.message) for w in warned]
    assert "text slots" in text[0] and f"first {TEXT_LEN}" in text[0]
    assert "[UNK]" in text[1] and "🔴" in text[1]
    assert "no tokens" in text[2] and "empty caption" in text[2]


def bad_calls(parts):
    model, tok, dvae, reranker = parts
    other_tok = train_tokenizer(["a b c d e f", "g h i j"], 30)
    big_dvae = DVAE(DVAEConfig.tiny(image_size=32, n_hid=8, n_init=8, vocab_size=12, group_count=3))
    return {
        "single str": (TypeError, dict(captions=NORMAL)),
        "non-str item": (TypeError, dict(captions=[NORMAL, 3])),
        "no caption": (ValueError, dict(captions=[])),
        "n=0": (ValueError, dict(n=0)),
        "n float": (ValueError, dict(n=1.5)),
        "rerank=0": (ValueError, dict(rerank=0)),
        "batch_size=0": (ValueError, dict(batch_size=0)),
        "temperature<0": (ValueError, dict(temperature=-1.0)),
        "temperature nan": (ValueError, dict(temperature=float("nan"))),
        "temperature inf": (ValueError, dict(temperature=float("inf"))),
        "top_k=0": (ValueError, dict(top_k=0)),
        "top_k bool": (ValueError, dict(top_k=True)),
        "top_p=0": (ValueError, dict(top_p=0.0)),
        "top_p>1": (ValueError, dict(top_p=1.5)),
        "guidance inf": (ValueError, dict(guidance=float("inf"))),
        "tokenizer of another run": (ValueError, dict(tok=other_tok)),
        "dVAE of another grid": (ValueError, dict(dvae=big_dvae)),
        "reranker of another vocabulary": (ValueError, dict(reranker=Reranker(RerankerConfig(
            text_vocab=tok.vocab_size + 1, image_size=16, width=8, channels=(4, 4))), rerank=2)),
        "reranker of another image size": (ValueError, dict(reranker=Reranker(RerankerConfig(
            text_vocab=tok.vocab_size, image_size=32, width=8, channels=(4, 4))), rerank=2)),
        "prefix ids out of range": (ValueError, dict(image_prefix=torch.full((4,), model.cfg.image_vocab))),
        "prefix as long as the image": (ValueError, dict(image_prefix=torch.zeros(model.cfg.image_len,
                                                                                 dtype=torch.long))),
        "prefix of floats": (ValueError, dict(image_prefix=torch.zeros(4))),
        "generator not a Generator": (ValueError, dict(generator=0)),
    }


BAD_CASES = ("single str", "non-str item", "no caption", "n=0", "n float", "rerank=0", "batch_size=0",
             "temperature<0", "temperature nan", "temperature inf", "top_k=0", "top_k bool", "top_p=0", "top_p>1",
             "guidance inf", "tokenizer of another run", "dVAE of another grid", "reranker of another vocabulary",
             "reranker of another image size", "prefix ids out of range", "prefix as long as the image",
             "prefix of floats", "generator not a Generator")


@pytest.mark.parametrize("case", BAD_CASES)
def test_what_cannot_work_is_refused_before_anything_is_drawn(parts, monkeypatch, case):
    model, tok, dvae, _ = parts
    cases = bad_calls(parts)
    assert set(cases) == set(BAD_CASES)
    error, kw = cases[case]

    def never(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(gen, "generate_images", never)
    monkeypatch.setattr(DVAE, "decode", never)
    args = dict(model=model, tok=tok, dvae=dvae, captions=[NORMAL, "a green square"])
    args.update(kw)
    with pytest.raises(error) as e:
        sample_captions(**args)
    assert not isinstance(e.value, AssertionError)


def test_the_generate_flow_writes_a_grid_for_any_captions(parts, tmp_path, monkeypatch):
    """``python -m dalle.generate RUN caption...``: sampling, reranking and the captioned grid, with every kind
    of unusual caption, also with PIL's bitmap font (Pillow without FreeType), which cannot draw non-Latin-1."""
    model, tok, dvae, _ = parts
    monkeypatch.setattr(gen, "load_run", lambda run, device="cpu": (model, tok, dvae))
    # The run folder holds no files: the in-memory parts above stand in for them.
    monkeypatch.setattr(dalle.cli, "check_run", lambda parser, run, flag="--run": Path(run))
    caps = [NORMAL, *UNUSUAL.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptionWarning)
        gen.main(["--run", str(tmp_path), *caps, "-n", "2", "--rerank", "2", "--top-k", "4",
                  "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert Image.open(tmp_path / "g.png").size[0] > 0
    monkeypatch.setattr(ImageFont, "load_default", lambda *a, **k: ImageFont.load_default_imagefont())
    images, _ = sample(parts, caps, n=1)
    path = save_grid(images.flatten(0, 1), tmp_path / "bitmap.png", nrow=1, captions=caps)
    assert Image.open(path).size[1] > 16 * len(caps)


def test_a_run_config_edited_by_hand_is_one_line(tmp_path, capsys):
    """A run whose config.json records its dVAE as a number, or a grid of lists, is refused in one line."""
    import json

    from dalle.dvae import DVAE, DVAEConfig
    from dalle.generate import main
    from dalle.train import main as train_main

    torch.manual_seed(0)
    DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(tmp_path / "dvae")
    run = tmp_path / "run"
    train_main(["--run", str(run), "--dvae", str(tmp_path / "dvae"), "--preset", "micro", "--steps", "1",
                "--dataset-size", "16", "--batch-size", "8", "--text-len", "16", "--bpe-vocab", "64", "--warmup", "1",
                "--attn-backend", "torch", "--no-progress", "--n-sample-captions", "1"])
    capsys.readouterr()  # the trainer's own lines
    config = json.loads((run / "config.json").read_text())
    for edit, words in (({"dvae": 5}, "records its dVAE as 5"), ({"grid": [[8], [8]]}, "is not a transformer config")):
        (run / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(SystemExit) as e:
            main(["--run", str(run), "a red circle", "-n", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
