"""Generate images from captions with a trained run and write a PNG grid.

    python -m dalle.generate --run runs/demo "a red circle above a blue square" -n 8 --out circles.png
    python -m dalle.generate --run runs/demo "a green triangle" -n 4 --rerank 8 --out triangles.png  # best 4 of 32
    python -m dalle.generate --run runs/demo "a large red square on top of a blue circle" \
        --prompt-image docs/demo/prompt.png --prompt-rows 3 --out completed.png

Sampling uses the key/value cache of ``dalle.sampling`` (temperature, top-k, top-p, ``--guidance`` for
classifier-free guidance). ``--rerank K`` draws ``K`` candidates per requested image and keeps the best:
by the run's learned reranker (``RUN/reranker/``, ``dalle.rerank``; the paper's CLIP step) when it has
one, else (or with ``--rank-by scorer``) those the built-in dataset's deterministic scorer accepts (a caption
it cannot parse keeps its draw order, with a warning; when it parses none, ``--rerank`` is a usage error).
``--prompt-image`` completes an image from its first rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from . import cli
from .common import pick_device
from .data.shapes import matches, parse_caption
from .data.transforms import to_rgb
from .images import save_grid
from .model import check_id_range
from .rerank import Reranker
from .runs import load_dvae, load_run_meta, load_run_model, run_dvae_path
from .sampling import check_sampling_args, generate_images
from .tokenizer import CaptionTokenizer


def load_run(run, device="cpu"):
    """``(model, tokenizer, dvae)`` of a trained run directory."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory {run}")
    model, ckpt = load_run_model(run, device)
    tok = CaptionTokenizer.load(run / "tokenizer.json")
    return model, tok, load_dvae(run_dvae_path(run, ckpt), device)


def scene_of(caption: str):
    """The scene a built-in-dataset caption describes, or None when the scorer cannot parse it."""
    return parse_caption(caption.lower())


def rank_by_scorer(images, scene) -> list[int]:
    """Candidate order: images the scorer accepts for ``scene`` first, each group in draw order."""
    if not isinstance(scene, dict) or "objects" not in scene:
        raise TypeError(f"scene must be a scene dict (scene_of(caption)), got {type(scene).__name__}")
    ok = [bool(matches(im, scene)) for im in images]
    return sorted(range(len(images)), key=lambda i: (not ok[i], i))


class CaptionWarning(UserWarning):
    """A caption that is sampled, but not quite as written (empty, too long, characters the tokenizer lacks)."""


def check_captions(captions) -> list[str]:
    """``captions`` as a list of str: ``TypeError`` for a single str (it would be read as one caption per
    character) or a non-str item, ``ValueError`` for no caption at all."""
    if isinstance(captions, str):
        raise TypeError("captions must be a list of str, not a single str (wrap it: [caption])")
    try:
        captions = list(captions)
    except TypeError:
        raise TypeError(f"captions must be a list of str, got {type(captions).__name__}") from None
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"captions[{i}] must be a str, got {type(c).__name__}")
    if not captions:
        raise ValueError("captions must hold at least one caption")
    return captions


def encode_captions(tok, captions, text_len: int) -> list[list[int]]:
    """Clean BPE ids of each caption, with a ``CaptionWarning`` for each one that is not sampled as written:
    no token (empty or whitespace only: sampled as the empty caption, i.e. unconditionally, and not reranked),
    more tokens than the ``text_len`` text slots (truncated), or characters the tokenizer lacks (read as
    [UNK]). Called before anything is drawn, so every such caption is reported up front."""
    ids = []
    for i, caption in enumerate(captions):
        x = tok.encode(caption)
        shown = caption if len(caption) <= 60 else caption[:57] + "..."
        if not x:
            warnings.warn(f"caption {i} ({shown!r}) has no tokens: its images are sampled from the empty caption "
                          "(unconditional: only a run trained with --cond-dropout learned it) and reranking keeps "
                          "them in draw order", CaptionWarning, stacklevel=3)
        elif len(x) > text_len:
            warnings.warn(f"caption {i} ({shown!r}) has {len(x)} tokens, more than the model's {text_len} text "
                          f"slots: its images are sampled from the first {text_len} only", CaptionWarning,
                          stacklevel=3)
        unknown = tok.unknown_chars(caption)
        if unknown:
            warnings.warn(f"caption {i} ({shown!r}): the tokenizer has no token for {''.join(unknown)!r}; "
                          "read as [UNK]", CaptionWarning, stacklevel=3)
        ids.append(x)
    return ids


