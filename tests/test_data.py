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


# ------------------------------------------------------------------------------------------ real data
from PIL import Image  # noqa: E402

from dalle.data.folder import ImageCaptionDataset  # noqa: E402
from dalle.data.transforms import aspect_ok, caption_problem, preprocess  # noqa: E402


def _gradient_image(w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.full_like(xx, 77)], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("mode", ["dvae", "transformer", "eval"])
@pytest.mark.parametrize("size", [(97, 61), (40, 40), (23, 45)])
def test_preprocess_shapes_and_determinism(mode, size):
    img = _gradient_image(*size)
    outs = [preprocess(img, 32, mode, torch.Generator().manual_seed(s)) for s in (0, 0, 1, 2, 3, 4)]
    for o in outs:
        assert o.dtype == torch.uint8 and o.shape == (3, 32, 32)
    assert torch.equal(outs[0], outs[1])  # a function of the generator's seed
    if mode == "eval":
        assert all(torch.equal(outs[0], o) for o in outs)
    elif min(size) >= 40:
        assert any(not torch.equal(outs[0], o) for o in outs[2:])  # and it is random


def test_preprocess_flip_only_for_dvae():
    img = _gradient_image(64, 64)  # red grows left to right
    flips = {"dvae": 0, "transformer": 0}
    for mode in flips:
        for s in range(24):
            red = preprocess(img, 16, mode, torch.Generator().manual_seed(s))[0].float()
            flips[mode] += int(red[:, 0].mean() > red[:, -1].mean())
    assert 0 < flips["dvae"] < 24 and flips["transformer"] == 0


def test_transformer_crop_stays_near_centre():
    # red encodes the source column: the crop's left edge tells where the square crop started
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[..., 0] = (np.arange(300) * 255 // 299)[None]
    img = Image.fromarray(arr)
    lefts = {"transformer": [], "dvae": []}
    for mode in lefts:
        for s in range(20):
            out = preprocess(img, 32, mode, torch.Generator().manual_seed(s))[0].float()
            lefts[mode].append(min(out[:, 0].mean(), out[:, -1].mean()) * 299 / 255)  # source column
    # offsets from the middle quarter of the free range [0, 200] -> [75, 125], plus at most 1/8 of the crop
    assert all(70 <= x <= 125 + 100 / 8 + 3 for x in lefts["transformer"])
    assert min(lefts["dvae"]) < 60 or max(lefts["dvae"]) > 140  # the dVAE crop may be anywhere


def test_caption_and_aspect_filters():
    assert caption_problem("") == "empty_caption" and caption_problem("   \n") == "empty_caption"
    assert caption_problem("cat") == "short_caption"
    assert caption_problem("ein schöner großer Hund im Garten") is None  # mostly ASCII letters
    assert caption_problem("большая красная собака") == "non_english"
    assert caption_problem("a red dog") is None
    assert aspect_ok(200, 100) and aspect_ok(100, 200) and not aspect_ok(201, 100) and not aspect_ok(100, 201)


def _write_folder(root, n_good=5):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        _gradient_image(40 + i, 36).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"a gradient picture number {i}\n")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "corrupt.txt").write_text("a broken image file")
    (root / "nocap.png").write_bytes((root / "good0.png").read_bytes())
    _gradient_image(40, 40).save(root / "empty.png")
    (root / "empty.txt").write_text("   ")
    _gradient_image(90, 30).save(root / "wide.png")
    (root / "wide.txt").write_text("a very wide picture")
    # a file whose header opens but whose pixel data is cut off: only decoding finds out
    data = (root / "good1.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "truncated.txt").write_text("a truncated picture")


def test_folder_skips_and_counts(tmp_path):
    _write_folder(tmp_path / "imgs")
    ds = ImageCaptionDataset(tmp_path / "imgs", image_size=16)  # verify=True: every image decoded once
    assert ds.skipped["missing_caption"] == 1 and ds.skipped["empty_caption"] == 1 and ds.skipped["aspect"] == 1
    assert ds.skipped["corrupt_image"] == 2  # the garbage file and the truncated one that opens
    assert len(ds) == 5 and ds.keys == [f"good{i}" for i in range(5)]
    for _ in range(3):  # epochs: nothing left to fail, the counts stay
        seen = [ds[i] for i in range(len(ds))]
    assert all(im.shape == (3, 16, 16) and im.dtype == torch.uint8 for im, _ in seen)
    assert ds.skipped["corrupt_image"] == 2 and not ds.bad
    assert "5 usable pairs" in ds.report() and "corrupt_image 2" in ds.report()
    assert ds.captions()[0] == "a gradient picture number 0"


def test_lazy_corrupt_file_counted_once_and_replaced_deterministically(tmp_path):
    """verify=False: the truncated file is found at load time, counted once however often it is visited, never
    decoded again, and its slot serves the next decodable item whatever the order of visits."""
    _write_folder(tmp_path / "imgs")
    lazy = ImageCaptionDataset(tmp_path / "imgs", image_size=16, verify=False)
    assert len(lazy) == 6 and lazy.skipped["corrupt_image"] == 1  # header only: the truncated file passes
    t = lazy.keys.index("truncated")
    assert t == 5  # sorted last: its replacement wraps around to item 0
    forward = [lazy.load(i, seed=(0, i)) for i in range(6)]
    assert lazy.bad == {t} and lazy.skipped["corrupt_image"] == 2
    for _ in range(4):  # more epochs
        [lazy.load(i, seed=(0, i)) for i in range(6)]
    assert lazy.skipped["corrupt_image"] == 2 and "5 usable pairs" in lazy.report()
    other = ImageCaptionDataset(tmp_path / "imgs", image_size=16, verify=False)
    backward = [other.load(i, seed=(0, i)) for i in reversed(range(6))][::-1]  # the corrupt slot first
    for (a, ca), (b, cb) in zip(forward, backward):
        assert torch.equal(a, b) and ca == cb
    assert forward[t][1] == "a gradient picture number 0"  # the next item in index order (wrapping)
    # the same image as item 0 with the augmentation of the corrupt slot's own seed
    assert torch.equal(forward[t][0], other.load(0, seed=(0, t))[0])
    # a worker process's findings merge into the main process's count once
    fresh = ImageCaptionDataset(tmp_path / "imgs", image_size=16, verify=False)
    fresh.mark_bad([t])
    fresh.mark_bad([t])
    assert fresh.skipped["corrupt_image"] == 2 and fresh.bad == {t}
    with pytest.raises(IndexError):
        fresh.mark_bad([6])


def test_heldout_split_rule(tmp_path):
    import hashlib

    from dalle.data.folder import heldout_split

    keys = [f"img{i:04d}.png" for i in range(2000)]
    train, held = heldout_split(keys, 0.1)
    want = [i for i, k in enumerate(keys) if int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) / 2**32 < 0.1]
    assert held == want and sorted(train + held) == list(range(2000))
    assert 150 < len(held) < 250
    # stable under adding and removing other samples
    _, held_half = heldout_split(keys[::2], 0.1)
    assert [keys[::2][i] for i in held_half] == [k for k in (keys[i] for i in held) if k in set(keys[::2])]
    # the rule alone decides, whatever the number of keys: a tiny share may hold nothing out (every command then
    # says so), a large one may hold everything out; is_heldout gives each key the same answer
    from dalle.data.sources import is_heldout

    for share in (1e-9, 0.02, 0.5, 0.999999):
        _, held_small = heldout_split(keys[:40], share)
        assert held_small == [i for i, k in enumerate(keys[:40]) if is_heldout(k, share)]
    assert heldout_split(keys[:40], 1e-9) == (list(range(40)), [])
    assert heldout_split(keys, 0) == (list(range(2000)), [])
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="fraction"):
            heldout_split(keys, bad)


