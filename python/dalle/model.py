"""The DALL-E transformer (paper section 2.2, appendix B) on ``dalle_kernels.sparse_attention``.

Sequence: ``T`` text slots then the ``H x W`` image grid in raster order, ``N = T + H*W`` positions.

Start-of-image choice (paper section 2.2): there is no start-of-image token. The output at the last text
slot ``T - 1`` predicts image token 0, the output at image position ``k`` predicts image token ``k + 1`` and
the output at the last image position predicts nothing. Text slot ``t`` predicts text slot ``t + 1`` (the
per-slot padding tokens included, they are ordinary tokens), so the first text slot is never predicted.
``loss = (loss_text + 7 * loss_image) / 8``, each term averaged over its own predicted tokens.

Blocks are pre-norm: ``x + attn(ln(x))`` then ``+ mlp(ln(.))``. Layer ``l`` of ``L`` attends with the mask
``conv`` if ``l == L - 1``, ``column`` if ``l % 4 == 1``, else ``row`` (``layer_masks``). A whole block is one
"resblock" for per-resblock gradient scaling (``dalle.grad_scale``).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dalle_kernels import sparse_attention
from dalle_kernels.masks import MASKS, check_layout
from dalle_kernels.ops.attention import ATTENTION_BACKENDS, HEAD_DIMS
from dalle_kernels.powersgd import uncompressed_parameter_names

from .tokenizer import padding_ids

INIT_BLOCK = 1 << 20  # elements per independently seeded block of a parameter's initial values


def layer_masks(n_layers: int, last: str = "conv") -> list[str]:
    """The paper's layer schedule (appendix B.1): ``last`` for the final layer, ``column`` when ``l % 4 == 1``, else ``row``."""
    return [last if l == n_layers - 1 else ("column" if l % 4 == 1 else "row") for l in range(n_layers)]


