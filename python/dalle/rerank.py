"""A learned reranker: a small contrastive image-caption model, as the paper reranks DALL-E's samples with CLIP.

    python -m dalle.rerank --run runs/demo        # train RUN/reranker/ on the run's training pairs
    python -m dalle.generate --run runs/demo "a blue circle" -n 4 --rerank 8    # best 4 of 32 by the reranker

It is trained on the transformer's own training pairs (the built-in captioned shapes of the run, or for a run
on your own data its token shards' training split, images decoded by the run's dVAE) with the symmetric
in-batch contrastive loss of CLIP. An image and a caption meet in two pathways, and the score is the
mean of the two cosines:

- colour: per-pixel features of the RGB values (1x1 convolutions) averaged over the image, which cannot see
  the outline of a shape;
- form: three stride-2 convolutions over the brightest channel of each pixel and a linear map over the whole
  feature map, which cannot see a colour (the built-in colours all have a channel at full brightness) but keeps
  where things are (captions say "left of", "above");
- text: in each pathway, the sum of the caption's BPE-id vectors (unit length each), then a linear map. A bag
  of tokens: no token sees another, so an image's score is a sum of one term per caption token and pathway.

Trained only on pairs where, say, blue comes as squares and triangles, a single pathway that sees colour and
form together learns that a blue thing is squarish. Here a shape word's form vote cannot favour a colour, and a
colour word's colour vote cannot favour an outline (its form vote still can). On the same samples, the two
pathways pick a right image for 7 to 9 points more of the held-out colour-shape pairs than one RGB pathway
(docs/dvae/NOTES.md; a text side whose tokens interact, or a bag that also holds token pairs, does worse).

The bag cannot tell "a red circle left of a blue square" from "a blue circle left of a red square"; the
transformer gets that binding right far more often than the colour-shape pairs it has not seen.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cli
from .common import UnsafeFileError, load_pretrained, pick_device, pretrained_files, save_pretrained
from .data.shapes import ShapesDataset
from .data.shards import TokenShards
from .dvae import _as_unit_float
from .runs import load_dvae, load_run_meta, run_dvae_path
from .safe_io import check_state_dict, expected_state
from .tokenizer import CaptionTokenizer


FORMAT = 2  # of the saved model (config.json's "format"): 1 was a single RGB pathway
MODEL_TYPE = "dalle_reranker"  # config.json's model_type


@dataclass
class RerankerConfig:
    text_vocab: int  # BPE ids of the run's tokenizer (its padding ids are never fed)
    image_size: int = 32
    width: int = 128
    channels: tuple = (32, 64, 128)  # the form pathway's stride-2 convolutions
    colour_channels: int = 32  # the colour pathway's per-pixel features

    def __post_init__(self):
        self.channels = tuple(self.channels)
        for name in ("text_vocab", "image_size", "width", "colour_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"RerankerConfig.{name} must be a positive int, got {v!r}")
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in self.channels):
            raise ValueError(f"RerankerConfig.channels must be positive ints, got {self.channels!r}")
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(f"RerankerConfig.image_size must be divisible by {2 ** len(self.channels)} "
                             f"({len(self.channels)} stride-2 convolutions), got {self.image_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RerankerConfig":
        return cls(**d)


class Reranker(nn.Module):
    """``score(images, ids)``: mean of the colour and form cosines; ``rank`` orders candidates by it."""

    def __init__(self, cfg: RerankerConfig):
        super().__init__()
        self.cfg = cfg
        # text: one vector per BPE id and pathway (row 0 colour, row 1 form), summed at unit length per token
        self.token_emb = nn.Parameter(torch.randn(2, cfg.text_vocab, cfg.width))
        self.text_proj = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(2))
        # colour pathway: per-pixel features of the RGB values (1x1 convolutions), averaged over the image
        self.colour = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, cfg.colour_channels, 1), nn.GELU(),
                                    nn.Conv2d(cfg.colour_channels, cfg.colour_channels, 1), nn.GELU())
        self.colour_proj = nn.Linear(cfg.colour_channels, cfg.width)
        # form pathway: strided convolutions over the brightest channel of each pixel, positions kept
        layers, c_in = [], 1
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.image_proj = nn.Linear(c_in * side * side, cfg.width)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))  # contrastive logits are exp(this) * score

    # -------------------------------------------------------------------------------------------- sides
    def encode_text(self, ids) -> torch.Tensor:
        """Unit vectors ``(N, 2, width)`` (colour, form) for ``N`` captions given as lists of BPE ids."""
        ids = list(ids)
        for i, x in enumerate(ids):
            if isinstance(x, (str, bytes)) or (isinstance(x, torch.Tensor) and x.is_floating_point()):
                raise TypeError(f"ids[{i}] must be a list of BPE ids (tok.encode(caption)), got {type(x).__name__}"
                                f" {x!r:.40}")
        ids = [list(map(int, x)) for x in ids]
        if not ids:
            raise ValueError("ids must hold at least one caption")
        for i, x in enumerate(ids):
            if not x:
                raise ValueError(f"ids[{i}] is empty: a caption needs at least one token to be scored")
            bad = [t for t in x if not 0 <= t < self.cfg.text_vocab]
            if bad:
                raise ValueError(f"ids[{i}] holds {bad[:3]}, outside the tokenizer's [0, {self.cfg.text_vocab})")
        dev = self.token_emb.device
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=dev)
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]], dtype=torch.long, device=dev).cumsum(0)
        table = F.normalize(self.token_emb, dim=-1)
        out = [proj(F.embedding_bag(flat, table[p], offsets, mode="sum")) for p, proj in enumerate(self.text_proj)]
        return F.normalize(torch.stack(out, dim=1), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit vectors ``(N, 2, width)`` (colour, form) for images ``(N, 3, S, S)``: float in [0, 1] or uint8."""
        x = _as_unit_float(images)
        S = self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S):
            raise ValueError(f"images must be (N, 3, {S}, {S}), got {tuple(x.shape)}")
        x = x.to(self.token_emb.device)
        colour = self.colour_proj(self.colour(x).mean((2, 3)))
        form = self.image_proj(self.convs(x.amax(1, keepdim=True)).flatten(1))
        return F.normalize(torch.stack([colour, form], dim=1), dim=-1)

    @staticmethod
    def _similarity(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """``(N_img, N_txt)``: the mean over the two pathways of the cosines."""
        return torch.einsum("ipw,tpw->it", img, txt) / img.shape[1]

    def score(self, images: torch.Tensor, ids) -> torch.Tensor:
        """Score ``(N,)`` of image ``i`` with caption ``ids[i]``: the mean of its colour and form cosines."""
        ids = list(ids)
        if not isinstance(images, torch.Tensor) or len(ids) != images.shape[0]:
            raise ValueError(f"got {getattr(images, 'shape', [type(images).__name__])[0]} images and {len(ids)} "
                             "captions; they must pair up")
        return (self.encode_images(images) * self.encode_text(ids)).sum(-1).mean(-1)

    @torch.no_grad()
    def rank(self, candidates: torch.Tensor, ids) -> list[int]:
        """Indices of ``candidates`` ``(K, 3, S, S)`` from the best match for one caption's ids to the worst."""
        # a row-wise product, not a matmul: identical images get identical scores, and ties keep the draw order
        s = (self.encode_images(candidates) * self.encode_text([ids])).sum(-1).mean(-1).cpu()
        return sorted(range(len(s)), key=lambda i: (-float(s[i]), i))

    def contrastive_loss(self, images: torch.Tensor, ids) -> torch.Tensor:
        """CLIP's loss: cross-entropy of each image over the batch's captions and of each caption over the images."""
        logits = self.logit_scale.exp() * self._similarity(self.encode_images(images), self.encode_text(ids))
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    # ---------------------------------------------------------------------------------------------- I/O
    def save(self, path) -> Path:
        """Write ``path/model.safetensors`` + ``path/config.json`` (``Reranker.load`` reads it back)."""
        return save_pretrained(path, self.state_dict(), {"model_type": MODEL_TYPE, "format": FORMAT,
                                                         **self.cfg.to_dict()})

    @classmethod
    def load(cls, path, map_location="cpu") -> "Reranker":
        """A reranker saved by ``save`` (its folder, or a file in it), read without unpickling; ``ValueError`` for
        one written by an earlier version of this module, ``UnsafeFileError`` naming ``python -m dalle.convert``
        for a torch file."""
        state_dict, config = load_pretrained(path, MODEL_TYPE)
        if config.get("format") != FORMAT:
            folder = pretrained_files(path)[0].parent
            raise ValueError(f"{folder} holds a reranker of an earlier version of dalle.rerank (format "
                             f"{config.get('format', 1)}, this one reads {FORMAT}); train it again: "
                             f"python -m dalle.rerank --run {folder.parent}")
        names = {f.name for f in fields(RerankerConfig)}
        channels = config.get("channels")
        if isinstance(channels, list) and 2 * len(channels) > len(state_dict):  # before 2 ** len(channels)
            raise ValueError(f"{pretrained_files(path)[0].parent}: the config and the weights disagree: "
                             f"{len(channels)} convolutions, the weights hold {len(state_dict)} tensors")
        cfg = RerankerConfig.from_dict({k: v for k, v in config.items() if k in names})
        # names, shapes and dtypes on the meta device before anything is allocated for the config
        check_state_dict(pretrained_files(path)[0].parent, expected_state(lambda: cls(cfg)), state_dict)
        m = cls(cfg)
        m.load_state_dict(state_dict)
        return m.to(map_location).eval()


def caption_ids(tok, captions) -> list[list[int]]:
    """The clean (no BPE dropout) ids of each caption, as the reranker reads them."""
    return [tok.encode(c) for c in captions]


def train_reranker(images: torch.Tensor, captions, tok, steps: int = 4000, batch_size: int = 128, lr: float = 1e-3,
                   weight_decay: float = 0.01, noise: float = 0.05, seed: int = 0, device="cpu", progress=False,
                   log=print, **cfg_kw) -> Reranker:
    """Train a reranker on ``images`` (uint8 ``(N, 3, S, S)``) and their ``captions``.

    Each step draws ``batch_size`` pairs (seeded) and adds Gaussian noise of std ``noise`` to the images (the
    samples it will judge are dVAE decodes, never quite the pure colours of the data).
    """
    captions = list(captions)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != len(captions):
        raise ValueError(f"images must be (N, 3, S, S) with one caption each, got "
                         f"{tuple(getattr(images, 'shape', ()))} and {len(captions)} captions")
    if not 2 <= batch_size:
        raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ids = caption_ids(tok, captions)
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:  # found here, not at the random step that first draws one
        raise ValueError(f"captions {empty[:5]} have no tokens (empty or whitespace only): every training "
                         "caption needs at least one")
    x_all = _as_unit_float(images)
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    model = Reranker(RerankerConfig(text_vocab=tok.vocab_size, image_size=int(images.shape[-1]), **cfg_kw)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="reranker", dynamic_ncols=True, file=sys.stderr)
    model.train()
    t0, loss_sum = time.time(), 0.0
    for step in range(steps):
        idx = torch.randint(len(ids), (min(batch_size, len(ids)),), generator=g)
        x = x_all[idx]
        x = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1).to(device)
        loss = model.contrastive_loss(x, [ids[i] for i in idx.tolist()])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"reranker loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            n = (step % 500) + 1
            if bar is None:
                log(f"reranker step {step + 1}/{steps}: loss {loss_sum / n:.3f} ({time.time() - t0:.0f} s)")
            loss_sum = 0.0
    if bar is not None:
        bar.close()
    return model.eval()


