"""Decoding for :class:`echo.model.Echo`: autoregressive greedy and beam search with a key/value
cache, a cache-free greedy reference (used by tests to prove the cache exact), greedy CTC on the
encoder's CTC head, and ``transcribe``.

Shapes: B batch, T mel frames, T' encoder frames, V vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from echo.ctc_prefix import CTCPrefixScorer
from echo.files import read_checkpoint
from echo.model import Echo, EchoConfig, EncoderOutput, model_from_checkpoint
from echo.ngram import NgramLM
from echo.text import CharTokenizer


def _length_limits(model: Echo, enc_lengths: Tensor, max_len: int | None) -> Tensor:
    """Most decoding steps per utterance ``[B]`` (tokens plus ``<eos>``), the same in every search.

    A token never takes less than 20 ms in this data (two mel frames), so the audio's length bounds
    the output and stops a looping hypothesis early; per utterance, so that an utterance decodes
    the same alone or in a batch.
    """
    limits = -(-enc_lengths * model.cfg.subsample // 2) + 2
    return limits.clamp(max=max_len or model.cfg.max_decode_len)


@torch.no_grad()
def greedy_decode(
    model: Echo, mel: Tensor, mel_lengths: Tensor, f0: Tensor | None, *, max_len: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy transcription of a padded batch: mel ``[B, T, n_mels]``, mel_lengths ``[B]``, f0 ``[B, T]``.

    Returns one token-id list per utterance (without ``<bos>``/``<eos>``). ``use_cache=False`` re-runs
    the decoder on the whole prefix at each step: the slow reference the cache must reproduce.
    """
    cfg = model.cfg
    enc = model.encode(mel, mel_lengths, f0 if cfg.pitch else None)
    batch = mel.shape[0]
    device = mel.device
    limits = _length_limits(model, enc.lengths, max_len)
    steps = int(limits.max())
    tokens = torch.full((batch, 1), cfg.bos_id, dtype=torch.long, device=device)
    token_f0 = torch.zeros(batch, 1, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = model.init_cache(enc) if use_cache else None
    for n in range(steps):
        if use_cache:
            logits, cross = model.step(tokens[:, -1], token_f0[:, -1], enc, cache)
        else:
            all_logits, all_cross = model.decode(tokens, None, enc, token_f0, return_cross=True)
            logits, cross = all_logits[:, -1], all_cross[:, -1]
        logits[:, never_emitted(cfg)] = float("-inf")
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, cfg.eos_id), nxt)
        est = model.estimate_token_f0(cross, enc)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        token_f0 = torch.cat([token_f0, (est if est is not None else torch.zeros_like(nxt, dtype=torch.float))[:, None]], 1)
        done |= (nxt == cfg.eos_id) | (n + 1 >= limits)
        if bool(done.all()):
            break
    return [_strip(row.tolist(), cfg.eos_id) for row in tokens[:, 1:]]


