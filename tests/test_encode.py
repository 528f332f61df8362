"""python -m dalle.encode and the TokenShards reader: codes, manifest, resume, refusals, splits and crops."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle.data.shards import ShardWriter, TokenShards
from dalle.data.sources import is_heldout, open_source
from dalle.dvae import DVAE, DVAEConfig
from dalle.encode import EncodeConfig, EncodeError, encode, main, preprocess_crops
from dalle.runs import file_digest as _file_digest

from test_sources import bad_items, good, write_tar


def micro_dvae(path, seed=0):
    torch.manual_seed(seed)
    model = DVAE(DVAEConfig.tiny(image_size=16, n_hid=8, n_init=16, vocab_size=32))
    model.save(path)
    return model.eval()


@pytest.fixture
def tars(tmp_path):
    bad, _ = bad_items("z")
    root = tmp_path / "tars"
    root.mkdir()
    write_tar(root / "00000.tar", [good(f"0_{j}", j) for j in range(5)] + bad[:3])
    write_tar(root / "00001.tar", [good(f"1_{j}", 10 + j) for j in range(4)])
    write_tar(root / "00002.tar", [good(f"2_{j}", 20 + j) for j in range(6)] + bad[3:])
    return root


def run(tmp_path, data, out="shards", **kw):
    cfg = EncodeConfig(data=str(data), dvae=str(tmp_path / "dvae"), out=str(tmp_path / out), progress=False,
                       device="cpu", **{"batch_size": 4, "heldout": 0.3, **kw})
    return encode(cfg, log=lambda *a: None)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".")}


def test_codes_are_the_dvae_codes_of_the_preprocessed_images(tmp_path, tars):
    dvae = micro_dvae(tmp_path / "dvae")
    m = run(tmp_path, tars, crops=2, seed=3)
    src = open_source(tars)
    samples = list(src.samples())
    assert m["samples"] == len(samples) == 15
    ds = TokenShards(tmp_path / "shards", split="all")
    assert len(ds) == 15 and ds.grid == (4, 4) and ds.crops == 2 and ds.vocab_size == 32
    for i, s in enumerate(samples):
        want = dvae.encode(preprocess_crops(s.image, 16, 2, 3, s.key)).reshape(2, 16)
        for c in range(2):
            got = ds.codes(torch.tensor([i]), torch.tensor([c]))[0]
            assert torch.equal(got, want[c]), (i, c)
        assert ds.key(i) == s.key and ds.caption(i) == s.caption
    # the crops are random draws: two crops of one image, or one crop under another seed, differ
    a = preprocess_crops(samples[0].image, 16, 2, 3, "k")
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, preprocess_crops(samples[0].image, 16, 2, 4, "k"))


def test_manifest_contents(tmp_path, tars):
    micro_dvae(tmp_path / "dvae")
    m = run(tmp_path, tars)
    on_disk = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert on_disk == m
    assert m["format"] == "dalle-token-shards" and m["version"] == 1 and m["complete"] is True
    assert m["source"] == str(tars) and m["source_kind"] == "webdataset"
    assert m["dvae"] == {"path": str((tmp_path / "dvae").absolute()),
                         "digest": _file_digest(tmp_path / "dvae" / "model.safetensors"), "image_size": 16,
                         "grid": [4, 4], "vocab_size": 32}
    assert (m["crops"], m["heldout_fraction"], m["seed"]) == (1, 0.3, 0)
    _, reasons = bad_items("z")
    assert m["skipped"] == dict(sorted(reasons.items()))
    assert [s["name"] for s in m["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [s["samples"] for s in m["shards"]] == [5, 4, 6] and m["samples"] == 15
    keys = [k for s in range(3) for k in [json.loads(x)["key"] for x in
                                          (tmp_path / "shards" / f"shard-{s:05d}.jsonl").read_text().splitlines()]]
    assert m["heldout"] == sum(is_heldout(k, 0.3) for k in keys) and 0 < m["heldout"] < 15
    codes = np.load(tmp_path / "shards" / "shard-00002.codes.npy")
    assert codes.dtype == np.uint16 and codes.shape == (6, 1, 16)


def test_resume_equals_an_uninterrupted_run(tmp_path, tars, monkeypatch):
    micro_dvae(tmp_path / "dvae")
    run(tmp_path, tars, out="ref")
    ref = files(tmp_path / "ref")
    # a shard deleted after the run: the rerun remakes it
    (tmp_path / "ref" / "shard-00001.json").unlink()
    (tmp_path / "ref" / "shard-00001.codes.npy").unlink()
    run(tmp_path, tars, out="ref")
    assert files(tmp_path / "ref") == ref
    # a data file removed under a done mark, and a temporary file a kill left: remade, cleaned up
    (tmp_path / "ref" / "shard-00002.jsonl").unlink()
    (tmp_path / "ref" / ".shard-00000.codes.npy.abc.tmp").write_bytes(b"torn")
    run(tmp_path, tars, out="ref")
    assert files(tmp_path / "ref") == ref and not list((tmp_path / "ref").glob(".*"))
    # a kill after the first shard (before the manifest): rerun finishes, byte for byte the same
    import dalle.data.shards as shards

    real, calls = shards.ShardWriter.write, []

    def dying(self, index, *a, **kw):
        if calls:
            raise KeyboardInterrupt  # killed while working on the second unit
        calls.append(index)
        return real(self, index, *a, **kw)

    monkeypatch.setattr(shards.ShardWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tars, out="killed", workers=2)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(ValueError, match="no manifest.json.*dalle.encode"):
        TokenShards(tmp_path / "killed")
    monkeypatch.setattr(shards.ShardWriter, "write", real)
    done_before = sorted(p.name for p in (tmp_path / "killed").glob("shard-*.json"))
    assert len(done_before) == 1
    run(tmp_path, tars, out="killed", workers=2)
    assert files(tmp_path / "killed") == ref  # workers do not change a byte either


def test_other_settings_or_dvae_refused(tmp_path, tars):
    micro_dvae(tmp_path / "dvae")
    run(tmp_path, tars)
    with pytest.raises(EncodeError, match="crops: 1 in the folder, 2 asked"):
        run(tmp_path, tars, crops=2)
    micro_dvae(tmp_path / "dvae", seed=1)  # another dVAE in the same folder
    with pytest.raises(EncodeError, match="dVAE: the folder's codes are from dVAE"):
        run(tmp_path, tars)
    # an unfinished encode (killed before its manifest) with other settings is of no use: removed, with a line,
    # and this encode starts over: the result is a fresh run's, byte for byte
    (tmp_path / "shards" / "manifest.json").unlink()
    lines = []
    encode(EncodeConfig(data=str(tars), dvae=str(tmp_path / "dvae"), out=str(tmp_path / "shards"), progress=False,
                        device="cpu", batch_size=4, heldout=0.3), log=lines.append)
    assert "removing 3 shard(s) of an unfinished encode made with other settings (dVAE:" in lines[0]
    run(tmp_path, tars, out="fresh")
    assert files(tmp_path / "shards") == files(tmp_path / "fresh")


def test_no_usable_pair_is_a_clear_error(tmp_path):
    micro_dvae(tmp_path / "dvae")
    bad, _ = bad_items("x")
    write_tar(tmp_path / "00000.tar", bad)
    with pytest.raises(EncodeError, match=r"no usable image/caption pairs in .*00000.tar \(aspect: 1, corrupt_image"):
        run(tmp_path, tmp_path / "00000.tar")
    assert not (tmp_path / "shards").exists()  # nothing left behind that a later run would trip over
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.md").write_text("the user's file")
    with pytest.raises(EncodeError, match="nothing was written to"):
        run(tmp_path, tmp_path / "00000.tar", out="kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.md"]


def test_token_shards_reader_splits_crops_and_errors(tmp_path):
    """The reader on shards written directly: splits, crops, captions, LRU, and its refusals."""
    w = ShardWriter(tmp_path / "s")
    rng = np.random.default_rng(0)
    shards, all_codes, recs = [], [], []
    for k, n in enumerate([5, 0, 7, 3]):
        codes = rng.integers(0, 1000, (n, 3, 6), dtype=np.uint16)
        r = [{"key": f"{k}/{j}", "caption": f"caption {k} {j}", "heldout": bool((j + k) % 3 == 0)} for j in range(n)]
        if k == 3:
            r = [{**x, "heldout": True} for x in r]  # a shard all held out
        w.write(k, codes, r, {"name": f"shard-{k:05d}"})
        all_codes.append(codes)
        recs += r
        shards.append({"name": f"shard-{k:05d}", "unit": str(k), "samples": n,
                       "heldout": sum(x["heldout"] for x in r), "skipped": {}})
    codes = np.concatenate(all_codes)
    manifest = {"format": "dalle-token-shards", "version": 1, "source": "x", "source_kind": "webdataset",
                "dvae": {"path": "/d", "digest": "0" * 16, "image_size": 16, "grid": [2, 3], "vocab_size": 1000},
                "crops": 3, "heldout_fraction": 0.3, "seed": 0, "shards": shards, "samples": len(recs),
                "heldout": sum(x["heldout"] for x in recs), "skipped": {}, "complete": True}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    for split, want in (("all", range(len(recs))), ("train", [i for i, r in enumerate(recs) if not r["heldout"]]),
                        ("heldout", [i for i, r in enumerate(recs) if r["heldout"]])):
        ds = TokenShards(tmp_path / "s", split)
        want = list(want)
        assert len(ds) == len(want) and ds.grid == (2, 3) and ds.crops == 3 and ds.dvae_digest == "0" * 16
        idx = torch.randperm(len(ds))
        crop = torch.randint(0, 3, (len(ds),))
        got = ds.codes(idx, crop)
        exp = torch.from_numpy(codes[np.asarray(want)[idx.numpy()], crop.numpy()].astype(np.int64))
        assert got.dtype == torch.int64 and torch.equal(got, exp)
        assert torch.equal(ds.codes(idx), torch.from_numpy(codes[np.asarray(want)[idx.numpy()], 0].astype(np.int64)))
        assert list(ds.iter_captions()) == [recs[i]["caption"] for i in want]
        assert [ds.key(i) for i in range(len(ds))] == [recs[i]["key"] for i in want]
    ds = TokenShards(tmp_path / "s")
    with pytest.raises(IndexError):
        ds.codes(torch.tensor([len(ds)]))
    with pytest.raises(ValueError, match="crop must be in"):
        ds.codes(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(TypeError, match="idx"):
        ds.codes(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="split"):
        TokenShards(tmp_path / "s", "test")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="incomplete; finish it with .*dalle.encode"):
        TokenShards(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(ValueError, match="version 2"):
        TokenShards(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "s" / "shard-00002.codes.npy").unlink()
    with pytest.raises(ValueError, match="shard-00002.codes.npy is missing"):
        TokenShards(tmp_path / "s")


def test_cli_bad_arguments_exit_2(tmp_path, tars, capsys):
    micro_dvae(tmp_path / "dvae")
    ok = ["--data", str(tars), "--dvae", str(tmp_path / "dvae"), "--out", str(tmp_path / "o")]
    cases = [
        (["--data", str(tmp_path / "nope"), *ok[2:]], "--data: no such file or folder"),
        ([*ok[:2], "--dvae", str(tmp_path), *ok[4:]], "--dvae: .* holds no model.safetensors"),
        ([*ok, "--crops", "0"], "--crops"),
        ([*ok, "--heldout", "1"], "--heldout"),
        ([*ok, "--device", "tpu"], "--device"),
        (ok[:4], "--out"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(msg, err), err
    assert not (tmp_path / "o").exists()  # nothing written by a bad command
    bad, _ = bad_items("x")
    write_tar(tmp_path / "bad.tar", bad)
    r = subprocess.run([sys.executable, "-m", "dalle.encode", "--data", str(tmp_path / "bad.tar"), "--dvae",
                        str(tmp_path / "dvae"), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no usable image/caption pairs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_torchrun_two_ranks_write_the_same_shards(tmp_path, tars):
    """Two CPU ranks (gloo) split the units; the folder equals a one-process run's, byte for byte."""
    micro_dvae(tmp_path / "dvae")
    run(tmp_path, tars, out="one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle.encode", "--data", str(tars), "--dvae", str(tmp_path / "dvae"), "--out",
           str(tmp_path / "two"), "--device", "cpu", "--no-progress", "--batch-size", "4", "--heldout", "0.3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert files(tmp_path / "two") == files(tmp_path / "one")