def run_training_pairs(run, ckpt: dict, dvae, max_pairs: int = 4096, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The training pairs of a transformer run as ``(images uint8 (N, 3, S, S), captions)``.

    Built-in captioned shapes: the run's training split, rendered. Token shards (``--data``): at most
    ``max_pairs`` pairs of the training split (a seeded subset when there are more), each image the dVAE's
    decoding of its stored codes (crop 0): what the reranker will judge are dVAE decodings too.
    """
    tcfg = ckpt["train_config"]
    if tcfg.get("data"):
        shards = TokenShards(tcfg["data"], split="train")
        n = len(shards)
        idx = torch.arange(n) if n <= max_pairs else torch.randperm(
            n, generator=torch.Generator().manual_seed(seed))[:max_pairs].sort().values
        device = next(dvae.parameters()).device
        h, w = shards.grid
        images = []
        with torch.no_grad():
            for i in range(0, len(idx), 64):
                codes = shards.codes(idx[i:i + 64]).view(-1, h, w).to(device)
                images.append((dvae.decode(codes).clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        return torch.cat(images), [shards.caption(int(i)) for i in idx]

    ds = ShapesDataset("train", size=tcfg["dataset_size"], image_size=dvae.cfg.image_size, seed=tcfg["data_seed"])
    return torch.stack([ds[i][0] for i in range(len(ds))]), ds.captions()


def train_for_run(run, steps: int = 4000, seed: int = 0, device="cpu", progress=True, log=print,
                  max_pairs: int = 4096) -> Path:
    """Train the reranker ``RUN/reranker/`` (``model.safetensors`` + ``config.json``) on the training pairs of a
    transformer run (``run_training_pairs``: the built-in captioned shapes, or up to ``max_pairs`` pairs of the
    run's token shards); returns that folder."""
    run = Path(run)
    ckpt = load_run_meta(run)
    tok = CaptionTokenizer.load(run / "tokenizer.json")
    dvae = load_dvae(run_dvae_path(run, ckpt), device)
    images, captions = run_training_pairs(run, ckpt, dvae, max_pairs=max_pairs, seed=seed)
    model = train_reranker(images, captions, tok, steps=steps, seed=seed, device=device, progress=progress,
                           log=log)
    return model.save(run / "reranker")


def build_parser():
    p = cli.Parser(prog="python -m dalle.rerank", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a transformer run (dalle.train / dalle.pipeline); writes "
                                               "RUN/reranker/ (model.safetensors + config.json)")
    p.add_argument("--steps", type=cli.positive_int, default=4000, help="updates")
    p.add_argument("--seed", type=cli.nonneg_int, default=0, help="seed of the init, the batches and the noise")
    p.add_argument("--max-pairs", type=cli.positive_int, default=4096,
                   help="most training pairs of a run on token shards (a seeded subset; the built-in shapes: all)")
    p.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    p.add_argument("--threads", type=cli.nonneg_int, default=0, help=cli.THREADS_HELP)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    cli.check_run(p, a.run)
    cli.advise_threads(a.device, a.threads)
    try:
        with cli.torch_threads(a.threads):
            out = train_for_run(a.run, steps=a.steps, seed=a.seed, device=pick_device(a.device),
                                progress=a.progress, max_pairs=a.max_pairs)
    except (FileNotFoundError, UnsafeFileError) as e:  # the run's dVAE missing, or an earlier version's file
        cli.run_load_failed(p, a.run, e)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