def never_emitted(cfg: EchoConfig, *, ctc: bool = False) -> list[int]:
    """Ids no search may emit because no training target holds them: ``<pad>``, ``<bos>`` and
    ``<unk>`` (targets are normalised into the tokenizer's alphabet); for the CTC head ``<bos>``,
    ``<eos>`` and ``<unk>`` (its targets are the bare tokens; ``<pad>`` is its blank)."""
    if ctc:
        return [cfg.bos_id, cfg.eos_id, cfg.unk_id]
    return [cfg.pad_id, cfg.bos_id, cfg.unk_id]


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _select(enc: EncoderOutput, index: Tensor) -> EncoderOutput:
    def pick(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.index_select(0, index)

    stats = None if enc.stats is None else type(enc.stats)(*(pick(s) for s in enc.stats))
    return EncoderOutput(pick(enc.states), pick(enc.lengths), pick(enc.f0), stats)


@dataclass
class _Search:
    """One utterance's beam search between steps: the live hypotheses' token lists (their scores are
    rows of the batched score tensor) and the finished ones as ``(ranking score, tokens)``."""

    seqs: list[list[int]]
    finished: list[tuple[float, list[int]]] = field(default_factory=list)

    def result(self, live_scores: list[float]) -> list[int]:
        """The best finished hypothesis; with none, the best live one (the first of equals), whose
        scores are ``live_scores``."""
        if not self.finished:
            best = max(range(len(live_scores)), key=lambda r: (live_scores[r], -r))
            self.finished.append((live_scores[best], self.seqs[best]))
        return max(self.finished, key=lambda f: f[0])[1]


@dataclass
class _Expansion:
    """The next beam of one utterance: rows of its current beam to continue, extended by ``last``."""

    rows: list[int]
    seqs: list[list[int]]
    last: list[int]
    scores: list[float]


def _expand(search: _Search, top_scores: list[float], top_index: list[int], vocab: int, beam: int, eos: int,
            length_penalty: float) -> _Expansion | None:
    """Walks one utterance's best ``2 * beam`` candidates (flat ``row * vocab + token``, best first):
    ``<eos>`` finishes a hypothesis, the first ``beam`` others form the next beam, padded with dead
    copies (score -inf) so that every utterance keeps ``beam`` rows. None: the search is over."""
    rows, seqs, last, scores = [], [], [], []
    for s, flat in zip(top_scores, top_index):
        if s == float("-inf"):
            break
        row, tok = divmod(flat, vocab)
        if tok == eos:
            search.finished.append((s / max(len(search.seqs[row]) + 1, 1) ** length_penalty, search.seqs[row]))
            continue
        rows.append(row)
        seqs.append(search.seqs[row] + [tok])
        last.append(tok)
        scores.append(s)
        if len(rows) == beam:
            break
    best_finished = max((f[0] for f in search.finished), default=float("-inf"))
    # Scores only decrease, so with no length penalty a finished hypothesis that beats every live
    # one is final; a penalty can favour longer ones later, so that search stops once it holds
    # `beam` finished hypotheses.
    if not rows or (best_finished >= max(scores) if length_penalty == 0 else len(search.finished) >= beam):
        return None
    while len(rows) < beam:
        rows.append(rows[0])
        seqs.append(seqs[0])
        last.append(last[0])
        scores.append(float("-inf"))
    return _Expansion(rows, seqs, last, scores)


@torch.no_grad()
def beam_search(
    model: Echo, mel: Tensor, mel_lengths: Tensor, f0: Tensor | None, *, beam: int = 4,
    max_len: int | None = None, length_penalty: float = 0.0, ctc_weight: float = 0.0,
    lm: NgramLM | None = None, lm_weight: float = 0.0,
) -> list[list[int]]:
    """Beam search over a padded batch: each utterance's ``beam`` hypotheses are rows of one cached
    decoder batch, and an utterance leaves the batch when its search ends. The rows never mix, so
    every utterance gets the search it would get alone, up to the last bits of batched matrix
    products (a GPU may pick other kernels for other batch sizes; on CPU the transcripts agree).

    Scores are summed log-probabilities; finished hypotheses are ranked by
    ``score / len ** length_penalty``. With ``length_penalty == 0`` the search stops as soon as the
    best finished hypothesis beats every live beam (scores only decrease). ``beam=1`` follows the
    greedy path, and returns an earlier ending (``<eos>`` as the runner-up token) instead when that
    scored higher than where the greedy path ends.
    ``ctc_weight`` > 0: joint CTC/attention decoding, each token scored
    ``(1 - w) log p_att + w (change of the CTC prefix score)`` (:mod:`echo.ctc_prefix`).
    ``lm`` with ``lm_weight`` > 0: shallow fusion, ``lm_weight * log p_lm(token | prefix)`` added to
    every token's score (:mod:`echo.ngram`).
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    if lm_weight < 0 or (lm_weight > 0 and lm is None):
        raise ValueError(f"lm_weight must be >= 0 and needs an lm, got {lm_weight} with lm={lm!r}")
    cfg = model.cfg
    device = mel.device
    enc_all = model.encode(mel, mel_lengths, f0 if cfg.pitch else None)
    limits = _length_limits(model, enc_all.lengths, max_len).tolist()
    batch = mel.shape[0]

    def rows_of(utterances: list[int]) -> Tensor:
        return torch.tensor(utterances, device=device, dtype=torch.long).repeat_interleave(beam)

    active = list(range(batch))  # utterances still searching, in order; utterance active[i] owns rows i*beam...
    enc = _select(enc_all, rows_of(active))
    cache = model.init_cache(enc)
    scorer = ctc_state = None
    if ctc_weight > 0:
        scorer = CTCPrefixScorer(_ctc_log_probs(model, enc_all), cfg.pad_id, cfg.eos_id, lengths=enc_all.lengths)
        ctc_state = scorer.initial_state(beam)
    searches = [_Search([[] for _ in range(beam)]) for _ in range(batch)]
    results: list[list[int]] = [[] for _ in range(batch)]
    last = torch.full((batch * beam,), cfg.bos_id, dtype=torch.long, device=device)
    last_f0 = torch.zeros(batch * beam, device=device)
    scores = torch.full((batch * beam,), float("-inf"), device=device)
    scores[::beam] = 0.0  # an utterance's beams start identical: expand only the first
    for n in range(max(limits, default=0)):
        logits, cross = model.step(last, last_f0, enc, cache)
        est = model.estimate_token_f0(cross, enc)
        step_scores = logits.float().log_softmax(-1)
        if scorer is not None:
            ctc_scores = scorer.extend(ctc_state)
            ctc_gain = (ctc_scores - ctc_state.score[:, None]).float()
            step_scores = (1.0 - ctc_weight) * step_scores + ctc_weight * ctc_gain
        if lm is not None and lm_weight > 0:
            prefixes = [seq for u in active for seq in searches[u].seqs]
            step_scores = step_scores + lm_weight * lm.log_probs(prefixes).to(step_scores.device)
        step_scores[:, never_emitted(cfg)] = float("-inf")
        vocab = step_scores.shape[1]
        total = (scores[:, None] + step_scores).view(len(active), beam * vocab)
        top_scores, top_index = total.topk(min(2 * beam, beam * vocab), dim=1)
        still, keep, new_last, new_scores = [], [], [], []
        for i, (u, u_scores, u_index) in enumerate(zip(active, top_scores.tolist(), top_index.tolist())):
            search = searches[u]
            expansion = _expand(search, u_scores, u_index, vocab, beam, cfg.eos_id, length_penalty)
            if expansion is not None:
                search.seqs = expansion.seqs
            if expansion is None or n + 1 >= limits[u]:
                live = expansion.scores if expansion is not None else scores[i * beam:(i + 1) * beam].tolist()
                results[u] = search.result(live)
                continue
            still.append(u)
            keep += [i * beam + r for r in expansion.rows]
            new_last += expansion.last
            new_scores += expansion.scores
        if not still:
            break
        index = torch.tensor(keep, device=device)
        # Hypotheses move only within their utterance's rows, so the encoder's rows change only
        # when an utterance leaves.
        cross_index = None
        if len(still) < len(active):
            enc = _select(enc_all, rows_of(still))
            staying = set(still)
            cross_index = torch.tensor([i * beam + r for i, u in enumerate(active) if u in staying for r in range(beam)],
                                       device=device)
        model.reorder_cache(cache, index, cross_index)
        last = torch.tensor(new_last, device=device)
        if scorer is not None:
            ctc_state = scorer.select(ctc_state, index, last, ctc_scores)
        last_f0 = est.index_select(0, index) if est is not None else torch.zeros(len(keep), device=device)
        scores = torch.tensor(new_scores, device=device)
        active = still
    return results


def _ctc_log_probs(model: Echo, enc: EncoderOutput) -> Tensor:
    """The CTC head's log-posteriors ``[B, T', V]`` (float32)."""
    if model.ctc_head is None:
        raise ValueError("CTC decoding needs a model trained with a CTC head (model.ctc_weight > 0)")
    return model.ctc_head(enc.states).float().log_softmax(-1)


def ctc_greedy_decode(model: Echo, mel: Tensor, mel_lengths: Tensor, f0: Tensor | None) -> list[list[int]]:
    """Best path of the encoder's CTC head: per-frame argmax, repeats merged, blanks (the pad id) dropped."""
    enc = model.encode(mel, mel_lengths, f0 if model.cfg.pitch else None)
    log_probs = _ctc_log_probs(model, enc)
    log_probs[..., never_emitted(model.cfg, ctc=True)] = float("-inf")
    best = log_probs.argmax(-1)
    result = []
    for path, length in zip(best.tolist(), enc.lengths.tolist()):
        ids, previous = [], None
        for token in path[:length]:
            if token != previous and token != model.cfg.pad_id:
                ids.append(token)
            previous = token
        result.append(ids)
    return result


