"""Image grids: captions wrapped at word boundaries with visible spaces and never cut; rows labelled."""
import numpy as np
import pytest
import torch
from PIL import ImageFont

from dalle.images import LINE_HEIGHT, line_width, make_grid, word_gap, wrap_caption

LONG = ("a photo of an orange cat sitting on a red chair next to a window in the afternoon sun, with a blue "
        "vase of yellow flowers on the table behind it")
FONTS = {"default": ImageFont.load_default, "bitmap": ImageFont.load_default_imagefont}


@pytest.mark.parametrize("font", FONTS, ids=list(FONTS))
@pytest.mark.parametrize("width", [64, 128, 300])
def test_wrap_keeps_every_word_in_order_and_fits(font, width):
    font = FONTS[font]()
    lines = wrap_caption(LONG, font, width)
    assert " ".join(lines) == LONG  # every word, in order, one space between words, across the lines
    assert all(line_width(line, font) <= width for line in lines), lines
    if width == 128:
        assert len(lines) > 4  # as many lines as it takes, not cut after four


def test_wrap_breaks_only_a_word_wider_than_the_cell():
    font = ImageFont.load_default()
    word = "x" * 60
    lines = wrap_caption(f"a {word} b", font, 64)
    tokens = " ".join(lines).split(" ")
    assert lines[0] == "a" and tokens[-1] == "b" and "".join(tokens[1:-1]) == word  # broken, nothing lost
    assert len(tokens) > 3
    assert all(line_width(line, font) <= 64 for line in lines)
    assert wrap_caption("", font, 64) == [] and wrap_caption("  \n ", font, 64) == []
    assert wrap_caption("one\ttwo\nthree", font, 500) == ["one two three"]  # control characters are spaces
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="width"):
            wrap_caption("a", font, bad)


def _ink_columns(img, top, bottom, left, right):
    """Per pixel column of the box, whether any pixel in it is darker than the white background."""
    a = np.asarray(img.convert("L"))[top:bottom, left:right]
    return (a < 160).any(axis=0)


def test_drawn_words_are_visibly_apart():
    """The default font's space is 2 pixels: words drawn with it ran together ("a photoof an")."""
    x = torch.ones(1, 3, 32, 32)
    img = make_grid(x, captions=["mm mm"])
    ink = _ink_columns(img, 2 + 128, img.size[1], 0, img.size[0])
    runs, gap, seen = [], 0, False
    for col in ink:
        if col:
            if seen and gap:
                runs.append(gap)
            seen, gap = True, 0
        elif seen:
            gap += 1
    # the blank between the words is wider than the one between two letters by a whole word gap
    assert len(runs) == 3 and max(runs) >= min(runs) + word_gap(ImageFont.load_default()) >= 4, runs


def test_long_caption_grows_the_band_instead_of_being_cut():
    x = torch.rand(2, 3, 32, 32)
    short = make_grid(x, nrow=2, captions=["a cat", "a dog"])
    lines = wrap_caption(LONG, ImageFont.load_default(), 128 - 2)
    tall = make_grid(x, nrow=2, captions=[LONG, "a dog"])
    assert tall.size[1] - short.size[1] == LINE_HEIGHT * (len(lines) - 1)
    last = _ink_columns(tall, tall.size[1] - LINE_HEIGHT - 2, tall.size[1], 2, 2 + 128)
    assert last.any()  # the last line is drawn, inside its cell


def test_row_labels_are_drawn_in_a_left_margin():
    x = torch.ones(4, 3, 16, 16)
    plain = make_grid(x, nrow=2)
    img = make_grid(x, nrow=2, row_labels=["held-out image", "reconstruction"])
    margin = img.size[0] - plain.size[0]
    assert margin > 40 and img.size[1] == plain.size[1]
    cell = 64 + 2
    for r in range(2):  # each row's label has ink in the margin, beside its row
        assert _ink_columns(img, 2 + r * cell, 2 + r * cell + 64, 0, margin).any()
    with pytest.raises(ValueError, match="row labels"):
        make_grid(x, nrow=2, row_labels=["only one"])
    with pytest.raises(TypeError, match="single str"):
        make_grid(x, nrow=4, row_labels="one")