@dataclass
class DALLEConfig:
    """Sizes of the transformer. ``text_vocab`` is the BPE vocabulary (padding ids come on top of it)."""

    text_len: int = 256
    text_vocab: int = 16384
    image_vocab: int = 8192
    grid: tuple = (32, 32)
    n_layers: int = 64
    n_heads: int = 62
    head_dim: int = 64
    mlp_ratio: int = 4
    conv_kernel: int = 11
    last_mask: str = "conv"
    dropout: float = 0.0  # residual dropout on each attention and MLP output while training (0: none, the paper)
    code_features: int = 0  # 0: image embedding and head are lookup tables (the paper); > 0: see CodeEmbedding
    code_feature_groups: tuple = ()  # CodeEmbedding: column counts of feature groups, one MLP each, summed
    checkpoint: bool = False  # recompute each block in backward (activation checkpointing)
    attn_backend: str = "auto"  # dalle_kernels backend: auto | triton | cpu | torch

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        check_layout(self.last_mask, self.text_len, self.grid, self.conv_kernel)
        for name in ("text_len", "text_vocab", "image_vocab", "n_layers", "n_heads", "head_dim", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"DALLEConfig.{name} must be a positive int, got {v!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"DALLEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.code_features, bool) or not isinstance(self.code_features, int) or self.code_features < 0:
            raise ValueError(f"DALLEConfig.code_features must be an int >= 0, got {self.code_features!r}")
        groups = tuple(self.code_feature_groups)
        if groups and (not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in groups)
                       or sum(groups) != self.code_features):
            raise ValueError(f"DALLEConfig.code_feature_groups must be positive ints summing to code_features="
                             f"{self.code_features}, got {self.code_feature_groups!r}")
        self.code_feature_groups = groups
        if self.last_mask not in MASKS:
            raise ValueError(f"DALLEConfig.last_mask must be one of {MASKS}, got {self.last_mask!r}")
        # what sparse_attention takes, checked here rather than at the first forward
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"DALLEConfig.head_dim must be one of {HEAD_DIMS} (sparse_attention), got {self.head_dim}")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"DALLEConfig.attn_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attn_backend!r}")

    @property
    def d_model(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def image_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def text_rows(self) -> int:
        """Rows of the text embedding and outputs of the text head: BPE ids, then one padding id per slot."""
        return self.text_vocab + self.text_len

    def masks(self) -> list[str]:
        return layer_masks(self.n_layers, self.last_mask)

    @classmethod
    def paper(cls, **kw) -> "DALLEConfig":
        """The paper's 12B model: 64 layers, 62 heads of 64, T = 256, 32 x 32 grid, 16384 / 8192 vocabularies."""
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "DALLEConfig":
        """The CPU demo size (the pipeline's default)."""
        base = dict(text_len=16, text_vocab=128, image_vocab=64, grid=(8, 8), n_layers=4, n_heads=4, head_dim=32,
                    conv_kernel=5)
        base.update(kw)
        return cls(**base)

    @classmethod
    def micro(cls, **kw) -> "DALLEConfig":
        """Unit-test size."""
        base = dict(text_len=6, text_vocab=20, image_vocab=12, grid=(4, 4), n_layers=5, n_heads=2, head_dim=16,
                    conv_kernel=3)
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DALLEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CodeEmbedding(nn.Module):
    """Image-code vectors computed from fixed per-code features by shared MLPs (``code_features > 0``).

    ``features`` ``(image_vocab, code_features)`` describe each dVAE code (``DVAE.code_features``: what the
    dVAE's decoder draws for it and its codebook vector, then the drawing's colour-blind form and form-blind
    colour). A lookup table learns a vector only for the codes seen in training, and the softmax pushes the
    logits of codes never seen as targets down; here every code's vector follows from what it looks like, so a
    code seen rarely or never gets a vector near those of codes that look alike. One module is both the input
    embedding and the image head (tied weights: logits are ``h @ weight.T``); separate ones for the two scored
    lower (docs/dvae/NOTES.md).

    ``groups`` splits the feature columns: each group has its own MLP (features -> 2d -> d, GELU) and a code's
    vector is the sum. With the form and the colour as groups of their own, a logit is a sum of a form term
    and a colour term (plus the whole-code term), so the head can favour a colour and a form separately, also
    in a pairing it never saw. No groups: one MLP over all columns.
    """

    def __init__(self, vocab: int, n_features: int, d: int, groups: tuple = ()):
        super().__init__()
        groups = tuple(groups) or (n_features,)
        if sum(groups) != n_features:
            raise ValueError(f"groups must sum to n_features={n_features}, got {groups}")
        self.groups = groups
        self.register_buffer("features", torch.zeros(vocab, n_features))
        # the first group keeps the names fc/out of the single-MLP module, so runs saved before groups still load
        self.fc = nn.Linear(groups[0], 2 * d)
        self.out = nn.Linear(2 * d, d)
        self.extra = nn.ModuleList(nn.Sequential(nn.Linear(g, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                   for g in groups[1:])

    @property
    def weight(self) -> torch.Tensor:
        """``(image_vocab, d)``: one vector per code."""
        parts = self.features.split(self.groups, dim=1)
        w = self.out(F.gelu(self.fc(parts[0])))
        for mlp, x in zip(self.extra, parts[1:]):
            w = w + mlp(x)
        return w

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Attention(nn.Module):
    """Multi-head self-attention under one DALL-E mask; parameters only, the math is ``sparse_attention``."""

    def __init__(self, cfg: DALLEConfig, mask: str):
        super().__init__()
        self.cfg, self.mask = cfg, mask
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def split(self, x):
        B, N, _ = x.shape
        c = self.cfg
        q, k, v = self.qkv(x).view(B, N, 3, c.n_heads, c.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v  # each (B, heads, N, head_dim)

    def merge(self, o):
        B, nh, N, hd = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, nh * hd))

    def forward(self, x):
        c = self.cfg
        q, k, v = self.split(x)
        o = sparse_attention(q, k, v, mask=self.mask, text_len=c.text_len, grid=c.grid, kernel=c.conv_kernel,
                             backend=c.attn_backend)
        return self.merge(o)


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each added to the residual stream."""

    def __init__(self, cfg: DALLEConfig, mask: str):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, mask)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.p = cfg.dropout

    def mlp(self, x):
        return self.out(F.gelu(self.fc(self.ln2(x))))

    def forward(self, x):
        x = x + F.dropout(self.attn(self.ln1(x)), self.p, self.training)
        return x + F.dropout(self.mlp(x), self.p, self.training)


class DALLE(nn.Module):
    """Decoder-only transformer over text + image tokens; ``init_seed`` seeds the initial parameters
    (``reset_parameters``; None: drawn from torch's global generator)."""

    def __init__(self, cfg: DALLEConfig, init_seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        d, (H, W) = cfg.d_model, cfg.grid
        self.text_emb = nn.Embedding(cfg.text_rows, d)
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_len, d))
        if cfg.code_features:  # one module: input embedding and image head
            self.image_emb = CodeEmbedding(cfg.image_vocab, cfg.code_features, d, cfg.code_feature_groups)
        else:
            self.image_emb = nn.Embedding(cfg.image_vocab, d)
        self.row_emb = nn.Parameter(torch.zeros(H, d))
        self.col_emb = nn.Parameter(torch.zeros(W, d))
        self.blocks = nn.ModuleList(Block(cfg, m) for m in cfg.masks())
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_rows, bias=False)
        if not cfg.code_features:
            self.image_head = nn.Linear(d, cfg.image_vocab, bias=False)
        self.grad_scaler = None  # set by dalle.grad_scale.BlockGradScaler.attach
        self.reset_parameters(init_seed)

    def init_rules(self) -> dict:
        """``name -> (kind, std)`` for every parameter: ``("normal", std)``, ``("zeros", 0.0)`` or ``("ones", 0.0)``.

        Linear weights and embeddings N(0, 0.02), the attention output and MLP output weights of each block
        N(0, 0.02 / sqrt(2 L)) (residual branches scaled down with depth, GPT-2 style), biases 0, LayerNorm gains 1.
        """
        std, rules = 0.02, {}
        for mname, m in self.named_modules():
            pre = mname + "." if mname else ""
            if isinstance(m, (nn.Linear, nn.Embedding)):
                rules[pre + "weight"] = ("normal", std)
            elif isinstance(m, nn.LayerNorm):
                rules[pre + "weight"] = ("ones", 0.0)
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                rules[pre + "bias"] = ("zeros", 0.0)
        for name in ("text_pos", "row_emb", "col_emb"):
            rules[name] = ("normal", std)
        for l in range(len(self.blocks)):
            for name in (f"blocks.{l}.attn.proj.weight", f"blocks.{l}.out.weight"):
                rules[name] = ("normal", std / math.sqrt(2 * self.cfg.n_layers))
        missing = [n for n, _ in self.named_parameters() if n not in rules]
        if missing:
            raise RuntimeError(f"no initialization rule for parameters {missing}")
        return rules

    def initial_value(self, name: str, seed: int, rules: dict | None = None, rows: tuple | None = None) -> torch.Tensor:
        """The initial value of parameter ``name`` for ``seed`` (float32, on the CPU), whole or only its rows
        ``rows = (start, stop)`` along dim 0.

        Normal values are drawn in blocks of about ``INIT_BLOCK`` elements (whole rows), each from a generator
        seeded by ``(seed, name, block)`` alone: any process makes any rows of any parameter without the rest of
        the model, and a sharded model (``dalle.fsdp``) draws only its shards, equal to what one process draws.
        """
        kind, std = (rules or self.init_rules())[name]
        shape = tuple(self.get_parameter(name).shape)
        lo, hi = rows if rows is not None else (0, shape[0])
        if not 0 <= lo <= hi <= shape[0]:
            raise ValueError(f"rows must lie in [0, {shape[0]}] for {name}, got {rows}")
        if kind == "zeros":
            return torch.zeros((hi - lo,) + shape[1:])
        if kind == "ones":
            return torch.ones((hi - lo,) + shape[1:])
        per_row = math.prod(shape[1:])
        step = max(1, INIT_BLOCK // max(per_row, 1))  # rows per block
        out = torch.empty((hi - lo,) + shape[1:])
        for b in range(lo // step, -(-hi // step)):
            a, z = b * step, min(shape[0], (b + 1) * step)
            key = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 7_919 + b) % 2 ** 63
            block = torch.randn((z - a,) + shape[1:], generator=torch.Generator().manual_seed(key))
            out[max(a, lo) - lo: min(z, hi) - lo] = block[max(a, lo) - a: min(z, hi) - a]
        return out.mul_(std)

    def reset_parameters(self, seed: int | None = None):
        """Initialize every parameter from ``initial_value(name, seed)``; ``seed`` None: one number drawn from
        torch's global generator (so ``torch.manual_seed`` decides). Nothing is drawn on the meta device."""
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (), device="cpu"))
        if any(p.is_meta for p in self.parameters()):
            return
        rules = self.init_rules()
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self.initial_value(name, seed, rules))

    def set_code_features(self, features: torch.Tensor) -> None:
        """Fill the fixed per-code features (``code_features > 0``), ``(image_vocab, code_features)``."""
        c = self.cfg
        if not c.code_features:
            raise ValueError("this model has lookup-table image embeddings (DALLEConfig.code_features == 0)")
        if not isinstance(features, torch.Tensor) or tuple(features.shape) != (c.image_vocab, c.code_features) \
                or not features.is_floating_point() or not torch.isfinite(features).all():
            raise ValueError(f"features must be a finite float tensor ({c.image_vocab}, {c.code_features}), got "
                             f"{getattr(features, 'dtype', type(features))} {tuple(getattr(features, 'shape', ()))}")
        self.image_emb.features.copy_(features)

    def storage_16bit_names(self) -> list[str]:
        """Names of the parameters ``--param-dtype bf16|fp16`` stores in 16 bits (paper section 2.4): each residual
        block's weight matrices (``attn.qkv``, ``attn.proj``, ``fc``, ``out``) and, unlike the paper (which keeps
        biases in 32 bits), their biases, which share the block's FSDP unit and FSDP2 stores one dtype per unit
        (13 ``d`` of the block's ``12 d^2 + 13 d`` elements). LayerNorm gains and biases (units of their own),
        embeddings and heads stay float32."""
        return [f"blocks.{i}.{n}" for i, b in enumerate(self.blocks) for n, _ in b.named_parameters()
                if not n.startswith(("ln1.", "ln2."))]

    def head_parameters(self) -> list:
        """The output layers' parameters (text head; image head, or the tied CodeEmbedding)."""
        image = self.image_emb if self.cfg.code_features else self.image_head
        return [self.text_head.weight, *image.parameters()]

    def image_head_weight(self) -> torch.Tensor:
        """``(image_vocab, d)`` output vectors of the image codes: the head's, or CodeEmbedding's (tied)."""
        return self.image_emb.weight if self.cfg.code_features else self.image_head.weight

    def image_logits(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Image-token logits ``(..., image_vocab)`` of final hidden states ``h`` ``(..., d)``; ``weight``: a
        precomputed ``image_head_weight()`` (a CodeEmbedding computes it on every call)."""
        w = self.image_head_weight() if weight is None else weight
        return h @ w.to(h.dtype).t()

    def unconditional_text(self, batch: int, device=None) -> torch.Tensor:
        """``(batch, text_len)`` text of the empty caption (every slot its padding id), for guidance."""
        return padding_ids(self.cfg.text_len, self.cfg.text_vocab, device).expand(batch, -1)

    # -- inputs ----------------------------------------------------------------------------------------
    def check_tokens(self, text, image=None):
        """Validate token inputs; return ``image`` flattened to ``(B, H*W)`` (or None).

        ``text`` ``(B, text_len)`` int64 in ``[0, text_vocab + text_len)`` (BPE ids, then the per-slot padding
        ids); ``image`` ``(B, H*W)`` or ``(B, H, W)`` int64 in ``[0, image_vocab)``. ``ValueError`` otherwise:
        an id outside its table would be an index error on the CPU and a device-side assert that ends the CUDA
        context on a GPU. The range check costs one host sync."""
        c = self.cfg
        if not isinstance(text, torch.Tensor) or text.dtype != torch.long or text.dim() != 2 \
                or text.shape[1] != c.text_len:
            raise ValueError(f"text must be a LongTensor (batch, {c.text_len}), got "
                             f"{getattr(text, 'dtype', type(text))} {tuple(getattr(text, 'shape', ()))}")
        if image is not None:
            if not isinstance(image, torch.Tensor) or image.dtype != torch.long:
                raise ValueError(f"image must be a LongTensor of image tokens, got {getattr(image, 'dtype', image)}")
            if image.dim() == 3:
                image = image.flatten(1)
            if image.dim() != 2 or image.shape != (text.shape[0], c.image_len):
                raise ValueError(f"image must have shape ({text.shape[0]}, {c.image_len}) or "
                                 f"({text.shape[0]}, {c.grid[0]}, {c.grid[1]}), got {tuple(image.shape)}")
        check_id_range(text, c.text_rows, "text", f"text_vocab + text_len = {c.text_vocab} + {c.text_len}")
        if image is not None:
            check_id_range(image, c.image_vocab, "image", "image_vocab")
        return image

    def image_position_embedding(self):
        H, W = self.cfg.grid
        return (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(H * W, -1)

    def embed(self, text, image):
        """``(B, N, d)`` input: text + per-slot padding + text position; image + row + column."""
        t = self.text_emb(text) + self.text_pos
        i = self.image_emb(image) + self.image_position_embedding()
        return torch.cat([t, i], dim=1)

    # -- forward ---------------------------------------------------------------------------------------
    def run_blocks(self, x):
        scaler = self.grad_scaler if torch.is_grad_enabled() else None
        for l, block in enumerate(self.blocks):
            if scaler is not None:
                x = scaler.enter(l, x)
            if self.cfg.checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if scaler is not None:
                x = scaler.exit(l, x)
        return self.ln_f(x)

    def forward(self, text, image):
        """Logits: text ``(B, T-1, text_rows)`` for slots ``1..T-1``; image ``(B, H*W, image_vocab)``.

        Image logit ``k`` is the prediction of image token ``k`` (from position ``T - 1 + k``).
        """
        return self._logits(text, self.check_tokens(text, image))

    def _logits(self, text, image):
        T = self.cfg.text_len
        h = self.run_blocks(self.embed(text, image))
        scaler = self.grad_scaler if torch.is_grad_enabled() else None
        if scaler is None:
            return self.text_head(h[:, : T - 1]), self.image_logits(h[:, T - 1: -1])
        # per-resblock gradient scaling: the head runs on the scaled loss gradient (grad_scale.py)
        h = scaler.unscale_head(h)
        text_logits = F.linear(h[:, : T - 1], scaler.unscale_head(self.text_head.weight))
        image_logits = self.image_logits(h[:, T - 1: -1], scaler.unscale_head(self.image_head_weight()))
        return scaler.scale_logits(text_logits.float()), scaler.scale_logits(image_logits.float())

    def loss(self, text, image, return_parts=False):
        """``(loss_text + 7 * loss_image) / 8`` (paper section 2.2), losses computed in float32."""
        image = self.check_tokens(text, image)
        text_logits, image_logits = self._logits(text, image)  # checked once
        loss_text = F.cross_entropy(text_logits.float().flatten(0, 1), text[:, 1:].flatten())
        loss_image = F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten())
        loss = combine_losses(loss_text, loss_image)
        if return_parts:
            return loss, loss_text.detach(), loss_image.detach()
        return loss

    def param_groups(self, weight_decay: float):
        """AdamW groups (paper appendix B.2): decay on linear-layer matrices, none on gains, biases, embeddings."""
        decay, no_decay = [], []
        for m in self.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, nn.Linear) and name == "weight":
                    decay.append(p)
                else:
                    no_decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_id_range(ids: torch.Tensor, size: int, name: str, what: str = "") -> None:
    """``ValueError`` naming ``name`` unless every id of ``ids`` lies in ``[0, size)`` (one host sync; skipped
    while ``torch.compile`` traces)."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} ids must be in [0, {size})" + (f" ({what})" if what else "")
                         + f", got values in [{lo}, {hi}]")


