"""What a data file holds can make a sample unusable, never the command wrong: repeated or conflicting members,
keys with dots, captions in an encoding we cannot detect, a source that changed under a resume, a failed run's
output, and token-shard files whose sizes do not add up. Every file is built here."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle.data.folder import MAX_CAPTION_BYTES, ImageCaptionDataset, heldout_split
from dalle.data.shards import ShardError, ShardWriter, TokenShards
from dalle.data.sources import is_heldout, open_source
from dalle.encode import EncodeConfig, encode

from test_encode import files, micro_dvae
from test_sources import add_member, png_bytes


def tar_of(path, members):
    """A tar of ``members`` [(name, bytes)] in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            add_member(t, name, data)
    path.write_bytes(buf.getvalue())
    return path


def read(src):
    skipped = Counter()
    return [(s.key, s.caption) for s in src.samples(skipped=skipped)], skipped


def encode_to(tmp_path, data, out, log=None, **kw):
    cfg = EncodeConfig(data=str(data), dvae=str(tmp_path / "dvae"), out=str(tmp_path / out), progress=False,
                       device="cpu", **{"batch_size": 4, **kw})
    return encode(cfg, log=(log.append if log is not None else lambda *a: None))


def shard_keys(folder):
    return [json.loads(line)["key"] for p in sorted(Path(folder).glob("shard-*.jsonl"))
            for line in p.read_text().splitlines()]


IMG = png_bytes(20, 18, 1)


def test_repeated_or_conflicting_members_are_counted_and_the_rest_of_the_tar_is_read(tmp_path):
    members = [("a.jpg", IMG), ("a.txt", b"the first picture"),
               ("b.jpg", IMG), ("b.jpg", IMG), ("b.txt", b"an image member twice"),
               ("c.jpg", IMG), ("c.JPG", IMG), ("c.txt", b"the same member in two cases"),
               ("d.jpg", IMG), ("d.txt", b"a caption twice"), ("d.txt", b"a caption twice"),
               ("e.jpg", IMG), ("e.png", IMG), ("e.txt", b"two images for one caption"),
               ("f.jpg", IMG), ("f.txt", b"a sample in two places"), ("g.jpg", IMG),
               ("g.txt", b"the next picture"), ("f.json", b"{}"), ("h.jpg", IMG), ("h.txt", b"after every bad one")]
    tar = tar_of(tmp_path / "00000.tar", members)
    got, skipped = read(open_source(tar))
    assert [k for k, _ in got] == ["a", "f", "g", "h"]
    assert skipped == Counter(repeated_member=3, conflicting_member=1, repeated_key=1)
    # encode counts them too, and every good sample is in the shards
    micro_dvae(tmp_path / "dvae")
    m = encode_to(tmp_path, tar, "tok")
    assert m["samples"] == 4 and m["skipped"] == {"conflicting_member": 1, "repeated_key": 1, "repeated_member": 3}
    assert shard_keys(tmp_path / "tok") == ["a", "f", "g", "h"]


def test_folder_table_and_tar_agree_on_keys(tmp_path):
    """The key rule: the name without its last extension, in every reader (photo.v2.jpg + photo.v2.txt)."""
    pics = {"photo.v2": png_bytes(20, 18, 2), "plain": png_bytes(20, 18, 3), "sub/x.y.z": png_bytes(20, 18, 4)}
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    members = []
    for key, data in pics.items():
        (folder / f"{key}.jpg").write_bytes(data)
        (folder / f"{key}.txt").write_text(f"the caption of {key}")
        members += [(f"{key}.jpg", data), (f"{key}.txt", f"the caption of {key}".encode())]
    table = tmp_path / "pairs.tsv"
    table.write_text("".join(f"imgs/{k}.jpg\tthe caption of {k}\n" for k in pics))
    tar = tar_of(tmp_path / "00000.tar", members)
    want = sorted((k, f"the caption of {k}") for k in pics)
    assert sorted(read(open_source(folder))[0]) == want
    assert sorted(read(open_source(tar))[0]) == want
    assert sorted(read(open_source(table))[0]) == [(f"imgs/{k}", c) for k, c in want]
    assert sorted(ImageCaptionDataset(folder, image_size=8).keys) == sorted(pics)
    # a folder's a.jpg + a.png (+ a.txt), b.jpg + b.JPG are one sample each with a conflicting / repeated member
    (folder / "a.jpg").write_bytes(IMG)
    (folder / "a.png").write_bytes(IMG)
    (folder / "a.txt").write_text("two images one caption")
    (folder / "b.jpg").write_bytes(IMG)
    (folder / "b.JPG").write_bytes(IMG)
    (folder / "b.txt").write_text("one image in two cases")
    got, skipped = read(open_source(folder))
    assert sorted(got) == want and skipped == Counter(conflicting_member=1, repeated_member=1)
    ds = ImageCaptionDataset(folder, image_size=8)
    assert sorted(ds.keys) == sorted(pics) and ds.skipped == Counter(conflicting_member=1, repeated_member=1)


