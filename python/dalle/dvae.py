"""Discrete VAE (paper section 2.1, appendix A): the encoder/decoder of the released DALL-E dVAE, with config presets.

Encoder: 7x7 conv to ``n_hid``; ``group_count`` groups of ``n_blk_per_group`` residual blocks of widths
``n_hid * 2**g``; a 2x2 max-pool after every group but the last; ReLU and a 1x1 conv to ``vocab_size`` logits.
Decoder: 1x1 conv from the (relaxed) one-hot codes to ``n_init``; groups of widths ``n_hid * 2**(G-1-g)``,
nearest 2x upsampling after every group but the last; ReLU and a 1x1 conv to 6 channels (``mu``, ``ln b``
of the logit-Laplace likelihood). The grid factor is ``2**(group_count - 1)``: 8 for the paper's 4 groups.

Training loss (``DVAE.loss``): Gumbel-softmax relaxation at temperature ``tau``, logit-Laplace NLL from
``dalle_kernels.logit_laplace_loss`` (the fused op), KL of the code posterior to the uniform prior weighted by
``beta``; the total is divided by ``H * W * 3`` per image.

k-means warm start (``kmeans_cells``, ``DVAE.warmup_loss``; the tiny preset's first updates): each cell's target
code is the nearest k-means centre of its pixels, learnt by the encoder with cross-entropy while the decoder learns
to draw the images from the target codes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_kernels import logit_laplace_loss, map_pixels, unmap_pixels

from .common import load_pretrained, pretrained_files, save_pretrained
from .images import as_unit_float as _as_unit_float  # one image check for the package (rerank reads it here)
from .openai_dvae import load_openai
from .safe_io import check_state_dict, expected_state

MODEL_TYPE = "dalle_dvae"  # config.json's model_type
LOGIT_LAPLACE_EPS = 0.1


def released_init_(module: nn.Module) -> None:
    """Initialise every conv as the released dVAE code does: weights ``N(0, 1 / fan_in)``, zero biases.

    PyTorch's default (uniform weights, non-zero biases) makes the encoder's logits almost position-independent
    at step 0 (on the built-in shapes their spread over positions is ~200x smaller than over codes), so every
    cell starts on the same code."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.zero_()


@dataclass
class DVAEConfig:
    image_size: int = 256
    n_hid: int = 256
    n_init: int = 128
    vocab_size: int = 8192  # codebook size
    group_count: int = 4  # grid factor 2**(group_count - 1)
    n_blk_per_group: int = 2
    input_channels: int = 3

    @classmethod
    def paper(cls, **overrides) -> "DVAEConfig":
        """The paper's dVAE: 256x256 images to a 32x32 grid of 8192 codes."""
        return cls(**overrides)

    @classmethod
    def openai(cls, **overrides) -> "DVAEConfig":
        """OpenAI's released dVAE (``DVAE.from_openai``): the paper's architecture, 256x256 images to a 32x32
        grid of 8192 codes, ``n_hid`` 256, ``n_init`` 128, 4 groups of 2 blocks."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DVAEConfig":
        """A CPU-sized dVAE: 32x32 images to an 8x8 grid of 512 codes."""
        return cls(**{**dict(image_size=32, n_hid=32, n_init=64, vocab_size=512, group_count=3,
                             n_blk_per_group=1), **overrides})

    @property
    def grid_factor(self) -> int:
        return 2 ** (self.group_count - 1)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DVAEConfig.{f.name} must be a positive int, got {v!r}")
        if self.vocab_size < 2:
            raise ValueError(f"DVAEConfig.vocab_size must be >= 2, got {self.vocab_size}")
        if self.image_size % self.grid_factor:
            raise ValueError(f"DVAEConfig.image_size ({self.image_size}) must be divisible by the grid factor "
                             f"2**(group_count - 1) = {self.grid_factor}")


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = max(1, n_out // 4)
        self.post_gain = 1.0 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_out, 1))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = max(1, n_out // 4)
        self.post_gain = 1.0 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, n_hid, 1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_out, 3, padding=1))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """Mapped pixels (B, 3, H, W) in (eps, 1 - eps) to code logits (B, vocab_size, H/f, W/f)."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        n_layers = cfg.group_count * cfg.n_blk_per_group
        layers = [nn.Conv2d(cfg.input_channels, cfg.n_hid, 7, padding=3)]
        width = cfg.n_hid
        for g in range(cfg.group_count):
            out = cfg.n_hid * 2**g
            for i in range(cfg.n_blk_per_group):
                layers.append(EncoderBlock(width, out, n_layers))
                width = out
            if g < cfg.group_count - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.ReLU(), nn.Conv2d(width, cfg.vocab_size, 1)]
        self.net = nn.Sequential(*layers)
        released_init_(self)

    def forward(self, x):
        return self.net(x)

    @torch.no_grad()
    def init_logits_from_data(self, x: torch.Tensor, std: float) -> None:
        """Data-dependent init of the logit layer from a batch of mapped images ``x``: remove the part of the
        logits that is the same at every position (the ReLU features share a large mean, which acts as a
        per-code bias and starts every cell on one code) and scale the rest to ``std`` over positions, so
        the codes at step 0 already differ with the image content and stand out of the Gumbel noise."""
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        conv = self.net[-1]
        f = self.net[:-1](x)
        f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).float()
        mean = f.mean(0)
        w = conv.weight.view(conv.weight.shape[0], -1)
        w -= (w @ mean)[:, None] * mean[None] / (mean @ mean).clamp_min(1e-12)
        conv.bias.zero_()
        spread = ((f - mean) @ w.t()).std(0).mean()
        w *= std / spread.clamp_min(1e-12)


