"""Scoring: ``python -m echo evaluate --checkpoint CKPT --manifest test.jsonl`` prints WER and CER
(jiwer, on normalised text), the same per speech engine when the manifest names them, and writes
per-utterance errors to a TSV file."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import jiwer
import torch
from torch.utils.data import DataLoader, Dataset

from echo.data.dataset import Collator
from echo.decode import (
    JOINT_CTC_WEIGHT,
    LM_WEIGHT,
    add_decoding_arguments,
    check_decoding_arguments,
    decode_batch,
    load_lm,
)
from echo.model import Echo, load_model
from echo.ngram import NgramLM
from echo.text import CharTokenizer, normalize_text


def score(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Corpus WER and CER of normalised texts: errors over all utterances / reference words
    (characters). An utterance whose reference is empty adds no reference words, and every word
    (character) of its hypothesis counts as an insertion."""
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(refs, hyps, strict=True)]
    scored = [(r, h) for r, h in pairs if r]
    if not scored:
        raise ValueError("no utterance with a non-empty reference to score")
    r, h = [p[0] for p in scored], [p[1] for p in scored]
    words, chars = jiwer.process_words(r, h), jiwer.process_characters(r, h)
    extra = [h for r, h in pairs if not r and h]
    return {
        "wer": _error_rate(words, sum(len(x.split()) for x in extra)),
        "cer": _error_rate(chars, sum(len(x) for x in extra)),
        "utterances": len(pairs),
    }


def _error_rate(alignment: Any, insertions: int) -> float:
    """(S + D + I + ``insertions``) / reference length of a jiwer alignment."""
    errors = alignment.substitutions + alignment.deletions + alignment.insertions + insertions
    return float(errors / (alignment.hits + alignment.substitutions + alignment.deletions))


def score_groups(refs: list[str], hyps: list[str], groups: list[str]) -> dict[str, dict[str, float]]:
    """:func:`score` of each group of utterances (e.g. per speech engine), groups in sorted order;
    a group whose references are all empty (no error rate) is left out."""
    out = {}
    for name in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == name]
        if any(normalize_text(refs[i]) for i in members):
            out[name] = score([refs[i] for i in members], [hyps[i] for i in members])
    return out


@torch.no_grad()
def evaluate_dataset(
    model: Echo, tokenizer: CharTokenizer, dataset: Dataset, *, batch_size: int = 32, beam: int = 1,
    device: torch.device | str = "cpu", progress: bool = True, decoder: str = "attention",
    ctc_weight: float = JOINT_CTC_WEIGHT, lm: NgramLM | None = None, lm_weight: float = 0.0,
) -> dict[str, Any]:
    """Decode every utterance of a dataset of :class:`echo.data.dataset.Example` and score it.

    Returns ``{"wer", "cer", "utterances", "rows"}``; rows are ``{"ref", "hyp", "wer", "cer"}`` per
    utterance in dataset order.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collator(tokenizer.pad_id))
    refs, hyps = [], []
    for batch in tqdm(loader, desc="decode", disable=not progress, unit="batch"):
        b = batch.to(device)
        ids = decode_batch(model, b.mel, b.mel_lengths, b.f0, beam=beam, decoder=decoder, ctc_weight=ctc_weight,
                           lm=lm, lm_weight=lm_weight)
        hyps += [tokenizer.decode(x) for x in ids]
        refs += batch.texts
    model.train(was_training)
    result: dict[str, Any] = score(refs, hyps)
    rows = []
    for r, h in zip(refs, hyps):
        rn, hn = normalize_text(r), normalize_text(h)
        rows.append({"ref": rn, "hyp": hn, "wer": jiwer.wer(rn, hn) if rn else float("nan"),
                     "cer": jiwer.cer(rn, hn) if rn else float("nan")})
    result["rows"] = rows
    return result


def evaluate_manifest(checkpoint: str | Path, manifest: str | Path, *, beam: int = 1, batch_size: int = 32,
                      cache_dir: str | Path | None = None, errors_path: str | Path | None = None,
                      device: str = "cpu", progress: bool = True, decoder: str = "attention",
                      ctc_weight: float = JOINT_CTC_WEIGHT, lm: str | Path | None = None,
                      lm_weight: float = LM_WEIGHT) -> dict[str, Any]:
    """Score a checkpoint on a manifest; optionally write per-utterance errors (TSV) to ``errors_path``.
    ``result["by_engine"]``: :func:`score_groups` by the records' ``engine`` (when every record has one)."""
    from echo.data.dataset import SpeechDataset

    model, tokenizer = load_model(checkpoint, device)
    ngram = load_lm(lm, tokenizer)
    dataset = SpeechDataset(manifest, tokenizer, cache_dir=cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"manifest {manifest} has no utterances")
    result = evaluate_dataset(model, tokenizer, dataset, batch_size=batch_size, beam=beam, device=device,
                              progress=progress, decoder=decoder, ctc_weight=ctc_weight, lm=ngram,
                              lm_weight=lm_weight if ngram is not None else 0.0)
    if all("engine" in rec for rec in dataset.records):
        rows = result["rows"]
        result["by_engine"] = score_groups([r["ref"] for r in rows], [r["hyp"] for r in rows],
                                           [rec["engine"] for rec in dataset.records])
    if errors_path is not None:
        path = Path(errors_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["audio", "cer", "wer", "ref", "hyp"])
            for rec, row in zip(dataset.records, result["rows"]):
                w.writerow([rec["audio"], f"{row['cer']:.4f}", f"{row['wer']:.4f}", row["ref"], row["hyp"]])
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m echo evaluate --checkpoint CKPT --manifest test.jsonl [--errors FILE] [--beam N]``"""
    p = argparse.ArgumentParser(prog="python -m echo evaluate", description="WER/CER of a checkpoint on a manifest.")
    add_decoding_arguments(p)
    p.add_argument("--manifest", required=True, metavar="JSONL",
                   help="utterances to score: one JSON record per line with audio (relative to the manifest's "
                        "folder), text, duration, speaker and engine, as echo.data.synth writes them")
    p.add_argument("--batch-size", type=int, default=32, help="utterances decoded together (default 32)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: none)")
    p.add_argument("--errors", default=None, help="per-utterance TSV (default: next to the checkpoint, "
                                                  "named after the manifest and the search)")
    args = p.parse_args(argv)
    check_decoding_arguments(p, args)
    if not Path(args.manifest).is_file():
        p.error(f"--manifest {args.manifest}: no such file")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    # Each search gets its own default file, so scoring a checkpoint two ways keeps both tables.
    suffix = "" if args.decoder == "attention" else f".{args.decoder}"
    suffix += f".beam{args.beam}" if args.beam > 1 else ""
    suffix += ".lm" if args.lm else ""
    errors = args.errors or f"{Path(args.checkpoint).with_suffix('')}.{Path(args.manifest).stem}{suffix}.errors.tsv"
    result = evaluate_manifest(args.checkpoint, args.manifest, beam=args.beam, batch_size=args.batch_size,
                               cache_dir=args.cache_dir, errors_path=errors, device=args.device, decoder=args.decoder,
                               ctc_weight=args.ctc_weight, lm=args.lm, lm_weight=args.lm_weight)
    print(f"WER {result['wer'] * 100:.2f}%  CER {result['cer'] * 100:.2f}%  ({result['utterances']} utterances)")
    for engine, m in result.get("by_engine", {}).items():
        print(f"  {engine}: WER {m['wer'] * 100:.2f}%  CER {m['cer'] * 100:.2f}%  ({m['utterances']} utterances)")
    print(f"per-utterance errors: {errors}")
    return 0
