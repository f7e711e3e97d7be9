"""Text normalisation, the character tokenizer and the word-piece (BPE) tokenizer."""

import pytest
import torch

from echo.text import BpeTokenizer, CharTokenizer, normalize_text, tokenizer_from_state


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


SENTENCES = ["the cat sat on the mat", "the hat is on the cat", "that cat sat there", "Then the rat ran!",
             "a cat, a hat and a mat"]


def test_bpe_learns_frequent_pieces_and_round_trips() -> None:
    tok = BpeTokenizer.train(SENTENCES, 60)
    assert tok.vocab_size == 60 and tok.itos[:42] == CharTokenizer().itos
    assert tok.merges[0] == ("a", "t")  # in 12 words (cat, sat, hat, ...), more than any other pair
    assert tok.encode("the", add_bos=False, add_eos=False) == [tok.stoi[" the"]]
    for text in SENTENCES + ["unseen words zebra 42", "don't"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == normalize_text(text)
    assert len(tok.encode("the cat sat on the mat")) < len(CharTokenizer().encode("the cat sat on the mat"))
    # Pieces never span a word boundary: every piece after the first character of a word is space-free.
    for i in tok.encode("that cat sat there", add_bos=False, add_eos=False):
        assert " " not in tok.itos[i][1:]


def test_bpe_training_is_deterministic_and_order_free() -> None:
    a = BpeTokenizer.train(SENTENCES, 56)
    b = BpeTokenizer.train(list(reversed(SENTENCES)), 56)
    assert a.merges == b.merges


def test_bpe_unknown_characters_and_limits() -> None:
    tok = BpeTokenizer.train(SENTENCES, 50)
    ids = tok.encode("a#b", normalize=False, add_bos=False, add_eos=False)
    assert tok.unk_id in ids and tok.decode(ids) == "a?b"
    with pytest.raises(ValueError, match="at most"):
        BpeTokenizer.train(["ab ab"], 100)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 42"):
        BpeTokenizer.train(SENTENCES, 10)
    with pytest.raises(ValueError, match="merge"):
        BpeTokenizer([("x", "yz")])


def test_tokenizer_states_round_trip(tmp_path) -> None:
    bpe = BpeTokenizer.train(SENTENCES, 60)
    for tok in (CharTokenizer(), bpe):
        back = tokenizer_from_state(tok.state())
        assert type(back) is type(tok) and back.itos == tok.itos
        assert back.encode("the cat, zebra") == tok.encode("the cat, zebra")
    # Checkpoints from before word pieces stored the bare character list.
    assert tokenizer_from_state(CharTokenizer().itos).itos == CharTokenizer().itos
    path = tmp_path / "bpe.json"
    bpe.save(path)
    assert BpeTokenizer.load(path).merges == bpe.merges
    CharTokenizer().save(path)
    with pytest.raises(ValueError, match="not a BpeTokenizer"):
        BpeTokenizer.load(path)
    with pytest.raises(ValueError, match="not a tokenizer state"):
        tokenizer_from_state({"type": "words"})
