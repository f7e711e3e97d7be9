"""Echo training throughput (mel frames per second) with each attention backend, on CPU.

    python -m benchmarks.train_throughput [--config configs/tiny.yaml] [--backends reference cpu]
                                          [--steps 20] [--rounds 3] [--set section.key=value ...]

Every backend trains a model with the same seed on the same first batches of the corpus
(length-bucketed as in training, augmentation on), so only the attention kernels differ.
Rounds alternate the backends (reference, cpu, reference, cpu, ...) so that a machine that
slows down mid-run hurts both alike; each round times ``--steps`` full optimiser steps after
two warm-up steps and the table reports the median round. Prints frames/s per backend and the
ratio to the first one.

The pseudo-backend ``free`` replaces every pitch-attention call by ``q + k + v`` (no scores, no
softmax, gradients still reach every projection): the throughput no attention kernel can beat,
so ``free`` over ``reference`` is the ceiling of any kernel's speed-up at this config (Amdahl).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _batches(cfg, count: int) -> list[dict[str, torch.Tensor]]:
    from torch.utils.data import DataLoader

    from echo.train import Collator, DistributedBucketSampler, batch_inputs, build_datasets, make_tokenizer

    tokenizer = make_tokenizer(cfg)
    train_set = build_datasets(cfg, tokenizer)["train"]
    sampler = DistributedBucketSampler(train_set.durations(), cfg.train.batch_size, num_replicas=1, rank=0,
                                       seed=cfg.train.seed, bucket_factor=cfg.train.bucket_factor)
    loader = DataLoader(train_set, batch_sampler=sampler.batches()[:count], collate_fn=Collator(tokenizer.pad_id))
    return [batch_inputs(b, torch.device("cpu")) for b in loader]


FREE = "free"


def _free_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> torch.Tensor:
    """Stand-in for ``rope_attention`` that costs (almost) nothing: ``q + k + v``, ``[B, H, Tq, D]``."""
    kv = k + v
    if kv.shape[1] != q.shape[1]:
        kv = kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)
    if kv.shape[2] != q.shape[2]:
        return q + kv.mean(dim=2, keepdim=True)
    return q + kv


class Trainer:
    """One model and optimiser for one backend; :meth:`run` does full optimiser steps."""

    def __init__(self, cfg, backend: str) -> None:
        from echo.model import Echo
        from echo.train import make_optimizer

        self.free = backend == FREE
        cfg.model.backend = "auto" if self.free else backend
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.model = cfg, Echo(cfg.model).train()
        self.optimizer = make_optimizer(self.model, cfg.train)

    def run(self, batches: list[dict[str, torch.Tensor]], first_step: int) -> int:
        """Steps over ``batches``; returns the mel frames processed."""
        import echo.model
        from echo.augment import augment_batch, step_generator
        from echo.train import optimizer_step

        frames = 0
        real_attention = echo.model.rope_attention
        if self.free:
            echo.model.rope_attention = _free_attention
        try:
            for n, batch in enumerate(batches):
                inputs = augment_batch(batch, self.cfg.augment,
                                       step_generator(self.cfg.train.seed, first_step + n, 0))
                optimizer_step(self.model, self.optimizer, inputs, self.cfg.train)
                frames += int(batch["mel_lengths"].sum())
        finally:
            echo.model.rope_attention = real_attention
        return frames


def measure(cfg_path: str, overrides: list[str], backends: list[str], steps: int, rounds: int
            ) -> dict[str, list[float]]:
    """``{backend: [frames/s of each round]}``."""
    import copy

    from echo.train import load_config

    cfg = load_config(cfg_path, overrides)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    batches = _batches(cfg, steps + 2)
    trainers = {name: Trainer(copy.deepcopy(cfg), name) for name in backends}
    for trainer in trainers.values():
        trainer.run(batches[:2], 0)  # warm-up: allocator, thread pool, first-call dispatch
    rates: dict[str, list[float]] = {name: [] for name in backends}
    for r in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            frames = trainer.run(batches[2:], 2 + r * steps)
            rates[name].append(frames / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--backends", nargs="+", default=["reference", "cpu", FREE],
                   help=f"attention backends to compare; '{FREE}' = attention that costs nothing (the ceiling)")
    p.add_argument("--steps", type=int, default=20, help="optimiser steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")
    rates = measure(args.config, args.set, args.backends, args.steps, args.rounds)
    base = statistics.median(rates[args.backends[0]])
    print(f"{args.config}, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| backend | frames/s (median round) | rounds | vs " + args.backends[0] + " |")
    print("| --- | --- | --- | --- |")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
