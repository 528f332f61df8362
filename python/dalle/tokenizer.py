"""Caption tokenizer: lowercased BPE (the ``tokenizers`` library) encoded to exactly ``T`` slots (paper section 2.2).

Unused slot ``i`` of a caption holds the per-slot padding id ``vocab_size + i``, so the transformer's text
embedding has ``vocab_size + T`` rows. BPE dropout (probability 0.1 by default) is applied only when
``encode_batch(..., dropout=True)``: the transformer's training batches.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .common import _atomic_write

UNK = "[UNK]"


def padding_ids(text_len: int, vocab_size: int, device=None) -> torch.Tensor:
    """``(text_len,)`` int64 slot layout of the empty caption: slot ``i`` holds ``vocab_size + i``."""
    return torch.arange(text_len, dtype=torch.long, device=device).add_(vocab_size)


class CaptionTokenizer:
    """A trained BPE tokenizer plus the fixed-length slot layout of the transformer's text stream."""

    def __init__(self, tokenizer: Tokenizer, dropout: float = 0.1):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self._tok = tokenizer
        self._tok.model.dropout = None
        self.dropout = dropout
        # A second instance for training mode: dropout is a property of the BPE model, and flipping it per
        # call on one shared instance would leak into concurrent deterministic encodes.
        self._tok_dropout = Tokenizer.from_str(tokenizer.to_str())
        self._tok_dropout.model.dropout = dropout if dropout > 0 else None

    @property
    def vocab_size(self) -> int:
        """Number of BPE ids (padding ids start here)."""
        return self._tok.get_vocab_size()

    @classmethod
    def load(cls, path, dropout: float = 0.1) -> "CaptionTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"{path} is not a tokenizers JSON file ({e})") from None
        return cls(tok, dropout=dropout)

    def save(self, path) -> Path:
        """Write ``tokenizer.json`` atomically (``path`` may be a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"

        return _atomic_write(path, lambda f: f.write(self._tok.to_str().encode()))

    def encode(self, caption: str, dropout: bool = False) -> list[int]:
        """BPE ids of one caption, no truncation or padding."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        return (self._tok_dropout if dropout else self._tok).encode(caption).ids

    def unknown_chars(self, caption: str) -> list[str]:
        """The pieces of ``caption`` that encode to [UNK] (characters outside the tokenizer's alphabet)."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        enc = self._tok.encode(caption)
        return [caption[a:b] for t, (a, b) in zip(enc.tokens, enc.offsets) if t == UNK]

    def encode_batch(self, captions, text_len: int, dropout: bool = False) -> torch.Tensor:
        """``(B, text_len)`` int64: BPE ids truncated to ``text_len``; unused slot ``i`` holds ``vocab_size + i``."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of str, not a single str")
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str")
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        tok = self._tok_dropout if dropout else self._tok
        out = padding_ids(text_len, self.vocab_size).repeat(len(captions), 1)
        for row, enc in enumerate(tok.encode_batch(captions)):
            ids = enc.ids[:text_len]
            if ids:
                out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        """Caption text of one row of ids; padding ids (``>= vocab_size``) are ignored, negative ones raise."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode takes one row of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"ids must be >= 0 (BPE ids, then padding ids from {self.vocab_size}), got {min(ids)}")
        ids = [i for i in ids if i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def decode_batch(self, ids) -> list[str]:
        return [self.decode(row) for row in ids]


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def train_tokenizer(captions: Iterable[str], vocab_size: int, path=None, dropout: float = 0.1) -> CaptionTokenizer:
    """Train lowercased BPE on ``captions`` (any iterable of str, read once and streamed: at most ``vocab_size``
    ids; fewer when the corpus runs out of merges) and save it to ``path`` (a file, or a folder that gets
    ``tokenizer.json``) when given. ``ValueError`` when no caption is non-empty; ``TypeError`` for a non-str."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if isinstance(captions, str):
        raise TypeError("captions must be an iterable of str, not a single str (it would train on its characters)")
    seen = [0]

    def stream():  # streamed to the trainer: the captions of a large dataset are never all held at once
        for c in captions:
            if not isinstance(c, str):
                raise TypeError(f"captions must be str, got {type(c).__name__}")
            if c.strip():
                seen[0] += 1
                yield c

    tok = _new_tokenizer()
    # Printable ASCII is always in the alphabet so that unseen letters and digits do not become [UNK].
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(stream(), trainer)
    if not seen[0]:
        raise ValueError("train_tokenizer needs at least one non-empty caption")
    out = CaptionTokenizer(tok, dropout=dropout)
    if path is not None:
        out.save(path)
    return out
