"""Real-data throughput: encoding a WebDataset source into token shards, and reading batches from the shards.

``encode``: ``dalle.encode.encode`` of img2dataset-style tars (random photos-sized-down images, PNG) with a
randomly initialised dVAE (``tiny`` at 32 px on CPU; the paper's 256 px on GPU): images/s of the whole path
(tar read, decode, transformer preprocessing, dVAE forward, shard writes). ``loader``: ``TokenShards`` random
batches of 64 (codes of a random crop + captions) from shards written directly: samples/s.
extra_info: the throughput, the sample count, and this process's resident memory (``rss_mb``, ``peak_rss_mb``)
after the timed runs.

    pytest benchmarks/bench_data.py --benchmark-json=out.json
"""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_kernels._bench import median_seconds, resident_memory_mb

SIZES = {"cpu": dict(dvae="tiny", images=48, side=48, batch=32), "cuda": dict(dvae="paper", images=512, side=320,
                                                                               batch=64)}


def _write_tars(root, n, side, per_tar=16, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for t in range(-(-n // per_tar)):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for j in range(min(per_tar, n - t * per_tar)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)).save(buf, "PNG")
                for suffix, data in (("png", buf.getvalue()), ("txt", f"a random picture {t} {j}".encode())):
                    info = tarfile.TarInfo(f"{t:05d}{j:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_encode_images_per_s(benchmark, record_env, bench_device, tmp_path):
    from dalle.dvae import DVAE, DVAEConfig
    from dalle.encode import EncodeConfig, encode

    size = SIZES[bench_device]
    torch.manual_seed(0)
    cfg = DVAEConfig.tiny() if size["dvae"] == "tiny" else DVAEConfig.paper()
    DVAE(cfg).save(tmp_path / "dvae")
    data = _write_tars(tmp_path / "tars", size["images"], size["side"])
    runs = iter(range(10**6))

    def fresh():  # every round encodes into a new folder (a done folder would be skipped)
        out = tmp_path / f"out{next(runs)}"
        return (EncodeConfig(data=str(data), dvae=str(tmp_path / "dvae"), out=str(out), batch_size=size["batch"],
                             device=bench_device, progress=False),), {"log": lambda *a: None}

    manifest = benchmark.pedantic(encode, setup=fresh, rounds=3, iterations=1)
    assert manifest["samples"] == size["images"]
    sec = median_seconds(benchmark)
    record_env.update(images=size["images"], images_per_s=None if sec is None else size["images"] / sec,
                      **resident_memory_mb())


def _write_shards(folder, n, per_shard, hw, crops):
    from dalle.data.shards import ShardWriter

    w, rng, shards = ShardWriter(folder), np.random.default_rng(0), []
    for k in range(-(-n // per_shard)):
        m = min(per_shard, n - k * per_shard)
        recs = [{"key": f"{k}/{j}", "caption": f"a caption of sample {k} {j}", "heldout": j % 50 == 0}
                for j in range(m)]
        w.write(k, rng.integers(0, 8192, (m, crops, hw), dtype=np.uint16), recs, {})
        shards.append({"name": f"shard-{k:05d}", "unit": str(k), "samples": m,
                       "heldout": sum(r["heldout"] for r in recs), "skipped": {}})
    g = int(hw ** 0.5)
    manifest = {"format": "dalle-token-shards", "version": 1, "source": "synthetic", "source_kind": "webdataset",
                "dvae": {"path": "", "digest": "0" * 16, "image_size": 8 * g, "grid": [g, g], "vocab_size": 8192},
                "crops": crops, "heldout_fraction": 0.02, "seed": 0, "shards": shards, "samples": n,
                "heldout": sum(s["heldout"] for s in shards), "skipped": {}, "complete": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_token_shards_loader_samples_per_s(benchmark, record_env, tmp_path):
    from dalle.data.shards import TokenShards

    n, batch = 20_000, 64
    _write_shards(tmp_path / "shards", n, per_shard=1000, hw=1024, crops=2)
    ds = TokenShards(tmp_path / "shards")
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(ds), (batch,), generator=g)
        codes = ds.codes(idx, torch.randint(0, ds.crops, (batch,), generator=g))
        return codes, [ds.caption(int(i)) for i in idx]

    codes, caps = benchmark(step)
    assert codes.shape == (batch, 1024) and len(caps) == batch
    sec = median_seconds(benchmark)
    record_env.update(samples=len(ds), batch=batch, samples_per_s=None if sec is None else batch / sec,
                      **resident_memory_mb())
