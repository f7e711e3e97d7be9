"""CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017, "Hybrid CTC/attention").

The prefix score of a label sequence h is ``log sum`` over every CTC path whose collapsed
labels *start* with h; a hypothesis's score in a joint beam search is its attention log-
probability plus ``ctc_weight`` times the change of this score token by token. It never
increases as a prefix grows (longer prefixes match fewer paths), so a search that stops when
the best finished hypothesis beats every live one stays exact.

Per hypothesis g the scorer keeps the forward variables over its utterance's frames,
``r_n[t]`` / ``r_b[t]``: log-probability that frames 0..t emit exactly g, ending in a label /
in a blank. Extending g by every token c at once is two ``logcumsumexp`` scans over time
(the recursions are linear in probability space), ``[hypotheses, V, T]`` in float64. The
hypotheses of a batch of utterances are scored together: each row knows its utterance, and
frames past an utterance's length take no part in its scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class PrefixState:
    """Forward variables of the live hypotheses: ``r_n``, ``r_b`` ``[rows, T]`` (meaningful up to the
    utterance's length), ``last`` token ``[rows]`` (-1 for the empty prefix), ``score`` ``[rows]``,
    each prefix's own score, and ``utt`` ``[rows]``, the utterance each hypothesis belongs to."""

    r_n: Tensor
    r_b: Tensor
    last: Tensor
    score: Tensor
    utt: Tensor


class CTCPrefixScorer:
    """Prefix scores of CTC posteriors: one utterance or a padded batch.

    ``log_probs`` ``[T, V]`` (one utterance, every frame its own) or ``[B, T, V]`` with ``lengths``
    ``[B]`` (each utterance's frames; all T when omitted), log-softmax over the vocabulary;
    ``blank`` the CTC blank id; ``eos`` the id whose "extension" means the end of the sequence
    (scored with the whole-sequence probability). An utterance's scores are the ones it gets
    alone, whatever the batch: the time scans never look ahead, and padded frames are masked.
    """

    def __init__(self, log_probs: Tensor, blank: int, eos: int, lengths: Tensor | None = None) -> None:
        if log_probs.dim() == 2:
            if lengths is not None:
                raise ValueError("lengths go with a batch of log_probs [B, T, V], got [T, V]")
            log_probs = log_probs[None]
        if log_probs.dim() != 3 or log_probs.shape[0] == 0 or log_probs.shape[1] == 0:
            raise ValueError(f"log_probs must be [T, V] or [B, T, V] with B, T >= 1, got {tuple(log_probs.shape)}")
        batch, frames, _ = log_probs.shape
        device = log_probs.device
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (batch,) or bool((lengths < 1).any()) or bool((lengths > frames).any()):
            raise ValueError(f"lengths must be [{batch}] frame counts in 1..{frames}, got {lengths.tolist()}")
        self.blank, self.eos, self.lengths = blank, eos, lengths
        self.valid = torch.arange(frames, device=device)[None, :] < lengths[:, None]  # [B, T]
        # Padded frames get log 1 for every token, so the running sums stay finite (and unchanged) there.
        self.x = log_probs.double().masked_fill(~self.valid[..., None], 0.0)
        # Cumulative log-probabilities over time, per token: the running products of the recursions.
        self.cum = self.x.cumsum(1)  # [B, T, V]

    def initial_state(self, beams: int) -> PrefixState:
        """``beams`` copies of the empty prefix per utterance (rows ``b * beams ...``): all blanks so
        far, score log 1 = 0."""
        batch = self.x.shape[0]
        utt = torch.arange(batch, device=self.x.device).repeat_interleave(beams)
        r_b = self.cum[utt, :, self.blank].masked_fill(~self.valid[utt], NEG_INF)
        r_n = torch.full_like(r_b, NEG_INF)
        last = torch.full((utt.numel(),), -1, dtype=torch.long, device=self.x.device)
        return PrefixState(r_n, r_b, last, torch.zeros_like(r_b[:, 0]), utt)

    def extend(self, state: PrefixState) -> tuple[Tensor, Tensor, Tensor]:
        """Scores of every one-token extension: ``(score [rows, V], r_n [rows, V, T], r_b [rows, V, T])``.

        ``score[:, eos]`` is the probability that the sequence ends there; the blank's column
        is -inf (it is not a label).
        """
        x, cum = self.x.index_select(0, state.utt), self.cum.index_select(0, state.utt)  # [rows, T, V]
        rows, frames, vocab = x.shape
        # phi[t]: paths that emit g by frame t and may start a new label c at frame t + 1;
        # a repeated label needs a blank in between, so only r_b counts when c == last.
        phi = torch.logaddexp(state.r_n, state.r_b)[:, None, :].expand(rows, vocab, frames).clone()
        repeat = torch.arange(vocab, device=x.device)[None, :] == state.last[:, None]  # [rows, V]
        phi[repeat] = state.r_b[:, None, :].expand(rows, vocab, frames)[repeat]
        empty = (state.last < 0)[:, None]  # [rows, 1]: the empty prefix may start c at frame 0

        # r_n[t] = (r_n[t-1] + phi[t-1]) * x[t, c], r_n[0] = x[0, c] for the empty prefix:
        # r_n[t] = cum[t, c] + log sum_{s < t} phi[s] / cum[s, c]  (+ the frame-0 start).
        cum_c = cum.transpose(1, 2)  # [rows, V, T]
        start = torch.zeros(rows, vocab, 1, dtype=torch.float64, device=x.device)
        start = start.masked_fill(~empty[..., None], NEG_INF)  # log of the start at frame 0
        shifted = torch.cat([start, phi[..., :-1] - cum_c[..., :-1]], dim=-1)
        r_n = cum_c + torch.logcumsumexp(shifted, dim=-1)
        # r_b[t] = (r_n[t-1] + r_b[t-1]) * x[t, blank], r_b[0] = 0 probability.
        cum_b = cum[:, None, :, self.blank]  # [rows, 1, T]
        into_blank = torch.cat([torch.full_like(r_n[..., :1], NEG_INF), r_n[..., :-1] - cum_b[..., :-1]], dim=-1)
        r_b = cum_b + torch.logcumsumexp(into_blank, dim=-1)
        # The prefix score: every frame of the utterance at which c can start after g.
        starts = torch.cat([start, phi[..., :-1]], dim=-1) + x.transpose(1, 2)
        starts = starts.masked_fill(~self.valid.index_select(0, state.utt)[:, None, :], NEG_INF)
        score = torch.logsumexp(starts, dim=-1)
        end = (self.lengths.index_select(0, state.utt) - 1)[:, None]  # each row's last frame
        score[:, self.eos] = torch.logaddexp(state.r_n.gather(1, end), state.r_b.gather(1, end))[:, 0]
        score[:, self.blank] = NEG_INF
        return score, r_n, r_b

    @staticmethod
    def select(state: PrefixState, rows: Tensor, tokens: Tensor, score: Tensor, r_n: Tensor, r_b: Tensor
               ) -> PrefixState:
        """The hypotheses ``rows`` of ``state`` extended by ``tokens`` (both ``[rows']``), from ``extend``'s
        ``score``, ``r_n``, ``r_b``."""
        return PrefixState(r_n[rows, tokens], r_b[rows, tokens], tokens.clone(), score[rows, tokens],
                           state.utt.index_select(0, rows))
