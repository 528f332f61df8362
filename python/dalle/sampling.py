"""Autoregressive image sampling with a key/value cache (paper section 2.2, appendix B.1).

Each layer keeps the keys and values of every position produced so far. A new image position ``i`` reads
only the keys its layer's mask allows: the indices come from the mask predicate
``dalle_kernels.masks.allowed(mask, i, j, ...)`` over ``j = 0..i`` (cached per mask and position), so a row
layer reads ``T + W + 1`` keys, a column layer ``T + r + 1``, a conv layer its window, whatever the grid.
The prompt (text, plus the first image tokens for image-prompt completion) is processed in one chunk under
the dense mask restricted to the prompt.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from dalle_kernels import masks as _masks

from .model import DALLE, check_id_range


def check_sampling_args(temperature=1.0, top_k=None, top_p=None, guidance=1.0) -> None:
    """``ValueError`` naming the argument unless ``temperature`` is a finite float >= 0, ``top_k`` None or a
    positive int, ``top_p`` None or a float in (0, 1] and ``guidance`` a finite float. Every sampling entry
    point calls it before drawing anything. A positive temperature below ``GREEDY_BELOW`` samples greedily."""
    for name, v in (("temperature", temperature), ("guidance", guidance)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the ``top_k`` largest and outside the smallest set of mass ``top_p``."""
    check_sampling_args(top_k=top_k, top_p=top_p)
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# Below this a positive temperature is greedy: float32 cannot hold it (``torch.finfo(torch.float32).tiny``), and the
# logits' differences divided by it are -inf for every token but the likeliest anyway.
GREEDY_BELOW = torch.finfo(torch.float32).tiny


def check_logits(logits: torch.Tensor, where: str = "sample_from_logits") -> None:
    """``ValueError`` naming ``where`` (the step) when a row of ``logits`` (B, V) holds NaN or +inf, or allows no
    token (every logit -inf): no token can be drawn from it, and argmax would silently pick the NaN's index."""
    bad = torch.isnan(logits).any(-1) | (logits == float("inf")).any(-1) | (logits == float("-inf")).all(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        kind = ("NaN" if bool(torch.isnan(logits[row]).any()) else "+inf"
                if bool((logits[row] == float("inf")).any()) else "only -inf")
        raise ValueError(f"{where}: row {row} of the logits holds {kind} ({int(bad.sum())} of {bad.numel()} rows "
                         "cannot be sampled); the model's output is not finite")


def sample_from_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None, where="sample_from_logits"):
    """One token per row of ``logits`` (B, V); ``temperature == 0`` is greedy, and so is a positive temperature
    below ``GREEDY_BELOW`` (arguments: ``check_sampling_args``). The logits are shifted by their row maximum before
    the division, so no temperature overflows them. ``ValueError`` naming ``where`` (the step) for a row holding
    NaN or +inf or allowing no token (``check_logits``)."""
    check_sampling_args(temperature, top_k, top_p)
    check_logits(logits, where)
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = logits.float()
    logits = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class KVCache:
    """Keys and values of every layer, ``(B, heads, N, head_dim)`` each, filled left to right."""

    def __init__(self, model: DALLE, batch: int, device, dtype):
        c = model.cfg
        shape = (batch, c.n_heads, c.seq_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layers)]
        self.length = 0


