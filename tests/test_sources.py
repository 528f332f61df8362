"""Image/caption sources: folder, table and WebDataset tars; skip counting; unit split across ranks x workers."""
import hashlib
import io
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dalle.data.sources import Sample, is_heldout, open_source


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(w=20, h=18, seed=0, fmt="PNG"):
    b = io.BytesIO()
    picture(w, h, seed).save(b, fmt)
    return b.getvalue()


def add_member(t, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def write_tar(path, items, cut=None):
    """items: [(key, {suffix: bytes})]; ``cut``: keep only the first ``cut`` bytes (a truncated download)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for key, members in items:
            for suffix, data in members.items():
                add_member(t, f"{key}.{suffix}", data)
    data = buf.getvalue()
    path.write_bytes(data if cut is None else data[:cut])
    return path


def good(key, seed, fmt="png"):
    kind = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    return key, {fmt: png_bytes(20 + seed % 5, 18, seed, kind), "txt": f"picture number {key}".encode(),
                 "json": b'{"status": "success"}'}


def bad_items(prefix):
    """One of each kind of bad sample, and the reason each is counted under."""
    truncated = png_bytes(40, 40, 7)
    return [
        (f"{prefix}c", {"png": b"\x89PNG\r\n\x1a\n not really a png", "txt": b"a broken image"}),
        (f"{prefix}t", {"png": truncated[: len(truncated) // 2], "txt": b"a truncated picture"}),
        (f"{prefix}m", {"png": png_bytes(), "json": b"{}"}),
        (f"{prefix}e", {"png": png_bytes(), "txt": b"  \n "}),
        (f"{prefix}s", {"png": png_bytes(), "txt": b"word"}),
        (f"{prefix}w", {"png": png_bytes(60, 20), "txt": b"a very wide picture"}),
        (f"{prefix}n", {"txt": b"a caption without image"}),
        (f"{prefix}u", {"png": png_bytes(), "txt": b"\xff\xfe not utf8 \xc3"}),
    ], Counter(corrupt_image=2, missing_caption=1, empty_caption=1, short_caption=1, aspect=1, missing_image=1,
               unreadable_caption=1)


def read_all(src, **kw):
    skipped = Counter()
    out = list(src.samples(skipped=skipped, **kw))
    return out, skipped


def test_webdataset_pattern_reads_every_member_and_counts_skips(tmp_path):
    bad, reasons = bad_items("b")
    write_tar(tmp_path / "00000.tar", [good("00000_0", 0), good("00000_1", 1, "jpg")] + bad)
    write_tar(tmp_path / "00001.tar", [good("00001_0", 2, "webp"), good("00001_1", 3)])
    src = open_source(str(tmp_path / "{00000..00001}.tar"))
    assert src.kind == "webdataset" and src.units == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    samples, skipped = read_all(src)
    assert [s.key for s in samples] == ["00000_0", "00000_1", "00001_0", "00001_1"]
    assert skipped == reasons
    s = samples[0]
    assert isinstance(s, Sample) and s.image.mode == "RGB" and s.image.size == (20, 18)
    assert np.array_equal(np.asarray(s.image), np.asarray(picture(20, 18, 0)))  # PNG: lossless
    assert s.caption == "picture number 00000_0"
    # the same tars as a folder of tars, and one tar alone
    assert open_source(tmp_path).units == src.units
    one = open_source(tmp_path / "00001.tar")
    assert [x.key for x in one.samples()] == ["00001_0", "00001_1"]


@pytest.mark.parametrize("where", ["image", "caption", "json", "header", "between", "end_marker"])
def test_truncated_tar_is_counted_and_reading_goes_on(tmp_path, where):
    items = [good("a0", 0), good("a1", 1), good("a2", 2)]
    full = write_tar(tmp_path / "full.tar", items).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as t:
        m = {x.name: x for x in t.getmembers()}
    (tmp_path / "full.tar").unlink()
    member = {"image": "a2.png", "caption": "a2.txt", "json": "a2.json", "header": "a2.png", "between": "a2.txt",
              "end_marker": "a2.json"}[where]
    cut = {"header": m[member].offset + 100, "between": m[member].offset,  # cut after a2.png: no caption
           "end_marker": m[member].offset_data + 512}.get(where, m[member].offset_data + max(1, m[member].size // 2))
    (tmp_path / "00000.tar").write_bytes(full[:cut])
    write_tar(tmp_path / "00001.tar", [good("b0", 3)])
    src = open_source(tmp_path)
    assert len(src.units) == 2
    samples, skipped = read_all(src)
    keys = [s.key for s in samples]
    if where in ("json", "end_marker"):  # the sample's image and caption are whole: it is kept
        assert keys == ["a0", "a1", "a2", "b0"] and skipped == Counter(truncated_tar=1)
    else:
        assert keys == ["a0", "a1", "b0"] and skipped == Counter(truncated_tar=1)


def test_folder_and_table_kinds(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / ("sub" if i % 2 else "") / f"g{i}.png").write_bytes(png_bytes(seed=i))
        (root / ("sub" if i % 2 else "") / f"g{i}.txt").write_text(f"  a   picture {i}\n")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "corrupt.txt").write_text("a broken image")
    (root / "nocap.png").write_bytes(png_bytes())
    data = png_bytes(40, 40, 9)
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "trunc.txt").write_text("a truncated picture")
    (root / "empty.png").write_bytes(png_bytes())
    (root / "empty.txt").write_text(" ")
    src = open_source(root, chunk_size=3)
    # candidates in key order: corrupt empty g0 | g2 g4 nocap | sub/g1 sub/g3 trunc
    assert src.kind == "folder" and src.units == ["folder[0:3]", "folder[3:6]", "folder[6:9]"]
    samples, skipped = read_all(src)
    assert [s.key for s in samples] == ["g0", "g2", "g4", "sub/g1", "sub/g3"]  # keys: path without extension
    assert samples[0].caption == "a picture 0" and samples[0].image.mode == "RGB"
    assert skipped == Counter(corrupt_image=2, missing_caption=1, empty_caption=1)

    rows = ["path\tcaption"] + [f"imgs/g{i}.png\tthe picture {i}" for i in (0, 2)]
    rows += ["imgs/g0.png\tthe same file again", "imgs/gone.png\ta missing file", "lonely"]
    table = tmp_path / "pairs.tsv"
    table.write_text("\n".join(rows) + "\n")
    tab = open_source(table)
    assert tab.kind == "table" and tab.path == str(table)
    samples, skipped = read_all(tab)
    assert [s.key for s in samples] == ["imgs/g0", "imgs/g0#2", "imgs/g2"]
    assert skipped == Counter(missing_image=1, bad_row=1)


def test_every_sample_read_once_across_ranks_and_workers(tmp_path):
    for k in range(7):
        write_tar(tmp_path / f"{k:05d}.tar", [good(f"{k}_{j}", 10 * k + j) for j in range(k % 3 + 1)])
    src = open_source(str(tmp_path / "{00000..00006}.tar"))
    everything, _ = read_all(src)
    seen = []
    for world in (1, 2, 3):
        for workers in (1, 2):
            keys = [s.key for r in range(world) for w in range(workers)
                    for s in src.samples(rank=r, world=world, worker=w, num_workers=workers)]
            assert sorted(keys) == sorted(s.key for s in everything) and len(set(keys)) == len(keys)
            seen.append(keys)
    assert src.unit_indices(1, 2, 1, 2) == [3]  # slot rank * num_workers + worker of world * num_workers
    with pytest.raises(ValueError, match="rank"):
        list(src.samples(rank=2, world=2))
    with pytest.raises(ValueError, match="num_workers"):
        list(src.samples(num_workers=0))


def test_is_heldout_stable():
    keys = [f"{i:09d}" for i in range(4000)]
    held = [k for k in keys if is_heldout(k, 0.05)]
    assert 120 < len(held) < 280  # about 5 %
    # fixed by sha1, not by Python's per-process hash
    assert all(is_heldout(k, 0.05) == (int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) < 0.05 * 2**32)
               for k in keys[:200])
    assert not any(is_heldout(k, 0.0) for k in keys) and all(is_heldout(k, 1.0) for k in keys)
    assert set(held) <= {k for k in keys if is_heldout(k, 0.1)}  # a larger fraction contains a smaller one
    with pytest.raises(ValueError, match="fraction"):
        is_heldout("a", 1.5)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        open_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="missing"):
        open_source(str(tmp_path / "{00000..00002}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* and no .tar shards"):
        open_source(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"?")
    with pytest.raises(ValueError, match="cannot tell the kind"):
        open_source(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="chunk_size"):
        open_source(tmp_path, chunk_size=0)
    write_tar(tmp_path / "a.tar", [good("k", 0)])
    src = open_source(tmp_path / "a.tar")
    with pytest.raises(IndexError):
        list(src.iter_unit(1, Counter()))
