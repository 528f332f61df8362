"""End-to-end at micro size: dVAE -> transformer -> reranker -> sampling -> scorer, through the pipeline's entry point."""
import json
import shutil

import pytest
import torch

from PIL import Image

from dalle.data.shapes import ShapesDataset
from dalle.generate import load_run, main as generate, sample_captions
from dalle.pipeline import main
from dalle.rerank import Reranker, main as rerank


def test_pipeline_micro_run(tmp_path, capsys):
    run = tmp_path / "demo"
    args = ["--run", str(run), "--dvae-steps", "2", "--dvae-images", "32", "--dvae-eval-images", "8",
            "--steps", "6", "--preset", "micro", "--dataset-size", "32", "--batch-size", "8",
            "--text-len", "16", "--eval-captions", "2", "--rerank", "2", "--reranker-steps", "3",
            "--attn-backend", "torch", "--no-progress"]
    summary = main(args)
    out = capsys.readouterr().out
    assert "held" in out and "total" in out
    for name in ("dvae/model.safetensors", "dvae/config.json", "model.safetensors", "config.json", "dcp/step_00000006/manifest.json",
                 "tokenizer.json", "metrics.csv", "reranker/model.safetensors", "reranker/config.json",
                 "samples_train.png", "samples_heldout.png", "results.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["accuracy"].keys() == {"train", "heldout"}
    for split in ("train", "heldout"):
        r = summary["accuracy"][split]
        assert r["captions"] == 2 and r["candidates_per_caption"] == 2
        assert 0.0 <= r["acc_single"] <= r["acc_best_of_2"] <= 1.0
        assert 0.0 <= r["acc_reranked"] <= r["acc_best_of_2"]  # the reranker picks one of the same candidates
        assert r["acc_real_images"] == 1.0  # the scorer reads the dataset's own renders
    assert summary["final_losses_last_100_steps"]["loss"] > 0
    model, tok, dvae = load_run(run)
    assert model.cfg.code_features == dvae.code_features().shape[1]  # the pipeline's default image embedding
    # reranked sampling keeps the candidate the reranker scores highest among the same draws
    reranker = Reranker.load(run / "reranker")
    caps = ["a red circle above a blue square", "a green triangle"]
    draw = dict(temperature=1.0, top_k=4)
    cand = sample_captions(model, tok, dvae, caps, n=3, generator=torch.Generator().manual_seed(5), **draw)
    kept = sample_captions(model, tok, dvae, caps, n=1, rerank=3, reranker=reranker,
                           generator=torch.Generator().manual_seed(5), **draw)
    for c, k, cap in zip(cand, kept, caps):
        s = reranker.score(c, [tok.encode(cap)] * 3)
        torch.testing.assert_close(k[0], c[int(s.argmax())])
    # the sampling CLI on the same run: reranked grid, then image-prompt completion from a PNG
    out = tmp_path / "gen.png"
    generate(["--run", str(run), "a red circle above a blue square", "a green triangle", "-n", "2",
              "--rerank", "2", "--top-k", "4", "--guidance", "1.5", "--out", str(out)])
    assert Image.open(out).size[0] > 0
    for rank_by in ("reranker", "scorer"):
        generate(["--run", str(run), "a green triangle", "-n", "1", "--rerank", "2", "--rank-by", rank_by,
                  "--out", str(tmp_path / f"{rank_by}.png")])
        assert (tmp_path / f"{rank_by}.png").is_file()
    shutil.rmtree(run / "reranker")
    with pytest.raises(SystemExit):  # asked for a reranker the run does not have
        generate(["--run", str(run), "a green triangle", "--rerank", "2", "--rank-by", "reranker"])
    assert "python -m dalle.rerank" in capsys.readouterr().err
    rerank(["--run", str(run), "--steps", "2", "--no-progress"])  # the command that error names
    assert (run / "reranker" / "model.safetensors").is_file()
    generate(["--run", str(run), "a green triangle", "-n", "1", "--rerank", "2", "--rank-by", "reranker",
              "--out", str(out)])
    prompt = tmp_path / "prompt.png"
    Image.fromarray(ShapesDataset("train", size=1)[0][0].permute(1, 2, 0).numpy()).save(prompt)
    generate(["--run", str(run), "a red square", "-n", "1", "--prompt-image", str(prompt), "--prompt-rows", "2",
              "--out", str(tmp_path / "completed.png")])
    assert (tmp_path / "completed.png").is_file()
    # a second call reuses a current reranker and trains again one written by an earlier version
    main(args + ["--resume"])
    assert "reranker: reusing" in capsys.readouterr().out
    config = json.loads((run / "reranker" / "config.json").read_text())
    del config["format"]  # as the single-pathway reranker saved it
    (run / "reranker" / "config.json").write_text(json.dumps(config))
    main(args + ["--resume"])
    out = capsys.readouterr().out
    assert "earlier version" in out and "reranker: 3 steps on the training pairs" in out
    Reranker.load(run / "reranker")


def _comparable(run):
    """results.json less what a repeat may change: the wall-clock times and the run folder's name."""
    saved = json.loads((run / "results.json").read_text())
    del saved["times"]
    del saved["settings"]["run"]
    return saved


def test_pipeline_is_deterministic(tmp_path):
    """The same command and seed give the same results.json, every accuracy and loss (BPE dropout included:
    its encodings are drawn from the run's seed); another seed gives another run."""
    args = ["--dvae-steps", "4", "--dvae-images", "64", "--dvae-eval-images", "8", "--steps", "8",
            "--preset", "micro", "--dataset-size", "48", "--batch-size", "8", "--text-len", "16",
            "--eval-captions", "3", "--rerank", "2", "--reranker-steps", "3", "--attn-backend", "torch",
            "--no-progress"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        main(["--run", str(tmp_path / name), "--seed", str(seed), *args])
    a, b, c = (_comparable(tmp_path / n) for n in "abc")
    assert a == b
    del c["settings"]["seed"]
    del a["settings"]["seed"]
    assert a != c and a["final_losses_last_100_steps"] != c["final_losses_last_100_steps"]
    # the BPE-dropout encodings, the transformer's and the dVAE's weights are equal too
    cache = [torch.load(tmp_path / n / "data_cache.pt", weights_only=True) for n in "ab"]
    assert torch.equal(cache[0]["text"], cache[1]["text"]) and cache[0]["text"].shape[0] > 1
    assert not torch.equal(cache[0]["text"][1], cache[0]["text"][0])  # the dropout variants differ from the clean
    for f in ("model.safetensors", "dvae/model.safetensors", "reranker/model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
