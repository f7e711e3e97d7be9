"""The deterministic sentence generator."""

from echo.data.sentences import (
    SentenceGenerator,
    gerund,
    past,
    plural,
    split_sentences,
    third_person,
    vocabulary,
)
from echo.text import normalize_text


def test_deterministic_and_seed_dependent() -> None:
    a = SentenceGenerator(3).unique(50)
    assert a == SentenceGenerator(3).unique(50)
    assert a != SentenceGenerator(4).unique(50)


def test_splits_disjoint_and_sized() -> None:
    s = split_sentences({"train": 300, "dev": 40, "test": 40}, seed=0)
    assert [len(s[k]) for k in ("train", "dev", "test")] == [300, 40, 40]
    train, dev, test = (set(s[k]) for k in ("train", "dev", "test"))
    assert len(train) == 300 and not train & dev and not train & test and not dev & test


def test_sentences_are_normalised_and_in_length_range() -> None:
    gen = SentenceGenerator(0)
    vocab = set(vocabulary())
    for s in gen.unique(500):
        words = s.split()
        assert gen.min_words <= len(words) <= gen.max_words
        assert normalize_text(s) == s  # the transcript is already in target form
        assert set(words) <= vocab


def test_vocabulary_is_a_few_thousand_words() -> None:
    assert len(vocabulary()) > 2500
    used = {w for s in SentenceGenerator(0).unique(2000) for w in s.split()}
    assert len(used) > 1500


def test_inflection() -> None:
    assert [plural(w) for w in ("box", "baby", "knife", "child", "day")] == [
        "boxes", "babies", "knives", "children", "days"]
    assert [past(w) for w in ("stop", "carry", "bake", "see", "play")] == [
        "stopped", "carried", "baked", "saw", "played"]
    assert [gerund(w) for w in ("lie", "make", "swim", "agree")] == [
        "lying", "making", "swimming", "agreeing"]
    assert [third_person(w) for w in ("fix", "cry", "go", "play")] == [
        "fixes", "cries", "goes", "plays"]