class Decoder(nn.Module):
    """Codes to logit-Laplace parameters (B, 6, H, W). Codes are token ids (B, h, w) int64 or a (relaxed)
    one-hot (B, vocab_size, h, w); the input 1x1 conv is the codebook, so ids are looked up, not one-hot."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        n_layers = cfg.group_count * cfg.n_blk_per_group
        self.input = nn.Conv2d(cfg.vocab_size, cfg.n_init, 1)
        layers = []
        width = cfg.n_init
        for g in range(cfg.group_count):
            out = cfg.n_hid * 2 ** (cfg.group_count - 1 - g)
            for i in range(cfg.n_blk_per_group):
                layers.append(DecoderBlock(width, out, n_layers))
                width = out
            if g < cfg.group_count - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReLU(), nn.Conv2d(width, 2 * cfg.input_channels, 1)]
        self.net = nn.Sequential(*layers)
        released_init_(self)

    def embed(self, z):
        if z.dtype == torch.long:
            w = self.input.weight.flatten(1)  # (n_init, vocab)
            return F.embedding(z, w.t()).permute(0, 3, 1, 2) + self.input.bias[None, :, None, None]
        return self.input(z)

    def forward(self, z):
        return self.net(self.embed(z))


def cell_patches(images: torch.Tensor, grid_factor: int) -> torch.Tensor:
    """Pixels of each grid cell: images (B, C, H, W) to (B, H/f, W/f, C*f*f), ``f = grid_factor``."""
    f = grid_factor
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    if h % f or w % f:
        raise ValueError(f"images of {h}x{w} do not split into {f}x{f} cells")
    return images.unfold(2, f, f).unfold(3, f, f).permute(0, 2, 3, 1, 4, 5).reshape(b, h // f, w // f, c * f * f)


@torch.no_grad()
def kmeans_cells(images: torch.Tensor, grid_factor: int, k: int, iters: int = 20,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means (k-means++ seeding, then ``iters`` Lloyd steps) of the pixels of every grid cell of
    ``images`` (uint8 or float in [0, 1]): ``(k, C*f*f)`` float32 centres in [0, 1].

    Seeding draws each next centre with probability proportional to the squared distance to the nearest
    centre chosen so far, so repeated cells are not drawn twice while unseen patterns remain; when fewer
    than ``k`` distinct cells exist the leftover centres repeat a drawn one. A centre that loses all its
    cells in a Lloyd step keeps its place."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    x = cell_patches(_as_unit_float(images), grid_factor).reshape(-1, images.shape[1] * grid_factor ** 2)
    if len(x) == 0:
        raise ValueError("kmeans_cells needs at least one image")
    first = int(torch.randint(len(x), (1,), generator=generator))
    idx = [first]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):
        total = d2.sum()
        i = int(torch.multinomial(d2 / total, 1, generator=generator)) if total > 0 else idx[-1]
        idx.append(i)
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    centres = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        count = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], centres)
    return centres


@torch.no_grad()
def assign_cells(images: torch.Tensor, centres: torch.Tensor, grid_factor: int) -> torch.Tensor:
    """Index of the nearest of ``centres`` (k, C*f*f) for every cell of ``images``: (B, H/f, W/f) int64."""
    cells = cell_patches(_as_unit_float(images), grid_factor)
    b, h, w, d = cells.shape
    if centres.ndim != 2 or centres.shape[1] != d:
        raise ValueError(f"centres must have shape (k, {d}) for {grid_factor}x{grid_factor} cells, "
                         f"got {tuple(centres.shape)}")
    return torch.cdist(cells.reshape(b, h * w, d), centres.to(cells)[None].expand(b, -1, -1)).argmin(-1).view(b, h, w)


class DVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        if not isinstance(cfg, DVAEConfig):
            raise TypeError(f"cfg must be a DVAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.cfg.image_size // self.cfg.grid_factor
        return (g, g)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def _check_images(self, images):
        x = _as_unit_float(images)
        s, c = self.cfg.image_size, self.cfg.input_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] % self.cfg.grid_factor or x.shape[3] % self.cfg.grid_factor:
            raise ValueError(f"images must have shape (B, {c}, H, W) with H, W divisible by "
                             f"{self.cfg.grid_factor} (trained at {s}x{s}), got {tuple(images.shape)}")
        return x

    def logits(self, images) -> torch.Tensor:
        """Code logits (B, vocab_size, h, w) of images (uint8 or float in [0, 1]); float32. Other images
        raise like ``dalle.images.as_unit_float`` (e.g. float pixels in [0, 255]: ValueError)."""
        x = self._check_images(images).to(self.encoder.net[0].weight.device)
        return self.encoder(map_pixels(x, LOGIT_LAPLACE_EPS, check_range=False)).float()  # checked above

    def loss(self, images, tau: float, beta: float, hard: bool = False, backend: str = "auto",
             fixed_ln_b: bool = False):
        """Negative ELBO per image pixel-channel: ``(nll + beta * KL) / (H * W * 3)``, averaged over the batch.

        ``hard=True`` feeds the decoder the one-hot of the Gumbel sample's argmax with the relaxed sample's
        gradient (straight-through); the default is the paper's relaxed one-hot. ``fixed_ln_b=True`` evaluates
        the logit-Laplace NLL with ``ln b = 0`` instead of the decoder's channels 3-5 (a fixed-scale Laplace in
        logit space): on images whose pixels are exactly predictable the learned scale otherwise spends the
        updates shrinking ``b`` on the background and down-weights the pixels that are still wrong.

        Returns ``(loss, stats)`` with ``stats`` holding detached ``nll`` and ``kl`` (same normalisation).
        """
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if not 0 <= beta < math.inf:
            raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
        x = self._check_images(images).to(self.encoder.net[0].weight.device)
        logits = self.logits(x)
        z = F.gumbel_softmax(logits, tau=tau, hard=hard, dim=1)
        nll = self._nll(self.decoder(z.to(logits.dtype)), x, backend, fixed_ln_b)
        log_q = F.log_softmax(logits, dim=1)
        kl_per_image = (log_q.exp() * (log_q + math.log(self.cfg.vocab_size))).sum(dim=(1, 2, 3))
        kl = kl_per_image.mean() / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = nll + beta * kl
        return loss, {"nll": nll.detach(), "kl": kl.detach()}

    @staticmethod
    def _nll(params, x, backend, fixed_ln_b):
        """Mean logit-Laplace NLL of ``x`` under the decoder output ``params``; ``ln b = 0`` when ``fixed_ln_b``."""
        if fixed_ln_b:
            params = torch.cat([params[:, :3], torch.zeros_like(params[:, 3:])], dim=1)
        return logit_laplace_loss(params, x, reduction="mean", eps=LOGIT_LAPLACE_EPS, backend=backend)

    def warmup_loss(self, images, centres: torch.Tensor, backend: str = "auto", fixed_ln_b: bool = True):
        """k-means warm start (the tiny preset's first updates, before the ELBO): each cell's target code is
        its nearest pixel-space k-means centre (``kmeans_cells``); the encoder learns it by cross-entropy of
        its logits and the decoder learns to draw the image from the target codes (the logit-Laplace NLL of
        ``loss``, hard one-hot input). Both terms start the autoencoder on codes that tell apart every cell
        pattern, including sub-cell edges, which the relaxation alone did not find in 1200 updates
        (docs/dvae/NOTES.md).

        Returns ``(ce + nll, {"ce", "nll"})`` (detached stats; ``nll`` normalised as in ``loss``)."""
        x = self._check_images(images).to(self.encoder.net[0].weight.device)
        if centres.ndim != 2 or centres.shape[0] != self.cfg.vocab_size:
            raise ValueError(f"centres must have shape ({self.cfg.vocab_size}, C*f*f), got {tuple(centres.shape)}")
        target = assign_cells(x, centres, self.cfg.grid_factor)
        ce = F.cross_entropy(self.logits(x), target)
        nll = self._nll(self.decoder(target), x, backend, fixed_ln_b)
        return ce + nll, {"ce": ce.detach(), "nll": nll.detach()}

    @staticmethod
    def params_to_images(params: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, 6, H, W) to images in [0, 1]: ``clamp((sigmoid(mu) - eps) / (1 - 2 eps), 0, 1)``."""
        return unmap_pixels(torch.sigmoid(params[:, :3].float()), LOGIT_LAPLACE_EPS)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Token grid (B, h, w) int64: argmax of the encoder logits, no noise."""
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float in [0, 1] from a token grid (B, h, w)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int32, torch.int16):
            raise TypeError(f"tokens must be an integer tensor (B, h, w), got {getattr(tokens, 'dtype', tokens)}")
        if tokens.ndim != 3:
            raise ValueError(f"tokens must have shape (B, h, w), got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ValueError(f"tokens must be in [0, {self.cfg.vocab_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        tokens = tokens.long().to(self.decoder.input.weight.device)
        return self.params_to_images(self.decoder(tokens))

    @torch.no_grad()
    def code_features(self, batch_size: int = 256) -> torch.Tensor:
        """``(vocab_size, sum(code_feature_groups))`` float32 description of every code, each column
        standardised over the codes. From the pixels the decoder draws in the centre cell of a 5x5 grid filled
        with the code: those ``C*f*f`` pixels, then the code's codebook vector (the decoder's input 1x1 conv),
        then the cell's form without its colour (``f*f``: the brightest channel per pixel) and its colour
        without its form (``C``: the channel sums over the summed brightest channels). Used by the
        transformer's ``CodeEmbedding`` (``dalle.model``), one MLP per group of ``code_feature_groups``."""
        f, V = self.cfg.grid_factor, self.cfg.vocab_size
        g = 5
        dev = self.decoder.input.weight.device
        cells = []
        for i in range(0, V, batch_size):
            ids = torch.arange(i, min(V, i + batch_size), device=dev)
            img = self.decode(ids[:, None, None].expand(-1, g, g))
            cells.append(img[:, :, 2 * f: 3 * f, 2 * f: 3 * f].float())
        cells = torch.cat(cells)  # (vocab, C, f, f)
        book = self.decoder.input.weight.detach().flatten(1).t().float()  # (vocab, n_init)
        form = cells.amax(1)  # (vocab, f, f)
        colour = cells.sum((2, 3)) / form.sum((1, 2))[:, None].clamp_min(1e-3)
        feats = torch.cat([cells.flatten(1), book, form.flatten(1), colour], dim=1)
        return (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)

    @property
    def code_feature_groups(self) -> tuple[int, int, int]:
        """Column counts of ``code_features``' groups: (pixels + codebook vector, form, colour)."""
        c, f = self.cfg.input_channels, self.cfg.grid_factor
        return (c * f * f + self.cfg.n_init, f * f, c)

    @torch.no_grad()
    def reconstruct(self, images) -> torch.Tensor:
        return self.decode(self.encode(images))

    def save(self, path) -> Path:
        """Write the model as ``path/model.safetensors`` + ``path/config.json`` (``DVAE.load`` reads it back)."""
        return save_pretrained(path, self.state_dict(), {"model_type": MODEL_TYPE, **asdict(self.cfg)})

    @classmethod
    def from_openai(cls, encoder, decoder, image_size: int = 256) -> "DVAE":
        """OpenAI's released dVAE as a ``DVAE`` (``DVAEConfig.openai()`` for the released files; the sizes are
        read from the weights), in eval mode on the CPU, float32.

        ``encoder``, ``decoder``: the released ``encoder.pkl`` and ``decoder.pkl`` (paths or binary file
        objects), the ``dall_e`` package's ``Encoder`` / ``Decoder`` modules, or their state dicts.
        ``image_size``: the images' side the model is used at (the released one was trained at 256); it sets
        ``grid_size`` only, the weights work at any size divisible by the grid factor (8).

        The files are pickles (torch's legacy format; zip files are read too), read with a restricted
        unpickler (an allowlist of stand-ins for the ``dall_e`` module tree's classes and torch's tensor
        rebuilders; ``dalle.openai_dvae``): it rebuilds tensors and that tree's attribute dicts only, runs no
        code from the file and needs no ``dall_e`` installed; its work is linear in the file's size (each module
        of the tree is visited once, every size is checked against the file before allocating). Raises
        ``UnsafeFileError`` naming any other global a file names (nothing runs), ``ValueError`` for a file or
        module that is not the ``dall_e`` encoder / decoder, whose sizes do not add up, whose layout differs
        (pooling, upsampling, post-gain) or whose weights' names or shapes do not fit one dVAE,
        ``FileNotFoundError`` for a missing path. Convert once with
        ``python -m dalle.convert --openai-dvae``."""
        return load_openai(encoder, decoder, lambda sizes: cls(DVAEConfig.openai(**vars(sizes))), image_size)

    @classmethod
    def load(cls, path, map_location="cpu") -> "DVAE":
        """A dVAE saved by ``save``: its folder, or the ``model.safetensors`` or ``config.json`` in it. Read
        without unpickling; a torch file of an earlier version raises ``UnsafeFileError`` naming
        ``python -m dalle.convert``, anything else not a dVAE a ``ValueError``. The config is checked against the
        weights before the model is built (``dalle.safe_io``: names, shapes and dtypes, on the meta device), so a
        config that asks for more than the file holds is "the config and the weights disagree", never an
        allocation."""
        state_dict, config = load_pretrained(path, MODEL_TYPE)
        where = pretrained_files(path)[0].parent
        names = {f.name for f in fields(DVAEConfig)}
        cfg = DVAEConfig(**{k: v for k, v in config.items() if k in names})
        blocks = cfg.group_count * cfg.n_blk_per_group
        if 2 * blocks * 8 > len(state_dict):  # every residual block holds 8 tensors or more (4 convs)
            raise ValueError(f"{where}: the config and the weights disagree: the config's {cfg.group_count} x "
                             f"{cfg.n_blk_per_group} residual blocks per coder need at least {16 * blocks} tensors, "
                             f"the weights hold {len(state_dict)}")
        check_state_dict(where, expected_state(lambda: cls(cfg)), state_dict)
        model = cls(cfg)
        model.load_state_dict(state_dict)
        return model.to(map_location).eval()
