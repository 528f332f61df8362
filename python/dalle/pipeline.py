"""The main job: dVAE -> transformer -> reranker -> samples, on the built-in captioned shapes or on your own data.

    python -m dalle.pipeline --run runs/demo
    python -m dalle.pipeline --run runs/photos --data IMAGES/ [--dvae DIR | --openai-dvae ENC.pkl DEC.pkl]

With ``--data`` (a folder, a .tsv/.csv or WebDataset shards; ``run_on_data``): the dVAE is trained on the data
(``RUN/dvae/``, holding out ``--heldout`` of the pairs), given (``--dvae``) or OpenAI's released one converted
into ``RUN/dvae/``; the pairs are encoded once into token shards (``RUN/tokens/``, ``dalle.encode``, the same
held-out pairs by a hash of their keys); the transformer trains on the shards' training split with a BPE
tokenizer trained on its captions; the reranker on (up to 4096 of) its pairs; then, for held-out captions:
the transformer's loss, samples and the reranker's picks (``RUN/samples_heldout.png``: original, dVAE
reconstruction, a sample, the pick), reconstructions (``RUN/reconstructions_heldout.png``) and
``RUN/results.json``.

Without ``--data``, the demo on the built-in captioned shapes:

1. trains the tiny dVAE (``RUN/dvae/``, skipped when its final model ``RUN/dvae/model.safetensors`` exists),
2. encodes the training images once and trains the tiny transformer (``RUN/``; ``--resume`` continues), with
   image-token vectors computed from the dVAE's codes (``--image-embedding dvae``, ``dalle.model.CodeEmbedding``),
3. trains the learned reranker on the same training pairs (``RUN/reranker/``, ``dalle.rerank``: a small
   contrastive image-caption model, the paper's CLIP step; reused when newer than the run's tokenizer and
   written by this version),
4. samples images for captions of the training split and for held-out colour-shape combinations never seen
   in training (zero-shot), ``--rerank`` candidates per caption,
5. prints the deterministic scorer's accuracy on each: a single sample (averaged over all candidates), the
   one image per caption the learned reranker picks among the ``--rerank`` candidates (the paper's protocol),
   and the best of them by the scorer itself (a ceiling: the judge choosing); also the scorer on real images
   and on their dVAE reconstructions (the ceiling the transformer can reach through this dVAE),
6. writes ``RUN/samples_train.png``, ``RUN/samples_heldout.png`` (a sample per caption, then the reranker's
   pick) and ``RUN/results.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import cli
from .checkpoint import has_checkpoints
from .common import UnsafeFileError, convert_hint, pick_device, pretrained_files
from .data.shapes import ShapesDataset, matches
from .data.shards import TokenShards
from .data.sources import open_source
from .data.transforms import preprocess
from .dvae import DVAE
from .encode import EncodeConfig, main as encode_main
from .generate import CaptionWarning, load_run, rerank_order, sample_captions
from .images import save_grid
from .rerank import Reranker, train_for_run
from .runs import fresh_run_problem
from .train import TrainConfig, train
from .train_dvae import TrainDVAEConfig, train_dvae, weak_verdict


def evaluate_split(model, tok, dvae, split, n_captions, rerank, top_k, temperature, seed, data_seed, guidance=1.0,
                   reranker=None, log=print):
    """Scorer accuracy on ``n_captions`` captions of ``split``: one sample, the reranker's pick among ``rerank``
    candidates (when a ``reranker`` is given) and the best of them by the scorer.

    Returns ``(results, captions, first samples, picks)``; the picks are the reranker's (else the scorer's).
    The results hold no time, so a repeat of the run gives equal results.
    """
    ds = ShapesDataset(split, size=n_captions, image_size=dvae.cfg.image_size, seed=data_seed)
    captions = ds.captions()
    scenes = [ds.scene(i) for i in range(len(ds))]
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    images = sample_captions(model, tok, dvae, captions, n=rerank, temperature=temperature, top_k=top_k,
                             generator=g, guidance=guidance)  # (C, K, 3, S, S), candidates in draw order
    ok = torch.tensor([[bool(matches(im, sc)) for im in cand] for cand, sc in zip(images, scenes)])
    real = torch.stack([ds[i][0] for i in range(len(ds))])
    recon = dvae.reconstruct(real.to(next(dvae.parameters()).device)).cpu()
    res = {
        "captions": len(captions),
        "candidates_per_caption": rerank,
        "acc_single": ok.float().mean().item(),
        f"acc_best_of_{rerank}": ok.any(1).float().mean().item(),
        "acc_reranked": None,
        "acc_real_images": sum(matches(im, sc) for im, sc in zip(real, scenes)) / len(ds),
        "acc_dvae_reconstructions": sum(matches(im, sc) for im, sc in zip(recon, scenes)) / len(ds),
    }
    if reranker is not None:
        pick = torch.tensor([rerank_order(cand, c, tok.encode(c), reranker)[0] for cand, c in zip(images, captions)])
        res["acc_reranked"] = ok[torch.arange(len(captions)), pick].float().mean().item()
    else:
        pick = torch.stack([(~o).long().argsort(stable=True)[0] for o in ok])
    return res, captions, images[:, 0], images[torch.arange(len(captions)), pick]


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m dalle.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=cli.output_dir, default="runs/demo", help="run folder to write (and reuse)")
    # the trainers' own options (dalle.train.TrainConfig, dalle.train_dvae.TrainDVAEConfig), at the main job's
    # defaults: one declaration of each flag's values and help
    cli.add_options(p, TrainDVAEConfig, only=("steps", "num_images", "eval_images"),
                    flags={"steps": "--dvae-steps", "num_images": "--dvae-images", "eval_images": "--dvae-eval-images"},
                    helps={"steps": "dVAE updates", "num_images": "training images for the dVAE"})
    cli.add_options(p, TrainConfig, only=("steps", "preset", "batch_size", "lr", "warmup", "dataset_size", "text_len"),
                    defaults={"steps": 4000, "lr": 1e-3, "warmup": 100, "dataset_size": 8000, "text_len": None},
                    helps={"steps": "transformer updates", "text_len": "text slots (default 24 on the built-in shapes, "
                           "whose clean captions use <= 15 BPE ids, BPE dropout making longer ones; 64 with --data; "
                           "longer captions are truncated)"})
    p.add_argument("--eval-captions", type=cli.positive_int, default=100, help="captions sampled per split")
    p.add_argument("--rerank", type=cli.positive_int, default=16, help="candidates per evaluation caption")
    p.add_argument("--reranker-steps", type=cli.nonneg_int, default=4000,
                   help="updates of the learned reranker (0: none; the scorer then picks the shown images)")
    cli.add_options(p, cli.SamplingOptions, only=("top_k", "temperature"), defaults={"top_k": 16})
    cli.add_options(p, TrainConfig, only=("image_embedding", "cond_dropout"), defaults={"image_embedding": None},
                    helps={"image_embedding": "dvae: image-token vectors computed from the dVAE's codes "
                           "(dalle.model.CodeEmbedding; the default on the built-in shapes); table: the paper's "
                           "lookup tables (the default with --data)"})
    cli.add_options(p, cli.SamplingOptions, only=("guidance",),
                    helps={"guidance": "classifier-free guidance scale when sampling (1: off; needs --cond-dropout > 0)"})
    cli.add_options(p, TrainConfig, only=("seed", "device", "threads", "attn_backend"),
                    helps={"seed": "seed of every random draw"})
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (dVAE or transformer)")
    p.add_argument("--force", action="store_true", help="train the transformer again from step 0 in a run folder "
                   "that holds one (its model and checkpoints are replaced; the dVAE and reranker are reused)")
    g = p.add_argument_group("your own data (see README: Train on your own data)")
    g.add_argument("--data", default=None,
                   help="your images and captions: a folder of images with same-named .txt captions, a .tsv or .csv "
                        "of (path, caption), or WebDataset shards (a brace pattern such as "
                        "'SHARDS/{00000..00099}.tar', a .tar, or a folder of .tar files)")
    g.add_argument("--dvae", default=None, help="with --data: use this trained dVAE folder instead of training one")
    g.add_argument("--openai-dvae", nargs=2, metavar=("ENCODER_PKL", "DECODER_PKL"), default=None,
                   help="with --data: OpenAI's released dVAE (encoder.pkl decoder.pkl), converted once into RUN/dvae")
    cli.add_options(g, TrainDVAEConfig, only=("image_size",), defaults={"image_size": 64},
                    helps={"image_size": "with --data and a dVAE trained here: its image side in pixels (a multiple "
                                         "of 8)"})
    cli.add_options(g, EncodeConfig, only=("crops", "heldout"),
                    helps={"crops": "with --data: random crops encoded per image",
                           "heldout": "with --data: share of the pairs held out for evaluation (by a hash of each "
                                      "key)"})
    cli.add_options(g, TrainConfig, only=("bpe_vocab",), defaults={"bpe_vocab": 4096},
                    helps={"bpe_vocab": "with --data: BPE vocabulary size"})
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def parse_args(argv=None):
    """The checked arguments: every bad value or combination is a usage error before anything is written."""
    p = build_parser()
    a = p.parse_args(argv)
    cli.check_attn_backend(p, a.attn_backend, a.device)
    if a.text_len is None:
        a.text_len = 24 if a.data is None else 64
    if a.image_embedding is None:
        a.image_embedding = "dvae" if a.data is None else "table"
    if a.data is None:
        for flag in ("dvae", "openai_dvae"):
            if getattr(a, flag) is not None:
                p.error(f"argument --{flag.replace('_', '-')}: only with --data (the built-in demo trains its dVAE)")
    else:
        _check_data_args(p, a)
    if a.resume and a.force:
        p.error("argument --force: not with --resume (--force trains the transformer again from step 0)")
    if a.resume:  # the transformer's checkpoints, or the dVAE's in RUN/dvae/
        cli.check_resume(p, a.run, Path(a.run) / "dvae")
    elif not a.force:
        problem = fresh_run_problem(a.run)
        if problem:
            p.error(f"argument --run: {problem}")
    cli.warn_untrained_guidance(a.guidance, {"cond_dropout": a.cond_dropout})
    cli.warn_greedy(a.temperature, a.rerank, a.top_k)
    if a.rerank == 1 and a.reranker_steps > 0:
        cli.warn("--rerank 1: one candidate per caption, nothing for the reranker to choose among; "
                 "--reranker-steps 0 skips training it")
    return a


def _check_data_args(p, a) -> None:
    """Usage errors of the --data flags, before anything is written."""
    if a.dvae is not None and a.openai_dvae is not None:
        p.error("argument --openai-dvae: not allowed with --dvae (one dVAE)")
    try:
        open_source(a.data)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"argument --data: {e}")
    if a.dvae is not None:
        cli.check_dvae(p, a.dvae)
    for f in a.openai_dvae or ():
        if not Path(f).is_file():
            p.error(f"argument --openai-dvae: no such file {f}")
    if a.dvae is None and a.openai_dvae is None and a.image_size % 8:
        p.error(f"argument --image-size: must be a multiple of 8 (the dVAE's grid factor), got {a.image_size}")
    if a.image_embedding == "dvae" and a.openai_dvae is not None:
        cli.warn("--image-embedding dvae with OpenAI's dVAE draws all 8192 codes once at 256 x 256 pixels "
                 "(minutes on a CPU); --image-embedding table is the paper's choice")


def _first_heldout_images(source: str, keys: set, size: int) -> dict:
    """The original images (uint8, eval crop at ``size``) of ``keys``, streamed from the source until all found."""
    from collections import Counter

    out, src = {}, open_source(source)
    for sample in src.samples(skipped=Counter()):
        if sample.key in keys:
            out[sample.key] = preprocess(sample.image, size, "eval")
            if len(out) == len(keys):
                break
    return out


def _dvae_eval(folder: Path) -> dict:
    """The dVAE's ``eval.json`` less its wall time, with the weak-dVAE verdict (``train_dvae.weak_verdict``);
    ``{}`` when the folder has none (a dVAE given or converted)."""
    try:
        ev = json.loads((folder / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(ev, dict):
        return {}
    ev.pop("train_wall_s", None)
    return {**ev, **weak_verdict(ev)}


def _environment() -> dict:
    """What a repeat of the run must share to give equal results: torch's CPU threads and the library versions."""
    import platform

    return {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


def run_on_data(a) -> dict:
    """The main job on the user's own pairs: dVAE (trained, given or OpenAI's) -> token shards -> tokenizer +
    transformer -> reranker -> samples and reconstructions for held-out captions, ``RUN/results.json``."""
    run = Path(a.run)
    run.mkdir(parents=True, exist_ok=True)
    device = pick_device(a.device)
    t_start, times = time.time(), {}

    t0 = time.time()
    dvae_path = Path(a.dvae) if a.dvae is not None else run / "dvae"
    if a.dvae is not None:
        print(f"[1/5] dVAE: using {dvae_path}")
    elif pretrained_files(dvae_path)[0].is_file():
        print(f"[1/5] dVAE: reusing {dvae_path}")
    elif a.openai_dvae is not None:
        print(f"[1/5] dVAE: OpenAI's released dVAE ({a.openai_dvae[0]}, {a.openai_dvae[1]}) -> {dvae_path}")
        DVAE.from_openai(*a.openai_dvae).save(dvae_path)
    else:
        print(f"[1/5] dVAE: training {a.dvae_steps} steps on {a.data} ({a.image_size} px) -> {dvae_path}")
        train_dvae(TrainDVAEConfig(run=str(dvae_path), data=a.data, image_size=a.image_size, steps=a.dvae_steps,
                                   heldout=a.heldout,
                                   eval_images=a.dvae_eval_images, seed=a.seed, device=a.device,
                                   progress=a.progress, resume=a.resume and has_checkpoints(dvae_path)))
    times["dvae_s"] = time.time() - t0

    t0 = time.time()
    tokens = run / "tokens"
    print(f"[2/5] encoding {a.data} -> {tokens} ({a.crops} crop(s) per image, {a.heldout:.0%} held out)")
    argv = ["--data", a.data, "--dvae", str(dvae_path), "--out", str(tokens), "--crops", str(a.crops),
            "--heldout", str(a.heldout), "--seed", str(a.seed), "--device", a.device]
    encode_main(argv + ([] if a.progress else ["--no-progress"]))
    times["encode_s"] = time.time() - t0

    t0 = time.time()
    print(f"[3/5] transformer: {a.steps} steps ({a.preset}) -> {run / 'model.safetensors'}")
    cfg = TrainConfig(run=str(run), dvae=str(dvae_path), data=str(tokens), preset=a.preset, steps=a.steps,
                      batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, plateau_window=250, plateau_patience=2,
                      text_len=a.text_len, bpe_vocab=a.bpe_vocab, seed=a.seed, device=a.device,
                      cond_dropout=a.cond_dropout, image_embedding=a.image_embedding, attn_backend=a.attn_backend,
                      ckpt_every=max(50, a.steps // 10), log_every=10, progress=a.progress)
    train(cfg, resume=a.resume and has_checkpoints(run), force=a.force)
    times["transformer_s"] = time.time() - t0

    t0 = time.time()
    reranker = None
    if a.reranker_steps > 0:
        print(f"[4/5] reranker: {a.reranker_steps} steps on the training pairs -> {run / 'reranker'}")
        train_for_run(run, steps=a.reranker_steps, seed=a.seed, device=device, progress=a.progress)
        reranker = Reranker.load(run / "reranker", map_location=device)
    else:
        print("[4/5] reranker: none (--reranker-steps 0)")
    times["reranker_s"] = time.time() - t0

    t0 = time.time()
    model, tok, dvae = load_run(run, device)
    held = TokenShards(tokens, split="heldout")
    n = min(a.eval_captions, len(held))
    results = {"train_pairs": len(TokenShards(tokens, split="train")), "heldout_pairs": len(held)}
    if n == 0:
        print("[5/5] no held-out pairs (--heldout 0 or too little data): no held-out samples")
    else:
        print(f"[5/5] sampling {n} held-out captions, {a.rerank} candidates each (top-k {a.top_k})")
        captions = [held.caption(i) for i in range(n)]
        idx = torch.arange(n)
        codes = held.codes(idx).to(device)
        with torch.no_grad():  # the transformer's loss on held-out pairs (clean captions, stored crop 0)
            text = tok.encode_batch(captions, model.cfg.text_len).to(device)
            _, lt, li = model.loss(text, codes, return_parts=True)
            recon = dvae.decode(codes.view(n, *held.grid)).cpu()
        results.update(heldout_loss_text=float(lt), heldout_loss_image=float(li))
        g = torch.Generator(device=device).manual_seed(a.seed)
        import warnings

        with warnings.catch_warnings(record=True) as caught:  # one summary line, not a warning per caption
            warnings.simplefilter("always", CaptionWarning)
            images = sample_captions(model, tok, dvae, captions, n=a.rerank, temperature=a.temperature,
                                     top_k=a.top_k, generator=g, guidance=a.guidance)
        long = sum("text slots" in str(w.message) for w in caught if issubclass(w.category, CaptionWarning))
        if long:
            print(f"note: {long} of {n} held-out captions have more BPE tokens than the {model.cfg.text_len} text "
                  "slots and are read truncated, as in training (--text-len sets the slots)")
        for w in caught:
            if not issubclass(w.category, CaptionWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif "text slots" not in str(w.message):
                print(f"warning: {w.message}")
        if reranker is not None:
            pick = torch.tensor([rerank_order(c, t, tok.encode(t), reranker)[0] for c, t in zip(images, captions)])
            picked = images[torch.arange(n), pick]
        else:
            picked = images[:, 0]
        m = min(16, n)
        originals = _first_heldout_images(a.data, {held.key(i) for i in range(m)}, dvae.cfg.image_size)
        orig = [originals.get(held.key(i)) for i in range(m)]
        rows, caps = [], []
        for i in range(m):
            rows += [orig[i].float() / 255 if orig[i] is not None else torch.zeros_like(recon[i]), recon[i],
                     images[i, 0].float().cpu(), picked[i].float().cpu()]
            # every cell says what it shows: the grids alternate images and their reconstructions
            caps += [f"held-out image{'' if orig[i] is not None else ' (not found)'}: {captions[i]}",
                     "dVAE reconstruction", "sample", "reranker's pick" if reranker else "sample"]
        save_grid(torch.stack(rows), run / "samples_heldout.png", nrow=4, captions=caps)
        save_grid(torch.stack([r for i, r in enumerate(rows) if i % 4 < 2]), run / "reconstructions_heldout.png",
                  nrow=4, captions=[c for i, c in enumerate(caps) if i % 4 < 2])
    times["sampling_s"] = time.time() - t0
    times["total_s"] = time.time() - t_start
    summary = {"times": times, "results": results, "dvae": _dvae_eval(dvae_path), "settings": vars(a),
               "environment": _environment()}
    (run / "results.json").write_text(json.dumps(summary, indent=2))
    for k, v in results.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    written = [run / n for n in ("samples_heldout.png", "reconstructions_heldout.png", "results.json")]
    print(f"wrote {', '.join(str(p) for p in written if p.is_file())}")
    return summary


def main(argv=None):
    a = parse_args(argv)
    cli.advise_threads(a.device, a.threads)
    with cli.torch_threads(a.threads):  # every stage, trainers and sampling, runs on these threads
        return run_on_data(a) if a.data is not None else run_demo(a)


def run_demo(a) -> dict:
    """The main job on the built-in captioned shapes (the module's steps 1-6), with the checked arguments ``a``."""

    run = Path(a.run)
    run.mkdir(parents=True, exist_ok=True)
    device = pick_device(a.device)
    t_start = time.time()
    times = {}

    dvae_path = run / "dvae"
    if not pretrained_files(dvae_path)[0].is_file() and (dvae_path / "dvae.pt").is_file():
        raise UnsafeFileError(f"{dvae_path / 'dvae.pt'} is a dVAE of an earlier version of dalle (a torch pickle); "
                              f"{convert_hint(run, trust=False)}")
    t0 = time.time()
    if pretrained_files(dvae_path)[0].is_file():
        print(f"[1/4] dVAE: reusing {dvae_path}")
    else:
        print(f"[1/4] dVAE: training {a.dvae_steps} steps -> {dvae_path}")
        train_dvae(TrainDVAEConfig(run=str(run / "dvae"), steps=a.dvae_steps, num_images=a.dvae_images,
                                   eval_images=a.dvae_eval_images, seed=a.seed, device=a.device,
                                   progress=a.progress, resume=a.resume and has_checkpoints(dvae_path)))
    times["dvae_s"] = time.time() - t0

    t0 = time.time()
    print(f"[2/4] transformer: {a.steps} steps ({a.preset}) -> {run / 'model.safetensors'}")
    cfg = TrainConfig(run=str(run), dvae=str(dvae_path), preset=a.preset, steps=a.steps, batch_size=a.batch_size,
                      lr=a.lr, warmup=a.warmup, plateau_window=250, plateau_patience=2,
                      dataset_size=a.dataset_size, text_len=a.text_len, seed=a.seed, device=a.device,
                      cond_dropout=a.cond_dropout, image_embedding=a.image_embedding,
                      attn_backend=a.attn_backend, ckpt_every=max(50, a.steps // 10), log_every=10,
                      progress=a.progress)
    train(cfg, resume=a.resume and has_checkpoints(run), force=a.force)
    times["transformer_s"] = time.time() - t0

    t0 = time.time()
    reranker = None
    rr_path = run / "reranker"
    if a.reranker_steps > 0:
        rr_file = pretrained_files(rr_path)[0]
        if rr_file.is_file() and rr_file.stat().st_mtime > (run / "tokenizer.json").stat().st_mtime:
            try:
                reranker = Reranker.load(rr_path, map_location=device)
                print(f"[3/4] reranker: reusing {rr_path}")
            except ValueError as e:  # written by an earlier version: trained again below
                print(f"[3/4] reranker: {e}")
        if reranker is None:
            print(f"[3/4] reranker: {a.reranker_steps} steps on the training pairs -> {rr_path}")
            train_for_run(run, steps=a.reranker_steps, seed=a.seed, device=device, progress=a.progress)
            reranker = Reranker.load(rr_path, map_location=device)
    else:
        print("[3/4] reranker: none (--reranker-steps 0)")
    times["reranker_s"] = time.time() - t0

    t0 = time.time()
    print(f"[4/4] sampling {a.eval_captions} training and {a.eval_captions} held-out captions, "
          f"{a.rerank} candidates each (top-k {a.top_k})")
    model, tok, dvae = load_run(run, device)
    results = {}
    picked_by = f"reranker's pick of {a.rerank}" if reranker is not None else f"scorer's best of {a.rerank}"
    for split in ("train", "heldout"):
        res, captions, single, picked = evaluate_split(model, tok, dvae, split, a.eval_captions, a.rerank, a.top_k,
                                                       a.temperature, a.seed, data_seed=a.seed,
                                                       guidance=a.guidance, reranker=reranker)
        results[split] = res
        n = min(32, len(captions))
        save_grid(torch.cat([single[:n], picked[:n]]), run / f"samples_{split}.png", nrow=8,
                  captions=[f"{c}" for c in captions[:n]] + [f"{picked_by}: {c}" for c in captions[:n]])
    times["sampling_s"] = time.time() - t0
    times["total_s"] = time.time() - t_start

    import csv

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-10:]
    losses = {k: sum(float(r[k]) for r in last) / len(last) for k in ("loss", "loss_text", "loss_image")}
    dvae_eval = _dvae_eval(dvae_path)
    summary = {"times": times, "final_losses_last_100_steps": losses, "accuracy": results, "dvae": dvae_eval,
               "settings": vars(a), "environment": _environment()}
    (run / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"dVAE: {dvae_eval['heldout_scorer_acc']:.1%} of {dvae_eval['eval_images']} held-out reconstructions "
          f"accepted by the scorer, {dvae_eval['codes_used']} codes used"
          if isinstance(dvae_eval.get("heldout_scorer_acc"), float) else "dVAE: no eval.json")
    if dvae_eval.get("weak"):
        print(f"warning: {dvae_eval['weak_reason']}")
    print(f"transformer loss (last 100 steps): {losses['loss']:.3f} "
          f"(text {losses['loss_text']:.3f}, image {losses['loss_image']:.3f})")
    k = a.rerank
    print(f"{'split':9s} {'single':>7s} {'reranked':>9s} {'scorer best-of-' + str(k):>18s} {'real':>6s} "
          f"{'dVAE recon':>11s}")
    for split, r in results.items():
        rr = "-" if r["acc_reranked"] is None else f"{r['acc_reranked']:.1%}"
        print(f"{split:9s} {r['acc_single']:7.1%} {rr:>9s} {r[f'acc_best_of_{k}']:18.1%} "
              f"{r['acc_real_images']:6.1%} {r['acc_dvae_reconstructions']:11.1%}")
    print("(single: one sample; reranked: the image the learned reranker picks among the candidates; scorer "
          "best-of: any candidate right, the judge choosing)")
    print(f"time: dVAE {times['dvae_s']:.0f}s, transformer {times['transformer_s']:.0f}s, "
          f"reranker {times['reranker_s']:.0f}s, sampling {times['sampling_s']:.0f}s, total {times['total_s']:.0f}s")
    print(f"wrote {run / 'samples_train.png'}, {run / 'samples_heldout.png'}, {run / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