DECODERS = ("attention", "ctc", "joint")
JOINT_CTC_WEIGHT = 0.5
LM_WEIGHT = 0.3


def decode_batch(model: Echo, mel: Tensor, mel_lengths: Tensor, f0: Tensor | None, *, beam: int = 1,
                 max_len: int | None = None, decoder: str = "attention",
                 ctc_weight: float = JOINT_CTC_WEIGHT, lm: NgramLM | None = None,
                 lm_weight: float = 0.0) -> list[list[int]]:
    """Token ids for a padded batch: the attention decoder, greedy (``beam == 1``) or beam search;
    greedy CTC (``decoder="ctc"``, beam ignored); or joint CTC/attention search (``decoder="joint"``,
    ``beam`` hypotheses, the CTC prefix score weighted by ``ctc_weight``). ``lm``/``lm_weight``:
    shallow fusion of a token n-gram (:class:`~echo.ngram.NgramLM`) into the attention or joint search."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    fusion = lm_weight > 0
    if decoder == "ctc":
        if fusion:
            raise ValueError("language-model fusion needs decoder 'attention' or 'joint' (greedy CTC has no search)")
        return ctc_greedy_decode(model, mel, mel_lengths, f0)
    if decoder == "attention" and beam == 1 and not fusion:
        return greedy_decode(model, mel, mel_lengths, f0, max_len=max_len)
    return beam_search(model, mel, mel_lengths, f0, beam=beam, max_len=max_len,
                       ctc_weight=ctc_weight if decoder == "joint" else 0.0, lm=lm, lm_weight=lm_weight)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--device`` and the search options, shared by ``transcribe`` and ``evaluate``;
    :func:`check_decoding_arguments` checks them after parsing."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a training checkpoint: best.pt or last.pt of a run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    parser.add_argument("--beam", type=int, default=1, help="hypotheses kept (default 1 = greedy)")
    parser.add_argument("--decoder", choices=DECODERS, default="attention",
                        help="attention (default): autoregressive decoder; ctc: greedy CTC on the encoder; "
                             "joint: attention and CTC prefix scores together (what training's dev scores use)")
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help=f"weight of the CTC prefix score with --decoder joint (default {JOINT_CTC_WEIGHT})")
    parser.add_argument("--lm", default=None, metavar="FILE",
                        help="fuse an n-gram of the checkpoint's tokens trained on FILE: a manifest (.jsonl; use the training "
                             "split's, never the test's) or one sentence per line")
    parser.add_argument("--lm-weight", type=float, default=None,
                        help=f"weight of the n-gram's log-probabilities with --lm (default {LM_WEIGHT})")


def check_decoding_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad or conflicting options of :func:`add_decoding_arguments` with the parser's usage
    error, before the model loads (an option that would be ignored is refused too), and fill in
    the weights' defaults."""
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device} is not available here (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if args.beam < 1:
        parser.error(f"--beam must be >= 1, got {args.beam}")
    if args.decoder == "ctc" and (args.beam > 1 or args.lm is not None):
        parser.error("--decoder ctc is greedy: --beam and --lm need --decoder attention or joint")
    if args.ctc_weight is not None and args.decoder != "joint":
        parser.error("--ctc-weight needs --decoder joint")
    if args.ctc_weight is not None and not 0.0 <= args.ctc_weight <= 1.0:
        parser.error(f"--ctc-weight must be in [0, 1], got {args.ctc_weight}")
    if args.lm_weight is not None and args.lm is None:
        parser.error("--lm-weight needs --lm")
    if args.lm_weight is not None and not args.lm_weight > 0:
        parser.error(f"--lm-weight must be > 0, got {args.lm_weight}")
    if args.lm is not None and not Path(args.lm).is_file():
        parser.error(f"--lm {args.lm}: no such file")
    args.ctc_weight = JOINT_CTC_WEIGHT if args.ctc_weight is None else args.ctc_weight
    args.lm_weight = LM_WEIGHT if args.lm_weight is None else args.lm_weight


def load_lm(path: str | Path | None, tokenizer: CharTokenizer) -> NgramLM | None:
    """The ``--lm`` argument as a :class:`NgramLM` (None stays None)."""
    return None if path is None else NgramLM.from_file(path, tokenizer)


# Pieces of a long recording decoded together: bounded, so an hour of audio needs no more memory.
PIECES_PER_BATCH = 16


def transcribe_file(model: Echo, tokenizer: CharTokenizer, path: str | Path, *, max_seconds: float | None = None,
                    beam: int = 1, decoder: str = "attention", ctc_weight: float = JOINT_CTC_WEIGHT,
                    lm: NgramLM | None = None, lm_weight: float = LM_WEIGHT) -> str:
    """Transcript of one audio file (any soundfile format, channels averaged, resampled to 16 kHz)
    on the model's device. ``lm``: a fused n-gram (:func:`load_lm`), None for no fusion.

    A recording longer than ``max_seconds`` (give the longest clip the model was trained on) is
    cut at its pauses into utterance-sized pieces of speech (:func:`echo.audio.split_at_pauses`),
    decoded in batches of ``PIECES_PER_BATCH``, and their texts joined: a model trained on single utterances makes
    words of long silences and loses its place in long recordings. Raises ``ValueError`` for a
    file without samples.
    """
    from echo.audio import compute_features, load_audio, split_at_pauses
    from echo.data.dataset import pad_features

    wave = load_audio(path)
    if wave.numel() == 0:
        raise ValueError(f"{path} has no audio samples")
    pieces = split_at_pauses(wave, max_seconds) if max_seconds else [wave]
    device = next(model.parameters()).device
    texts = []
    for first in range(0, len(pieces), PIECES_PER_BATCH):
        mels, f0s = zip(*(compute_features(p) for p in pieces[first:first + PIECES_PER_BATCH]), strict=True)
        mel, lengths, f0 = (t.to(device) for t in pad_features(mels, f0s))
        ids = decode_batch(model, mel, lengths, f0, beam=beam, decoder=decoder, ctc_weight=ctc_weight,
                           lm=lm, lm_weight=lm_weight if lm is not None else 0.0)
        texts += [tokenizer.decode(i) for i in ids]
    return " ".join(text for text in texts if text)


def main(argv: list[str] | None = None) -> int:
    """``python -m echo transcribe --checkpoint CKPT FILE.wav ...``: one line ``FILE<TAB>text`` per
    file, printed as soon as it is decoded; a file that cannot be read is reported on stderr, the
    others are still transcribed, and the exit status is then 1."""
    import soundfile as sf

    p = argparse.ArgumentParser(prog="python -m echo transcribe", description="Transcribe audio files.")
    add_decoding_arguments(p)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cut longer recordings at pauses into pieces of at most this many seconds (default: "
                        "the longest training clip, the checkpoint's data.max_duration; 0 = never cut)")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ...: anything soundfile reads)")
    args = p.parse_args(argv)
    check_decoding_arguments(p, args)
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        p.error(f"no such audio file: {', '.join(missing)}")
    if args.max_seconds is not None and not (args.max_seconds == 0 or 1 <= args.max_seconds < math.inf):
        p.error(f"--max-seconds must be 0 (never cut) or a finite number of seconds >= 1, got {args.max_seconds}")
    ckpt = read_checkpoint(args.checkpoint, args.device)
    model, tokenizer = model_from_checkpoint(ckpt, args.device)
    max_seconds = ckpt["config"]["data"].get("max_duration") if args.max_seconds is None else args.max_seconds
    lm = load_lm(args.lm, tokenizer)
    status = 0
    for path in args.files:
        try:
            text = transcribe_file(model, tokenizer, path, max_seconds=max_seconds, beam=args.beam,
                                   decoder=args.decoder, ctc_weight=args.ctc_weight, lm=lm,
                                   lm_weight=args.lm_weight)
        except (ValueError, sf.LibsndfileError) as e:
            print(f"{path}: cannot transcribe: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}\t{text}", flush=True)
    return status
