"""How fast could any CPU attention kernel be here? Matrix-multiply bound against measured times.

    python -m benchmarks.cpu_roofline [--lengths 512 1024] [--rounds 5] [--threads N] [--forward]

Attention forward+backward needs at least six matrix products per head (Q K^T and P V forward;
dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q backward), ``3 * Shape.forward_flops()``
floating-point operations, whatever else a kernel does (softmax, rotation, bias). This script
measures the best float32 matrix-multiply rate this CPU reaches through PyTorch's BLAS (the
attention-shaped batched products and a large square one, all threads), turns the operation
count into a lower bound on the time, and times the dense ``reference`` and the fused ``cpu``
kernel on the benchmark's sweep inputs (B=1, H=8, D=64, exp pitch bias), interleaved, median of
``--rounds``. ``reference / bound`` is the largest speed-up over the reference that any kernel
could reach on this machine. ``--forward`` times the forward alone (no autograd graph), whose
bound is its two products (Q K^T and P V).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import echo_kernels as ek

from .shapes import Shape, make_inputs


def _seconds(fn, rounds: int) -> float:
    """Median wall time of ``fn()`` over ``rounds`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(heads: int, length: int, dim: int, rounds: int) -> dict[str, float]:
    """GFLOP/s of float32 products: the two attention shapes (per head) and a 1024^3 square one."""
    a, b = torch.randn(heads, length, dim), torch.randn(heads, dim, length)
    p = torch.randn(heads, length, length)
    square = torch.randn(1024, 1024)
    attention_flops = 2.0 * heads * length * length * dim
    return {
        f"Q K^T [{heads}, {length}, {dim}] x [{dim}, {length}]": attention_flops / _seconds(lambda: a @ b, rounds) / 1e9,
        f"P V [{heads}, {length}, {length}] x [{length}, {dim}]": attention_flops / _seconds(lambda: p @ a, rounds) / 1e9,
        "1024 x 1024 x 1024": 2.0 * 1024**3 / _seconds(lambda: square @ square, rounds) / 1e9,
    }


def attention_seconds(backend: str, shape: Shape, rounds: int, *, backward: bool) -> float:
    """Median seconds of one forward (and, with ``backward``, its backward) on the sweep inputs."""
    inp = make_inputs(shape, torch.float32, requires_grad=backward)

    def step() -> None:
        out = ek.rope_attention(inp.q, inp.k, inp.v, features=inp.fq, features_k=inp.fk, alpha=inp.alpha,
                                beta=inp.beta, causal=inp.causal, q_lengths=inp.q_lengths,
                                k_lengths=inp.k_lengths, backend=backend)
        if backward:
            out.sum().backward()
            inp.q.grad = inp.k.grad = inp.v.grad = None

    return _seconds(step, rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = PyTorch's default)")
    parser.add_argument("--forward", action="store_true", help="time the forward alone (2 products)")
    args = parser.parse_args(argv)
    backward = not args.forward
    products = 6 if backward else 2
    if args.threads:
        torch.set_num_threads(args.threads)
    heads, dim = 8, 64
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, B=1 H={heads} D={dim}")
    print("\n| float32 product | GFLOP/s |\n| --- | --- |")
    best = 0.0
    for length in args.lengths:
        for name, rate in gemm_rate(heads, length, dim, args.rounds).items():
            print(f"| {name} | {rate:.1f} |")
            best = max(best, rate)
    mode = "forward+backward" if backward else "forward"
    print(f"\n{mode}. Best rate: {best:.1f} GFLOP/s. Bound = {products} products / best rate.\n")
    print(f"| T, mask | GFLOP ({products} products) | bound | reference | cpu | reference / cpu | reference / bound "
          "| cpu GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for length in args.lengths:
        for causal in (False, True):
            shape = Shape("sweep", 1, heads, heads, length, length, dim, causal)
            flops = products / 2 * shape.forward_flops()
            bound = flops / (best * 1e9)
            refs, cpus = [], []
            for _ in range(2):  # interleaved, so a machine that slows down mid-run hurts both alike
                refs.append(attention_seconds("reference", shape, args.rounds, backward=backward))
                cpus.append(attention_seconds("cpu", shape, args.rounds, backward=backward))
            ref, cpu = statistics.mean(refs), statistics.mean(cpus)
            mask = "causal" if causal else "full"
            print(f"| {length}, {mask} | {flops / 1e9:.2f} | {bound * 1e3:.1f} ms | {ref * 1e3:.1f} ms | "
                  f"{cpu * 1e3:.1f} ms | {ref / cpu:.2f}x | {ref / bound:.2f}x | {flops / cpu / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
