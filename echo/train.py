"""Training for :class:`echo.model.Echo`: ``python -m echo train --config configs/tiny.yaml``.

* AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on GPU.
* Single process or ``torchrun --nproc_per_node N`` (DistributedDataParallel; NCCL on GPU, gloo on
  CPU). Only rank 0 writes logs and checkpoints.
* Exact resume: the batch order is a pure function of (seed, epoch) (see
  :class:`DistributedBucketSampler`), the position inside the epoch is checkpointed, and the RNG
  states of every rank are saved and restored, so a resumed CPU run follows the same loss curve and
  ends with the same weights as an uninterrupted one.
* Checkpoints are written atomically (temp file in the same folder, fsync, ``os.replace``): a crash
  while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from echo.align import token_f0
from echo.augment import AugmentConfig, augment_batch, step_generator
from echo.config import section_from_dict
from echo.data.dataset import Batch, Collator, Example, SpeechDataset
from echo.decode import DECODERS
from echo.files import atomic_save, read_checkpoint
from echo.model import Echo, EchoConfig
from echo.text import TOKENIZER_KINDS, BpeTokenizer, CharTokenizer, tokenizer_from_state

# --- configuration ---------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the data comes from. ``synthetic``: a generated toy task (tests, smoke runs) instead of
    the corpus; ``synthetic_size`` utterances for train (dev/test get a quarter each).
    ``tokenizer``: ``"char"`` or ``"bpe"`` (word pieces learned from the training transcripts,
    ``model.vocab_size`` ids). ``keep_in_memory``: hold the loaded utterances in memory, read
    from the feature cache once per process instead of once per epoch (each DDP rank holds what
    it has seen, eventually the whole training set; needs ``train.num_workers = 0``)."""

    corpus: str = "data/corpus"
    train: str = "train.jsonl"
    dev: str = "dev.jsonl"
    test: str = "test.jsonl"
    cache_dir: str | None = "data/corpus/cache"
    max_duration: float | None = None
    synthetic: bool = False
    synthetic_size: int = 64
    tokenizer: str = "char"
    keep_in_memory: bool = False

    def __post_init__(self) -> None:
        if self.max_duration is not None and not self.max_duration > 0:
            raise ValueError(f"data.max_duration must be > 0 seconds or null (keep all), got {self.max_duration}")
        if self.synthetic_size < 1:
            raise ValueError(f"data.synthetic_size must be >= 1, got {self.synthetic_size}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f"data.tokenizer must be one of {TOKENIZER_KINDS}, got {self.tokenizer!r}")


TRAIN_DEVICES = ("auto", "cpu", "cuda")
# What 0 means for the train settings that may be 0.
ZERO_MEANS = {"eval_every": "no dev evaluation", "ckpt_every": "checkpoints only at the end",
              "eval_max_utts": "all of dev", "num_workers": "load in the main process",
              "threads": "PyTorch's default"}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. ``eval_every`` / ``ckpt_every`` = 0 disables.

    ``max_minutes`` (0 = none) caps the wall time of the whole run (across resumes). By default
    the schedule still runs over ``max_steps`` and is cut wherever the time runs out; with
    ``fit_schedule`` the cosine is instead shortened to the steps that fit in ``max_minutes`` at
    the measured pace (never more than ``max_steps``), so a slower machine trains fewer steps but
    still ends annealed. The fit is made after ``warmup_steps`` (and at least ``FIT_PACE_STEPS``
    timed steps) and refreshed after each dev evaluation; the fitted length is checkpointed, but
    it depends on timing, so a resumed run can end on another step than an uninterrupted one."""

    out_dir: str = "runs/tiny"
    seed: int = 0
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 300
    max_steps: int = 3000
    max_minutes: float = 0.0
    fit_schedule: bool = False
    grad_clip: float = 1.0
    bucket_factor: int = 50
    eval_every: int = 500
    eval_max_utts: int = 200
    eval_batch_size: int = 32
    eval_decoder: str = "attention"  # how dev is decoded to pick best.pt: one of echo.decode.DECODERS
    ema_decay: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights
    ckpt_every: int = 250
    log_every: int = 10
    num_workers: int = 0
    threads: int = 0
    device: str = "auto"
    amp: bool = True

    def __post_init__(self) -> None:
        if self.device not in TRAIN_DEVICES:
            raise ValueError(f"train.device must be one of {TRAIN_DEVICES}, got {self.device!r}")
        for name in ("batch_size", "max_steps", "log_every", "eval_batch_size", "bucket_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "eval_max_utts", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0 = {ZERO_MEANS[name]}), got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("train.lr must be > 0, warmup_steps >= 0, grad_clip >= 0")
        if self.eval_decoder not in DECODERS:
            raise ValueError(f"train.eval_decoder must be one of {DECODERS}, got {self.eval_decoder!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_minutes < 0:
            raise ValueError(f"train.max_minutes must be >= 0 (0 = no limit), got {self.max_minutes}")
        if self.fit_schedule and self.max_minutes <= 0:
            raise ValueError("train.fit_schedule needs a time budget: set train.max_minutes > 0")


@dataclass
class RunConfig:
    """Everything a run needs: ``model`` (:class:`EchoConfig`), ``train``, ``data``, ``augment``."""

    model: EchoConfig = field(default_factory=EchoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.data.keep_in_memory and self.train.num_workers > 0:
            # The loader is rebuilt every epoch: each epoch's workers would fill a cache and exit.
            raise ValueError("data.keep_in_memory needs train.num_workers = 0 (DataLoader workers are "
                             "restarted every epoch, so each would reload and hold its own copy)")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (stored in checkpoints)."""
        return {"model": self.model.to_dict(), "train": asdict(self.train), "data": asdict(self.data),
                "augment": asdict(self.augment)}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a nested mapping ``{model, train, data, augment}`` into a :class:`RunConfig`."""
    if not isinstance(data, dict):
        raise TypeError(f"config must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"model", "train", "data", "augment"})
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; expected model, train, data, augment")
    model = EchoConfig.from_dict(data.get("model") or {})
    train = section_from_dict(TrainConfig, data.get("train"), "train")
    if train.eval_decoder != "attention" and model.ctc_weight == 0:
        # Caught here, not at the first dev evaluation minutes into the run.
        raise ValueError(f"train.eval_decoder {train.eval_decoder!r} needs the CTC head: set model.ctc_weight > 0 "
                         "or train.eval_decoder to 'attention'")
    return RunConfig(model, train, section_from_dict(DataConfig, data.get("data"), "data"),
                     section_from_dict(AugmentConfig, data.get("augment"), "augment"))


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML or JSON config, then apply ``section.key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][name] = _parse_value(value)
    return config_from_dict(data)


# --- data ------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """A learnable toy ASR task: each character is a fixed random mel pattern held for 3-5 frames,
    with a per-utterance pitch contour. Deterministic in (seed, index)."""

    def __init__(self, size: int, seed: int = 0, tokenizer: CharTokenizer | None = None, n_mels: int = 80,
                 alphabet: str = "abcdefgh ") -> None:
        self.size, self.seed, self.n_mels, self.alphabet = size, seed, n_mels, alphabet
        self.tokenizer = tokenizer or CharTokenizer()
        g = torch.Generator().manual_seed(12345)  # the same "voice" for every split
        self.patterns = torch.randn(self.tokenizer.vocab_size, n_mels, generator=g)

    def __len__(self) -> int:
        return self.size

    def durations(self) -> list[float]:
        """Approximate durations (used only for bucketing)."""
        return [float(len(self._text(i))) for i in range(self.size)]

    def _text(self, i: int) -> str:
        g = random.Random(self.seed * 1_000_003 + i)
        return "".join(g.choice(self.alphabet) for _ in range(g.randint(3, 8))).strip() or "a"

    def __getitem__(self, i: int) -> Example:
        text = self._text(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = self.tokenizer.encode(text, normalize=False)
        frames, pitch = [], []
        base = 100.0 + 100.0 * float(torch.rand((), generator=g))
        for n, t in enumerate(ids[1:-1]):
            k = int(torch.randint(3, 6, (), generator=g))
            frames.append(self.patterns[t].expand(k, -1))
            voiced = self.tokenizer.itos[t].strip() != ""
            pitch.append(torch.full((k,), base * (1 + 0.05 * (t % 5)) if voiced else 0.0))
        mel = torch.cat(frames) + 0.3 * torch.randn(sum(f.shape[0] for f in frames), self.n_mels, generator=g)
        f0 = torch.cat(pitch).float()
        tokens = torch.tensor(ids, dtype=torch.long)
        tf0 = token_f0(f0[None], torch.tensor([f0.shape[0]]), tokens[None], torch.tensor([tokens.shape[0]]))[0]
        return Example(mel.float(), f0, tokens, tf0, text)


def _train_texts(d: DataConfig) -> list[str]:
    if d.synthetic:
        return [SyntheticDataset(d.synthetic_size, 0)._text(i) for i in range(d.synthetic_size)]
    manifest = Path(d.corpus) / d.train
    if not manifest.exists():
        raise FileNotFoundError(f"manifest {manifest} not found (build the corpus: python -m echo.data.synth)")
    return [json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()]


def make_tokenizer(cfg: RunConfig) -> CharTokenizer:
    """The run's tokenizer (``data.tokenizer``): characters, or word pieces learned from the
    training transcripts (deterministic, so a resumed run rebuilds the same one). Its size must be
    ``model.vocab_size``."""
    if cfg.data.tokenizer == "bpe":
        tokenizer = BpeTokenizer.train(_train_texts(cfg.data), cfg.model.vocab_size)
    else:
        tokenizer = CharTokenizer()
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) != tokenizer size ({tokenizer.vocab_size}); "
                         f"the character tokenizer has {CharTokenizer().vocab_size} ids")
    return tokenizer


def build_datasets(cfg: RunConfig, tokenizer: CharTokenizer) -> dict[str, Dataset]:
    """``{"train", "dev", "test"}`` datasets for a run (synthetic or from the corpus manifests)."""
    d = cfg.data
    if d.synthetic:
        quarter = max(d.synthetic_size // 4, 2)
        return {"train": SyntheticDataset(d.synthetic_size, 0, tokenizer, cfg.model.n_mels),
                "dev": SyntheticDataset(quarter, 1, tokenizer, cfg.model.n_mels),
                "test": SyntheticDataset(quarter, 2, tokenizer, cfg.model.n_mels)}
    root = Path(d.corpus)
    out = {}
    for split in ("train", "dev", "test"):
        manifest = root / getattr(d, split)
        if not manifest.exists():
            raise FileNotFoundError(f"manifest {manifest} not found (build the corpus: python -m echo.data.synth)")
        # Long files are dropped only from training (they dominate padding); eval keeps everything.
        max_dur = d.max_duration if split == "train" else None
        out[split] = SpeechDataset(manifest, tokenizer, cache_dir=d.cache_dir, max_duration=max_dur,
                                   keep_in_memory=d.keep_in_memory)
    return out


class DistributedBucketSampler(DistributedSampler):
    """Length-bucketed batches whose order is a pure function of (seed, epoch), split over ranks.

    Per epoch: a seeded permutation, cut into pools of ``batch_size * bucket_factor`` utterances,
    each pool sorted by duration and cut into batches (little padding), the batch order shuffled
    again, trimmed to a multiple of the world size, and rank r takes batches r, r + W, ...
    Use :meth:`batches` (a list) as a DataLoader ``batch_sampler``.
    """

    def __init__(self, durations: list[float], batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, bucket_factor: int = 50) -> None:
        super().__init__(range(len(durations)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.durations, self.batch_size, self.bucket_factor = durations, batch_size, bucket_factor

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (call :meth:`set_epoch` first)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.durations), generator=g).tolist()
        pool = self.batch_size * max(self.bucket_factor, 1)
        batches = []
        for start in range(0, len(perm), pool):
            chunk = sorted(perm[start:start + pool], key=lambda i: self.durations[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
        usable = len(batches) - len(batches) % self.num_replicas
        if usable == 0:
            raise ValueError(f"{len(batches)} batches cannot be split over {self.num_replicas} ranks")
        return batches[self.rank:usable:self.num_replicas]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def batch_inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """Keyword arguments of :meth:`Echo.forward` from a collated batch."""
    b = batch.to(device)
    return {"mel": b.mel, "mel_lengths": b.mel_lengths, "f0": b.f0, "tokens": b.tokens,
            "token_lengths": b.token_lengths, "token_f0": b.token_f0}


# --- checkpoints -----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG the training step can touch."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class WarmupCosine:
    """LambdaLR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine down to
    ``min_ratio`` at step ``total``. An object, not a closure, so that the scheduler's state dict
    carries ``total`` (``fit_schedule`` changes it during a run)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fitted_total_steps(step: int, remaining_s: float, step_s: float, eval_s: float, eval_every: int,
                       max_steps: int) -> int:
    """The longest schedule (total steps, from ``step`` up to ``max_steps``) that ends within
    ``remaining_s`` seconds when each further optimiser step costs ``step_s`` and each dev
    evaluation ``eval_s`` (one every ``eval_every`` steps, 0 = none, and one at the end)."""

    def cost(total: int) -> float:
        evals = 0
        if eval_every and total > step:
            evals = total // eval_every - step // eval_every + (total % eval_every != 0)
        return (total - step) * step_s + evals * eval_s

    if cost(step) > remaining_s:
        return step
    lo, hi = step, max_steps  # cost grows with total: bisect for the last total that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= remaining_s else (lo, mid - 1)
    return lo


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on norms, biases, or the scalar/per-head pitch params).
    The fused kernel: one pass over all 133 tensors of the tiny model, 5 ms a step on a 2-core CPU
    against 23 ms for the per-tensor loop (at batch 8 that is 5% of the step)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


