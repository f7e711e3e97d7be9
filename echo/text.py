"""Text normalisation and the character tokenizer used by Echo.

``normalize_text`` is the single definition of "the words that count": it is applied to
training targets and to both sides of WER scoring (jiwer), so the model is never charged
for casing or punctuation.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

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

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (``{"type": "char", "itos": [...]}``)."""
        Path(path).write_text(json.dumps({"type": "char", "itos": self.itos}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`; refuses other formats."""
        data = json.loads(Path(path).read_text())
        itos = data.get("itos", [])
        if data.get("type") != "char" or itos[:4] != [cls.PAD, cls.BOS, cls.EOS, cls.UNK]:
            raise ValueError(f"{path} is not a CharTokenizer file")
        return cls("".join(itos[4:]))