def check_run_parts(model, tok, dvae, reranker=None) -> None:
    """``ValueError`` unless the tokenizer, dVAE and reranker fit the transformer (same vocabularies, grid and
    image size), checked before sampling rather than found when the drawn tokens are decoded or ranked."""
    c = model.cfg
    if tok.vocab_size != c.text_vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} BPE ids but the transformer was trained with "
                         f"text_vocab={c.text_vocab}: they belong to different runs")
    if dvae.vocab_size != c.image_vocab or tuple(dvae.grid_size) != tuple(c.grid):
        raise ValueError(f"the dVAE makes a {tuple(dvae.grid_size)} grid of {dvae.vocab_size} codes but the "
                         f"transformer samples a {tuple(c.grid)} grid of {c.image_vocab}: different runs")
    if reranker is not None:
        if reranker.cfg.text_vocab != tok.vocab_size:
            raise ValueError(f"the reranker reads {reranker.cfg.text_vocab} BPE ids but the tokenizer has "
                             f"{tok.vocab_size}: train it for this run (python -m dalle.rerank --run RUN)")
        if reranker.cfg.image_size != dvae.cfg.image_size:
            raise ValueError(f"the reranker reads {reranker.cfg.image_size}-pixel images but the dVAE draws "
                             f"{dvae.cfg.image_size}-pixel ones: train it for this run")


def rerank_order(candidates, caption: str, ids, reranker=None) -> list[int]:
    """Order of ``candidates`` (K, 3, S, S) for one caption, best first: by ``reranker`` (a
    ``dalle.rerank.Reranker``) on the caption's BPE ``ids``, else by the built-in dataset's scorer; draw order
    when the caption gives nothing to rank by (no token, or a caption the scorer cannot parse)."""
    if reranker is not None:
        return reranker.rank(candidates, ids) if ids else list(range(len(candidates)))
    scene = scene_of(caption)
    return rank_by_scorer(candidates, scene) if scene is not None else list(range(len(candidates)))


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@torch.no_grad()
def sample_captions(model, tok, dvae, captions, n=1, rerank=1, temperature=1.0, top_k=None, top_p=None,
                    image_prefix=None, generator=None, batch_size=64, guidance=1.0, reranker=None):
    """Images ``(len(captions), n, 3, S, S)`` in [0, 1] for each caption.

    ``rerank > 1``: draw ``n * rerank`` candidates per caption and keep the ``n`` best: by ``reranker``
    (a ``dalle.rerank.Reranker``) when given, else by the built-in dataset's scorer (``rerank_order``).
    ``image_prefix``: ``(h_rows * W,)`` tokens shared by every sample (image-prompt completion).
    ``guidance``: classifier-free guidance scale (``dalle.sampling.Sampler.generate``; 1 is off).

    Every argument is checked before the first token is drawn (``ValueError``/``TypeError``), so no caption
    can fail after the others' samples exist. Any str is a caption: an empty or whitespace-only one is
    sampled as the empty caption and kept in draw order, a longer one than the text slots is truncated, and
    characters the tokenizer lacks are read as [UNK], each with a ``CaptionWarning``.
    """
    captions = check_captions(captions)
    for name, v in (("n", n), ("rerank", rerank), ("batch_size", batch_size)):
        _positive_int(name, v)
    check_sampling_args(temperature, top_k, top_p, guidance)
    check_run_parts(model, tok, dvae, reranker)
    c = model.cfg
    dev = next(model.parameters()).device
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != dev.type):
        raise ValueError(f"generator must be a torch.Generator on the model's device ({dev}), got "
                         f"{getattr(generator, 'device', type(generator).__name__)}")
    if image_prefix is not None:
        if not isinstance(image_prefix, torch.Tensor) or image_prefix.dtype != torch.long \
                or image_prefix.dim() != 1 or not 0 < len(image_prefix) < c.image_len:
            raise ValueError(f"image_prefix must be a LongTensor (n,) with 0 < n < {c.image_len}, got "
                             f"{getattr(image_prefix, 'dtype', type(image_prefix).__name__)} "
                             f"{tuple(getattr(image_prefix, 'shape', ()))}")
        check_id_range(image_prefix, c.image_vocab, "image_prefix", "the dVAE's codes")
    ids = encode_captions(tok, captions, c.text_len)
    per = n * rerank
    text = tok.encode_batch(captions, c.text_len).repeat_interleave(per, dim=0).to(dev)
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
        images = torch.stack([cand[rerank_order(cand, caption, x, reranker)[:n]]
                              for caption, x, cand in zip(captions, ids, images)])
    return images


