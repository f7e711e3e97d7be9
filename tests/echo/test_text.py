"""Text normalisation and the character tokenizer."""

import pytest
import torch

from echo.text import CharTokenizer, normalize_text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("  Don't   STOP  ", "don't stop"),
        ("It\u2019s Sarah's 'quoted' word", "it's sarah's quoted word"),
        ("Room 42, floor 3.5", "room 42 floor 3 5"),
        ("one,two;three-four", "one two three four"),
        ("Caf\u00e9 na\u00efve", "cafe naive"),
        ("?!...", ""),
        ("tab\tand\nnewline", "tab and newline"),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_normalize_is_idempotent() -> None:
    s = normalize_text("We'll MEET at 10:30, O'Brien said -- 'fine'.")
    assert s == "we'll meet at 10 30 o'brien said fine"
    assert normalize_text(s) == s


def test_tokenizer_layout_and_round_trip() -> None:
    tok = CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 4 + 2 + 26 + 10
    ids = tok.encode("Hello, it's 2 o'clock!")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "hello it's 2 o'clock"
    # decode accepts tensors, skips padding and stops at <eos>
    padded = torch.tensor(ids + [tok.pad_id] * 3 + [tok.stoi["x"]])
    assert tok.decode(padded) == "hello it's 2 o'clock"
    assert tok.encode("ab", add_bos=False, add_eos=False) == [tok.stoi["a"], tok.stoi["b"]]


def test_unknown_characters_without_normalisation() -> None:
    tok = CharTokenizer()
    ids = tok.encode("a#b", normalize=False, add_bos=False, add_eos=False)
    assert ids == [tok.stoi["a"], tok.unk_id, tok.stoi["b"]]
    assert tok.decode(ids) == "a?b"


def test_save_load(tmp_path) -> None:
    tok = CharTokenizer()
    path = tmp_path / "tok.json"
    tok.save(path)
    back = CharTokenizer.load(path)
    assert back.itos == tok.itos
    assert back.encode("abc 9") == tok.encode("abc 9")
    path.write_text('{"type": "bpe"}')
    with pytest.raises(ValueError, match="not a CharTokenizer"):
        CharTokenizer.load(path)
