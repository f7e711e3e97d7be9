"""``python -m echo_kernels.demo``: every available backend against the float64 golden.

Draws one realistic encoder-style input (speech-like f0 with unvoiced gaps, padding),
runs each backend that can serve it, and prints the max error of the output and of
dq against the float64 dense reference, with forward and forward+backward times.
"""

from __future__ import annotations

import argparse
import time

import torch

import echo_kernels as ek
from echo_kernels.dispatch import unavailable_reason


def speech_like_f0(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, T]`` Hz: a slow contour around 100-220 Hz, with about a third unvoiced."""
    t = torch.linspace(0, 1, length)
    base = 100 + 120 * torch.rand(batch, 1, generator=gen)
    f0 = base * (1 + 0.15 * torch.sin(2 * torch.pi * 3 * t))
    return torch.where(torch.rand(batch, length, generator=gen) < 0.65, f0, torch.zeros_like(f0))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first calls compile or allocate
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    b, h, t, d = args.batch, args.heads, args.length, args.dim
    q64, k64, v64 = (torch.randn(b, h, t, d, generator=gen, dtype=torch.float64) for _ in range(3))
    f0 = speech_like_f0(b, t, gen).double()
    lengths = torch.tensor([t] + [t * 3 // 4] * (b - 1))
    dout = torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)

    def run(backend: str, dt: torch.dtype):
        q, k, v = (x.to(device, dt).requires_grad_() for x in (q64, k64, v64))
        out = ek.rope_attention(q, k, v, f0.to(device), q_lengths=lengths.to(device),
                                k_lengths=lengths.to(device), backend=backend)
        (dq,) = torch.autograd.grad(out, q, dout.to(device, dt))
        return out.double().cpu(), dq.double().cpu(), (q, k, v)

    golden_out, golden_dq, _ = run("reference", torch.float64)
    print(f"echo_kernels demo: B={b} H={h} T={t} D={d} {str(dtype).replace('torch.', '')} on {device}, "
          "f0 features, exp bias, padding")
    print(f"{'backend':<10} {'max|out err|':>13} {'max|dq err|':>12} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for backend in ek.backends():
        reason = unavailable_reason(backend)
        if reason is not None:
            print(f"{backend:<10} unavailable: {reason}")
            continue
        try:
            out, dq, (q, k, v) = run(backend, dtype)
        except NotImplementedError as exc:
            print(f"{backend:<10} cannot serve: {exc}")
            continue
        kwargs = {"q_lengths": lengths.to(device), "k_lengths": lengths.to(device), "backend": backend}
        f0d = f0.to(device)

        def forward(q=q, k=k, v=v, kwargs=kwargs, f0d=f0d):
            with torch.no_grad():
                ek.rope_attention(q, k, v, f0d, **kwargs)

        def forward_backward(q=q, k=k, v=v, kwargs=kwargs, f0d=f0d):
            ek.rope_attention(q, k, v, f0d, **kwargs).sum().backward()

        fwd_ms, fb_ms = timed(forward, args.repeats), timed(forward_backward, args.repeats)
        out_err = (out - golden_out).abs().max().item()
        dq_err = (dq - golden_dq).abs().max().item()
        print(f"{backend:<10} {out_err:>13.2e} {dq_err:>12.2e} {fwd_ms:>9.1f} {fb_ms:>11.1f}")


if __name__ == "__main__":
    main()