# --- distributed -----------------------------------------------------------------------------


def _dist_setup(device_pref: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


# --- training --------------------------------------------------------------------------------


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor],
                   tc: TrainConfig, *, forward: nn.Module | None = None, amp: bool = False
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward, backward, gradient clipping (``tc.grad_clip`` > 0) and one optimiser step on
    :func:`batch_inputs`-style ``inputs``; returns the model's outputs and the gradient norm (None
    without clipping). ``forward``: the module to call (a DDP wrapper of ``model``); ``amp``: bf16
    autocast."""
    with torch.autocast(inputs["mel"].device.type, dtype=torch.bfloat16, enabled=amp):
        out = (model if forward is None else forward)(**inputs)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out, grad_norm


class WeightAverage:
    """Exponential moving average of a model's parameters, held in a frozen copy of the model.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average
    is not anchored at the random initialisation. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        # The model of the last update and the tensor lists of both models (averaged parameters,
        # its parameters, averaged buffers, its buffers), kept: walking both module trees every
        # step cost 1.4 ms.
        self._source: nn.Module | None = None
        self._pairs: tuple[list[torch.Tensor], ...] = ()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture, not DDP-wrapped) in."""
        if model is not self._source:
            averaged, current = list(self.model.parameters()), list(model.parameters())
            if len(averaged) != len(current):
                raise ValueError(f"model has {len(current)} parameters, the average {len(averaged)}")
            buffers = list(zip(self.model.buffers(), model.buffers(), strict=True))
            self._source, self._pairs = model, (averaged, current, [a for a, _ in buffers], [b for _, b in buffers])
        self.updates += 1
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current, avg_buffers, buffers = self._pairs
        torch._foreach_lerp_(averaged, current, weight)
        if buffers:
            torch._foreach_copy_(avg_buffers, buffers)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        self.model.load_state_dict(state["model"])


FIT_PACE_STEPS = 50  # fit_schedule: steps timed before the first fit (and after a resume)


def train(cfg: RunConfig, *, resume: bool | str = False, step_callback: Callable[[int, nn.Module], None] | None = None,
          quiet: bool = False) -> dict[str, Any]:
    """Train (or continue) a run; returns ``{"step", "loss_history", "best_dev_cer", "out_dir"}``.

    ``resume``: True continues from ``out_dir/last.pt`` when it exists, a path continues from that
    checkpoint. ``step_callback(step, model)`` runs after every optimiser step (tests).
    """
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    rank, world, device = _dist_setup(tc.device)
    is_main = rank == 0
    out_dir = Path(tc.out_dir)
    tokenizer = make_tokenizer(cfg)

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = Echo(cfg.model).to(device)
    datasets = build_datasets(cfg, tokenizer)
    optimizer = make_optimizer(model, tc)
    schedule = WarmupCosine(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    average = WeightAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None
    step, epoch, batch_in_epoch, best_cer = 0, 0, 0, float("inf")
    elapsed_before = 0.0  # seconds of training before a resume: max_minutes caps the whole run

    ckpt_path = out_dir / "last.pt"
    resume_from = Path(resume) if isinstance(resume, (str, Path)) else (ckpt_path if resume else None)
    if resume_from is not None and resume_from.exists():
        ckpt = read_checkpoint(resume_from, device)
        if tokenizer_from_state(ckpt["tokenizer"]).state() != tokenizer.state():
            raise ValueError(f"{resume_from} was trained with another tokenizer than this config builds")
        model.load_state_dict(ckpt["model"])
        # (Group settings come from the checkpoint, `fused` included: a run keeps its optimiser.)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # The config decides the schedule (a resume may extend max_steps); only a fitted length,
        # which no config holds, is taken from the checkpoint.
        schedule.warmup, schedule.min_ratio = tc.warmup_steps, tc.min_lr_ratio
        schedule.total = min(schedule.total, tc.max_steps) if tc.fit_schedule else tc.max_steps
        if average is not None:
            if "ema" not in ckpt:
                raise ValueError(f"{resume_from} has no weight average (ema_decay was 0); resume with ema_decay 0")
            average.load_state_dict(ckpt["ema"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        elapsed_before = ckpt.get("elapsed_s", 0.0)
        best_cer = ckpt.get("best_dev_cer", best_cer)
        states = ckpt["rng"]
        set_rng_state(states[rank] if rank < len(states) else states[0])
        if is_main and not quiet:
            print(f"resumed from {resume_from} at step {step}")
    elif isinstance(resume, (str, Path)):
        raise FileNotFoundError(f"checkpoint {resume} not found")

    ddp_model: nn.Module = model
    if world > 1:
        # Pitch switches leave some parameters (alpha, beta, offsets) without gradient.
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    train_set = datasets["train"]
    sampler = DistributedBucketSampler(train_set.durations(), tc.batch_size, num_replicas=world, rank=rank,
                                       seed=tc.seed, bucket_factor=tc.bucket_factor)
    collate = Collator(tokenizer.pad_id)
    use_amp = tc.amp and device.type == "cuda"
    writer = _summary_writer(out_dir / "tb") if is_main else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # What dev evaluation scores and best.pt holds: the weight average when there is one.
    eval_model = average.model if average is not None else model

    def save(path: Path, collective: bool = True, best: bool = False) -> None:
        # Collective saves gather every rank's RNG state (exact DDP resume); rank-0-only saves
        # (best.pt, written during rank 0's evaluation) cannot.
        rngs = [rng_state()]
        if world > 1 and collective:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if is_main:
            state = {
                "model": (eval_model if best else model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "rng": rngs, "tokenizer": tokenizer.state(),
                "config": cfg.to_dict(), "best_dev_cer": best_cer, "elapsed_s": _now() - t_start,
            }
            if average is not None and not best:
                state["ema"] = average.state_dict()
            atomic_save(state, path)

    from tqdm import tqdm

    bar = tqdm(total=schedule.total, initial=step, desc="train", disable=not is_main or quiet, dynamic_ncols=True)
    history: list[float] = []
    t_start = _now() - elapsed_before
    budget_s = tc.max_minutes * 60  # 0 = no limit

    def out_of_time() -> bool:
        return budget_s > 0 and _now() - t_start > budget_s

    frames_window, t_window = 0, _now()
    # fit_schedule: the pace is measured on this process's steps from its second one on (the
    # first pays for start-up), dev evaluations timed apart. Until an evaluation has been timed
    # its cost is unknown (taken as 0); the refit after the first one corrects the length.
    pace_start, pace_step, eval_seconds, evals_done = 0.0, None, 0.0, 0
    fit_at = max(tc.warmup_steps, step + 1 + FIT_PACE_STEPS)

    def refit_schedule() -> None:
        step_s = (_now() - pace_start - eval_seconds) / max(step - pace_step, 1)
        # 1% of the budget is kept back for the pace's ups and downs (the run must not overshoot).
        total = fitted_total_steps(step, 0.99 * budget_s - (_now() - t_start), step_s,
                                   eval_seconds / max(evals_done, 1), tc.eval_every, tc.max_steps)
        if world > 1:  # every rank must end on the same step
            agreed = torch.tensor([total], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            total = int(agreed.item())
        schedule.total = total
        bar.total = total
        bar.refresh()
        if writer is not None:
            writer.add_scalar("train/schedule_steps", total, step)

    stop = step >= schedule.total or out_of_time()
    while not stop:
        sampler.set_epoch(epoch)
        batches = sampler.batches()[batch_in_epoch:]
        # A private generator keeps worker seeding from consuming the global RNG (exact resume).
        loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate, num_workers=tc.num_workers,
                            generator=torch.Generator().manual_seed(tc.seed))
        for batch in loader:
            model.train()
            inputs = augment_batch(batch_inputs(batch, device), cfg.augment, step_generator(tc.seed, step, rank))
            out, grad_norm = optimizer_step(model, optimizer, inputs, tc, forward=ddp_model, amp=use_amp)
            loss = out["loss"]
            scheduler.step()
            if average is not None:
                average.update(model)
            step += 1
            batch_in_epoch += 1
            loss_value = float(loss.detach())
            history.append(loss_value)
            frames_window += int(batch.mel_lengths.sum()) * world
            if step_callback is not None:
                step_callback(step, model)
            if is_main and (step % tc.log_every == 0 or step == schedule.total):
                now = _now()
                fps = frames_window / max(now - t_window, 1e-9)
                frames_window, t_window = 0, now
                bar.set_postfix(loss=f"{loss_value:.3f}", ctc=f"{float(out['ctc_loss'].detach()):.3f}",
                                lr=f"{scheduler.get_last_lr()[0]:.2e}", fps=f"{fps:.0f}")
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/att_loss", float(out["att_loss"].detach()), step)
                    writer.add_scalar("train/ctc_loss", float(out["ctc_loss"].detach()), step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("train/frames_per_s", fps, step)
                    if grad_norm is not None:
                        writer.add_scalar("train/grad_norm", float(grad_norm), step)
            bar.update(1)
            if pace_step is None:
                pace_start, pace_step = _now(), step
            timed_out = out_of_time()
            if world > 1:
                # Every rank must stop at the same step, or the collectives would hang.
                flag = torch.tensor([float(timed_out)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                timed_out = bool(flag.item())
            if tc.fit_schedule and step == fit_at:
                refit_schedule()
            stop = step >= schedule.total or timed_out
            if tc.eval_every and (step % tc.eval_every == 0 or stop):
                eval_start = _now()
                if is_main:
                    metrics = _evaluate_dev(eval_model, tokenizer, datasets["dev"], tc, device)
                    if not quiet:
                        tqdm.write(f"step {step}: dev cer {metrics['cer']:.4f} wer {metrics['wer']:.4f} "
                                   f"({_now() - t_start:.0f}s)")
                    if writer is not None:
                        writer.add_scalar("dev/cer", metrics["cer"], step)
                        writer.add_scalar("dev/wer", metrics["wer"], step)
                    if metrics["cer"] < best_cer:
                        best_cer = metrics["cer"]
                        save(out_dir / "best.pt", collective=False, best=True)
                if world > 1:
                    # best_cer lives on rank 0; the others only need to wait for the evaluation.
                    dist.barrier()
                eval_seconds += _now() - eval_start
                evals_done += 1
                if tc.fit_schedule and not stop and step > fit_at:
                    refit_schedule()
                    stop = step >= schedule.total  # no time left for another step and evaluation
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or stop:
                save(ckpt_path)
            if stop:
                break
        else:
            epoch += 1
            batch_in_epoch = 0
    bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        # Every rank leaves together, so none tears its process group down while rank 0 still
        # writes the last checkpoint (the likely cause of a gloo abort at exit seen once in CI).
        dist.barrier()
    return {"step": step, "loss_history": history, "best_dev_cer": best_cer, "out_dir": str(out_dir),
            "minutes": (_now() - t_start) / 60, "schedule_steps": schedule.total}


def _now() -> float:
    """Seconds on a monotonic clock (a function of its own so that tests can replace the clock)."""
    return time.monotonic()


def _evaluate_dev(model: Echo, tokenizer: CharTokenizer, dataset: Dataset, tc: TrainConfig, device: torch.device
                  ) -> dict[str, float]:
    from echo.evaluate import evaluate_dataset

    limit = min(len(dataset), tc.eval_max_utts) if tc.eval_max_utts else len(dataset)
    subset = torch.utils.data.Subset(dataset, range(limit))
    return evaluate_dataset(model, tokenizer, subset, batch_size=tc.eval_batch_size, device=device, progress=False,
                            decoder=tc.eval_decoder)


def _summary_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: training must not depend on it
        return None
    return SummaryWriter(str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m echo train --config CONFIG [--resume] [--set section.key=value ...]``"""
    p = argparse.ArgumentParser(prog="python -m echo train", description="Train an Echo model.")
    p.add_argument("--config", required=True, help="YAML or JSON run config")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from OUT_DIR/last.pt (or from the given checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result['step']} in {result['minutes']:.1f} min; best dev CER {result['best_dev_cer']:.4f}; "
              f"checkpoints in {result['out_dir']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
