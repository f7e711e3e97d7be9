"""CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017, "Hybrid CTC/attention").

The prefix score of a label sequence h is ``log sum`` over every CTC path whose collapsed
labels *start* with h; a hypothesis's score in a joint beam search is its attention log-
probability plus ``ctc_weight`` times the change of this score token by token. It never
increases as a prefix grows (longer prefixes match fewer paths), so a search that stops when
the best finished hypothesis beats every live one stays exact.

Per hypothesis g the scorer keeps the forward variables over the utterance's frames,
``r_n[t]`` / ``r_b[t]``: log-probability that frames 0..t emit exactly g, ending in a label /
in a blank. Extending g by every token c at once is two ``logcumsumexp`` scans over time
(the recursions are linear in probability space), ``[beams, V, T]`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class PrefixState:
    """Forward variables of the live hypotheses: ``r_n``, ``r_b`` ``[beams, T]``, ``last`` token
    ``[beams]`` (-1 for the empty prefix) and ``score`` ``[beams]``, each prefix's own score."""

    r_n: Tensor
    r_b: Tensor
    last: Tensor
    score: Tensor


class CTCPrefixScorer:
    """Prefix scores of one utterance's CTC posteriors.

    ``log_probs`` ``[T, V]`` (log-softmax over the vocabulary, only the utterance's frames);
    ``blank`` the CTC blank id; ``eos`` the id whose "extension" means the end of the
    sequence (scored with the whole-sequence probability).
    """

    def __init__(self, log_probs: Tensor, blank: int, eos: int) -> None:
        if log_probs.dim() != 2 or log_probs.shape[0] == 0:
            raise ValueError(f"log_probs must be [T, V] with T >= 1, got {tuple(log_probs.shape)}")
        self.x = log_probs.double()
        self.blank, self.eos = blank, eos
        # Cumulative log-probabilities over time, per token: the running products of the recursions.
        self.cum = self.x.cumsum(0)  # [T, V]

    def initial_state(self, beams: int) -> PrefixState:
        """``beams`` copies of the empty prefix: all blanks so far, score log 1 = 0."""
        frames = self.x.shape[0]
        r_b = self.cum[:, self.blank].expand(beams, frames).clone()
        r_n = torch.full((beams, frames), NEG_INF, dtype=torch.float64, device=self.x.device)
        last = torch.full((beams,), -1, dtype=torch.long, device=self.x.device)
        return PrefixState(r_n, r_b, last, torch.zeros(beams, dtype=torch.float64, device=self.x.device))

    def extend(self, state: PrefixState) -> tuple[Tensor, Tensor, Tensor]:
        """Scores of every one-token extension: ``(score [beams, V], r_n [beams, V, T], r_b [beams, V, T])``.

        ``score[:, eos]`` is the probability that the sequence ends there; the blank's column
        is -inf (it is not a label).
        """
        x, cum = self.x, self.cum
        frames, vocab = x.shape
        beams = state.r_n.shape[0]
        # phi[t]: paths that emit g by frame t and may start a new label c at frame t + 1;
        # a repeated label needs a blank in between, so only r_b counts when c == last.
        phi = torch.logaddexp(state.r_n, state.r_b)[:, None, :].expand(beams, vocab, frames).clone()
        repeat = torch.arange(vocab, device=x.device)[None, :] == state.last[:, None]  # [beams, V]
        phi[repeat] = state.r_b[:, None, :].expand(beams, vocab, frames)[repeat]
        empty = (state.last < 0)[:, None]  # [beams, 1]: the empty prefix may start c at frame 0

        # r_n[t] = (r_n[t-1] + phi[t-1]) * x[t, c], r_n[0] = x[0, c] for the empty prefix:
        # r_n[t] = cum[t, c] + log sum_{s < t} phi[s] / cum[s, c]  (+ the frame-0 start).
        cum_c = cum.t()[None]  # [1, V, T]
        start = torch.zeros(beams, vocab, 1, dtype=torch.float64, device=x.device)
        start = start.masked_fill(~empty[..., None], NEG_INF)  # log of the start at frame 0
        shifted = torch.cat([start, phi[..., :-1] - cum_c[..., :-1]], dim=-1)
        r_n = cum_c + torch.logcumsumexp(shifted, dim=-1)
        # r_b[t] = (r_n[t-1] + r_b[t-1]) * x[t, blank], r_b[0] = 0 probability.
        cum_b = cum[:, self.blank][None, None]  # [1, 1, T]
        into_blank = torch.cat([torch.full_like(r_n[..., :1], NEG_INF), r_n[..., :-1] - cum_b[..., :-1]], dim=-1)
        r_b = cum_b + torch.logcumsumexp(into_blank, dim=-1)
        # The prefix score: every frame at which c can start after g.
        starts = torch.cat([start, phi[..., :-1]], dim=-1) + x.t()[None]
        score = torch.logsumexp(starts, dim=-1)
        score[:, self.eos] = torch.logaddexp(state.r_n[:, -1], state.r_b[:, -1])
        score[:, self.blank] = NEG_INF
        return score, r_n, r_b

    @staticmethod
    def select(rows: Tensor, tokens: Tensor, score: Tensor, r_n: Tensor, r_b: Tensor) -> PrefixState:
        """The state of the hypotheses ``rows`` extended by ``tokens`` (both ``[beams]``), from ``extend``."""
        return PrefixState(r_n[rows, tokens], r_b[rows, tokens], tokens.clone(), score[rows, tokens])