def test_undecodable_captions_are_counted_in_every_reader(tmp_path):
    captions = {"utf16_no_bom": "a caption in utf sixteen".encode("utf-16-le"),  # decodes as UTF-8: NULs
                "latin1": "a caf\xe9 in latin one".encode("latin-1"),
                "nul": b"a caption\x00 with a nul",
                "huge": b"word " * (MAX_CAPTION_BYTES // 5 + 1),
                "utf32_bom": "a caption in utf thirty two".encode("utf-32"),
                "utf8_bom": "\ufeffa caption with its mark".encode("utf-8"),
                "good": b"a plain caption here"}
    folder = tmp_path / "imgs"
    folder.mkdir()
    members = []
    for key, raw in captions.items():
        (folder / f"{key}.png").write_bytes(IMG)
        (folder / f"{key}.txt").write_bytes(raw)
        members += [(f"{key}.png", IMG), (f"{key}.txt", raw)]
    tar = tar_of(tmp_path / "00000.tar", members)
    want = [("good", "a plain caption here"), ("utf32_bom", "a caption in utf thirty two"),
            ("utf8_bom", "a caption with its mark")]
    counts = Counter(unreadable_caption=3, caption_too_large=1)
    for src in (open_source(folder), open_source(tar)):
        got, skipped = read(src)
        assert sorted(got) == want and skipped == counts
        assert not any("\x00" in c or "\ufffd" in c for _, c in got)
    ds = ImageCaptionDataset(folder, image_size=8)
    assert sorted(ds.keys) == [k for k, _ in want] and ds.skipped == counts
    # a table: a row whose bytes are not UTF-8 is counted, a field over csv's limit is a bad row, the rest is read
    table = tmp_path / "pairs.tsv"
    table.write_bytes(b"imgs/good.png\ta plain caption here\n"
                      b"imgs/latin1.png\ta caf\xe9 in latin one\n"
                      b"imgs/nul.png\ta caption\x00 with a nul\n"
                      b"imgs/huge.png\t" + b"w" * 200_000 + b"\n"
                      b"imgs/utf8_bom.png\tthe last row is read\n")
    got, skipped = read(open_source(table))
    assert sorted(got) == [("imgs/good", "a plain caption here"), ("imgs/utf8_bom", "the last row is read")]
    assert skipped == Counter(unreadable_caption=2, bad_row=1)
    t = ImageCaptionDataset(table, image_size=8)
    assert t.keys == ["imgs/good", "imgs/utf8_bom"] and t.skipped == skipped


def test_images_past_the_budgets_are_counted_not_read(tmp_path, monkeypatch):
    """An image file over MAX_IMAGE_BYTES is not read past it; one with more pixels than PIL's decompression-bomb
    limit is not decoded: both image_too_large, in the folder and tar readers (and the dVAE trainer's)."""
    import dalle.data.sources as sources
    from PIL import Image

    big, small = png_bytes(40, 36, 5), png_bytes(8, 8, 6)
    folder = tmp_path / "imgs"
    folder.mkdir()
    members = []
    for key, data in (("big", big), ("small", small)):
        (folder / f"{key}.png").write_bytes(data)
        (folder / f"{key}.txt").write_text(f"a {key} picture")
        members += [(f"{key}.png", data), (f"{key}.txt", f"a {key} picture".encode())]
    tar = tar_of(tmp_path / "00000.tar", members)
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", len(small))
    for src in (open_source(folder), open_source(tar)):
        got, skipped = read(src)
        assert got == [("small", "a small picture")] and skipped == Counter(image_too_large=1)
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8 * 8)  # PIL refuses over twice this: 40 x 36 is
    for src in (open_source(folder), open_source(tar)):
        got, skipped = read(src)
        assert got == [("small", "a small picture")] and skipped == Counter(image_too_large=1)
    ds = ImageCaptionDataset(folder, image_size=8)
    assert ds.keys == ["small"] and ds.skipped == Counter(image_too_large=1)


