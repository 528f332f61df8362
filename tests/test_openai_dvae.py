"""OpenAI's released dVAE: ``DVAE.from_openai`` against the ``dall_e`` package itself.

Its ``Encoder`` and ``Decoder`` are built with random weights (biases too, so every tensor matters), saved as OpenAI
did (``torch.save`` of the module), loaded with ``from_openai`` (and converted to a model folder), and our encoder
logits, decoder outputs and pixel maps must equal theirs on photographs. The pickles are read with a restricted
unpickler: a crafted one is refused and never runs. Needs ``pip install --no-deps dall-e==0.1 && pip install attrs
requests`` (the package imports both); skipped without it.
"""
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle.common import UnsafeFileError
from dalle.convert import main as convert_main
from dalle.dvae import DVAE, DVAEConfig
from dalle.openai_dvae import openai_names, read_pickled_module
from dalle_kernels import map_pixels, unmap_pixels

dall_e = pytest.importorskip("dall_e", reason="the dall-e package is not installed "
                                              "(pip install --no-deps dall-e==0.1 && pip install attrs requests)")

SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)  # the smallest sizes the dall_e classes accept
TOL = dict(atol=1e-5, rtol=1e-5)


def photos(size: int) -> torch.Tensor:
    """(2, 3, size, size) uint8: scikit-image's astronaut and cat, centre-cropped and resized (a smooth synthetic
    image pair where scikit-image is missing)."""
    try:
        from skimage import data

        arrays = [data.astronaut(), data.chelsea()]
    except ImportError:
        yy, xx = np.mgrid[0:256, 0:256] / 255.0
        arrays = [np.stack([np.sin(6 * xx + k) * 0.5 + 0.5, yy * xx, np.cos(4 * yy - k) * 0.5 + 0.5], -1) * 255
                  for k in (0, 1)]
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        s = min(t.shape[1:])
        top, left = (t.shape[1] - s) // 2, (t.shape[2] - s) // 2
        t = F.interpolate(t[None, :, top:top + s, left:left + s], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
        out.append(t.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def randomized(module, seed: int):
    """``module`` with every weight redrawn (N(0, 1/fan_in), as dall_e draws them) and every bias non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".w"):
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def released_pair(folder: Path, seed=0, legacy=False, **sizes):
    """dall_e's modules with random weights, saved as OpenAI did: ``torch.save`` of the module; ``legacy``: in
    torch's pre-zip format, the format of OpenAI's released files."""
    from dall_e import Decoder, Encoder

    enc = randomized(Encoder(**sizes), seed).eval()
    dec = randomized(Decoder(n_init=32 if sizes else 128, **sizes), seed + 1).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(enc, folder / "encoder.pkl", _use_new_zipfile_serialization=not legacy)
    torch.save(dec, folder / "decoder.pkl", _use_new_zipfile_serialization=not legacy)
    return enc, dec, folder / "encoder.pkl", folder / "decoder.pkl"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return released_pair(tmp_path_factory.mktemp("released"), **SMALL)


def worst(ours, theirs) -> tuple[float, float]:
    d = (ours.double() - theirs.double()).abs()
    return float(d.max()), float((d / theirs.double().abs().clamp_min(1e-6)).max())


@torch.no_grad()
def assert_same_as_dall_e(model: DVAE, enc, dec, images: torch.Tensor):
    """Our logits, decoder outputs (from one-hot, relaxed and id codes) and images equal dall_e's."""
    from dall_e import map_pixels as their_map, unmap_pixels as their_unmap

    x = images.float() / 255
    theirs = enc(their_map(x))
    ours = model.logits(images)
    torch.testing.assert_close(ours, theirs, **TOL)
    ids = theirs.argmax(1)
    one_hot = F.one_hot(ids, model.vocab_size).permute(0, 3, 1, 2).float()
    relaxed = F.softmax(theirs / 2, dim=1)
    figures = {"logits": worst(ours, theirs)}
    for name, z, our_z in (("one-hot", one_hot, one_hot), ("relaxed", relaxed, relaxed), ("ids", one_hot, ids)):
        out = model.decoder(our_z)
        torch.testing.assert_close(out, dec(z), **TOL)
        figures[f"decoder {name}"] = worst(out, dec(z))
    torch.testing.assert_close(model.decode(ids), their_unmap(torch.sigmoid(dec(one_hot)[:, :3])), **TOL)
    assert ours.shape == (len(images), model.vocab_size, images.shape[2] // 8, images.shape[3] // 8)
    return figures


def test_small_matches_dall_e_from_the_pickles(small):
    enc, dec, enc_path, dec_path = small
    model = DVAE.from_openai(enc_path, dec_path)
    assert model.cfg == DVAEConfig.openai(n_init=32, **SMALL)
    figures = assert_same_as_dall_e(model, enc, dec, photos(64))
    print("max abs / rel difference:", figures)
    # the same from the loaded modules, from their state dicts and from str paths / open files
    for e, d in ((enc, dec), (enc.state_dict(), dec.state_dict()), (str(enc_path), str(dec_path))):
        again = DVAE.from_openai(e, d)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad for p in again.parameters())
    again = DVAE.from_openai(enc, dec)  # a copy: changing the source module later does not reach the dVAE
    kept = enc.blocks.input.w.detach().clone()
    with torch.no_grad():
        enc.blocks.input.w.add_(1.0)
    try:
        assert torch.equal(again.encoder.net[0].weight, kept)
    finally:
        with torch.no_grad():
            enc.blocks.input.w.copy_(kept)
    with open(enc_path, "rb") as fe, open(dec_path, "rb") as fd:
        assert torch.equal(DVAE.from_openai(fe, fd).encoder.net[0].weight, model.encoder.net[0].weight)
    # the same modules in torch's legacy (pre-zip) format, which OpenAI's files are in, read the same
    legacy = enc_path.parent / "legacy"
    legacy.mkdir(exist_ok=True)
    for module, path in ((enc, legacy / "encoder.pkl"), (dec, legacy / "decoder.pkl")):
        torch.save(module, path, _use_new_zipfile_serialization=False)
    again = DVAE.from_openai(legacy / "encoder.pkl", legacy / "decoder.pkl")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_reading_needs_no_dall_e(small, monkeypatch, tmp_path):
    """The stand-ins replace dall_e's classes: with the package made unimportable the pickles still load, in both
    torch formats, to the same weights."""
    enc, dec, enc_path, dec_path = small
    torch.save(enc, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=False)
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import dall_e now raises ImportError
    with pytest.raises(ImportError):
        import dall_e.encoder  # noqa: F401
    for path in (enc_path, tmp_path / "encoder.pkl"):
        model = DVAE.from_openai(path, dec_path)
        assert torch.equal(model.encoder.net[-1].weight, enc.blocks.output.conv.w)


def test_every_tensor_is_mapped(small):
    """Each of dall_e's tensors lands where it acts the same: a change to one of theirs, made to the tensor it maps
    to in ours, changes both outputs alike, and visibly (none is dropped or swapped for another of the same shape:
    conv_2 and conv_3 of a block have the same shape)."""
    enc, dec, *_ = small
    images = photos(8)  # 1x1 code grids: the mapping, not the pictures, is under test
    model = DVAE.from_openai(enc, dec)
    ours = model.state_dict()
    ids = model.encode(images)
    one_hot = F.one_hot(ids, model.vocab_size).permute(0, 3, 1, 2).float()
    x = images.float() / 255
    run = {"encoder": (lambda: model.logits(images), lambda: enc(dall_e.map_pixels(x))),
           "decoder": (lambda: model.decoder(ids), lambda: dec(one_hot))}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for theirs_name, our_name in openai_names(model).items():
            part, key = theirs_name.split(":")
            theirs = (enc if part == "encoder" else dec).state_dict()[key]  # shares memory with the module
            before, kept = run[part][0](), theirs.clone()
            changed = theirs + 2 * theirs.std() * torch.randn(theirs.shape, generator=g)  # twice its spread
            theirs.copy_(changed)
            ours[our_name].copy_(changed)
            try:
                after, expected = run[part][0](), run[part][1]()
                torch.testing.assert_close(after, expected, **TOL, msg=lambda m: f"{theirs_name}: {m}")
                assert (after - before).abs().max() > 10 * TOL["atol"], f"{theirs_name} does not reach the output"
            finally:
                theirs.copy_(kept)
                ours[our_name].copy_(kept)


def test_released_config_matches_dall_e(tmp_path):
    """The released architecture (n_hid 256, 4 groups of 2 blocks, 8192 codes), on a 32x32 photo to stay quick."""
    enc, dec, enc_path, dec_path = released_pair(tmp_path, seed=3, legacy=True)
    model = DVAE.from_openai(enc_path, dec_path)
    assert model.cfg == DVAEConfig.openai() == DVAEConfig.paper()
    figures = assert_same_as_dall_e(model, enc, dec, photos(32)[:1])
    print("released config, max abs / rel difference:", figures)


def test_converted_folder_matches_dall_e(small, tmp_path, capsys):
    enc, dec, enc_path, dec_path = small
    out = tmp_path / "openai_dvae"
    convert_main(["--openai-dvae", str(enc_path), str(dec_path), "--out", str(out)])
    assert "read back identical" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_as_dall_e(DVAE.load(out), enc, dec, photos(32))


def test_pixel_maps_equal_dall_e():
    from dall_e import map_pixels as their_map, unmap_pixels as their_unmap

    x = torch.rand(2, 3, 7, 5)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(map_pixels(x, 0.1), their_map(x), atol=0, rtol=0)
    y = torch.rand(2, 3, 7, 5) * 1.4 - 0.2  # beyond [eps, 1 - eps] too: both clamp to [0, 1]
    torch.testing.assert_close(unmap_pixels(y, 0.1), their_unmap(y), atol=0, rtol=0)


CALLS = r"((builtins\.)?getattr|pathlib\.Path\.write_text)"  # how pickle names Path.write_text (by protocol)


class WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, "x")``: code from the file, run by ``pickle``."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.write_text, (self.marker, "x")


def test_crafted_pickles_are_refused_and_never_run(small, tmp_path, capsys):
    """(tests/test_safe_files.py shows that full unpickling of such a file does write the marker.)"""
    from dall_e import Encoder

    _, _, enc_path, dec_path = small
    marker = tmp_path / "MARKER"
    crafted = {"torch.save": lambda p: torch.save(WritesMarker(marker), p),
               "torch.save legacy": lambda p: torch.save(WritesMarker(marker), p, _use_new_zipfile_serialization=False),
               "hidden in a legacy dall_e encoder": lambda p: torch.save(
                   _with_attr(Encoder(**SMALL), WritesMarker(marker)), p, _use_new_zipfile_serialization=False),
               "pickle.dump": lambda p: p.write_bytes(pickle.dumps(WritesMarker(marker), protocol=2)),
               "pickle.dump protocol 5": lambda p: p.write_bytes(pickle.dumps(WritesMarker(marker), protocol=5)),
               "hidden in a dall_e encoder": lambda p: torch.save(
                   _with_attr(Encoder(**SMALL), WritesMarker(marker)), p)}
    for how, write in crafted.items():
        path = tmp_path / how / "encoder.pkl"
        path.parent.mkdir()
        write(path)
        with pytest.raises(UnsafeFileError, match=f"refused: it names the global {CALLS}"):
            DVAE.from_openai(path, dec_path)
        with pytest.raises(SystemExit) as e:
            convert_main(["--openai-dvae", str(path), str(dec_path), "--out", str(tmp_path / how / "out")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert re.search(f"refused: it names the global {CALLS}", err) and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / how / "out").exists()
        assert not marker.exists(), f"code from a crafted file ({how}) ran"


def _with_attr(module, value):
    module.extra = value
    return module


def test_other_files_and_shapes_are_clear_errors(small, tmp_path):
    enc, dec, enc_path, dec_path = small
    with pytest.raises(ValueError, match="holds a dall_e.decoder.Decoder, expected a dall_e.encoder.Encoder"):
        DVAE.from_openai(dec_path, dec_path)
    torch.save(torch.nn.Conv2d(3, 4, 1), tmp_path / "conv.pkl")
    with pytest.raises(UnsafeFileError, match="torch.nn.modules.conv.Conv2d"):
        DVAE.from_openai(tmp_path / "conv.pkl", dec_path)
    (tmp_path / "text.pkl").write_text("not a pickle")
    with pytest.raises(ValueError, match="not a torch file"):
        DVAE.from_openai(tmp_path / "text.pkl", dec_path)
    with pytest.raises(FileNotFoundError):
        DVAE.from_openai(tmp_path / "missing.pkl", dec_path)
    torch.save(enc, tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pkl").write_bytes((tmp_path / "legacy.pkl").read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.pkl is not a torch file .*truncated"):
        DVAE.from_openai(tmp_path / "cut.pkl", dec_path)
    with pytest.raises(TypeError, match="encoder must be"):
        DVAE.from_openai(42, dec_path)
    e_sd, d_sd = enc.state_dict(), dec.state_dict()
    key = "blocks.group_2.block_1.res_path.conv_2.w"
    with pytest.raises(ValueError, match=rf"encoder {key} has shape \(32, 32, 3, 1\), expected \(32, 32, 3, 3\)"):
        DVAE.from_openai({**e_sd, key: e_sd[key][..., :1]}, d_sd)
    with pytest.raises(ValueError, match="missing .*conv_4.b"):
        DVAE.from_openai({k: v for k, v in e_sd.items() if k != "blocks.group_3.block_1.res_path.conv_4.b"}, d_sd)
    from dall_e import Decoder

    with pytest.raises(ValueError, match="not one dVAE"):  # a decoder of another width
        DVAE.from_openai(e_sd, Decoder(n_init=32, n_hid=128, n_blk_per_group=1, vocab_size=512).state_dict())
    tree = read_pickled_module(enc_path)  # the layout a state dict cannot show: pooling and post-gain
    tree._modules["blocks"]._modules["group_2"]._modules["pool"].kernel_size = 3
    with pytest.raises(ValueError, match="group_2.pool is not a 2x pool"):
        DVAE.from_openai(tree, dec_path)
    tree = read_pickled_module(enc_path)  # what a crafted file can build without running code: a loop, a string
    tree._modules["blocks"]._modules["loop"] = tree
    with pytest.raises(ValueError, match="blocks.loop is the module already at the root: a module tree that shares"):
        DVAE.from_openai(tree, dec_path)
    tree = read_pickled_module(enc_path)
    tree._modules["blocks"]._modules["input"]._parameters["w"] = "weights"
    with pytest.raises(ValueError, match="blocks.input.w is a str, expected a tensor"):
        DVAE.from_openai(tree, dec_path)
    tree = read_pickled_module(dec_path)
    tree._modules["blocks"]._modules["group_4"]._modules["block_1"].post_gain = 1.0
    with pytest.raises(ValueError, match="post_gain 1.0"):
        DVAE.from_openai(enc_path, tree)
