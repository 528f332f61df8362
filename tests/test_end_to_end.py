"""End-to-end at micro size: dVAE -> transformer -> sampling -> scorer, through the pipeline's entry point."""
import json

from PIL import Image

from dalle.data.shapes import ShapesDataset
from dalle.generate import load_run, main as generate
from dalle.pipeline import main


def test_pipeline_micro_run(tmp_path, capsys):
    run = tmp_path / "demo"
    summary = main(["--run", str(run), "--dvae-steps", "2", "--dvae-images", "32", "--dvae-eval-images", "8",
                    "--steps", "6", "--preset", "micro", "--dataset-size", "32", "--batch-size", "8",
                    "--text-len", "16", "--eval-captions", "2", "--rerank", "2", "--attn-backend", "torch",
                    "--no-progress"])
    out = capsys.readouterr().out
    assert "held" in out and "total" in out
    for name in ("dvae/dvae.pt", "dalle.pt", "checkpoint.pt", "tokenizer.json", "metrics.csv",
                 "samples_train.png", "samples_heldout.png", "results.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["accuracy"].keys() == {"train", "heldout"}
    for split in ("train", "heldout"):
        r = summary["accuracy"][split]
        assert r["captions"] == 2 and r["candidates_per_caption"] == 2
        assert 0.0 <= r["acc_single"] <= r["acc_best_of_2"] <= 1.0
        assert r["acc_real_images"] == 1.0  # the scorer reads the dataset's own renders
    assert summary["final_losses_last_100_steps"]["loss"] > 0
    model, _, dvae = load_run(run)
    assert model.cfg.code_features == dvae.code_features().shape[1]  # the pipeline's default image embedding
    # the sampling CLI on the same run: reranked grid, then image-prompt completion from a PNG
    out = tmp_path / "gen.png"
    generate(["--run", str(run), "a red circle above a blue square", "a green triangle", "-n", "2",
              "--rerank", "2", "--top-k", "4", "--guidance", "1.5", "--out", str(out)])
    assert Image.open(out).size[0] > 0
    prompt = tmp_path / "prompt.png"
    Image.fromarray(ShapesDataset("train", size=1)[0][0].permute(1, 2, 0).numpy()).save(prompt)
    generate(["--run", str(run), "a red square", "-n", "1", "--prompt-image", str(prompt), "--prompt-rows", "2",
              "--out", str(tmp_path / "completed.png")])
    assert (tmp_path / "completed.png").is_file()