def combine_losses(loss_text, loss_image):
    return (loss_text + 7.0 * loss_image) / 8.0


# the transformer's sizes by name (``--preset``); the paper's is 64 blocks of 62 heads of 64 channels (section 2.4)
PRESETS = {
    "micro": dict(n_layers=2, n_heads=2, head_dim=16, conv_kernel=3),
    "tiny": dict(n_layers=4, n_heads=4, head_dim=32, conv_kernel=5),
    "small": dict(n_layers=8, n_heads=8, head_dim=32, conv_kernel=5),
    "paper": dict(n_layers=64, n_heads=62, head_dim=64, conv_kernel=11),
    # the two smaller models of the paper's PowerSGD table (section 2.5, table 1): hidden sizes 1920 and 2688;
    # the paper gives no depth for them, 64 blocks (as the 12B model) gives its 2.8B and 5.6B parameters
    "paper-2.8b": dict(n_layers=64, n_heads=30, head_dim=64, conv_kernel=11),
    "paper-5.6b": dict(n_layers=64, n_heads=42, head_dim=64, conv_kernel=11),
}
# Seconds per update of ``python -m dalle.train`` at its defaults (batch 32, the built-in shapes, the tiny dVAE's
# 8x8 codes) on a 2-core CPU with one thread (``--threads 1``), measured with other work on the cores (load 2-4);
# the paper presets need GPUs (``--plan`` sizes them).
CPU_SECONDS_PER_UPDATE = {"micro": 0.03, "tiny": 0.25, "small": 1.3}


def preset_help() -> str:
    """``--preset``'s help: the sizes and how long an update takes on a CPU."""
    cpu = ", ".join(f"{name} about {s:g} s" for name, s in CPU_SECONDS_PER_UPDATE.items())
    gpu = ", ".join(name for name in PRESETS if name not in CPU_SECONDS_PER_UPDATE)
    return (f"transformer size ({cpu} per update on a 2-core CPU with --threads 1, at the default batch; "
            f"{gpu} need GPUs: --plan sizes them)")


def powersgd_uncompressed(model: DALLE, prefix: str = "") -> set[str]:
    """Names (with ``prefix``) of the parameters PowerSGD sends whole (paper appendix E: only the weight
    matrices are compressed): gains and biases, the lookup-table embeddings, the position embeddings (plain
    parameters) and the output layers (text head; image head, or the CodeEmbedding that is both)."""
    whole = {id(p) for p in model.head_parameters()} | {id(model.text_pos), id(model.row_emb), id(model.col_emb)}
    names = uncompressed_parameter_names(model) | {n for n, p in model.named_parameters() if id(p) in whole}
    return {prefix + n for n in names}
