"""CTC prefix scores against brute force: every path of a tiny lattice enumerated and summed."""

import itertools
import math

import pytest
import torch

from echo.ctc_prefix import CTCPrefixScorer

BLANK, EOS = 0, 3


def _collapse(path):
    out, previous = [], None
    for token in path:
        if token != previous and token != BLANK:
            out.append(token)
        previous = token
    return out


def _brute_force(log_probs, prefix, exact=False):
    """log of the summed probability of the paths whose labels start with (or, exact, equal) ``prefix``."""
    frames, vocab = log_probs.shape
    total = 0.0
    for path in itertools.product(range(vocab), repeat=frames):
        labels = _collapse(path)
        if (labels == prefix) if exact else (labels[: len(prefix)] == prefix):
            total += math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
    return math.log(total) if total > 0 else float("-inf")


def _walk(scorer, prefix):
    """Scores of ``prefix`` + every token, reached by extending one token at a time from the empty prefix."""
    state = scorer.initial_state(1)
    for token in prefix:
        state = scorer.select(state, torch.tensor([0]), torch.tensor([token]), scorer.extend(state))
    return state, scorer.extend(state)[0]


@pytest.mark.parametrize("prefix", [[], [1], [2], [1, 1], [1, 2], [2, 1], [1, 2, 1]])
def test_prefix_scores_match_enumeration(prefix):
    # Normalised in float64: a prefix score assumes every frame's probabilities sum to 1.
    log_probs = torch.randn(5, 5, generator=torch.Generator().manual_seed(len(prefix) * 7 + sum(prefix))) \
        .double().log_softmax(-1)
    scorer = CTCPrefixScorer(log_probs, BLANK, EOS)
    state, extended = _walk(scorer, prefix)
    assert float(state.score[0]) == pytest.approx(_brute_force(log_probs, prefix) if prefix else 0.0, abs=1e-9)
    for token in (1, 2, 4):
        assert float(extended[token]) == pytest.approx(_brute_force(log_probs, prefix + [token]), abs=1e-9)
    # <eos>: the labels are exactly the prefix.
    assert float(extended[EOS]) == pytest.approx(_brute_force(log_probs, prefix, exact=True), abs=1e-9)
    assert extended[BLANK] == float("-inf")


def test_full_sequence_score_is_the_ctc_likelihood():
    log_probs = torch.randn(12, 6, generator=torch.Generator().manual_seed(3)).double().log_softmax(-1)
    target = [1, 2, 2, 4]
    scorer = CTCPrefixScorer(log_probs, BLANK, EOS)
    _, extended = _walk(scorer, target)
    nll = torch.nn.functional.ctc_loss(log_probs[:, None], torch.tensor([target]), torch.tensor([12]),
                                       torch.tensor([4]), blank=BLANK, reduction="sum")
    assert float(extended[EOS]) == pytest.approx(-float(nll), abs=1e-9)


def test_scores_never_increase_along_a_prefix():
    log_probs = torch.randn(10, 6, generator=torch.Generator().manual_seed(5)).log_softmax(-1)
    scorer = CTCPrefixScorer(log_probs, BLANK, EOS)
    state = scorer.initial_state(2)
    for token in (1, 4, 4, 2):
        score = scorer.extend(state)
        assert bool((score <= state.score[:, None] + 1e-12).all())
        state = scorer.select(state, torch.tensor([0, 1]), torch.tensor([token, token]), score)


def test_bad_posteriors_are_named():
    with pytest.raises(ValueError, match="log_probs"):
        CTCPrefixScorer(torch.zeros(0, 5), BLANK, EOS)


def test_a_padded_batch_scores_each_utterance_as_alone():
    # Three utterances of 7, 3 and 1 frames in one [3, 7, V] batch (garbage in the padding): every
    # hypothesis's scores and forward variables are those of its utterance scored alone.
    gen = torch.Generator().manual_seed(11)
    lengths = [7, 3, 1]
    batch = torch.randn(3, 7, 6, generator=gen).double().log_softmax(-1)
    batch[1, 3:] = 50.0
    batch[2, 1:] = float("nan")
    scorer = CTCPrefixScorer(batch, BLANK, EOS, lengths=torch.tensor(lengths))
    alone = [CTCPrefixScorer(batch[b, :n], BLANK, EOS) for b, n in enumerate(lengths)]
    state, states = scorer.initial_state(2), [s.initial_state(2) for s in alone]
    assert state.utt.tolist() == [0, 0, 1, 1, 2, 2]
    rows = torch.tensor([1, 0, 3, 2, 5, 4])
    for tokens in ([1, 2], [4, 4], [EOS, 1]):  # the first step keeps rows 0, 1 of each utterance
        score = scorer.extend(state)
        state = scorer.select(state, rows, torch.tensor(tokens * 3), score)
        assert state.utt.tolist() == [0, 0, 1, 1, 2, 2]
        for b, (single, own) in enumerate(zip(alone, states)):
            own_score = single.extend(own)
            n = lengths[b]
            assert torch.equal(score[2 * b:2 * b + 2], own_score)
            states[b] = single.select(own, torch.tensor([1, 0]), torch.tensor(tokens), own_score)
            assert torch.equal(state.r_n[2 * b:2 * b + 2, :n], states[b].r_n)
            assert torch.equal(state.r_b[2 * b:2 * b + 2, :n], states[b].r_b)
    # Hypotheses leave the batch: the utterance of each remaining row follows it.
    state = scorer.select(state, torch.tensor([4, 1]), torch.tensor([2, 2]), scorer.extend(state))
    assert state.utt.tolist() == [2, 0]
    score = scorer.extend(state)
    assert not score.isnan().any() and torch.isfinite(score[1, [1, 2, 4, EOS]]).all()
    assert score[0, 1] == float("-inf")  # one frame holds no third label


def test_bad_lengths_are_named():
    log_probs = torch.zeros(2, 4, 5)
    for lengths in (torch.tensor([4, 0]), torch.tensor([5, 1]), torch.tensor([4])):
        with pytest.raises(ValueError, match="lengths"):
            CTCPrefixScorer(log_probs, BLANK, EOS, lengths=lengths)
    with pytest.raises(ValueError, match="lengths go with a batch"):
        CTCPrefixScorer(log_probs[0], BLANK, EOS, lengths=torch.tensor([4]))