class Sampler:
    """Runs a ``DALLE`` model position by position with a ``KVCache``."""

    def __init__(self, model: DALLE):
        self.model = model
        self.cfg = model.cfg
        self._keys: dict[tuple[str, int], torch.Tensor] = {}

    def allowed_keys(self, mask: str, i: int, device) -> torch.Tensor:
        """Key positions ``j <= i`` that position ``i`` attends under ``mask`` (from the mask predicate)."""
        key = (mask, i)
        idx = self._keys.get(key)
        if idx is None or idx.device != torch.device(device):
            c = self.cfg
            j = torch.arange(i + 1)
            ok = _masks.allowed(mask, i, j, c.text_len, c.grid[0], c.grid[1], c.conv_kernel)
            idx = torch.nonzero(ok).flatten().to(device)
            self._keys[key] = idx
        return idx

    def _attend(self, q, k, v, allow=None):
        """Softmax attention of ``q`` over ``k``, ``v`` (every key, or those ``allow`` allows). A key or value
        holding NaN or inf reaches only the rows that may attend it, which come out NaN (``attention_ref``'s rule:
        a masked-out NaN would otherwise leak through its zero probability, 0 * NaN)."""
        k, v = k.float(), v.float()
        sees = None
        if allow is not None:
            bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
            if bool(bad.any()):
                k, v = k.masked_fill(bad[..., None], 0.0), v.masked_fill(bad[..., None], 0.0)
                sees = (allow & bad[..., None, :]).any(-1, keepdim=True)
        s = torch.matmul(q.float(), k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if allow is not None:
            s = s.masked_fill(~allow, float("-inf"))
        o = torch.matmul(torch.softmax(s, dim=-1), v)
        return (o if sees is None else o.masked_fill(sees, float("nan"))).to(q.dtype)

    def _run(self, x, cache: KVCache, start: int):
        """Positions ``start .. start + x.shape[1] - 1`` through every block; returns final-norm hidden states."""
        m, c = self.model, self.cfg
        n = x.shape[1]
        chunk_allow = None
        for l, block in enumerate(m.blocks):
            mask = block.attn.mask
            q, k, v = block.attn.split(block.ln1(x))
            cache.k[l][:, :, start: start + n] = k
            cache.v[l][:, :, start: start + n] = v
            if n == 1:
                idx = self.allowed_keys(mask, start, x.device)
                o = self._attend(q, cache.k[l][:, :, idx], cache.v[l][:, :, idx])
            else:
                if start != 0:
                    raise ValueError("a multi-position chunk must start at position 0")
                chunk_allow = _masks.dense_mask(mask, c.text_len, c.grid, c.conv_kernel, device=x.device)[:n, :n]
                o = self._attend(q, cache.k[l][:, :, :n], cache.v[l][:, :, :n], chunk_allow)
            x = x + block.attn.merge(o)
            x = x + block.mlp(x)
        cache.length = start + n
        return m.ln_f(x)

    def _embed(self, text, image_prefix, emb_w, pos_emb):
        m = self.model
        x = m.text_emb(text) + m.text_pos
        if image_prefix is not None and image_prefix.shape[1]:
            n = image_prefix.shape[1]
            x = torch.cat([x, F.embedding(image_prefix, emb_w) + pos_emb[:n]], dim=1)
        return x

    @torch.no_grad()
    def generate(self, text, image_prefix=None, temperature=1.0, top_k=None, top_p=None, generator=None,
                 return_logits=False, guidance=1.0, uncond_text=None):
        """Image tokens ``(B, H*W)`` for captions ``text`` ``(B, T)``.

        ``image_prefix`` ``(B, n)`` (or ``(B, rows, W)``): the first ``n`` raster tokens are given (image-prompt
        completion) and kept; the rest are sampled. ``guidance`` ``s != 1``: classifier-free guidance, each
        token drawn from ``u + s * (c - u)`` where ``c`` are the logits for the caption and ``u`` those for
        ``uncond_text`` (default: the empty caption, ``model.unconditional_text``), run in the same batch; a
        model trained with caption dropout (``dalle.train --cond-dropout``) knows the empty caption.
        ``return_logits``: also return the image logits used at each sampled position (after guidance),
        ``(B, H*W - n, image_vocab)`` in float32.
        """
        m, c = self.model, self.cfg
        m.check_tokens(text)
        check_sampling_args(temperature, top_k, top_p, guidance)
        B, dev = text.shape[0], text.device
        guidance = float(guidance)
        guided = guidance != 1.0
        n0 = 0
        if image_prefix is not None:
            if not isinstance(image_prefix, torch.Tensor):
                raise TypeError(f"image_prefix must be a LongTensor or None, got {type(image_prefix).__name__}")
            if image_prefix.dim() == 3:
                image_prefix = image_prefix.flatten(1)
            if image_prefix.dtype != torch.long or image_prefix.dim() != 2 or image_prefix.shape[0] != B \
                    or image_prefix.shape[1] >= c.image_len:
                raise ValueError(f"image_prefix must be a LongTensor ({B}, n) with n < {c.image_len}, got "
                                 f"{image_prefix.dtype} {tuple(image_prefix.shape)}")
            check_id_range(image_prefix, c.image_vocab, "image_prefix", "image_vocab")
            n0 = image_prefix.shape[1]
        if guided:
            if uncond_text is None:
                uncond_text = m.unconditional_text(B, dev)
            elif uncond_text.dim() == 1:
                uncond_text = uncond_text.to(dev).expand(B, -1)
            m.check_tokens(uncond_text)
            if uncond_text.shape[0] != B:
                raise ValueError(f"uncond_text must have {B} rows (or be one row), got {uncond_text.shape[0]}")
            text = torch.cat([text, uncond_text.to(dev)])
            if image_prefix is not None:
                image_prefix = image_prefix.repeat(2, 1)
        rows = text.shape[0]
        dtype = next(m.parameters()).dtype
        cache = KVCache(m, rows, dev, dtype)
        # computed once: a CodeEmbedding derives its vectors from the code features on every access
        emb_w = m.image_emb.weight
        head_w = m.image_head_weight()
        pos_emb = m.image_position_embedding()
        out = torch.empty(B, c.image_len, dtype=torch.long, device=dev)
        if n0:
            out[:, :n0] = image_prefix[:B]
        h = self._run(self._embed(text, image_prefix, emb_w, pos_emb), cache, 0)[:, -1]
        all_logits = []
        for k in range(n0, c.image_len):
            logits = m.image_logits(h, head_w).float()
            if guided:
                cond, unc = logits[:B], logits[B:]
                logits = unc + guidance * (cond - unc)
            if return_logits:
                all_logits.append(logits)
            out[:, k] = sample_from_logits(logits, temperature, top_k, top_p, generator,
                                           where=f"image token {k} of {c.image_len}")
            if k + 1 < c.image_len:
                pos = c.text_len + k
                tok = out[:, k: k + 1].repeat(2, 1) if guided else out[:, k: k + 1]
                x = F.embedding(tok, emb_w) + pos_emb[k: k + 1]
                h = self._run(x, cache, pos)[:, -1]
        if return_logits:
            return out, torch.stack(all_logits, dim=1)
        return out


def generate_images(model: DALLE, text, **kw):
    """``Sampler(model).generate(text, **kw)`` with the model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return Sampler(model).generate(text, **kw)
    finally:
        model.train(was_training)
