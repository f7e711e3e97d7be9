"""``python -m echo demo --out DIR``: build a small corpus if missing, train ``configs/tiny.yaml`` for a
few minutes on CPU, print test WER/CER and the transcription of one held-out utterance."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch


def run_demo(out: str | Path, *, config: str | Path = "configs/tiny.yaml", corpus: str | Path = "data/corpus",
             minutes: float = 10.0, max_steps: int | None = None, n_train: int = 4000, n_eval: int = 200,
             extra: list[str] | None = None) -> dict:
    """The demo pipeline; returns ``{"wer", "cer", "audio", "reference", "hypothesis"}``. The schedule
    is fitted to ``minutes`` (``train.fit_schedule``), capped at ``max_steps`` (None: the config's)."""
    from echo.evaluate import evaluate_manifest
    from echo.train import load_config, train

    corpus = Path(corpus)
    if not all((corpus / f"{s}.jsonl").exists() for s in ("train", "dev", "test")):
        print(f"building a corpus in {corpus} ({n_train} train / {n_eval} dev / {n_eval} test utterances)")
        subprocess.run([sys.executable, "-m", "echo.data.synth", "--out", str(corpus), "--train", str(n_train),
                        "--dev", str(n_eval), "--test", str(n_eval), "--seed", "0"], check=True)
    out = Path(out)
    overrides = [f"train.out_dir={out / 'run'}", f"train.max_minutes={minutes}", "train.fit_schedule=true",
                 f"data.corpus={corpus}", f"data.cache_dir={corpus / 'cache'}"]
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    overrides += extra or []
    if not torch.cuda.is_available():
        overrides.append("train.device=cpu")
    cfg = load_config(config, overrides)
    result = train(cfg, resume=True)
    ckpt = out / "run" / "best.pt"
    if not ckpt.exists():
        ckpt = out / "run" / "last.pt"
    print(f"trained {result['step']} steps in {result['minutes']:.1f} min; scoring {ckpt} on the test split")
    # The decoder of the headline numbers: joint CTC/attention beam search with the training
    # transcripts' n-gram fused in (docs/results/tiny.md).
    scores = evaluate_manifest(ckpt, corpus / "test.jsonl", cache_dir=corpus / "cache",
                               errors_path=out / "test_errors.tsv", decoder="joint", beam=4,
                               lm=corpus / "train.jsonl")
    first = scores["rows"][0]
    from echo.data.dataset import read_manifest

    audio = read_manifest(corpus / "test.jsonl")[0]["audio"]
    print(f"test WER {scores['wer'] * 100:.2f}%  CER {scores['cer'] * 100:.2f}%  ({scores['utterances']} utterances, "
          f"held-out voices and sentences; joint CTC/attention beam 4 with the training text's n-gram)")
    print(f"example: {audio}\n  reference:  {first['ref']}\n  hypothesis: {first['hyp']}")
    return {"wer": scores["wer"], "cer": scores["cer"], "audio": audio, "reference": first["ref"],
            "hypothesis": first["hyp"]}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m echo demo", description=__doc__)
    p.add_argument("--out", required=True, help="folder for the run, checkpoints and error listing")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget")
    p.add_argument("--max-steps", type=int, default=None,
                   help="longest schedule (default: the config's); it is shortened to the steps that fit in --minutes")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    run_demo(args.out, config=args.config, corpus=args.corpus, minutes=args.minutes, max_steps=args.max_steps,
             extra=args.set)
    return 0
