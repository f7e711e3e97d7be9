"""CTC prefix scores for joint CTC/attention decoding (Watanabe et al., 2017, "Hybrid CTC/attention").

The prefix score of a label sequence h is ``log sum`` over every CTC path whose collapsed
labels *start* with h; a hypothesis's score in a joint beam search is its attention log-
probability plus ``ctc_weight`` times the change of this score token by token. It never
increases as a prefix grows (longer prefixes match fewer paths), so a search that stops when
the best finished hypothesis beats every live one stays exact.

Per hypothesis g the scorer keeps the forward variables over its utterance's frames,
``r_n[t]`` / ``r_b[t]``: log-probability that frames 0..t emit exactly g, ending in a label /
in a blank. Scoring every extension of g by a token c is one ``logsumexp`` over time,
``[hypotheses, V, T]`` in float64; only the extensions a search keeps get their forward
variables, two ``logcumsumexp`` scans over time (the recursions are linear in probability
space). The hypotheses of a batch of utterances are scored together: each row knows its
utterance, and frames past an utterance's length take no part in its scores.
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
        self.xt = self.x.transpose(1, 2).contiguous()  # [B, V, T]: extend's scan runs over time

    def initial_state(self, beams: int) -> PrefixState:
        """``beams`` copies of the empty prefix per utterance (rows ``b * beams ...``): all blanks so
        far, score log 1 = 0."""
        batch = self.x.shape[0]
        utt = torch.arange(batch, device=self.x.device).repeat_interleave(beams)
        r_b = self.cum[utt, :, self.blank].masked_fill(~self.valid[utt], NEG_INF)
        r_n = torch.full_like(r_b, NEG_INF)
        last = torch.full((utt.numel(),), -1, dtype=torch.long, device=self.x.device)
        return PrefixState(r_n, r_b, last, torch.zeros_like(r_b[:, 0]), utt)

    def extend(self, state: PrefixState) -> Tensor:
        """Prefix scores of every one-token extension ``[rows, V]``: ``score[:, eos]`` is the probability
        that the sequence ends there; the blank's column is -inf (it is not a label). The forward
        variables of the extensions a search keeps come from :meth:`select`."""
        xt = self.xt.index_select(0, state.utt)  # [rows, V, T]
        # Paths that emit g by frame t - 1 may start the label c at frame t; a repeated label needs
        # a blank in between, so only r_b counts when c == last. The empty prefix may start c at 0.
        start = self._start(state.last)
        lead = torch.cat([start, torch.logaddexp(state.r_n, state.r_b)[:, :-1]], dim=-1)  # [rows, T]
        starts = lead[:, None, :] + xt
        repeat = (state.last >= 0).nonzero()[:, 0]
        last = state.last.index_select(0, repeat)
        starts[repeat, last] = torch.cat([start.index_select(0, repeat), state.r_b.index_select(0, repeat)[:, :-1]],
                                         dim=-1) + xt[repeat, last]
        starts = starts.masked_fill(~self.valid.index_select(0, state.utt)[:, None, :], NEG_INF)
        score = torch.logsumexp(starts, dim=-1)
        end = (self.lengths.index_select(0, state.utt) - 1)[:, None]  # each row's last frame
        score[:, self.eos] = torch.logaddexp(state.r_n.gather(1, end), state.r_b.gather(1, end))[:, 0]
        score[:, self.blank] = NEG_INF
        return score

    def select(self, state: PrefixState, rows: Tensor, tokens: Tensor, score: Tensor) -> PrefixState:
        """The hypotheses ``rows`` of ``state`` extended by ``tokens`` (both ``[rows']``), with ``score``,
        :meth:`extend`'s scores of ``state``."""
        r_n, r_b, last = state.r_n.index_select(0, rows), state.r_b.index_select(0, rows), state.last.index_select(0, rows)
        utt = state.utt.index_select(0, rows)
        phi = torch.where((tokens == last)[:, None], r_b, torch.logaddexp(r_n, r_b))  # as in extend
        # r_n[t] = (r_n[t-1] + phi[t-1]) * x[t, c], r_n[0] = x[0, c] for the empty prefix:
        # r_n[t] = cum[t, c] + log sum_{s < t} phi[s] / cum[s, c]  (+ the frame-0 start).
        cum_c = self.cum[utt, :, tokens]  # [rows', T]
        new_n = cum_c + torch.logcumsumexp(torch.cat([self._start(last), phi[:, :-1] - cum_c[:, :-1]], dim=-1), dim=-1)
        # r_b[t] = (r_n[t-1] + r_b[t-1]) * x[t, blank], r_b[0] = 0 probability.
        cum_b = self.cum[utt, :, self.blank]
        into_blank = torch.cat([torch.full_like(new_n[:, :1], NEG_INF), new_n[:, :-1] - cum_b[:, :-1]], dim=-1)
        new_b = cum_b + torch.logcumsumexp(into_blank, dim=-1)
        return PrefixState(new_n, new_b, tokens.clone(), score[rows, tokens], utt)

    def _start(self, last: Tensor) -> Tensor:
        """``[rows, 1]``: log of a label's start at frame 0, possible for the empty prefix only."""
        return torch.zeros(last.shape[0], 1, dtype=torch.float64, device=last.device).masked_fill(
            (last >= 0)[:, None], NEG_INF)