def load_prompt_tokens(path, dvae, rows: int, grid) -> torch.Tensor:
    """The first ``rows`` token rows ``(rows * W,)`` of the image at ``path`` (resized to the dVAE's size)."""
    from PIL import Image

    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows < grid[0]:
        raise ValueError(f"--prompt-rows must be in [1, {grid[0] - 1}], got {rows!r}")
    S = dvae.cfg.image_size

    img = to_rgb(Image.open(path)).resize((S, S), Image.BOX)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    dev = next(dvae.parameters()).device
    codes = dvae.encode(x.to(dev)).flatten(1)
    return codes[0, : rows * grid[1]]


def build_parser():
    p = cli.Parser(prog="python -m dalle.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("captions", nargs="+", help="one or more captions")
    p.add_argument("--run", required=True, help="run folder written by dalle.train / dalle.pipeline")
    p.add_argument("-n", type=cli.positive_int, default=8, help="images per caption")
    p.add_argument("--out", type=_png_path, default=None, help="PNG file to write (default RUN/generated.png)")
    cli.add_options(p, cli.SamplingOptions)
    p.add_argument("--rerank", type=cli.positive_int, default=1,
                   help="candidates per kept image (best kept, see --rank-by)")
    p.add_argument("--rank-by", default="auto", choices=("auto", "reranker", "scorer"),
                   help="auto: the run's reranker (RUN/reranker/) when it has one, else the built-in dataset's scorer")
    p.add_argument("--prompt-image", type=cli.existing_file, default=None,
                   help="complete this image from its first rows")
    p.add_argument("--prompt-rows", type=cli.positive_int, default=None,
                   help="token rows of --prompt-image to keep (default 2; at most the grid's rows - 1)")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the sampler")
    p.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    return p


def _png_path(text: str) -> str:
    """argparse type of ``--out``: a .png file path (the grid is written as PNG), not a folder."""
    if Path(text).suffix.lower() != ".png" or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"expected a .png file path, got {text!r}")
    return text


