"""Pitch-feature ablation: ``python -m echo ablate --config configs/tiny.yaml --seeds 2``.

Trains the same budget with (a) plain RoPE and no bias, (b) f0-driven theta, (c) + variable radius,
(d) + pitch bias and (f) the bias alone with a fixed theta and unit radius (``configs/tiny.yaml``'s
choice), and on request (``--variants abcdef``) (e) f0 theta + bias with unit radius, for each seed;
scores dev and test (joint CTC/attention search with one hypothesis, as the project reports its
scores, and greedy attention and greedy CTC alone) and writes a Markdown table of mean +- spread
(sample standard deviation over seeds; 0 with one seed) to ``docs/results/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from echo.train import build_datasets, load_config, make_tokenizer, train

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "a": ("plain RoPE, no bias", ["model.pitch=false"]),
    "b": ("f0 theta", ["model.pitch=true", "model.theta_mode=f0", "model.radius_mode=unit", "model.bias=null"]),
    "c": ("f0 theta + radius", ["model.pitch=true", "model.theta_mode=f0", "model.radius_mode=f0", "model.bias=null"]),
    "d": ("f0 theta + radius + bias", ["model.pitch=true", "model.theta_mode=f0", "model.radius_mode=f0",
                                      "model.bias=exp"]),
    "e": ("f0 theta + bias, unit radius", ["model.pitch=true", "model.theta_mode=f0", "model.radius_mode=unit",
                                           "model.bias=exp"]),
    # configs/tiny.yaml's choice: the bias alone. The radius scales content logits down, and an
    # f0 rotary base generalised worse to unseen voices (docs/results/tiny.md, run 17).
    "f": ("bias only (fixed theta, unit radius)", ["model.pitch=true", "model.theta_mode=fixed",
                                                  "model.radius_mode=unit", "model.bias=exp"]),
}
# Run when none are named: the (a)-(d) and configs/tiny.yaml's own choice (f).
DEFAULT_VARIANTS = "abcdf"


# Scores per (split, decoder): "{split}_{decoder}_{wer|cer}"; the JSON keeps them all.
DECODER_TAGS = {"joint": "joint", "attention": "att", "ctc": "ctc"}
# Table columns (key, header). Joint search is what the project reports; greedy attention
# shows whether the decoder alone has learned to stop, greedy CTC reads the encoder alone.
COLUMNS = (("dev_joint_cer", "dev CER"), ("test_joint_wer", "test WER"), ("test_joint_cer", "test CER"),
           ("test_att_cer", "test CER (attention)"), ("test_ctc_cer", "test CER (CTC)"))
# The plot beside the table: test CER of each decoder.
PLOT_METRICS = (("test_joint_cer", "test CER, joint search"), ("test_att_cer", "test CER, greedy attention"),
                ("test_ctc_cer", "test CER, greedy CTC"))


def _label(v: str) -> str:
    """A variant as the table and the plot name it: "(a) plain RoPE, no bias"."""
    return f"({v}) {VARIANTS[v][0]}"


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_ablation(config: str | Path, *, seeds: int = 2, variants: str = DEFAULT_VARIANTS, out_dir: str | Path = "runs/ablation",
                 overrides: list[str] | None = None, results_path: str | Path = "docs/results/ablation.md",
                 quiet: bool = False, eval_max_utts: int = 0) -> dict[str, Any]:
    """Train and score every (variant, seed); write the Markdown table and a JSON of raw numbers.

    ``eval_max_utts`` > 0 scores only the first that many dev/test utterances (a cheaper, noisier table).
    """
    from echo.evaluate import evaluate_dataset
    from echo.model import load_model
    from echo.viz import plot_ablation
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if not variants:
        raise ValueError(f"variants must name at least one of {sorted(VARIANTS)}")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    raw: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    base = load_config(config, overrides)
    datasets = build_datasets(base, make_tokenizer(base))
    if eval_max_utts > 0:
        for split in ("dev", "test"):
            n = min(eval_max_utts, len(datasets[split]))
            datasets[split] = torch.utils.data.Subset(datasets[split], range(n))
    for v in variants:
        for seed in range(seeds):
            run_dir = Path(out_dir) / f"{v}_seed{seed}"
            cfg = load_config(config, [*(overrides or []), *VARIANTS[v][1], f"train.seed={seed}",
                                       f"train.out_dir={run_dir}"])
            result = train(cfg, resume=True, quiet=quiet)
            ckpt = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
            model, tokenizer = load_model(ckpt)
            # Training minutes across resumes (a finished run resumed for scoring keeps its time).
            row = {"seed": seed, "steps": result["step"], "minutes": result["minutes"]}
            decoders = tuple(DECODER_TAGS) if model.ctc_head is not None else ("attention",)
            for split in ("dev", "test"):
                for decoder in decoders:
                    m = evaluate_dataset(model, tokenizer, datasets[split], batch_size=cfg.train.eval_batch_size,
                                         progress=False, decoder=decoder)
                    tag = f"{split}_{DECODER_TAGS[decoder]}"
                    row[f"{tag}_wer"], row[f"{tag}_cer"] = m["wer"], m["cer"]
            raw[v].append(row)
            print(f"{_label(v)} seed {seed}: " + ", ".join(
                f"{k} {row[k] * 100:.2f}%" for k, _ in COLUMNS if k in row), flush=True)
    _write_table(raw, base, Path(results_path), config, seeds, {s: len(datasets[s]) for s in ("dev", "test")})
    Path(results_path).with_suffix(".json").write_text(json.dumps(raw, indent=1))
    plot_ablation({_label(v): rows for v, rows in raw.items()}, PLOT_METRICS, Path(results_path).with_suffix(".png"))
    return raw


NOTES_MARKER = "<!-- the table above is written by `python -m echo ablate`; what follows is kept -->"


def _write_table(raw: dict[str, list[dict[str, float]]], base: Any, path: Path, config: str | Path, seeds: int,
                 sizes: dict[str, int]) -> None:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        "# Pitch-feature ablation",
        "",
        (f"Config `{config}`, {seeds} seed(s) per variant, the same budget for each run "
        f"(max_steps {base.train.max_steps}, max_minutes {base.train.max_minutes or 'none'}"
        f"{', the schedule fitted to the minutes' if base.train.fit_schedule else ''}), "
        f"best-dev checkpoint, scored on {sizes['dev']} dev / {sizes['test']} test utterances: joint "
        f"CTC/attention search with one hypothesis (unlabelled columns), greedy attention decoding and "
        f"greedy CTC. Numbers are mean ± sample std over seeds, in %. Device: {device}."),
        "",
        "| variant | " + " | ".join(header for _, header in COLUMNS) + " | steps | minutes/run |",
        "| --- " * (len(COLUMNS) + 3) + "|",
    ]
    for v, rows in raw.items():
        cells = []
        for key, _ in COLUMNS:
            vals = [r[key] * 100 for r in rows if key in r]
            cells.append(f"{statistics.mean(vals):.2f} ± {_spread(vals):.2f}" if vals else "–")
        steps = statistics.mean(r["steps"] for r in rows)
        minutes = statistics.mean(r["minutes"] for r in rows)
        lines.append(f"| {_label(v)} | " + " | ".join(cells) + f" | {steps:.0f} | {minutes:.1f} |")
    # Whatever follows the marker in an earlier file (readings, plots, older tables) survives a re-run.
    notes = path.read_text().partition(NOTES_MARKER)[2] if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n" + NOTES_MARKER + (notes or "\n"))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m echo ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the config every variant starts from (e.g. configs/tiny.yaml)")
    p.add_argument("--seeds", type=int, default=2, help="training runs per variant, seeds 0.. (default 2)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"letters of the variants to run, a subset of {''.join(VARIANTS)!r} (default "
                        f"{DEFAULT_VARIANTS!r}; f is configs/tiny.yaml's choice)")
    p.add_argument("--out-dir", default="runs/ablation", help="one run folder per variant and seed (default runs/ablation)")
    p.add_argument("--results", default="docs/results/ablation.md",
                   help="the Markdown table to (re)write, a JSON of the raw scores beside it "
                        "(default docs/results/ablation.md; notes below its marker are kept)")
    p.add_argument("--eval-max-utts", type=int, default=0, help="score only the first N dev/test utterances")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every run (e.g. train.max_minutes=5)")
    args = p.parse_args(argv)
    run_ablation(args.config, seeds=args.seeds, variants=args.variants, out_dir=args.out_dir, overrides=args.set,
                 results_path=args.results, eval_max_utts=args.eval_max_utts)
    print(f"wrote {args.results}")
    return 0
