"""Your own data, end to end through the command lines: a small real-photo set (crops, flips and resizes of the
photographs scikit-image ships) written as an image folder, a TSV and img2dataset-style WebDataset shards, with
broken members; encode -> train -> resume -> generate -> rerank -> pipeline."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the test extras) makes the photo set")
wds = pytest.importorskip("webdataset")

REPO = Path(__file__).resolve().parents[1]

PHOTOS = {  # scikit-image's bundled photographs and what they show
    "astronaut": "an astronaut in a white space suit",
    "chelsea": "a ginger cat looking up",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
    "camera": "a man holding a camera",
    "coins": "old coins on a dark table",
    "immunohistochemistry": "stained tissue under a microscope",
    "hubble_deep_field": "galaxies in deep space",
    "colorwheel": "a wheel of rainbow colours",
    "moon": "the grey surface of the moon",
}
VARIANTS = [  # (crop box as fractions, flip, output size, words)
    ((0.0, 0.0, 1.0, 1.0), False, (48, 40), "whole picture"),
    ((0.0, 0.0, 0.7, 0.7), False, (36, 36), "top left part"),
    ((0.3, 0.3, 1.0, 1.0), False, (40, 44), "bottom right part"),
    ((0.15, 0.1, 0.85, 0.9), True, (44, 44), "centre mirrored"),
    ((0.0, 0.2, 1.0, 0.8), True, (56, 34), "wide band mirrored"),
    ((0.2, 0.0, 0.8, 1.0), False, (30, 40), "tall band"),
]


def _photo(name) -> Image.Image:
    a = getattr(skimage_data, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))


def make_pairs():
    """About 60 (key, PIL image, caption) pairs."""
    out = []
    for name, words in PHOTOS.items():
        im = _photo(name)
        w, h = im.size
        for k, ((x0, y0, x1, y1), flip, size, how) in enumerate(VARIANTS):
            v = im.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))).resize(size, Image.BICUBIC)
            if flip:
                v = v.transpose(Image.FLIP_LEFT_RIGHT)
            out.append((f"{name}_{k}", v, f"{words}, {how}"))
    return out


def _png_bytes(im, fmt="PNG") -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt)
    return b.getvalue()


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """The same pairs as a folder, a TSV and WebDataset shards, each with broken members added."""
    root = tmp_path_factory.mktemp("photos")
    pairs = make_pairs()
    folder = root / "folder"
    folder.mkdir()
    for i, (key, im, cap) in enumerate(pairs):
        ext = ".jpg" if i % 2 else ".png"
        (folder / f"{key}{ext}").write_bytes(_png_bytes(im, "JPEG" if ext == ".jpg" else "PNG"))
        (folder / f"{key}.txt").write_text(cap)
    good = _png_bytes(pairs[0][1])
    (folder / "zz_corrupt.png").write_bytes(b"\x89PNG not an image at all")
    (folder / "zz_corrupt.txt").write_text("a corrupt file with a caption")
    (folder / "zz_truncated.png").write_bytes(good[: len(good) // 2])  # opens, fails to decode
    (folder / "zz_truncated.txt").write_text("a truncated picture of an astronaut")
    (folder / "zz_nocaption.png").write_bytes(good)
    (folder / "zz_empty.png").write_bytes(good)
    (folder / "zz_empty.txt").write_text("   \n")

    table = root / "pairs.tsv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        for p in sorted(folder.glob("*")):
            if p.suffix != ".txt" and p.with_suffix(".txt").exists():
                w.writerow([f"folder/{p.name}", p.with_suffix(".txt").read_text()])

    shards = root / "shards"
    shards.mkdir()
    per = 20
    for s in range(0, len(pairs), per):
        with wds.TarWriter(str(shards / f"{s // per:05d}.tar")) as tw:
            for key, im, cap in pairs[s:s + per]:
                tw.write({"__key__": key, "jpg": _png_bytes(im, "JPEG"), "txt": cap,
                          "json": json.dumps({"caption": cap, "width": im.size[0]})})
            tw.write({"__key__": "broken_image", "jpg": b"not a jpeg", "txt": "a broken image member"})
            tw.write({"__key__": "no_caption", "jpg": _png_bytes(pairs[0][1], "JPEG")})
            tw.write({"__key__": "empty_caption", "jpg": _png_bytes(pairs[0][1], "JPEG"), "txt": ""})
    n_shards = (len(pairs) + per - 1) // per
    # One more shard, cut off in the middle of a member (as a failed download leaves it).
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tf:
        for key, im, cap in pairs[:3]:
            for ext, data in (("jpg", _png_bytes(im, "JPEG")), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"cut_{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    raw = full.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        third_image = tf.getmembers()[4]  # cut inside the third pair's image: the first two pairs are whole
    (shards / f"{n_shards:05d}.tar").write_bytes(raw[: third_image.offset_data + 100])
    pattern = str(shards / ("{00000..%05d}.tar" % n_shards))
    return {"pairs": pairs, "folder": folder, "table": table, "shards": pattern, "whole_in_cut_shard": 2}


@pytest.fixture(scope="module")
def dvae_dir(tmp_path_factory):
    from dalle.dvae import DVAE, DVAEConfig

    torch.manual_seed(0)
    return DVAE(DVAEConfig.tiny(image_size=16, n_hid=8, n_init=8, vocab_size=32)).save(tmp_path_factory.mktemp("dvae"))


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "python"), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"  # same arithmetic in every run
    return e


def cli(*args, ok=True, cwd=None):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], env=env(), cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    if ok:
        assert r.returncode == 0, f"{args[:1]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def train_cmd(run, data, steps, *extra):
    return ["dalle.train", "--run", run, "--data", data, "--preset", "micro", "--steps", steps, "--batch-size", 8,
            "--text-len", 16, "--bpe-vocab", 96, "--warmup", 5, "--log-every", 1, "--ckpt-every", 4,
            "--attn-backend", "torch", "--no-progress", "--n-sample-captions", 2, *extra]


def losses(run):
    with open(Path(run) / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"], r["loss_text"], r["loss_image"], r["grad_norm"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("kind", ["folder", "table", "shards"])
def test_encode_counts_every_broken_member(tmp_path, photo_sets, dvae_dir, kind):
    out = tmp_path / "tokens"
    r = cli("dalle.encode", "--data", photo_sets[kind], "--dvae", dvae_dir, "--out", out, "--heldout", 0.1,
            "--no-progress")
    m = json.loads((out / "manifest.json").read_text())
    n_pairs = len(photo_sets["pairs"]) + (photo_sets["whole_in_cut_shard"] if kind == "shards" else 0)
    assert m["samples"] == n_pairs, (m["samples"], m["skipped"], r.stdout)
    skipped = m["skipped"]
    if kind == "shards":
        n_shards = (len(photo_sets["pairs"]) + 19) // 20  # each with three broken members
        assert skipped.get("corrupt_image") == n_shards
        assert skipped.get("missing_caption") == n_shards
        assert skipped.get("empty_caption") == n_shards
        assert skipped.get("truncated_tar") == 1
    else:
        assert skipped.get("corrupt_image") == 2  # the non-image and the PNG cut in half
        assert skipped.get("empty_caption") == 1
        if kind == "folder":
            assert skipped.get("missing_caption") == 1
    assert 0 < m["heldout"] < m["samples"]
    from dalle.data.shards import TokenShards

    train, held = TokenShards(out, "train"), TokenShards(out, "heldout")
    assert len(train) + len(held) == n_pairs
    keys = [train.key(i) for i in range(len(train))] + [held.key(i) for i in range(len(held))]
    assert len(set(keys)) == n_pairs  # every pair once, none twice
    captions = dict(zip(keys, [train.caption(i) for i in range(len(train))] +
                        [held.caption(i) for i in range(len(held))]))
    for key, _, cap in photo_sets["pairs"]:  # keys name the pair: the folder's relative path or the tar key
        match = [k for k in captions if Path(k).stem == key or k == key]
        assert len(match) == 1 and captions[match[0]] == cap, (key, match)


def test_train_resume_generate_and_rerank_on_shards(tmp_path, photo_sets, dvae_dir):
    tokens = tmp_path / "tokens"
    cli("dalle.encode", "--data", photo_sets["shards"], "--dvae", dvae_dir, "--out", tokens, "--crops", 2,
        "--heldout", 0.1, "--no-progress")
    a, b = tmp_path / "a", tmp_path / "b"
    # b stops at step 10 (epochs of about 55 training pairs / 8: mid-epoch), then resumes to 20; the dVAE comes
    # from the shards' manifest
    cli(*train_cmd(b, tokens, 10))
    # a runs 20 steps uninterrupted on the same tokenized captions (the BPE-dropout encodings are drawn once
    # per run by the tokenizers library, whose RNG cannot be seeded; a run reuses its own when resumed)
    a.mkdir()
    for f in ("tokenizer.json", "text_tokens.npy", "text_tokens.json"):
        (a / f).write_bytes((b / f).read_bytes())
    cli(*train_cmd(a, tokens, 20))
    assert "preparing data" not in cli(*train_cmd(b, tokens, 20, "--resume")).stdout
    la, lb = losses(a), losses(b)
    assert len(la) == 20 and la == lb
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["train_config"]["data"] == str(tokens)
    # the tokenizer was trained on the photo captions
    tok = json.loads((a / "tokenizer.json").read_text())
    text = " ".join(c for _, _, c in photo_sets["pairs"])
    merged = [t.strip("\u2581") for t in tok["model"]["vocab"] if len(t.strip("\u2581")) >= 3 and t != "[UNK]"]
    assert merged and all(t in text for t in merged), merged

    out = tmp_path / "cat.png"
    cli("dalle.generate", "--run", a, "a ginger cat looking up", "-n", 2, "--out", out, "--top-k", 8)
    assert Image.open(out).size[0] > 0
    cli("dalle.rerank", "--run", a, "--steps", 5, "--no-progress")
    out2 = tmp_path / "cat_reranked.png"
    cli("dalle.generate", "--run", a, "a ginger cat looking up", "-n", 1, "--rerank", 2, "--out", out2)
    assert out2.is_file()


def test_train_refuses_codes_of_another_dvae(tmp_path, photo_sets, dvae_dir):
    from dalle.dvae import DVAE, DVAEConfig

    tokens = tmp_path / "tokens"
    cli("dalle.encode", "--data", photo_sets["folder"], "--dvae", dvae_dir, "--out", tokens, "--no-progress")
    torch.manual_seed(1)
    other = DVAE(DVAEConfig.tiny(image_size=16, n_hid=8, n_init=8, vocab_size=32)).save(tmp_path / "other")
    r = cli(*train_cmd(tmp_path / "run", tokens, 2, "--dvae", other), ok=False)
    assert r.returncode == 2 and "another dVAE" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    r = cli(*train_cmd(tmp_path / "run2", tmp_path / "nothing_here", 2), ok=False)
    assert r.returncode == 2 and "--data" in r.stderr, r.stderr


def test_pipeline_on_a_folder_with_a_given_dvae(tmp_path, photo_sets, dvae_dir):
    run = tmp_path / "run"
    r = cli("dalle.pipeline", "--run", run, "--data", photo_sets["folder"], "--dvae", dvae_dir, "--preset", "micro",
            "--steps", 12, "--batch-size", 8, "--text-len", 16, "--bpe-vocab", 96, "--warmup", 2,
            "--reranker-steps", 4, "--eval-captions", 3, "--rerank", 2, "--top-k", 8, "--heldout", 0.1,
            "--image-embedding", "table", "--attn-backend", "torch", "--no-progress")
    res = json.loads((run / "results.json").read_text())
    assert res["results"]["heldout_pairs"] > 0 and np.isfinite(res["results"]["heldout_loss_image"])
    for f in ("samples_heldout.png", "reconstructions_heldout.png", "model.safetensors", "tokenizer.json",
              "reranker/model.safetensors", "tokens/manifest.json"):
        assert (run / f).is_file(), (f, r.stdout)
