"""Caption tokenizer: round trip, slot padding, truncation, dropout only in training mode and seeded, save/load."""
import collections
import random

import pytest
import torch
from tokenizers import Tokenizer

from dalle.data.shapes import ShapesDataset
from dalle.tokenizer import CaptionTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def captions():
    return ShapesDataset("train", 300, seed=0).captions()


@pytest.fixture(scope="module")
def tok(captions, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    t = train_tokenizer(captions, vocab_size=200, path=path)
    assert path.is_file()
    return t


def test_round_trip_and_slots(tok, captions):
    assert 30 < tok.vocab_size <= 200
    text_len = 24
    ids = tok.encode_batch(captions[:50], text_len)
    assert ids.dtype == torch.long and ids.shape == (50, text_len)
    for row, cap in zip(ids, captions[:50]):
        n = len(tok.encode(cap))
        assert n < text_len  # these captions fit: no truncation here
        assert (row[:n] < tok.vocab_size).all()
        # unused slot i holds the per-slot padding id vocab_size + i
        assert torch.equal(row[n:], torch.arange(n, text_len) + tok.vocab_size)
        assert tok.decode(row) == cap
    assert tok.decode_batch(ids[:3]) == captions[:3]


def test_lowercase_truncation_and_unseen_text(tok):
    ids = tok.encode_batch(["A  RED Circle", "a red circle"], 16)
    assert torch.equal(ids[0], ids[1])
    assert tok.decode(ids[0]) == "a red circle"
    long = " ".join(["a red circle above a blue square"] * 10)
    out = tok.encode_batch([long], 8)
    assert out.shape == (1, 8) and (out < tok.vocab_size).all()
    assert torch.equal(out[0], torch.tensor(tok.encode(long)[:8]))
    # letters and digits never seen in training still encode (no [UNK]) and decode back
    assert tok.decode(tok.encode_batch(["zebra 42"], 16)[0]) == "zebra 42"
    assert torch.equal(tok.encode_batch([""], 4)[0], torch.arange(4) + tok.vocab_size)


def test_dropout_only_when_training(tok, captions):
    batch = captions[:64]
    plain = [tok.encode_batch(batch, 32) for _ in range(3)]
    assert all(torch.equal(plain[0], p) for p in plain[1:])
    dropped = tok.encode_batch(batch, 32, dropout=True)
    assert not torch.equal(dropped, plain[0])
    # dropout splits merges: never fewer tokens, and it still decodes to the same text
    assert ((dropped < tok.vocab_size).sum(1) >= (plain[0] < tok.vocab_size).sum(1)).all()
    for row, cap in zip(dropped, batch):
        if (row >= tok.vocab_size).any():  # not truncated
            assert tok.decode(row) == cap
    # and the deterministic encoder is unaffected after a dropout call
    assert torch.equal(tok.encode_batch(batch, 32), plain[0])


def test_dropout_is_seeded(tok, captions):
    batch = captions[:64]
    a = tok.encode_batch(batch, 32, dropout=True, rng=random.Random(3))
    b = tok.encode_batch(batch, 32, dropout=True, rng=random.Random(3))
    c = tok.encode_batch(batch, 32, dropout=True, rng=random.Random(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert tok.encode(batch[5], dropout=True, rng=random.Random(9)) == tok.encode(batch[5], dropout=True,
                                                                                    rng=random.Random(9))
    with pytest.raises(TypeError, match="rng"):
        tok.encode_batch(batch, 32, dropout=True, rng=3)


def test_dropout_is_the_librarys_bpe_dropout(captions):
    """Our seeded BPE dropout is the tokenizers library's (same merge procedure): equal encodings when no merge
    is dropped, and the same distribution of encodings (a chi-square test against the library's own draws)."""
    tok = train_tokenizer(captions, vocab_size=200, dropout=1e-12)
    odd = ["A  Zebra ÉCLAIR, 42!!", "", "   ", "a magenta triangle above a small cyan circle ~"]
    rng = random.Random(0)
    for c in captions + odd:
        assert tok.encode(c, dropout=True, rng=rng) == tok.encode(c), c
    tok.dropout = 0.3
    lib = Tokenizer.from_str(tok._tok.to_str())
    lib.model.dropout = 0.3
    for caption in ("a magenta square", "triangle", "background"):
        n = 6000
        ours = collections.Counter(tuple(tok.encode(caption, dropout=True, rng=rng)) for _ in range(n))
        theirs = collections.Counter(tuple(lib.encode(caption).ids) for _ in range(n))
        cells = [k for k in set(ours) | set(theirs) if ours[k] + theirs[k] >= 20]
        assert len(cells) > 10, (caption, ours.most_common(3), theirs.most_common(3))  # many encodings at p = 0.3
        chi2 = sum((ours[k] - theirs[k]) ** 2 / (ours[k] + theirs[k]) for k in cells)
        dof = len(cells) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (caption, chi2, dof)  # about 5 sigma above the mean


def test_save_load(tok, tmp_path, captions):
    tok.save(tmp_path)
    again = CaptionTokenizer.load(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert torch.equal(again.encode_batch(captions[:20], 20), tok.encode_batch(captions[:20], 20))
    with pytest.raises(FileNotFoundError):
        CaptionTokenizer.load(tmp_path / "missing.json")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="text_len"):
        tok.encode_batch(["a"], 0)
    with pytest.raises(TypeError, match="list of str"):
        tok.encode_batch("a red circle", 8)
    with pytest.raises(ValueError, match="caption"):
        train_tokenizer(["", "  "], 100)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a"], 1)
