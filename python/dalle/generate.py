"""Generate images from captions with a trained run and write a PNG grid.

    python -m dalle.generate --run runs/demo "a red circle above a blue square" -n 8
    python -m dalle.generate --run runs/demo "a green triangle" -n 4 --rerank 8     # best 4 of 32 (reranker)
    python -m dalle.generate --run runs/demo "a red square" --prompt-image img.png --prompt-rows 3

Sampling uses the key/value cache of ``dalle.sampling`` (temperature, top-k, top-p, ``--guidance`` for
classifier-free guidance). ``--rerank K`` draws ``K`` candidates per requested image and keeps the best:
by the run's learned reranker (``RUN/reranker/``, ``dalle.rerank``; the paper's CLIP step) when it has
one, else (or with ``--rank-by scorer``) those the built-in dataset's deterministic scorer accepts (captions
it cannot parse are then not reranked). ``--prompt-image`` completes an image from its first rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .common import pick_device, pretrained_files
from .sampling import generate_images


def load_run(run, device="cpu"):
    """``(model, tokenizer, dvae)`` of a trained run directory."""
    from .tokenizer import CaptionTokenizer
    from .train import load_dvae, load_run_model

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {run}")
    model, ckpt = load_run_model(run, device)
    tok = CaptionTokenizer.load(run / "tokenizer.json")
    return model, tok, load_dvae(run_dvae_path(run, ckpt), device)


def run_dvae_path(run, ckpt) -> Path:
    """The dVAE folder a run's checkpoint ``ckpt`` was trained with, or ``RUN/dvae`` (the pipeline's) when the
    run folder was moved."""
    run = Path(run)
    dvae_path = Path(ckpt.get("dvae") or run / "dvae")
    if not pretrained_files(dvae_path)[0].is_file() and pretrained_files(run / "dvae")[0].is_file():
        dvae_path = run / "dvae"
    return dvae_path


def scene_of(caption: str):
    """The scene a built-in-dataset caption describes, or None when the scorer cannot parse it."""
    from .data.shapes import parse_caption

    return parse_caption(caption.lower())


def rank_by_scorer(images, scene) -> list[int]:
    """Candidate order: images the scorer accepts for ``scene`` first, each group in draw order."""
    from .data.shapes import matches

    ok = [bool(matches(im, scene)) for im in images]
    return sorted(range(len(images)), key=lambda i: (not ok[i], i))


@torch.no_grad()
def sample_captions(model, tok, dvae, captions, n=1, rerank=1, temperature=1.0, top_k=None, top_p=None,
                    image_prefix=None, generator=None, batch_size=64, guidance=1.0, reranker=None):
    """Images ``(len(captions), n, 3, S, S)`` in [0, 1] for each caption.

    ``rerank > 1``: draw ``n * rerank`` candidates per caption and keep the ``n`` best: by ``reranker``
    (a ``dalle.rerank.Reranker``) when given, else by the built-in dataset's scorer.
    ``image_prefix``: ``(h_rows * W,)`` tokens shared by every sample (image-prompt completion).
    ``guidance``: classifier-free guidance scale (``dalle.sampling.Sampler.generate``; 1 is off).
    """
    if n < 1 or rerank < 1:
        raise ValueError(f"n and rerank must be >= 1, got n={n}, rerank={rerank}")
    c = model.cfg
    dev = next(model.parameters()).device
    per = n * rerank
    text = tok.encode_batch(list(captions), c.text_len).repeat_interleave(per, dim=0).to(dev)
    tokens = []
    for i in range(0, text.shape[0], batch_size):
        t = text[i: i + batch_size]
        prefix = None if image_prefix is None else image_prefix.to(dev).expand(t.shape[0], -1)
        tokens.append(generate_images(model, t, image_prefix=prefix, temperature=temperature, top_k=top_k,
                                      top_p=top_p, generator=generator, guidance=guidance))
    tokens = torch.cat(tokens)
    images = torch.cat([dvae.decode(tokens[i: i + 256].view(-1, *c.grid)) for i in range(0, len(tokens), 256)])
    images = images.view(len(captions), per, *images.shape[1:]).cpu()
    if rerank > 1:
        out = []
        for caption, cand in zip(captions, images):
            if reranker is not None:
                order = reranker.rank(cand, tok.encode(caption))
            else:
                scene = scene_of(caption)
                order = rank_by_scorer(cand, scene) if scene is not None else list(range(per))
            out.append(cand[order[:n]])
        images = torch.stack(out)
    return images


def load_prompt_tokens(path, dvae, rows: int, grid) -> torch.Tensor:
    from PIL import Image

    S = dvae.cfg.image_size
    img = Image.open(path).convert("RGB").resize((S, S), Image.BOX)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    dev = next(dvae.parameters()).device
    codes = dvae.encode(x.to(dev)).flatten(1)
    if not 0 < rows < grid[0]:
        raise ValueError(f"--prompt-rows must be in [1, {grid[0] - 1}], got {rows}")
    return codes[0, : rows * grid[1]]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dalle.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("captions", nargs="+", help="one or more captions")
    p.add_argument("--run", required=True, help="run directory written by dalle.train / dalle.pipeline")
    p.add_argument("-n", type=int, default=8, help="images per caption")
    p.add_argument("--out", default=None, help="PNG path (default RUN/generated.png)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (1 = off; for a run trained with --cond-dropout)")
    p.add_argument("--rerank", type=int, default=1, help="candidates per kept image (best kept, see --rank-by)")
    p.add_argument("--rank-by", default="auto", choices=("auto", "reranker", "scorer"),
                   help="auto: the run's reranker (RUN/reranker/) when it has one, else the built-in dataset's scorer")
    p.add_argument("--prompt-image", default=None, help="complete this image from its first rows")
    p.add_argument("--prompt-rows", type=int, default=2, help="token rows of --prompt-image to keep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    model, tok, dvae = load_run(a.run, device)
    prefix = load_prompt_tokens(a.prompt_image, dvae, a.prompt_rows, model.cfg.grid) if a.prompt_image else None
    reranker = None
    rr_path = Path(a.run) / "reranker"
    if a.rank_by == "reranker" and not pretrained_files(rr_path)[0].is_file():
        p.error(f"--rank-by reranker: {rr_path} holds no reranker (train it: python -m dalle.rerank --run {a.run})")
    if a.rerank > 1 and a.rank_by != "scorer" and pretrained_files(rr_path)[0].is_file():
        from .rerank import Reranker

        reranker = Reranker.load(rr_path, map_location=device)
    g = torch.Generator(device=device).manual_seed(a.seed)
    images = sample_captions(model, tok, dvae, a.captions, n=a.n, rerank=a.rerank, temperature=a.temperature,
                             top_k=a.top_k, top_p=a.top_p, image_prefix=prefix, generator=g, guidance=a.guidance,
                             reranker=reranker)
    from .images import save_grid

    out = Path(a.out) if a.out else Path(a.run) / "generated.png"
    caps = [c for c in a.captions for _ in range(a.n)]
    save_grid(images.flatten(0, 1), out, nrow=a.n, captions=caps)
    print(f"wrote {out} ({len(caps)} images)")


if __name__ == "__main__":
    main()
