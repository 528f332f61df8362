"""The built-in shapes dataset and scorer, SPEC section 5 preprocessing, and the real-data loaders."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle.data import shapes
from dalle.data.shapes import HELDOUT_PAIRS, ShapesDataset, accuracy, matches, parse_caption, read_scene, render


def _pairs(scene):
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def test_shapes_deterministic_and_typed():
    a, b = ShapesDataset("train", 40, seed=3), ShapesDataset("train", 40, seed=3)
    for i in (0, 7, 39):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert ia.dtype == torch.uint8 and ia.shape == (3, 32, 32)
        assert isinstance(ca, str) and ca == cb and torch.equal(ia, ib)
    # order of access does not matter: each item is a function of (split, index, seed)
    c = ShapesDataset("train", 40, seed=3)
    assert torch.equal(c[39][0], a[39][0]) and c.caption(7) == a.caption(7)
    other = ShapesDataset("train", 40, seed=4)
    assert other.captions() != a.captions()
    assert len(a) == 40 and len(a.captions()) == 40
    with pytest.raises(IndexError):
        a[40]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test", 4)


def test_heldout_pairs_never_in_train():
    train, held = ShapesDataset("train", 400, seed=0), ShapesDataset("heldout", 100, seed=0)
    for i in range(len(train)):
        assert not (_pairs(train.scene(i)) & HELDOUT_PAIRS)
    for i in range(len(held)):
        assert _pairs(held.scene(i)) & HELDOUT_PAIRS
    # every colour and every shape still appears in training, only the combinations are new
    seen = set().union(*(_pairs(train.scene(i)) for i in range(len(train))))
    assert {c for c, _ in seen} == set(shapes.COLOURS) and {s for _, s in seen} == set(shapes.SHAPES)
    relations = {train.scene(i)["relation"] for i in range(len(train))}
    assert relations == {None, *shapes.RELATIONS}


def test_captions_parse_back_to_their_scene():
    ds = ShapesDataset("train", 200, seed=1)
    wordings = set()
    for i in range(len(ds)):
        scene, cap = ds.scene(i), ds.caption(i)
        parsed = parse_caption(cap)
        assert parsed is not None, cap
        assert parsed["relation"] == scene["relation"]
        for p, o in zip(parsed["objects"], scene["objects"]):
            assert (p["colour"], p["shape"]) == (o["colour"], o["shape"])
            assert p["size_said"] == o["size_said"] and (not o["size_said"] or p["size"] == o["size"])
        wordings.add(cap.split(" a ")[0])
    assert len(wordings) > 3  # varied wording
    assert parse_caption("a photo of a dog") is None


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_scorer_reads_clean_renders(split):
    ds = ShapesDataset(split, 150, seed=2)
    images = ds.images()
    scenes = [ds.scene(i) for i in range(len(ds))]
    assert accuracy(images, scenes) == 1.0
    assert accuracy(images.float() / 255, scenes) == 1.0  # float input in [0, 1]
    # every detected attribute, including the size that captions leave out
    for i in range(20):
        found = read_scene(images[i])["objects"]
        want = sorted(scenes[i]["objects"], key=lambda o: o["box"][0] + o["box"][2] / 2)
        assert [(f["colour"], f["shape"], f["size"]) for f in found] == \
               [(o["colour"], o["shape"], o["size"]) for o in want]


def test_scorer_survives_blur_and_noise():
    ds = ShapesDataset("train", 150, seed=5)
    x = ds.images().float() / 255
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    g = torch.Generator().manual_seed(0)
    noisy = (blurred + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    scenes = [ds.scene(i) for i in range(len(ds))]
    assert accuracy(blurred, scenes) >= 0.97
    assert accuracy(noisy, scenes) >= 0.97


def test_scorer_rejects_wrong_captions():
    scene = {"objects": [{"colour": "red", "shape": "circle", "size": "large", "size_said": True, "box": (3, 9, 14)},
                         {"colour": "blue", "shape": "square", "size": "small", "size_said": True,
                          "box": (20, 11, 9)}], "relation": "left of"}
    img = render(scene)
    assert matches(img, scene)

    def variant(**changes):
        s = {"objects": [dict(o) for o in scene["objects"]], "relation": scene["relation"]}
        for key, value in changes.items():
            if key == "relation":
                s["relation"] = value
            else:
                idx, field = key.split("_", 1)
                s["objects"][int(idx[1:])][field] = value
        return s

    assert not matches(img, variant(relation="right of"))
    assert not matches(img, variant(relation="above"))
    assert not matches(img, variant(o0_colour="green"))
    assert not matches(img, variant(o1_shape="triangle"))
    assert not matches(img, variant(o0_size="small"))
    assert matches(img, variant(o0_size="small", o0_size_said=False))  # size not in the caption: not checked
    assert not matches(img, {"objects": scene["objects"][:1], "relation": None})  # an extra object
    assert not matches(torch.zeros(3, 32, 32, dtype=torch.uint8), scene)
    # the scene parsed from a caption is enough to score
    assert matches(img, parse_caption("a large red circle to the left of a small blue square"))
    assert not matches(img, parse_caption("a small blue square to the left of a large red circle"))
    assert matches(img, parse_caption("a small blue square to the right of a red circle"))
    with pytest.raises(ValueError, match="shape"):
        read_scene(torch.zeros(32, 32))
