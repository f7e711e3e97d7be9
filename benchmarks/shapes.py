"""Benchmark shapes and inputs: what a speech model meets, plus a length sweep."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import echo_kernels as ek
from echo_kernels.features import PitchFeatures


def full_mode() -> bool:
    return os.environ.get("ECHO_BENCH_FULL") == "1"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    kv_heads: int
    tq: int
    tk: int
    dim: int
    causal: bool

    @property
    def label(self) -> str:
        causal = "causal" if self.causal else "full"
        kv = f"Hk{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"{self.name}-B{self.batch}H{self.heads}{kv}D{self.dim}-{self.tq}x{self.tk}-{causal}"

    def forward_flops(self) -> float:
        """4 * B * H * Tq * Tk * D, halved for causal (the convention of FlashAttention's papers)."""
        flops = 4.0 * self.batch * self.heads * self.tq * self.tk * self.dim
        return flops / 2 if self.causal else flops


def shapes() -> list[Shape]:
    """Speech shapes (encoder, decoder, cross) and a sweep; small ones in smoke mode."""
    gpu = device() == "cuda"
    # "step": one decoding step, a new token against the cached keys (no mask needed: it may see
    # them all; SDPA's is_causal would align it with the first key instead); "step_gqa" the same
    # with 4 query heads per key/value head.
    if not full_mode():
        return [Shape("encoder", 1, 4, 4, 150, 150, 64, False), Shape("decoder", 1, 4, 4, 64, 64, 64, True),
                Shape("cross", 1, 4, 4, 48, 150, 64, False), Shape("step", 1, 4, 4, 1, 150, 64, False)]
    b, h, dims = (4, 16, (64, 128)) if gpu else (1, 8, (64,))
    sweep = (2048, 16384, 8192, 4096, 1024) if gpu else (512, 1024, 2048, 4096)
    # The sweep first, the lengths that matter most first: a run cut short by its time
    # budget (ECHO_BENCH_DEADLINE) still has the headline numbers.
    result = [Shape("sweep", b, h, h, t, t, d, c) for t in sweep for d in dims for c in (False, True)]
    for d in dims:
        result += [Shape("encoder", b, h, h, t, t, d, False) for t in (1500, 3000)]
        result += [Shape("decoder", b, h, h, 448, 448, d, True), Shape("cross", b, h, h, 448, 1500, d, False)]
        result += [Shape("step", b, h, h, 1, t, d, False) for t in (448, 4096)]
        # GQA (4 query heads per key/value head), where a kernel can rotate each key tile once per group.
        result += [Shape("step_gqa", b, h, h // 4, 1, 4096, d, False)]
    return result


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fq: PitchFeatures
    fk: PitchFeatures
    alpha: torch.Tensor
    beta: torch.Tensor
    q_lengths: torch.Tensor
    k_lengths: torch.Tensor
    causal: bool


def speech_f0(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.linspace(0, 1, length)
    f0 = (100 + 120 * torch.rand(batch, 1, generator=gen)) * (1 + 0.15 * torch.sin(2 * torch.pi * 5 * t))
    return torch.where(torch.rand(batch, length, generator=gen) < 0.65, f0, torch.zeros_like(f0))


def make_inputs(shape: Shape, dtype: torch.dtype, requires_grad: bool) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    dev = device()

    def randn(*size):
        return torch.randn(*size, generator=gen).to(dev, dtype).requires_grad_(requires_grad)

    q = randn(shape.batch, shape.heads, shape.tq, shape.dim)
    k = randn(shape.batch, shape.kv_heads, shape.tk, shape.dim)
    v = randn(shape.batch, shape.kv_heads, shape.tk, shape.dim)
    fq = ek.pitch_features(speech_f0(shape.batch, shape.tq, gen).to(dev))
    fk = ek.pitch_features(speech_f0(shape.batch, shape.tk, gen).to(dev))
    return Inputs(q, k, v, fq, fk, torch.ones(shape.heads, device=dev), torch.tensor(1.0, device=dev),
                  torch.full((shape.batch,), shape.tq, device=dev, dtype=torch.int32),
                  torch.full((shape.batch,), shape.tk, device=dev, dtype=torch.int32), shape.causal)


def dense_bytes(shape: Shape) -> int:
    """Rough peak of a method that materialises float32 [B, H, Tq, Tk] score matrices (about 6 live)."""
    return 6 * 4 * shape.batch * shape.heads * shape.tq * shape.tk