def test_one_heldout_rule_for_encode_and_the_dvae_trainer(tmp_path):
    """40 pairs at the default share: encode and train_dvae's reader hold out the same keys (here: none)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        (folder / f"img{i:03d}.png").write_bytes(png_bytes(20, 18, i))
        (folder / f"img{i:03d}.txt").write_text(f"picture number {i}")
    micro_dvae(tmp_path / "dvae")
    for share in (0.02, 0.3):
        m = encode_to(tmp_path, folder, f"tok{share}", heldout=share, chunk_size=16)
        ds = ImageCaptionDataset(folder, image_size=8)
        _, held = heldout_split(ds.keys, share)
        held_keys = {ds.keys[i] for i in held}
        shards = TokenShards(tmp_path / f"tok{share}", "heldout")
        assert {shards.key(i) for i in range(len(shards))} == held_keys
        assert m["heldout"] == len(held_keys) == sum(is_heldout(k, share) for k in ds.keys)
        assert (len(held_keys) == 0) == (share == 0.02)  # these 40 keys: none under 0.02, some under 0.3


def test_resume_over_a_changed_source_never_duplicates_or_drops(tmp_path, monkeypatch):
    import dalle.data.shards as shards

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(1, 6):
        (folder / f"p{i}.png").write_bytes(png_bytes(20, 18, i))
        (folder / f"p{i}.txt").write_text(f"picture number {i}")
    micro_dvae(tmp_path / "dvae")
    real, calls = shards.ShardWriter.write, []

    def dying(self, index, *a, **kw):
        if calls:
            raise KeyboardInterrupt  # killed while writing the second shard
        calls.append(index)
        return real(self, index, *a, **kw)

    monkeypatch.setattr(shards.ShardWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        encode_to(tmp_path, folder, "tok", chunk_size=2)
    monkeypatch.setattr(shards.ShardWriter, "write", real)
    assert shard_keys(tmp_path / "tok") == ["p1", "p2"]
    # a pair whose name sorts first is added: every chunk moves by one
    (folder / "p0.png").write_bytes(png_bytes(20, 18, 0))
    (folder / "p0.txt").write_text("picture number 0")
    lines = []
    m = encode_to(tmp_path, folder, "tok", log=lines, chunk_size=2)
    assert shard_keys(tmp_path / "tok") == [f"p{i}" for i in range(6)] and m["samples"] == 6
    assert "shard-00000 was written from another folder[0:2] (1 added ('p0'); 1 removed ('p2')); encoding it " \
           "again" in lines[0]
    encode_to(tmp_path, folder, "fresh", chunk_size=2)
    assert files(tmp_path / "tok") == files(tmp_path / "fresh")  # the same bytes as an encode from scratch
    # a caption edited in place: its shard is encoded again, the others kept; a rerun on nothing new keeps all
    (folder / "p3.txt").write_text("picture number three")
    lines = []
    encode_to(tmp_path, folder, "tok", log=lines, chunk_size=2)
    changed = [x for x in lines if "encoding it again" in x]
    assert len(changed) == 1 and "shard-00001" in changed[0] and "1 changed ('p3')" in changed[0]
    assert "encoded 2 images" in lines[1]  # the one shard, not the others
    assert TokenShards(tmp_path / "tok", "all").caption(3) == "picture number three"
    lines = []
    encode_to(tmp_path, folder, "tok", log=lines, chunk_size=2)
    assert len(lines) == 1 and "6 usable samples" in lines[0]  # nothing encoded
    # the source shrinks: the shard of a unit it no longer has is removed, with a line
    for i in (4, 5):
        (folder / f"p{i}.png").unlink()
        (folder / f"p{i}.txt").unlink()
    lines = []
    m = encode_to(tmp_path, folder, "tok", log=lines, chunk_size=2)
    assert "removing the shard(s) of the units beyond them (shard-00002)" in lines[0]
    assert shard_keys(tmp_path / "tok") == ["p0", "p1", "p2", "p3"] and m["samples"] == 4
    assert not (tmp_path / "tok" / "shard-00002.codes.npy").exists()
    assert len(TokenShards(tmp_path / "tok", "all")) == 4


def _shards(folder, n=3, crops=2, grid=(2, 2), vocab=50):
    w = ShardWriter(folder)
    codes = np.random.default_rng(0).integers(0, vocab, (n, crops, grid[0] * grid[1]), dtype=np.uint16)
    recs = [{"key": f"k{j}", "caption": f"caption {j}", "heldout": j == 0} for j in range(n)]
    w.write(0, codes, recs, {"name": "shard-00000"})
    m = {"format": "dalle-token-shards", "version": 1, "source": "x", "source_kind": "folder",
         "dvae": {"path": "/d", "digest": "0" * 16, "image_size": 8, "grid": list(grid), "vocab_size": vocab},
         "crops": crops, "heldout_fraction": 0.3, "seed": 0,
         "shards": [{"name": "shard-00000", "unit": "u", "samples": n, "heldout": 1, "skipped": {}}],
         "samples": n, "heldout": 1, "skipped": {}, "complete": True}
    (folder / "manifest.json").write_text(json.dumps(m))
    return m, codes


def _npy(path, arr, fortran=False):
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": fortran, "shape": arr.shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.asfortranarray(arr).tobytes("F") if fortran else arr.tobytes())


def test_token_shard_reader_checks_every_size_against_the_file(tmp_path):
    folder = tmp_path / "s"
    m, codes = _shards(folder)
    ds = TokenShards(folder, "all")
    assert torch.equal(ds.codes(torch.arange(3)), torch.from_numpy(codes[:, 0].astype(np.int64)))
    npy = folder / "shard-00000.codes.npy"
    good_npy = npy.read_bytes()

    def manifest(**change):
        shard = {**m["shards"][0], **change.pop("shard", {})}
        (folder / "manifest.json").write_text(json.dumps({**m, "shards": [shard], **change}))

    for change, msg in [
            (dict(shard={"name": "../s/shard-00000"}), r"shards\[0\].name is '../s/shard-00000'"),
            (dict(shard={"samples": -1}), r"samples is -1, expected an int in \[0,"),
            (dict(shard={"samples": True}), "samples is True"),
            (dict(shard={"heldout": 4}), r"heldout is 4, expected an int in \[0, 3\]"),
            (dict(dvae={**m["dvae"], "grid": [2]}), r"dvae.grid is \[2\], expected \[h, w\]"),
            (dict(dvae={**m["dvae"], "vocab_size": 70000}), "dvae.vocab_size is 70000"),
            (dict(crops=0), "crops is 0"),
            (dict(shards={"name": "shard-00000"}), "shards is dict, expected a list"),
            (dict(samples=4), "samples is 4, its shards hold 3"),
            (dict(shard={"samples": 4}, samples=4), r"shape \(3, 2, 4\), the manifest says \(4, 2, 4\)")]:
        manifest(**change)
        with pytest.raises(ShardError, match=msg):
            TokenShards(folder, "all")
    manifest()
    arr = np.load(io.BytesIO(good_npy))
    for write, msg in [
            (lambda: _npy(npy, arr.astype(">u2")), "dtype >u2, expected <u2"),
            (lambda: _npy(npy, arr.astype(np.int64)), "dtype <i8"),
            (lambda: _npy(npy, arr, fortran=True), "fortran_order True"),
            (lambda: npy.write_bytes(good_npy[:-2]), r"\d+ bytes, its header says \d+"),
            (lambda: npy.write_bytes(good_npy + b"\0\0"), r"\d+ bytes, its header says \d+"),
            (lambda: npy.write_bytes(b"\x93NUMPY\x03\x00" + good_npy[8:]), "format version 3.0"),
            (lambda: npy.write_bytes(b"not an npy file at all"), "not a readable .npy header")]:
        write()
        with pytest.raises(ShardError, match=msg) as e:
            TokenShards(folder, "all")
        assert "shard-00000.codes.npy" in str(e.value) and "\n" not in str(e.value)
    npy.write_bytes(good_npy)
    # the jsonl: as many well-formed lines as the entry says, checked when first read
    jsonl = folder / "shard-00000.jsonl"
    good_lines = jsonl.read_bytes()
    for data, msg in [(good_lines.split(b"\n", 1)[1], "2 lines, the manifest says 3 samples"),
                      (good_lines[:-1], "2 lines and a cut one"),
                      (good_lines.replace(b'"caption 1"', b'17'), "line 2: not a record")]:
        jsonl.write_bytes(data)
        with pytest.raises(ShardError, match=msg):
            ds = TokenShards(folder, "all")  # the mixed shard's flags are read here for the splits
            [ds.caption(i) for i in range(3)]
        with pytest.raises(ShardError, match=msg):
            TokenShards(folder, "train")
    jsonl.write_bytes(good_lines)
    # a code at or above the vocabulary is refused when read
    bad = arr.copy()
    bad[1, 0, 0] = 50
    _npy(npy, bad)
    ds = TokenShards(folder, "all")
    assert ds.codes(torch.tensor([0])).shape == (1, 4)
    with pytest.raises(ShardError, match="code 50, the manifest's dvae.vocab_size is 50"):
        ds.codes(torch.tensor([1]))


def test_a_table_caption_over_the_budget_is_skipped_as_from_a_file(tmp_path):
    """Captions from a table meet the same 64 KiB budget as caption files and tar members."""
    from dalle.data.folder import MAX_CAPTION_BYTES, _pairs_from_table

    table = tmp_path / "t.tsv"
    table.write_text("a.png\ta red circle\nb.png\t" + "w" * (MAX_CAPTION_BYTES + 1) + "\nc.png\ta blue square\n")
    pairs, skipped = _pairs_from_table(table)
    assert [p.key for p in pairs] == ["a", "c"] and dict(skipped) == {"caption_too_large": 1}
