"""Time one package tree's Triton backend on a GPU, beside SDPA, and show where the time goes.

    python benchmarks/time_triton.py [--root DIR] [--lengths 2048 4096] [--dims 64] [--methods triton cuda] [--profile]

``--root`` puts another checkout's ``echo_kernels`` first on the import path, so two
versions can be compared on one warm card (run the script once per tree in the same
call; clocks and neighbours then match). Prints, per (length, head dim, causal), the
median forward and forward+backward times of bf16, B=4, H=16 with the exp bias, the
same for SDPA's flash kernel (no rotation, no bias), and the forward's autotuned tile.
``--methods`` picks the fused backends timed beside SDPA (``triton``, ``cuda``, and ``cuda-mma``: the
CUDA backend with its opt-in CuTe kernels, ``ECHO_KERNELS_CUDA_FORWARD=mma`` and ``ECHO_KERNELS_CUDA_BACKWARD=mma``).
``--profile`` adds a per-kernel breakdown (``torch.profiler``) of one forward+backward.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_path(root: str) -> None:
    """``root``'s echo_kernels first, this checkout's ``benchmarks`` after it."""
    for path in (REPO, os.path.abspath(root)):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def median_ms(fn, repeats: int = 20) -> float:
    import torch

    fn()  # warm-up: compiles and autotunes
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def steps(inp, method: str):
    """(forward, forward+backward) closures of ``method`` ("triton", "cuda" or "sdpa") on ``inp``."""
    import torch

    from benchmarks.test_attention import method_fn

    attention = method_fn(method, inp)

    def forward():
        with torch.no_grad():
            attention()

    def forward_backward():
        attention().sum().backward()
        inp.q.grad = inp.k.grad = inp.v.grad = None

    return forward, forward_backward


def profile(inp) -> str:
    import torch
    from torch.profiler import ProfilerActivity

    _, forward_backward = steps(inp, "triton")
    forward_backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            forward_backward()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=REPO, help="the tree whose echo_kernels is timed")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--dims", type=int, nargs="+", default=[64])
    parser.add_argument("--methods", nargs="+", default=["triton"], choices=["triton", "cuda", "cuda-mma"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    _import_path(args.root)

    import torch

    import echo_kernels
    from benchmarks.shapes import Shape, make_inputs
    from echo_kernels.triton.forward_kernel import attention_fwd_kernel

    print(f"# {torch.cuda.get_device_name()} echo_kernels from {os.path.dirname(echo_kernels.__file__)}", flush=True)
    for length in args.lengths:
        for dim in args.dims:
            for causal in (False, True):
                shape = Shape("time", 4, 16, 16, length, length, dim, causal)
                inp = make_inputs(shape, torch.bfloat16, requires_grad=True)
                sdpa = [median_ms(fn) for fn in steps(inp, "sdpa")]
                for method in args.methods:
                    for variable in ("ECHO_KERNELS_CUDA_FORWARD", "ECHO_KERNELS_CUDA_BACKWARD"):
                        os.environ[variable] = "mma" if method == "cuda-mma" else "wmma"
                    fwd, fwd_bwd = (median_ms(fn) for fn in steps(inp, method.removesuffix("-mma")))
                    tile = f"; forward tile {attention_fwd_kernel.best_config}" if method == "triton" else ""
                    print(f"T={length} D={dim} causal={causal}: {method} fwd {fwd:.3f} ms ({fwd / sdpa[0]:.2f}x sdpa "
                          f"{sdpa[0]:.3f}) fwd+bwd {fwd_bwd:.3f} ms ({fwd_bwd / sdpa[1]:.2f}x sdpa {sdpa[1]:.3f}){tile}",
                          flush=True)
    if args.profile:
        shape = Shape("profile", 4, 16, 16, args.lengths[-1], args.lengths[-1], args.dims[0], False)
        print(profile(make_inputs(shape, torch.bfloat16, requires_grad=True)), flush=True)


if __name__ == "__main__":
    main()
