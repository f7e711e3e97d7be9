"""Character n-gram: a proper distribution, Witten-Bell by hand, and its pull in the beam search
(whose last test also pins a fixed bug: the search used to stop once `beam` hypotheses had ended,
however poor their scores, so a low-scoring early <eos> cut the fused search short)."""

import math

import pytest
import torch

from echo.ngram import NgramLM
from echo.text import CharTokenizer

TOK = CharTokenizer()


def test_every_context_gives_a_distribution_without_pad_or_bos():
    lm = NgramLM(["the cat sat", "the hat"], TOK, order=4)
    rows = lm.log_probs([[], TOK.encode("the", add_bos=False, add_eos=False), TOK.encode("zzz q", add_bos=False,
                                                                                            add_eos=False)])
    assert rows.shape == (3, TOK.vocab_size)
    assert torch.allclose(rows.exp().sum(-1), torch.ones(3), atol=1e-6)
    assert torch.isinf(rows[:, [TOK.pad_id, TOK.bos_id]]).all()
    assert torch.isfinite(rows[:, TOK.eos_id]).all()  # an unseen context still ends sentences


def test_unigram_is_witten_bell_over_uniform_by_hand():
    lm = NgramLM(["ab", "ac"], TOK, order=1)
    # Outputs seen: a twice, b once, c once, <eos> twice: 6 tokens of 4 types; the uniform base
    # spreads over every id but <pad> and <bos>.
    u = 1 / (TOK.vocab_size - 2)
    p = lm.log_probs([[]])[0].double().exp()
    a, b = TOK.stoi["a"], TOK.stoi["b"]
    assert p[a].item() == pytest.approx((2 + 4 * u) / 10, rel=1e-6)
    assert p[b].item() == pytest.approx((1 + 4 * u) / 10, rel=1e-6)
    assert p[TOK.stoi["z"]].item() == pytest.approx(4 * u / 10, rel=1e-6)


def test_training_sentences_score_above_their_scrambles():
    texts = ["remember the window", "the window is open", "open the door"]
    lm = NgramLM(texts, TOK, order=6)
    for text in texts:
        ids = TOK.encode(text, add_bos=False)
        scrambled = TOK.encode(text[::-1], add_bos=False)
        assert lm.sentence_log_prob(ids) > lm.sentence_log_prob(scrambled) + 5
    near = TOK.encode("remembert the window", add_bos=False)
    assert lm.sentence_log_prob(TOK.encode(texts[0], add_bos=False)) > lm.sentence_log_prob(near) + math.log(10)


def test_from_file_reads_manifests_and_text(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"text": "Hello there"}\n{"text": "general"}\n')
    (tmp_path / "s.txt").write_text("hello there\n\ngeneral\n")
    a = NgramLM.from_file(tmp_path / "m.jsonl", TOK, order=3)
    b = NgramLM.from_file(tmp_path / "s.txt", TOK, order=3)
    prefixes = [[], TOK.encode("gen", add_bos=False, add_eos=False)]
    assert torch.equal(a.log_probs(prefixes), b.log_probs(prefixes))
    with pytest.raises(FileNotFoundError, match="language-model text"):
        NgramLM.from_file(tmp_path / "missing.jsonl", TOK)
    with pytest.raises(ValueError, match="order"):
        NgramLM(["a"], TOK, order=0)
    with pytest.raises(ValueError, match="at least one"):
        NgramLM([], TOK)


def test_a_heavily_weighted_lm_decides_the_search_and_fusion_needs_a_search():
    from echo.decode import decode_batch

    from .test_decode import _setup

    m, mel, ml, f0 = _setup(seed=3)
    m.cfg.max_decode_len = 12
    lm = NgramLM(["abba"] * 5, TOK, order=6)
    abba = TOK.encode("abba", add_bos=False, add_eos=False)
    for decoder in ("attention", "joint"):
        plain = decode_batch(m, mel, ml, f0, decoder=decoder, beam=2)
        assert plain != [abba] * 3  # so that the next line says something
        assert decode_batch(m, mel, ml, f0, decoder=decoder, beam=2, lm=lm, lm_weight=100.0) == [abba] * 3
    assert decode_batch(m, mel, ml, f0, beam=1, lm=lm, lm_weight=0.0) == decode_batch(m, mel, ml, f0, beam=1)
    with pytest.raises(ValueError, match="decoder 'attention' or 'joint'"):
        decode_batch(m, mel, ml, f0, decoder="ctc", lm=lm, lm_weight=0.3)
    with pytest.raises(ValueError, match="needs an lm"):
        decode_batch(m, mel, ml, f0, decoder="joint", lm_weight=0.3)
