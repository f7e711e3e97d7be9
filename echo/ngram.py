"""Token n-gram language model (characters or word pieces) for shallow fusion in Echo's beam search.

A tiny model trained for minutes learns the sounds well before it learns to spell: its
hypotheses are full of near-words ("remembert", "shidy"). An n-gram over the tokenizer's ids
trained on the *training* transcripts knows which letter sequences are words and which words
follow which; the search adds ``lm_weight * log p_lm(token | last order-1 tokens)`` to every token's score
(shallow fusion). Build it only from text the model may legitimately know, never from the
test transcripts.

Smoothing: interpolated Witten-Bell, which needs no held-out data,
``p(w | h) = (c(h, w) + n(h) p(w | h')) / (c(h) + n(h))`` with ``n(h)`` the number of distinct
tokens seen after ``h`` and ``h'`` the context without its oldest token, down to a uniform
distribution over every token but ``<pad>`` and ``<bos>``.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from echo.text import CharTokenizer

DEFAULT_ORDER = 6  # characters: lowest dev perplexity of orders 4-12 on the synthetic corpus (2.91 per character)


class NgramLM:
    """N-gram of ``order`` over a tokenizer's ids (context = the ``order - 1`` previous tokens, ``<bos>`` included)."""

    def __init__(self, texts: Iterable[str], tokenizer: CharTokenizer, order: int = DEFAULT_ORDER) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        self.order, self.vocab_size, self.bos_id = order, tokenizer.vocab_size, tokenizer.bos_id
        # Every token after the first (<bos>) with each of its contexts of 0 to order - 1 tokens:
        # the (n + 1)-grams of each sentence, counted by Counter over zip (a loop per token and
        # context length in Python took ~2 s for the 4000 training transcripts).
        grams: Counter[tuple[int, ...]] = Counter()
        sentences = 0
        for text in texts:
            ids = tokenizer.encode(text)
            sentences += 1
            grams.update(zip(ids[1:]))
            for n in range(1, order):
                grams.update(zip(*(ids[i:] for i in range(n + 1))))
        if not sentences:
            raise ValueError("an n-gram model needs at least one training text")
        self._counts: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        for gram, count in grams.items():
            self._counts[gram[:-1]][gram[-1]] = count
        base = torch.ones(self.vocab_size, dtype=torch.float64)
        base[[tokenizer.pad_id, tokenizer.bos_id]] = 0.0
        self._uniform = base / base.sum()
        self._probs: dict[tuple[int, ...], Tensor] = {}
        self._log_probs: dict[tuple[int, ...], Tensor] = {}

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: CharTokenizer, order: int = DEFAULT_ORDER) -> NgramLM:
        """Trained on a manifest (``.jsonl``: every record's ``text``) or a text file (one sentence per line)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"language-model text {path} not found")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            lines = [json.loads(line)["text"] for line in lines]
        return cls(lines, tokenizer, order)

    def _prob(self, context: tuple[int, ...]) -> Tensor:
        if context in self._probs:
            return self._probs[context]
        lower = self._prob(context[1:]) if context else self._uniform
        seen = self._counts.get(context)
        if seen:
            counts = torch.zeros(self.vocab_size, dtype=torch.float64)
            counts[list(seen)] = torch.tensor(list(seen.values()), dtype=torch.float64)
            types = len(seen)
            p = (counts + types * lower) / (counts.sum() + types)
        else:
            p = lower
        self._probs[context] = p
        return p

    def log_probs(self, prefixes: Sequence[Sequence[int]]) -> Tensor:
        """``[N, V]`` float32 log p(next token | prefix) for token-id prefixes (``<bos>`` not included)."""
        rows = []
        for prefix in prefixes:
            context = tuple([self.bos_id, *prefix][-(self.order - 1):]) if self.order > 1 else ()
            row = self._log_probs.get(context)
            if row is None:
                row = self._log_probs[context] = self._prob(context).log().float()
            rows.append(row)
        return torch.stack(rows)

    def sentence_log_prob(self, ids: Sequence[int]) -> float:
        """log p of a token-id sentence (no ``<bos>``, ``<eos>`` included if it should count)."""
        return math.fsum(float(self.log_probs([ids[:t]])[0, tok]) for t, tok in enumerate(ids))
