"""Text normalisation and Echo's tokenizers: characters, or byte-pair-encoded word pieces.

``normalize_text`` is the single definition of "the words that count": it is applied to
training targets and to both sides of WER scoring (jiwer), so the model is never charged
for casing or punctuation.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Typographic apostrophes / primes that should count as the ASCII apostrophe.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_NOT_ALLOWED = re.compile(r"[^a-z0-9' ]+")
# An apostrophe only survives between two word characters (don't, sarah's), so quotes
# like 'hello' lose theirs.
_LONE_APOSTROPHE = re.compile(r"(?<![a-z0-9])'|'(?![a-z0-9])")
_SPACES = re.compile(r" +")


def normalize_text(text: str) -> str:
    """Lowercase, drop accents, turn punctuation into spaces, collapse whitespace.

    Digits are kept as digits ("Room 42." -> "room 42"); apostrophes are kept inside
    words only ("Don't 'stop'" -> "don't stop"). Punctuation becomes a space rather than
    vanishing so that "one,two" still reads as two words.
    """
    text = unicodedata.normalize("NFKD", text.translate(_APOSTROPHES))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = _NOT_ALLOWED.sub(" ", text)
    text = _LONE_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


class CharTokenizer:
    """Character-level tokenizer: specials, then space, apostrophe, a-z, 0-9.

    Ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the characters
    (40 ids in total with the default alphabet).
    """

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    DEFAULT_CHARS = " '" + "abcdefghijklmnopqrstuvwxyz" + "0123456789"

    def __init__(self, chars: str = DEFAULT_CHARS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer alphabet has repeated characters")
        self.specials = [self.PAD, self.BOS, self.EOS, self.UNK]
        self.chars = chars
        self.itos: list[str] = self.specials + list(chars)
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding / output layer size)."""
        return len(self.itos)

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True,
               normalize: bool = True) -> list[int]:
        """Text -> ids ``[<bos>] + chars + [<eos>]``; unknown characters map to ``<unk>``."""
        if normalize:
            text = normalize_text(text)
        ids = [self.stoi.get(c, self.unk_id) for c in text]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Stops at the first ``<eos>``; skips pad/bos; ``<unk>`` becomes ``?``.

        Accepts a list or a 1-D tensor/array of ints.
        """
        out = []
        for i in (int(x) for x in ids):
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id) or not 0 <= i < len(self.itos):
                continue
            out.append("?" if i == self.unk_id else self.itos[i])
        return "".join(out)

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the tokenizer (JSON-friendly); see :func:`tokenizer_from_state`."""
        return {"type": "char", "itos": self.itos}

    def save(self, path: str | Path) -> None:
        """Write :meth:`state` as JSON."""
        Path(path).write_text(json.dumps(self.state(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`; refuses other formats."""
        data = json.loads(Path(path).read_text())
        itos = data.get("itos", [])
        if data.get("type") != "char" or itos[:4] != [cls.PAD, cls.BOS, cls.EOS, cls.UNK]:
            raise ValueError(f"{path} is not a CharTokenizer file")
        return cls("".join(itos[4:]))


class BpeTokenizer(CharTokenizer):
    """Byte-pair-encoded word pieces over the character alphabet, learned from training transcripts.

    Ids: the four specials, the characters (as :class:`CharTokenizer`), then one id per learned
    merge in the order it was learned. Every word is encoded with its leading space (" the"),
    so a piece never spans two words and decoding is concatenation. Larger units than characters
    let the decoder learn whole frequent words instead of spelling them letter by letter.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], chars: str = CharTokenizer.DEFAULT_CHARS) -> None:
        super().__init__(chars)
        self.merges = [(str(a), str(b)) for a, b in merges]
        self._rank = {pair: rank for rank, pair in enumerate(self.merges)}
        for a, b in self.merges:
            if a not in self.stoi or b not in self.stoi or a + b in self.stoi:
                raise ValueError(f"merge ({a!r}, {b!r}) needs known pieces and must make a new one")
            self.stoi[a + b] = len(self.itos)
            self.itos.append(a + b)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, chars: str = CharTokenizer.DEFAULT_CHARS) -> BpeTokenizer:
        """Learn merges until the vocabulary has ``vocab_size`` ids (specials and characters included).

        Greedy BPE on word counts of the normalised ``texts``: each round merges the most frequent
        adjacent pair (ties broken by the pair's text, so training is deterministic).
        """
        base = len(CharTokenizer(chars))
        if not isinstance(vocab_size, int) or vocab_size < base:
            raise ValueError(f"vocab_size must be an int >= {base} (specials and characters), got {vocab_size!r}")
        counts = Counter(" " + w for text in texts for w in normalize_text(text).split())
        words = {tuple(w): n for w, n in counts.items()}
        merges: list[tuple[str, str]] = []
        while base + len(merges) < vocab_size:
            pairs: Counter[tuple[str, str]] = Counter()
            for pieces, n in words.items():
                for pair in itertools.pairwise(pieces):
                    pairs[pair] += n
            if not pairs:
                raise ValueError(f"the training text supports at most {base + len(merges)} ids, asked for {vocab_size}")
            best = min(pairs, key=lambda pair: (-pairs[pair], pair))
            merges.append(best)
            words = {_merge_pair(pieces, best): n for pieces, n in words.items()}
        return cls(merges, chars)

    def _encode_word(self, word: str) -> list[int]:
        if word not in self._cache:
            pieces = tuple(word)
            while len(pieces) > 1:
                ranked = [(self._rank.get(pair, len(self._rank)), pair) for pair in itertools.pairwise(pieces)]
                rank, pair = min(ranked)
                if rank == len(self._rank):
                    break
                pieces = _merge_pair(pieces, pair)
            self._cache[word] = [self.stoi.get(p, self.unk_id) for p in pieces]
        return self._cache[word]

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True,
               normalize: bool = True) -> list[int]:
        """Text -> ids ``[<bos>] + pieces + [<eos>]``; characters outside the alphabet map to ``<unk>``."""
        if normalize:
            text = normalize_text(text)
        ids = [i for word in text.split(" ") if word for i in self._encode_word(" " + word)]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, as :meth:`CharTokenizer.decode`, without the first word's leading space."""
        text = super().decode(ids)
        return text.removeprefix(" ")

    def state(self) -> dict[str, Any]:
        return {"type": "bpe", "chars": self.chars, "merges": [list(m) for m in self.merges]}

    @classmethod
    def load(cls, path: str | Path) -> BpeTokenizer:
        """Read a tokenizer written by :meth:`save`; refuses other formats."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("type") != "bpe":
            raise ValueError(f"{path} is not a BpeTokenizer file")
        return tokenizer_from_state(data)


def _merge_pair(pieces: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``pieces`` with every non-overlapping occurrence of ``pair`` (left to right) joined into one."""
    out: list[str] = []
    i = 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return tuple(out)


TOKENIZER_KINDS = ("char", "bpe")


def tokenizer_from_state(state: Any) -> CharTokenizer:
    """Rebuild a tokenizer from its :meth:`~CharTokenizer.state` (or the bare ``itos`` list of
    checkpoints written before word pieces existed)."""
    if isinstance(state, list):
        state = {"type": "char", "itos": state}
    kind = state.get("type") if isinstance(state, dict) else None
    if kind == "char" and state.get("itos", [])[:4] == [CharTokenizer.PAD, CharTokenizer.BOS, CharTokenizer.EOS,
                                                         CharTokenizer.UNK]:
        return CharTokenizer("".join(state["itos"][4:]))
    if kind == "bpe":
        return BpeTokenizer([tuple(m) for m in state["merges"]], state["chars"])
    raise ValueError(f"not a tokenizer state (type must be one of {TOKENIZER_KINDS}): {str(state)[:80]}")
