"""Caption tokenizer: lowercased BPE (the ``tokenizers`` library) encoded to exactly ``T`` slots (paper section 2.2).

Unused slot ``i`` of a caption holds the per-slot padding id ``vocab_size + i``, so the transformer's text
embedding has ``vocab_size + T`` rows. BPE dropout (Provilkov et al. 2020, "BPE-Dropout"; probability 0.1 by
default) is applied only when ``encode_batch(..., dropout=True)``: the transformer's training batches. The
``tokenizers`` library draws its dropout from an unseeded generator, so the dropout encodings are made here
instead, by the library's own merge procedure (``BPE::merge_all`` of ``tokenizers``) with a generator the caller
seeds: the same seed gives the same encodings, run after run.
"""
from __future__ import annotations

import heapq
import json
import random
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
        self._merges = None  # (vocab, {(left id, right id): (rank, merged id)}, unk id), built on first use

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

    def encode(self, caption: str, dropout: bool = False, rng: random.Random | None = None) -> list[int]:
        """BPE ids of one caption, no truncation or padding; with ``dropout``, each merge is skipped with
        probability ``self.dropout``, drawn from ``rng`` (a ``random.Random``; a fresh unseeded one when None)."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        if dropout and self.dropout > 0:
            return self._encode_dropout(caption, _check_rng(rng))
        return self._tok.encode(caption).ids

    def _merge_table(self):
        if self._merges is None:
            model = json.loads(self._tok.to_str())["model"]
            if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("fuse_unk") \
                    or model.get("byte_fallback"):
                raise ValueError("BPE dropout here supports plain BPE models (no continuing-subword prefix, end-of-"
                                 "word suffix, fused unknowns or byte fallback), as train_tokenizer makes them")
            vocab = model["vocab"]
            merges = {}
            for rank, m in enumerate(model["merges"]):
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                merges[(vocab[a], vocab[b])] = (rank, vocab[a + b])
            self._merges = (vocab, merges, vocab.get(model.get("unk_token") or UNK))
        return self._merges

    def _encode_dropout(self, caption: str, rng: random.Random) -> list[int]:
        """The ids of ``tokenizers``' BPE with dropout (normalizer, pre-tokenizer, then ``Word::merge_all``: the
        applicable merge of lowest rank, then of lowest position, is skipped with probability ``p`` and offered
        again after the next merge that is made), its draws taken from ``rng``."""
        vocab, merges, unk = self._merge_table()
        p = self.dropout
        text = self._tok.normalizer.normalize_str(caption) if self._tok.normalizer else caption
        out = []
        for word, _ in self._tok.pre_tokenizer.pre_tokenize_str(text):
            ids = [vocab.get(ch, unk) for ch in word]
            n = len(ids)
            nxt = list(range(1, n)) + [-1]
            prv = list(range(-1, n - 1))
            gone = [False] * n
            queue = [(merges[pair][0], i, merges[pair][1]) for i, pair in enumerate(zip(ids, ids[1:]))
                     if pair in merges]
            heapq.heapify(queue)
            skipped = []
            while queue:
                top = heapq.heappop(queue)
                if rng.random() < p:
                    skipped.append(top)
                    continue
                for t in skipped:
                    heapq.heappush(queue, t)
                skipped.clear()
                _, pos, new = top
                j = nxt[pos]
                if gone[pos] or j == -1 or merges.get((ids[pos], ids[j]), (0, None))[1] != new:
                    continue  # an expired entry
                ids[pos], gone[j], nxt[pos] = new, True, nxt[j]
                if nxt[j] != -1:
                    prv[nxt[j]] = pos
                for a, b in ((prv[pos], pos), (pos, nxt[pos])):  # the new pairs on either side of the merge
                    merge = merges.get((ids[a], ids[b])) if a >= 0 and b != -1 else None
                    if merge is not None:
                        heapq.heappush(queue, (merge[0], a, merge[1]))
            out += [t for t, g in zip(ids, gone) if not g and t is not None]
        return out

    def unknown_chars(self, caption: str) -> list[str]:
        """The pieces of ``caption`` that encode to [UNK] (characters outside the tokenizer's alphabet)."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        enc = self._tok.encode(caption)
        return [caption[a:b] for t, (a, b) in zip(enc.tokens, enc.offsets) if t == UNK]

    def encode_batch(self, captions, text_len: int, dropout: bool = False, rng: random.Random | None = None
                     ) -> torch.Tensor:
        """``(B, text_len)`` int64: BPE ids truncated to ``text_len``; unused slot ``i`` holds ``vocab_size + i``.
        With ``dropout``, BPE dropout drawn from ``rng`` as in ``encode`` (the captions in order, one generator)."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of str, not a single str")
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            raise TypeError("captions must be a list of str")
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be a positive int, got {text_len!r}")
        out = padding_ids(text_len, self.vocab_size).repeat(len(captions), 1)
        if dropout and self.dropout > 0:
            rng = _check_rng(rng)
            rows = [self._encode_dropout(c, rng) for c in captions]
        else:
            rows = [enc.ids for enc in self._tok.encode_batch(captions)]
        for row, ids in enumerate(rows):
            ids = ids[:text_len]
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


def _check_rng(rng):
    if rng is None:
        return random.Random()
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random (seeded by the caller) or None, got {type(rng).__name__}")
    return rng


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