def test_keys_are_paths_relative_to_the_folder_or_table(tmp_path):
    _write_folder(tmp_path / "d" / "imgs", n_good=2)
    ds = ImageCaptionDataset(tmp_path / "d", image_size=8)
    assert ds.keys == ["imgs/good0", "imgs/good1"]
    table = tmp_path / "d" / "t.tsv"
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((tmp_path / "d" / "imgs" / "good0.png").read_bytes())
    table.write_text(f"imgs/good1.png\ta second picture\nimgs/good1.png\tthe same one again\n"
                     f"{outside}\tan absolute path\n")
    t = ImageCaptionDataset(table, image_size=8)
    assert t.keys == ["imgs/good1", "imgs/good1#2", outside.with_suffix("").as_posix()]
    sub = t.subset([2, 0])
    assert sub.keys == [outside.with_suffix("").as_posix(), "imgs/good1"] and sub.captions()[0] == "an absolute path"
    assert sub.skipped is t.skipped


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_table_of_paths_and_captions(tmp_path, suffix):
    _write_folder(tmp_path / "imgs", n_good=3)
    sep = "\t" if suffix == ".tsv" else ","
    rows = ["path" + sep + "caption"] + [f"imgs/good{i}.png{sep}a gradient number {i}" for i in range(3)]
    rows += [f"imgs/missing.png{sep}a file that is not there", f"imgs/corrupt.png{sep}a broken one", "lonely"]
    table = tmp_path / f"data{suffix}"
    table.write_text("\n".join(rows) + "\n")
    ds = ImageCaptionDataset(table, image_size=8, mode="transformer")
    assert len(ds) == 3 and ds.captions() == [f"a gradient number {i}" for i in range(3)]
    assert ds.skipped["missing_image"] == 1 and ds.skipped["corrupt_image"] == 1 and ds.skipped["bad_row"] == 1
    assert ds[2][0].shape == (3, 8, 8)


def test_no_usable_pairs_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "a.txt").write_text("a garbage file here")
    with pytest.raises(ValueError, match="no usable image/caption pairs.*corrupt_image: 1"):
        ImageCaptionDataset(tmp_path)
    with pytest.raises(ValueError, match="no image files found"):
        (tmp_path / "empty").mkdir()
        ImageCaptionDataset(tmp_path / "empty")


def test_sixteen_bit_and_float_images_are_scaled_not_clipped_and_utf16_captions_read(tmp_path):
    """PIL's convert("RGB") clips 16-bit greyscale at 255 (a photo comes out white); every reader scales it."""
    import io as _io

    from dalle.data.sources import open_source
    from dalle.data.transforms import to_rgb, to_tensor

    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    buf = _io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    (tmp_path / "moon16.png").write_bytes(buf.getvalue())
    (tmp_path / "moon16.txt").write_bytes("the moon in sixteen bits".encode("utf-16"))  # with its BOM
    with Image.open(tmp_path / "moon16.png") as im:
        im.load()
        assert im.mode.startswith("I")
        t = to_tensor(im)
    expect = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    assert torch.equal(t[0], expect) and torch.equal(t[1], expect) and torch.equal(t[2], expect)
    f = Image.fromarray(ramp.astype(np.float32) / 65535.0, mode="F")
    assert abs(np.asarray(to_rgb(f)).astype(float).mean() - 127.5) < 1.0
    from collections import Counter

    skipped = Counter()
    samples = list(open_source(tmp_path).samples(skipped=skipped))
    assert not skipped and len(samples) == 1 and samples[0].caption == "the moon in sixteen bits"
    assert abs(np.asarray(samples[0].image).astype(float).mean() - 127.5) < 1.0