def parse_args(argv=None):
    """``(parser, args)`` with every check that needs no model done: the run's files, the prompt image."""
    p = build_parser()
    a = p.parse_args(argv)
    run = cli.check_run(p, a.run)
    out = Path(a.out) if a.out else run / "generated.png"
    folder = next(f for f in (out.parent, *out.parent.parents) if f.exists())  # the grid's folder is made
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        p.error(f"argument --out: cannot write {out} ({folder} is not a writable folder); nothing was sampled")
    if a.prompt_image is None and a.prompt_rows is not None:
        cli.warn(f"--prompt-rows {a.prompt_rows}: has no effect without --prompt-image")
    if a.prompt_image is not None:
        from PIL import Image

        try:
            with Image.open(a.prompt_image) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - any decoder failure: not an image this tool can read
            p.error(f"argument --prompt-image: {a.prompt_image!r} is not an image file Pillow can read ({e})")
    cli.warn_greedy(a.temperature, a.rerank, a.top_k, a.top_p)
    rr_path = run / cli.RERANKER_FILE
    if a.rank_by == "reranker" and not cli.has_reranker(run):
        p.error(f"argument --rank-by: reranker: {rr_path} holds no reranker "
                f"(train it: python -m dalle.rerank --run {a.run})")
    if a.rerank == 1 and a.rank_by != "auto":
        cli.warn(f"--rank-by {a.rank_by}: has no effect with --rerank 1 (nothing to choose among)")
    if a.rerank > 1 and (a.rank_by == "scorer" or not cli.has_reranker(run)):
        unparsed = [c for c in a.captions if scene_of(c) is None]
        why = "--rank-by scorer" if a.rank_by == "scorer" else f"{rr_path} holds no reranker"
        if len(unparsed) == len(a.captions):
            p.error(f"argument --rerank: nothing to rank by: {why} and the built-in dataset's scorer cannot "
                    f"parse any caption (train a reranker: python -m dalle.rerank --run {a.run})")
        for c in unparsed:
            cli.warn(f"--rerank {a.rerank}: {why} and the scorer cannot parse {c!r}: its images are kept in "
                     "draw order")
    return p, a


def main(argv=None):
    p, a = parse_args(argv)
    device = pick_device(a.device)
    try:
        model, tok, dvae = load_run(a.run, device)
    except (FileNotFoundError, ValueError) as e:  # a file missing, or not what the run needs (the message says)
        cli.run_load_failed(p, a.run, e)
    rows = 2 if a.prompt_rows is None else a.prompt_rows
    if a.prompt_image is not None and not rows < model.cfg.grid[0]:
        p.error(f"argument --prompt-rows: this run's grid has {model.cfg.grid[0]} rows; expected 1 to "
                f"{model.cfg.grid[0] - 1}, got {rows}")
    if a.guidance != 1.0:
        cli.warn_untrained_guidance(a.guidance, load_run_meta(a.run).get("train_config") or {}, a.run)
    prefix = load_prompt_tokens(a.prompt_image, dvae, rows, model.cfg.grid) if a.prompt_image else None
    reranker = None
    rr_path = Path(a.run) / cli.RERANKER_FILE
    if a.rerank > 1 and a.rank_by != "scorer" and cli.has_reranker(a.run):
        try:
            reranker = Reranker.load(rr_path, map_location=device)
        except ValueError as e:  # written by an earlier version: the message says how to train it again
            p.error(f"argument --rank-by: {e}")
    g = torch.Generator(device=device).manual_seed(a.seed)
    with warnings.catch_warnings():  # a caption's warning is one line, like the flags' (no source location)
        shown = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, CaptionWarning):
                cli.warn(str(message))
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        try:
            images = sample_captions(model, tok, dvae, a.captions, n=a.n, rerank=a.rerank,
                                     temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, image_prefix=prefix,
                                     generator=g, guidance=a.guidance, reranker=reranker)
        except ValueError as e:  # the model's own numbers (non-finite logits of a diverged run): one line, no image
            print(f"python -m dalle.generate: error: {a.run}: {e}", file=sys.stderr)
            sys.exit(1)

    out = Path(a.out) if a.out else Path(a.run) / "generated.png"
    caps = [c for c in a.captions for _ in range(a.n)]
    save_grid(images.flatten(0, 1), out, nrow=a.n, captions=caps)
    print(f"wrote {out} ({len(caps)} images)")


if __name__ == "__main__":
    main()
